import Foundation

/// GPT-2 hyperparameters, decoded from a Hugging Face `config.json` with its own key spellings: the
/// `gpt2` family. Its block: LayerNorm, learned positions, c_attn (q, k, v in one Conv1D), attn.c_proj,
/// and a GELU MLP (c_fc, mlp.c_proj), every linear with a bias, the head tied to the embeddings.
public struct GPT2Config: Codable, Equatable, Sendable {
    public var vocabSize: Int
    public var nPositions: Int
    public var nEmbd: Int
    public var nLayer: Int
    public var nHead: Int
    public var nInner: Int?
    public var layerNormEpsilon: Float
    public var activationFunction: String
    public var bosTokenId: Int?
    public var eosTokenId: Int?
    public var modelType: String
    /// llama.cpp's converter reads n_ctx, which transformers 5 no longer writes; we write both.
    public var nCtx: Int?
    /// `torch_dtype` (checkpoints on the Hub) or `dtype` (transformers 5); read, not written.
    public var storedDType: String? = nil

    enum CodingKeys: String, CodingKey {
        case vocabSize = "vocab_size", nPositions = "n_positions", nEmbd = "n_embd", nLayer = "n_layer"
        case nHead = "n_head", nInner = "n_inner", layerNormEpsilon = "layer_norm_epsilon"
        case activationFunction = "activation_function", bosTokenId = "bos_token_id"
        case eosTokenId = "eos_token_id", modelType = "model_type", nCtx = "n_ctx"
    }

    enum DTypeKeys: String, CodingKey { case torchDType = "torch_dtype", dtype }

    public init(vocabSize: Int, nPositions: Int, nEmbd: Int, nLayer: Int, nHead: Int, nInner: Int? = nil,
                layerNormEpsilon: Float = 1e-5, eosTokenId: Int? = nil) {
        self.vocabSize = vocabSize; self.nPositions = nPositions; self.nEmbd = nEmbd; self.nLayer = nLayer
        self.nHead = nHead; self.nInner = nInner; self.layerNormEpsilon = layerNormEpsilon
        self.activationFunction = "gelu_new"; self.bosTokenId = eosTokenId; self.eosTokenId = eosTokenId
        self.modelType = "gpt2"; self.nCtx = nPositions
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        vocabSize = try c.decode(Int.self, forKey: .vocabSize)
        nCtx = try c.decodeIfPresent(Int.self, forKey: .nCtx)
        nPositions = try c.decodeIfPresent(Int.self, forKey: .nPositions) ?? nCtx ?? 1024
        nEmbd = try c.decode(Int.self, forKey: .nEmbd)
        nLayer = try c.decode(Int.self, forKey: .nLayer)
        nHead = try c.decode(Int.self, forKey: .nHead)
        nInner = try c.decodeIfPresent(Int.self, forKey: .nInner)
        layerNormEpsilon = try c.decodeIfPresent(Float.self, forKey: .layerNormEpsilon) ?? 1e-5
        activationFunction = try c.decodeIfPresent(String.self, forKey: .activationFunction) ?? "gelu_new"
        bosTokenId = try c.decodeIfPresent(Int.self, forKey: .bosTokenId)
        eosTokenId = try c.decodeIfPresent(Int.self, forKey: .eosTokenId)
        modelType = try c.decodeIfPresent(String.self, forKey: .modelType) ?? "gpt2"
        let d = try decoder.container(keyedBy: DTypeKeys.self)
        storedDType = (try? d.decodeIfPresent(String.self, forKey: .dtype)) ?? (try? d.decodeIfPresent(String.self, forKey: .torchDType)) ?? nil
    }

    /// The MLP's hidden width (n_inner, or 4 * n_embd when unset).
    public var inner: Int { nInner ?? 4 * nEmbd }
    public var headSize: Int { nEmbd / nHead }

    /// Presets for `pf2lora model random`: the real GPT-2 shapes, plus a tiny one for tests.
    public static func preset(_ name: String, vocabSize: Int = 50257) -> GPT2Config? {
        let eos = vocabSize - 1   // GPT-2 tokenizers put <|endoftext|> last
        switch name {
        case "gpt2": return GPT2Config(vocabSize: vocabSize, nPositions: 1024, nEmbd: 768, nLayer: 12, nHead: 12, eosTokenId: eos)
        case "gpt2-medium": return GPT2Config(vocabSize: vocabSize, nPositions: 1024, nEmbd: 1024, nLayer: 24, nHead: 16, eosTokenId: eos)
        case "distilgpt2": return GPT2Config(vocabSize: vocabSize, nPositions: 1024, nEmbd: 768, nLayer: 6, nHead: 12, eosTokenId: eos)
        case "tiny": return GPT2Config(vocabSize: vocabSize, nPositions: 256, nEmbd: 64, nLayer: 2, nHead: 4, eosTokenId: eos)
        case "small": return GPT2Config(vocabSize: vocabSize, nPositions: 256, nEmbd: 256, nLayer: 4, nHead: 4, eosTokenId: eos)
        default: return nil
        }
    }

    /// The preset names, for help texts and errors.
    public static let presetNames = ["gpt2", "gpt2-medium", "distilgpt2", "small", "tiny"]

    /// Checks the values make a GPT-2 this runtime can run.
    public func validate(file: String) throws {
        func bad(_ why: String) -> ModelError { .badConfig(file: file, why: why) }
        guard vocabSize > 0, nPositions > 0, nEmbd > 0, nLayer > 0, nHead > 0 else { throw bad("sizes must be positive") }
        guard nEmbd % nHead == 0 else { throw bad("n_embd \(nEmbd) is not divisible by n_head \(nHead)") }
        guard inner > 0 else { throw bad("n_inner must be positive") }
        guard ["gelu_new", "gelu_pytorch_tanh", "gelu"].contains(activationFunction) else {
            throw bad("activation_function '\(activationFunction)' is not supported (gelu_new, gelu_pytorch_tanh, gelu)")
        }
    }

    /// The architecture: LayerNorm, learned positions, GELU MLP, and GPT-2's four Conv1D slots
    /// c_attn (C -> 3C), attn.c_proj (C -> C), mlp.c_fc (C -> I), mlp.c_proj (I -> C), all with biases.
    public var architecture: ModelArchitecture {
        let C = nEmbd, I = inner
        func slot(_ i: Int, _ role: SlotRole, _ path: String, _ din: Int, _ dout: Int) -> LinearSlot {
            LinearSlot(index: i, role: role, path: path, peftName: path, inFeatures: din, outFeatures: dout, layout: .conv1D, hasBias: true)
        }
        return ModelArchitecture(
            modelType: "gpt2", vocabSize: vocabSize, hiddenSize: C, layerCount: nLayer, headCount: nHead, kvHeadCount: nHead,
            headDim: C / max(nHead, 1), intermediateSize: I, contextLength: nPositions, norm: .layerNorm, normEps: layerNormEpsilon,
            positions: .learned, mlp: .gelu, qkNorm: false, tiedHead: true, bosTokenId: bosTokenId,
            eosTokenIds: eosTokenId.map { [$0] } ?? [], storedDType: storedDType, scaledResidualInit: true,
            slots: [slot(0, .qkv, "attn.c_attn", C, 3 * C), slot(1, .attnOut, "attn.c_proj", C, C),
                    slot(2, .up, "mlp.c_fc", C, I), slot(3, .down, "mlp.c_proj", I, C)],
            names: TensorNames(embed: "transformer.wte.weight", positions: "transformer.wpe.weight", finalNorm: "transformer.ln_f",
                               lmHead: "lm_head.weight", layerPrefix: "transformer.h.", attnNorm: "ln_1", mlpNorm: "ln_2",
                               optionalPrefix: "transformer.", ignoredSuffixes: [".attn.bias", ".attn.masked_bias"]))
    }

    /// The config of a GPT-2 architecture (the inverse of `architecture`).
    init(_ a: ModelArchitecture) {
        self.init(vocabSize: a.vocabSize, nPositions: a.contextLength, nEmbd: a.hiddenSize, nLayer: a.layerCount, nHead: a.headCount,
                  nInner: a.intermediateSize == 4 * a.hiddenSize ? nil : a.intermediateSize, layerNormEpsilon: a.normEps,
                  eosTokenId: a.eosTokenIds.first)
        bosTokenId = a.bosTokenId
    }

    public func jsonData() throws -> Data {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        var dict = try JSONSerialization.jsonObject(with: enc.encode(self)) as! [String: Any]
        dict["architectures"] = ["GPT2LMHeadModel"]
        dict["tie_word_embeddings"] = true
        dict["initializer_range"] = 0.02
        return try JSONSerialization.data(withJSONObject: dict, options: [.prettyPrinted, .sortedKeys])
    }
}

extension GPT2Config: ModelFamily {
    static var modelTypes: [String] { ["gpt2"] }

    static func architecture(config: Data, modelType: String, file: String) throws -> ModelArchitecture {
        let c: GPT2Config
        do { c = try JSONDecoder().decode(GPT2Config.self, from: config) } catch {
            throw ModelError.badConfig(file: file, why: "not a GPT-2 config (\(ModelRegistry.describe(error)))")
        }
        try c.validate(file: file)
        return c.architecture
    }

    static func configJSON(_ a: ModelArchitecture) throws -> Data { try GPT2Config(a).jsonData() }
}
