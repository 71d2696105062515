import Foundation

/// GPT-2 hyperparameters, decoded from a Hugging Face `config.json` with its own key spellings.
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

    enum CodingKeys: String, CodingKey {
        case vocabSize = "vocab_size", nPositions = "n_positions", nEmbd = "n_embd", nLayer = "n_layer"
        case nHead = "n_head", nInner = "n_inner", layerNormEpsilon = "layer_norm_epsilon"
        case activationFunction = "activation_function", bosTokenId = "bos_token_id"
        case eosTokenId = "eos_token_id", modelType = "model_type", nCtx = "n_ctx"
    }

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

    /// Checks the values make a GPT-2 this runtime can run.
    public func validate(file: String) throws {
        func bad(_ why: String) -> ModelError { .badConfig(file: file, why: why) }
        guard modelType == "gpt2" else { throw bad("model_type is '\(modelType)'; only gpt2 checkpoints are supported") }
        guard vocabSize > 0, nPositions > 0, nEmbd > 0, nLayer > 0, nHead > 0 else { throw bad("sizes must be positive") }
        guard nEmbd % nHead == 0 else { throw bad("n_embd \(nEmbd) is not divisible by n_head \(nHead)") }
        guard inner > 0 else { throw bad("n_inner must be positive") }
        guard ["gelu_new", "gelu_pytorch_tanh", "gelu"].contains(activationFunction) else {
            throw bad("activation_function '\(activationFunction)' is not supported (gelu_new, gelu_pytorch_tanh, gelu)")
        }
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

/// What can be wrong with a model folder; each case names the file or tensor and what to do.
public enum ModelError: Error, CustomStringConvertible {
    case missingFolder(String)
    case missingFile(String, hint: String)
    case badConfig(file: String, why: String)
    case missingTensor(file: String, tensor: String)
    case unexpectedTensor(file: String, tensor: String)
    case shapeMismatch(file: String, tensor: String, expected: [Int], found: [Int])
    case promptTooLong(tokens: Int, context: Int)
    case emptyPrompt
    case badToken(Int, vocab: Int)

    public var description: String {
        switch self {
        case let .missingFolder(p):
            return "model folder \(p) does not exist; pass a folder with config.json and model.safetensors (make one with `pf2lora model random --config tiny --out DIR`)"
        case let .missingFile(p, hint): return "\(p) is missing. \(hint)"
        case let .badConfig(f, why): return "\(f): \(why)"
        case let .missingTensor(f, t): return "\(f) has no tensor '\(t)'. Is this a GPT-2 checkpoint? Expected names like h.0.attn.c_attn.weight."
        case let .unexpectedTensor(f, t): return "\(f) has an unexpected tensor '\(t)' (not part of GPT-2); is this the right model or a different architecture?"
        case let .shapeMismatch(f, t, e, found):
            return "\(f): tensor '\(t)' has shape \(found) but config.json implies \(e); config.json and the weights do not belong together"
        case let .promptTooLong(n, ctx): return "the prompt is \(n) tokens but the model's context is \(ctx); shorten the prompt"
        case .emptyPrompt: return "the prompt is empty; give at least one token of text"
        case let .badToken(id, v): return "token id \(id) is outside the vocabulary (0..<\(v))"
        }
    }
}
