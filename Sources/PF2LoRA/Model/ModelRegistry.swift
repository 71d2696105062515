import Foundation

/// A model family: its config.json, decoded with the keys Hugging Face uses, becomes a
/// `ModelArchitecture`; an architecture of the family is written back as config.json.
/// Adding a family is one file with one type conforming to this, listed in `ModelRegistry.families`.
protocol ModelFamily: Sendable {
    /// The `model_type` values this family reads.
    static var modelTypes: [String] { get }
    /// Decodes config.json (`file` names it in errors) into a validated architecture.
    static func architecture(config: Data, modelType: String, file: String) throws -> ModelArchitecture
    /// config.json for an architecture of this family.
    static func configJSON(_ a: ModelArchitecture) throws -> Data
}

/// The model families by config.json's `model_type` (as mlx-swift-lm's model factory): the one place
/// that knows which families exist.
public enum ModelRegistry {
    static let families: [any ModelFamily.Type] = [GPT2Config.self, LlamaConfig.self]

    /// Every supported `model_type`, sorted.
    public static var supportedModelTypes: [String] { families.flatMap { $0.modelTypes }.sorted() }

    static func family(modelType: String) -> (any ModelFamily.Type)? {
        families.first { $0.modelTypes.contains(modelType) }
    }

    static func family(of a: ModelArchitecture) throws -> any ModelFamily.Type {
        guard let f = family(modelType: a.modelType) else { throw ModelError.unsupportedModelType(file: "architecture", modelType: a.modelType) }
        return f
    }

    /// The `pf2lora model random` presets of every family, GPT-2's first.
    public static var presetNames: [String] { GPT2Config.presetNames + LlamaConfig.presetNames }

    /// A preset's architecture with `vocabSize` tokens (nil: the published vocabulary; GPT-2: 50257)
    /// and the given end-of-sequence id.
    public static func preset(_ name: String, vocabSize: Int? = nil, eosTokenId: Int? = nil) -> ModelArchitecture? {
        if var g = GPT2Config.preset(name, vocabSize: vocabSize ?? 50257) {
            if let e = eosTokenId { g.eosTokenId = e; g.bosTokenId = e }
            return g.architecture
        }
        if var l = LlamaConfig.preset(name, vocabSize: vocabSize) {
            if let e = eosTokenId { l.eosTokenId = TokenIDList([e]); l.bosTokenId = e }
            return try? l.architecture(file: "preset")
        }
        return nil
    }

    /// The published vocabulary of a preset (GPT-2's 50257 for the GPT-2 shapes).
    public static func presetVocabSize(_ name: String) -> Int? {
        if GPT2Config.preset(name) != nil { return 50257 }
        return LlamaConfig.preset(name)?.vocabSize
    }

    /// The architecture of config.json's bytes; `file` names it in errors.
    public static func architecture(config data: Data, file: String) throws -> ModelArchitecture {
        guard let json = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw ModelError.badConfig(file: file, why: "is not a JSON object (invalid JSON); restore the model's config.json")
        }
        let modelType: String
        if let t = json["model_type"] as? String {
            modelType = t
        } else if json["n_embd"] != nil {
            modelType = "gpt2"   // early GPT-2 configs carry no model_type
        } else {
            throw ModelError.badConfig(file: file, why: "has no model_type; supported are \(supportedModelTypes.joined(separator: ", "))")
        }
        guard let f = family(modelType: modelType) else { throw ModelError.unsupportedModelType(file: file, modelType: modelType) }
        let a = try f.architecture(config: data, modelType: modelType, file: file)
        try a.validate(file: file)
        return a
    }

    /// The architecture of a model folder: config.json, with the end-of-sequence ids of
    /// generation_config.json when it has them (an int or a list, as Llama-3 instruct models write).
    public static func architecture(folder: String) throws -> ModelArchitecture {
        let path = folder + "/config.json"
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ModelError.missingFile(path, hint: "A Hugging Face model folder has config.json next to its model.safetensors.")
        }
        var a = try architecture(config: data, file: path)
        let genPath = folder + "/generation_config.json"
        if let g = FileManager.default.contents(atPath: genPath) {
            guard let json = (try? JSONSerialization.jsonObject(with: g)) as? [String: Any] else {
                throw ModelError.badConfig(file: genPath, why: "is not a JSON object (invalid JSON); fix or remove it")
            }
            if let eos = json["eos_token_id"], !(eos is NSNull) {
                guard let ids = tokenIDs(eos), ids.allSatisfy({ $0 >= 0 }) else {
                    throw ModelError.badConfig(file: genPath, why: "eos_token_id must be a token id or a list of them")
                }
                a.eosTokenIds = ids
            }
        }
        return a
    }

    /// An `eos_token_id` value: an integer or a list of integers.
    static func tokenIDs(_ v: Any) -> [Int]? {
        if let n = v as? NSNumber, n.doubleValue == n.doubleValue.rounded() { return [n.intValue] }
        if let list = v as? [Any] {
            var out: [Int] = []
            for x in list {
                guard let n = x as? NSNumber, n.doubleValue == n.doubleValue.rounded() else { return nil }
                out.append(n.intValue)
            }
            return out
        }
        return nil
    }

    /// Why a Codable config failed to decode, in words.
    static func describe(_ error: Error) -> String {
        switch error {
        case DecodingError.keyNotFound(let key, _): return "missing key '\(key.stringValue)'"
        case DecodingError.typeMismatch(_, let ctx): return "wrong type at '\(ctx.codingPath.map(\.stringValue).joined(separator: "."))'"
        case DecodingError.valueNotFound(_, let ctx): return "null at '\(ctx.codingPath.map(\.stringValue).joined(separator: "."))'"
        case DecodingError.dataCorrupted: return "invalid JSON"
        default: return "\(error)"
        }
    }
}

/// `eos_token_id` as config.json writes it: one id, a list, or null.
struct TokenIDList: Codable, Equatable {
    var ids: [Int]
    init(_ ids: [Int]) { self.ids = ids }
    init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { ids = [] } else if let one = try? c.decode(Int.self) { ids = [one] } else { ids = try c.decode([Int].self) }
    }
    func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        if ids.count == 1 { try c.encode(ids[0]) } else if ids.isEmpty { try c.encodeNil() } else { try c.encode(ids) }
    }
}
