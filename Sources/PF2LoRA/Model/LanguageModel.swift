import Foundation
import Synchronization

/// A checkpoint loaded from a Hugging Face folder: config.json (any family of `ModelRegistry`) +
/// model.safetensors. The weights stay memory-mapped (read in place); the model itself is immutable
/// and shared by every engine, server thread and client.
public final class LanguageModel: Sendable {
    public let folder: String
    public let architecture: ModelArchitecture
    /// Every parameter as f32, in the checkpoint's layout: what training, personalization and the
    /// store read. A model loaded for serving at f16, bf16 or q8_0 makes these on first use (an f32
    /// copy of an f16 checkpoint's tensors), so serving alone never pays for them.
    public var weights: ModelWeights {
        weightsOnce.withLock { made in
            if let w = made { return w }
            let w = try! ModelWeights.load(checkpoint!, architecture: architecture)   // the headers were checked at load
            made = w
            return w
        }
    }
    private let weightsOnce: Mutex<ModelWeights?>
    /// What serving reads of the base: linear weights, embeddings and head at the precision asked
    /// for at load (`ServingBase`), norms and biases. For f32 made on first use from `weights`: for
    /// Conv1D checkpoints (GPT-2) a transposed copy (340 MB and about 0.3 s for the 124M shape), for
    /// `nn.Linear` ones views. The training paths, which work on `weights` directly, never pay for it.
    /// Training that changes `weights` later does not show here.
    public var base: ServingBase {
        baseOnce.withLock { made in
            if let s = made { return s }
            let s = ServingBase(f32: weights)
            made = s
            return s
        }
    }
    private let baseOnce: Mutex<ServingBase?>
    /// The base weights of every linear slot in the serving layout (out, in), with nothing folded in.
    public var baseLinears: LinearWeightSet { base.linears }
    /// The checkpoint the weights view (nil for in-memory random models).
    public let checkpoint: Checkpoint?
    /// The (first) safetensors file of the checkpoint.
    public var file: SafeTensorsFile? { checkpoint?.files.first }

    public init(folder: String, weights: ModelWeights, checkpoint: Checkpoint?) {
        self.folder = folder
        self.architecture = weights.architecture
        self.weightsOnce = Mutex(weights)
        self.baseOnce = Mutex(nil)
        self.checkpoint = checkpoint
    }

    /// A model served from `base` (any precision); `weights` are read from `checkpoint` when asked for.
    init(folder: String, architecture: ModelArchitecture, base: ServingBase, checkpoint: Checkpoint) {
        self.folder = folder
        self.architecture = architecture
        self.weightsOnce = Mutex(nil)
        self.baseOnce = Mutex(base)
        self.checkpoint = checkpoint
    }

    /// `model` served with its large tensors at `precision` (tests, benchmarks): the f32 weights
    /// stay as they are for training.
    public init(_ model: LanguageModel, servedAt precision: WeightPrecision) throws {
        folder = model.folder
        architecture = model.architecture
        weightsOnce = Mutex(model.weights)
        baseOnce = Mutex(try model.base.converted(to: precision))
        checkpoint = model.checkpoint
    }

    /// Loads `folder/config.json` (any family of `ModelRegistry`, with generation_config.json's EOS
    /// ids) and the weights (model.safetensors or shards), validating names and shapes. `precision`:
    /// what serving keeps the large tensors at (`ServingBase`); nil: as the checkpoint stores them.
    /// f32 (the default) loads `weights` as today and serves from them.
    public static func load(folder: String, writable: Bool = false, precision: WeightPrecision? = .f32) throws -> LanguageModel {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: folder, isDirectory: &isDir), isDir.boolValue else {
            throw ModelError.missingFolder(folder)
        }
        let a = try ModelRegistry.architecture(folder: folder)
        let ck = try Checkpoint.open(folder: folder)
        if precision == .f32 || writable || (precision == nil && ck.dtypes.keys.allSatisfy { $0 == .f32 }) {
            let weights = try ModelWeights.load(ck, architecture: a, writable: writable)
            return LanguageModel(folder: folder, weights: weights, checkpoint: ck)
        }
        let base = try ServingBase.load(ck, architecture: a, precision: precision)
        return LanguageModel(folder: folder, architecture: a, base: base, checkpoint: ck)
    }

    /// The ids that end a generation: the model's (config.json, generation_config.json) and the
    /// tokenizer's end-of-text token.
    public func eosTokenIds(tokenizer: BPETokenizer) -> Set<Int> {
        Set(architecture.eosTokenIds + (tokenizer.eosTokenId.map { [$0] } ?? []))
    }

    /// Writes config.json and model.safetensors (atomically) into `folder`.
    public func save(to folder: String, dtype: DType = .f32) throws {
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        try AtomicFile.write(architecture.configJSON(), to: folder + "/config.json")
        try AtomicFile.write(weights.safetensors(dtype: dtype), to: folder + "/model.safetensors")
    }

    /// Module paths and (in, out) sizes of every linear layer an adapter may target.
    public var linears: [String: (inFeatures: Int, outFeatures: Int)] { architecture.linears }
}

/// The keys and values of one sequence, for every layer: (KV heads, capacity, hd) each, head-major,
/// so that one head's keys (and values) over all positions are one contiguous stream for decode
/// attention. Sized by the KV heads: grouped-query attention keeps H / KV times less than H heads.
/// Appending a token copies KV slices of hd floats per layer.
public final class KVCache {
    public let capacity: Int
    public private(set) var length: Int = 0
    let k: [Tensor]
    let v: [Tensor]

    public init(architecture a: ModelArchitecture, capacity: Int) {
        self.capacity = capacity
        let shape = [a.kvHeadCount, capacity, a.headDim]
        k = (0..<a.layerCount).map { _ in Tensor(zeros: shape) }
        v = (0..<a.layerCount).map { _ in Tensor(zeros: shape) }
    }

    /// Forgets the contents (the memory is kept for reuse).
    public func reset() { length = 0 }

    func advance(by n: Int) { length += n }

    public var byteCount: Int { 2 * k.count * (k.first?.count ?? 0) * 4 }
}
