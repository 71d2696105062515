import Foundation
import Testing
@testable import PF2LoRA

/// Fixtures of the Llama-3 / Qwen2 / pipeline tokenizers, written by Tests/FixtureScripts/fixtures/tokenizer.py
/// from Hugging Face tokenizers 0.23.3.
private struct FamilyFixture: Decodable {
    struct Encoding: Decodable {
        let text: String
        let ids: [Int]
        let ids_plain: [Int]
        let decoded: String
        let decoded_skip: String
    }
    struct Decoding: Decodable { let ids: [Int]; let text: String; let text_skip: String }
    let encode: [Encoding]
    let decode: [Decoding]

    static func load(_ name: String) throws -> FamilyFixture {
        let data = try Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("tokenizer/\(name)")))
        return try JSONDecoder().decode(FamilyFixture.self, from: data)
    }
}

/// The real vocabularies in ../shared/tokenizers (or $PF2LORA_SHARED_DIR/tokenizers).
enum SharedTokenizers {
    static let llama3Dir = TestPaths.shared.appendingPathComponent("tokenizers/llama3").path
    static let qwen2Dir = TestPaths.shared.appendingPathComponent("tokenizers/qwen2").path
    static var available: Bool {
        FileManager.default.fileExists(atPath: llama3Dir + "/tokenizer.json") && FileManager.default.fileExists(atPath: qwen2Dir + "/tokenizer.json")
    }
    static let skipMessage: Comment = "../shared/tokenizers (llama3, qwen2) not found; set PF2LORA_SHARED_DIR to the shared folder"
    static let llama3: BPETokenizer? = available ? try! BPETokenizer(folder: llama3Dir) : nil
    static let qwen2: BPETokenizer? = available ? try! BPETokenizer(folder: qwen2Dir) : nil
}

@Suite struct TokenizerFamilyTests {
    private func check(_ tok: BPETokenizer, _ fixture: FamilyFixture) {
        for c in fixture.encode {
            let label = c.text.debugDescription.prefix(70)
            #expect(tok.encode(c.text) == c.ids, "encode \(label)")
            #expect(tok.encode(c.text, addSpecialTokens: false) == c.ids_plain, "encode without special tokens \(label)")
            #expect(tok.decode(c.ids) == c.decoded, "decode \(label)")
            #expect(tok.decode(c.ids, skipSpecialTokens: true) == c.decoded_skip, "decode skipping special tokens \(label)")
        }
        for d in fixture.decode {
            #expect(tok.decode(d.ids) == d.text, "decode \(d.ids)")
            #expect(tok.decode(d.ids, skipSpecialTokens: true) == d.text_skip, "decode skipping \(d.ids)")
        }
    }

    private func checkLarge(_ tok: BPETokenizer, _ name: String) throws {
        let text = try String(contentsOfFile: TestPaths.fixture("tokenizer/large.txt"), encoding: .utf8)
        let want = try JSONDecoder().decode([Int].self, from: Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("tokenizer/large-\(name).json"))))
        tok.clearCache()
        let got = tok.encode(text)
        #expect(got.count == want.count)
        if let k = zip(got, want).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset {
            Issue.record("\(name): first difference at token \(k): \(Array(got[k..<min(k + 8, got.count)])) vs \(Array(want[k..<min(k + 8, want.count)]))")
        }
        #expect(tok.encode(text) == want)   // warm cache
    }

    @Test(.enabled(if: SharedTokenizers.available, SharedTokenizers.skipMessage))
    func llama3MatchesHuggingFace() throws {
        let tok = SharedTokenizers.llama3!
        #expect(tok.vocabSize == 128_256)
        #expect(tok.bosTokenId == 128_000)
        #expect(tok.eosTokenId == 128_001)
        #expect(tok.specialPrefixIds == [128_000])
        #expect(tok.specialSuffixIds == [])
        #expect(tok.tokenId("<|eot_id|>") == 128_009)
        #expect(tok.isSpecialToken(128_009) && !tok.isSpecialToken(9906))
        check(tok, try .load("llama3.json"))
        try checkLarge(tok, "llama3")
    }

    @Test(.enabled(if: SharedTokenizers.available, SharedTokenizers.skipMessage))
    func qwen2MatchesHuggingFace() throws {
        let tok = SharedTokenizers.qwen2!
        #expect(tok.vocabSize == 151_646)
        #expect(tok.bosTokenId == nil)
        #expect(tok.eosTokenId == 151_643)
        #expect(tok.specialPrefixIds == [])
        #expect(tok.tokenId("<|im_start|>") == 151_644)
        check(tok, try .load("qwen2.json"))
        try checkLarge(tok, "qwen2")
    }

    /// The small BPE with NFC, Digits, a string Split, add_prefix_space, added tokens with every flag
    /// and a BOS + EOS template (committed, no shared folder needed).
    @Test func pipelineMatchesHuggingFace() throws {
        let tok = try BPETokenizer(folder: TestPaths.fixture("tokenizer/pipeline"))
        #expect(tok.specialPrefixIds == [657])
        #expect(tok.specialSuffixIds == [658])
        check(tok, try .load("pipeline.json"))
    }

    /// Every Split configuration of the fixture (Llama-3, Qwen2, GPT-2 patterns; other behaviors;
    /// inverted; lazy, counted, lookahead, case-insensitive constructs) piece for piece.
    @Test func splitRegexMatchesOniguruma() throws {
        struct Config: Decodable { let name: String; let pattern: String; let behavior: String; let invert: Bool; let offsets: [[Int]] }
        struct Splits: Decodable { let texts: [String]; let configs: [Config] }
        let data = try Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("tokenizer/splits.json")))
        let splits = try JSONDecoder().decode(Splits.self, from: data)
        let behaviors: [String: SplitBehavior] = ["isolated": .isolated, "removed": .removed, "contiguous": .contiguous,
                                                   "merged_with_previous": .mergedWithPrevious, "merged_with_next": .mergedWithNext]
        for config in splits.configs {
            let regex = try SplitRegex(config.pattern)
            let behavior = try #require(behaviors[config.behavior])
            var failures = 0
            for (text, flat) in zip(splits.texts, config.offsets) {
                // HF's offsets count Unicode scalars; compare the pieces as strings.
                let scalars = Array(text.unicodeScalars)
                var want: [String] = []
                for k in stride(from: 0, to: flat.count, by: 2) {
                    want.append(String(String.UnicodeScalarView(scalars[flat[k]..<flat[k + 1]])))
                }
                var bytes = Array(text.utf8)
                var got: [String] = []
                bytes.withUnsafeMutableBufferPointer { b in
                    guard let p = b.baseAddress else { return }
                    BPETokenizer.forEachSplitPiece(regex, behavior, invert: config.invert, UnsafePointer(p), b.count) { s, e in
                        got.append(String(decoding: UnsafeBufferPointer(start: p + s, count: e - s), as: UTF8.self))
                    }
                }
                if got != want {
                    failures += 1
                    if failures <= 5 { Issue.record("\(config.name) on \(text.debugDescription): \(got) vs HF \(want)") }
                }
            }
            #expect(failures == 0, "\(config.name): \(failures) of \(splits.texts.count) texts differ")
        }
    }

    /// The hand-written Llama-3 / Qwen2 scanner gives HF's pieces on the Split fixture's 1,600 texts,
    /// and the same pieces as the general matcher on random strings over the classes it tells apart.
    @Test func llamaScannerMatchesOniguruma() throws {
        struct Config: Decodable { let name: String; let pattern: String; let offsets: [[Int]] }
        struct Splits: Decodable { let texts: [String]; let configs: [Config] }
        let data = try Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("tokenizer/splits.json")))
        let splits = try JSONDecoder().decode(Splits.self, from: data)
        var checked = 0
        for config in splits.configs {
            guard let maxDigits = LlamaPreTokenizer.maxDigits(ofPattern: config.pattern) else { continue }
            checked += 1
            var failures = 0
            for (text, flat) in zip(splits.texts, config.offsets) {
                let scalars = Array(text.unicodeScalars)
                let want = stride(from: 0, to: flat.count, by: 2).map { String(String.UnicodeScalarView(scalars[flat[$0]..<flat[$0 + 1]])) }
                let got = LlamaPreTokenizer.split(text, maxDigits: maxDigits)
                if got != want {
                    failures += 1
                    if failures <= 5 { Issue.record("\(config.name) on \(text.debugDescription): \(got) vs HF \(want)") }
                }
            }
            #expect(failures == 0, "\(config.name)")
        }
        #expect(checked == 2)
        // random strings: scanner == general matcher, for 1, 2, 3 and 4 digits
        var rng = SplitMix64(seed: 99)
        let pool: [String] = ["a", "Z", "s", "S", "t", "'", "’", " ", "  ", "\t", "\r", "\n", "\r\n", "0", "7", "٣", "½", "!", ".", "-", "_",
                              "é", "e\u{301}", "日", "ſ", "K", "\u{a0}", "\u{3000}", "\u{85}", "😀", "\u{200b}", "re", "LL", "vE", "D", "m"]
        for maxDigits in 1...4 {
            let pattern = LlamaPreTokenizer.llama3Pattern.replacingOccurrences(of: "\\p{N}{1,3}", with: maxDigits == 1 ? "\\p{N}" : "\\p{N}{1,\(maxDigits)}")
            let regex = try SplitRegex(pattern)
            for _ in 0..<2_000 {
                let text = (0..<Int.random(in: 0...20, using: &rng)).map { _ in pool.randomElement(using: &rng)! }.joined()
                var bytes = Array(text.utf8)
                var general: [String] = []
                bytes.withUnsafeMutableBufferPointer { b in
                    guard let p = b.baseAddress else { return }
                    BPETokenizer.forEachSplitPiece(regex, .isolated, invert: false, UnsafePointer(p), b.count) { s, e in
                        general.append(String(decoding: UnsafeBufferPointer(start: p + s, count: e - s), as: UTF8.self))
                    }
                }
                #expect(LlamaPreTokenizer.split(text, maxDigits: maxDigits) == general, "\(maxDigits) digits: \(text.debugDescription)")
            }
        }
    }

    /// The GPT-2 pattern through the general matcher equals the hand-written scanner.
    @Test func generalMatcherAgreesWithGPT2Scanner() throws {
        let regex = try SplitRegex(PreTokenizer.gpt2Pattern)
        let text = try String(contentsOfFile: TestPaths.fixture("tokenizer/large.txt"), encoding: .utf8)
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).prefix(400) {
            var bytes = Array((line + "\n").utf8)
            var got: [String] = []
            bytes.withUnsafeMutableBufferPointer { b in
                BPETokenizer.forEachSplitPiece(regex, .isolated, invert: false, UnsafePointer(b.baseAddress!), b.count) { s, e in
                    got.append(String(decoding: UnsafeBufferPointer(rebasing: b[s..<e]), as: UTF8.self))
                }
            }
            #expect(got == PreTokenizer.split(String(line) + "\n"))
        }
    }

    @Test func nfcMatchesHuggingFace() throws {
        struct Case: Decodable { let text: String; let nfc: String }
        let cases = try JSONDecoder().decode([Case].self, from: Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("tokenizer/nfc.json"))))
        #expect(cases.count > 3000)
        var failures = 0
        for c in cases where NFC.normalize(c.text) != c.nfc {
            failures += 1
            if failures <= 5 {
                Issue.record("NFC of \(c.text.unicodeScalars.map { String($0.value, radix: 16) }): \(NFC.normalize(c.text).unicodeScalars.map { String($0.value, radix: 16) }) vs HF \(c.nfc.unicodeScalars.map { String($0.value, radix: 16) })")
            }
        }
        #expect(failures == 0)
        // Already-NFC text comes back unchanged without a copy.
        var s = "plain ASCII, café, 日本語, 한국어"
        #expect(s.withUTF8 { NFC.normalize($0.baseAddress!, $0.count) } == nil)
    }

    @Test func regexConstructsRefusedByName() {
        let cases: [(String, String)] = [
            (#"\p{Lu}+"#, #"\p{Lu}"#), (#"a++"#, "possessive"), (#"(?<=a)b"#, "lookbehind"), (#"^a"#, "anchor"),
            (#"\d+"#, #"\d"#), (#"\w"#, #"\w"#), (#"(a*)*"#, "empty string"), (#"(?x)a"#, "(?x"), (#"[a&&b]"#, "&&"),
            (#"(a"#, "unclosed group"), (#"\1"#, #"\1"#), (#"a{3,1}"#, "{3,1}"),
        ]
        for (pattern, construct) in cases {
            do {
                _ = try SplitRegex(pattern)
                Issue.record("\(pattern) compiled")
            } catch {
                #expect(error.description.contains(construct), "\(pattern): \(error.description)")
            }
        }
    }

    /// `pf2lora tokenize` adds Llama-3's BOS by default, not with --no-special-tokens; --decode keeps
    /// special tokens unless --skip-special-tokens.
    @Test(.enabled(if: SharedTokenizers.available, SharedTokenizers.skipMessage))
    func tokenizeCommandSpecialTokens() throws {
        let dir = SharedTokenizers.llama3Dir
        let text = Data("<|start_header_id|>user<|end_header_id|>\n\nHi".utf8)
        let withBOS = try CLITests.run(["tokenize", "--model", dir], stdin: text)
        #expect(withBOS.out == "[128000, 128006, 882, 128007, 271, 13347]\n", "\(withBOS.err)")
        let plain = try CLITests.run(["tokenize", "--model", dir, "--no-special-tokens"], stdin: text)
        #expect(plain.out == "[128006, 882, 128007, 271, 13347]\n")
        let ids = Data("[128000, 128006, 882, 128007, 271, 13347]".utf8)
        #expect(try CLITests.run(["tokenize", "--model", dir, "--decode"], stdin: ids).out == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi")
        #expect(try CLITests.run(["tokenize", "--model", dir, "--decode", "--skip-special-tokens"], stdin: ids).out == "user\n\nHi")
    }

    /// tokenizer.json parts this tokenizer does not implement: one error naming the part and its type.
    @Test func unsupportedPartsNamed() throws {
        let data = try Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("tokenizer/small/tokenizer.json")))
        let base = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let dir = TestPaths.tempDir("tokpart")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func load(_ key: String, _ value: Any, model: Bool = false) throws -> String {
            var doc = base
            if model {
                var m = doc["model"] as! [String: Any]
                m[key] = value
                doc["model"] = m
            } else {
                doc[key] = value
            }
            try JSONSerialization.data(withJSONObject: doc).write(to: URL(fileURLWithPath: dir + "/tokenizer.json"))
            do { _ = try BPETokenizer(folder: dir); return "loaded" } catch { return "\(error)" }
        }
        let split: [String: Any] = ["type": "Split", "pattern": ["Regex": #"\p{Lu}"#], "behavior": "Isolated", "invert": false]
        let byteLevel: [String: Any] = ["type": "ByteLevel", "add_prefix_space": false, "use_regex": false]
        let cases: [(String, Any, Bool, String)] = [
            ("normalizer", ["type": "NFKC"], false, "normalizer NFKC"),
            ("normalizer", ["type": "Sequence", "normalizers": [["type": "NFC"], ["type": "Lowercase"]]], false, "normalizer Lowercase"),
            ("pre_tokenizer", ["type": "Metaspace", "replacement": "▁"], false, "pre_tokenizer Metaspace"),
            ("pre_tokenizer", ["type": "Sequence", "pretokenizers": [split, byteLevel]], false, #"\p{Lu}"#),
            ("pre_tokenizer", ["type": "Sequence", "pretokenizers": [["type": "Whitespace"], byteLevel]], false, "pre_tokenizer Whitespace"),
            ("pre_tokenizer", ["type": "Sequence", "pretokenizers": [["type": "Digits", "individual_digits": true]]], false, "without ByteLevel"),
            ("pre_tokenizer", ["type": "Sequence", "pretokenizers": [byteLevel, ["type": "Digits", "individual_digits": true]]], false, "Digits after ByteLevel"),
            ("pre_tokenizer", NSNull(), false, "pre_tokenizer null"),
            ("decoder", ["type": "Metaspace"], false, "decoder Metaspace"),
            ("decoder", NSNull(), false, "decoder null"),
            ("post_processor", ["type": "Unknown"], false, "post_processor (a name of 7 bytes)"),
            ("byte_fallback", true, true, "byte_fallback"),
            ("type", "WordPiece", true, "model WordPiece"),
            ("continuing_subword_prefix", "##", true, "continuing_subword_prefix"),
        ]
        for (key, value, model, want) in cases {
            let message = try load(key, value, model: model)
            #expect(message.contains(want), "\(key) = \(value): \(message)")
            #expect(message.contains(dir + "/tokenizer.json"), "\(message)")
        }
        #expect(try load("normalizer", ["type": "NFC"]) == "loaded")
    }
}
