import Foundation
import CMemory
import CQuant

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
/// attention, no OpenBLAS call, and inside the job no allocation, lock or reference count: the
/// participants read a `DecodePlan` of raw pointers that the caller makes before the job. Each
/// output is summed in the same order whatever the batch, so a sequence decodes to the same bits
/// alone or batched with others.
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
        // Everything the participants read, as plain values and raw pointers (see `DecodePlan`).
        let L = c.layerCount, G = c.groups.count, S = segments.count
        for q in q8Inputs { q.reserve(B * max(c.groups.map(\.inFeatures).max() ?? C, C)) }
        let layers = UnsafeMutablePointer<DecodePlan.Layer>.allocate(capacity: L)
        let kernels = UnsafeMutablePointer<MatrixKernel>.allocate(capacity: L * G * S)
        let spans = UnsafeMutablePointer<DecodePlan.Span>.allocate(capacity: S)
        let caches = UnsafeMutablePointer<KVCache.Layer>.allocate(capacity: B * L)
        let lengths = UnsafeMutablePointer<Int>.allocate(capacity: B)
        let q8 = UnsafeMutablePointer<Q8Activations.Raw>.allocate(capacity: p)
        // Split attention (`DecodePlan.splitAttentionFrom`): both parts of every (sequence, KV head), their arrivals per
        // layer, each participant's copy of the queries it rotates.
        let perKV = c.headCount / c.kvHeadCount, partFloats = DecodePlan.partFloats(perKV: perKV, hd: c.headDim)
        let parts = UnsafeMutablePointer<Float>.allocate(capacity: B * c.kvHeadCount * 2 * partFloats)
        let arrivals = UnsafeMutablePointer<UInt64>.allocate(capacity: L * B * c.kvHeadCount)
        arrivals.initialize(repeating: 0, count: L * B * c.kvHeadCount)
        let queries = UnsafeMutablePointer<Float>.allocate(capacity: p * perKV * c.headDim)
        defer {
            layers.deallocate(); kernels.deallocate(); spans.deallocate(); caches.deallocate(); lengths.deallocate(); q8.deallocate()
            parts.deallocate(); arrivals.deallocate(); queries.deallocate()
        }
        for (l, layer) in w.layers.enumerated() {
            func ptr(_ t: Tensor?) -> UnsafePointer<Float>? { t.map { UnsafePointer($0.data) } }
            let bias = layer.groupB.map(ptr) + [UnsafePointer<Float>?](repeating: nil, count: max(0, 4 - G))
            layers[l] = DecodePlan.Layer(attnNorm: UnsafePointer(layer.attnNorm.data), attnNormBias: ptr(layer.attnNormBias),
                                         mlpNorm: UnsafePointer(layer.mlpNorm.data), mlpNormBias: ptr(layer.mlpNormBias),
                                         qNorm: ptr(layer.qNorm), kNorm: ptr(layer.kNorm), bias: (bias[0], bias[1], bias[2], bias[3]))
            for g in 0..<G { for (k, seg) in segments.enumerated() { kernels[(l * G + g) * S + k] = seg.0.weights[l][g].kernel } }
        }
        for (k, seg) in segments.enumerated() { spans[k] = DecodePlan.Span(first: seg.1, end: seg.2) }
        for (b, inp) in inputs.enumerated() {
            lengths[b] = inp.cache.length
            for l in 0..<L { caches[b * L + l] = inp.cache.layer(l) }
        }
        for i in 0..<p { q8[i] = q8Inputs[i].raw }
        precondition(G <= 4, "DecodePlan: at most four groups per block")
        let plan = UnsafeMutablePointer<DecodePlan>.allocate(capacity: 1)
        defer { plan.deinitialize(count: 1); plan.deallocate() }
        plan.initialize(to: DecodePlan(
            B: B, C: C, H: c.headCount, KV: c.kvHeadCount, hd: c.headDim, V: c.vocabSize, I: c.intermediateSize, L: L, G: G, S: S,
            din: (0..<4).map { $0 < G ? c.groups[$0].inFeatures : 0 }.tuple4, dout: (0..<4).map { $0 < G ? c.groups[$0].outFeatures : 0 }.tuple4,
            norm: c.norm, eps: c.normEps, swiglu: c.mlp == .swiglu, positionStep: c.hasPositionStep ? PositionStep(c, rope) : nil,
            layers: layers, kernels: kernels, spans: spans, caches: caches, lengths: lengths, q8: q8,
            parts: parts, arrivals: arrivals, queries: queries,
            head: w.head.kernel, finalNorm: UnsafePointer(w.finalNorm.data), finalNormBias: w.finalNormBias.map { UnsafePointer($0.data) },
            terms: terms.raw,
            x: x.data, qkv: qkv.data, att: att.data, fc: fc.data, ropeCS: UnsafePointer(ropeCS.data), logits: logits.data,
            partials: (partials.data, partials.cols), ln: (privateLN.data, privateLN.cols), scores: (privateScores.data, privateScores.cols),
            lora: (privateLoRA.data, privateLoRA.cols), act: (privateAct.data, privateAct.cols), sharedT: lowRankT.data))
        withExtendedLifetime((inputs, segments, w, terms)) {
            pool.run { ctx in
                let runner = PooledDecodeRunner(plan: UnsafePointer(plan), ctx: ctx)
                for l in 0..<L { runBlock(runner, layer: l) }
                runner.head()
            }
        }
        for inp in inputs { inp.cache.advance(by: 1) }
        return Tensor(viewing: logits.data, shape: [B, c.vocabSize], owner: logits)
    }
}

private extension Array {
    var tuple4: (Element, Element, Element, Element) { (self[0], self[1], self[2], self[3]) }
}

/// A pooled decode step as plain values and raw pointers: everything its participants read, made
/// by the caller before the job (`decodeRows`), which keeps the objects behind the pointers alive
/// until the job ends. Inside the job nothing touches a reference count or a lock: each retain,
/// release or lock is an atomic read-modify-write, which on x86 waits for every load in flight,
/// and a decode step's loads in flight are its weight streams. Until session 14 the participants
/// read the model through its objects: the profile of a 2-thread q8_0 step showed swift_retain and
/// swift_release at ~5% of samples, a mutex (`LanguageModel.base`) taken by both cores ~150 times a
/// step, and the weight streams behind them slower than alone.
struct DecodePlan {
    struct Layer {
        let attnNorm: UnsafePointer<Float>, attnNormBias: UnsafePointer<Float>?
        let mlpNorm: UnsafePointer<Float>, mlpNormBias: UnsafePointer<Float>?
        let qNorm: UnsafePointer<Float>?, kNorm: UnsafePointer<Float>?
        let bias: (UnsafePointer<Float>?, UnsafePointer<Float>?, UnsafePointer<Float>?, UnsafePointer<Float>?)   // by group

        @inline(__always) func bias(_ g: Int) -> UnsafePointer<Float>? {
            switch g { case 0: bias.0; case 1: bias.1; case 2: bias.2; default: bias.3 }
        }
    }
    /// Rows [first, end) of the batch share segment k's weights.
    struct Span { let first: Int, end: Int }

    let B: Int, C: Int, H: Int, KV: Int, hd: Int, V: Int, I: Int, L: Int, G: Int, S: Int
    let din: (Int, Int, Int, Int), dout: (Int, Int, Int, Int)
    let norm: ModelArchitecture.Norm
    let eps: Float
    let swiglu: Bool
    let positionStep: PositionStep?
    let layers: UnsafeMutablePointer<Layer>             // [layer]
    let kernels: UnsafeMutablePointer<MatrixKernel>     // [(layer, group, segment)]
    let spans: UnsafeMutablePointer<Span>               // [segment]
    let caches: UnsafeMutablePointer<KVCache.Layer>     // [(sequence, layer)]
    let lengths: UnsafeMutablePointer<Int>              // [sequence]: cached positions before this step
    let q8: UnsafeMutablePointer<Q8Activations.Raw>     // [participant]: quantized inputs, room for B x the widest
    let parts: UnsafeMutablePointer<Float>              // [(sequence, KV head, part)]: perKV x (hd + 2), see KVCache.Layer.decodePart
    let arrivals: UnsafeMutablePointer<UInt64>          // [(layer, sequence, KV head)]: parts done
    let queries: UnsafeMutablePointer<Float>            // [participant]: perKV x hd, the queries of a split pair, rotated
    let head: MatrixKernel
    let finalNorm: UnsafePointer<Float>, finalNormBias: UnsafePointer<Float>?
    let terms: LowRankTerms.Raw
    let x: UnsafeMutablePointer<Float>, qkv: UnsafeMutablePointer<Float>, att: UnsafeMutablePointer<Float>
    let fc: UnsafeMutablePointer<Float>, ropeCS: UnsafePointer<Float>, logits: UnsafeMutablePointer<Float>
    /// Per-participant buffers: (first, floats per participant).
    let partials: (UnsafeMutablePointer<Float>, Int), ln: (UnsafeMutablePointer<Float>, Int), scores: (UnsafeMutablePointer<Float>, Int)
    let lora: (UnsafeMutablePointer<Float>, Int), act: (UnsafeMutablePointer<Float>, Int)
    let sharedT: UnsafeMutablePointer<Float>

    /// The bytes of `k`'s rows `rows` (an interleaved q8_0 matrix: their groups' int8 values, not
    /// the scales stored after all of them).
    @inline(__always) static func bytes(of k: MatrixKernel, rows: Range<Int>) -> (UnsafeRawPointer, Int) {
        switch k.precision {
        case .q8_0 where k.interleaved:
            let group = k.cols / 32 * 128
            return (k.base + rows.lowerBound / 4 * group, ((rows.upperBound + 3) / 4 - rows.lowerBound / 4) * group)
        default:
            let rowBytes = k.precision.rowBytes(cols: k.cols)
            return (k.base + rows.lowerBound * rowBytes, rows.count * rowBytes)
        }
    }

    @inline(__always) func din(_ g: Int) -> Int { switch g { case 0: din.0; case 1: din.1; case 2: din.2; default: din.3 } }
    @inline(__always) func dout(_ g: Int) -> Int { switch g { case 0: dout.0; case 1: dout.1; case 2: dout.2; default: dout.3 } }
    var qW: Int { H * hd }
    var kvW: Int { KV * hd }

    /// Decode attention over at least this many positions (head size 64) is split in two parts,
    /// positions [0, m) and [m, T) with m = T / 2 rounded down to 16, each (sequence, KV head, part)
    /// a work item and the second part to finish merging both (`KVCache.mergeParts`, in part order):
    /// at batch 1 SmolLM2's 3 KV heads were 3 items split 2:1 over two cores, now 6 split 3:3. The
    /// split depends on the length alone, so a sequence's bits do not depend on its batch or on the
    /// thread count; no barrier is added (session 13's position blocks paid one, and merged behind it).
    static let splitAttentionFrom = 256

    /// Floats of one part (`KVCache.Layer.decodePart`): perKV heads' hd sums, then each head's (max, sum of exps).
    @inline(__always) static func partFloats(perKV: Int, hd: Int) -> Int { perKV * (hd + 2) }
}

/// `runBlock`'s steps for one participant of a pooled decode step (reading only its `DecodePlan`).
private struct PooledDecodeRunner: BlockRunner {
    let plan: UnsafePointer<DecodePlan>    // read in place: copying its ~400 bytes was a memmove per call
    let ctx: WorkerPool.Context
    let lnp: UnsafeMutablePointer<Float>    // (B, C) this participant's norm output
    let sc: UnsafeMutablePointer<Float>     // (H / KV, context) its attention scores
    let q8: Q8Activations.Raw               // its inputs quantized for q8_0 weights

    init(plan: UnsafePointer<DecodePlan>, ctx: WorkerPool.Context) {
        self.plan = plan; self.ctx = ctx
        lnp = plan.pointee.ln.0 + ctx.index * plan.pointee.ln.1
        sc = plan.pointee.scores.0 + ctx.index * plan.pointee.scores.1
        q8 = plan.pointee.q8[ctx.index]
    }

    func norm(_ site: NormSite, layer l: Int) {
        let p = plan, layer = p.pointee.layers[l]
        let (w, b) = site == .attention ? (layer.attnNorm, layer.attnNormBias) : (layer.mlpNorm, layer.mlpNormBias)
        normRows(p.pointee.norm, p.pointee.x, w, b, lnp, rows: p.pointee.B, C: p.pointee.C, eps: p.pointee.eps)
    }

    func linear(_ site: GroupSite, layer l: Int) {
        let p = plan
        switch site {
        case .attnIn: matvec(layer: l, group: site.rawValue, lnp, into: p.pointee.qkv)
        case .attnOut: matvec(layer: l, group: site.rawValue, p.pointee.att, into: p.pointee.x, accumulate: true)
        case .mlpIn: matvec(layer: l, group: site.rawValue, lnp, into: p.pointee.fc, gelu: !p.pointee.swiglu)
        case .mlpOut:
            let input = p.pointee.swiglu ? p.pointee.act.0 + ctx.index * p.pointee.act.1 : p.pointee.fc
            matvec(layer: l, group: site.rawValue, input, into: p.pointee.x, accumulate: true)
        }
    }

    /// (sequence, KV head) pairs split over the participants. Each pair's participant first does
    /// what the pair alone needs: with a position step (RoPE, q/k norms) its KV head's query heads and
    /// key head normed and rotated in the qkv row, then the new key and value appended to the cache;
    /// no other participant reads them, so no barrier sits between that and the attention (until
    /// session 13 the heads were split on their own, behind one more barrier per layer).
    func attention(layer l: Int) {
        let p = plan, H = p.pointee.H, KV = p.pointee.KV, hd = p.pointee.hd, qW = p.pointee.qW, kvW = p.pointee.kvW
        let W = p.pointee.dout(GroupSite.attnIn.rawValue), perKV = H / KV, B = p.pointee.B
        let layer = p.pointee.layers[l]
        let partFloats = DecodePlan.partFloats(perKV: perKV, hd: hd)
        // (sequence, KV head, part) items: each cached key and value row is read once for the KV head's perKV query heads.
        let scale = 1 / Float(hd).squareRoot()
        for item in ctx.share(B * KV * 2) {
            let b = item / (2 * KV), kvh = (item / 2) % KV, part = item % 2
            let T = p.pointee.lengths[b] + 1
            let split = hd == 64 && T >= DecodePlan.splitAttentionFrom
            if part == 1 && !split { continue }
            let cache = p.pointee.caches[b * p.pointee.L + l]
            let row = p.pointee.qkv + b * W
            let q = row + kvh * perKV * hd, o = p.pointee.att + b * qW + kvh * perKV * hd
            let newest = !split || part == 1    // attends over the new position: rotates its key and stores it
            var queries = UnsafePointer(q)
            if let step = p.pointee.positionStep {
                let cs = p.pointee.ropeCS + b * hd
                if split {
                    // Both parts need the rotated queries: each rotates its own copy (the same bits).
                    let copy = p.pointee.queries + ctx.index * perKV * hd
                    copy.update(from: q, count: perKV * hd)
                    for i in 0..<perKV { step.apply(head: kvh * perKV + i, at: copy + i * hd, qNorm: layer.qNorm, kNorm: layer.kNorm, cs: cs) }
                    queries = UnsafePointer(copy)
                } else {
                    step.apply(row, heads: (kvh * perKV)..<((kvh + 1) * perKV), qNorm: layer.qNorm, kNorm: layer.kNorm, cs: cs)
                }
                if newest { step.apply(row, heads: (H + kvh)..<(H + kvh + 1), qNorm: layer.qNorm, kNorm: layer.kNorm, cs: cs) }
            }
            if newest { cache.store(head: kvh, position: T - 1, key: row + qW + kvh * hd, value: row + qW + kvW + kvh * hd, hd: hd) }
            guard split else {
                cache.decodeGroup(head: kvh, q: queries, heads: perKV, hd: hd, count: T, scale: scale, scores: sc, out: o)
                continue
            }
            let m = T / 2 / 16 * 16
            let both = p.pointee.parts + (b * KV + kvh) * 2 * partFloats
            cache.decodePart(head: kvh, q: queries, heads: perKV, from: part == 0 ? 0 : m, count: part == 0 ? m : T - m, scale: scale,
                             scores: sc, part: both + part * partFloats)
            // The second to finish merges (its acquire sees the other's part).
            if pf2lora_arrive(p.pointee.arrivals + (l * B + b) * KV + kvh) == 1 {
                KVCache.mergeParts(both, both + partFloats, heads: perKV, out: o)
            }
        }
        barrier(before: l, GroupSite.attnOut.rawValue)
    }

    /// At most this many bytes of the next product's weights are asked for while a participant waits
    /// at a barrier (a quarter of this machine's 1 MB L2).
    static let prefetchLimit = 256 << 10

    /// The barrier before product `gi` of layer `l` (the head when l is past the last layer): while
    /// it waits for the others, this participant asks for the front of its own share of that
    /// product's weights (`WorkerPool.Context.barrier(prefetching:)`), so that a wait (the attention's
    /// uneven (sequence, KV head) pairs leave one core idle) fills its caches with what it reads
    /// next, and it starts that product from cache instead of from a cold stream.
    @inline(__always)
    private func barrier(before l: Int, _ gi: Int) {
        let p = plan
        let (k, size) = l < p.pointee.L ? (p.pointee.kernels[(l * p.pointee.G + gi) * p.pointee.S], 64) : (p.pointee.head, 256)
        let (start, bytes) = DecodePlan.bytes(of: k, rows: ctx.ownShare(k.rows, size: size))
        ctx.barrier(prefetching: start, bytes: min(bytes, Self.prefetchLimit))
    }

    /// GELU ran in mlpIn's epilogue; SwiGLU is computed privately by every participant from the complete [gate | up].
    func activation(layer l: Int) {
        let p = plan
        guard p.pointee.swiglu else { return }
        swigluForward(p.pointee.fc, p.pointee.act.0 + ctx.index * p.pointee.act.1, rows: p.pointee.B, I: p.pointee.I)
    }

    /// Final norm, then the head: (V,C) @ (B,C)^T -> (B,V), vocabulary rows split.
    func head() {
        let p = plan, C = p.pointee.C, V = p.pointee.V, B = p.pointee.B, w = p.pointee.head
        normRows(p.pointee.norm, p.pointee.x, p.pointee.finalNorm, p.pointee.finalNormBias, lnp, rows: B, C: C, eps: p.pointee.eps)
        if w.precision == .q8_0 { q8.quantize(lnp, B * C) }
        ctx.chunks(V, size: 256, phase: p.pointee.G * p.pointee.L) {
            dotRows(w, lnp, quantized: q8, count: B, rows: $0, p.pointee.logits, stride: V)
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
        let p = plan, din = p.pointee.din(gi), dout = p.pointee.dout(gi), B = p.pointee.B, S = p.pointee.S
        let bias = p.pointee.layers[l].bias(gi)
        let kernels = p.pointee.kernels + (l * p.pointee.G + gi) * S
        let stage = p.pointee.partials.0 + ctx.index * p.pointee.partials.1        // (B, out): my rows before GELU / residual
        // Each sequence's low-rank projections t = s A xin per slot (client, and a per-token shared
        // pair), A (r, in), t (B, 2, slots, rank). Many terms (a wide batch of clients) are split over
        // the participants into a shared buffer, behind a barrier; a few (one or two sequences' slots)
        // are computed by every participant into its own, cheaper than a barrier. Every t is one dot
        // product: who computes it does not change its bits.
        let terms = p.pointee.terms.of(layer: l, group: gi)
        let split = ctx.count > 1 && terms.count >= 8
        let t = split ? p.pointee.sharedT : p.pointee.lora.0 + ctx.index * p.pointee.lora.1
        if !terms.isEmpty {
            let mine = split ? ctx.share(terms.count) : 0..<terms.count
            for i in mine {
                let term = terms[i]
                // The next term's A asked for while this one is summed: 32 clients' pairs are tens of MB a step.
                if i + 1 < mine.upperBound { let next = terms[i + 1]; pf2lora_prefetch(next.a, next.rank * din * 4) }
                let x = xin + term.row * din
                for j in 0..<term.rank { t[term.t + j] = term.scale * dot(x, term.a + j * din, din) }
            }
            if split { ctx.barrier() }
        }
        // Inputs quantized per block of 32 for q8_0 weights (every participant its own copy).
        if (0..<S).contains(where: { kernels[$0].precision == .q8_0 }) { q8.quantize(xin, B * din) }
        ctx.chunks(dout, size: 64, phase: p.pointee.G * l + gi) { rows in
            let lo = rows.lowerBound, n = rows.count
            for k in 0..<S {
                let r0 = p.pointee.spans[k].first, r1 = p.pointee.spans[k].end
                // (rows,in) @ (in) -> (rows) for every sequence of the segment, at the weights' precision
                dotRows(kernels[k], xin + r0 * din, quantized: q8, first: r0, count: r1 - r0, rows: rows, stage + r0 * dout, stride: dout)
            }
            if let bias { for b in 0..<B { addInPlace(stage + b * dout + lo, bias + lo, count: n) } }
            // The low-rank terms whose slot meets these rows: (rows) += B[rows, :] t, B (slot out, r).
            // Each B's rows are a short run (at most the slot's outputs x rank floats): the next one is asked
            // for while this one is added, as the hardware prefetchers start too late on runs this short.
            var k = 0
            while k < terms.count {
                let term = terms[k]
                k += 1
                if k < terms.count {
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
        // The next product: attnOut after attention (its barrier asks for it again), then the next group, layer, or the head.
        if gi + 1 < p.pointee.G { barrier(before: l, gi + 1) } else { barrier(before: l + 1, 0) }
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
    private let storage: Storage        // the terms and starts, at fixed addresses for `raw`
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
        storage = Storage(terms: terms, starts: starts); sets = lowRank; rank = R
    }

    /// The table as raw pointers (valid while this table lives).
    var raw: Raw { Raw(terms: UnsafePointer(storage.terms), starts: UnsafePointer(storage.starts), groups: groups) }

    /// The table's terms and per-(layer, group) starts, copied once into memory of its own.
    private final class Storage {
        let terms: UnsafeMutablePointer<Term>, starts: UnsafeMutablePointer<Int>
        init(terms t: [Term], starts s: [Int]) {
            terms = .allocate(capacity: max(t.count, 1)); terms.initialize(from: t, count: t.count)
            starts = .allocate(capacity: s.count); starts.initialize(from: s, count: s.count)
        }
        deinit { terms.deallocate(); starts.deallocate() }
    }

    /// `LowRankTerms` as plain pointers, for a pooled decode step's participants (`DecodePlan`).
    struct Raw {
        let terms: UnsafePointer<Term>, starts: UnsafePointer<Int>, groups: Int
        /// The terms of group `gi` of layer `l`.
        @inline(__always)
        func of(layer l: Int, group gi: Int) -> UnsafeBufferPointer<Term> {
            let i = l * groups + gi
            return UnsafeBufferPointer(start: terms + starts[i], count: starts[i + 1] - starts[i])
        }
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
