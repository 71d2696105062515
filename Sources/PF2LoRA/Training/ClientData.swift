import Foundation

/// Why client text data was refused; each case names the client and the file and says what to do.
public enum ClientDataError: Error, CustomStringConvertible, Equatable {
    case missingFolder(String)
    case missingClientFolder(String)
    case noClients(String)
    case missingSplit(client: String, split: String, folder: String)
    case unreadable(file: String, why: String)
    case badJSONL(file: String, line: Int, why: String)
    case noTexts(client: String, file: String)
    case noTokens(client: String, file: String)
    case invalidClientID(String, why: String)

    public var description: String {
        switch self {
        case let .missingFolder(p): return "\(p) is not a folder; --data must be a folder with one sub-folder per client (<data>/<client>/train.jsonl, valid.jsonl, test.jsonl)"
        case let .missingClientFolder(p): return "\(p) is not a folder; a client's data folder holds its texts as train.jsonl, valid.jsonl and test.jsonl (or .txt)"
        case let .noClients(p): return "\(p) has no client folders; put each client's texts in <data>/<client>/train.jsonl (or train.txt), valid.*, test.*"
        case let .missingSplit(c, s, folder):
            return "client '\(c)' has no \(s) data: expected \(folder)/\(s).jsonl (one {\"text\": ...} per line) or \(folder)/\(s).txt (texts separated by blank lines)"
        case let .unreadable(f, why): return "\(f): cannot read (\(why))"
        case let .badJSONL(f, line, why): return "\(f):\(line): \(why); each line must be a JSON object with a string field \"text\""
        case let .noTexts(c, f): return "client '\(c)': \(f) holds no texts (empty file or only blank lines); give it at least one text"
        case let .noTokens(c, f): return "client '\(c)': the texts of \(f) tokenize to nothing (only whitespace or characters the tokenizer drops); give real text"
        case let .invalidClientID(id, why): return "client folder '\(id)' is not a valid client id (\(why)); rename the folder"
        }
    }
}

/// Reading texts: JSONL with a `text` field per line, or plain text with one text per paragraph.
public enum TextFile {
    /// The texts of `path`: `.jsonl`/`.json` files are JSON Lines with a string field `text` (blank
    /// lines skipped); anything else is plain text, one text per blank-line-separated paragraph.
    /// Texts that are empty after trimming are dropped.
    public static func read(_ path: String) throws -> [String] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ClientDataError.unreadable(file: path, why: FileManager.default.fileExists(atPath: path) ? "permission denied or not a file" : "no such file")
        }
        guard let s = String(data: data, encoding: .utf8) else { throw ClientDataError.unreadable(file: path, why: "not UTF-8 text") }
        if path.hasSuffix(".jsonl") || path.hasSuffix(".json") { return try jsonl(s, file: path) }
        return paragraphs(s)
    }

    /// One text per line of JSON Lines, from the string field `text`.
    public static func jsonl(_ s: String, file: String) throws -> [String] {
        var out: [String] = []
        for (i, line) in s.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            if line.allSatisfy({ $0.isWhitespace }) { continue }
            guard let obj = try? JSONSerialization.jsonObject(with: Data(line.utf8)) else {
                throw ClientDataError.badJSONL(file: file, line: i + 1, why: "not valid JSON")
            }
            guard let d = obj as? [String: Any], let t = d["text"] as? String else {
                throw ClientDataError.badJSONL(file: file, line: i + 1, why: "no string field \"text\"")
            }
            if !t.allSatisfy({ $0.isWhitespace }) { out.append(t) }
        }
        return out
    }

    /// Paragraphs separated by one or more blank lines, trimmed.
    public static func paragraphs(_ s: String) -> [String] {
        var out: [String] = [], cur: [Substring] = []
        for line in s.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.allSatisfy({ $0.isWhitespace }) {
                if !cur.isEmpty { out.append(cur.joined(separator: "\n")); cur = [] }
            } else {
                cur.append(line.hasSuffix("\r") ? line.dropLast() : line)
            }
        }
        if !cur.isEmpty { out.append(cur.joined(separator: "\n")) }
        return out.map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }.filter { !$0.isEmpty }
    }
}

/// One split of one client as a single token stream: the texts, tokenized, each preceded by the
/// separator token (`<|endoftext|>`), so the stream is `eos t1 eos t2 eos t3 ...`.
///
/// Why packing rather than one padded row per text: the corpus texts are short (a few to a hundred
/// tokens), so padding rows to T would spend most of each batch on ignored positions. Packing keeps
/// every position a real target, and the separator before each text teaches where texts start and
/// end (the model sees `eos` as the start-of-text context, as GPT-2 was pretrained). A window may
/// span two texts; across the separator the model predicts the next text's first token from `eos`
/// and the previous text, which is what happens at generation time after an end-of-text too.
public struct TokenStream: Sendable {
    public let tokens: [Int32]
    /// Number of texts (the FedAvg weight n_k for a training split).
    public let textCount: Int

    public init(tokens: [Int32], textCount: Int) { self.tokens = tokens; self.textCount = textCount }

    /// Tokenizes `texts` with `separator` before each one. Texts that tokenize to nothing are skipped;
    /// the stream is empty when all do.
    public init(texts: [String], tokenizer: BPETokenizer, separator: Int) {
        var toks: [Int32] = []
        var n = 0
        for t in texts {
            let ids = tokenizer.encode(t)
            if ids.isEmpty { continue }
            toks.append(Int32(separator))
            for i in ids { toks.append(Int32(i)) }
            n += 1
        }
        tokens = toks; textCount = n
    }

    /// Positions with a target: every token but the first.
    public var targetCount: Int { max(0, tokens.count - 1) }
}

/// A client's three splits, tokenized.
public struct ClientTokenData: Sendable {
    public let id: String
    public let train: TokenStream
    public let valid: TokenStream
    public let test: TokenStream

    public init(id: String, train: TokenStream, valid: TokenStream, test: TokenStream) {
        self.id = id; self.train = train; self.valid = valid; self.test = test
    }

    public func split(_ s: Split) -> TokenStream {
        switch s { case .train: return train; case .valid: return valid; case .test: return test }
    }
}

/// The separator between texts: the tokenizer's end-of-text token, or (for a tokenizer without one)
/// the last token of "\n\n".
public func textSeparator(_ tokenizer: BPETokenizer) -> Int {
    tokenizer.eosTokenId ?? tokenizer.encode("\n\n").last ?? 0
}

/// Reads a federated data folder: one sub-folder per client (its name is the client id), each with
/// `train`, `valid` and `test` as `.jsonl` or `.txt` (see `TextFile.read`). Hidden folders are ignored.
/// Every split must exist and hold at least one text that tokenizes to something.
public func loadClientData(folder: String, tokenizer: BPETokenizer, clients only: [String]? = nil) throws -> [ClientTokenData] {
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: folder, isDirectory: &isDir), isDir.boolValue else { throw ClientDataError.missingFolder(folder) }
    let names = ((try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []).filter { n in
        var d: ObjCBool = false
        return !n.hasPrefix(".") && FileManager.default.fileExists(atPath: folder + "/" + n, isDirectory: &d) && d.boolValue
    }.sorted()
    let chosen = only.map { o in names.filter { o.contains($0) } } ?? names
    if let only { for c in only where !names.contains(c) { throw ClientDataError.missingSplit(client: c, split: "train", folder: folder + "/" + c) } }
    guard !chosen.isEmpty else { throw ClientDataError.noClients(folder) }
    return try chosen.map { id in
        do { try ClientID.validate(id) } catch let e as AdapterStoreError {
            if case let .invalidClientID(_, why) = e { throw ClientDataError.invalidClientID(id, why: why) }
            throw e
        }
        return try loadClientFolder(folder + "/" + id, client: id, tokenizer: tokenizer)
    }
}

/// Reads one client's folder (`train`, `valid` and `test` as `.jsonl`, `.json` or `.txt`): the
/// layout of each sub-folder of `loadClientData`, and what a federated client node holds. Every
/// split must exist and hold at least one text that tokenizes to something.
public func loadClientFolder(_ dir: String, client id: String, tokenizer: BPETokenizer) throws -> ClientTokenData {
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDir), isDir.boolValue else { throw ClientDataError.missingClientFolder(dir) }
    return try loadClientFiles(folder: dir, client: id, tokenizer: tokenizer) { name in
        let path = dir + "/" + name
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ClientDataError.unreadable(file: path, why: "permission denied or not a file")
        }
        return data
    }
}

/// `loadClientFolder` over a reader: `file(name)` returns the bytes of `train.jsonl` (and the other
/// split files) or nil when there is no such file. `folder` names the folder in messages. A server
/// reads a request's data folder this way, through its exchange folder (no link followed, sizes
/// checked before reading).
public func loadClientFiles(folder: String, client id: String, tokenizer: BPETokenizer,
                            file: (String) throws -> Data?) throws -> ClientTokenData {
    let sep = textSeparator(tokenizer)
    func split(_ s: String) throws -> TokenStream {
        var found: (String, Data)?
        for ext in ["jsonl", "json", "txt"] {
            if let d = try file("\(s).\(ext)") { found = ("\(s).\(ext)", d); break }
        }
        guard let (name, data) = found else { throw ClientDataError.missingSplit(client: id, split: s, folder: folder) }
        let path = folder + "/" + name
        guard let text = String(data: data, encoding: .utf8) else { throw ClientDataError.unreadable(file: path, why: "not UTF-8 text") }
        let texts = name.hasSuffix(".txt") ? TextFile.paragraphs(text) : try TextFile.jsonl(text, file: path)
        guard !texts.isEmpty else { throw ClientDataError.noTexts(client: id, file: path) }
        let stream = TokenStream(texts: texts, tokenizer: tokenizer, separator: sep)
        guard stream.textCount > 0 else { throw ClientDataError.noTokens(client: id, file: path) }
        return stream
    }
    return ClientTokenData(id: id, train: try split("train"), valid: try split("valid"), test: try split("test"))
}
