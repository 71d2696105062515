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

/// The linear weights of every block that a group of sequences is served with: the base's own, or a
/// copy with a shared LoRA pair folded in: W = W0 + s B A. Folding once per shared version makes
/// the shared level free per token; only the small client terms cost anything (DESIGN §6).
///
/// Layout: (out, in), the layout of `nn.Linear`, GGUF and PEFT's B A, and the transpose of GPT-2's
/// Conv1D (in, out). Batch-1 decode is a dot product per output row then: each thread streams one
/// contiguous block of the weight with the input vector in L1, which measured 25-30% faster than the
/// (in, out) row-axpy form on this machine (Benchmarks/README.md). Prefill's GEMM reads either layout
/// equally well. The base set of a Conv1D checkpoint is therefore a transposed copy made once per
/// model (`LanguageModel.baseLinears`); an `nn.Linear` checkpoint's weights are used in place.
public final class LinearWeightSet: Sendable {
    /// [layer][group], each (group out, in): the group's slots' rows stacked (`SlotGroup`).
    public let weights: [[Tensor]]
    public let label: String

    /// The base model's linear weights in the serving layout: the groups of an nn.Linear checkpoint
    /// as they are, a Conv1D checkpoint's transposed.
    public init(base: ModelWeights) {
        let groups = base.architecture.groups
        weights = base.layers.map { layer in groups.indices.map { g in groups[g].layout == .conv1D ? layer.groupW[g].transposed() : layer.groupW[g] } }
        label = "base"
    }

    /// `base` with `pairs` (keyed by module path) folded in; groups without a pair share the base tensor.
    public init(base: LinearWeightSet, architecture a: ModelArchitecture, folding pairs: [String: LowRankPair], label: String) {
        var ws: [[Tensor]] = []
        for (l, row0) in base.weights.enumerated() {
            var row: [Tensor] = []
            for (gi, g) in a.groups.enumerated() {
                let w0 = row0[gi]
                let found = zip(g.slots, g.offsets).compactMap { s, off in pairs[a.modulePath(layer: l, slot: s)].map { ($0, off) } }
                guard !found.isEmpty else { row.append(w0); continue }
                let w = w0.clone()
                for (p, off) in found {
                    // (out, r) @ (r, in) -> (out, in): s B A, accumulated into the slot's rows of the copy.
                    BLAS.gemm(p.b.data, p.a.data, w.data + off * w0.cols, m: p.b.rows, n: w0.cols, k: p.rank,
                              lda: p.b.cols, ldb: p.a.cols, ldc: w0.cols, alpha: p.scale, beta: 1)
                }
                row.append(w)
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
