import Foundation

// Element-wise and row-wise kernels only the training path uses, forward next to backward, 16 lanes at a
// time with a scalar tail (the shared ones, layer norm, gelu, softmax, are in Kernels.swift).

/// out = a + b over n elements (the residual add; out may alias a).
func residualForward(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ out: UnsafeMutablePointer<Float>, count n: Int) {
    let v = n / 16 * 16
    var i = 0
    while i < v { store16(load16(a + i) + load16(b + i), out + i); i += 16 }
    while i < n { out[i] = a[i] + b[i]; i += 1 }
}
// The residual's backward is the identity: the gradient flows to both inputs unchanged (dresid is reused).

private let gK0: Float = 0.7978845608028654   // sqrt(2/pi)
private let gK1: Float = 0.044715

/// d *= gelu'(x) over n elements (the tanh approximation, gelu_new): the in-place backward of `geluForward`.
func geluBackwardInPlace(_ x: UnsafePointer<Float>, _ d: UnsafeMutablePointer<Float>, count n: Int) {
    let v = n / 16 * 16
    var i = 0
    while i < v {
        let a = load16(x + i)
        let a2 = a * a
        let u = gK0 * (a + gK1 * a2 * a)
        let one = F16(repeating: 1)
        let e: F16 = fastExp(2 * u)
        let t: F16 = one - 2 / (e + one)                 // tanh(u)
        let sech2: F16 = one - t * t
        let inner: F16 = gK0 * (one + (3 * gK1) * a2)
        let local: F16 = 0.5 * (one + t) + (0.5 * a) * sech2 * inner
        store16(local * load16(d + i), d + i)
        i += 16
    }
    while i < n {
        let a = x[i]
        let t = tanh(gK0 * (a + gK1 * a * a * a))
        d[i] *= 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * gK0 * (1 + 3 * gK1 * a * a)
        i += 1
    }
}

/// Softmax backward of one attention row, in place: dp[j] <- p[j] (dp[j] - sum_k p[k] dp[k]) for
/// j < n; entries n..<zeroTo (masked, p = 0) are set to 0.
@inline(__always)
func softmaxBackwardRow(_ p: UnsafePointer<Float>, _ dp: UnsafeMutablePointer<Float>, count n: Int, zeroTo: Int) {
    let v = n / 16 * 16
    var acc = F16()
    var i = 0
    while i < v { acc += load16(p + i) * load16(dp + i); i += 16 }
    var s = acc.sum()
    while i < n { s += p[i] * dp[i]; i += 1 }
    let sv = F16(repeating: s)
    i = 0
    while i < v { store16(load16(p + i) * (load16(dp + i) - sv), dp + i); i += 16 }
    while i < n { dp[i] = p[i] * (dp[i] - s); i += 1 }
    if n < zeroTo { (dp + n).update(repeating: 0, count: zeroTo - n) }
}

/// Cross-entropy of one row of logits against `target`: log-sum-exp minus the target's logit, in
/// double. With `gradScale`, overwrites the row with its gradient (softmax - onehot) * gradScale;
/// otherwise the row is left holding exp(logit - max). One exp per logit.
func crossEntropyRow(_ logits: UnsafeMutablePointer<Float>, count n: Int, target: Int, gradScale: Float?) -> Double {
    let targetLogit = logits[target]
    let (mx, s) = expShiftedInPlace(logits, count: n)
    let loss = Double(mx) + Foundation.log(Double(s)) - Double(targetLogit)
    if let g = gradScale {
        scaleInPlace(logits, 1 / s * g, count: n)
        logits[target] -= g
    }
    return loss
}
