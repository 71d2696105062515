import Foundation
import Testing
@testable import PF2LoRA

/// config.json of every family into one architecture description and slot table (DESIGN §8); the
/// configs below are the published ones' keys (Hub layout) and what transformers 5.24 writes.
@Suite struct ModelRegistryTests {
    static func arch(_ json: String) throws -> ModelArchitecture {
        try ModelRegistry.architecture(config: Data(json.utf8), file: "config.json")
    }

    static func error(_ json: String) -> String {
        do { _ = try arch(json); return "" } catch { return "\(error)" }
    }

    /// Llama-3.2-1B's config.json as published (Hub layout: rope_theta, rope_scaling, torch_dtype).
    static let llama32 = """
    {"architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 128000, "eos_token_id": 128001,
     "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
     "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
     "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
     "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0, "tie_word_embeddings": true,
     "torch_dtype": "bfloat16", "vocab_size": 128256}
    """

    /// The from-scratch Llama shapes of `pretrain` (the embedded default is llama-6x256): head dim 32 (64 from
    /// 384 wide), a quarter as many KV heads, SwiGLU 8/3 wide rounded up to 64, 512 positions, vocabulary 8192.
    @Test func scratchLlamaPresets() throws {
        let a = try #require(ModelRegistry.preset("llama-6x256", vocabSize: 8192, eosTokenId: 8191))
        #expect(a.modelType == "llama" && a.layerCount == 6 && a.hiddenSize == 256 && a.headCount == 8 && a.kvHeadCount == 2)
        #expect(a.headDim == 32 && a.contextLength == 512 && a.vocabSize == 8192 && a.tiedHead && a.norm == .rmsNorm)
        #expect(a.slots.first { $0.path == "mlp.gate_proj" }?.weightShape == [704, 256])
        // 8192 x 256 tied embeddings + 6 x (attention 2 x 256^2 + 2 x 256 x 64, SwiGLU 3 x 256 x 704, 2 norms) + final norm
        #expect(a.parameterCount == 8192 * 256 + 6 * (2 * 256 * 256 + 2 * 256 * 64 + 3 * 256 * 704 + 2 * 256) + 256)
        let wide = try #require(ModelRegistry.preset("llama-4x384"))
        #expect(wide.headDim == 64 && wide.headCount == 6 && wide.kvHeadCount == 1 && wide.vocabSize == 8192)
        let small = try #require(ModelRegistry.preset("small-llama"))
        #expect(small.layerCount == 4 && small.hiddenSize == 256)
        for bad in ["llama-6x250", "llama-0x256", "llama-6x", "llama-x256", "llama-6x256x2", "llama-65x256", "llama-6x16"] {
            #expect(ModelRegistry.preset(bad) == nil, "\(bad)")
        }
    }

    @Test func gpt2SlotTableAndNames() throws {
        let a = try Self.arch(#"{"model_type": "gpt2", "vocab_size": 50, "n_positions": 32, "n_embd": 16, "n_layer": 2, "n_head": 4}"#)
        #expect(a.slots.map(\.path) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
        #expect(a.slots.map(\.peftName) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
        #expect(a.slots.map(\.weightShape) == [[16, 48], [16, 16], [16, 64], [64, 16]])
        #expect(a.slots.allSatisfy { $0.layout == .conv1D && $0.hasBias })
        #expect(a.norm == .layerNorm && a.positions == .learned && a.mlp == .gelu && a.tiedHead)
        #expect(a.modulePath(layer: 1, slot: 2) == "transformer.h.1.mlp.c_fc")
        #expect(a.parseModulePath("h.1.mlp.c_fc")! == (1, 2))   // bare GPT2Model names
        #expect(a.parseModulePath("transformer.h.2.mlp.c_fc") == nil)   // past the last layer
        #expect(a.linears.count == 8)
        // The parameter order of a GPT-2 checkpoint (what pretraining's optimizer state is keyed by).
        #expect(a.tensors.prefix(6).map(\.name) == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                                                    "transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"])
        // config.json written back decodes to the same architecture.
        #expect(try ModelRegistry.architecture(config: a.configJSON(), file: "x") == a)
    }

    @Test func llama32HubLayout() throws {
        let a = try Self.arch(Self.llama32)
        #expect(a.modelType == "llama" && a.norm == .rmsNorm && a.mlp == .swiglu && a.tiedHead && !a.qkNorm)
        #expect(a.headCount == 32 && a.kvHeadCount == 8 && a.headDim == 64 && a.hiddenSize == 2048)
        #expect(a.positions == .rope(theta: 500000, scaling: .llama3(factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalContext: 8192)))
        #expect(a.normEps == 1e-5 && a.contextLength == 131072 && a.eosTokenIds == [128001] && a.storedDType == "bfloat16")
        #expect(a.slots.map(\.peftName) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        #expect(a.slots.map(\.weightShape) == [[2048, 2048], [512, 2048], [512, 2048], [2048, 2048], [8192, 2048], [8192, 2048], [2048, 8192]])
        #expect(a.slots.allSatisfy { $0.layout == .linear && !$0.hasBias })
        #expect(a.modulePath(layer: 3, slot: 0) == "model.layers.3.self_attn.q_proj")
        #expect(a.parseModulePath("model.layers.15.mlp.down_proj")! == (15, 6))
        #expect(a.parseModulePath("transformer.h.0.attn.c_attn") == nil)
        // 1.24B parameters with the tied head (the published count).
        #expect(a.parameterCount == 1_235_814_400)
        #expect(try ModelRegistry.architecture(config: a.configJSON(), file: "x") == a)
    }

    /// transformers 5 writes rope_parameters (holding rope_theta) and dtype.
    @Test func transformers5Layout() throws {
        let a = try Self.arch("""
        {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
         "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}, "dtype": "float32",
         "eos_token_id": [1, 2], "tie_word_embeddings": false}
        """)
        #expect(a.positions == .rope(theta: 1000, scaling: .linear(factor: 2)))
        #expect(a.storedDType == "float32" && a.eosTokenIds == [1, 2] && !a.tiedHead && a.headDim == 16)
        #expect(a.tensors.last!.name == "lm_head.weight")
    }

    @Test func qwenVariants() throws {
        let qwen2 = try Self.arch("""
        {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
         "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
         "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": false, "tie_word_embeddings": true,
         "torch_dtype": "bfloat16", "eos_token_id": 151643}
        """)
        // Qwen2: q, k, v with biases, o_proj without (fixed in transformers' Qwen2Attention).
        #expect(qwen2.slots.prefix(4).map(\.hasBias) == [true, true, true, false])
        #expect(qwen2.tensors.contains { $0.name == "model.layers.0.self_attn.k_proj.bias" && $0.shape == [128] })
        #expect(qwen2.parameterCount == 494_032_768)   // Qwen2.5-0.5B
        let qwen3 = try Self.arch("""
        {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
         "rms_norm_eps": 1e-06, "rope_theta": 1000000, "attention_bias": false, "tie_word_embeddings": true}
        """)
        // Qwen3: heads x head_dim (2048) != hidden (1024), per-head q/k norms.
        #expect(qwen3.qkNorm && qwen3.qWidth == 2048 && qwen3.slots[0].weightShape == [2048, 1024])
        #expect(qwen3.tensors.contains { $0.name == "model.layers.0.self_attn.q_norm.weight" && $0.shape == [128] })
        #expect(qwen3.parameterCount == 596_049_920)   // Qwen3-0.6B
    }

    @Test func slidingWindowCapsTheContext() throws {
        let a = try Self.arch("""
        {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 32768, "sliding_window": 4096}
        """)
        #expect(a.contextLength == 4096)
    }

    @Test func badConfigsSayWhatIsWrong() {
        #expect(Self.error(#"{"model_type": "falcon"}"#).contains("model_type 'falcon' is not supported; supported are gpt2, llama, mistral, qwen2, qwen3"))
        #expect(Self.error(#"{"hidden_size": 4}"#).contains("has no model_type"))
        #expect(Self.error("{").contains("invalid JSON"))
        let yarn = Self.llama32.replacingOccurrences(of: "\"rope_type\": \"llama3\"", with: "\"rope_type\": \"yarn\"")
        #expect(Self.error(yarn).contains("rope scaling type 'yarn' is not supported; supported are default, linear and llama3"))
        let gqa = Self.llama32.replacingOccurrences(of: "\"num_key_value_heads\": 8", with: "\"num_key_value_heads\": 5")
        #expect(Self.error(gqa).contains("not a multiple of num_key_value_heads 5"))
        let act = Self.llama32.replacingOccurrences(of: "\"silu\"", with: "\"gelu\"")
        #expect(Self.error(act).contains("hidden_act 'gelu' is not supported"))
        #expect(Self.error(#"{"model_type": "llama", "vocab_size": 3}"#).contains("not a llama config (missing key"))
    }

    @Test func folderReadsGenerationConfigEOS() throws {
        let dir = TestPaths.tempDir("arch")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data(Self.llama32.utf8).write(to: URL(fileURLWithPath: dir + "/config.json"))
        try Data(#"{"eos_token_id": [128001, 128008, 128009]}"#.utf8).write(to: URL(fileURLWithPath: dir + "/generation_config.json"))
        #expect(try ModelRegistry.architecture(folder: dir).eosTokenIds == [128001, 128008, 128009])
        try Data(#"{"eos_token_id": "x"}"#.utf8).write(to: URL(fileURLWithPath: dir + "/generation_config.json"))
        #expect(throws: ModelError.self) { try ModelRegistry.architecture(folder: dir) }
    }

    /// The store's base info comes from the registry for any family, with the family's module paths.
    @Test func baseInfoOfALlamaFolder() throws {
        let dir = TestPaths.tempDir("arch")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data(Self.llama32.utf8).write(to: URL(fileURLWithPath: dir + "/config.json"))
        try SafeTensorsWriter.serialize(["x": Tensor(zeros: [2])]).write(to: URL(fileURLWithPath: dir + "/model.safetensors"))
        let b = try BaseModelInfo.load(folder: dir)
        #expect(b.linears.count == 16 * 7)
        #expect(b.linears["model.layers.0.self_attn.k_proj"]! == (2048, 512))
        #expect(PEFT.targetModules(Array(b.linears.keys), base: b) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
        #expect(moduleKind("model.layers.3.self_attn.q_proj") == "self_attn.q_proj")
    }
}
