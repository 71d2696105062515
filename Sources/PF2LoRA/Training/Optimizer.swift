import Foundation

/// A first-order optimizer over a `ParameterSet`, with PyTorch's update rules.
/// The learning rate is passed to every step so that a schedule can drive it.
public protocol Optimizer: AnyObject {
    /// Updates `params` in place from `grads` (same layout). `grads` is not modified.
    func step(_ params: ParameterSet, _ grads: ParameterSet, lr: Float)
    /// Forgets all state (momentum buffers, moments, step count).
    func reset()
}

/// `torch.optim.SGD`: optional momentum (with dampening and Nesterov) and L2 weight decay added to
/// the gradient. The momentum buffer starts as the first gradient, as PyTorch does.
public final class SGD: Optimizer {
    public var momentum: Float
    public var dampening: Float
    public var weightDecay: Float
    public var nesterov: Bool
    private var buffers: [String: Tensor] = [:]

    public init(momentum: Float = 0, dampening: Float = 0, weightDecay: Float = 0, nesterov: Bool = false) {
        self.momentum = momentum; self.dampening = dampening
        self.weightDecay = weightDecay; self.nesterov = nesterov
    }

    public func reset() { buffers.removeAll() }

    public func step(_ params: ParameterSet, _ grads: ParameterSet, lr: Float) {
        for (name, p) in params.entries {
            let g = grads.tensor(name)
            let n = p.count
            let pd = p.data, gd = g.data
            if momentum == 0 {
                for i in 0..<n { pd[i] -= lr * (gd[i] + weightDecay * pd[i]) }
                continue
            }
            let fresh = buffers[name] == nil
            let buf = buffers[name] ?? Tensor(zeros: p.shape)
            buffers[name] = buf
            let b = buf.data
            for i in 0..<n {
                let d = gd[i] + weightDecay * pd[i]
                b[i] = fresh ? d : momentum * b[i] + (1 - dampening) * d
                let u = nesterov ? d + momentum * b[i] : b[i]
                pd[i] -= lr * u
            }
        }
    }
}

/// `torch.optim.AdamW`: decoupled weight decay (p *= 1 - lr * wd), bias-corrected moments,
/// eps added to the bias-corrected square root, exactly as PyTorch's single-tensor path.
public final class AdamW: Optimizer {
    public var beta1: Float
    public var beta2: Float
    public var eps: Float
    public var weightDecay: Float
    private var m: [String: Tensor] = [:]
    private var v: [String: Tensor] = [:]
    /// Number of steps taken since the last reset.
    public private(set) var stepCount = 0

    public init(beta1: Float = 0.9, beta2: Float = 0.999, eps: Float = 1e-8, weightDecay: Float = 0.01) {
        self.beta1 = beta1; self.beta2 = beta2; self.eps = eps; self.weightDecay = weightDecay
    }

    public func reset() { m.removeAll(); v.removeAll(); stepCount = 0 }

    /// The moments (by parameter name) and step count, for checkpoints. The tensors are the live ones.
    public var state: (step: Int, m: [String: Tensor], v: [String: Tensor]) { (stepCount, m, v) }

    /// Restores a checkpointed `state` (the tensors are copied).
    public func restore(step: Int, m: [String: Tensor], v: [String: Tensor]) {
        stepCount = step
        self.m = m.mapValues { $0.clone() }
        self.v = v.mapValues { $0.clone() }
    }

    public func step(_ params: ParameterSet, _ grads: ParameterSet, lr: Float) {
        stepCount += 1
        let t = Float(stepCount)
        let bc1 = 1 - pow(beta1, t)
        let bc2Sqrt = (1 - pow(beta2, t)).squareRoot()
        let stepSize = lr / bc1
        for (name, p) in params.entries {
            let g = grads.tensor(name)
            let mt = m[name] ?? Tensor(zeros: p.shape); m[name] = mt
            let vt = v[name] ?? Tensor(zeros: p.shape); v[name] = vt
            let pd = p.data, gd = g.data, md = mt.data, vd = vt.data
            let decay = 1 - lr * weightDecay
            for i in 0..<p.count {
                pd[i] *= decay
                md[i] = beta1 * md[i] + (1 - beta1) * gd[i]
                vd[i] = beta2 * vd[i] + (1 - beta2) * gd[i] * gd[i]
                let denom = vd[i].squareRoot() / bc2Sqrt + eps
                pd[i] -= stepSize * md[i] / denom
            }
        }
    }
}

/// `torch.nn.utils.clip_grad_norm_` with the L2 norm: scales `grads` in place by
/// min(1, maxNorm / (norm + 1e-6)) and returns the norm before clipping.
@discardableResult
public func clipGradNorm(_ grads: ParameterSet, maxNorm: Float) -> Float {
    let norm = grads.globalNorm()
    let coef = maxNorm / (norm + 1e-6)
    if coef < 1 { grads.scale(coef) }
    return norm
}

/// Linear warm-up from 0 to the base rate over `warmupSteps`, then a half-cosine down to
/// `minRatio` x base at `totalSteps` (transformers' `get_cosine_schedule_with_warmup` when minRatio = 0).
public struct LRSchedule: Sendable, Equatable {
    public var base: Float
    public var warmupSteps: Int
    public var totalSteps: Int
    public var minRatio: Float

    public init(base: Float, warmupSteps: Int = 0, totalSteps: Int, minRatio: Float = 0) {
        self.base = base; self.warmupSteps = warmupSteps; self.totalSteps = totalSteps; self.minRatio = minRatio
    }

    /// A constant rate.
    public static func constant(_ lr: Float) -> LRSchedule { LRSchedule(base: lr, totalSteps: 0, minRatio: 1) }

    /// The rate for 0-based `step`.
    public func lr(at step: Int) -> Float {
        if step < warmupSteps { return base * Float(step) / Float(max(1, warmupSteps)) }
        if totalSteps <= warmupSteps { return base }
        let progress = min(1, Double(step - warmupSteps) / Double(max(1, totalSteps - warmupSteps)))
        let cosine = 0.5 * (1 + Foundation.cos(Double.pi * progress))
        return base * Float(Double(minRatio) + (1 - Double(minRatio)) * cosine)
    }
}
