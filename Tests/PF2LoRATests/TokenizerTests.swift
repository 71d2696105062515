import Foundation
import Testing
@testable import PF2LoRA

/// One fixture file written by Tests/FixtureScripts/fixtures/tokenizer.py from Hugging Face tokenizers.
private struct TokenizerFixture: Decodable {
    struct Encoding: Decodable { let text: String; let ids: [Int]; let decoded: String }
    struct Decoding: Decodable { let ids: [Int]; let text: String }
    let encode: [Encoding]
    let decode: [Decoding]

    static func load(_ name: String) throws -> TokenizerFixture {
        let data = try Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("tokenizer/\(name)")))
        return try JSONDecoder().decode(TokenizerFixture.self, from: data)
    }
}

/// Loaded once: the real GPT-2 tokenizer takes a noticeable fraction of a second to build. Only the
/// tests marked `.needsSharedTokenizers` use it, and they do not run when it is absent.
private let gpt2Loaded: BPETokenizer? = TestPaths.hasGPT2Tokenizer ? try? BPETokenizer(folder: TestPaths.gpt2Tokenizer.path) : nil
private var gpt2: BPETokenizer { gpt2Loaded! }

@Suite struct TokenizerTests {
    static let small = TestPaths.fixture("tokenizer/small")
    static let smallFiles = TestPaths.fixture("tokenizer/small-files")

    private func checkFixture(_ tok: BPETokenizer, _ fixture: TokenizerFixture) {
        for c in fixture.encode {
            let ids = tok.encode(c.text)
            #expect(ids == c.ids, "encode \(c.text.debugDescription.prefix(60))")
            #expect(tok.decode(c.ids) == c.decoded, "decode of \(c.text.debugDescription.prefix(60))")
            #expect(tok.decode(ids) == c.text, "round trip \(c.text.debugDescription.prefix(60))")
        }
        for d in fixture.decode {
            #expect(tok.decode(d.ids) == d.text, "decode \(d.ids)")
        }
    }

    @Test(.needsSharedTokenizers) func gpt2MatchesHuggingFace() throws {
        #expect(gpt2.vocabSize == 50257)
        #expect(gpt2.eosTokenId == 50256)
        #expect(gpt2.tokenText(50256) == "<|endoftext|>")
        #expect(gpt2.tokenText(31373) == "hello")
        #expect(gpt2.tokenText(50257) == nil)
        checkFixture(gpt2, try .load("gpt2.json"))
        // The cache must not change results: encode everything a second time, warm.
        for c in try TokenizerFixture.load("gpt2.json").encode { #expect(gpt2.encode(c.text) == c.ids) }
    }

    @Test(.needsSharedTokenizers) func gpt2VocabAndMergesLayout() throws {
        let dir = TestPaths.tempDir("tok")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for f in ["vocab.json", "merges.txt"] {
            try FileManager.default.createSymbolicLink(atPath: dir + "/" + f, withDestinationPath: TestPaths.gpt2Tokenizer.appendingPathComponent(f).path)
        }
        let tok = try BPETokenizer(folder: dir)
        #expect(tok.vocabSize == 50257)
        #expect(tok.eosTokenId == 50256)
        checkFixture(tok, try .load("gpt2.json"))
    }

    @Test func smallTrainedBPEBothLayouts() throws {
        let fixture = try TokenizerFixture.load("small.json")
        let a = try BPETokenizer(folder: Self.small)
        let b = try BPETokenizer(folder: Self.smallFiles)
        #expect(a.eosTokenId == 0)
        #expect(b.eosTokenId == 0)
        #expect(a.vocabSize == b.vocabSize)
        checkFixture(a, fixture)
        checkFixture(b, fixture)
    }

    @Test(.needsSharedTokenizers) func largeMixedTextTokenForToken() throws {
        let text = try String(contentsOfFile: TestPaths.fixture("tokenizer/large.txt"), encoding: .utf8)
        let want = try JSONDecoder().decode([Int].self, from: Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("tokenizer/large-gpt2.json"))))
        gpt2.clearCache()
        let cold = gpt2.encode(text)
        #expect(cold.count == want.count)
        if let k = zip(cold, want).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset {
            Issue.record("first difference at token \(k): \(Array(cold[k..<min(k + 8, cold.count)])) vs \(Array(want[k..<min(k + 8, want.count)]))")
        }
        #expect(gpt2.encode(text) == want)   // warm cache
        #expect(gpt2.decode(want) == text)
    }

    /// Several threads encoding at once share one cache safely and get the same ids.
    @Test(.needsSharedTokenizers) func concurrentEncode() throws {
        let text = try String(contentsOfFile: TestPaths.fixture("tokenizer/large.txt"), encoding: .utf8)
        let lines = text.split(separator: "\n").map(String.init)
        let want = lines.map { gpt2.encode($0) }
        gpt2.clearCache()
        let mismatches = NSLock()
        nonisolated(unsafe) var bad = 0
        DispatchQueue.concurrentPerform(iterations: 4) { t in
            for (k, line) in lines.enumerated() where k % 4 == t || k % 3 == 0 {
                if gpt2.encode(line) != want[k] { mismatches.lock(); bad += 1; mismatches.unlock() }
            }
        }
        #expect(bad == 0)
    }

    /// The scanner's classes are oniguruma's (as HF ships them), checked code point by code point.
    @Test func scalarClassesMatchOniguruma() throws {
        let lines = try String(contentsOfFile: TestPaths.fixture("tokenizer/classes.txt"), encoding: .utf8).split(separator: "\n")
        let code: [Character: UInt8] = ["P": 0, "L": 1, "N": 2, "S": 3]
        var runs: [(Int, UInt8)] = lines.map { line in
            let parts = line.split(separator: " ")
            return (Int(parts[0], radix: 16)!, code[parts[1].first!]!)
        }
        runs.append((0x110000, 0))
        var mismatches = 0
        for r in 0..<(runs.count - 1) {
            for cp in runs[r].0..<runs[r + 1].0 where scalarClassTable[cp] != runs[r].1 { mismatches += 1 }
        }
        #expect(mismatches == 0)
    }

    @Test func preTokenizerPieces() {
        #expect(PreTokenizer.split("Hello  world\n\n x") == ["Hello", " ", " world", "\n\n", " x"])
        #expect(PreTokenizer.split("   \tfoo") == ["   ", "\t", "foo"])
        #expect(PreTokenizer.split("I'm CAN'T 'sa") == ["I", "'m", " CAN", "'", "T", " '", "sa"])
        #expect(PreTokenizer.split("x  ") == ["x", "  "])
        #expect(PreTokenizer.split("a1!? b") == ["a", "1", "!?", " b"])
    }

    /// Streaming: feeding ids one at a time and emitting text only when the bytes so far form
    /// complete UTF-8 reassembles multi-byte characters split across tokens.
    @Test(.needsSharedTokenizers) func decodeBytesStreaming() {
        let text = "naïve 日本語 👨‍👩‍👧‍👦 🇫🇷 e\u{301}!"
        let ids = gpt2.encode(text)
        var pending: [UInt8] = []
        var emitted = ""
        var sawPartial = false
        for id in ids {
            pending += gpt2.decodeBytes([id])
            if let s = String(validating: pending, as: UTF8.self) {
                emitted += s
                pending.removeAll()
            } else {
                sawPartial = true
            }
        }
        #expect(pending.isEmpty)
        #expect(sawPartial)   // the emoji are split over several byte tokens
        #expect(emitted == text)
        #expect(gpt2.decodeBytes(ids) == Array(text.utf8))
    }

    /// The rescanning merge (short words) and the heap merge (long words) agree.
    @Test(.needsSharedTokenizers) func shortAndHeapMergeAgree() {
        var rng = SplitMix64(seed: 42)
        let alphabet = Array("the quick brown fox, 日本 éé aaaa ===".utf8)
        for _ in 0..<200 {
            let n = Int.random(in: 2...200, using: &rng)
            let word = (0..<n).map { _ in alphabet.randomElement(using: &rng)! }
            let ids = gpt2.encode(String(decoding: word, as: UTF8.self))
            #expect(gpt2.decode(ids) == String(decoding: word, as: UTF8.self))
        }
        // the same words through both merge paths
        for _ in 0..<300 {
            let n = Int.random(in: 2...40, using: &rng)
            let word = (0..<n).map { _ in alphabet.randomElement(using: &rng)! }
            #expect(gpt2.mergeIds(word, heap: false) == gpt2.mergeIds(word, heap: true), "\(word)")
        }
    }

    @Test func errorsNameTheFile() throws {
        let missing = "/nonexistent/tokenizer-folder"
        #expect(throws: TokenizerError.folderNotFound(missing)) { try BPETokenizer(folder: missing) }

        let dir = TestPaths.tempDir("tokerr")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(throws: TokenizerError.noTokenizerFiles(folder: dir)) { try BPETokenizer(folder: dir) }

        try "{\"model\": {\"vocab\": {\"a\": 0}, \"merges\": [".write(toFile: dir + "/tokenizer.json", atomically: true, encoding: .utf8)
        do {
            _ = try BPETokenizer(folder: dir)
            Issue.record("broken JSON loaded")
        } catch let e as TokenizerError {
            guard case .badJSON(let file, _) = e else { Issue.record("wrong error \(e)"); return }
            #expect(file.hasSuffix("tokenizer.json"))
            #expect(e.description.contains("tokenizer.json"))
        }

        let byteLevel = #""pre_tokenizer": {"type": "ByteLevel"}, "decoder": {"type": "ByteLevel"}"#
        try "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a b\"]}, \(byteLevel)}".write(toFile: dir + "/tokenizer.json", atomically: true, encoding: .utf8)
        #expect(throws: TokenizerError.mergeUnknownToken(file: dir + "/tokenizer.json", line: 1, token: "ab")) { try BPETokenizer(folder: dir) }

        try "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b c\"]}}".write(toFile: dir + "/tokenizer.json", atomically: true, encoding: .utf8)
        #expect(throws: TokenizerError.badMerge(file: dir + "/tokenizer.json", line: 1, text: "a b c")) { try BPETokenizer(folder: dir) }

        try "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}".write(toFile: dir + "/tokenizer.json", atomically: true, encoding: .utf8)
        #expect(throws: TokenizerError.unsupported(file: dir + "/tokenizer.json", part: "model", type: "Unigram", supported: "BPE (byte-level)")) { try BPETokenizer(folder: dir) }
    }

    @Test func jsonReader() throws {
        let doc = #"{"a": [1, -2, 3.5, 1e2, true, false, null], "s": "q\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00 é", "o": {}}"#
        let v = try JSONValue.parse(Array(doc.utf8))
        #expect(v["s"]?.string == "q\"\\/\u{8}\u{C}\n\r\té😀 é")
        #expect(v["a"]?.array?.map { $0.int } == [1, -2, nil, 100, nil, nil, nil])
        #expect(v["o"] != nil)
        for bad in ["{\"a\": [1, 2", "{\"a\" 1}", "[1,]", "\"\\x\"", "[1] 2", "tru", ""] {
            #expect(throws: JSONParseError.self, "\(bad)") { try JSONValue.parse(Array(bad.utf8)) }
        }
    }

    @Test(.needsSharedTokenizers) func truncatedTokenizerJSON() throws {
        let dir = TestPaths.tempDir("toktrunc")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let whole = try Data(contentsOf: TestPaths.gpt2Tokenizer.appendingPathComponent("tokenizer.json"))
        try whole.prefix(whole.count / 2).write(to: URL(fileURLWithPath: dir + "/tokenizer.json"))
        do {
            _ = try BPETokenizer(folder: dir)
            Issue.record("truncated tokenizer.json loaded")
        } catch let e as TokenizerError {
            #expect(e.description.contains(dir + "/tokenizer.json"))
            #expect(e.description.contains("truncated"))
        }
    }

    @Test(.needsSharedTokenizers) func emptyAndUnknown() {
        #expect(gpt2.encode("") == [])
        #expect(gpt2.decode([]) == "")
        #expect(gpt2.decode([-1, 1 << 30]) == "")
    }
}
