import Foundation
import Testing
@testable import PF2LoRA

/// The llama-family fixtures (Tests/FixtureScripts/fixtures/llama_family.py) are complete and consistent: every model
/// folder's weights open with the safetensors reader (sharded via the index, F32/F16/BF16), shapes follow
/// the config, and the logits, PEFT adapters and gradients match the model's shapes. The numeric
/// comparisons against them belong to the Llama-family model tests.
@Suite struct LlamaFamilyFixtureTests {
    static let root = TestPaths.fixtures.appendingPathComponent("llama-family")

    static func json(_ url: URL) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as? [String: Any])
    }

    static func models() throws -> [[String: Any]] {
        try #require(try json(root.appendingPathComponent("index.json"))["models"] as? [[String: Any]])
    }

    /// Every tensor of a folder's weights, by name, with the file that holds it (the index decides when sharded).
    static func weights(_ folder: URL) throws -> [String: TensorInfo] {
        let index = folder.appendingPathComponent("model.safetensors.index.json")
        var out: [String: TensorInfo] = [:]
        if FileManager.default.fileExists(atPath: index.path) {
            let map = try #require(try json(index)["weight_map"] as? [String: String])
            var files: [String: SafeTensorsFile] = [:]
            for (name, shard) in map {
                if files[shard] == nil { files[shard] = try SafeTensorsFile(path: folder.appendingPathComponent(shard).path) }
                out[name] = try #require(files[shard]?.tensors[name], "\(shard) lacks \(name)")
            }
            #expect(files.values.reduce(0) { $0 + $1.tensors.count } == map.count, "a shard holds a tensor the index does not name")
        } else {
            out = try SafeTensorsFile(path: folder.appendingPathComponent("model.safetensors").path).tensors
        }
        return out
    }

    @Test func indexListsSixModels() throws {
        let names = try Self.models().compactMap { $0["name"] as? String }
        #expect(names == ["llama-gqa-bf16", "qwen2-bias-sharded", "qwen3-qknorm-f16", "llama32-rope-llama3", "llama-rope-linear", "mistral-sliding-window"])
    }

    @Test(arguments: ["llama-gqa-bf16", "qwen2-bias-sharded", "qwen3-qknorm-f16", "llama32-rope-llama3", "llama-rope-linear", "mistral-sliding-window"])
    func modelFolderIsConsistent(_ name: String) throws {
        let dir = Self.root.appendingPathComponent(name)
        let cfg = try Self.json(dir.appendingPathComponent("model/config.json"))
        let cases = try Self.json(dir.appendingPathComponent("cases.json"))
        let hidden = try #require(cfg["hidden_size"] as? Int), vocab = try #require(cfg["vocab_size"] as? Int)
        let heads = try #require(cfg["num_attention_heads"] as? Int), kv = try #require(cfg["num_key_value_heads"] as? Int)
        let headDim = (cfg["head_dim"] as? Int) ?? hidden / heads
        let inter = try #require(cfg["intermediate_size"] as? Int), layers = try #require(cfg["num_hidden_layers"] as? Int)
        let tied = try #require(cfg["tie_word_embeddings"] as? Bool)
        // Both layouts: Hub (rope_theta + torch_dtype) or transformers 5 (rope_parameters + dtype).
        let hub = cfg["rope_theta"] != nil
        #expect(hub == (cases["config_layout"] as? String == "hub"))
        #expect(hub ? cfg["torch_dtype"] != nil : (cfg["dtype"] != nil && cfg["rope_parameters"] != nil))

        let w = try Self.weights(dir.appendingPathComponent("model"))
        let dtype: DType = ["float32": .f32, "float16": .f16, "bfloat16": .bf16][cases["stored_dtype"] as? String ?? ""] ?? .f32
        #expect(w.values.allSatisfy { $0.dtype == dtype })
        #expect(w["model.embed_tokens.weight"]?.shape == [vocab, hidden])
        #expect((w["lm_head.weight"] != nil) == !tied)
        var shapes: [String: [Int]] = [:]          // PEFT module name -> (out, in)
        for l in 0..<layers {
            let p = "model.layers.\(l)."
            shapes["\(l).q_proj"] = [heads * headDim, hidden]; shapes["\(l).k_proj"] = [kv * headDim, hidden]
            shapes["\(l).v_proj"] = [kv * headDim, hidden]; shapes["\(l).o_proj"] = [hidden, heads * headDim]
            shapes["\(l).gate_proj"] = [inter, hidden]; shapes["\(l).up_proj"] = [inter, hidden]
            shapes["\(l).down_proj"] = [hidden, inter]
            for (slot, shape) in shapes where slot.hasPrefix("\(l).") {
                let m = String(slot.dropFirst("\(l).".count))
                let group = ["gate_proj", "up_proj", "down_proj"].contains(m) ? "mlp" : "self_attn"
                #expect(w[p + "\(group).\(m).weight"]?.shape == shape, "\(name) \(p)\(m)")
            }
            #expect(w[p + "input_layernorm.weight"]?.shape == [hidden])
            #expect((w[p + "self_attn.q_norm.weight"]?.shape == [headDim]) == (cfg["model_type"] as? String == "qwen3"))
            #expect((w[p + "self_attn.q_proj.bias"]?.shape == [heads * headDim]) == (cfg["model_type"] as? String == "qwen2"))
        }

        // Logits: one (T, vocab) tensor per case.
        let caseList = try #require(cases["cases"] as? [[String: Any]])
        let logits = try SafeTensorsFile(path: dir.appendingPathComponent("logits.safetensors").path)
        for (i, c) in caseList.enumerated() {
            let ids = try #require(c["ids"] as? [Int])
            #expect(logits.tensors["case_\(i)"]?.shape == [ids.count, vocab])
            #expect((c["greedy"] as? [Int])?.count == cases["n_new"] as? Int)
        }

        // PEFT adapters: lora_A (r, in), lora_B (out, r) under PEFT's names; their logits as the base's.
        func adapterTensors(_ sub: String) throws -> [String: TensorInfo] {
            try SafeTensorsFile(path: dir.appendingPathComponent("peft/\(sub)/adapter_model.safetensors").path).tensors
        }
        for (sub, count) in [("lora-all7", 7), ("lora-subset", 3), ("two-level/shared", 7), ("two-level/client", 7)] {
            let acfg = try Self.json(dir.appendingPathComponent("peft/\(sub)/adapter_config.json"))
            let r = try #require(acfg["r"] as? Int)
            #expect(acfg["lora_alpha"] as? Int != r)
            let t = try adapterTensors(sub)
            #expect(t.count == 2 * count * layers)
            for (n, info) in t {
                let parts = n.split(separator: ".")          // base_model.model.model.layers.L.group.module.lora_X.weight
                let shape = try #require(shapes["\(parts[4]).\(parts[6])"], "\(n)")
                #expect(info.shape == (parts[7] == "lora_A" ? [r, shape[1]] : [shape[0], r]), "\(name) \(sub) \(n)")
            }
        }
        for sub in ["lora-all7", "lora-subset", "two-level"] {
            let l = try SafeTensorsFile(path: dir.appendingPathComponent("peft/\(sub)/logits.safetensors").path)
            #expect(l.tensors.count == caseList.count && l.tensors["case_3"]?.shape == logits.tensors["case_3"]?.shape)
        }

        // Gradients: A/B of the shared adapter, C/D of the client one, in the adapter store's names.
        let shared = try adapterTensors("two-level/shared"), client = try adapterTensors("two-level/client")
        for file in ["lora_grads", "lora_grads_f64"] {
            let g = try SafeTensorsFile(path: dir.appendingPathComponent("grads/\(file).safetensors").path).tensors
            #expect(g.count == shared.count + client.count)
            for (n, info) in shared { #expect(g[n]?.shape == info.shape) }
            for (n, info) in client {
                let renamed = n.replacingOccurrences(of: ".lora_A.", with: ".lora_C.").replacingOccurrences(of: ".lora_B.", with: ".lora_D.")
                #expect(g[renamed]?.shape == info.shape)
            }
        }
        let full = dir.appendingPathComponent("grads/full_grads.safetensors")
        if FileManager.default.fileExists(atPath: full.path) {
            let g = try SafeTensorsFile(path: full.path).tensors
            #expect(Set(g.keys) == Set(w.keys))
            for (n, info) in w { #expect(g[n]?.shape == info.shape) }
        }
    }

    /// The stored tensors decode: a BF16 / F16 / sharded F32 weight reads back finite and not all ones
    /// (norm weights are randomized so a loader that ignores them fails the logits).
    @Test func normWeightsAreRandomized() throws {
        for name in ["llama-gqa-bf16", "qwen2-bias-sharded", "qwen3-qknorm-f16"] {
            let folder = Self.root.appendingPathComponent("\(name)/model")
            let info = try #require(try Self.weights(folder)["model.layers.1.post_attention_layernorm.weight"])
            let index = folder.appendingPathComponent("model.safetensors.index.json")
            let file = FileManager.default.fileExists(atPath: index.path)
                ? try #require((try Self.json(index)["weight_map"] as? [String: String])?["model.layers.1.post_attention_layernorm.weight"])
                : "model.safetensors"
            let v = try SafeTensorsFile(path: folder.appendingPathComponent(file).path).tensor(info).array
            #expect(v.allSatisfy { $0.isFinite } && v.contains { abs($0 - 1) > 0.05 }, "\(name)")
        }
    }
}
