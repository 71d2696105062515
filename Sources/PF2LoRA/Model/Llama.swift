import Foundation

/// A Llama-family config.json (`llama`, `mistral`, `qwen2`, `qwen3`), decoded with Hugging Face's key
/// spellings. Both layouts are read: checkpoints on the Hub write `rope_theta`, `rope_scaling` and
/// `torch_dtype`; transformers 5 writes `rope_parameters` and `dtype`.
///
/// The block: RMSNorm; rotary positions; q_proj, k_proj, v_proj, o_proj (grouped-query attention
/// when num_key_value_heads < num_attention_heads); a SwiGLU MLP gate_proj, up_proj, down_proj; all
/// in `nn.Linear` layout (out, in). The variants differ only in `LlamaVariant`.
public struct LlamaConfig: Codable, Equatable, Sendable {
    public var modelType: String
    public var vocabSize: Int
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var numHiddenLayers: Int
    public var numAttentionHeads: Int
    public var numKeyValueHeads: Int?
    public var headDim: Int?
    public var hiddenAct: String?
    public var maxPositionEmbeddings: Int
    public var rmsNormEps: Float?
    public var ropeTheta: Double?
    public var ropeScaling: RoPEParameters?
    public var ropeParameters: RoPEParameters?
    public var tieWordEmbeddings: Bool?
    public var attentionBias: Bool?
    public var mlpBias: Bool?
    public var bosTokenId: Int?
    var eosTokenId: TokenIDList?
    public var torchDType: String?
    public var dtype: String?
    public var slidingWindow: Int?
    public var useSlidingWindow: Bool?
    public var layerTypes: [String]?

    enum CodingKeys: String, CodingKey {
        case modelType = "model_type", vocabSize = "vocab_size", hiddenSize = "hidden_size"
        case intermediateSize = "intermediate_size", numHiddenLayers = "num_hidden_layers"
        case numAttentionHeads = "num_attention_heads", numKeyValueHeads = "num_key_value_heads", headDim = "head_dim"
        case hiddenAct = "hidden_act", maxPositionEmbeddings = "max_position_embeddings", rmsNormEps = "rms_norm_eps"
        case ropeTheta = "rope_theta", ropeScaling = "rope_scaling", ropeParameters = "rope_parameters"
        case tieWordEmbeddings = "tie_word_embeddings", attentionBias = "attention_bias", mlpBias = "mlp_bias"
        case bosTokenId = "bos_token_id", eosTokenId = "eos_token_id", torchDType = "torch_dtype", dtype
        case slidingWindow = "sliding_window", useSlidingWindow = "use_sliding_window", layerTypes = "layer_types"
    }

    /// `rope_scaling` (Hub layout) or `rope_parameters` (transformers 5, which also holds `rope_theta`).
    public struct RoPEParameters: Codable, Equatable, Sendable {
        public var ropeType: String?
        /// The legacy spelling of `rope_type`.
        public var type: String?
        public var ropeTheta: Double?
        public var factor: Double?
        public var lowFreqFactor: Double?
        public var highFreqFactor: Double?
        public var originalMaxPositionEmbeddings: Int?

        enum CodingKeys: String, CodingKey {
            case ropeType = "rope_type", type, ropeTheta = "rope_theta", factor, lowFreqFactor = "low_freq_factor"
            case highFreqFactor = "high_freq_factor", originalMaxPositionEmbeddings = "original_max_position_embeddings"
        }

        public init(ropeType: String? = nil, ropeTheta: Double? = nil, factor: Double? = nil, lowFreqFactor: Double? = nil,
                    highFreqFactor: Double? = nil, originalMaxPositionEmbeddings: Int? = nil) {
            self.ropeType = ropeType; self.ropeTheta = ropeTheta; self.factor = factor; self.lowFreqFactor = lowFreqFactor
            self.highFreqFactor = highFreqFactor; self.originalMaxPositionEmbeddings = originalMaxPositionEmbeddings
        }
    }

    public init(modelType: String, vocabSize: Int, hiddenSize: Int, intermediateSize: Int, numHiddenLayers: Int,
                numAttentionHeads: Int, numKeyValueHeads: Int, headDim: Int? = nil, maxPositionEmbeddings: Int,
                rmsNormEps: Float, ropeTheta: Double, ropeScaling: RoPEParameters? = nil, tieWordEmbeddings: Bool,
                attentionBias: Bool? = nil, bosTokenId: Int? = nil, eosTokenIds: [Int] = []) {
        self.modelType = modelType; self.vocabSize = vocabSize; self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize; self.numHiddenLayers = numHiddenLayers
        self.numAttentionHeads = numAttentionHeads; self.numKeyValueHeads = numKeyValueHeads; self.headDim = headDim
        self.hiddenAct = "silu"; self.maxPositionEmbeddings = maxPositionEmbeddings; self.rmsNormEps = rmsNormEps
        self.ropeTheta = ropeTheta; self.ropeScaling = ropeScaling; self.tieWordEmbeddings = tieWordEmbeddings
        self.attentionBias = attentionBias; self.bosTokenId = bosTokenId
        self.eosTokenId = eosTokenIds.isEmpty ? nil : TokenIDList(eosTokenIds)
    }

    /// Presets for `pf2lora model random`: the published shapes (random weights), plus a tiny one for
    /// tests. `vocabSize` nil keeps the published vocabulary.
    public static func preset(_ name: String, vocabSize: Int? = nil) -> LlamaConfig? {
        func make(_ type: String, _ v: Int, _ C: Int, _ I: Int, _ L: Int, _ H: Int, _ KV: Int, headDim: Int? = nil, ctx: Int,
                  eps: Float, theta: Double, scaling: RoPEParameters? = nil) -> LlamaConfig {
            LlamaConfig(modelType: type, vocabSize: vocabSize ?? v, hiddenSize: C, intermediateSize: I, numHiddenLayers: L,
                        numAttentionHeads: H, numKeyValueHeads: KV, headDim: headDim, maxPositionEmbeddings: ctx, rmsNormEps: eps,
                        ropeTheta: theta, ropeScaling: scaling, tieWordEmbeddings: true, attentionBias: type == "qwen2" ? nil : false)
        }
        switch name {
        case "smollm2-135m": return make("llama", 49152, 576, 1536, 30, 9, 3, ctx: 8192, eps: 1e-5, theta: 100000)
        case "smollm2-360m": return make("llama", 49152, 960, 2560, 32, 15, 5, ctx: 8192, eps: 1e-5, theta: 100000)
        case "qwen2.5-0.5b": return make("qwen2", 151936, 896, 4864, 24, 14, 2, ctx: 32768, eps: 1e-6, theta: 1000000)
        case "qwen3-0.6b": return make("qwen3", 151936, 1024, 3072, 28, 16, 8, headDim: 128, ctx: 40960, eps: 1e-6, theta: 1000000)
        case "llama3.2-1b":
            return make("llama", 128256, 2048, 8192, 16, 32, 8, headDim: 64, ctx: 131072, eps: 1e-5, theta: 500000,
                        scaling: RoPEParameters(ropeType: "llama3", factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192))
        case "tiny-llama": return make("llama", 512, 64, 128, 2, 4, 2, ctx: 256, eps: 1e-5, theta: 10000)
        case "small-llama": return scratch(layers: 4, hidden: 256)
        default:
            // "llama-<layers>x<hidden>": a from-scratch shape (see `scratch`), e.g. llama-6x256.
            guard name.hasPrefix("llama-") else { return nil }
            let dims = name.dropFirst("llama-".count).split(separator: "x", omittingEmptySubsequences: false)
            guard dims.count == 2, let L = Int(dims[0]), let C = Int(dims[1]), (1...64).contains(L), C >= 32, C <= 4096, C % 32 == 0
            else { return nil }
            return scratch(layers: L, hidden: C)
        }
        /// A small shape for pretraining from scratch (the embedded default): head dimension 32 (64 from 384
        /// wide), grouped-query attention with a quarter as many key/value heads, SwiGLU about 8/3 wide
        /// (a multiple of 64), 512 positions, RoPE theta 10000, tied embeddings; vocabulary 8192 unless given.
        func scratch(layers L: Int, hidden C: Int) -> LlamaConfig {
            let headDim = C >= 384 && C % 64 == 0 ? 64 : 32
            let heads = C / headDim, kv = max(1, heads / 4)
            let inter = (8 * C / 3 + 63) / 64 * 64
            return make("llama", 8192, C, inter, L, heads, heads % kv == 0 ? kv : 1, ctx: 512, eps: 1e-5, theta: 10000)
        }
    }

    /// The preset names, for help texts and errors.
    public static let presetNames = ["smollm2-135m", "smollm2-360m", "qwen2.5-0.5b", "qwen3-0.6b", "llama3.2-1b", "tiny-llama", "small-llama", "llama-<L>x<C>"]

    /// The end-of-sequence ids (one or a list in config.json).
    public var eosTokenIds: [Int] { eosTokenId?.ids ?? [] }

    /// What differs between the family's model types.
    struct Variant {
        /// q, k, v biases (o_proj follows `outputBias`).
        var qkvBias: Bool
        var outputBias: Bool
        var qkNorm: Bool
    }

    func variant() -> Variant {
        let ab = attentionBias ?? false
        switch modelType {
        case "qwen2": return Variant(qkvBias: true, outputBias: false, qkNorm: false)   // fixed in Qwen2Attention
        case "qwen3": return Variant(qkvBias: ab, outputBias: ab, qkNorm: true)
        case "mistral": return Variant(qkvBias: false, outputBias: false, qkNorm: false)
        default: return Variant(qkvBias: ab, outputBias: ab, qkNorm: false)             // llama
        }
    }

    /// The rotary embedding: theta and scaling from either layout; an unsupported scaling type is refused by name.
    func rope(file: String) throws -> ModelArchitecture.Positions {
        let params = ropeParameters ?? ropeScaling
        let theta = ropeParameters?.ropeTheta ?? ropeTheta ?? ropeScaling?.ropeTheta ?? 10000
        guard theta > 0, theta.isFinite else { throw ModelError.badConfig(file: file, why: "rope_theta \(theta) must be a positive number") }
        let type = params?.ropeType ?? params?.type ?? "default"
        func need<T>(_ v: T?, _ key: String) throws -> T {
            guard let v else { throw ModelError.badConfig(file: file, why: "rope_type \(FileText.kind(type, quoted: true)) needs '\(key)'") }
            return v
        }
        switch type {
        case "default":
            return .rope(theta: theta, scaling: nil)
        case "linear":
            let f = try need(params?.factor, "factor")
            guard f > 0 else { throw ModelError.badConfig(file: file, why: "rope factor \(f) must be positive") }
            return .rope(theta: theta, scaling: .linear(factor: f))
        case "llama3":
            let f = try need(params?.factor, "factor"), lo = try need(params?.lowFreqFactor, "low_freq_factor")
            let hi = try need(params?.highFreqFactor, "high_freq_factor")
            let orig = try need(params?.originalMaxPositionEmbeddings, "original_max_position_embeddings")
            guard f > 0, lo > 0, hi > lo, orig > 0 else {
                throw ModelError.badConfig(file: file, why: "llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0")
            }
            return .rope(theta: theta, scaling: .llama3(factor: f, lowFreqFactor: lo, highFreqFactor: hi, originalContext: orig))
        default:
            throw ModelError.badConfig(file: file, why: "rope scaling type \(FileText.kind(type, quoted: true)) is not supported; supported are default, linear and llama3")
        }
    }

    /// The longest sequence run: max_position_embeddings, or the sliding window when one is in effect
    /// (within the window, sliding-window attention is full causal attention, so capping is exact).
    var contextLength: Int {
        let sliding = (modelType == "mistral" && slidingWindow != nil) || useSlidingWindow == true
            || (layerTypes ?? []).contains("sliding_attention")
        if sliding, let w = slidingWindow, w > 0 { return min(maxPositionEmbeddings, w) }
        return maxPositionEmbeddings
    }

    public func architecture(file: String) throws -> ModelArchitecture {
        func bad(_ why: String) -> ModelError { .badConfig(file: file, why: why) }
        let act = hiddenAct ?? "silu"
        guard act == "silu" || act == "swish" else { throw bad("hidden_act '\(act)' is not supported; the Llama family's MLP is SwiGLU (silu)") }
        guard numAttentionHeads > 0, hiddenSize > 0 else { throw bad("hidden_size and num_attention_heads must be positive") }
        guard headDim != nil || hiddenSize % numAttentionHeads == 0 else {
            throw bad("hidden_size \(hiddenSize) is not divisible by num_attention_heads \(numAttentionHeads) and there is no head_dim")
        }
        let v = variant()
        let H = numAttentionHeads, KV = numKeyValueHeads ?? H, hd = headDim ?? hiddenSize / H
        let C = hiddenSize, I = intermediateSize
        let mlpB = mlpBias ?? false
        func slot(_ i: Int, _ role: SlotRole, _ path: String, _ din: Int, _ dout: Int, _ bias: Bool) -> LinearSlot {
            LinearSlot(index: i, role: role, path: path, peftName: String(path.split(separator: ".").last!),
                       inFeatures: din, outFeatures: dout, layout: .linear, hasBias: bias)
        }
        return ModelArchitecture(
            modelType: modelType, vocabSize: vocabSize, hiddenSize: C, layerCount: numHiddenLayers, headCount: H,
            kvHeadCount: KV, headDim: hd, intermediateSize: I, contextLength: contextLength, norm: .rmsNorm,
            normEps: rmsNormEps ?? 1e-6, positions: try rope(file: file), mlp: .swiglu, qkNorm: v.qkNorm,
            tiedHead: tieWordEmbeddings ?? false, bosTokenId: bosTokenId, eosTokenIds: eosTokenIds,
            storedDType: dtype ?? torchDType, scaledResidualInit: false,
            slots: [slot(0, .q, "self_attn.q_proj", C, H * hd, v.qkvBias), slot(1, .k, "self_attn.k_proj", C, KV * hd, v.qkvBias),
                    slot(2, .v, "self_attn.v_proj", C, KV * hd, v.qkvBias), slot(3, .attnOut, "self_attn.o_proj", H * hd, C, v.outputBias),
                    slot(4, .gate, "mlp.gate_proj", C, I, mlpB), slot(5, .up, "mlp.up_proj", C, I, mlpB),
                    slot(6, .down, "mlp.down_proj", I, C, mlpB)],
            names: TensorNames(embed: "model.embed_tokens.weight", positions: nil, finalNorm: "model.norm", lmHead: "lm_head.weight",
                               layerPrefix: "model.layers.", attnNorm: "input_layernorm", mlpNorm: "post_attention_layernorm",
                               ignoredSuffixes: [".rotary_emb.inv_freq"]))
    }

    /// The config of a Llama-family architecture, in the Hub layout (`rope_theta`, `rope_scaling`,
    /// `torch_dtype`), which both transformers 4 and 5 and llama.cpp's converter read.
    init(_ a: ModelArchitecture) {
        var theta = 10000.0
        var scaling: RoPEParameters?
        if case let .rope(t, s) = a.positions {
            theta = t
            switch s {
            case let .linear(f)?: scaling = RoPEParameters(ropeType: "linear", factor: f)
            case let .llama3(f, lo, hi, orig)?:
                scaling = RoPEParameters(ropeType: "llama3", factor: f, lowFreqFactor: lo, highFreqFactor: hi, originalMaxPositionEmbeddings: orig)
            case nil: scaling = nil
            }
        }
        let q = a.slots.first { $0.role == .q }
        let o = a.slots.first { $0.role == .attnOut }
        self.init(modelType: a.modelType, vocabSize: a.vocabSize, hiddenSize: a.hiddenSize, intermediateSize: a.intermediateSize,
                  numHiddenLayers: a.layerCount, numAttentionHeads: a.headCount, numKeyValueHeads: a.kvHeadCount,
                  headDim: a.headDim, maxPositionEmbeddings: a.contextLength, rmsNormEps: a.normEps, ropeTheta: theta,
                  ropeScaling: scaling, tieWordEmbeddings: a.tiedHead,
                  attentionBias: a.modelType == "qwen2" ? nil : ((q?.hasBias ?? false) || (o?.hasBias ?? false)),
                  bosTokenId: a.bosTokenId, eosTokenIds: a.eosTokenIds)
        mlpBias = a.slots.first { $0.role == .down }?.hasBias
        torchDType = a.storedDType
    }

    public func jsonData() throws -> Data {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        var dict = try JSONSerialization.jsonObject(with: enc.encode(self)) as! [String: Any]
        let arch: String
        switch modelType {
        case "qwen2": arch = "Qwen2ForCausalLM"
        case "qwen3": arch = "Qwen3ForCausalLM"
        case "mistral": arch = "MistralForCausalLM"
        default: arch = "LlamaForCausalLM"
        }
        dict["architectures"] = [arch]
        dict["initializer_range"] = 0.02
        if dict["rope_scaling"] == nil { dict["rope_scaling"] = NSNull() }
        return try JSONSerialization.data(withJSONObject: dict, options: [.prettyPrinted, .sortedKeys])
    }
}

extension LlamaConfig: ModelFamily {
    static var modelTypes: [String] { ["llama", "mistral", "qwen2", "qwen3"] }

    static func architecture(config: Data, modelType: String, file: String) throws -> ModelArchitecture {
        let c: LlamaConfig
        do { c = try JSONDecoder().decode(LlamaConfig.self, from: config) } catch {
            throw ModelError.badConfig(file: file, why: "not a \(modelType) config (\(ModelRegistry.describe(error)))")
        }
        return try c.architecture(file: file)
    }

    static func configJSON(_ a: ModelArchitecture) throws -> Data { try LlamaConfig(a).jsonData() }
}
