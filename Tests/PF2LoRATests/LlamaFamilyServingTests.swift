import Foundation
import Testing
@testable import PF2LoRA

/// Everything that works for a GPT-2 base works for a Llama-family base: the two-level store, many
/// clients' adapters in one continuous batch (each client's text as when it runs alone), personalize
/// while serving, PEFT import and export, a federation and a node's `train_local` round.
@Suite struct LlamaFamilyServingTests {
    /// Greedy text of `client` from a fresh server (alone), to compare with the batched answers.
    static func alone(_ fx: ServerFixture, client: String, prompt: String) throws -> String {
        let s = try fx.serve()
        defer { _ = s.finish() }
        _ = s.request(1, "generate", ["client": client, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true])
        return try #require(ServerProcess.result(s.response(1))?["text"] as? String)
    }

    @Test func serveManyClientsOnALlamaBase() throws {
        let fx = try ServerFixture(clients: ["alice", "bob", "carol"], family: "llama")
        defer { try? FileManager.default.removeItem(atPath: fx.root) }
        #expect(fx.gpt2.architecture.modelType == "llama" && fx.gpt2.architecture.kvHeadCount == 2)
        let s = try fx.serve()
        defer { _ = s.finish() }
        let clients = ["alice", "bob", "carol", "shared"]
        for (i, c) in clients.enumerated() {
            _ = s.request(i + 1, "generate", ["client": c, "prompt": "The cat", "max_tokens": 8, "temperature": 0, "ignore_eos": true])
        }
        var texts: [String: String] = [:]
        for (i, c) in clients.enumerated() {
            let r = try #require(ServerProcess.result(s.response(i + 1)), "\(c)")
            texts[c] = r["text"] as? String
            #expect((r["adapter"] as? [String: Any])?["shared"] as? Int == 1)
        }
        // Different clients' adapters give different text, and each equals the client alone.
        #expect(Set(texts.values).count >= 3, "\(texts)")
        for c in ["alice", "bob"] { #expect(try Self.alone(fx, client: c, prompt: "The cat") == texts[c], "\(c)") }
        // Personalize a new client while serving, then it is served with its own pair.
        _ = s.request(20, "personalize", ["client": "dave", "texts": ["the cat sat on the mat", "a dog ran in the park"], "steps": 4, "batch": 2, "seq": 12])
        let p = try #require(ServerProcess.result(s.response(20, timeout: 120)), "personalize")
        #expect(p["version"] as? Int == 1)
        _ = s.request(21, "generate", ["client": "dave", "prompt": "The cat", "max_tokens": 4, "temperature": 0])
        #expect((ServerProcess.result(s.response(21))?["adapter"] as? [String: Any])?["client"] as? Int == 1)
    }

    /// The store's two-level adapter exported as one PEFT LoRA of rank r + r2 gives the same logits
    /// as the two levels (q_proj ... down_proj names, fan_in_fan_out false), and imports back.
    @Test func peftExportOfTwoLevelsRoundTrips() throws {
        let name = "qwen2-bias-sharded"
        let m = try LlamaFamilyModelTests.model(name)
        let base = try BaseModelInfo.load(folder: m.folder)
        let shared = try LlamaFamilyModelTests.peft(name, "two-level/shared", level: .shared, m: m)
        let client = try LlamaFamilyModelTests.peft(name, "two-level/client", level: .client, m: m)
        let dir = TestPaths.tempDir("peft")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try PEFT.write(PEFT.merge(shared: shared, client: client), to: dir, base: base)
        let cfg = try LlamaFamilyModelTests.json(dir + "/adapter_config.json")
        #expect(cfg["target_modules"] as? [String] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
        #expect(cfg["fan_in_fan_out"] as? Bool == false && cfg["r"] as? Int == 10)
        let st = try SafeTensorsFile(path: dir + "/adapter_model.safetensors")
        #expect(st.names.contains("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"))
        let back = try PEFT.read(folder: dir, base: base, level: .shared)
        let folded = LinearWeightSet(base: m.baseLinears, architecture: m.architecture, folding: LlamaFamilyModelTests.pairs(back), label: "merged")
        try LlamaFamilyModelTests.checkPrefill(m, weights: folded, reference: LlamaFamilyModelTests.dir(name) + "/peft/two-level/logits.safetensors")
    }

    /// A short PF2LoRA federation on a Llama-architecture base lowers every client's loss, and a
    /// node's train_local round on it publishes the client's pair.
    @Test func federationOnALlamaBase() throws {
        let fx = try ServerFixture(clients: [], family: "llama")
        defer { try? FileManager.default.removeItem(atPath: fx.root) }
        let clients = GPT2TaskTests.clients().map { c in
            ClientTokenData(id: c.id, train: c.train, valid: c.valid, test: c.test)
        }
        let task = try LMTask(weights: fx.gpt2.weights, clients: clients, batchSize: 4, seqLen: 12)
        #expect(task.modules.count == 2 * 7)
        var c = FederatedConfig()
        c.rounds = 4; c.localSteps = 3; c.lowerSteps = 2; c.rank = 4; c.rank2 = 2; c.upperLR = 1e-2; c.lowerLR = 0.5
        let r = try runFederated(.pf2lora, task: task, config: c)
        let first = r.rounds.first!.meanTrainLoss, last = r.rounds.last!.meanTrainLoss
        #expect(last < first, "train loss \(first) -> \(last)")
        // The adapters land in the store under the family's module paths.
        let adapters = try federatedAdapters(r, modules: task.modules, clientIDs: clients.map(\.id), base: fx.storeHandle.base)
        let v = try publish(adapters, to: fx.storeHandle)
        #expect(v.clients.count == 2)
        let a = try #require(try fx.storeHandle.latestClient(clients[0].id)).adapter
        #expect(a.modules.keys.contains("model.layers.1.mlp.gate_proj"))
        #expect(a.targetModules.contains("self_attn.q_proj"))
    }
}
