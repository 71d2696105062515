import Foundation
import Testing
@testable import PF2LoRA

/// The command-line contract: results on stdout, one error line on stderr and a non-zero exit on bad input.
@Suite struct CLITests {
    struct Run { let code: Int32; let out: String; let err: String; let signaled: Bool }

    static func run(_ args: [String], cwd: String? = nil, environment: [String: String]? = nil, stdin: Data? = nil) throws -> Run {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: ServerProcess.binary)
        p.arguments = args
        if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
        if let environment { p.environment = environment }
        let o = Pipe(), e = Pipe(), i = Pipe()
        p.standardOutput = o; p.standardError = e; p.standardInput = i
        try p.run()
        if let stdin { i.fileHandleForWriting.write(stdin) }
        try? i.fileHandleForWriting.close()
        let out = o.fileHandleForReading.readDataToEndOfFile(), err = e.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Run(code: p.terminationStatus, out: String(decoding: out, as: UTF8.self), err: String(decoding: err, as: UTF8.self),
                   signaled: p.terminationReason == .uncaughtSignal)
    }

    static let tiny = TestPaths.fixture("tiny-gpt2")

    /// `bench decode --read-bound-rounds`: decode steps and a plain read of the same bytes alternate
    /// in one process; the report's ratio fields are present and ordered, and a negative count is a
    /// usage error.
    @Test func benchDecodeReportsTheInProcessReadBound() throws {
        let r = try Self.run(["bench", "decode", "--model", Self.tiny, "--tokens", "2", "--prompt-tokens", "4", "--repeats", "1",
                              "--threads", "2", "--read-bound-rounds", "5"])
        #expect(r.code == 0, "\(r.err)")
        let d = try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as! [String: Any]
        let lo = d["decode_vs_read_bound_min"] as? Double ?? -1, mid = d["decode_vs_read_bound"] as? Double ?? -1
        let hi = d["decode_vs_read_bound_max"] as? Double ?? -1
        #expect(d["read_bound_rounds"] as? Int == 5)
        #expect(lo > 0 && lo <= mid && mid <= hi && hi.isFinite, "\(d)")
        #expect((d["read_gb_per_s_median"] as? Double ?? 0) > 0)
        let bad = try Self.run(["bench", "decode", "--model", Self.tiny, "--read-bound-rounds", "-1"])
        #expect(bad.code != 0 && bad.err.contains("--read-bound-rounds"), "\(bad.err)")
    }

    @Test func greedyGenerateMatchesTheFixture() throws {
        let d = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: Self.tiny + "/cases.json"))) as! [String: Any]
        let c = (d["cases"] as! [[String: Any]])[1]
        let r = try Self.run(["generate", "--model", Self.tiny, "--prompt", c["text"] as! String, "--max-tokens", "20", "--temperature", "0", "--ignore-eos"])
        #expect(r.code == 0)
        let tok = try BPETokenizer(folder: Self.tiny)
        #expect(r.out == tok.decode(c["greedy"] as! [Int]) + "\n", "stdout is the continuation only, then a newline")
        #expect(r.err.contains("tok/s"), "stats go to stderr")
        // Same seed, same text; sampling differs from greedy.
        let s1 = try Self.run(["generate", "--model", Self.tiny, "--prompt", "The", "--seed", "3", "--max-tokens", "12"])
        let s2 = try Self.run(["generate", "--model", Self.tiny, "--prompt", "The", "--seed", "3", "--max-tokens", "12"])
        #expect(s1.out == s2.out && s1.code == 0)
    }

    static func expectOneErrorLine(_ r: Run, _ needle: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.code != 0 && !r.signaled, "exit \(r.code)", sourceLocation: sourceLocation)
        let lines = r.err.split(separator: "\n")
        #expect(lines.count == 1, "one error line: \(r.err)", sourceLocation: sourceLocation)
        #expect(r.err.contains(needle), "\(r.err)", sourceLocation: sourceLocation)
    }

    @Test func badInputGivesOneErrorLine() throws {
        Self.expectOneErrorLine(try Self.run(["generate", "--model", "/nonexistent/m", "--prompt", "x"]), "does not exist")
        // The weights file given as --model: it exists, so "does not exist" misled.
        Self.expectOneErrorLine(try Self.run(["generate", "--model", Self.tiny + "/model.safetensors", "--prompt", "x"]),
                                "model.safetensors is a file; --model takes the folder")
        let dir = TestPaths.tempDir("cli")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for f in ["config.json", "tokenizer.json"] { try FileManager.default.copyItem(atPath: Self.tiny + "/" + f, toPath: dir + "/" + f) }
        let full = try Data(contentsOf: URL(fileURLWithPath: Self.tiny + "/model.safetensors"))
        try full.prefix(full.count - 100).write(to: URL(fileURLWithPath: dir + "/model.safetensors"))
        Self.expectOneErrorLine(try Self.run(["generate", "--model", dir, "--prompt", "x"]), "model.safetensors")
        try full.write(to: URL(fileURLWithPath: dir + "/model.safetensors"))
        let long = String(repeating: "The cat sat on the mat. ", count: 40)
        Self.expectOneErrorLine(try Self.run(["generate", "--model", dir, "--prompt", long]), "context")
        Self.expectOneErrorLine(try Self.run(["generate", "--model", dir, "--prompt", "x", "--top-p", "2"]), "--top-p")
        Self.expectOneErrorLine(try Self.run(["generate", "--model", dir, "--prompt", "x", "--client", "a"]), "--store")
        Self.expectOneErrorLine(try Self.run(["tokenize", "--model", dir], stdin: Data([0x61, 0xff, 0x62])), "UTF-8")
        // Invalid UTF-8 in an argument: through a shell, since Process passes Swift Strings.
        let sh = Process()
        sh.executableURL = URL(fileURLWithPath: "/bin/sh")
        sh.arguments = ["-c", "\"$0\" generate --model \"$1\" --prompt \"$(printf 'a\\377b')\"", ServerProcess.binary, dir]
        let errPipe = Pipe()
        sh.standardError = errPipe
        sh.standardOutput = Pipe()
        try sh.run()
        let errText = String(decoding: errPipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        sh.waitUntilExit()
        Self.expectOneErrorLine(Run(code: sh.terminationStatus, out: "", err: errText, signaled: false), "not valid UTF-8")
        Self.expectOneErrorLine(try Self.run(["model", "random", "--config", "huge", "--out", dir + "/x"]), "unknown --config")
    }

    @Test func helpIsCompleteForEveryCommand() throws {
        let top = try Self.run(["--help"])
        for cmd in ["generate", "serve", "tokenize", "adapters", "synthetic", "model", "bench"] {
            #expect(top.out.contains(cmd), "--help lists \(cmd)")
            let h = try Self.run([cmd, "--help"])
            #expect(h.code == 0 && h.out.contains("USAGE"), "\(cmd) --help")
        }
    }

    /// `model convert` stores a checkpoint's weights in f16 (what the embedded default ships): the copy
    /// holds each weight rounded to f16, keeps the config and tokenizer, and generates the same greedy text
    /// as the f32 model with its weights rounded the same way.
    @Test func convertToF16() throws {
        let dir = TestPaths.tempDir("convert")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let made = try Self.run(["model", "random", "--config", "tiny-llama", "--out", dir + "/f32", "--seed", "3"])
        #expect(made.code == 0, "\(made.err)")
        let conv = try Self.run(["model", "convert", "--model", dir + "/f32", "--out", dir + "/f16", "--dtype", "f16"])
        #expect(conv.code == 0 && conv.err.contains("f16"), "\(conv.err)")
        let a = try LanguageModel.load(folder: dir + "/f32"), b = try LanguageModel.load(folder: dir + "/f16")
        #expect(a.architecture == b.architecture)
        #expect(Set(try Checkpoint.open(folder: dir + "/f16").dtypes.keys) == [.f16])
        for ((n, x), (_, y)) in zip(a.weights.named, b.weights.named) {
            let want = x.array.map { Float(Float16($0)) }
            #expect(y.array == want, "\(n)")
        }
        for f in ["tokenizer.json", "vocab.json", "merges.txt"] where FileManager.default.fileExists(atPath: dir + "/f32/" + f) {
            #expect(FileManager.default.contents(atPath: dir + "/f16/" + f) == FileManager.default.contents(atPath: dir + "/f32/" + f), "\(f)")
        }
        Self.expectOneErrorLine(try Self.run(["model", "convert", "--model", dir + "/f32", "--out", dir + "/x", "--dtype", "q4"]), "unknown --dtype 'q4'")
        Self.expectOneErrorLine(try Self.run(["model", "convert", "--model", dir + "/f32", "--out", dir + "/f32"]), "--out must differ from --model")
        // An --out that holds a model is not written over without --force (both commands wrote over
        // it silently: `model random --out models/debian-llama` replaced the shipped default).
        let kept = try Data(contentsOf: URL(fileURLWithPath: dir + "/f16/model.safetensors"))
        Self.expectOneErrorLine(try Self.run(["model", "random", "--config", "tiny-llama", "--out", dir + "/f16"]), "already holds a model")
        Self.expectOneErrorLine(try Self.run(["model", "convert", "--model", dir + "/f32", "--out", dir + "/f16", "--dtype", "bf16"]), "pass --force")
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/f16/model.safetensors")) == kept, "a refused command changed --out")
        let forced = try Self.run(["model", "convert", "--model", dir + "/f32", "--out", dir + "/f16", "--dtype", "bf16", "--force"])
        #expect(forced.code == 0, "\(forced.err)")
        #expect(Set(try Checkpoint.open(folder: dir + "/f16").dtypes.keys) == [.bf16])
        Self.expectOneErrorLine(try Self.run(["model", "random", "--config", "tiny-llama", "--out", dir + "/f32/config.json"]), "is a file")
    }

    /// `model random` writes a Llama-family folder with a working generated tokenizer; `model info`
    /// describes it (architecture, parameters, dtype, tokenizer, slot table); generate and adapters init run on it.
    @Test func llamaPresetInfoAndGenerate() throws {
        let dir = TestPaths.tempDir("llama-cli")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let made = try Self.run(["model", "random", "--config", "tiny-llama", "--out", dir, "--dtype", "bf16", "--seed", "5"])
        #expect(made.code == 0, "\(made.err)")
        let info = try Self.run(["model", "info", dir, "--json"])
        #expect(info.code == 0, "\(info.err)")
        let j = try #require(try JSONSerialization.jsonObject(with: Data(info.out.utf8)) as? [String: Any])
        #expect(j["model_type"] as? String == "llama" && j["kv_heads"] as? Int == 2 && j["parameters"] as? Int == 106_816)
        #expect(j["stored_dtypes"] as? [String] == ["bf16"] && (j["tokenizer"] as? String ?? "").contains("generated byte-level BPE"))
        let slots = try #require(j["slots"] as? [[String: Any]])
        #expect(slots.map { $0["peft_name"] as? String ?? "" } == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        let text = try Self.run(["model", "info", dir])
        #expect(text.out.contains("SwiGLU") && text.out.contains("4 heads / 2 KV heads of 16") && text.out.contains("self_attn.q_proj"))
        // The tokenizer's end-of-text id is the model's end-of-sequence id.
        let eos = try #require(try BPETokenizer(folder: dir).eosTokenId)
        #expect(j["eos_token_ids"] as? [Int] == [eos])
        let g = try Self.run(["generate", "--model", dir, "--prompt", "Hello", "--max-tokens", "5", "--temperature", "0", "--ignore-eos"])
        #expect(g.code == 0 && g.err.contains("5 new tokens"), "\(g.err)")
        let initOut = dir + "/shared.safetensors"
        let a = try Self.run(["adapters", "init", "--model", dir, "--out", initOut, "--rank", "4", "--targets", "q_proj,v_proj"])
        #expect(a.code == 0 && a.out.contains("4 modules"), "\(a.err) \(a.out)")
        let bad = try Self.run(["adapters", "init", "--model", dir, "--out", initOut, "--targets", "attn.c_attn"])
        Self.expectOneErrorLine(bad, "'attn.c_attn' is not a linear layer of a llama block")
        Self.expectOneErrorLine(try Self.run(["model", "random", "--config", "llama9", "--out", dir + "/x"]), "unknown --config 'llama9'")
    }

    /// `synthetic --alpha` sets the LoRA scale (the knob the fair grids give the methods without one of their own):
    /// it changes a single-level baseline's result, the default equals an explicit 2 x rank, and a bad value is one error line.
    @Test func syntheticAlphaSetsTheScale() throws {
        let dir = TestPaths.tempDir("cli-synthetic-alpha")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func mse(_ extra: [String], _ name: String) throws -> Double {
            let r = try Self.run(["synthetic", "--clients", "2", "--rounds", "2", "--local-steps", "2", "--lower-steps", "1",
                                  "--methods", "homlora", "--quiet", "--seed", "3", "--out", dir + "/" + name] + extra)
            #expect(r.code == 0, "\(r.err)")
            let j = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/" + name + "/results.json"))) as? [String: Any])
            let m = try #require((j["methods"] as? [[String: Any]])?.first)
            return try #require(m["meanValidMSE"] as? Double)
        }
        let def = try mse([], "default"), same = try mse(["--alpha", "16"], "a16"), big = try mse(["--alpha", "64"], "a64")
        #expect(def == same, "the default alpha is 2 x rank = 16")
        #expect(def != big, "alpha 64 scales the update: another result")
        Self.expectOneErrorLine(try Self.run(["synthetic", "--alpha", "0", "--out", dir + "/bad"]), "--alpha")
    }
}
