import Foundation

/// One sequence's part of a batched forward step.
public struct StepInput {
    /// The sequence's KV cache; the new tokens are appended at `cache.length`.
    public let cache: KVCache
    /// The new tokens: the whole prompt on prefill, one token on decode.
    public let tokens: [Int]
    /// The linear weights it is served with (base, or base with a shared pair folded in).
    public let weights: LinearWeightSet
    /// Its client's level-2 pairs, if any.
    public let client: ClientPairs?
    /// Return logits for every new position (tests, scoring) instead of only the last.
    public let allLogits: Bool

    public init(cache: KVCache, tokens: [Int], weights: LinearWeightSet, client: ClientPairs? = nil, allLogits: Bool = false) {
        self.cache = cache; self.tokens = tokens; self.weights = weights; self.client = client; self.allLogits = allLogits
    }
}

/// Runs forward steps of any supported model over a batch of sequences of different lengths and adapters.
///
/// All new tokens of the batch are rows of one activation matrix, so every product of the block is
/// one GEMM per weight set (normally one: the base or the shared-folded weights), followed by the
/// low-rank client terms grouped by client (the SGMV idea of Punica/S-LoRA). Attention runs per
/// sequence over its own KV cache. Callers order inputs so that equal weight sets and equal clients
/// are adjacent. The block itself is `runBlock` (Block.swift); this file is its GEMM runner. The run
/// state below is allocated once and grown only when a larger batch arrives.
public final class InferenceEngine {
    public let model: LanguageModel
    let architecture: ModelArchitecture
    /// The rotary embedding's frequencies (nil with learned positions).
    let rope: RoPE?

    // Run state: every activation buffer of a step (rows = all new tokens of the batch).
    private var capacityRows = 0
    var x = Tensor(zeros: [0])        // (N, C) residual stream
    var ln = Tensor(zeros: [0])       // (N, C) norm output
    var qkv = Tensor(zeros: [0])      // (N, qW + 2 kvW) [q | k | v]
    var att = Tensor(zeros: [0])      // (N, qW) attention output (heads concatenated)
    var proj = Tensor(zeros: [0])     // (N, C) projection output before the residual add
    var fc = Tensor(zeros: [0])       // (N, I) or (N, 2I): the MLP's input product; GELU runs in place
    var act = Tensor(zeros: [0])      // (N, I) SwiGLU's output (unused with GELU)
    var ropeCS = Tensor(zeros: [0])   // (N, hd) cos | sin of each new row's position
    var loraTmp = Tensor(zeros: [0])  // (N, max client rank)
    var scores = Tensor(zeros: [0])   // (maxT, maxT) attention scores of one head; (H / KV, context) on decode
    var lnOut = Tensor(zeros: [0])    // (M, C) final-norm rows that produce logits
    var logits = Tensor(zeros: [0])   // (M, V)
    // Small decode steps on the worker pool (DecodeStep.swift): per participant, its output rows of a
    // matrix-vector product for every sequence, private norm outputs, SwiGLU outputs, attention
    // scores, low-rank projections.
    let pool: WorkerPool
    var partials = Tensor(zeros: [0])      // (P, B * widest group output): each one's output rows, staged
    var privateLN = Tensor(zeros: [0])     // (P, B * C)
    var privateAct = Tensor(zeros: [0])    // (P, B * I) SwiGLU
    var privateScores = Tensor(zeros: [0]) // (P, context)
    var privateLoRA = Tensor(zeros: [0])   // (P, B * 2 * slots per group * max rank): client and per-token shared terms' s A x
    var lowRankT = Tensor(zeros: [0])      // (B * 2 * slots per group * max rank): the same, shared, when the participants split them
    var lowRankTerms: LowRankTerms?        // the last pooled step's, reused while the batch's pairs stay the same
    // Weights at f16, bf16 or q8_0 (ServingBase): each participant's inputs quantized for q8_0
    // weights, and one group's weight widened to f32 for a prefill GEMM.
    var q8Inputs: [Q8Activations] = []
    var widened = Tensor(zeros: [0])
    // A half-precision KV cache's keys and values of one layer widened to f32 for the prefill GEMMs.
    var kvPanel = Tensor(zeros: [0])

    /// Decode steps of at most this many sequences (one new token each) run on the worker pool
    /// (DecodeStep.swift); larger steps and every prefill run as GEMMs. 0 sends everything to GEMM.
    /// Both paths give the same logits within float rounding; `bench decode --pooled-rows` compares them.
    public var pooledRowLimit = InferenceEngine.maxPooledRows

    /// `pool` runs small decode steps; the default is the process-wide one.
    public init(model: LanguageModel, pool: WorkerPool = .shared) {
        self.model = model
        self.architecture = model.architecture
        self.rope = RoPE(model.architecture)
        self.pool = pool
    }

    func ensure(rows n: Int, outRows m: Int, maxT: Int, maxRank: Int) {
        let c = architecture, C = c.hiddenSize
        if n > capacityRows {
            capacityRows = max(n, capacityRows * 2 > n ? min(capacityRows * 2, n * 2) : n)
            let r = capacityRows
            x = Tensor(zeros: [r, C]); ln = Tensor(zeros: [r, C])
            qkv = Tensor(zeros: [r, c.group(.attnIn).outFeatures]); att = Tensor(zeros: [r, c.qWidth])
            proj = Tensor(zeros: [r, C]); fc = Tensor(zeros: [r, c.group(.mlpIn).outFeatures])
            if c.mlp == .swiglu { act = Tensor(zeros: [r, c.intermediateSize]) }
            if rope != nil { ropeCS = Tensor(zeros: [r, c.headDim]) }
        }
        if loraTmp.count < n * maxRank { loraTmp = Tensor(zeros: [max(capacityRows, n) * max(maxRank, 1)]) }
        let need = max(maxT * maxT, c.contextLength * (c.headCount / c.kvHeadCount))
        if scores.count < need { scores = Tensor(zeros: [need]) }
        if lnOut.rows < m || lnOut.count < m * C {
            lnOut = Tensor(zeros: [m, C]); logits = Tensor(zeros: [m, c.vocabSize])
        }
    }

    /// Runs one step and returns the logits: for each input in order, one row (its last new
    /// position) or, with `allLogits`, one row per new token. The returned tensor is a view of the
    /// engine's buffer, valid until the next step. Advances every cache by its new tokens.
    public func step(_ inputs: [StepInput]) throws -> Tensor {
        let c = architecture
        let C = c.hiddenSize
        var rowStart: [Int] = []
        var n = 0, m = 0, maxT = 1, maxRank = 0
        for inp in inputs {
            guard !inp.tokens.isEmpty else { throw ModelError.emptyPrompt }
            let total = inp.cache.length + inp.tokens.count
            guard total <= min(c.contextLength, inp.cache.capacity) else {
                throw ModelError.promptTooLong(tokens: total, context: min(c.contextLength, inp.cache.capacity))
            }
            for t in inp.tokens where t < 0 || t >= c.vocabSize { throw ModelError.badToken(t, vocab: c.vocabSize) }
            rowStart.append(n)
            n += inp.tokens.count
            m += inp.allLogits ? inp.tokens.count : 1
            if inp.tokens.count > 1 { maxT = max(maxT, total) }
            maxRank = max(maxRank, inp.client?.maxRank ?? 0, inp.weights.perTokenRank)
        }
        // Row ranges [r0, r1) of adjacent inputs sharing a weight set (callers order them so), and sharing a client.
        var weightSegs: [(LinearWeightSet, Int, Int)] = []
        for (i, inp) in inputs.enumerated() {
            let r0 = rowStart[i], r1 = r0 + inp.tokens.count
            if let last = weightSegs.last, last.0 === inp.weights, last.2 == r0 { weightSegs[weightSegs.count - 1].2 = r1 }
            else { weightSegs.append((inp.weights, r0, r1)) }
        }
        if n == inputs.count && n <= pooledRowLimit { return decodeRows(inputs, weightSegs) }
        ensure(rows: n, outRows: m, maxT: maxT, maxRank: maxRank)

        var clientSegs: [(ClientPairs, Int, Int)] = []
        for (i, inp) in inputs.enumerated() {
            let r0 = rowStart[i], r1 = r0 + inp.tokens.count
            if let cl = inp.client {
                if let last = clientSegs.last, last.0 === cl, last.2 == r0 { clientSegs[clientSegs.count - 1].2 = r1 }
                else { clientSegs.append((cl, r0, r1)) }
            }
        }
        // A shared pair kept per token (a half-precision base) is one more low-rank term for its rows.
        for (set, r0, r1) in weightSegs { if let p = set.perToken { clientSegs.append((p, r0, r1)) } }

        // Embeddings: x[row] = embed[token] (+ positions[position] when learned), and each row's rotary table.
        let w = model.base
        for (i, inp) in inputs.enumerated() {
            for (j, tok) in inp.tokens.enumerated() {
                let row = x.data + (rowStart[i] + j) * C
                w.embed.rowsToF32(tok..<(tok + 1), into: row)
                if let pos = w.positions { addInPlace(row, pos.data + (inp.cache.length + j) * C, count: C) }
                rope?.table(position: inp.cache.length + j, into: ropeCS.data + (rowStart[i] + j) * c.headDim)
            }
        }

        let runner = PrefillRunner(engine: self, inputs: inputs, rowStart: rowStart, rows: n, weightSegs: weightSegs, clientSegs: clientSegs)
        for l in 0..<c.layerCount { runBlock(runner, layer: l) }

        // Final norm on the rows that need logits, then the head: (M,C) @ (C,V) -> (M,V).
        var outRow = 0
        for (i, inp) in inputs.enumerated() {
            let t = inp.tokens.count
            let first = inp.allLogits ? 0 : t - 1
            for j in first..<t {
                normRows(c.norm, x.data + (rowStart[i] + j) * C, w.finalNorm.data, w.finalNormBias?.data, lnOut.data + outRow * C,
                         rows: 1, C: C, eps: c.normEps)
                outRow += 1
            }
            inp.cache.advance(by: t)
        }
        // (M,C) @ (V,C)^T -> (M,V)
        product(lnOut.data, rows: m, w.head, logits.data, wholeMatrix: false)
        return Tensor(viewing: logits.data, shape: [m, c.vocabSize], owner: logits)
    }

    /// out (N, gOut) = x (N, in) @ W^T + b per weight segment for one group, then + s (x A^T) B^T of
    /// each of the group's slots per client segment, into the slot's columns.
    fileprivate func groupLinear(_ xin: UnsafeMutablePointer<Float>, _ out: UnsafeMutablePointer<Float>, rows n: Int,
                                 layer l: Int, group gi: Int,
                                 _ weightSegs: [(LinearWeightSet, Int, Int)], _ clientSegs: [(ClientPairs, Int, Int)]) {
        let g = architecture.groups[gi]
        let din = g.inFeatures, dout = g.outFeatures
        for (set, r0, r1) in weightSegs {
            // (n,in) @ (out,in)^T -> (n,out)
            product(xin + r0 * din, rows: r1 - r0, set.weights[l][gi], out + r0 * dout)
        }
        if let b = model.base.layers[l].groupB[gi] { addBias(out, b.data, rows: n, cols: dout) }
        for (client, r0, r1) in clientSegs {
            for (s, off) in zip(g.slots, g.offsets) {
                guard let p = client.pairs[l][s] else { continue }
                let rows = r1 - r0, r = p.rank, so = architecture.slots[s].outFeatures
                if rows <= 4 {
                    lowRankRows(xin + r0 * din, out + r0 * dout + off, rows: rows, din: din, dout: so, stride: dout, pair: p)
                } else {
                    // (n,in) @ (in,r) -> (n,r); then s * (n,r) @ (r,out) accumulated into the slot's columns.
                    BLAS.gemm(xin + r0 * din, p.a.data, loraTmp.data, m: rows, n: r, k: din, transB: true, pool: pool)
                    BLAS.gemm(loraTmp.data, p.b.data, out + r0 * dout + off, m: rows, n: so, k: r, transB: true, ldc: dout,
                              alpha: p.scale, beta: 1, pool: pool)
                }
            }
        }
    }

    /// out (n, W.rows) = x (n, W.cols) @ W^T at W's precision. f32: OpenBLAS (gemv for one row).
    /// Otherwise up to `maxPooledRows` rows run the decode kernels on the worker pool (each weight
    /// row read once, at its precision); more rows widen W to f32 and run one sgemm: the whole
    /// matrix at once, widened by the pool (`wholeMatrix`, a group's weight: a few MB), or panel by
    /// panel on this thread (the head: 50k rows would be 150 MB).
    func product(_ xin: UnsafePointer<Float>, rows n: Int, _ w: WeightMatrix, _ out: UnsafeMutablePointer<Float>, wholeMatrix: Bool = true) {
        if let t = w.f32 {
            if n == 1 { BLAS.gemv(t.data, xin, out, m: w.rows, n: w.cols, pool: pool) }                              // (out,in) @ (in)
            else { BLAS.gemm(xin, t.data, out, m: n, n: w.rows, k: w.cols, transB: true, pool: pool) }                // (n,in) @ (out,in)^T
            return
        }
        if n <= InferenceEngine.maxPooledRows {
            ensureQ8Inputs()
            let q = q8Inputs
            pool.run { ctx in
                if w.precision == .q8_0 { q[ctx.index].quantize(xin, count: n, cols: w.cols) }
                ctx.chunks(w.rows, size: 64, phase: 0) { rows in
                    dotRows(w, xin, quantized: q[ctx.index], count: n, rows: rows, out, stride: w.rows)
                }
            }
            return
        }
        guard wholeMatrix else {
            gemmRows(xin, rows: n, w, out, panel: &widened, pool: pool)
            return
        }
        if widened.count < w.rows * w.cols { widened = Tensor(zeros: [w.rows * w.cols]) }
        let dst = widened.data
        pool.run { ctx in
            ctx.chunks(w.rows, size: 64, phase: 0) { rows in w.rowsToF32(rows, into: dst + rows.lowerBound * w.cols) }
        }
        BLAS.gemm(xin, dst, out, m: n, n: w.rows, k: w.cols, transB: true, pool: pool)                              // (n,in) @ (out,in)^T
    }

    /// One `Q8Activations` per pool participant.
    func ensureQ8Inputs() {
        if q8Inputs.count < pool.count { q8Inputs = (0..<pool.count).map { _ in Q8Activations() } }
    }

    /// The low-rank term for a few rows without BLAS call overhead: r dot products with the rows of A,
    /// then one contiguous pass over B (out, r) row-major. Output rows are `stride` floats apart.
    func lowRankRows(_ xin: UnsafeMutablePointer<Float>, _ out: UnsafeMutablePointer<Float>, rows: Int,
                     din: Int, dout: Int, stride: Int, pair p: LowRankPair) {
        let r = p.rank
        let t = loraTmp.data
        let b = p.b.data
        for row in 0..<rows {
            let xr = xin + row * din, orow = out + row * stride
            for j in 0..<r { t[j] = p.scale * dot(xr, p.a.data + j * din, din) }
            if r == 2 {
                let t0 = t[0], t1 = t[1]
                for o in 0..<dout { orow[o] += t0 * b[2 * o] + t1 * b[2 * o + 1] }
            } else {
                for o in 0..<dout {
                    var acc: Float = 0
                    for j in 0..<r { acc += t[j] * b[o * r + j] }
                    orow[o] += acc
                }
            }
        }
    }

    /// Causal self-attention of one sequence's t new rows over its cache (past L plus the new rows):
    /// the position step on the new q and k heads, the new keys and values into the cache, then per
    /// query head h over key/value head h / (H / KV).
    fileprivate func attention(layer l: Int, cache: KVCache, row0: Int, t: Int) {
        let a = architecture
        let H = a.headCount, KV = a.kvHeadCount, hd = a.headDim, qW = a.qWidth, kvW = a.kvWidth
        let W = a.group(.attnIn).outFeatures, perKV = H / KV
        let L = cache.length, T = L + t
        if a.hasPositionStep {
            let layer = model.base.layers[l]
            for j in 0..<t {
                positionStep(a, rope, qkv.data + (row0 + j) * W, heads: 0..<(H + KV), qNorm: layer.qNorm, kNorm: layer.kNorm,
                             cs: ropeCS.data + (row0 + j) * hd)
            }
        }
        // Append the new keys and values: a qkv row is [q | k | v] with heads side by side; the cache
        // is (KV, capacity, hd).
        for j in 0..<t {
            let src = qkv.data + (row0 + j) * W
            for h in 0..<KV { cache.store(layer: l, head: h, position: L + j, key: src + qW + h * hd, value: src + qW + kvW + h * hd, hd: hd) }
        }
        let scale = 1 / Float(hd).squareRoot()
        let sc = scores.data
        if t == 1 {
            // Decode: per KV head, its perKV query heads' scores over T cached keys, softmax, weighted sum of values.
            let q0 = qkv.data + row0 * W, o0 = att.data + row0 * qW
            for kvh in 0..<KV {
                cache.decodeGroup(layer: l, head: kvh, q: q0 + kvh * perKV * hd, heads: perKV, hd: hd, count: T, scale: scale,
                                  scores: sc, out: o0 + kvh * perKV * hd)
            }
            return
        }
        // The cache's rows as f32 (a half cache widened once per layer into `kvPanel`).
        if cache.precision != .f32, kvPanel.count < 2 * KV * T * hd { kvPanel = Tensor(zeros: [2 * KV * T * hd]) }
        let (kc, vc, cap) = cache.f32Rows(layer: l, count: T, kvHeads: KV, hd: hd, keys: kvPanel.data, values: kvPanel.data + KV * T * hd)
        // Prefill, causal: blocks of `attentionBlock` new rows; the rows [i0, i1) see the keys
        // [0, L + i1) only, so the masked upper triangle is (mostly) never computed: at 512 new rows
        // and blocks of 64 the two GEMMs do 56% of the full (t, T) products' work.
        var i0 = 0
        while i0 < t {
            let i1 = min(t, i0 + Self.attentionBlock), n = i1 - i0, Tb = L + i1
            for h in 0..<H {
                let q = qkv.data + (row0 + i0) * W + h * hd
                let o = att.data + (row0 + i0) * qW + h * hd
                let kvh = h / perKV
                let kh = kc + kvh * cap * hd, vh = vc + kvh * cap * hd
                // (n,hd) @ (hd,Tb) -> (n,Tb), causal softmax, (n,Tb) @ (Tb,hd) -> (n,hd).
                BLAS.gemm(q, kh, sc, m: n, n: Tb, k: hd, transB: true, lda: W, ldb: hd, ldc: Tb, alpha: scale, pool: pool)
                for i in 0..<n {
                    let valid = L + i0 + i + 1
                    softmaxInPlace(sc + i * Tb, count: valid)
                    if valid < Tb { (sc + i * Tb + valid).update(repeating: 0, count: Tb - valid) }
                }
                BLAS.gemm(sc, vh, o, m: n, n: hd, k: Tb, lda: Tb, ldb: hd, ldc: qW, pool: pool)
            }
            i0 = i1
        }
    }

    /// New rows per block of causal prefill attention (see `attention`).
    static let attentionBlock = 64
}

/// `runBlock`'s steps as GEMMs over every new row of a step (prefill, and decode steps too large for
/// the pool).
private struct PrefillRunner: BlockRunner {
    unowned let engine: InferenceEngine
    let inputs: [StepInput]
    let rowStart: [Int]
    let rows: Int
    let weightSegs: [(LinearWeightSet, Int, Int)]
    let clientSegs: [(ClientPairs, Int, Int)]

    func norm(_ site: NormSite, layer l: Int) {
        let e = engine, a = e.architecture
        let (w, b) = e.model.base.layers[l].norm(site)
        normRows(a.norm, e.x.data, w.data, b?.data, e.ln.data, rows: rows, C: a.hiddenSize, eps: a.normEps)
    }

    func linear(_ site: GroupSite, layer l: Int) {
        let e = engine
        switch site {
        case .attnIn:
            e.groupLinear(e.ln.data, e.qkv.data, rows: rows, layer: l, group: site.rawValue, weightSegs, clientSegs)
        case .attnOut:
            e.groupLinear(e.att.data, e.proj.data, rows: rows, layer: l, group: site.rawValue, weightSegs, clientSegs)
            addInPlace(e.x.data, e.proj.data, count: rows * e.architecture.hiddenSize)
        case .mlpIn:
            e.groupLinear(e.ln.data, e.fc.data, rows: rows, layer: l, group: site.rawValue, weightSegs, clientSegs)
        case .mlpOut:
            let input = e.architecture.mlp == .swiglu ? e.act : e.fc
            e.groupLinear(input.data, e.proj.data, rows: rows, layer: l, group: site.rawValue, weightSegs, clientSegs)
            addInPlace(e.x.data, e.proj.data, count: rows * e.architecture.hiddenSize)
        }
    }

    func attention(layer l: Int) {
        for (i, inp) in inputs.enumerated() {
            engine.attention(layer: l, cache: inp.cache, row0: rowStart[i], t: inp.tokens.count)
        }
    }

    func activation(layer l: Int) {
        let e = engine, I = e.architecture.intermediateSize
        switch e.architecture.mlp {
        case .gelu: geluForward(e.fc.data, e.fc.data, count: rows * I)
        case .swiglu: swigluForward(e.fc.data, e.act.data, rows: rows, I: I)
        }
    }
}

/// Dot product of n floats, 16 lanes at a time.
@inline(__always)
func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
    var acc0 = F16(), acc1 = F16()
    var i = 0
    while i + 32 <= n {
        acc0 += load16(a + i) * load16(b + i)
        acc1 += load16(a + i + 16) * load16(b + i + 16)
        i += 32
    }
    while i + 16 <= n { acc0 += load16(a + i) * load16(b + i); i += 16 }
    var s = hsum(acc0 + acc1)
    while i < n { s += a[i] * b[i]; i += 1 }
    return s
}

/// y += alpha * x over n floats.
@inline(__always)
func axpy(_ alpha: Float, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int) {
    let av = F16(repeating: alpha)
    var i = 0
    while i + 16 <= n { store16(load16(y + i) + av * load16(x + i), y + i); i += 16 }
    while i < n { y[i] += alpha * x[i]; i += 1 }
}
