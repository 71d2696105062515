import Foundation

/// Batch-1 decode: one new token of one sequence, the shape of single-user generation.
///
/// Every linear layer is a matrix-vector product that reads its whole weight once per token, so this
/// step is bound by memory bandwidth. It runs SPMD on the worker pool: each participant takes a
/// contiguous block of the weight's output rows (weights are (out, in), see `LinearWeightSet`), so
/// each thread reads one stream from memory, and finishes its rows with the bias, the client's
/// low-rank term and the GELU or residual add. Attention splits the heads; the tied head splits
/// the vocabulary. Five barriers per layer, no allocation, no OpenBLAS call.
/// Numerically this is the batched step with a different summation order (tests compare both).
extension InferenceEngine {
    func decodeOne(_ inp: StepInput) -> Tensor {
        let c = config, C = c.nEmbd
        let p = pool.count
        ensure(rows: 1, outRows: 1, maxT: 1, maxRank: inp.client?.maxRank ?? 0)
        let width = max(3 * C, c.inner)
        if partials.count < p * width {
            partials = Tensor(zeros: [p, width]); privateLN = Tensor(zeros: [p, C])
            privateScores = Tensor(zeros: [p, c.nPositions])
        }
        let rank = max(inp.client?.maxRank ?? 0, 1)
        if privateLoRA.count < p * rank { privateLoRA = Tensor(zeros: [p, rank]) }

        // Embedding: x = wte[token] + wpe[position].
        let w = model.weights
        let pos = inp.cache.length
        x.data.update(from: w.wte.data + inp.tokens[0] * C, count: C)
        addInPlace(x.data, w.wpe.data + pos * C, count: C)

        pool.run { ctx in self.decodeBody(ctx, inp) }
        inp.cache.advance(by: 1)
        return Tensor(viewing: logits.data, shape: [1, c.vocabSize], owner: logits)
    }

    /// What one participant does for the whole token.
    private func decodeBody(_ ctx: WorkerPool.Context, _ inp: StepInput) {
        let c = config, C = c.nEmbd, H = c.nHead, hs = c.headSize
        let w = model.weights
        let me = ctx.index
        let lnp = privateLN.data + me * C
        let sc = privateScores.data + me * c.nPositions
        let L = inp.cache.length, T = L + 1
        let scale = 1 / Float(hs).squareRoot()
        for l in 0..<c.nLayer {
            let layer = w.layers[l]
            layerNormForward(x.data, layer.ln1W.data, layer.ln1B.data, lnp, rows: 1, C: C, eps: c.layerNormEpsilon)
            // (1,C) @ (C,3C) -> (1,3C)
            matvec(ctx, layer: l, kind: .qkv, lnp, into: qkv.data, inp)
            // Attention, heads split: append this token's k and v, then attend over T positions.
            let kc = inp.cache.k[l].data, vc = inp.cache.v[l].data, cap = inp.cache.capacity
            for h in ctx.share(H) {
                let q = qkv.data + h * hs, o = att.data + h * hs
                let kh = kc + h * cap * hs, vh = vc + h * cap * hs   // this head's (capacity, hs)
                (kh + L * hs).update(from: q + C, count: hs)
                (vh + L * hs).update(from: q + 2 * C, count: hs)
                if hs == 64 {
                    decodeHead64(q: q, k: kh, v: vh, stride: hs, count: T, scale: scale, scores: sc, out: o)
                } else {
                    for j in 0..<T { sc[j] = scale * dot(q, kh + j * hs, hs) }
                    softmaxInPlace(sc, count: T)
                    o.update(repeating: 0, count: hs)
                    for j in 0..<T { axpy(sc[j], vh + j * hs, o, hs) }
                }
            }
            ctx.barrier()
            // (1,C) @ (C,C) -> (1,C), added to the residual
            matvec(ctx, layer: l, kind: .attnProj, att.data, into: x.data, inp, accumulate: true)
            layerNormForward(x.data, layer.ln2W.data, layer.ln2B.data, lnp, rows: 1, C: C, eps: c.layerNormEpsilon)
            // (1,C) @ (C,4C) -> (1,4C), GELU; (1,4C) @ (4C,C) -> (1,C), added to the residual
            matvec(ctx, layer: l, kind: .fc, lnp, into: fc.data, inp, gelu: true)
            matvec(ctx, layer: l, kind: .mlpProj, fc.data, into: x.data, inp, accumulate: true)
        }
        // Final norm, then the tied head: (V,C) @ (C) -> (V), vocabulary rows split.
        layerNormForward(x.data, w.lnfW.data, w.lnfB.data, lnp, rows: 1, C: C, eps: c.layerNormEpsilon)
        ctx.chunks(c.vocabSize, size: 256, phase: 4 * c.nLayer) { dotRows(w.wte.data, C: C, lnp, rows: $0, logits.data) }
    }

    /// out = W xin + b (+ the client's s B (A xin)), then GELU, or added into out.
    /// xin must be complete on every participant; out is complete on all when this returns.
    /// Participants take chunks of 64 output rows (64 x in contiguous floats of W each) from a
    /// shared counter, so the weight is read as long contiguous streams and a participant that is
    /// slowed down takes fewer chunks instead of holding up the barrier.
    @inline(__always)
    private func matvec(_ ctx: WorkerPool.Context, layer l: Int, kind: LinearKind, _ xin: UnsafeMutablePointer<Float>,
                        into out: UnsafeMutablePointer<Float>, _ inp: StepInput,
                        accumulate: Bool = false, gelu: Bool = false) {
        let (din, dout) = kind.dims(config)
        let w = inp.weights.weights[l][kind.rawValue].data
        let bias = model.weights.layers[l].linB[kind.rawValue].data
        let stage = partials.data + ctx.index * partials.cols   // my rows before GELU / residual
        let pair = inp.client?.pairs[l][kind.rawValue]
        let t = privateLoRA.data + ctx.index * privateLoRA.cols
        // The client's r projections t = s A xin, the same on every participant. A (r, in).
        if let p = pair { for k in 0..<p.rank { t[k] = p.scale * dot(xin, p.a.data + k * din, din) } }
        ctx.chunks(dout, size: 64, phase: 4 * l + kind.rawValue) { rows in
            let lo = rows.lowerBound, n = rows.count
            dotRows(w, C: din, xin, rows: rows, stage)         // (rows,in) @ (in) -> (rows)
            addInPlace(stage + lo, bias + lo, count: n)
            if let p = pair {
                let r = p.rank, b = p.b.data                     // B (out, r)
                for o in rows {
                    var acc: Float = 0
                    for k in 0..<r { acc += t[k] * b[o * r + k] }
                    stage[o] += acc
                }
            }
            if gelu { geluForward(stage + lo, out + lo, count: n) }
            else if accumulate { addInPlace(out + lo, stage + lo, count: n) }
            else { (out + lo).update(from: stage + lo, count: n) }
        }
        ctx.barrier()
    }
}
