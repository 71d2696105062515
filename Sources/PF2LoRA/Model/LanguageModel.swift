import CQuant
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

/// What a KV cache keeps its keys and values at (`--kv-cache`). f16 halves the bytes every decode
/// step reads from the cache (at context 512 on SmolLM2-135M's shape 25 MB per token at f32, against
/// 143 MB of q8_0 weights) for one rounding of each key and value to an IEEE half (relative error
/// at most 2^-11): the default for q8_0 bases (as llama.cpp's default f16 cache), whose weights
/// already round far more. f16 and bf16 bases keep an f32 cache, so that they stay within 1e-4 of
/// transformers' f32 logits.
public enum KVCachePrecision: String, Sendable, CaseIterable {
    case f32, f16

    /// auto: f16 when the base's weights are served at q8_0, else f32.
    public static func automatic(for model: LanguageModel) -> KVCachePrecision {
        model.base.precisions.keys.contains(.q8_0) ? .f16 : .f32
    }
}

/// The keys and values of one sequence, for every layer: (KV heads, capacity, hd) each, head-major,
/// so that one head's keys (and values) over all positions are one contiguous stream for decode
/// attention. Sized by the KV heads: grouped-query attention keeps H / KV times less than H heads.
/// Appending a token copies (or rounds to halves) KV slices of hd floats per layer. At f32 the rows
/// are `k` and `v`; at f16 `kHalf` and `vHalf` (IEEE halves, rounded to nearest even), which the
/// attention kernels widen as they read them.
public final class KVCache {
    public let capacity: Int
    public let precision: KVCachePrecision
    public private(set) var length: Int = 0
    let k: [Tensor]
    let v: [Tensor]
    let kHalf: [UnsafeMutablePointer<UInt16>]
    let vHalf: [UnsafeMutablePointer<UInt16>]
    private let perLayer: Int
    /// The f16 rows of every layer in one `LargeBuffer` (huge pages from 2 MB on), and its mapped size.
    private let halfBuffer: UnsafeMutableRawPointer?
    private let halfMapped: Int

    public init(architecture a: ModelArchitecture, capacity: Int, precision: KVCachePrecision = .f32) {
        self.capacity = capacity
        self.precision = precision
        let shape = [a.kvHeadCount, capacity, a.headDim]
        perLayer = shape.reduce(1, *)
        switch precision {
        case .f32:
            k = (0..<a.layerCount).map { _ in Tensor(zeros: shape) }
            v = (0..<a.layerCount).map { _ in Tensor(zeros: shape) }
            kHalf = []; vHalf = []
            halfBuffer = nil; halfMapped = 0
        case .f16:
            k = []; v = []
            // One zeroed buffer, layer l's keys then its values: a decode step streams them all,
            // and in 4 KB pages (one malloc per layer) each head's short stream crossed a page,
            // and a TLB miss, every 4 KB.
            let n = max(perLayer, 1)
            let (buffer, mapped) = LargeBuffer.allocateZeroed(byteCount: 2 * a.layerCount * n * 2)
            let rows = buffer.bindMemory(to: UInt16.self, capacity: 2 * a.layerCount * n)
            kHalf = (0..<a.layerCount).map { rows + 2 * $0 * n }
            vHalf = (0..<a.layerCount).map { rows + (2 * $0 + 1) * n }
            halfBuffer = buffer; halfMapped = mapped
        }
    }

    /// A cache for `model` at `precision` (nil: `KVCachePrecision.automatic`).
    public convenience init(model: LanguageModel, capacity: Int, precision: KVCachePrecision? = nil) {
        self.init(architecture: model.architecture, capacity: capacity, precision: precision ?? .automatic(for: model))
    }

    deinit {
        if let halfBuffer { LargeBuffer.free(halfBuffer, mappedBytes: halfMapped) }
    }

    /// Forgets the contents (the memory is kept for reuse).
    public func reset() { length = 0 }

    func advance(by n: Int) { length += n }

    public var byteCount: Int { 2 * max(k.count, kHalf.count) * perLayer * (precision == .f32 ? 4 : 2) }

    /// One layer's keys and values as plain pointers (no reference counts: a pooled decode step's
    /// participants use these, `DecodePlan`).
    struct Layer {
        let k: UnsafeMutableRawPointer      // (KV, capacity, hd) f32 or f16
        let v: UnsafeMutableRawPointer
        let capacity: Int
        let half: Bool

        /// Stores the key and value (hd floats each) of KV head `h` at `position`.
        @inline(__always)
        func store(head h: Int, position: Int, key: UnsafePointer<Float>, value: UnsafePointer<Float>, hd: Int) {
            let o = (h * capacity + position) * hd
            if half {
                pf2lora_f32_to_f16(key, k.assumingMemoryBound(to: UInt16.self) + o, hd)
                pf2lora_f32_to_f16(value, v.assumingMemoryBound(to: UInt16.self) + o, hd)
            } else {
                (k.assumingMemoryBound(to: Float.self) + o).update(from: key, count: hd)
                (v.assumingMemoryBound(to: Float.self) + o).update(from: value, count: hd)
            }
        }

        /// Decode attention of the `heads` query heads at q sharing KV head `h` over the cached
        /// positions [0, count): `decodeGroup` on the cache's precision.
        @inline(__always)
        func decodeGroup(head h: Int, q: UnsafePointer<Float>, heads g: Int, hd: Int, count T: Int, scale: Float,
                         scores sc: UnsafeMutablePointer<Float>, out o: UnsafeMutablePointer<Float>) {
            let off = h * capacity * hd
            if half {
                decodeGroupHalf(q: q, heads: g, k: k.assumingMemoryBound(to: UInt16.self) + off, v: v.assumingMemoryBound(to: UInt16.self) + off,
                                hd: hd, count: T, scale: scale, scores: sc, out: o)
            } else {
                PF2LoRA.decodeGroup(q: q, heads: g, k: k.assumingMemoryBound(to: Float.self) + off, v: v.assumingMemoryBound(to: Float.self) + off,
                                    hd: hd, count: T, scale: scale, scores: sc, out: o)
            }
        }

        /// One part of a split decode attention (head size 64): the g heads over positions
        /// [t0, t0 + n) of KV head `h`, unnormalized. part[i * 64 + e] = sum_j exp(s_ij - m_i) v_j[e]
        /// for head i; part[g * 64 + 2i] = m_i (its largest score), part[g * 64 + 2i + 1] = the sum of
        /// its exps. The same kernels as `decodeGroup`, their scale of 1 / sum left to the merge.
        @inline(__always)
        func decodePart(head h: Int, q: UnsafePointer<Float>, heads g: Int, from t0: Int, count n: Int, scale: Float,
                        scores sc: UnsafeMutablePointer<Float>, part: UnsafeMutablePointer<Float>) {
            let off = (h * capacity + t0) * 64
            if half { pf2lora_attention_scores64_f16(q, g, k.assumingMemoryBound(to: UInt16.self) + off, n, scale, sc) }
            else { pf2lora_attention_scores64(q, g, k.assumingMemoryBound(to: Float.self) + off, n, scale, sc) }
            withUnsafeTemporaryAllocation(of: Float.self, capacity: g) { ones in
                for i in 0..<g {
                    let (m, l) = expShiftedInPlace(sc + i * n, count: n)
                    part[g * 64 + 2 * i] = m; part[g * 64 + 2 * i + 1] = l
                    ones[i] = 1
                }
                if half { pf2lora_attention_values64_f16(sc, g, n, v.assumingMemoryBound(to: UInt16.self) + off, ones.baseAddress!, part) }
                else { pf2lora_attention_values64(sc, g, n, v.assumingMemoryBound(to: Float.self) + off, ones.baseAddress!, part) }
            }
        }
    }

    /// Two parts of `decodePart` (positions [0, m) then [m, T)) as one head group's attention:
    /// out_i = (w0 acc0_i + w1 acc1_i) / (w0 l0_i + w1 l1_i) with w_k = exp(m_k - max(m0, m1)), in
    /// this order whoever computed which part.
    static func mergeParts(_ p0: UnsafePointer<Float>, _ p1: UnsafePointer<Float>, heads g: Int, out o: UnsafeMutablePointer<Float>) {
        for i in 0..<g {
            let m0 = p0[g * 64 + 2 * i], m1 = p1[g * 64 + 2 * i], M = max(m0, m1)
            let w0 = expf(m0 - M), w1 = expf(m1 - M)
            let inv = 1 / (w0 * p0[g * 64 + 2 * i + 1] + w1 * p1[g * 64 + 2 * i + 1])
            for e in 0..<64 { o[i * 64 + e] = (w0 * p0[i * 64 + e] + w1 * p1[i * 64 + e]) * inv }
        }
    }

    /// Layer `l`'s rows.
    @inline(__always)
    func layer(_ l: Int) -> Layer {
        switch precision {
        case .f32: return Layer(k: UnsafeMutableRawPointer(k[l].data), v: UnsafeMutableRawPointer(v[l].data), capacity: capacity, half: false)
        case .f16: return Layer(k: UnsafeMutableRawPointer(kHalf[l]), v: UnsafeMutableRawPointer(vHalf[l]), capacity: capacity, half: true)
        }
    }

    /// Stores the key and value (hd floats each) of KV head `h` at `position` of layer `l`.
    func store(layer l: Int, head h: Int, position: Int, key: UnsafePointer<Float>, value: UnsafePointer<Float>, hd: Int) {
        layer(l).store(head: h, position: position, key: key, value: value, hd: hd)
    }

    /// Decode attention of the `heads` query heads at q sharing KV head `h` of layer `l` over the
    /// cached positions [0, count): `decodeGroup` on the cache's precision.
    func decodeGroup(layer l: Int, head h: Int, q: UnsafePointer<Float>, heads g: Int, hd: Int, count T: Int, scale: Float,
                     scores sc: UnsafeMutablePointer<Float>, out o: UnsafeMutablePointer<Float>) {
        layer(l).decodeGroup(head: h, q: q, heads: g, hd: hd, count: T, scale: scale, scores: sc, out: o)
    }

    /// Keys and values of layer `l` at positions [0, count) as f32, (KV, count, hd) each, into
    /// `keys` and `values`: for the prefill GEMMs. At f32 nothing is copied: the cache's own rows
    /// (row stride `capacity`) are returned; at f16 they are widened into the buffers (stride `count`).
    func f32Rows(layer l: Int, count T: Int, kvHeads: Int, hd: Int, keys: UnsafeMutablePointer<Float>, values: UnsafeMutablePointer<Float>)
        -> (k: UnsafePointer<Float>, v: UnsafePointer<Float>, stride: Int) {
        switch precision {
        case .f32:
            return (UnsafePointer(k[l].data), UnsafePointer(v[l].data), capacity)
        case .f16:
            for h in 0..<kvHeads {
                pf2lora_f16_to_f32(kHalf[l] + h * capacity * hd, keys + h * T * hd, T * hd)
                pf2lora_f16_to_f32(vHalf[l] + h * capacity * hd, values + h * T * hd, T * hd)
            }
            return (UnsafePointer(keys), UnsafePointer(values), T)
        }
    }
}
