import Foundation

/// A byte-level BPE tokenizer made in code, for a model folder that has to work with nothing
/// downloaded (`pf2lora model random` without `--tokenizer`). Its vocabulary is GPT-2's byte
/// alphabet (ids 0-255, byte b = id b), then merges of two bytes, most common English letters and
/// the space first, until the vocabulary has `vocabSize - 1` tokens, and `<|endoftext|>` last. Every
/// id decodes to one or two bytes and every UTF-8 text encodes and decodes back to itself. It is
/// not trained on anything: for GPT-2's real vocabulary pass its tokenizer files instead.
///
/// The files are the Hugging Face layout: tokenizer.json (what `tokenizers` and `BPETokenizer`
/// read), vocab.json + merges.txt, tokenizer_config.json and special_tokens_map.json.
public enum GeneratedTokenizer {
    /// The smallest vocabulary: the 256 bytes and `<|endoftext|>`.
    public static let minVocabSize = 257
    /// The largest: every ordered pair of bytes merged once.
    public static let maxVocabSize = 256 + 256 * 256 + 1

    /// Bytes in the order their pairs are merged: frequent English letters and the space first.
    static let byteOrder: [UInt8] = {
        let first = Array(" etaoinsrhldcumfpgwybvkxjqzETAOINSRHLDCUMFPGWYBVKXJQZ0123456789.,'\"-!?:;()\n".utf8)
        var seen = Set(first)
        var order = first
        for b in 0...255 where !seen.contains(UInt8(b)) { order.append(UInt8(b)); seen.insert(UInt8(b)) }
        return order
    }()

    /// The merges of a vocabulary of `vocabSize` tokens, in rank order: the pairs of the first n
    /// bytes of `byteOrder` before any pair involving byte n + 1 (so "th" and " t" come early).
    static func merges(vocabSize: Int) -> [(UInt8, UInt8)] {
        let count = vocabSize - minVocabSize
        var out: [(UInt8, UInt8)] = []
        out.reserveCapacity(count)
        var n = 0
        while out.count < count {
            // Shell n: every pair whose later byte (in byteOrder) is byteOrder[n].
            let x = byteOrder[n]
            for i in 0..<n where out.count < count { out.append((byteOrder[i], x)) }
            for i in 0..<n where out.count < count { out.append((x, byteOrder[i])) }
            if out.count < count { out.append((x, x)) }
            n += 1
        }
        return out
    }

    /// Writes the tokenizer files into `folder` (which must exist), replacing any there.
    /// `vocabSize` must be in `minVocabSize...maxVocabSize` (the caller says so to its user).
    public static func write(vocabSize: Int, to folder: String) throws {
        precondition((minVocabSize...maxVocabSize).contains(vocabSize), "vocabulary size \(vocabSize) outside \(minVocabSize)...\(maxVocabSize)")
        func spell(_ b: UInt8) -> String { String(Character(ByteLevel.byteToScalar[Int(b)])) }
        let pairs = merges(vocabSize: vocabSize)
        // Tokens in id order: the bytes, the merged pairs, <|endoftext|>.
        var tokens = (0...255).map { spell(UInt8($0)) }
        tokens.reserveCapacity(vocabSize)
        for (a, b) in pairs { tokens.append(spell(a) + spell(b)) }
        let eos = vocabSize - 1
        let eosText = "<|endoftext|>"

        // The vocabulary and merges are written by hand: JSONSerialization takes seconds on 50,000
        // keys. Every token is in GPT-2's byte alphabet, so only `"` and `\` need escaping.
        func quoted(_ t: String) -> String {
            "\"" + t.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
        }
        func vocabObject(withEOS: Bool) -> String {
            var out = "{"
            out.reserveCapacity(vocabSize * 12)
            for (id, t) in tokens.enumerated() { out += (id == 0 ? "" : ",") + quoted(t) + ":" + String(id) }
            if withEOS { out += "," + quoted(eosText) + ":" + String(eos) }
            return out + "}"
        }
        var mergesJSON = "["
        var mergesTxt = "#version: 0.2\n"
        for (k, (a, b)) in pairs.enumerated() {
            mergesJSON += (k == 0 ? "[" : ",[") + quoted(spell(a)) + "," + quoted(spell(b)) + "]"
            mergesTxt += spell(a) + " " + spell(b) + "\n"
        }
        mergesJSON += "]"
        let byteLevel = #"{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}"#
        let tokenizerJSON = """
            {"version":"1.0","truncation":null,"padding":null,"normalizer":null,\
            "added_tokens":[{"id":\(eos),"content":"\(eosText)","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],\
            "pre_tokenizer":\(byteLevel),"post_processor":\(byteLevel),"decoder":\(byteLevel),\
            "model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,\
            "fuse_unk":false,"byte_fallback":false,"ignore_merges":false,"vocab":\(vocabObject(withEOS: false)),"merges":\(mergesJSON)}}
            """
        let special: [String: Any] = ["bos_token": eosText, "eos_token": eosText, "unk_token": eosText]
        let config: [String: Any] = special.merging([
            "add_prefix_space": false, "add_bos_token": false, "tokenizer_class": "GPT2Tokenizer",
            "clean_up_tokenization_spaces": false, "model_max_length": 1024,
            "added_tokens_decoder": [String(eos): ["content": eosText, "lstrip": false, "normalized": false, "rstrip": false,
                                                   "single_word": false, "special": true]],
        ]) { $1 }
        let dir = URL(fileURLWithPath: folder)
        func write(_ text: String, _ name: String) throws {
            try Data(text.utf8).write(to: dir.appendingPathComponent(name), options: .atomic)
        }
        func json(_ obj: Any) throws -> String {
            String(decoding: try JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys, .prettyPrinted]), as: UTF8.self)
        }
        try write(tokenizerJSON, "tokenizer.json")
        try write(vocabObject(withEOS: true), "vocab.json")
        try write(mergesTxt, "merges.txt")
        try write(try json(config), "tokenizer_config.json")
        try write(try json(special), "special_tokens_map.json")
    }
}
