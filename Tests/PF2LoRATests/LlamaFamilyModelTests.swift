import Foundation
import Testing
@testable import PF2LoRA

/// The Llama family's forward against Hugging Face transformers 5.24 (fixtures by
/// Tests/FixtureScripts/fixtures/llama_family.py, see Fixtures/README.md): logits within 1e-4 on every path
/// (batched prefill, pooled decode, GEMM decode), greedy continuations token for token, PEFT LoRA
/// adapters folded or per token, sharded and half-precision checkpoints, and the bad folders.
@Suite struct LlamaFamilyModelTests {
    static let root = TestPaths.fixtures.appendingPathComponent("llama-family")
    static let names = ["llama-gqa-bf16", "qwen2-bias-sharded", "qwen3-qknorm-f16", "llama32-rope-llama3", "llama-rope-linear", "mistral-sliding-window"]
    static let tolerance: Float = 1e-4

    struct Case { let name: String; let ids: [Int]; let greedy: [Int] }

    static func dir(_ name: String) -> String { root.appendingPathComponent(name).path }
    static func model(_ name: String) throws -> LanguageModel { try LanguageModel.load(folder: dir(name) + "/model") }

    static func json(_ path: String) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any])
    }

    static func cases(_ name: String) throws -> [Case] {
        try (json(dir(name) + "/cases.json")["cases"] as! [[String: Any]]).map {
            Case(name: $0["name"] as! String, ids: $0["ids"] as! [Int], greedy: $0["greedy"] as! [Int])
        }
    }

    static func maxAbsDiff(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        var m: Float = 0
        for i in 0..<n { m = max(m, abs(a[i] - b[i])) }
        return m
    }

    /// Every case in one batched prefill with all logits, each case's rows against the reference.
    static func checkPrefill(_ m: LanguageModel, weights: LinearWeightSet, client: ClientPairs? = nil, reference: String) throws {
        let ref = try SafeTensorsFile(path: reference)
        let cs = try cases(URL(fileURLWithPath: m.folder).deletingLastPathComponent().lastPathComponent)
        let engine = InferenceEngine(model: m)
        let V = m.architecture.vocabSize
        let inputs = cs.map { StepInput(cache: KVCache(architecture: m.architecture, capacity: 64), tokens: $0.ids, weights: weights, client: client, allLogits: true) }
        let logits = try engine.step(inputs)
        var row = 0
        for c in cs {
            let want = try ref.tensor(c.name)
            let err = maxAbsDiff(logits.data + row * V, want.data, want.count)
            #expect(err <= tolerance, "\(reference) \(c.name): max abs error \(err)")
            row += c.ids.count
        }
    }

    /// Teacher-forced decode of every case, one token per step, all cases together (pooled or GEMM
    /// by `pooledRowLimit`): each step's logits against the reference row of that position.
    static func checkDecode(_ m: LanguageModel, weights: LinearWeightSet, client: ClientPairs? = nil, reference: String,
                            pooledRowLimit: Int, pool: WorkerPool = .shared) throws {
        let ref = try SafeTensorsFile(path: reference)
        let cs = try cases(URL(fileURLWithPath: m.folder).deletingLastPathComponent().lastPathComponent)
        let engine = InferenceEngine(model: m, pool: pool)
        engine.pooledRowLimit = pooledRowLimit
        let V = m.architecture.vocabSize
        let caches = cs.map { _ in KVCache(architecture: m.architecture, capacity: 64) }
        let refs = try cs.map { try ref.tensor($0.name) }
        var worst: Float = 0
        for t in 0..<(cs.map(\.ids.count).max()!) {
            let live = cs.indices.filter { t < cs[$0].ids.count }
            let logits = try engine.step(live.map { StepInput(cache: caches[$0], tokens: [cs[$0].ids[t]], weights: weights, client: client) })
            for (row, i) in live.enumerated() { worst = max(worst, maxAbsDiff(logits.data + row * V, refs[i].data + t * V, V)) }
        }
        #expect(worst <= tolerance, "\(reference) decode (pooled rows \(pooledRowLimit), \(pool.count) threads): max abs error \(worst)")
    }

    static func greedy(_ m: LanguageModel, weights: LinearWeightSet, client: ClientPairs? = nil, prompt: [Int], n: Int) throws -> [Int] {
        let engine = InferenceEngine(model: m)
        let cache = KVCache(architecture: m.architecture, capacity: 64)
        var next = prompt, out: [Int] = []
        for _ in 0..<n {
            let lg = try engine.step([StepInput(cache: cache, tokens: next, weights: weights, client: client)])
            let t = Sampler.argmax(lg.data, count: m.architecture.vocabSize)
            out.append(t); next = [t]
        }
        return out
    }

    @Test(arguments: names)
    func logitsMatchTransformers(_ name: String) throws {
        let m = try Self.model(name)
        try Self.checkPrefill(m, weights: m.baseLinears, reference: Self.dir(name) + "/logits.safetensors")
        try Self.checkDecode(m, weights: m.baseLinears, reference: Self.dir(name) + "/logits.safetensors", pooledRowLimit: 0)
        for threads in [1, 2] {
            try Self.checkDecode(m, weights: m.baseLinears, reference: Self.dir(name) + "/logits.safetensors", pooledRowLimit: 12,
                                 pool: WorkerPool(threads: threads))
        }
    }

    @Test(arguments: names)
    func greedyMatchesTransformers(_ name: String) throws {
        let m = try Self.model(name)
        for c in try Self.cases(name) {
            #expect(try Self.greedy(m, weights: m.baseLinears, prompt: c.ids, n: c.greedy.count) == c.greedy, "\(name) \(c.name)")
        }
    }

    /// Mistral's sliding window: within the window, sliding-window attention is full causal attention,
    /// so the context is capped at the window (every case and greedy chain of the fixture fits in it:
    /// the logits and greedy tests above); a longer sequence is refused. The fixture records that
    /// transformers' logits past the window differ from full attention's, so the cap is needed.
    @Test func mistralSlidingWindowIsTheContext() throws {
        let name = "mistral-sliding-window"
        let m = try Self.model(name)
        #expect(m.architecture.modelType == "mistral" && m.architecture.contextLength == 64)
        let sw = try #require(Self.json(Self.dir(name) + "/cases.json")["sliding_window"] as? [String: Any])
        #expect(sw["sliding_window"] as? Int == 64)
        #expect((sw["max_abs_logit_diff_full_vs_windowed_after_window"] as? Double ?? 0) > 0.05)
        #expect((sw["max_abs_logit_diff_full_vs_windowed_first_window_positions"] as? Double ?? 1) < 1e-4)
        #expect(try Self.cases(name).allSatisfy { $0.ids.count + $0.greedy.count <= 64 })
        let engine = InferenceEngine(model: m)
        let cache = KVCache(architecture: m.architecture, capacity: 128)
        #expect(throws: ModelError.self) {
            try engine.step([StepInput(cache: cache, tokens: Array(repeating: 5, count: 65), weights: m.baseLinears)])
        }
    }

    /// The rotary frequencies are those transformers used (default, linear and llama3 scaling).
    @Test(arguments: names)
    func ropeFrequenciesMatchTransformers(_ name: String) throws {
        let m = try Self.model(name)
        let want = try #require(Self.json(Self.dir(name) + "/cases.json")["rope"] as? [String: Any])["inv_freq"] as! [Double]
        let got = try #require(RoPE(m.architecture)).invFreq
        #expect(got.count == want.count)
        // Within 2 float32 ulps: torch's float32 pow rounds differently from a double pow rounded once.
        for (g, w) in zip(got, want) { #expect(abs(Double(g) - w) <= 2.5e-7 * w, "\(name): \(g) vs \(w)") }
    }

    /// A sequence decodes to the same bits alone and in a pooled batch with others (different lengths).
    @Test func pooledDecodeIsBatchInvariant() throws {
        try Self.expectPooledDecodeIsBatchInvariant(try Self.model("qwen3-qknorm-f16"), steps: 6, label: "f32")
    }

    /// Prefills each fixture case of qwen3-qknorm-f16 into two engines, then decodes `steps` greedy
    /// tokens: all cases in one pooled batch in one engine, each alone in the other; every row's
    /// logits must be the same bits (also WeightPrecisionServingTests, per precision).
    static func expectPooledDecodeIsBatchInvariant(_ m: LanguageModel, steps: Int, label: String, kvCache: KVCachePrecision = .f32) throws {
        let cs = try cases("qwen3-qknorm-f16")
        let V = m.architecture.vocabSize
        let batched = InferenceEngine(model: m, pool: WorkerPool(threads: 2)), alone = InferenceEngine(model: m, pool: WorkerPool(threads: 2))
        let cb = cs.map { _ in KVCache(architecture: m.architecture, capacity: 80, precision: kvCache) }
        let ca = cs.map { _ in KVCache(architecture: m.architecture, capacity: 80, precision: kvCache) }
        for (i, c) in cs.enumerated() {
            _ = try batched.step([StepInput(cache: cb[i], tokens: c.ids, weights: m.baseLinears)])
            _ = try alone.step([StepInput(cache: ca[i], tokens: c.ids, weights: m.baseLinears)])
        }
        var next = cs.map { $0.greedy[0] }
        for _ in 0..<steps {
            let rows = try batched.step(cs.indices.map { StepInput(cache: cb[$0], tokens: [next[$0]], weights: m.baseLinears) }).array
            var nb: [Int] = []
            for i in cs.indices {
                let la = try alone.step([StepInput(cache: ca[i], tokens: [next[i]], weights: m.baseLinears)])
                #expect((0..<V).allSatisfy { la.data[$0] == rows[i * V + $0] }, "\(label) sequence \(i): batched logits differ from alone")
                nb.append(Sampler.argmax(la.data, count: V))
            }
            next = nb
        }
    }

    // MARK: PEFT adapters

    static func peft(_ name: String, _ folder: String, level: AdapterLevel, m: LanguageModel) throws -> LoRAAdapter {
        let base = try BaseModelInfo.load(folder: m.folder)
        return try PEFT.read(folder: dir(name) + "/peft/" + folder, base: base, level: level, clientID: level == .client ? "c" : nil)
    }

    static func pairs(_ a: LoRAAdapter) -> [String: LowRankPair] { a.modules.mapValues { LowRankPair(a: $0.a, b: $0.b, scale: a.scale) } }

    /// PEFT LoRA on all seven modules and on a subset, folded into the weights and applied per token.
    @Test(arguments: names)
    func peftAdaptersMatchPEFT(_ name: String) throws {
        let m = try Self.model(name)
        for folder in ["lora-all7", "lora-subset"] {
            let a = try Self.peft(name, folder, level: .shared, m: m)
            let ref = Self.dir(name) + "/peft/\(folder)/logits.safetensors"
            let folded = LinearWeightSet(base: m.baseLinears, architecture: m.architecture, folding: Self.pairs(a), label: folder)
            try Self.checkPrefill(m, weights: folded, reference: ref)
            let c = try Self.peft(name, folder, level: .client, m: m)
            let client = ClientPairs(architecture: m.architecture, pairs: Self.pairs(c), label: folder)
            try Self.checkPrefill(m, weights: m.baseLinears, client: client, reference: ref)
            try Self.checkDecode(m, weights: m.baseLinears, client: client, reference: ref, pooledRowLimit: 12)
            try Self.checkDecode(m, weights: m.baseLinears, client: client, reference: ref, pooledRowLimit: 0)
            let r = try Self.json(Self.dir(name) + "/peft/\(folder)/reference.json")
            let prompt = try Self.cases(name).first { $0.name == r["greedy_case"] as! String }!.ids
            #expect(try Self.greedy(m, weights: folded, prompt: prompt, n: 8) == r["greedy"] as! [Int], "\(name) \(folder) folded")
            #expect(try Self.greedy(m, weights: m.baseLinears, client: client, prompt: prompt, n: 8) == r["greedy"] as! [Int], "\(name) \(folder) per token")
        }
        // Two levels: the shared pair folded, the client's per token (how the server runs them).
        let shared = try Self.peft(name, "two-level/shared", level: .shared, m: m)
        let client = try Self.peft(name, "two-level/client", level: .client, m: m)
        let folded = LinearWeightSet(base: m.baseLinears, architecture: m.architecture, folding: Self.pairs(shared), label: "shared")
        let cp = ClientPairs(architecture: m.architecture, pairs: Self.pairs(client), label: "client")
        try Self.checkPrefill(m, weights: folded, client: cp, reference: Self.dir(name) + "/peft/two-level/logits.safetensors")
        try Self.checkDecode(m, weights: folded, client: cp, reference: Self.dir(name) + "/peft/two-level/logits.safetensors", pooledRowLimit: 12)
    }

    /// A GPT-2 adapter offered to a Llama-family base: one line naming the module and how this base names its layers.
    @Test func adapterOfAnotherFamilyIsRefused() throws {
        let m = try Self.model("llama-gqa-bf16")
        let base = try BaseModelInfo.load(folder: m.folder)
        do {
            _ = try PEFT.read(folder: TestPaths.fixture("peft/lora-r4"), base: base, level: .shared)
            Issue.record("a GPT-2 adapter was accepted by a llama base")
        } catch {
            let e = "\(error)"
            #expect(e.contains("not a linear layer of base") && e.contains("model.layers.0.self_attn.q_proj") && !e.contains("\n"), "\(e)")
        }
    }

    // MARK: Checkpoints

    /// EOS ids from generation_config.json (a list for Llama-3-style models).
    @Test func eosListFromGenerationConfig() throws {
        #expect(try Self.model("llama32-rope-llama3").architecture.eosTokenIds == [2, 3])
        #expect(try Self.model("qwen2-bias-sharded").architecture.eosTokenIds == [2])
    }

    static func copy(_ name: String) throws -> String {
        let d = TestPaths.tempDir("llama")
        for f in try FileManager.default.contentsOfDirectory(atPath: dir(name) + "/model") {
            try FileManager.default.copyItem(atPath: dir(name) + "/model/" + f, toPath: d + "/" + f)
        }
        return d
    }

    static func loadError(_ d: String) -> String {
        do { _ = try LanguageModel.load(folder: d); return "" } catch { return "\(error)" }
    }

    @Test func badShardedCheckpoints() throws {
        let d = try Self.copy("qwen2-bias-sharded")
        defer { try? FileManager.default.removeItem(atPath: d) }
        let index = d + "/model.safetensors.index.json"
        let original = try Data(contentsOf: URL(fileURLWithPath: index))
        // The fingerprint covers the index and every shard.
        let fp = try Checkpoint.fingerprint(folder: d)
        #expect(fp == (try BaseModelInfo.load(folder: Self.dir("qwen2-bias-sharded") + "/model").fingerprint))
        // A missing shard.
        try FileManager.default.moveItem(atPath: d + "/model-00002-of-00003.safetensors", toPath: d + "/aside")
        var e = Self.loadError(d)
        #expect(e.contains("model-00002-of-00003.safetensors is missing") && e.contains("names this shard"), "\(e)")
        try FileManager.default.moveItem(atPath: d + "/aside", toPath: d + "/model-00002-of-00003.safetensors")
        // An index naming a tensor its shard does not hold.
        var j = try JSONSerialization.jsonObject(with: original) as! [String: Any]
        var map = j["weight_map"] as! [String: String]
        map["model.layers.0.self_attn.q_proj.weight"] = map["model.layers.0.self_attn.q_proj.weight"] == "model-00001-of-00003.safetensors"
            ? "model-00003-of-00003.safetensors" : "model-00001-of-00003.safetensors"
        let holder = map["model.layers.0.self_attn.q_proj.weight"]!
        j["weight_map"] = map
        try JSONSerialization.data(withJSONObject: j).write(to: URL(fileURLWithPath: index))
        e = Self.loadError(d)
        #expect(e.contains("names tensor 'model.layers.0.self_attn.q_proj.weight' in \(holder), which does not hold it"), "\(e)")
        // A shape that does not match the config.
        try original.write(to: URL(fileURLWithPath: index))
        var cfg = try Self.json(d + "/config.json")
        cfg["intermediate_size"] = 128
        try JSONSerialization.data(withJSONObject: cfg).write(to: URL(fileURLWithPath: d + "/config.json"))
        e = Self.loadError(d)
        #expect(e.contains("mlp.") && e.contains("but config.json implies") && e.contains("[128,") || e.contains(", 128]"), "\(e)")
        // No weights at all.
        for f in try FileManager.default.contentsOfDirectory(atPath: d) where f.hasSuffix(".safetensors") || f.hasSuffix(".json") && f.hasPrefix("model") {
            try FileManager.default.removeItem(atPath: d + "/" + f)
        }
        #expect(Self.loadError(d).contains("model.safetensors is missing"))
    }

    @Test func unsupportedModelTypeNamesTheSupportedOnes() throws {
        let d = try Self.copy("llama-rope-linear")
        defer { try? FileManager.default.removeItem(atPath: d) }
        var cfg = try Self.json(d + "/config.json")
        cfg["model_type"] = "gemma"
        try JSONSerialization.data(withJSONObject: cfg).write(to: URL(fileURLWithPath: d + "/config.json"))
        #expect(Self.loadError(d).contains("model_type 'gemma' is not supported; supported are gpt2, llama, mistral, qwen2, qwen3"))
        cfg["model_type"] = "llama"
        cfg["rope_parameters"] = ["rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0]
        try JSONSerialization.data(withJSONObject: cfg).write(to: URL(fileURLWithPath: d + "/config.json"))
        #expect(Self.loadError(d).contains("rope scaling type 'dynamic' is not supported"))
    }
}
