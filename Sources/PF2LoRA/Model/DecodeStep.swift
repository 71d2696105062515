import Foundation
import CMemory

/// Decode steps of a few sequences, one new token each: single-user generation (B = 1) and the
/// server's continuous batch of up to `pooledRowLimit` sequences: `runBlock`'s pooled runner.
///
/// Every product of the block reads its whole weight once per step, so these steps are bound by
/// memory bandwidth. They run SPMD on the worker pool: participants take chunks of 64 output rows of
/// a group's weight (weights are (out, in), see `LinearWeightSet`), read each weight row from memory
/// once and dot it with every sequence's input row while it sits in L1, then finish their rows with
/// the bias, each sequence's client low-rank terms and the GELU or residual add. Norms (and SwiGLU)
/// are computed privately by every participant; attention splits the (sequence, KV head) pairs; the
/// head splits the vocabulary. One barrier per product (two with many client terms) and per
/// attention, no allocation (but the client-term table when the batch's
/// pairs change), no OpenBLAS call. Each output is summed in the same order whatever the batch, so a
/// sequence decodes to the same bits alone or batched with others.
extension InferenceEngine {
    /// The default of `pooledRowLimit`: up to this many decode rows go to the worker pool; more go
    /// to OpenBLAS's GEMM, which is compute-efficient once a weight row is reused by many rows
    /// (measured crossover in Benchmarks/README.md).
    public static let maxPooledRows = 12

    /// `segments`: the row ranges of adjacent inputs sharing a weight set (one row per input here).
    func decodeRows(_ inputs: [StepInput], _ segments: [(LinearWeightSet, Int, Int)]) -> Tensor {
        let c = architecture, C = c.hiddenSize, B = inputs.count
        let p = pool.count
        let rank = max(inputs.map { max($0.client?.maxRank ?? 0, $0.weights.perTokenRank) }.max() ?? 0, 1)
        ensure(rows: B, outRows: B, maxT: 1, maxRank: rank)
        let width = B * (c.groups.map(\.outFeatures).max() ?? C)
        let slotsPerGroup = c.groups.map(\.slots.count).max() ?? 1
        // Per-participant buffers (P, n): grown, never shrunk. Both dimensions are checked: the
        // placeholder tensors are 1-D, whose `rows` is 1, so a one-thread pool must still allocate.
        func grow(_ t: inout Tensor, _ n: Int) { if t.shape.count != 2 || t.cols < n || t.rows < p { t = Tensor(zeros: [p, max(n, t.cols)]) } }
        grow(&partials, width); grow(&privateLN, B * C); grow(&privateScores, c.contextLength * (c.headCount / c.kvHeadCount))
        grow(&privateLoRA, B * 2 * slotsPerGroup * rank)
        if lowRankT.count < B * 2 * slotsPerGroup * rank { lowRankT = Tensor(zeros: [B * 2 * slotsPerGroup * rank]) }
        ensureQ8Inputs()
        if c.mlp == .swiglu { grow(&privateAct, B * c.intermediateSize) }

        // Embeddings: x[b] = embed[token] (+ positions[position]), and each row's rotary table.
        let w = model.base
        for (b, inp) in inputs.enumerated() {
            let row = x.data + b * C
            w.embed.rowsToF32(inp.tokens[0]..<(inp.tokens[0] + 1), into: row)
            if let pos = w.positions { addInPlace(row, pos.data + inp.cache.length * C, count: C) }
            rope?.table(position: inp.cache.length, into: ropeCS.data + b * c.headDim)
        }
        // Each row's low-rank terms: its weight set's per-token shared pair (a half-precision base), then its client's.
        let lowRank = inputs.map { [$0.weights.perToken, $0.client].compactMap { $0 } }
        // A continuous batch keeps its sequences for many steps: the table is rebuilt only when they change.
        let terms: LowRankTerms
        if let last = lowRankTerms, last.matches(lowRank, rank: rank) { terms = last } else {
            terms = LowRankTerms(architecture: c, lowRank: lowRank, rank: rank)
            lowRankTerms = terms
        }
        let step = DecodeRows(inputs: inputs, segments: segments, terms: terms)
        pool.run { ctx in
            let runner = PooledDecodeRunner(engine: self, ctx: ctx, step: step)
            for l in 0..<c.layerCount { runBlock(runner, layer: l) }
            runner.head()
        }
        for inp in inputs { inp.cache.advance(by: 1) }
        return Tensor(viewing: logits.data, shape: [B, c.vocabSize], owner: logits)
    }
}

/// What every participant needs to know about the step.
struct DecodeRows {
    let inputs: [StepInput]
    let segments: [(LinearWeightSet, Int, Int)]   // (weights, first row, end row)
    let terms: LowRankTerms                      // every row's low-rank terms (the table keeps their pairs alive)
}

/// `runBlock`'s steps for one participant of a pooled decode step.
private struct PooledDecodeRunner: BlockRunner {
    unowned let engine: InferenceEngine
    let ctx: WorkerPool.Context
    let step: DecodeRows
    let lnp: UnsafeMutablePointer<Float>    // (B, C) this participant's norm output
    let sc: UnsafeMutablePointer<Float>     // (H / KV, context) its attention scores
    let q8: Q8Activations                   // its inputs quantized for q8_0 weights

    init(engine: InferenceEngine, ctx: WorkerPool.Context, step: DecodeRows) {
        self.engine = engine; self.ctx = ctx; self.step = step
        lnp = engine.privateLN.data + ctx.index * engine.privateLN.cols
        sc = engine.privateScores.data + ctx.index * engine.privateScores.cols
        q8 = engine.q8Inputs[ctx.index]
    }

    func norm(_ site: NormSite, layer l: Int) {
        let a = engine.architecture
        let (w, b) = engine.model.base.layers[l].norm(site)
        normRows(a.norm, engine.x.data, w.data, b?.data, lnp, rows: step.inputs.count, C: a.hiddenSize, eps: a.normEps)
    }

    func linear(_ site: GroupSite, layer l: Int) {
        let e = engine
        switch site {
        case .attnIn: matvec(layer: l, group: site.rawValue, lnp, into: e.qkv.data)
        case .attnOut: matvec(layer: l, group: site.rawValue, e.att.data, into: e.x.data, accumulate: true)
        case .mlpIn: matvec(layer: l, group: site.rawValue, lnp, into: e.fc.data, gelu: e.architecture.mlp == .gelu)
        case .mlpOut:
            let input = e.architecture.mlp == .swiglu ? e.privateAct.data + ctx.index * e.privateAct.cols : e.fc.data
            matvec(layer: l, group: site.rawValue, input, into: e.x.data, accumulate: true)
        }
    }

    /// (sequence, KV head) pairs split over the participants. Each pair's participant first does
    /// what the pair alone needs: with a position step (RoPE, q/k norms) its KV head's query heads and
    /// key head normed and rotated in the qkv row, then the new key and value appended to the cache;
    /// no other participant reads them, so no barrier sits between that and the attention (until
    /// session 13 the heads were split on their own, behind one more barrier per layer).
    func attention(layer l: Int) {
        let e = engine, a = e.architecture
        let H = a.headCount, KV = a.kvHeadCount, hd = a.headDim, qW = a.qWidth, kvW = a.kvWidth
        let W = a.group(.attnIn).outFeatures, perKV = H / KV, B = step.inputs.count
        let layer = e.model.base.layers[l]
        // (sequence, KV head) pairs: each cached key and value row is read once for the KV head's perKV query heads.
        let scale = 1 / Float(hd).squareRoot()
        for item in ctx.share(B * KV) {
            let b = item / KV, kvh = item % KV
            let cache = step.inputs[b].cache
            let L = cache.length, T = L + 1
            let row = e.qkv.data + b * W
            if a.hasPositionStep {
                let cs = e.ropeCS.data + b * hd
                positionStep(a, e.rope, row, heads: (kvh * perKV)..<((kvh + 1) * perKV), qNorm: layer.qNorm, kNorm: layer.kNorm, cs: cs)
                positionStep(a, e.rope, row, heads: (H + kvh)..<(H + kvh + 1), qNorm: layer.qNorm, kNorm: layer.kNorm, cs: cs)
            }
            cache.store(layer: l, head: kvh, position: L, key: row + qW + kvh * hd, value: row + qW + kvW + kvh * hd, hd: hd)
            let q = row + kvh * perKV * hd, o = e.att.data + b * qW + kvh * perKV * hd
            cache.decodeGroup(layer: l, head: kvh, q: q, heads: perKV, hd: hd, count: T, scale: scale, scores: sc, out: o)
        }
        ctx.barrier()
    }

    /// GELU ran in mlpIn's epilogue; SwiGLU is computed privately by every participant from the complete [gate | up].
    func activation(layer l: Int) {
        let e = engine
        guard e.architecture.mlp == .swiglu else { return }
        swigluForward(e.fc.data, e.privateAct.data + ctx.index * e.privateAct.cols, rows: step.inputs.count, I: e.architecture.intermediateSize)
    }

    /// Final norm, then the head: (V,C) @ (B,C)^T -> (B,V), vocabulary rows split.
    func head() {
        let e = engine, a = e.architecture, C = a.hiddenSize, V = a.vocabSize, w = e.model.base, B = step.inputs.count
        normRows(a.norm, e.x.data, w.finalNorm.data, w.finalNormBias?.data, lnp, rows: B, C: C, eps: a.normEps)
        if w.head.precision == .q8_0 { q8.quantize(lnp, count: B, cols: C) }
        ctx.chunks(V, size: 256, phase: a.groups.count * a.layerCount) {
            dotRows(w.head, lnp, quantized: q8, count: B, rows: $0, e.logits.data, stride: V)
        }
    }

    /// out = xin W^T + b (+ each sequence's client terms s (xin A^T) B^T, in each slot's rows), then
    /// GELU, or added into out; xin (B, in) and out (B, out). xin must be complete on every
    /// participant; out is complete on all when this returns. Chunks of 64 output rows (64 x in
    /// contiguous weights) are taken from each participant's contiguous share, the rest stolen (see
    /// `WorkerPool.Context.chunks`), so the weight streams in long runs and a participant that is
    /// slowed down takes fewer. Phases are numbered by (layer, group).
    @inline(__always)
    private func matvec(layer l: Int, group gi: Int, _ xin: UnsafeMutablePointer<Float>, into out: UnsafeMutablePointer<Float>,
                        accumulate: Bool = false, gelu: Bool = false) {
        let e = engine, a = e.architecture, g = a.groups[gi]
        let din = g.inFeatures, dout = g.outFeatures
        let B = step.inputs.count
        let bias = e.model.base.layers[l].groupB[gi]?.data
        let stage = e.partials.data + ctx.index * e.partials.cols       // (B, out): my rows before GELU / residual
        // Each sequence's low-rank projections t = s A xin per slot (client, and a per-token shared
        // pair), A (r, in), t (B, 2, slots, rank). Many terms (a wide batch of clients) are split over
        // the participants into a shared buffer, behind a barrier; a few (one or two sequences' slots)
        // are computed by every participant into its own, cheaper than a barrier. Every t is one dot
        // product: who computes it does not change its bits.
        let terms = step.terms.of(layer: l, group: gi)
        let split = ctx.count > 1 && terms.count >= 8
        let t = split ? e.lowRankT.data : e.privateLoRA.data + ctx.index * e.privateLoRA.cols
        if !terms.isEmpty {
            let mine = split ? ctx.share(terms.count) : 0..<terms.count
            for i in mine {
                let term = terms[terms.startIndex + i]
                // The next term's A asked for while this one is summed: 32 clients' pairs are tens of MB a step.
                if i + 1 < mine.upperBound { let next = terms[terms.startIndex + i + 1]; pf2lora_prefetch(next.a, next.rank * din * 4) }
                let x = xin + term.row * din
                for j in 0..<term.rank { t[term.t + j] = term.scale * dot(x, term.a + j * din, din) }
            }
            if split { ctx.barrier() }
        }
        // Inputs quantized per block of 32 for q8_0 weights (every participant its own copy).
        if step.segments.contains(where: { $0.0.weights[l][gi].precision == .q8_0 }) { q8.quantize(xin, count: B, cols: din) }
        ctx.chunks(dout, size: 64, phase: a.groups.count * l + gi) { rows in
            let lo = rows.lowerBound, n = rows.count
            for (set, r0, r1) in step.segments {
                // (rows,in) @ (in) -> (rows) for every sequence of the segment, at the weights' precision
                dotRows(set.weights[l][gi], xin + r0 * din, quantized: q8, first: r0, count: r1 - r0, rows: rows, stage + r0 * dout, stride: dout)
            }
            if let bias { for b in 0..<B { addInPlace(stage + b * dout + lo, bias + lo, count: n) } }
            // The low-rank terms whose slot meets these rows: (rows) += B[rows, :] t, B (slot out, r).
            // Each B's rows are a short run (at most the slot's outputs x rank floats): the next one is asked
            // for while this one is added, as the hardware prefetchers start too late on runs this short.
            var k = terms.startIndex
            while k < terms.endIndex {
                let term = terms[k]
                k += 1
                if k < terms.endIndex {
                    let next = terms[k], f0 = max(lo, next.lo), f1 = min(rows.upperBound, next.hi)
                    if f0 < f1 { pf2lora_prefetch(next.b + (f0 - next.lo) * next.rank, (f1 - f0) * next.rank * 4) }
                }
                let o0 = max(lo, term.lo), o1 = min(rows.upperBound, term.hi)
                guard o0 < o1 else { continue }
                lowRankUp(t + term.t, rank: term.rank, term.b + (o0 - term.lo) * term.rank, stage + term.row * dout + o0, count: o1 - o0)
            }
            for b in 0..<B {
                let sb = stage + b * dout, ob = out + b * dout
                if gelu { geluForward(sb + lo, ob + lo, count: n) }
                else if accumulate { addInPlace(ob + lo, sb + lo, count: n) }
                else { (ob + lo).update(from: sb + lo, count: n) }
            }
        }
        ctx.barrier()
    }
}

/// Every row's low-rank terms of one step, flat: per (layer, group) the terms (row, slot, pair) with
/// raw pointers and sizes, so the inner loops of `matvec` touch no reference counts and no nested
/// arrays. Built when a step's pairs differ from the last step's (the engine keeps the last table; it
/// holds the pair sets, so their memory outlives it) and reused while the batch stays the same. In
/// each group's range, terms run by row, then the row's sets of pairs (per-token shared, then
/// client), then the group's slots: the order the terms are added in.
struct LowRankTerms: @unchecked Sendable {
    struct Term {
        let a: UnsafePointer<Float>     // A (rank, in)
        let b: UnsafePointer<Float>     // B (slot out, rank)
        let scale: Float
        let rank: Int
        let row: Int                    // the sequence
        let t: Int                      // where its projections s A x sit in the step's t buffer
        let lo: Int, hi: Int            // the slot's output rows in the group
    }
    private let terms: [Term]
    private let starts: [Int]           // per (layer, group) + 1
    private let groups: Int
    private let sets: [[ClientPairs]]   // whose pointers these are (kept alive with the table)
    private let rank: Int

    /// Whether this table is the one of `lowRank` at `rank`: the same pair sets (by identity) per row.
    func matches(_ lowRank: [[ClientPairs]], rank r: Int) -> Bool {
        guard r == rank, lowRank.count == sets.count else { return false }
        for (x, y) in zip(lowRank, sets) {
            guard x.count == y.count else { return false }
            for (p, q) in zip(x, y) where p !== q { return false }
        }
        return true
    }

    init(architecture a: ModelArchitecture, lowRank: [[ClientPairs]], rank R: Int) {
        groups = a.groups.count
        var terms: [Term] = [], starts = [0]
        if lowRank.contains(where: { !$0.isEmpty }) {
            terms.reserveCapacity(lowRank.map(\.count).reduce(0, +) * a.layerCount * a.slots.count)
        }
        for l in 0..<a.layerCount {
            for g in a.groups {
                let ns = g.slots.count
                for (b, sets) in lowRank.enumerated() {
                    for (li, pairs) in sets.enumerated() {
                        for (k, s) in g.slots.enumerated() {
                            guard let p = pairs.pairs[l][s] else { continue }
                            let off = g.offsets[k]
                            terms.append(Term(a: UnsafePointer(p.a.data), b: UnsafePointer(p.b.data), scale: p.scale, rank: p.rank, row: b,
                                              t: ((b * 2 + li) * ns + k) * R, lo: off, hi: off + a.slots[s].outFeatures))
                        }
                    }
                }
                starts.append(terms.count)
            }
        }
        self.terms = terms; self.starts = starts; sets = lowRank; rank = R
    }

    /// The terms of group `gi` of layer `l`.
    @inline(__always)
    func of(layer l: Int, group gi: Int) -> ArraySlice<Term> {
        let i = l * groups + gi
        return terms[starts[i]..<starts[i + 1]]
    }
}

/// y[o] += sum_j t[j] B[o, j] for o < count, B (count, r) row-major, each sum formed as
/// ((0 + t0 B[o,0]) + t1 B[o,1]) + ... in ascending j, then added to y[o]: ranks 1, 2 and 4
/// sixteen lanes at a time (the lanes of one j picked out by even / odd halves), others one output at a
/// time, with the same bits either way.
@inline(__always)
func lowRankUp(_ t: UnsafePointer<Float>, rank r: Int, _ bm: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, count n: Int) {
    var o = 0
    switch r {
    case 1:
        let t0 = F16(repeating: t[0])
        while o + 16 <= n { store16(load16(y + o) + (F16() + t0 * load16(bm + o)), y + o); o += 16 }
    case 2:
        var tv = F16()
        for i in 0..<16 { tv[i] = t[i & 1] }
        while o + 8 <= n {
            let p = tv * load16(bm + 2 * o)
            let acc = (SIMD8<Float>() + p.evenHalf) + p.oddHalf
            let yp = UnsafeMutableRawPointer(y + o)
            yp.storeBytes(of: yp.loadUnaligned(as: SIMD8<Float>.self) + acc, as: SIMD8<Float>.self)
            o += 8
        }
    case 4:
        var tv = F16()
        for i in 0..<16 { tv[i] = t[i & 3] }
        while o + 4 <= n {
            let p = tv * load16(bm + 4 * o)
            let e = p.evenHalf, d = p.oddHalf
            let acc = (((SIMD4<Float>() + e.evenHalf) + d.evenHalf) + e.oddHalf) + d.oddHalf
            let yp = UnsafeMutableRawPointer(y + o)
            yp.storeBytes(of: yp.loadUnaligned(as: SIMD4<Float>.self) + acc, as: SIMD4<Float>.self)
            o += 4
        }
    default: break
    }
    while o < n {
        var acc: Float = 0
        for j in 0..<r { acc += t[j] * bm[o * r + j] }
        y[o] += acc
        o += 1
    }
}
