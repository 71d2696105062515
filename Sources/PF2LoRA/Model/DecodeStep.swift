import Foundation

/// Decode steps of a few sequences, one new token each: single-user generation (B = 1) and the
/// server's continuous batch of up to `pooledRowLimit` sequences.
///
/// Every linear layer reads its whole weight once per step, so these steps are bound by memory
/// bandwidth. They run SPMD on the worker pool: participants take chunks of 64 output rows of a
/// weight (weights are (out, in), see `LinearWeightSet`), read each weight row from memory once and
/// dot it with every sequence's input row while it sits in L1, then finish their rows with the bias,
/// each sequence's client low-rank term and the GELU or residual add. Attention splits the
/// (sequence, head) pairs; the tied head splits the vocabulary. Five barriers per layer, no
/// allocation, no OpenBLAS call. Each output is summed in the same order whatever the batch, so a
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
        let rank = max(inputs.map { $0.client?.maxRank ?? 0 }.max() ?? 0, 1)
        ensure(rows: B, outRows: B, maxT: 1, maxRank: rank)
        let width = B * max(c.qWidth + 2 * c.kvWidth, c.intermediateSize, C)
        // Per-participant buffers (P, n): grown, never shrunk. Both dimensions are checked: the
        // placeholder tensors are 1-D, whose `rows` is 1, so a one-thread pool must still allocate.
        func grow(_ t: inout Tensor, _ n: Int) { if t.shape.count != 2 || t.cols < n || t.rows < p { t = Tensor(zeros: [p, max(n, t.cols)]) } }
        grow(&partials, width); grow(&privateLN, B * C); grow(&privateScores, c.contextLength); grow(&privateLoRA, B * rank)

        // Embeddings: x[b] = wte[token] + wpe[position].
        let w = model.weights
        for (b, inp) in inputs.enumerated() {
            let row = x.data + b * C
            row.update(from: w.embed.data + inp.tokens[0] * C, count: C)
            addInPlace(row, w.positions!.data + inp.cache.length * C, count: C)
        }
        let step = DecodeRows(inputs: inputs, segments: segments, rank: rank)
        pool.run { ctx in self.decodeBody(ctx, step) }
        for inp in inputs { inp.cache.advance(by: 1) }
        return Tensor(viewing: logits.data, shape: [B, c.vocabSize], owner: logits)
    }

    /// What every participant needs to know about the step.
    private struct DecodeRows {
        let inputs: [StepInput]
        let segments: [(LinearWeightSet, Int, Int)]   // (weights, first row, end row)
        let rank: Int
    }

    /// What one participant does for the whole step.
    private func decodeBody(_ ctx: WorkerPool.Context, _ step: DecodeRows) {
        let c = architecture, C = c.hiddenSize, H = c.headCount, hs = c.headDim, B = step.inputs.count
        let w = model.weights
        let lnp = privateLN.data + ctx.index * privateLN.cols           // (B, C), private
        let sc = privateScores.data + ctx.index * privateScores.cols
        let scale = 1 / Float(hs).squareRoot()
        for l in 0..<c.layerCount {
            let layer = w.layers[l]
            layerNormForward(x.data, layer.attnNorm.data, layer.attnNormBias!.data, lnp, rows: B, C: C, eps: c.normEps)
            // (B,C) @ (C,3C) -> (B,3C)
            matvec(ctx, layer: l, slot: 0, lnp, into: qkv.data, step)
            // Attention, (sequence, head) pairs split: append this token's k and v, attend over T.
            for item in ctx.share(B * H) {
                let b = item / H, h = item % H
                let cache = step.inputs[b].cache
                let L = cache.length, T = L + 1, cap = cache.capacity
                let q = qkv.data + b * 3 * C + h * hs, o = att.data + b * C + h * hs
                let kh = cache.k[l].data + h * cap * hs, vh = cache.v[l].data + h * cap * hs   // (capacity, hs)
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
            // (B,C) @ (C,C) -> (B,C), added to the residual
            matvec(ctx, layer: l, slot: 1, att.data, into: x.data, step, accumulate: true)
            layerNormForward(x.data, layer.mlpNorm.data, layer.mlpNormBias!.data, lnp, rows: B, C: C, eps: c.normEps)
            // (B,C) @ (C,4C) -> (B,4C), GELU; (B,4C) @ (4C,C) -> (B,C), added to the residual
            matvec(ctx, layer: l, slot: 2, lnp, into: fc.data, step, gelu: true)
            matvec(ctx, layer: l, slot: 3, fc.data, into: x.data, step, accumulate: true)
        }
        // Final norm, then the tied head: (V,C) @ (B,C)^T -> (B,V), vocabulary rows split.
        layerNormForward(x.data, w.finalNorm.data, w.finalNormBias!.data, lnp, rows: B, C: C, eps: c.normEps)
        let V = c.vocabSize
        ctx.chunks(V, size: 256, phase: c.slots.count * c.layerCount) { dotRows(w.head.data, C: C, lnp, count: B, rows: $0, logits.data, stride: V) }
    }

    /// out = xin W^T + b (+ each sequence's client term s (xin A^T) B^T), then GELU, or added into out;
    /// xin (B, in) and out (B, out). xin must be complete on every participant; out is complete on all
    /// when this returns. Chunks of 64 output rows (64 x in contiguous floats of W) come from a shared
    /// counter, so the weight streams in long runs and a participant that is slowed down takes fewer.
    @inline(__always)
    private func matvec(_ ctx: WorkerPool.Context, layer l: Int, slot: Int, _ xin: UnsafeMutablePointer<Float>,
                        into out: UnsafeMutablePointer<Float>, _ step: DecodeRows,
                        accumulate: Bool = false, gelu: Bool = false) {
        let (din, dout) = architecture.slots[slot].dims
        let B = step.inputs.count
        let bias = model.weights.layers[l].linB[slot]?.data
        let stage = partials.data + ctx.index * partials.cols       // (B, out): my rows before GELU / residual
        let t = privateLoRA.data + ctx.index * privateLoRA.cols      // (B, rank)
        // Each sequence's client projections t = s A xin, the same on every participant. A (r, in).
        for b in 0..<B {
            if let p = step.inputs[b].client?.pairs[l][slot] {
                for k in 0..<p.rank { t[b * step.rank + k] = p.scale * dot(xin + b * din, p.a.data + k * din, din) }
            }
        }
        ctx.chunks(dout, size: 64, phase: architecture.slots.count * l + slot) { rows in
            let lo = rows.lowerBound, n = rows.count
            for (set, r0, r1) in step.segments {
                // (rows,in) @ (in) -> (rows) for every sequence of the segment
                dotRows(set.weights[l][slot].data, C: din, xin + r0 * din, count: r1 - r0, rows: rows, stage + r0 * dout, stride: dout)
            }
            for b in 0..<B {
                let sb = stage + b * dout, ob = out + b * dout
                if let bias { addInPlace(sb + lo, bias + lo, count: n) }
                if let p = step.inputs[b].client?.pairs[l][slot] {
                    let r = p.rank, bm = p.b.data, tb = t + b * step.rank   // B (out, r)
                    for o in rows {
                        var acc: Float = 0
                        for k in 0..<r { acc += tb[k] * bm[o * r + k] }
                        sb[o] += acc
                    }
                }
                if gelu { geluForward(sb + lo, ob + lo, count: n) }
                else if accumulate { addInPlace(ob + lo, sb + lo, count: n) }
                else { (ob + lo).update(from: sb + lo, count: n) }
            }
        }
        ctx.barrier()
    }
}
