import Foundation

/// An added (special) token as tokenizer.json lists it.
struct AddedToken {
    let id: Int
    let content: String
    let special: Bool
    /// Also swallow whitespace on the left / right of the token (Hugging Face `lstrip` / `rstrip`).
    let lstrip: Bool
    let rstrip: Bool
}

/// The raw contents of a tokenizer folder, before any table is built.
struct TokenizerFiles {
    var vocab: [String: Int] = [:]
    /// Merges in rank order, each with the file and 1-based position it came from (for errors).
    var merges: [(String, String)] = []
    var mergesFile = ""
    var addedTokens: [AddedToken] = []
    var addPrefixSpace = false

    /// Reads `tokenizer.json`, or else `vocab.json` + `merges.txt`, from `folder`.
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
        if fm.fileExists(atPath: tokenizerJSON) { return try loadTokenizerJSON(tokenizerJSON) }
        if fm.fileExists(atPath: vocabJSON) && fm.fileExists(atPath: mergesTxt) {
            return try loadVocabMerges(vocab: vocabJSON, merges: mergesTxt,
                                       added: dir.appendingPathComponent("added_tokens.json").path)
        }
        throw TokenizerError.noTokenizerFiles(folder: folder)
    }

    private static func readJSON(_ path: String) throws -> JSONValue {
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
            guard let id = v.int, id >= 0 else { throw TokenizerError.badVocab(file: file, why: "token '\(token)' has id \(v)") }
            vocab[token] = id
        }
        return vocab
    }

    static func loadTokenizerJSON(_ path: String) throws -> TokenizerFiles {
        let root = try readJSON(path)
        guard case .object = root else { throw TokenizerError.badJSON(file: path, why: "the top level is not an object") }
        guard let model = root["model"], case .object = model else { throw TokenizerError.badJSON(file: path, why: "no \"model\" object") }
        if let type = model["type"]?.string, type != "BPE" { throw TokenizerError.unsupportedModel(file: path, type: type) }
        var files = TokenizerFiles()
        files.vocab = try parseVocab(model["vocab"], file: path)
        files.mergesFile = path
        guard let merges = model["merges"]?.array else { throw TokenizerError.badJSON(file: path, why: "model.merges is missing or not an array") }
        files.merges.reserveCapacity(merges.count)
        for (i, m) in merges.enumerated() {
            if let s = m.string {
                files.merges.append(try splitMerge(s, file: path, line: i + 1))
            } else if let pair = m.array, pair.count == 2, let a = pair[0].string, let b = pair[1].string {
                files.merges.append((a, b))
            } else {
                throw TokenizerError.badMerge(file: path, line: i + 1, text: "\(m)")
            }
        }
        for t in root["added_tokens"]?.array ?? [] {
            guard let id = t["id"]?.int, id >= 0, let content = t["content"]?.string else {
                throw TokenizerError.badJSON(file: path, why: "an added_tokens entry lacks an integer id or a content string")
            }
            files.addedTokens.append(AddedToken(id: id, content: content, special: t["special"]?.bool ?? false,
                                                lstrip: t["lstrip"]?.bool ?? false, rstrip: t["rstrip"]?.bool ?? false))
        }
        if let pre = root["pre_tokenizer"], pre["type"]?.string == "ByteLevel" {
            files.addPrefixSpace = pre["add_prefix_space"]?.bool ?? false
        }
        return files
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
