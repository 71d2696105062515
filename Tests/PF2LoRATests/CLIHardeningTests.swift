import Foundation
import Testing
@testable import PF2LoRA

/// Issue 11, items 21 and 22: the command line reports every failure the same way, validates its
/// options before doing anything, and works in a clone that has nothing beside it.
@Suite struct CLIHardeningTests {
    typealias Run = CLITests.Run

    static func run(_ args: [String], cwd: String? = nil, environment: [String: String]? = nil, stdin: Data? = nil) throws -> Run {
        try CLITests.run(args, cwd: cwd, environment: environment, stdin: stdin)
    }

    /// One line on stderr, `error: ` first, naming `needle`; status 64 for a command-line mistake, 1 otherwise.
    static func expectError(_ r: Run, _ needle: String, usage: Bool, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.code == (usage ? 64 : 1) && !r.signaled, "exit \(r.code): \(r.err)", sourceLocation: sourceLocation)
        let lines = r.err.split(separator: "\n", omittingEmptySubsequences: false).filter { !$0.isEmpty }
        #expect(lines.count == 1, "one error line: \(r.err)", sourceLocation: sourceLocation)
        #expect(r.err.hasPrefix("error: "), "one style, `error: `: \(r.err)", sourceLocation: sourceLocation)
        #expect(!r.err.contains("Error:") && !r.err.contains("Usage:"), "\(r.err)", sourceLocation: sourceLocation)
        #expect(r.err.contains(needle), "\(r.err)", sourceLocation: sourceLocation)
    }

    static let tiny = TestPaths.fixture("tiny-gpt2")

    @Test func everyFailureIsOneLineInOneStyle() throws {
        // Parse errors and validate() refusals: status 64, with where to read more.
        Self.expectError(try Self.run(["generate", "--model", Self.tiny, "--prompt", "x", "--bogus"]), "--bogus", usage: true)
        Self.expectError(try Self.run(["generate", "--model", Self.tiny]), "--prompt", usage: true)
        Self.expectError(try Self.run(["generate", "--model", Self.tiny, "--prompt", "x", "--top-p", "2"]), "--top-p", usage: true)
        Self.expectError(try Self.run(["generate", "--model", Self.tiny, "--prompt", "x", "--max-tokens", "-1"]), "--max-tokens", usage: true)
        Self.expectError(try Self.run(["generate", "--model", Self.tiny, "--prompt", "x", "--client", "a"]), "--store", usage: true)
        Self.expectError(try Self.run(["personalize", "--model", Self.tiny, "--client", "a", "--texts", "t.txt"]), "--store", usage: true)
        Self.expectError(try Self.run(["bench", "adapters", "--repeats", "0"]), "--repeats", usage: true)
        Self.expectError(try Self.run(["adapters", "inspect", "--store", "/nonexistent"]), "--shared or --client", usage: true)
        Self.expectError(try Self.run(["federate", "--model", Self.tiny, "--data", "d", "--store", "s", "--method", "nope"]), "--method", usage: true)
        Self.expectError(try Self.run(["model", "random", "--config", "huge", "--out", "/nonexistent/x"]), "--config", usage: true)
        // Failures while running: status 1, the message as the library wrote it.
        Self.expectError(try Self.run(["generate", "--model", "/nonexistent/m", "--prompt", "x"]), "does not exist", usage: false)
        Self.expectError(try Self.run(["tokenize", "--model", Self.tiny], stdin: Data([0x61, 0xff])), "UTF-8", usage: false)
        Self.expectError(try Self.run(["tokenize", "--model", Self.tiny, "--decode"], stdin: Data("[1, 99999999]".utf8)), "outside the vocabulary", usage: false)
        Self.expectError(try Self.run(["tokenize", "--model", "/nonexistent/t"]), "no such folder", usage: false)
    }

    @Test func versionComesFromOnePlace() throws {
        let v = try Self.run(["--version"])
        #expect(v.code == 0 && v.out == PF2LoRAVersion.string + "\n" && v.err.isEmpty, "\(v)")
        #expect(PF2LoRAVersion.string.split(separator: ".").count == 3)
        let help = try Self.run(["--help"])
        #expect(help.code == 0 && help.out.contains("--version"))
    }

    /// `--cache-mb` of -1 or 9e12 used to turn the cache off without a word (the byte budget wrapped).
    @Test func cacheBudgetIsValidated() throws {
        for bad in ["-1", "9000000000000"] {
            Self.expectError(try Self.run(["serve", "--model", Self.tiny, "--cache-mb", bad]), "--cache-mb", usage: true)
        }
        // The other byte and second budgets: each refusal names its flag (`--max-train-mb` and
        // `--http-max-body-mb` past 2^44 used to wrap when shifted to bytes).
        for (flag, bad) in [("--max-train-mb", "-1"), ("--max-train-mb", "9000000000000"), ("--exchange-max-mb", "0"), ("--drain-timeout", "-1"),
                            ("--http-max-body-mb", "9000000000000"), ("--http-body-timeout", "0"), ("--http-idle-timeout", "nan"), ("--http-header-timeout", "-2")] {
            Self.expectError(try Self.run(["serve", "--model", Self.tiny, flag, bad]), flag, usage: true)
        }
        // Within range it starts (and exits at EOF on stdin).
        let ok = try Self.run(["serve", "--model", Self.tiny, "--cache-mb", "0"], stdin: Data())
        #expect(ok.code == 0, "\(ok.err)")
    }

    /// The sampling values the protocol refused with the wrong reason are accepted at the extremes of their types.
    @Test func extremeSamplingValuesAreAccepted() throws {
        let r = try Self.run(["generate", "--model", Self.tiny, "--prompt", "The", "--max-tokens", "4", "--seed", "18446744073709551615",
                              "--top-k", "1000000000000000000", "--temperature", "3.5e38"])
        #expect(r.code == 0, "\(r.err)")
        Self.expectError(try Self.run(["generate", "--model", Self.tiny, "--prompt", "x", "--temperature", "-1"]), "--temperature", usage: true)
    }

    @Test func protocolNumbersAreReadExactly() throws {
        func params(_ json: String) throws -> Params { Params(try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any]) }
        func message(_ body: () throws -> Any?) -> String {
            do { _ = try body(); return "" } catch { return (error as? RPCError)?.message ?? "\(error)" }
        }
        #expect(try params(#"{"seed": 18446744073709551615}"#).uint64("seed") == UInt64.max)
        #expect(try params(#"{"seed": 0}"#).uint64("seed") == 0)
        #expect(try params(#"{"seed": 1e3}"#).uint64("seed") == 1000)
        #expect(message { try params(#"{"seed": -1}"#).uint64("seed") }.contains("0...18446744073709551615"))
        #expect(message { try params(#"{"seed": 18446744073709551616}"#).uint64("seed") }.contains("0...18446744073709551615"))
        #expect(message { try params(#"{"seed": 1.5}"#).uint64("seed") }.contains("must be an integer"))
        #expect(try params(#"{"top_k": 1e18}"#).int("top_k", min: 0) == 1_000_000_000_000_000_000)
        #expect(try params(#"{"top_k": 1000000000000000000}"#).int("top_k", min: 0) == 1_000_000_000_000_000_000)
        #expect(message { try params(#"{"top_k": 1e19}"#).int("top_k", min: 0) }.contains("0...9223372036854775807"))
        #expect(message { try params(#"{"top_k": -3}"#).int("top_k", min: 0) }.contains(">= 0 (got -3)"))
        #expect(message { try params(#"{"top_k": 2.5}"#).int("top_k", min: 0) }.contains("must be an integer (got 2.5)"))
        #expect(message { try params(#"{"steps": 200000}"#).int("steps", min: 1, max: 100_000) }.contains("<= 100000"))
        #expect(try params(#"{"temperature": 3.5e38}"#).float("temperature") == Float.greatestFiniteMagnitude)
        #expect(try params(#"{"temperature": -3.5e38}"#).float("temperature") == -Float.greatestFiniteMagnitude)
        #expect(try params(#"{"temperature": 0.7}"#).float("temperature") == 0.7)
        #expect(message { try params(#"{"temperature": true}"#).float("temperature") }.contains("must be a number"))
    }

    @Test func benchAdaptersIsOneCommand() throws {
        let adapters = try Self.run(["adapters", "--help"])
        #expect(adapters.code == 0 && !adapters.out.contains("bench"), "adapters lists no bench: \(adapters.out)")
        Self.expectError(try Self.run(["adapters", "bench"]), "bench", usage: true)
        let bench = try Self.run(["bench", "adapters", "--help"])
        #expect(bench.code == 0 && bench.out.contains("cold load"))
    }

    /// The test helper that publishes in a loop is its own test-only executable, not in `pf2lora`.
    @Test func noTestCommandInTheProduct() throws {
        Self.expectError(try Self.run(["_test-publish-loop"]), "Unexpected argument '_test-publish-loop'", usage: true)
        let hidden = try Self.run(["--help-hidden"])
        #expect(hidden.code == 0 && !hidden.out.contains("publish-loop") && !hidden.out.contains("_test"))
        #expect(FileManager.default.isExecutableFile(atPath: ServerProcess.publishLoopBinary))
    }

    /// Every command and every option of the tree says what it is for (ArgumentParser's dump of the tree).
    @Test func helpDescribesEveryCommandAndOption() throws {
        let dump = try Self.run(["--experimental-dump-help"])
        let root = try #require((try JSONSerialization.jsonObject(with: Data(dump.out.utf8)) as? [String: Any])?["command"] as? [String: Any])
        var commands = 0, options = 0
        func walk(_ c: [String: Any], _ path: String) {
            guard c["commandName"] as? String != "help" else { return }   // ArgumentParser's own
            commands += 1
            #expect(!((c["abstract"] as? String) ?? "").isEmpty, "\(path) has an abstract")
            for a in c["arguments"] as? [[String: Any]] ?? [] {
                options += 1
                let names = (a["names"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
                #expect(!((a["abstract"] as? String) ?? "").isEmpty, "\(path) \(names) has help")
            }
            for s in c["subcommands"] as? [[String: Any]] ?? [] { walk(s, path + " " + ((s["commandName"] as? String) ?? "?")) }
        }
        walk(root, "pf2lora")
        #expect(commands >= 20 && options >= 150, "\(commands) commands, \(options) options")
    }

    @Test func storeHelpIsTrueForEveryCommand() throws {
        for cmd in ["personalize", "federate"] {
            let h = try Self.run([cmd, "--help"])
            #expect(h.code == 0 && !h.out.contains("Without it, the base model alone is served"), "\(cmd)")
            #expect(h.out.contains("need it"), "\(cmd) --help says it needs --store")
        }
    }

    /// Item 21: `model random` in a clone with nothing beside it (no ../shared, no
    /// $PF2LORA_GPT2_TOKENIZER) makes a folder that generate, serve and tokenize can use.
    @Test func randomModelHasATokenizerWithNothingBesideTheClone() throws {
        let dir = TestPaths.tempDir("random")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var env = ProcessInfo.processInfo.environment
        env["PF2LORA_GPT2_TOKENIZER"] = nil
        let made = try Self.run(["model", "random", "--config", "tiny", "--out", dir + "/m", "--seed", "3"], cwd: dir, environment: env)
        #expect(made.code == 0, "\(made.err)")
        let tok = try BPETokenizer(folder: dir + "/m")
        let model = try LanguageModel.load(folder: dir + "/m")
        #expect(tok.vocabSize == 50257 && model.architecture.vocabSize == 50257)
        #expect(tok.eosTokenId == 50256 && tok.tokenText(50256) == "<|endoftext|>")
        for text in ["Hello, world! The meaning of life is", "naïve café 東京 👍🏽 e\u{301}", "  spaces\n\n\ttabs  ", ""] {
            let ids = tok.encode(text)
            #expect(tok.decode(ids) == text, "\(text.debugDescription)")
            #expect(ids.allSatisfy { (0..<50256).contains($0) })
        }
        // Merges make words shorter than their bytes; every id, merged or not, is one or two bytes.
        #expect(tok.encode("the cat sat on the mat").count < "the cat sat on the mat".utf8.count)
        for id in stride(from: 0, to: 50256, by: 97) { #expect((1...2).contains(tok.decodeBytes([id]).count), "id \(id)") }
        let gen = try Self.run(["generate", "--model", dir + "/m", "--prompt", "Hello", "--max-tokens", "8", "--seed", "1"], cwd: dir, environment: env)
        #expect(gen.code == 0, "\(gen.err)")
        let ids = try Self.run(["tokenize", "--model", dir + "/m"], cwd: dir, environment: env, stdin: Data("the end".utf8))
        #expect(ids.code == 0 && ids.out.hasPrefix("["))
        // A vocabulary the generated tokenizer cannot fill is refused, saying what to do.
        Self.expectError(try Self.run(["model", "random", "--out", dir + "/small", "--vocab-size", "100"], cwd: dir, environment: env), "--tokenizer", usage: false)
        // --tokenizer copies a tokenizer the repository ships; a vocabulary smaller than it is refused.
        let copied = try Self.run(["model", "random", "--out", dir + "/c", "--tokenizer", Self.tiny], cwd: dir, environment: env)
        #expect(copied.code == 0, "\(copied.err)")
        let copiedVocab = try BPETokenizer(folder: dir + "/c").vocabSize, tinyVocab = try BPETokenizer(folder: Self.tiny).vocabSize
        #expect(copiedVocab == tinyVocab)
        Self.expectError(try Self.run(["model", "random", "--out", dir + "/d", "--tokenizer", Self.tiny, "--vocab-size", "3"], cwd: dir, environment: env),
                         "smaller than the tokenizer", usage: false)
    }

    /// The generated tokenizer against Hugging Face `tokenizers` loading the same tokenizer written
    /// independently in Python from its description (Tests/FixtureScripts/fixtures/generated_tokenizer.py).
    @Test func generatedTokenizerMatchesHuggingFace() throws {
        struct Fixture: Decodable {
            struct Case: Decodable { let text: String; let ids: [Int] }
            let vocab_size: Int, merges_head: [[String]], encode: [Case]
        }
        let fx = try JSONDecoder().decode(Fixture.self, from: Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("generated-tokenizer/cases.json"))))
        let dir = TestPaths.tempDir("gentok")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try GeneratedTokenizer.write(vocabSize: fx.vocab_size, to: dir)
        let spell = { (b: UInt8) in String(Character(ByteLevel.byteToScalar[Int(b)])) }
        let head = GeneratedTokenizer.merges(vocabSize: fx.vocab_size).prefix(fx.merges_head.count).map { [spell($0.0), spell($0.1)] }
        #expect(head == fx.merges_head)
        for layout in ["tokenizer.json", "vocab.json + merges.txt"] {
            if layout != "tokenizer.json" { try FileManager.default.removeItem(atPath: dir + "/tokenizer.json") }
            let tok = try BPETokenizer(folder: dir)
            #expect(tok.vocabSize == fx.vocab_size && tok.eosTokenId == fx.vocab_size - 1, "\(layout)")
            for c in fx.encode {
                #expect(tok.encode(c.text) == c.ids, "\(layout): \(c.text.debugDescription.prefix(60))")
                #expect(tok.decode(c.ids) == c.text, "\(layout): \(c.text.debugDescription.prefix(60))")
            }
        }
        // Every ordered byte pair is merged once at the largest size.
        let all = GeneratedTokenizer.merges(vocabSize: GeneratedTokenizer.maxVocabSize)
        #expect(all.count == 65536 && Set(all.map { Int($0.0) << 8 | Int($0.1) }).count == 65536)
    }
}

/// `make run`'s demo (scripts/demo_client.py) against the tiny model and a small store: it ends with
/// status 0 and prints every adapter version it was served with as a version, never as `vNone`.
@Suite struct DemoClientTests {
    @Test func demoPrintsWhatEachClientWasServed() throws {
        let fx = try ServerFixture(clients: ["alice", "bob"])
        defer { fx.cleanup() }
        let (status, out, err) = try PythonScript.run("demo_client.py", [
            "--binary", ServerProcess.binary, "--model", fx.model, "--store", fx.store, "--max-tokens", "8", "--steps", "5",
            "--personalize-seq", "32", "--newcomer", TestPaths.repoRoot.appendingPathComponent("examples/newcomer-client.jsonl").path])
        #expect(status == 0, "\(out)\n\(err)")
        #expect(!out.contains("None"), "\(out)")
        #expect(out.contains("adapter: shared v1 + client v1"), "the store's clients, side by side: \(out)")
        #expect(out.contains("shared pair alone") && out.contains("adapter: shared v1 alone"), "the shared pair alone: \(out)")
        #expect(out.contains("client lab, before personalization"), "the newcomer before personalization: \(out)")
        #expect(out.contains("personalized 'lab'") && out.contains("on shared v1"), "\(out)")
        #expect(out.contains("client lab, after personalization"), "\(out)")
    }
}
