import Foundation

// The element-wise and row-wise kernels of the GPT-2 block, forward next to backward.
// All work on raw f32 pointers, 16 lanes at a time with a scalar tail; matrix products are in BLAS.

typealias F16 = SIMD16<Float>

@inline(__always) func load16(_ p: UnsafePointer<Float>) -> F16 {
    UnsafeRawPointer(p).loadUnaligned(as: F16.self)
}
@inline(__always) func store16(_ v: F16, _ p: UnsafeMutablePointer<Float>) {
    UnsafeMutableRawPointer(p).storeBytes(of: v, as: F16.self)
}
/// The sum of 16 lanes by halving; the generic `SIMD.sum()` was left as a call in hot loops.
@inline(__always) func hsum(_ v: F16) -> Float {
    let a = v.lowHalf + v.highHalf, b = a.lowHalf + a.highHalf, c = b.lowHalf + b.highHalf
    return c[0] + c[1]
}

/// exp(x) for 16 lanes: range reduction x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r,
/// and 2^n through the exponent bits. Relative error about 2e-7 over the float range.
/// Only plain lane-wise arithmetic, compare-and-replace and bit casts: the generic SIMD `clamped`,
/// `pointwiseMin/Max`, `rounded` and float-to-int conversions are not vectorized by the compiler on
/// Linux and cost 10-100x (they made this kernel the top of the training profile). n is rounded with the 1.5 * 2^23 trick, which also leaves n's
/// integer value in the low mantissa bits.
@inline(__always) func fastExp(_ x0: F16) -> F16 {
    let lo = F16(repeating: -87.3), hi = F16(repeating: 88.7)
    let x = x0.replacing(with: lo, where: x0 .< lo).replacing(with: hi, where: x0 .> hi)
    let magic = F16(repeating: 12582912)                  // 1.5 * 2^23
    let shifted = x * 1.442695040888963 + magic
    let n = shifted - magic                               // round(x / ln2), to nearest even
    let r = x - n * 0.693145751953125 - n * 1.428606765330187e-06
    var p = F16(repeating: 1.0 / 720)
    p = p * r + 1.0 / 120
    p = p * r + 1.0 / 24
    p = p * r + 1.0 / 6
    p = p * r + 0.5
    p = p * r + 1
    p = p * r + 1
    let ni = unsafeBitCast(shifted, to: SIMD16<Int32>.self) &- 0x4B40_0000   // n as an integer
    let bits = (ni &+ 127) &<< 23
    return p * unsafeBitCast(bits, to: F16.self)
}

@inline(__always) func fastExp(_ x: Float) -> Float { fastExp(F16(repeating: x))[0] }

// MARK: - Layer norm

/// out = (x - mean) / sqrt(var + eps) * w + b for each of `rows` rows of width C.
/// Saves mean and 1/std per row when `mean`/`rstd` are given (for the backward pass).
func layerNormForward(_ x: UnsafePointer<Float>, _ w: UnsafePointer<Float>, _ b: UnsafePointer<Float>,
                      _ out: UnsafeMutablePointer<Float>, rows: Int, C: Int, eps: Float,
                      mean: UnsafeMutablePointer<Float>? = nil, rstd: UnsafeMutablePointer<Float>? = nil) {
    let v = C / 16 * 16
    for r in 0..<rows {
        let xr = x + r * C, orow = out + r * C
        var acc = F16()
        var i = 0
        while i < v { acc += load16(xr + i); i += 16 }
        var s = acc.sum()
        while i < C { s += xr[i]; i += 1 }
        let m = s / Float(C)
        var acc2 = F16()
        i = 0
        let mv = F16(repeating: m)
        while i < v { let d = load16(xr + i) - mv; acc2 += d * d; i += 16 }
        var s2 = acc2.sum()
        while i < C { let d = xr[i] - m; s2 += d * d; i += 1 }
        let rs = 1 / (s2 / Float(C) + eps).squareRoot()
        let rsv = F16(repeating: rs)
        i = 0
        while i < v { store16((load16(xr + i) - mv) * rsv * load16(w + i) + load16(b + i), orow + i); i += 16 }
        while i < C { orow[i] = (xr[i] - m) * rs * w[i] + b[i]; i += 1 }
        mean?[r] = m
        rstd?[r] = rs
    }
}

/// Backward of layer norm. dx += ..., dw += ..., db += ... (accumulating, as llm.c does).
/// With norm = (x - mean) rstd and dnorm = w dout: dx = rstd (dnorm - mean(dnorm) - norm mean(dnorm norm)).
func layerNormBackward(_ dout: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ w: UnsafePointer<Float>,
                       _ mean: UnsafePointer<Float>, _ rstd: UnsafePointer<Float>,
                       dx: UnsafeMutablePointer<Float>, dw: UnsafeMutablePointer<Float>?, db: UnsafeMutablePointer<Float>?,
                       rows: Int, C: Int) {
    let v = C / 16 * 16
    for r in 0..<rows {
        let d = dout + r * C, xr = x + r * C, dxr = dx + r * C
        let m = mean[r], rs = rstd[r]
        let mv = F16(repeating: m), rsv = F16(repeating: rs)
        var a1 = F16(), a2 = F16()
        var i = 0
        while i < v {
            let norm = (load16(xr + i) - mv) * rsv
            let dnorm = load16(w + i) * load16(d + i)
            a1 += dnorm; a2 += dnorm * norm
            i += 16
        }
        var dnormMean = a1.sum(), dnormNormMean = a2.sum()
        while i < C {
            let norm = (xr[i] - m) * rs
            let dnorm = w[i] * d[i]
            dnormMean += dnorm; dnormNormMean += dnorm * norm
            i += 1
        }
        dnormMean /= Float(C)
        dnormNormMean /= Float(C)
        let dmv = F16(repeating: dnormMean), dnmv = F16(repeating: dnormNormMean)
        i = 0
        while i < v {
            let norm = (load16(xr + i) - mv) * rsv
            let dd = load16(d + i)
            let dnorm = load16(w + i) * dd
            if let db { store16(load16(db + i) + dd, db + i) }
            if let dw { store16(load16(dw + i) + norm * dd, dw + i) }
            store16(load16(dxr + i) + (dnorm - dmv - norm * dnmv) * rsv, dxr + i)
            i += 16
        }
        while i < C {
            let norm = (xr[i] - m) * rs
            let dnorm = w[i] * d[i]
            db?[i] += d[i]
            dw?[i] += norm * d[i]
            dxr[i] += (dnorm - dnormMean - norm * dnormNormMean) * rs
            i += 1
        }
    }
}

// MARK: - GELU (tanh approximation, GPT-2's gelu_new)

private let geluK0: Float = 0.7978845608028654   // sqrt(2/pi)
private let geluK1: Float = 0.044715

/// out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), for n elements (out may equal x).
func geluForward(_ x: UnsafePointer<Float>, _ out: UnsafeMutablePointer<Float>, count n: Int) {
    let v = n / 16 * 16
    var i = 0
    while i < v {
        let a = load16(x + i)
        let u = geluK0 * (a + geluK1 * a * a * a)
        let t = 1 - 2 / (fastExp(2 * u) + 1)
        store16(0.5 * a * (1 + t), out + i)
        i += 16
    }
    while i < n {
        let a = x[i]
        out[i] = 0.5 * a * (1 + tanh(geluK0 * (a + geluK1 * a * a * a)))
        i += 1
    }
}

/// dx += dout * gelu'(x).
func geluBackward(_ x: UnsafePointer<Float>, _ dout: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>, count n: Int) {
    for i in 0..<n {
        let a = x[i]
        let u = geluK0 * (a + geluK1 * a * a * a)
        let t = tanh(u)
        let sech2 = 1 - t * t
        let local = 0.5 * (1 + t) + 0.5 * a * sech2 * geluK0 * (1 + 3 * geluK1 * a * a)
        dx[i] += local * dout[i]
    }
}

// MARK: - Softmax, bias, residual

/// Overwrites the first n entries with exp(x - max) and returns (max, sum of the exps): the shared
/// pass of softmax and cross-entropy. One exp per entry.
@inline(__always)
func expShiftedInPlace(_ p: UnsafeMutablePointer<Float>, count n: Int) -> (max: Float, sum: Float) {
    let v = n / 16 * 16
    var mx = -Float.infinity
    var i = 0
    if v > 0 {
        var m16 = F16(repeating: -.infinity)
        while i < v { let x = load16(p + i); m16 = m16.replacing(with: x, where: x .> m16); i += 16 }   // not pointwiseMax: scalarized
        mx = m16.max()
    }
    while i < n { mx = max(mx, p[i]); i += 1 }
    let mv = F16(repeating: mx)
    var acc = F16()
    i = 0
    while i < v { let e = fastExp(load16(p + i) - mv); store16(e, p + i); acc += e; i += 16 }
    var s = acc.sum()
    while i < n { let e = fastExp(p[i] - mx); p[i] = e; s += e; i += 1 }
    return (mx, s)
}

/// p *= c over n entries.
@inline(__always)
func scaleInPlace(_ p: UnsafeMutablePointer<Float>, _ c: Float, count n: Int) {
    let v = n / 16 * 16
    let cv = F16(repeating: c)
    var i = 0
    while i < v { store16(load16(p + i) * cv, p + i); i += 16 }
    while i < n { p[i] *= c; i += 1 }
}

/// In-place softmax of the first n entries of a row (entries past n are left alone).
@inline(__always)
func softmaxInPlace(_ p: UnsafeMutablePointer<Float>, count n: Int) {
    let (_, s) = expShiftedInPlace(p, count: n)
    scaleInPlace(p, 1 / s, count: n)
}

/// out[r, :] += bias for each row.
func addBias(_ out: UnsafeMutablePointer<Float>, _ bias: UnsafePointer<Float>, rows: Int, cols: Int) {
    let v = cols / 16 * 16
    for r in 0..<rows {
        let o = out + r * cols
        var i = 0
        while i < v { store16(load16(o + i) + load16(bias + i), o + i); i += 16 }
        while i < cols { o[i] += bias[i]; i += 1 }
    }
}

/// y += x over n elements.
@inline(__always)
func addInPlace(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, count n: Int) {
    let v = n / 16 * 16
    var i = 0
    while i < v { store16(load16(y + i) + load16(x + i), y + i); i += 16 }
    while i < n { y[i] += x[i]; i += 1 }
}
