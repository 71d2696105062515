import CQuant
import Foundation

// The decoder block, written once for every family and every way it is run (llm.c / llama2.c's
// `transformer()`): `runBlock` is the forward; `ModelTrainer.blockBackward` (Trainer.swift) its
// backward, in the reverse order of the same steps. Three runners execute the steps:
//
//   runner               rows                        linear algebra                     file
//   PrefillRunner        every new token of a batch  GEMM per weight set + client terms  InferenceEngine.swift
//   PooledDecodeRunner   one token of <= 12 seqs     SPMD matvec on the worker pool     DecodeStep.swift
//   TrainingBlockRunner  B x T, activations saved    GEMM + two LoRA levels             Trainer.swift
//
// Shapes: N rows, C hidden, H query heads and KV key/value heads of hd, qW = H hd, kvW = KV hd,
// I the MLP width; the four products are the architecture's `SlotGroup`s:
//   attnIn  (N,C)  @ (C, qW+2kvW) -> (N, [q | k | v])      GPT-2 c_attn; Llama q_proj, k_proj, v_proj
//   attnOut (N,qW) @ (qW, C)      -> (N,C), added to x      attn.c_proj; o_proj
//   mlpIn   (N,C)  @ (C, I or 2I) -> (N, [up] or [gate|up])  c_fc; gate_proj, up_proj
//   mlpOut  (N,I)  @ (I, C)       -> (N,C), added to x      mlp.c_proj; down_proj

/// The norms of a block.
enum NormSite { case attention, mlp }

/// What `runBlock` needs from whoever runs it. Each step reads the buffer the previous one wrote.
protocol BlockRunner {
    /// x (N,C) -> the norm's output (N,C): LayerNorm (GPT-2) or RMSNorm (Llama).
    func norm(_ site: NormSite, layer l: Int)
    /// One group's product over all rows, its biases and adapters' low-rank terms; `attnOut` and
    /// `mlpOut` add their output into the residual stream x.
    func linear(_ site: GroupSite, layer l: Int)
    /// [q | k | v] (N, qW+2kvW) -> (N, qW): per-head q/k norm and rotary positions when the family
    /// has them, the new keys and values into the caches, causal grouped-query attention.
    func attention(layer l: Int)
    /// mlpIn's output -> mlpOut's input (N, I): GELU, or SwiGLU silu(gate) * up.
    func activation(layer l: Int)
}

/// One decoder block's forward over a runner's rows (pre-norm residual block):
/// x += attnOut(attention(attnIn(norm1(x)))); x += mlpOut(act(mlpIn(norm2(x)))).
@inline(__always)
func runBlock<R: BlockRunner>(_ r: R, layer l: Int) {
    r.norm(.attention, layer: l)   // (N,C) -> (N,C)
    r.linear(.attnIn, layer: l)    // (N,C) @ (C,qW+2kvW) -> (N,qW+2kvW)
    r.attention(layer: l)          // (N,qW+2kvW) -> (N,qW)
    r.linear(.attnOut, layer: l)   // (N,qW) @ (qW,C) -> (N,C), x += it
    r.norm(.mlp, layer: l)         // (N,C) -> (N,C)
    r.linear(.mlpIn, layer: l)     // (N,C) @ (C,I or 2I) -> (N,I or 2I)
    r.activation(layer: l)         // (N,I or 2I) -> (N,I)
    r.linear(.mlpOut, layer: l)    // (N,I) @ (I,C) -> (N,C), x += it
}

// MARK: - Norms

extension ModelWeights {
    /// A block norm's weight and bias (LayerNorm only).
    func norm(_ site: NormSite, layer l: Int) -> (w: Tensor, b: Tensor?) {
        site == .attention ? (layers[l].attnNorm, layers[l].attnNormBias) : (layers[l].mlpNorm, layers[l].mlpNormBias)
    }
}

/// The family's norm over `rows` rows of width C; saves what the backward reads when asked
/// (LayerNorm: mean and 1/std; RMSNorm: 1/rms).
@inline(__always)
func normRows(_ kind: ModelArchitecture.Norm, _ x: UnsafePointer<Float>, _ w: UnsafePointer<Float>, _ b: UnsafePointer<Float>?,
              _ out: UnsafeMutablePointer<Float>, rows: Int, C: Int, eps: Float,
              mean: UnsafeMutablePointer<Float>? = nil, rstd: UnsafeMutablePointer<Float>? = nil) {
    switch kind {
    case .layerNorm: layerNormForward(x, w, b!, out, rows: rows, C: C, eps: eps, mean: mean, rstd: rstd)
    case .rmsNorm: rmsNormForward(x, w, out, rows: rows, C: C, eps: eps, rstd: rstd)
    }
}

/// out = x / sqrt(mean(x^2) + eps) * w for each of `rows` rows of width C (in that order of
/// operations, as Hugging Face's LlamaRMSNorm). Saves 1/rms per row when `rstd` is given.
func rmsNormForward(_ x: UnsafePointer<Float>, _ w: UnsafePointer<Float>, _ out: UnsafeMutablePointer<Float>,
                    rows: Int, C: Int, eps: Float, rstd: UnsafeMutablePointer<Float>? = nil) {
    let v = C / 16 * 16
    for r in 0..<rows {
        let xr = x + r * C, orow = out + r * C
        var acc = F16()
        var i = 0
        while i < v { let a = load16(xr + i); acc += a * a; i += 16 }
        var s = acc.sum()
        while i < C { s += xr[i] * xr[i]; i += 1 }
        let rs = 1 / (s / Float(C) + eps).squareRoot()
        let rsv = F16(repeating: rs)
        i = 0
        while i < v { store16((load16(xr + i) * rsv) * load16(w + i), orow + i); i += 16 }
        while i < C { orow[i] = (xr[i] * rs) * w[i]; i += 1 }
        rstd?[r] = rs
    }
}

/// Backward of RMSNorm, accumulating (dx +=, dw +=). With n = x r and g = w dout:
/// dx = r (g - n mean(g n)), dw = sum over rows of dout n.
func rmsNormBackward(_ dout: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ w: UnsafePointer<Float>, _ rstd: UnsafePointer<Float>,
                     dx: UnsafeMutablePointer<Float>, dw: UnsafeMutablePointer<Float>?, rows: Int, C: Int) {
    for r in 0..<rows {
        let d = dout + r * C, xr = x + r * C, dxr = dx + r * C
        let rs = rstd[r]
        var gn: Float = 0
        for i in 0..<C { gn += w[i] * d[i] * xr[i] * rs }
        gn /= Float(C)
        for i in 0..<C {
            let n = xr[i] * rs
            dxr[i] += rs * (w[i] * d[i] - n * gn)
            dw?[i] += d[i] * n
        }
    }
}

/// The family's norm backward (accumulating into dx, dw, db).
@inline(__always)
func normBackward(_ kind: ModelArchitecture.Norm, _ dout: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ w: UnsafePointer<Float>,
                  mean: UnsafePointer<Float>, rstd: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>,
                  dw: UnsafeMutablePointer<Float>?, db: UnsafeMutablePointer<Float>?, rows: Int, C: Int) {
    switch kind {
    case .layerNorm: layerNormBackward(dout, x, w, mean, rstd, dx: dx, dw: dw, db: db, rows: rows, C: C)
    case .rmsNorm: rmsNormBackward(dout, x, w, rstd, dx: dx, dw: dw, rows: rows, C: C)
    }
}

// MARK: - Rotary positions

/// Rotary embeddings as Hugging Face's Llama applies them (rotate-half pairing: element i turns with
/// element i + hd/2 by angle p * invFreq[i]), with the inverse frequencies of the config's scaling.
struct RoPE {
    let half: Int
    /// (hd/2) inverse frequencies after scaling.
    let invFreq: [Float]

    init(theta: Double, scaling: ModelArchitecture.RoPEScaling?, headDim hd: Int) {
        half = hd / 2
        var f = (0..<half).map { i in Float(1 / pow(theta, Double(Float(2 * i) / Float(hd)))) }
        switch scaling {
        case nil: break
        case let .linear(factor)?:
            f = f.map { Float(Double($0) / factor) }
        case let .llama3(factor, lo, hi, orig)?:
            // transformers' _compute_llama3_parameters: long wavelengths divided by factor, short kept,
            // a linear blend in between.
            let lowWavelen = Double(orig) / lo, highWavelen = Double(orig) / hi
            f = f.map { x in
                let inv = Double(x), wavelen = 2 * Double.pi / inv
                if wavelen < highWavelen { return x }
                if wavelen > lowWavelen { return Float(inv / factor) }
                let smooth = (Double(orig) / wavelen - lo) / (hi - lo)
                return Float((1 - smooth) * inv / factor + smooth * inv)
            }
        }
        invFreq = f
    }

    init?(_ a: ModelArchitecture) {
        guard case let .rope(theta, scaling) = a.positions else { return nil }
        self.init(theta: theta, scaling: scaling, headDim: a.headDim)
    }

    /// cos and sin of position p: cs[0..<half] cos, cs[half..<hd] sin (the angle rounded to f32 as torch does).
    func table(position p: Int, into cs: UnsafeMutablePointer<Float>) {
        for i in 0..<half {
            let angle = Double(Float(p) * invFreq[i])
            cs[i] = Float(cos(angle)); cs[half + i] = Float(sin(angle))
        }
    }

    /// Rotates one head vector in place: (x_i, x_{i+h}) -> (x_i c - x_{i+h} s, x_{i+h} c + x_i s).
    @inline(__always)
    func rotate(_ x: UnsafeMutablePointer<Float>, _ cs: UnsafePointer<Float>) { Self.rotate(x, cs, half: half) }

    @inline(__always)
    static func rotate(_ x: UnsafeMutablePointer<Float>, _ cs: UnsafePointer<Float>, half: Int) {
        for i in 0..<half {
            let c = cs[i], s = cs[half + i], a = x[i], b = x[half + i]
            x[i] = a * c - b * s
            x[half + i] = b * c + a * s
        }
    }

    /// The backward of `rotate` (the inverse rotation) on a gradient in place.
    @inline(__always)
    func rotateBack(_ d: UnsafeMutablePointer<Float>, _ cs: UnsafePointer<Float>) {
        for i in 0..<half {
            let c = cs[i], s = cs[half + i], a = d[i], b = d[half + i]
            d[i] = a * c + b * s
            d[half + i] = b * c - a * s
        }
    }
}

extension ModelArchitecture {
    /// Whether q and k change between attnIn and attention (per-head norms or rotary positions).
    var hasPositionStep: Bool {
        if qkNorm { return true }
        if case .rope = positions { return true }
        return false
    }
}

/// The position step of one row of [q | k | v] (width qW + 2kvW): Qwen3's per-head RMSNorm on q and
/// k, then the rotation of every q and k head by the row's position (`cs` from `RoPE.table`).
/// `heads` selects heads 0..<H (q) and H..<H+KV (k). Saves each head's 1/rms when `rstd` is given.
@inline(__always)
func positionStep(_ a: ModelArchitecture, _ rope: RoPE?, _ row: UnsafeMutablePointer<Float>, heads: Range<Int>,
                  qNorm: Tensor?, kNorm: Tensor?, cs: UnsafePointer<Float>, rstd: UnsafeMutablePointer<Float>? = nil) {
    PositionStep(a, rope).apply(row, heads: heads, qNorm: qNorm.map { UnsafePointer($0.data) }, kNorm: kNorm.map { UnsafePointer($0.data) },
                                cs: cs, rstd: rstd)
}

/// `positionStep` as plain values, which a pooled decode step's participants copy without touching
/// a reference count (`DecodePlan`).
struct PositionStep {
    let headCount: Int, headDim: Int
    let qkNorm: Bool
    let eps: Float
    let ropeHalf: Int   // 0: no rotary positions

    init(_ a: ModelArchitecture, _ rope: RoPE?) {
        headCount = a.headCount; headDim = a.headDim; qkNorm = a.qkNorm; eps = a.normEps; ropeHalf = rope?.half ?? 0
    }

    @inline(__always)
    func apply(_ row: UnsafeMutablePointer<Float>, heads: Range<Int>, qNorm: UnsafePointer<Float>?, kNorm: UnsafePointer<Float>?,
               cs: UnsafePointer<Float>, rstd: UnsafeMutablePointer<Float>? = nil) {
        // q heads, then the k heads right after them
        for h in heads { apply(head: h, at: row + h * headDim, qNorm: qNorm, kNorm: kNorm, cs: cs, rstd: rstd.map { $0 + h }) }
    }

    /// The step of head h (0..<H a query head, H... a key head) on the head vector at p.
    @inline(__always)
    func apply(head h: Int, at p: UnsafeMutablePointer<Float>, qNorm: UnsafePointer<Float>?, kNorm: UnsafePointer<Float>?,
               cs: UnsafePointer<Float>, rstd: UnsafeMutablePointer<Float>? = nil) {
        if qkNorm, let w = h < headCount ? qNorm : kNorm { rmsNormForward(p, w, p, rows: 1, C: headDim, eps: eps, rstd: rstd) }
        if ropeHalf > 0 { RoPE.rotate(p, cs, half: ropeHalf) }
    }
}

// MARK: - Activations

/// out[r, j] = silu(f[r, j]) * f[r, I + j] over `rows` rows of [gate | up] (2I wide).
func swigluForward(_ f: UnsafePointer<Float>, _ out: UnsafeMutablePointer<Float>, rows: Int, I: Int) {
    let v = I / 16 * 16
    let one = F16(repeating: 1)
    for r in 0..<rows {
        let g = f + r * 2 * I, u = g + I, o = out + r * I
        var j = 0
        while j < v {
            let x = load16(g + j)
            store16(x / (one + fastExp(-x)) * load16(u + j), o + j)
            j += 16
        }
        while j < I { let x = g[j]; o[j] = x / (1 + fastExp(-x)) * u[j]; j += 1 }
    }
}

/// Backward of SwiGLU: d gate = d out * up * silu'(gate), d up = d out * silu(gate), written (not
/// accumulated) into df (rows, 2I). silu'(x) = s (1 + x (1 - s)), s = sigmoid(x).
func swigluBackward(_ f: UnsafePointer<Float>, _ dout: UnsafePointer<Float>, _ df: UnsafeMutablePointer<Float>, rows: Int, I: Int) {
    for r in 0..<rows {
        let g = f + r * 2 * I, u = g + I, d = dout + r * I, dg = df + r * 2 * I, du = dg + I
        for j in 0..<I {
            let x = g[j], s = 1 / (1 + fastExp(-x))
            du[j] = d[j] * x * s
            dg[j] = d[j] * u[j] * s * (1 + x * (1 - s))
        }
    }
}

// MARK: - Attention

/// Decode attention of the `g` query heads that share one key/value head (grouped-query attention;
/// g = 1 without grouping): per head, scores of q against T cached keys, softmax, the weighted sum of
/// the values. The g query heads (and their outputs) are adjacent, `hd` floats apart; keys and values
/// are rows `hd` floats apart. `scores` holds g * T floats. hd = 64 goes to `decodeGroup64`.
@inline(__always)
func decodeGroup(q: UnsafePointer<Float>, heads g: Int, k: UnsafePointer<Float>, v: UnsafePointer<Float>, hd: Int, count T: Int,
                 scale: Float, scores sc: UnsafeMutablePointer<Float>, out o: UnsafeMutablePointer<Float>) {
    if hd == 64 {
        decodeGroup64(q: q, heads: g, k: k, v: v, count: T, scale: scale, scores: sc, out: o)
        return
    }
    for i in 0..<g {
        let qi = q + i * hd, oi = o + i * hd
        for j in 0..<T { sc[j] = scale * dot(qi, k + j * hd, hd) }
        softmaxInPlace(sc, count: T)
        oi.update(repeating: 0, count: hd)
        for j in 0..<T { axpy(sc[j], v + j * hd, oi, hd) }
    }
}

/// `decodeGroup` for hd = 64 (every GPT-2 size, SmolLM2, Llama-3.2), in C: the scores of eight keys at
/// a time, up to three query heads x four keys in registers so each key is loaded once for the heads
/// that share it (`pf2lora_attention_scores64`), each head's scores through exp, then the value pass
/// (`pf2lora_attention_values64`: each value row loaded once for up to three heads, all 64 outputs in
/// registers with AVX-512F, half of them per pass with AVX2), the softmax's 1 / sum applied once to
/// the outputs.
@inline(__always)
func decodeGroup64(q: UnsafePointer<Float>, heads g: Int, k: UnsafePointer<Float>, v: UnsafePointer<Float>, count T: Int,
                   scale: Float, scores sc: UnsafeMutablePointer<Float>, out o: UnsafeMutablePointer<Float>) {
    pf2lora_attention_scores64(q, g, k, T, scale, sc)
    withUnsafeTemporaryAllocation(of: Float.self, capacity: g) { inv in
        for i in 0..<g { inv[i] = 1 / expShiftedInPlace(sc + i * T, count: T).1 }
        pf2lora_attention_values64(sc, g, T, v, inv.baseAddress!, o)
    }
}

/// `decodeGroup` over a half-precision cache (`KVCache` at f16): keys and values are rows of `hd`
/// IEEE halves, widened exactly as they are read, so the result is `decodeGroup`'s on the widened
/// rows within f32 summation order. hd = 64 runs in C as `decodeGroup64` (`pf2lora_attention_scores64_f16`:
/// the f32 kernel's bits on the widened keys, each key chunk widened once in registers for up to three
/// heads; `pf2lora_attention_values64_f16`); other head sizes widen one row at a time.
@inline(__always)
func decodeGroupHalf(q: UnsafePointer<Float>, heads g: Int, k: UnsafePointer<UInt16>, v: UnsafePointer<UInt16>, hd: Int, count T: Int,
                     scale: Float, scores sc: UnsafeMutablePointer<Float>, out o: UnsafeMutablePointer<Float>) {
    if hd == 64 {
        pf2lora_attention_scores64_f16(q, g, k, T, scale, sc)
        withUnsafeTemporaryAllocation(of: Float.self, capacity: g) { inv in
            for i in 0..<g { inv[i] = 1 / expShiftedInPlace(sc + i * T, count: T).1 }
            pf2lora_attention_values64_f16(sc, g, T, v, inv.baseAddress!, o)
        }
        return
    }
    withUnsafeTemporaryAllocation(of: Float.self, capacity: hd) { buf in
        let row = buf.baseAddress!
        for i in 0..<g {
            let qi = q + i * hd, oi = o + i * hd
            for j in 0..<T {
                pf2lora_f16_to_f32(k + j * hd, row, hd)
                sc[j] = scale * dot(qi, row, hd)
            }
            softmaxInPlace(sc, count: T)
            oi.update(repeating: 0, count: hd)
            for j in 0..<T {
                pf2lora_f16_to_f32(v + j * hd, row, hd)
                axpy(sc[j], row, oi, hd)
            }
        }
    }
}
