/// What can be wrong with a tokenizer folder. Each case names the file and says what to fix. A
/// message never quotes what the files hold (tokens, merges, patterns, values): only type names the
/// program knows (`FileText.kind`), line numbers, offsets and sizes.
public enum TokenizerError: Error, CustomStringConvertible, Equatable {
    case folderNotFound(String)
    case noTokenizerFiles(folder: String)
    case unreadable(file: String, why: String)
    case badJSON(file: String, why: String)
    /// A part of tokenizer.json (model, normalizer, pre_tokenizer, post_processor, decoder) of a kind
    /// this tokenizer does not implement.
    case unsupported(file: String, part: String, type: String, supported: String)
    case badVocab(file: String, why: String)
    case badMerge(file: String, line: Int, text: String)
    case mergeUnknownToken(file: String, line: Int, token: String)

    public var description: String {
        switch self {
        case let .folderNotFound(f):
            return "\(f): no such folder; pass a model or tokenizer folder (with tokenizer.json, or vocab.json and merges.txt)"
        case let .noTokenizerFiles(f):
            return "\(f): no tokenizer.json, and no vocab.json + merges.txt pair; copy the tokenizer files of the model into this folder"
        case let .unreadable(f, why):
            return "\(f): cannot read (\(why)); check the file exists and is readable"
        case let .badJSON(f, why):
            return "\(f): not valid tokenizer JSON (\(why)); re-download or re-save the tokenizer"
        case let .unsupported(f, part, type, supported):
            return "\(f): \(part) \(type) is not supported (supported: \(supported)); pf2lora reads byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2 families)"
        case let .badVocab(f, why):
            return "\(f): bad vocabulary (\(why)); each entry must map a token string to a non-negative integer id"
        case let .badMerge(f, line, text):
            return "\(f): merge \(line)\(text.isEmpty ? "" : " (\(text.utf8.count) bytes)") is not two tokens separated by one space (or a [\"a\", \"b\"] pair)"
        case let .mergeUnknownToken(f, line, token):
            return "\(f): merge \(line) refers to a token (\(token.utf8.count) bytes) that is not in the vocabulary; the vocab and merges files do not belong together"
        }
    }
}
