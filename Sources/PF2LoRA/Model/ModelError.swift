import Foundation

/// What can be wrong with a model folder or a forward step; each case names the file or tensor and
/// what to do. Strings read from the folder's files (model types, tensor names, rope types, index
/// entries) appear only through `FileText` (a name the program knows, else its length).
public enum ModelError: Error, CustomStringConvertible {
    case missingFolder(String)
    case missingFile(String, hint: String)
    case badConfig(file: String, why: String)
    case unsupportedModelType(file: String, modelType: String)
    case missingTensor(file: String, tensor: String, modelType: String)
    case unexpectedTensor(file: String, tensor: String, modelType: String)
    case shapeMismatch(file: String, tensor: String, expected: [Int], found: [Int])
    case unknownSlot(String, modelType: String, known: [String])
    case promptTooLong(tokens: Int, context: Int)
    case emptyPrompt
    case badToken(Int, vocab: Int)
    case cannotServe(file: String, tensor: String, precision: String, why: String)

    public var description: String {
        switch self {
        case let .missingFolder(p) where FileManager.default.fileExists(atPath: p):
            let parent = (p as NSString).deletingLastPathComponent
            return "\(p) is a file; --model takes the folder that holds config.json and the weights (\(parent.isEmpty ? "." : parent)?)"
        case let .missingFolder(p):
            return "model folder \(p) does not exist; pass a folder with config.json and model.safetensors (make one with `pf2lora model random --config tiny --out DIR`)"
        case let .missingFile(p, hint): return "\(p) is missing. \(hint)"
        case let .badConfig(f, why): return "\(f): \(why)"
        case let .unsupportedModelType(f, t):
            return "\(f): model_type \(FileText.kind(t, quoted: true)) is not supported; supported are \(ModelRegistry.supportedModelTypes.joined(separator: ", "))"
        case let .missingTensor(f, t, mt):
            return "\(f) has no tensor '\(t)', which a \(mt) checkpoint of this config.json has; is config.json from the same model as the weights?"
        case let .unexpectedTensor(f, t, mt):
            return "\(f) has an unexpected tensor \(FileText.name(t)) (not part of a \(mt) model of this config.json); is this the right model or a different architecture?"
        case let .shapeMismatch(f, t, e, found):
            return "\(f): tensor '\(t)' has shape \(found) but config.json implies \(e); config.json and the weights do not belong together"
        case let .unknownSlot(n, mt, known):
            return "'\(n)' is not a linear layer of a \(mt) block; use \(known.joined(separator: ", "))"
        case let .promptTooLong(n, ctx): return "the prompt is \(n) tokens but the model's context is \(ctx); shorten the prompt"
        case .emptyPrompt: return "the prompt is empty; give at least one token of text"
        case let .badToken(id, v): return "token id \(id) is outside the vocabulary (0..<\(v))"
        case let .cannotServe(f, t, p, why):
            return "\(f): tensor '\(t)' cannot be served with --weights \(p): it \(why); use --weights auto (as stored), f32 or bf16"
        }
    }
}
