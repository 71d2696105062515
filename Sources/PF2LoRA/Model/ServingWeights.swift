import Foundation

/// A rank-r pair applied as a low-rank term: out += scale * (x A^T) B^T, with PEFT's shapes
/// A (r, in) and B (out, r). It views the adapter's tensors; building one copies nothing.
public struct LowRankPair: Sendable {
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

/// How a shared pair is applied on a base kept at half precision or int8 (`LinearWeightSet(base:folding:)`).
public enum SharedPairMode: String, Sendable, CaseIterable {
    /// Folded into a copy of the weights at the base matrix's precision: W = round(W0 + s B A). Free
    /// per token; the copy costs the base's bytes again, and rounding the sum to f16/bf16 changes
    /// the logits by more than the 1e-4 of the f32 computation (Benchmarks/README.md, issue 14).
    case fold
    /// Applied per token as a rank-r term, like a client's pair: exact (the base is not rounded
    /// again), no copy, r (in + out) multiply-adds per token and slot.
    case perToken

    /// The default for a base: fold for f32 (exact) and q8_0 (quantizing W0 + s B A loses no more
    /// than quantizing W0), per token for f16 and bf16.
    public static func `default`(for base: LinearWeightSet) -> SharedPairMode {
        base.weights.joined().contains { $0.precision == .f16 || $0.precision == .bf16 } ? .perToken : .fold
    }
}

/// The linear weights of every block that a group of sequences is served with: the base's own, or a
/// copy with a shared LoRA pair folded in: W = W0 + s B A. Folding once per shared version makes
/// the shared level free per token; only the small client terms cost anything (DESIGN §6). On a
/// half-precision base the shared pair may instead stay a per-token term (`perToken`, see
/// `SharedPairMode`).
///
/// Layout: (out, in), the layout of `nn.Linear`, GGUF and PEFT's B A, and the transpose of GPT-2's
/// Conv1D (in, out). Batch-1 decode is a dot product per output row then: each thread streams one
/// contiguous block of the weight with the input vector in L1, which measured 25-30% faster than the
/// (in, out) row-axpy form on this machine (Benchmarks/README.md). Prefill's GEMM reads either layout
/// equally well. The base set of a Conv1D checkpoint is therefore a transposed copy made once per
/// model (`LanguageModel.baseLinears`); an `nn.Linear` checkpoint's weights are used in place.
/// Each matrix keeps its own precision (`WeightMatrix`; `ServingBase` chooses it).
public final class LinearWeightSet: Sendable {
    /// [layer][group], each (group out, in): the group's slots' rows stacked (`SlotGroup`).
    public let weights: [[WeightMatrix]]
    /// A shared pair applied per token instead of folded ([layer][slot], like a client's), or nil.
    public let perToken: ClientPairs?
    public let label: String

    init(weights: [[WeightMatrix]], perToken: ClientPairs? = nil, label: String) {
        self.weights = weights; self.perToken = perToken; self.label = label
    }

    /// The base model's f32 linear weights in the serving layout: the groups of an nn.Linear
    /// checkpoint as they are, a Conv1D checkpoint's transposed.
    public convenience init(base: ModelWeights) {
        let groups = base.architecture.groups
        self.init(weights: base.layers.map { layer in
            groups.indices.map { g in WeightMatrix(groups[g].layout == .conv1D ? layer.groupW[g].transposed() : layer.groupW[g]) }
        }, label: "base")
    }

    /// `base` with `pairs` (keyed by module path) folded in; groups without a pair share the base
    /// matrix. `mode` (default `SharedPairMode.default(for: base)`): `.perToken` keeps the base's
    /// matrices and applies the pairs per token instead.
    public convenience init(base: LinearWeightSet, architecture a: ModelArchitecture, folding pairs: [String: LowRankPair], label: String,
                            mode: SharedPairMode? = nil) {
        if (mode ?? .default(for: base)) == .perToken {
            self.init(weights: base.weights, perToken: ClientPairs(architecture: a, pairs: pairs, label: label), label: label)
            return
        }
        var ws: [[WeightMatrix]] = []
        // The folded copies in huge pages, as the base's matrices (`WeightArena`): a decode step streams them alike.
        let arena = WeightArena()
        for (l, row0) in base.weights.enumerated() {
            var row: [WeightMatrix] = []
            for (gi, g) in a.groups.enumerated() {
                let w0 = row0[gi]
                let found = zip(g.slots, g.offsets).compactMap { s, off in pairs[a.modulePath(layer: l, slot: s)].map { ($0, off) } }
                guard !found.isEmpty else { row.append(w0); continue }
                let w = w0.f32?.clone() ?? w0.toTensor()
                for (p, off) in found {
                    // (out, r) @ (r, in) -> (out, in): s B A, accumulated into the slot's rows of the copy.
                    BLAS.gemm(p.b.data, p.a.data, w.data + off * w0.cols, m: p.b.rows, n: w0.cols, k: p.rank,
                              lda: p.b.cols, ldb: p.a.cols, ldc: w0.cols, alpha: p.scale, beta: 1)
                }
                // Back to the base's precision (f16/bf16 round to nearest even, q8_0 requantized).
                row.append(arena.place(WeightMatrix(w).converted(to: w0.precision)))
            }
            ws.append(row)
        }
        self.init(weights: ws, perToken: base.perToken, label: label)
    }

    /// Bytes this set owns beyond the base set.
    public func ownedBytes(base: LinearWeightSet) -> Int {
        var n = 0
        for (l, row) in weights.enumerated() {
            for (k, w) in row.enumerated() where w !== base.weights[l][k] { n += w.byteCount }
        }
        return n + (perToken.map { $0 !== base.perToken ? $0.byteCount : 0 } ?? 0)
    }

    /// The largest rank of the per-token pairs (0 without).
    var perTokenRank: Int { perToken?.maxRank ?? 0 }
}

/// A client's level-2 pairs, per layer and slot, applied as low-rank terms per token.
public final class ClientPairs: Sendable {
    /// [layer][slot]
    public let pairs: [[LowRankPair?]]
    public let label: String
    public let maxRank: Int

    /// `byPath`: module path -> pair; paths that are not linear layers of `a` are ignored.
    public init(architecture a: ModelArchitecture, pairs byPath: [String: LowRankPair], label: String) {
        var p = Array(repeating: Array<LowRankPair?>(repeating: nil, count: a.slots.count), count: a.layerCount)
        var r = 0
        for (path, pair) in byPath {
            if let (l, s) = a.parseModulePath(path) {
                p[l][s] = pair
                r = max(r, pair.rank)
            }
        }
        pairs = p
        self.label = label
        maxRank = r
    }

    public var byteCount: Int { pairs.joined().compactMap { $0?.byteCount }.reduce(0, +) }
}
