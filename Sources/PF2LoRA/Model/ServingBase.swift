import CMemory
import Foundation

/// Everything a serving forward step reads of the base model, at the precision it is served in:
/// the linear weights (`linears`, the serving layout (out, in)) and the embeddings / output head as
/// `WeightMatrix`es at f32, f16, bf16 or q8_0; norms, biases and learned positions always f32 (they
/// are a few hundred KB).
///
/// - `--weights f32` (and an f32 checkpoint under `auto`): the matrices of `ModelWeights`; those that
///   view the mapped checkpoint (single-slot `nn.Linear` weights, the embeddings) copied into a
///   `WeightArena`.
/// - `auto` on an f16/bf16 checkpoint, or an explicit f16/bf16: the checkpoint's bytes as it stores
///   them, copied into a `WeightArena`; stacked groups (Llama's q|k|v, gate|up) and GPT-2's
///   transposed Conv1D weights at the same precision. No f32 copy of any large tensor exists.
/// - q8_0: converted at load (`WeightMatrix.converted`) into the arena; a matrix whose rows are not
///   whole blocks of 32 stays at the precision the checkpoint stores it, recorded in `fallbacks`.
/// The arena is memory in transparent huge pages: decode streams every weight once per token, and
/// from huge pages it measured 8-14% more bytes per CPU-second than from the file's 4 KB pages
/// (Benchmarks/README.md, "Huge pages"); that is why even the weights kept as stored are copied, not
/// read in place. The checkpoint's pages are released once copied (`releasePages`), and the freed
/// heap of the conversion is returned to the OS (`releaseFreedHeap`), so the resident memory is
/// about `byteCount` plus the KV caches.
public final class ServingBase: Sendable {
    /// One block's small tensors.
    public final class Layer: Sendable {
        public let attnNorm: Tensor, attnNormBias: Tensor?
        public let mlpNorm: Tensor, mlpNormBias: Tensor?
        public let qNorm: Tensor?, kNorm: Tensor?
        /// Indexed by group: the slots' biases stacked (out), zeros for a slot without one; nil when no slot has one.
        public let groupB: [Tensor?]

        init(attnNorm: Tensor, attnNormBias: Tensor?, mlpNorm: Tensor, mlpNormBias: Tensor?, qNorm: Tensor?, kNorm: Tensor?, groupB: [Tensor?]) {
            self.attnNorm = attnNorm; self.attnNormBias = attnNormBias; self.mlpNorm = mlpNorm; self.mlpNormBias = mlpNormBias
            self.qNorm = qNorm; self.kNorm = kNorm; self.groupB = groupB
        }

        /// A block norm's weight and bias (LayerNorm only).
        func norm(_ site: NormSite) -> (w: Tensor, b: Tensor?) {
            site == .attention ? (attnNorm, attnNormBias) : (mlpNorm, mlpNormBias)
        }
    }

    /// (V, C) token embeddings; a row is widened to f32 when looked up (exact at every precision).
    public let embed: WeightMatrix
    /// (V, C) the output head: `embed` itself when tied.
    public let head: WeightMatrix
    /// (P, C) learned positions, or nil with rotary ones.
    public let positions: Tensor?
    public let finalNorm: Tensor, finalNormBias: Tensor?
    public let layers: [Layer]
    /// The base linear weights, nothing folded in.
    public let linears: LinearWeightSet
    /// The precision asked for; nil: each tensor as the checkpoint stores it.
    public let requested: WeightPrecision?
    /// Matrices kept at another precision than `requested`, each with the reason.
    public let fallbacks: [String]

    init(embed: WeightMatrix, head: WeightMatrix, positions: Tensor?, finalNorm: Tensor, finalNormBias: Tensor?, layers: [Layer],
         linears: LinearWeightSet, requested: WeightPrecision?, fallbacks: [String]) {
        self.embed = embed; self.head = head; self.positions = positions; self.finalNorm = finalNorm; self.finalNormBias = finalNormBias
        self.layers = layers; self.linears = linears; self.requested = requested; self.fallbacks = fallbacks
    }

    /// The f32 serving base of f32 weights: views, and the serving layout of `LinearWeightSet(base:)`.
    /// Matrices that view the memory-mapped checkpoint are copied into a `WeightArena` (huge pages)
    /// and the file's pages released; matrices made at load (stacked groups, GPT-2's transposes)
    /// are owned already (from 2 MB on in huge pages too).
    convenience init(f32 w: ModelWeights) {
        let arena = WeightArena()
        func resident(_ t: Tensor) -> WeightMatrix {
            guard t.viewsMappedFile else { return WeightMatrix(t) }
            let m = arena.place(WeightMatrix(t))
            releaseMappedPages(t)
            return m
        }
        let embed = resident(w.embed)
        let linears = LinearWeightSet(base: w)
        let placed = linears.weights.map { row in row.map { m in m.f32.map(resident) ?? m } }
        self.init(embed: embed, head: w.lmHead.map(resident) ?? embed, positions: w.positions, finalNorm: w.finalNorm,
                  finalNormBias: w.finalNormBias,
                  layers: w.layers.map { Layer(attnNorm: $0.attnNorm, attnNormBias: $0.attnNormBias, mlpNorm: $0.mlpNorm, mlpNormBias: $0.mlpNormBias,
                                               qNorm: $0.qNorm, kNorm: $0.kNorm, groupB: $0.groupB) },
                  linears: LinearWeightSet(weights: placed, label: "base"), requested: .f32, fallbacks: [])
    }

    /// The precisions the large tensors are kept at, by how many matrices use each.
    public var precisions: [WeightPrecision: Int] {
        var n: [WeightPrecision: Int] = [:]
        for m in linears.weights.joined() { n[m.precision, default: 0] += 1 }
        n[embed.precision, default: 0] += 1
        if head !== embed { n[head.precision, default: 0] += 1 }
        return n
    }

    /// Bytes of the weights one decode token reads (every linear weight and the head).
    public var bytesPerToken: Int { linears.weights.joined().reduce(0) { $0 + $1.byteCount } + head.byteCount }

    /// Bytes of the large tensors (linear weights, embeddings, an untied head).
    public var byteCount: Int { linears.weights.joined().reduce(0) { $0 + $1.byteCount } + embed.byteCount + (head === embed ? 0 : head.byteCount) }

    /// The serving base of `ck` at `requested` (nil: as stored), built without an f32 copy of any
    /// f16/bf16 tensor. Throws when a tensor cannot be kept at the precision asked for
    /// (`WeightMatrix.unrepresentable`).
    static func load(_ ck: Checkpoint, architecture a: ModelArchitecture, precision requested: WeightPrecision?) throws -> ServingBase {
        let names = try ModelWeights.fileNames(ck, architecture: a)
        var byRole: [ModelArchitecture.TensorRole: String] = [:]
        for (name, _, role) in a.tensors {
            guard let f = names[name] else { throw ModelError.missingTensor(file: ck.name, tensor: name, modelType: a.modelType) }
            byRole[role] = f
        }
        func small(_ role: ModelArchitecture.TensorRole) throws -> Tensor? { try byRole[role].map { try ck.tensor($0) } }
        func matrix(_ name: String) throws -> WeightMatrix {
            let (f, _) = ck.tensors[name]!
            return try ck.files[f].weightMatrix(name)
        }
        func release(_ name: String) {
            let (f, info) = ck.tensors[name]!
            ck.files[f].releasePages(info)
        }
        var fallbacks: [String] = []
        // Every matrix serving reads ends up in the arena (huge pages), converted or as stored; the
        // checkpoint's pages are released once copied.
        let arena = WeightArena()
        func target(_ w: WeightMatrix, _ what: String) throws -> WeightMatrix {
            guard let p = requested, p != w.precision else { return arena.place(w) }
            guard p.fits(cols: w.cols) else {
                fallbacks.append("\(what): rows of \(w.cols) values are not whole q8_0 blocks of 32; kept at \(w.precision)")
                return arena.place(w)
            }
            if let why = w.unrepresentable(in: p) { throw ModelError.cannotServe(file: ck.name, tensor: what, precision: p.rawValue, why: why) }
            return arena.place(w.converted(to: p))
        }
        let embedName = byRole[.embed]!
        let embed = try target(try matrix(embedName), embedName)
        release(embedName)
        var head = embed
        if let h = byRole[.lmHead] {
            head = try target(try matrix(h), h)
            release(h)
        }
        var layers: [Layer] = [], linears: [[WeightMatrix]] = []
        for l in 0..<a.layerCount {
            var gw: [WeightMatrix] = [], gb: [Tensor?] = []
            for g in a.groups {
                let slotNames = g.slots.map { byRole[.weight(l, $0)]! }
                let parts = try slotNames.enumerated().map { k, n -> WeightMatrix in
                    let m = try matrix(n)
                    return a.slots[g.slots[k]].layout == .conv1D ? m.transposed() : m   // (in, out) -> (out, in)
                }
                let stacked = WeightMatrix.stacked(parts)
                let w = try target(stacked, slotNames.joined(separator: " + "))
                gw.append(w)
                // The arena holds the copy: the file's pages are not kept resident.
                slotNames.forEach(release)
                let biases = try g.slots.map { try small(.bias(l, $0)) }
                if g.slots.count == 1 { gb.append(biases[0]); continue }
                if biases.allSatisfy({ $0 == nil }) { gb.append(nil); continue }
                let fb = Tensor(zeros: [g.outFeatures])
                for (k, off) in g.offsets.enumerated() { if let b = biases[k] { (fb.data + off).update(from: b.data, count: b.count) } }
                gb.append(fb)
            }
            linears.append(gw)
            layers.append(Layer(attnNorm: try small(.attnNorm(l))!, attnNormBias: try small(.attnNormBias(l)), mlpNorm: try small(.mlpNorm(l))!,
                                mlpNormBias: try small(.mlpNormBias(l)), qNorm: try small(.qNorm(l)), kNorm: try small(.kNorm(l)), groupB: gb))
        }
        let base = ServingBase(embed: embed, head: head, positions: try small(.positions), finalNorm: try small(.finalNorm)!,
                               finalNormBias: try small(.finalNormBias), layers: layers,
                               linears: LinearWeightSet(weights: linears, label: "base"), requested: requested, fallbacks: fallbacks)
        ServingBase.releaseFreedHeap()
        return base
    }

    /// This base with its large tensors at `precision` (tests and benchmarks: a random or f32 model
    /// served at another precision without a checkpoint file).
    public func converted(to precision: WeightPrecision) throws -> ServingBase {
        var fallbacks: [String] = []
        let arena = WeightArena()
        func target(_ w: WeightMatrix, _ what: String) throws -> WeightMatrix {
            guard precision.fits(cols: w.cols) else {
                fallbacks.append("\(what): rows of \(w.cols) values are not whole q8_0 blocks of 32; kept at \(w.precision)")
                return w
            }
            if let why = w.unrepresentable(in: precision) { throw ModelError.cannotServe(file: "weights", tensor: what, precision: precision.rawValue, why: why) }
            return w.precision == precision ? w : arena.place(w.converted(to: precision))
        }
        let e = try target(embed, "embeddings")
        let h = head === embed ? e : try target(head, "lm_head")
        let lin = try linears.weights.enumerated().map { l, row in try row.enumerated().map { g, w in try target(w, "layer \(l) group \(g)") } }
        let base = ServingBase(embed: e, head: h, positions: positions, finalNorm: finalNorm, finalNormBias: finalNormBias, layers: layers,
                               linears: LinearWeightSet(weights: lin, label: "base"), requested: precision, fallbacks: fallbacks)
        ServingBase.releaseFreedHeap()
        return base
    }

    /// Gives the heap pages freed by a conversion back to the OS. Converting a checkpoint makes
    /// f32 temporaries (a stacked q|k|v or gate|up, a transposed Conv1D weight) of a few MB each,
    /// freed right after; glibc keeps such freed memory in the process (above its dynamic mmap
    /// threshold they come from the heap), so the resident size stayed near the f32 bytes.
    /// `malloc_trim(0)` (CMemory) returns them; measured in Benchmarks/README.md (RSS after conversion).
    @discardableResult
    static func releaseFreedHeap() -> Bool { pf2lora_release_free_heap() != 0 }
}

/// Drops this process's pages of a tensor that views a memory-mapped file (the interior whole pages;
/// a later read maps them in again, so no value changes). Nothing for any other tensor.
func releaseMappedPages(_ t: Tensor) {
    guard t.viewsMappedFile else { return }
    let page = Int(sysconf(Int32(_SC_PAGESIZE))), p = Int(bitPattern: t.data)
    let lo = (p + page - 1) / page * page, hi = (p + t.count * 4) / page * page
    guard hi > lo, let start = UnsafeMutableRawPointer(bitPattern: lo) else { return }
    _ = madvise(start, hi - lo, Int32(MADV_DONTNEED))
}

extension DType {
    /// The weight precision of this storage type.
    var precision: WeightPrecision { WeightPrecision(self) }
}
