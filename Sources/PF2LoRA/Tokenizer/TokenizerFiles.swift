import Foundation

/// An added (special) token as tokenizer.json lists it, with Hugging Face's matching flags.
struct AddedToken {
    let id: Int
    let content: String
    let special: Bool
    /// Also swallow whitespace on the left / right of the token (Hugging Face `lstrip` / `rstrip`).
    let lstrip: Bool
    let rstrip: Bool
    /// Match only where no word character touches the token on either side.
    var singleWord = false
    /// Match in the normalized text (after the normalizer) instead of the raw text.
    var normalized = false
}

/// How a `Split` pre-tokenizer treats the pieces its pattern matches (Hugging Face's
/// `SplitDelimiterBehavior`), e.g. splitting "the-final--countdown" on "-":
/// removed ["the", "final", "countdown"], isolated ["the", "-", "final", "-", "-", "countdown"],
/// mergedWithPrevious ["the-", "final-", "-", "countdown"], mergedWithNext ["the", "-final", "-", "-countdown"],
/// contiguous ["the", "-", "final", "--", "countdown"].
enum SplitBehavior: String {
    case removed = "Removed", isolated = "Isolated", mergedWithPrevious = "MergedWithPrevious"
    case mergedWithNext = "MergedWithNext", contiguous = "Contiguous"
}

/// One stage of pre-tokenization, applied to every piece the previous stage produced.
enum PreTokenizerStep {
    /// GPT-2's regex, isolated (ByteLevel with use_regex, or a Split with exactly that pattern):
    /// the hand-written scanner `PreTokenizer.pieceEnd`.
    case gpt2Regex
    /// The Llama-3 (`maxDigits` 3) or Qwen2 (1) Split regex, isolated: the scanner `LlamaPreTokenizer`.
    case llamaRegex(maxDigits: Int)
    /// A tokenizer.json `Split`: a regex (or literal string) with a behavior and the invert flag.
    case split(SplitRegex, SplitBehavior, invert: Bool)
    /// `Digits`: numbers apart from the rest, one digit per piece when `individual`.
    case digits(individual: Bool)
    /// ByteLevel's `add_prefix_space`: a piece that does not start with a space gets one.
    case prefixSpace
}

/// The raw contents of a tokenizer folder, before any table is built.
struct TokenizerFiles {
    var vocab: [String: Int] = [:]
    /// Merges in rank order, each with the file and 1-based position it came from (for errors).
    var merges: [(String, String)] = []
    var mergesFile = ""
    var addedTokens: [AddedToken] = []
    /// Qwen2's NFC; nil for no normalizer.
    var nfc = false
    /// GPT-2's by default (the vocab.json + merges.txt layout).
    var preTokenizer: [PreTokenizerStep] = [.gpt2Regex]
    /// BPE `ignore_merges` (Llama-3): a piece that is itself a vocabulary entry is that one token.
    var ignoreMerges = false
    /// Ids the post-processor puts before and after the text's ids (TemplateProcessing's `single`).
    var prefixIds: [Int] = []
    var suffixIds: [Int] = []
    /// bos_token / eos_token of tokenizer_config.json, if the folder has one.
    var bosToken: String?
    var eosToken: String?

    /// Reads `tokenizer.json`, or else `vocab.json` + `merges.txt`, from `folder`, and
    /// tokenizer_config.json's bos/eos tokens if it is there.
    static func load(folder: String) throws -> TokenizerFiles {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: folder, isDirectory: &isDir), isDir.boolValue else {
            throw TokenizerError.folderNotFound(folder)
        }
        let dir = URL(fileURLWithPath: folder)
        let tokenizerJSON = dir.appendingPathComponent("tokenizer.json").path
        let vocabJSON = dir.appendingPathComponent("vocab.json").path
        let mergesTxt = dir.appendingPathComponent("merges.txt").path
        let fm = FileManager.default
        var files: TokenizerFiles
        if fm.fileExists(atPath: tokenizerJSON) {
            files = try loadTokenizerJSON(tokenizerJSON)
        } else if fm.fileExists(atPath: vocabJSON) && fm.fileExists(atPath: mergesTxt) {
            files = try loadVocabMerges(vocab: vocabJSON, merges: mergesTxt,
                                        added: dir.appendingPathComponent("added_tokens.json").path)
        } else {
            throw TokenizerError.noTokenizerFiles(folder: folder)
        }
        let configPath = dir.appendingPathComponent("tokenizer_config.json").path
        if fm.fileExists(atPath: configPath) {
            let config = try readJSON(configPath)
            files.bosToken = tokenString(config["bos_token"])
            files.eosToken = tokenString(config["eos_token"])
        }
        return files
    }

    /// A token in tokenizer_config.json: a string, or an object with "content" (older files).
    static func tokenString(_ v: JSONValue?) -> String? {
        if let s = v?.string { return s }
        return v?["content"]?.string
    }

    static func readJSON(_ path: String) throws -> JSONValue {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw TokenizerError.unreadable(file: path, why: "cannot open the file")
        }
        do { return try JSONValue.parse([UInt8](data)) } catch {
            throw TokenizerError.badJSON(file: path, why: "\(error)")
        }
    }

    private static func parseVocab(_ value: JSONValue?, file: String) throws -> [String: Int] {
        guard case .object(let members)? = value else { throw TokenizerError.badJSON(file: file, why: "the vocabulary is not an object of token -> id") }
        var vocab = [String: Int](minimumCapacity: members.count)
        for (token, v) in members {
            guard let id = v.int, id >= 0 else { throw TokenizerError.badVocab(file: file, why: "a token of \(token.utf8.count) bytes has an id that is not a non-negative integer") }
            vocab[token] = id
        }
        return vocab
    }

    static func loadTokenizerJSON(_ path: String) throws -> TokenizerFiles {
        let root = try readJSON(path)
        guard case .object = root else { throw TokenizerError.badJSON(file: path, why: "the top level is not an object") }
        guard let model = root["model"], case .object = model else { throw TokenizerError.badJSON(file: path, why: "no \"model\" object") }
        let type = model["type"]?.string ?? "BPE"
        guard type == "BPE" else { throw TokenizerError.unsupported(file: path, part: "model", type: FileText.kind(type), supported: "BPE (byte-level)") }
        if model["byte_fallback"]?.bool == true {
            throw TokenizerError.unsupported(file: path, part: "model", type: "BPE with byte_fallback (SentencePiece style)", supported: "byte-level BPE")
        }
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if let s = model[key]?.string, !s.isEmpty {
                throw TokenizerError.unsupported(file: path, part: "model", type: "BPE with \(key) set", supported: "byte-level BPE without it")
            }
        }
        if let d = model["dropout"]?.double, d > 0 {
            throw TokenizerError.unsupported(file: path, part: "model", type: "BPE with dropout", supported: "BPE without dropout")
        }
        var files = TokenizerFiles()
        files.vocab = try parseVocab(model["vocab"], file: path)
        files.mergesFile = path
        files.ignoreMerges = model["ignore_merges"]?.bool ?? false
        guard let merges = model["merges"]?.array else { throw TokenizerError.badJSON(file: path, why: "model.merges is missing or not an array") }
        files.merges.reserveCapacity(merges.count)
        for (i, m) in merges.enumerated() {
            if let s = m.string {
                files.merges.append(try splitMerge(s, file: path, line: i + 1))
            } else if let pair = m.array, pair.count == 2, let a = pair[0].string, let b = pair[1].string {
                files.merges.append((a, b))
            } else {
                throw TokenizerError.badMerge(file: path, line: i + 1, text: "")
            }
        }
        for t in root["added_tokens"]?.array ?? [] {
            guard let id = t["id"]?.int, id >= 0, let content = t["content"]?.string else {
                throw TokenizerError.badJSON(file: path, why: "an added_tokens entry lacks an integer id or a content string")
            }
            let special = t["special"]?.bool ?? false
            files.addedTokens.append(AddedToken(id: id, content: content, special: special,
                                                lstrip: t["lstrip"]?.bool ?? false, rstrip: t["rstrip"]?.bool ?? false,
                                                singleWord: t["single_word"]?.bool ?? false,
                                                normalized: t["normalized"]?.bool ?? !special))
        }
        files.nfc = try parseNormalizer(root["normalizer"], file: path)
        files.preTokenizer = try parsePreTokenizer(root["pre_tokenizer"], file: path)
        try parsePostProcessor(root["post_processor"], file: path, into: &files)
        try checkDecoder(root["decoder"], file: path)
        return files
    }

    // MARK: Pipeline parts

    /// nil or NFC (alone or in a Sequence): whether NFC applies.
    private static func parseNormalizer(_ v: JSONValue?, file: String) throws -> Bool {
        guard let v, case .object = v else { return false }
        let type = v["type"]?.string ?? "?"
        switch type {
        case "NFC": return true
        case "Sequence":
            var nfc = false
            for n in v["normalizers"]?.array ?? [] { nfc = try parseNormalizer(n, file: file) || nfc }
            return nfc
        default:
            throw TokenizerError.unsupported(file: file, part: "normalizer", type: FileText.kind(type), supported: "none, NFC, or a Sequence of NFC")
        }
    }

    private static func parsePreTokenizer(_ v: JSONValue?, file: String) throws -> [PreTokenizerStep] {
        guard let v, case .object = v else {
            throw TokenizerError.unsupported(file: file, part: "pre_tokenizer", type: "null", supported: "ByteLevel, or a Sequence of Split/Digits ending in ByteLevel (byte-level BPE)")
        }
        var flat: [JSONValue] = []
        func flatten(_ x: JSONValue) {
            if x["type"]?.string == "Sequence" { for y in x["pretokenizers"]?.array ?? [] { flatten(y) } } else { flat.append(x) }
        }
        flatten(v)
        var steps: [PreTokenizerStep] = []
        var sawByteLevel = false
        for (k, x) in flat.enumerated() {
            let type = x["type"]?.string ?? "?"
            if sawByteLevel {
                throw TokenizerError.unsupported(file: file, part: "pre_tokenizer", type: "\(FileText.kind(type)) after ByteLevel", supported: "ByteLevel as the last step")
            }
            switch type {
            case "ByteLevel":
                sawByteLevel = true
                if x["add_prefix_space"]?.bool ?? true { steps.append(.prefixSpace) }
                if x["use_regex"]?.bool ?? true { steps.append(.gpt2Regex) }
            case "Split":
                let behaviorName = x["behavior"]?.string ?? "?"
                guard let behavior = SplitBehavior(rawValue: behaviorName) else {
                    throw TokenizerError.unsupported(file: file, part: "pre_tokenizer Split behavior", type: FileText.kind(behaviorName), supported: "Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous")
                }
                let invert = x["invert"]?.bool ?? false
                let regexSource: String
                if let r = x["pattern"]?["Regex"]?.string {
                    regexSource = r
                } else if let s = x["pattern"]?["String"]?.string {
                    regexSource = s.unicodeScalars.map { "\\x{" + String($0.value, radix: 16) + "}" }.joined()
                } else {
                    throw TokenizerError.badJSON(file: file, why: "pre_tokenizer step \(k) (Split) has no pattern {\"Regex\": ...} or {\"String\": ...}")
                }
                if regexSource == PreTokenizer.gpt2Pattern && behavior == .isolated && !invert {
                    steps.append(.gpt2Regex)
                } else if let maxDigits = LlamaPreTokenizer.maxDigits(ofPattern: regexSource), behavior == .isolated {
                    steps.append(.llamaRegex(maxDigits: maxDigits))
                } else {
                    do { steps.append(.split(try SplitRegex(regexSource), behavior, invert: invert)) } catch {
                        throw TokenizerError.unsupported(file: file, part: "pre_tokenizer Split pattern", type: error.description, supported: "the regex features of GPT-2, Llama-3 and Qwen2 patterns")
                    }
                }
            case "Digits":
                steps.append(.digits(individual: x["individual_digits"]?.bool ?? false))
            default:
                throw TokenizerError.unsupported(file: file, part: "pre_tokenizer", type: FileText.kind(type), supported: "ByteLevel, Split, Digits, Sequence")
            }
        }
        guard sawByteLevel else {
            throw TokenizerError.unsupported(file: file, part: "pre_tokenizer", type: "a pipeline without ByteLevel", supported: "byte-level BPE (a ByteLevel step last)")
        }
        return steps
    }

    private static func parsePostProcessor(_ v: JSONValue?, file: String, into files: inout TokenizerFiles) throws {
        guard let v, case .object = v else { return }
        let type = v["type"]?.string ?? "?"
        switch type {
        case "ByteLevel":
            return   // offsets only
        case "Sequence":
            for p in v["processors"]?.array ?? [] { try parsePostProcessor(p, file: file, into: &files) }
        case "TemplateProcessing":
            guard let single = v["single"]?.array else { throw TokenizerError.badJSON(file: file, why: "post_processor TemplateProcessing has no \"single\" template") }
            var before: [Int] = [], after: [Int] = []
            var sawSequence = false
            for (n, item) in single.enumerated() {
                if let seq = item["Sequence"] {
                    guard seq["id"]?.string == "A", !sawSequence else {
                        throw TokenizerError.unsupported(file: file, part: "post_processor", type: "TemplateProcessing single template with a sequence other than one $A", supported: "one $A")
                    }
                    sawSequence = true
                } else if let sp = item["SpecialToken"], let name = sp["id"]?.string {
                    guard let ids = v["special_tokens"]?[name]?["ids"]?.array?.compactMap({ $0.int }) else {
                        throw TokenizerError.badJSON(file: file, why: "post_processor names a special token (\(name.utf8.count) bytes) that special_tokens has no ids for")
                    }
                    if sawSequence { after += ids } else { before += ids }
                } else {
                    throw TokenizerError.badJSON(file: file, why: "post_processor template item \(n + 1) is neither a Sequence nor a SpecialToken")
                }
            }
            files.prefixIds += before
            files.suffixIds += after
        case "RobertaProcessing", "BertProcessing":
            guard let cls = v["cls"]?.array, cls.count == 2, let clsId = cls[1].int,
                  let sep = v["sep"]?.array, sep.count == 2, let sepId = sep[1].int else {
                throw TokenizerError.badJSON(file: file, why: "post_processor \(type) needs cls and sep as [token, id]")
            }
            files.prefixIds += [clsId]
            files.suffixIds += [sepId]
        default:
            throw TokenizerError.unsupported(file: file, part: "post_processor", type: FileText.kind(type), supported: "ByteLevel, TemplateProcessing, RobertaProcessing, BertProcessing, Sequence")
        }
    }

    private static func checkDecoder(_ v: JSONValue?, file: String) throws {
        guard let v, case .object = v else {
            throw TokenizerError.unsupported(file: file, part: "decoder", type: "null", supported: "ByteLevel")
        }
        let type = v["type"]?.string ?? "?"
        switch type {
        case "ByteLevel": return
        case "Sequence":
            let parts = v["decoders"]?.array ?? []
            guard parts.count == 1 else {
                throw TokenizerError.unsupported(file: file, part: "decoder", type: "Sequence of \(parts.count) decoders (\(parts.map { FileText.kind($0["type"]?.string ?? "?") }.joined(separator: ", ")))", supported: "ByteLevel")
            }
            try checkDecoder(parts[0], file: file)
        default:
            throw TokenizerError.unsupported(file: file, part: "decoder", type: FileText.kind(type), supported: "ByteLevel")
        }
    }

    /// The older layout: vocab.json, merges.txt ("#version" line, then "a b" per line) and, if present,
    /// added_tokens.json (content -> id). `<|endoftext|>` in the vocabulary counts as a special token, as
    /// transformers' GPT2Tokenizer treats it.
    static func loadVocabMerges(vocab vocabPath: String, merges mergesPath: String, added addedPath: String) throws -> TokenizerFiles {
        var files = TokenizerFiles()
        files.vocab = try parseVocab(try readJSON(vocabPath), file: vocabPath)
        files.mergesFile = mergesPath
        let text: String
        do { text = try String(contentsOfFile: mergesPath, encoding: .utf8) } catch {
            throw TokenizerError.unreadable(file: mergesPath, why: error.localizedDescription)
        }
        var lineNo = 0
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNo += 1
            var line = Substring(line)
            if line.hasSuffix("\r") { line = line.dropLast() }
            if line.hasPrefix("#version") || line.isEmpty { continue }
            files.merges.append(try splitMerge(String(line), file: mergesPath, line: lineNo))
        }
        var added: [String: Int] = [:]
        if FileManager.default.fileExists(atPath: addedPath) { added = try parseVocab(try readJSON(addedPath), file: addedPath) }
        if added["<|endoftext|>"] == nil, let eos = files.vocab["<|endoftext|>"] { added["<|endoftext|>"] = eos }
        for (content, id) in added.sorted(by: { $0.value < $1.value }) {
            files.addedTokens.append(AddedToken(id: id, content: content, special: true, lstrip: false, rstrip: false))
        }
        return files
    }

    private static func splitMerge(_ s: String, file: String, line: Int) throws -> (String, String) {
        let parts = s.split(separator: " ", omittingEmptySubsequences: false)
        guard parts.count == 2 else { throw TokenizerError.badMerge(file: file, line: line, text: s) }
        return (String(parts[0]), String(parts[1]))
    }
}
