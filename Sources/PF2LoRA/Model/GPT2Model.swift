import Foundation

/// A GPT-2 checkpoint loaded from a Hugging Face folder: config.json + model.safetensors.
/// The weights stay memory-mapped (read in place); the model itself is immutable and shared by every
/// engine, server thread and client.
public final class GPT2Model {
    public let folder: String
    public let config: GPT2Config
    public let weights: GPT2Weights
    /// The base weights of the four linear kinds in the serving layout, with nothing folded in.
    /// Made on first use (a transposed copy: 340 MB and about 0.3 s for the 124M shape), so the
    /// training paths, which work on `weights` directly, never pay for it. Training that changes
    /// `weights` later does not show here.
    public var baseLinears: LinearWeightSet {
        lock.lock(); defer { lock.unlock() }
        if let s = _baseLinears { return s }
        let s = LinearWeightSet(base: weights)
        _baseLinears = s
        return s
    }
    private var _baseLinears: LinearWeightSet?
    private let lock = NSLock()
    /// The safetensors file the weights view (nil for in-memory random models).
    public let file: SafeTensorsFile?

    public init(folder: String, config: GPT2Config, weights: GPT2Weights, file: SafeTensorsFile?) {
        self.folder = folder
        self.config = config
        self.weights = weights
        self.file = file
    }

    /// Loads `folder/config.json` and `folder/model.safetensors`, validating names and shapes.
    public static func load(folder: String, writable: Bool = false) throws -> GPT2Model {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: folder, isDirectory: &isDir), isDir.boolValue else {
            throw ModelError.missingFolder(folder)
        }
        let config = try loadConfig(folder: folder)
        let stPath = folder + "/model.safetensors"
        guard FileManager.default.fileExists(atPath: stPath) else {
            throw ModelError.missingFile(stPath, hint: "A GPT-2 folder needs model.safetensors (PyTorch .bin checkpoints are not read; convert with safetensors).")
        }
        let st = try SafeTensorsFile(path: stPath)
        let weights = try GPT2Weights.load(st, config: config, writable: writable)
        return GPT2Model(folder: folder, config: config, weights: weights, file: st)
    }

    /// Reads and validates `folder/config.json`.
    public static func loadConfig(folder: String) throws -> GPT2Config {
        let path = folder + "/config.json"
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ModelError.missingFile(path, hint: "A Hugging Face GPT-2 folder has config.json next to model.safetensors.")
        }
        let config: GPT2Config
        do { config = try JSONDecoder().decode(GPT2Config.self, from: data) } catch {
            throw ModelError.badConfig(file: path, why: "not a GPT-2 config (\(Self.describe(error)))")
        }
        try config.validate(file: path)
        return config
    }

    static func describe(_ error: Error) -> String {
        switch error {
        case DecodingError.keyNotFound(let key, _): return "missing key '\(key.stringValue)'"
        case DecodingError.typeMismatch(_, let ctx): return "wrong type at '\(ctx.codingPath.map(\.stringValue).joined(separator: "."))'"
        case DecodingError.dataCorrupted: return "invalid JSON"
        default: return "\(error)"
        }
    }

    /// Writes config.json and model.safetensors (atomically) into `folder`.
    public func save(to folder: String, dtype: DType = .f32) throws {
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        try AtomicFile.write(config.jsonData(), to: folder + "/config.json")
        try AtomicFile.write(weights.safetensors(dtype: dtype), to: folder + "/model.safetensors")
    }

    /// Module paths and (in, out) sizes of every linear layer an adapter may target.
    public var linears: [String: (inFeatures: Int, outFeatures: Int)] {
        var out: [String: (inFeatures: Int, outFeatures: Int)] = [:]
        for l in 0..<config.nLayer {
            for kind in LinearKind.allCases { out[LinearKind.modulePath(layer: l, kind)] = kind.dims(config) }
        }
        return out
    }
}

/// A rank-r pair applied as a low-rank term: out += scale * (x A^T) B^T, with PEFT's shapes
/// A (r, in) and B (out, r). It views the adapter's tensors; building one copies nothing.
public struct LowRankPair {
    public let a: Tensor
    public let b: Tensor
    public let scale: Float

    public init(a: Tensor, b: Tensor, scale: Float) {
        precondition(a.rows == b.cols, "LowRankPair: A \(a.shape) and B \(b.shape) ranks differ")
        self.a = a; self.b = b; self.scale = scale
    }

    public var rank: Int { a.rows }
    public var byteCount: Int { (a.count + b.count) * 4 }
}

/// The linear weights of every block that a group of sequences is served with: the base's own, or a
/// copy with a shared LoRA pair folded in: W^T = W0^T + s B A. Folding once per shared version makes
/// the shared level free per token; only the small client terms cost anything (DESIGN §6).
///
/// Layout: (out, in), the transpose of GPT-2's Conv1D (in, out) and the layout of `nn.Linear`,
/// GGUF and PEFT's B A. Batch-1 decode is a dot product per output row then: each thread streams
/// one contiguous block of the weight with the input vector in L1, which measured 25-30% faster
/// than the (in, out) row-axpy form on this machine (Benchmarks/README.md). Prefill's GEMM reads
/// either layout equally well. The base set is therefore a transposed copy made once per model
/// (`GPT2Model.baseLinears`), not a view of the mapped file.
public final class LinearWeightSet {
    /// [layer][LinearKind.rawValue], each (out, in).
    public let weights: [[Tensor]]
    public let label: String

    /// The base model's linear weights, transposed from the checkpoint's (in, out).
    public init(base: GPT2Weights) {
        weights = base.layers.map { layer in layer.linW.map { $0.transposed() } }
        label = "base"
    }

    /// `base` with `pairs` (keyed by module path) folded in; modules without a pair share the base tensor.
    public init(base: LinearWeightSet, folding pairs: [String: LowRankPair], label: String) {
        var ws: [[Tensor]] = []
        for (l, row0) in base.weights.enumerated() {
            var row: [Tensor] = []
            for kind in LinearKind.allCases {
                let w0 = row0[kind.rawValue]
                if let p = pairs[LinearKind.modulePath(layer: l, kind)] {
                    let w = w0.clone()
                    // (out, r) @ (r, in) -> (out, in): s B A, accumulated into the copy.
                    BLAS.gemm(p.b.data, p.a.data, w.data, m: w0.rows, n: w0.cols, k: p.rank,
                              lda: p.b.cols, ldb: p.a.cols, ldc: w0.cols, alpha: p.scale, beta: 1)
                    row.append(w)
                } else {
                    row.append(w0)
                }
            }
            ws.append(row)
        }
        weights = ws
        self.label = label
    }

    /// Bytes this set owns beyond the base set.
    public func ownedBytes(base: LinearWeightSet) -> Int {
        var n = 0
        for (l, row) in weights.enumerated() {
            for (k, w) in row.enumerated() where w !== base.weights[l][k] { n += w.count * 4 }
        }
        return n
    }
}

/// A client's level-2 pairs, per layer and linear kind, applied as low-rank terms per token.
public final class ClientPairs {
    /// [layer][LinearKind.rawValue]
    public let pairs: [[LowRankPair?]]
    public let label: String
    public let maxRank: Int

    public init(layers: Int, pairs byPath: [String: LowRankPair], label: String) {
        var p = Array(repeating: Array<LowRankPair?>(repeating: nil, count: LinearKind.allCases.count), count: layers)
        var r = 0
        for (path, pair) in byPath {
            if let (l, kind) = LinearKind.parse(path), l < layers {
                p[l][kind.rawValue] = pair
                r = max(r, pair.rank)
            }
        }
        pairs = p
        self.label = label
        maxRank = r
    }

    public var byteCount: Int { pairs.joined().compactMap { $0?.byteCount }.reduce(0, +) }
}

/// The keys and values of one sequence, for every layer: (H, capacity, hs) each, head-major, so that
/// one head's keys (and values) over all positions are one contiguous stream for decode attention.
/// Appending a token copies H slices of hs floats per layer.
public final class KVCache {
    public let capacity: Int
    public private(set) var length: Int = 0
    let k: [Tensor]
    let v: [Tensor]

    public init(config: GPT2Config, capacity: Int) {
        self.capacity = capacity
        let shape = [config.nHead, capacity, config.headSize]
        k = (0..<config.nLayer).map { _ in Tensor(zeros: shape) }
        v = (0..<config.nLayer).map { _ in Tensor(zeros: shape) }
    }

    /// Forgets the contents (the memory is kept for reuse).
    public func reset() { length = 0 }

    func advance(by n: Int) { length += n }

    public var byteCount: Int { 2 * k.count * (k.first?.count ?? 0) * 4 }
}
