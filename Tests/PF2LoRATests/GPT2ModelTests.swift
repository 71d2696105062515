import Foundation
import Testing
@testable import PF2LoRA

/// The forward pass against Hugging Face transformers (fixtures by Tests/FixtureScripts/fixtures/model.py,
/// transformers 5.24.0): logits max abs error <= 1e-4 in f32, greedy continuations token for token.
@Suite struct GPT2ModelTests {
    static let tiny = TestPaths.fixture("tiny-gpt2")
    static let tolerance: Float = 1e-4

    struct Case { let name: String; let ids: [Int]; let greedy: [Int] }

    static func cases() throws -> [Case] {
        let d = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: tiny + "/cases.json"))) as! [String: Any]
        return (d["cases"] as! [[String: Any]]).map { Case(name: $0["name"] as! String, ids: $0["ids"] as! [Int], greedy: $0["greedy"] as! [Int]) }
    }

    static func maxAbsDiff(_ a: UnsafePointer<Float>, _ b: Tensor) -> Float {
        var m: Float = 0
        for i in 0..<b.count { m = max(m, abs(a[i] - b.data[i])) }
        return m
    }

    /// Runs every case in one batched prefill with all logits, and compares each case's rows.
    static func checkLogits(model: LanguageModel, binding: AdapterBinding, reference: String, tolerance: Float = tolerance) throws {
        let ref = try SafeTensorsFile(path: reference)
        let cs = try cases()
        let engine = InferenceEngine(model: model)
        let inputs = cs.map { StepInput(cache: KVCache(architecture: model.architecture, capacity: 64), tokens: $0.ids, weights: binding.weights, client: binding.client, allLogits: true) }
        let logits = try engine.step(inputs)
        var row = 0
        for c in cs {
            let want = try ref.tensor(c.name)
            let err = maxAbsDiff(logits.data + row * model.architecture.vocabSize, want)
            #expect(err <= tolerance, "\(reference) \(c.name): max abs error \(err)")
            row += c.ids.count
        }
    }

    static func greedy(model: LanguageModel, binding: AdapterBinding, prompt: [Int], n: Int) throws -> [Int] {
        let engine = InferenceEngine(model: model)
        let cache = KVCache(architecture: model.architecture, capacity: 64)
        var next = prompt, out: [Int] = []
        for _ in 0..<n {
            let lg = try engine.step([StepInput(cache: cache, tokens: next, weights: binding.weights, client: binding.client)])
            let t = Sampler.argmax(lg.data, count: model.architecture.vocabSize)
            out.append(t); next = [t]
        }
        return out
    }

    @Test func logitsMatchTransformersInOneBatch() throws {
        let m = try LanguageModel.load(folder: Self.tiny)
        try Self.checkLogits(model: m, binding: .base(m), reference: Self.tiny + "/logits.safetensors")
    }

    @Test func greedyMatchesTransformersWithKVCache() throws {
        let m = try LanguageModel.load(folder: Self.tiny)
        for c in try Self.cases() {
            #expect(try Self.greedy(model: m, binding: .base(m), prompt: c.ids, n: c.greedy.count) == c.greedy, "\(c.name)")
        }
    }

    /// Feeds each case one token per step, so every position goes through the batch-1 decode path
    /// (worker pool, own matrix-vector kernels), and compares each step's logits with transformers'.
    static func checkDecodeLogits(model: LanguageModel, binding: AdapterBinding, reference: String, pool: WorkerPool) throws {
        let ref = try SafeTensorsFile(path: reference)
        let V = model.architecture.vocabSize
        for c in try cases() {
            let want = try ref.tensor(c.name)
            let engine = InferenceEngine(model: model, pool: pool)
            let cache = KVCache(architecture: model.architecture, capacity: 64)
            var worst: Float = 0
            for (j, tok) in c.ids.enumerated() {
                let lg = try engine.step([StepInput(cache: cache, tokens: [tok], weights: binding.weights, client: binding.client)])
                worst = max(worst, maxAbsDiff(lg.data, Tensor(viewing: want.data + j * V, shape: [V], owner: want)))
            }
            #expect(worst <= tolerance, "\(reference) \(c.name), \(pool.count) threads: max abs error \(worst)")
        }
    }

    /// Batch-1 decode with 1, 2 and 3 participants (3 leaves uneven shares): base weights, a folded
    /// shared pair, and a client pair applied per token, each against its transformers/PEFT logits.
    @Test(arguments: [1, 2, 3]) func decodeStepMatchesTransformers(threads: Int) throws {
        let m = try LanguageModel.load(folder: Self.tiny)
        let pool = WorkerPool(threads: threads)
        try Self.checkDecodeLogits(model: m, binding: .base(m), reference: Self.tiny + "/logits.safetensors", pool: pool)
        let shared = try Self.peft("two-level/shared", level: .shared, model: m)
        let client = try Self.peft("two-level/client", level: .client, model: m)
        let both = AdapterBinding(weights: Self.folded(shared, m), sharedVersion: 1, client: Self.client(client, m), clientVersion: 1, clientTrainedOn: nil)
        try Self.checkDecodeLogits(model: m, binding: both, reference: TestPaths.fixture("peft/two-level/logits.safetensors"), pool: pool)
    }

    @Test(arguments: ["f16", "bf16"]) func halfPrecisionCheckpoints(dtype: String) throws {
        let m = try LanguageModel.load(folder: TestPaths.fixture("tiny-gpt2-\(dtype)"))
        try Self.checkLogits(model: m, binding: .base(m), reference: Self.tiny + "/logits-\(dtype).safetensors")
    }

    // MARK: Adapters vs PEFT

    static func peft(_ name: String, level: AdapterLevel, model: LanguageModel) throws -> LoRAAdapter {
        let base = try BaseModelInfo.load(folder: model.folder)
        return try PEFT.read(folder: TestPaths.fixture("peft/\(name)"), base: base, level: level, clientID: level == .client ? "c" : nil)
    }

    static func pairs(_ a: LoRAAdapter) -> [String: LowRankPair] {
        a.modules.mapValues { LowRankPair(a: $0.a, b: $0.b, scale: a.scale) }
    }

    static func folded(_ a: LoRAAdapter, _ m: LanguageModel) -> LinearWeightSet {
        LinearWeightSet(base: m.baseLinears, architecture: m.architecture, folding: pairs(a), label: "t")
    }

    static func client(_ a: LoRAAdapter, _ m: LanguageModel) -> ClientPairs {
        ClientPairs(architecture: m.architecture, pairs: pairs(a), label: "t")
    }

    /// A PEFT LoRA gives PEFT's logits whether folded into the weights or applied per token.
    @Test(arguments: ["lora-r4", "lora-r2-rslora", "two-level-merged"]) func peftAdapterFoldedAndUnfolded(name: String) throws {
        let m = try LanguageModel.load(folder: Self.tiny)
        let ref = TestPaths.fixture("peft/\(name)/logits.safetensors")
        let shared = try Self.peft(name, level: .shared, model: m)
        try Self.checkLogits(model: m, binding: AdapterBinding(weights: Self.folded(shared, m), sharedVersion: 1, client: nil, clientVersion: nil, clientTrainedOn: nil), reference: ref)
        let asClient = try Self.peft(name, level: .client, model: m)
        try Self.checkLogits(model: m, binding: AdapterBinding(weights: m.baseLinears, sharedVersion: nil, client: Self.client(asClient, m), clientVersion: 1, clientTrainedOn: nil), reference: ref)
    }

    /// Two PEFT adapters active at once = shared pair folded + client pair per token.
    @Test func twoLevelMatchesPEFTWithBothAdaptersActive() throws {
        let m = try LanguageModel.load(folder: Self.tiny)
        let shared = try Self.peft("two-level/shared", level: .shared, model: m)
        let client = try Self.peft("two-level/client", level: .client, model: m)
        let b = AdapterBinding(weights: Self.folded(shared, m), sharedVersion: 1, client: Self.client(client, m), clientVersion: 1, clientTrainedOn: nil)
        try Self.checkLogits(model: m, binding: b, reference: TestPaths.fixture("peft/two-level/logits.safetensors"))
        try Self.checkLogits(model: m, binding: AdapterBinding(weights: Self.folded(shared, m), sharedVersion: 1, client: nil, clientVersion: nil, clientTrainedOn: nil),
                             reference: TestPaths.fixture("peft/two-level/logits-shared-only.safetensors"))
        let ref = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("peft/two-level/reference.json")))) as! [String: Any]
        let c = try Self.cases().first { $0.name == ref["greedy_case"] as! String }!
        #expect(try Self.greedy(model: m, binding: b, prompt: c.ids, n: 20) == ref["greedy"] as! [Int])
        // The merged rank-10 export applied as one plain LoRA gives the same logits as the two levels.
        let merged = PEFT.merge(shared: shared, client: client)
        try Self.checkLogits(model: m, binding: AdapterBinding(weights: Self.folded(merged, m), sharedVersion: 1, client: nil, clientVersion: nil, clientTrainedOn: nil),
                             reference: TestPaths.fixture("peft/two-level/logits.safetensors"))
    }

    /// Sequences of different clients batched together give what each gives alone (prefill and decode).
    @Test func mixedClientBatchEqualsEachAlone() throws {
        let m = try LanguageModel.load(folder: Self.tiny)
        let shared = Self.folded(try Self.peft("two-level/shared", level: .shared, model: m), m)
        let c1 = Self.client(try Self.peft("two-level/client", level: .client, model: m), m)
        let c2 = Self.client(try Self.peft("lora-r4", level: .client, model: m), m)
        let cs = try Self.cases()
        let setups: [(LinearWeightSet, ClientPairs?, [Int])] = [(shared, c1, cs[1].ids), (shared, c2, cs[2].ids), (shared, nil, cs[3].ids), (m.baseLinears, c1, cs[0].ids), (shared, c1, cs[2].ids)]
        let alone = try setups.map { try Self.greedy(model: m, binding: AdapterBinding(weights: $0.0, sharedVersion: nil, client: $0.1, clientVersion: nil, clientTrainedOn: nil), prompt: $0.2, n: 8) }
        let engine = InferenceEngine(model: m)
        let caches = setups.map { _ in KVCache(architecture: m.architecture, capacity: 64) }
        var next = setups.map { $0.2 }
        var together = Array(repeating: [Int](), count: setups.count)
        for _ in 0..<8 {
            let lg = try engine.step(setups.indices.map { StepInput(cache: caches[$0], tokens: next[$0], weights: setups[$0].0, client: setups[$0].1) })
            for i in setups.indices {
                let t = Sampler.argmax(lg.data + i * m.architecture.vocabSize, count: m.architecture.vocabSize)
                together[i].append(t); next[i] = [t]
            }
        }
        #expect(together == alone)
        #expect(Set(alone.map { $0 }).count > 1, "different adapters should give different text")
    }

    /// A pooled decode step (up to `maxPooledRows` sequences) gives each sequence the same logits, to
    /// the bit, as a step of that sequence alone: batching never changes what a client gets.
    /// One thread too: the run state must grow from its empty placeholders (a 1-thread pool once
    /// overran the score buffer, found by the server tests).
    @Test(arguments: [1, 2]) func pooledDecodeIsBatchInvariant(threads: Int) throws {
        let m = try LanguageModel.load(folder: Self.tiny)
        let shared = Self.folded(try Self.peft("two-level/shared", level: .shared, model: m), m)
        let c1 = Self.client(try Self.peft("two-level/client", level: .client, model: m), m)
        let c2 = Self.client(try Self.peft("lora-r4", level: .client, model: m), m)
        let cs = try Self.cases()
        let setups: [(LinearWeightSet, ClientPairs?, [Int])] = [(shared, c1, cs[1].ids), (shared, c2, cs[2].ids), (shared, nil, cs[3].ids), (m.baseLinears, c1, cs[0].ids), (m.baseLinears, nil, cs[2].ids)]
        let pool = WorkerPool(threads: threads)
        let batched = InferenceEngine(model: m, pool: pool), alone = InferenceEngine(model: m, pool: pool)
        let cachesB = setups.map { _ in KVCache(architecture: m.architecture, capacity: 64) }
        let cachesA = setups.map { _ in KVCache(architecture: m.architecture, capacity: 64) }
        let V = m.architecture.vocabSize
        var next: [Int] = []
        for (i, s) in setups.enumerated() {
            _ = try alone.step([StepInput(cache: cachesA[i], tokens: s.2, weights: s.0, client: s.1)])
            let lg = try batched.step([StepInput(cache: cachesB[i], tokens: s.2, weights: s.0, client: s.1)])
            next.append(Sampler.argmax(lg.data, count: V))
        }
        for _ in 0..<3 {
            let lb = try batched.step(setups.indices.map { StepInput(cache: cachesB[$0], tokens: [next[$0]], weights: setups[$0].0, client: setups[$0].1) })
            #expect(lb.rows == setups.count)
            var nextB: [Int] = []
            for i in setups.indices {
                let la = try alone.step([StepInput(cache: cachesA[i], tokens: [next[i]], weights: setups[i].0, client: setups[i].1)])
                let same = (0..<V).allSatisfy { la.data[$0] == lb.data[i * V + $0] }
                #expect(same, "sequence \(i): batched logits differ from alone")
                nextB.append(Sampler.argmax(la.data, count: V))
            }
            next = nextB
        }
        // Every participant has its own full-length score row (the overrun above wrote past a 1-float one).
        #expect(batched.privateScores.rows >= threads && batched.privateScores.cols >= m.architecture.contextLength)
        #expect(batched.privateLN.count >= threads * setups.count * m.architecture.hiddenSize)
    }

    // MARK: Bad model folders

    static func copyTiny() throws -> String {
        let dir = TestPaths.tempDir("model")
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            try FileManager.default.copyItem(atPath: tiny + "/" + f, toPath: dir + "/" + f)
        }
        return dir
    }

    static func loadError(_ dir: String) -> String {
        do { _ = try LanguageModel.load(folder: dir); return "" } catch { return "\(error)" }
    }

    @Test func missingFolderAndFiles() throws {
        #expect(Self.loadError("/nonexistent/model").contains("does not exist"))
        let dir = try Self.copyTiny()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.removeItem(atPath: dir + "/model.safetensors")
        #expect(Self.loadError(dir).contains("model.safetensors is missing"))
        try FileManager.default.removeItem(atPath: dir + "/config.json")
        #expect(Self.loadError(dir).contains("config.json is missing"))
    }

    @Test func truncatedAndCorruptSafetensors() throws {
        let dir = try Self.copyTiny()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/model.safetensors"
        let full = try Data(contentsOf: URL(fileURLWithPath: path))
        try full.prefix(5).write(to: URL(fileURLWithPath: path))
        #expect(Self.loadError(dir).contains("too small"))
        try full.prefix(full.count / 2).write(to: URL(fileURLWithPath: path))
        let half = Self.loadError(dir)
        #expect(half.contains("ends past the end") && half.contains("truncated"), "\(half)")
        var big = full
        big.replaceSubrange(0..<8, with: withUnsafeBytes(of: UInt64(1 << 40).littleEndian) { Data($0) })
        try big.write(to: URL(fileURLWithPath: path))
        #expect(Self.loadError(dir).contains("points past the end"))
        var dtype = full
        let hdr = String(decoding: full[8..<(8 + 200)], as: UTF8.self)
        #expect(hdr.contains("\"F32\""))
        let r = dtype.range(of: Data("\"F32\"".utf8))!
        dtype.replaceSubrange(r, with: Data("\"I64\"".utf8))
        try dtype.write(to: URL(fileURLWithPath: path))
        #expect(Self.loadError(dir).contains("dtype I64"))
    }

    @Test func configThatDoesNotMatchTheTensors() throws {
        let dir = try Self.copyTiny()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/config.json"
        var cfg = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as! [String: Any]
        cfg["n_embd"] = 128
        try JSONSerialization.data(withJSONObject: cfg).write(to: URL(fileURLWithPath: path))
        let e = Self.loadError(dir)
        #expect(e.contains("implies") && e.contains("do not belong together"), "\(e)")
        cfg["n_embd"] = 64; cfg["n_layer"] = 1
        try JSONSerialization.data(withJSONObject: cfg).write(to: URL(fileURLWithPath: path))
        #expect(Self.loadError(dir).contains("unexpected tensor 'transformer.h.1."))
        cfg["n_layer"] = 3
        try JSONSerialization.data(withJSONObject: cfg).write(to: URL(fileURLWithPath: path))
        #expect(Self.loadError(dir).contains("has no tensor 'transformer.h.2."))
        try Data("{".utf8).write(to: URL(fileURLWithPath: path))
        #expect(Self.loadError(dir).contains("invalid JSON"))
    }

    @Test func promptOverTheContextIsRefused() throws {
        let m = try LanguageModel.load(folder: Self.tiny)
        let engine = InferenceEngine(model: m)
        let cache = KVCache(architecture: m.architecture, capacity: 64)
        #expect(throws: ModelError.self) { try engine.step([StepInput(cache: cache, tokens: Array(repeating: 1, count: 65), weights: m.baseLinears)]) }
        #expect(throws: ModelError.self) { try engine.step([StepInput(cache: cache, tokens: [400], weights: m.baseLinears)]) }
    }

    /// A saved random model loads back with the same weights (the `model random` path).
    @Test func randomModelRoundTrip() throws {
        let cfg = GPT2Config.preset("tiny", vocabSize: 300)!
        let w = ModelWeights.random(architecture: cfg.architecture, seed: 7)
        let dir = TestPaths.tempDir("rand")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try LanguageModel(folder: dir, weights: w, checkpoint: nil).save(to: dir)
        let back = try LanguageModel.load(folder: dir)
        #expect(back.architecture == cfg.architecture)
        for ((n1, t1), (_, t2)) in zip(w.named, back.weights.named) { #expect(t1.array == t2.array, "\(n1)") }
    }
}

/// The shipped models run the same in pf2lora as in transformers (Tests/FixtureScripts/fixtures/default_model.py): the
/// embedded default (models/debian-llama, Llama family, f16 on disk) and the first-generation fortune GPT-2.
@Suite struct DefaultModelTests {
    static func check(_ name: String, tolerance: Float) throws {
        let folder = TestPaths.repoRoot.appendingPathComponent("models/\(name)").path
        let fixture = TestPaths.fixture(name)
        let meta = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: fixture + "/cases.json"))) as! [String: Any]
        let m = try LanguageModel.load(folder: folder)
        let tok = try BPETokenizer(folder: folder)
        let ref = try SafeTensorsFile(path: fixture + "/logits.safetensors")
        let engine = InferenceEngine(model: m)
        for c in meta["cases"] as! [[String: Any]] {
            let ids = c["ids"] as! [Int]
            #expect(tok.encode(c["text"] as! String) == ids, "the shipped tokenizer encodes as HF does")
            let cache = KVCache(architecture: m.architecture, capacity: 64)
            let logits = try engine.step([StepInput(cache: cache, tokens: ids, weights: m.baseLinears, allLogits: true)])
            let want = try ref.tensor(c["name"] as! String)
            var err: Float = 0
            for i in 0..<want.count { err = max(err, abs(logits.data[i] - want.data[i])) }
            #expect(err <= tolerance, "\(name) \(c["name"]!): max abs error \(err)")
            let greedy = try GPT2ModelTests.greedy(model: m, binding: .base(m), prompt: ids, n: 16)
            #expect(greedy == c["greedy"] as! [Int], "\(name) \(c["name"]!)")
        }
    }

    /// The embedded default: f16 weights widened to f32 on both sides, so the same tolerance as an f32 model.
    @Test func shippedModelMatchesTransformers() throws { try Self.check("debian-llama", tolerance: 1e-4) }

    @Test func fortuneModelMatchesTransformers() throws { try Self.check("fortune-gpt2", tolerance: 1e-4) }

    /// What ships is small: the model's weights are f16 and under 25 MB, its adapters under 2 MB.
    @Test func shippedFilesAreSmall() throws {
        let root = TestPaths.repoRoot.path
        let fm = FileManager.default
        let model = try fm.attributesOfItem(atPath: root + "/models/debian-llama/model.safetensors")[.size] as! Int
        #expect(model < 25_000_000, "model.safetensors is \(model) bytes")
        let ck = try Checkpoint.open(folder: root + "/models/debian-llama")
        #expect(Set(ck.dtypes.keys) == [.f16], "stored \(ck.dtypes)")
        var adapters = 0
        for case let f as String in fm.enumerator(atPath: root + "/adapters/debian-llama")! {
            adapters += (try fm.attributesOfItem(atPath: root + "/adapters/debian-llama/" + f)[.size] as? Int) ?? 0
        }
        #expect(adapters > 0 && adapters < 2_000_000, "adapters/debian-llama holds \(adapters) bytes")
    }
}
