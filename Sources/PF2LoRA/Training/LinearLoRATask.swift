import Foundation

/// Rows of one client's data: inputs x (n, dIn) and targets y (n, dOut).
public struct RegressionData {
    public let x: Tensor
    public let y: Tensor
    public var count: Int { x.rows }
    public init(x: Tensor, y: Tensor) {
        precondition(x.rows == y.rows, "RegressionData: \(x.rows) inputs, \(y.rows) targets")
        self.x = x; self.y = y
    }
}

/// A linear model y = W x with one LoRA-adapted layer: the `FederatedTask` of the synthetic experiment.
///
///     prediction = X W0^T + s1 (X A^T) B^T + s2 (X C^T) D^T        X (N, dIn) -> (N, dOut)
///     loss       = mean over the N x dOut entries of (prediction - Y)^2   (MSE)
///
/// Gradients are in closed form through the low-rank factors, never forming a (dOut, dIn) matrix.
public final class LinearLoRATask: FederatedTask {
    public let module: LoRAModule
    /// Frozen base weight (dOut, dIn).
    public let w0: Tensor
    public let train: [RegressionData]
    public let valid: [RegressionData]
    public let test: [RegressionData]
    /// Minibatch size of `lossAndGradients`; a client with fewer examples uses all of them.
    public var batchSize: Int

    // Scratch, grown on demand and reused (the training loop allocates nothing once warm).
    private var xb = Tensor(zeros: [1]), yb = Tensor(zeros: [1]), pred = Tensor(zeros: [1])
    private var low = Tensor(zeros: [1]), back = Tensor(zeros: [1])

    public init(w0: Tensor, train: [RegressionData], valid: [RegressionData], test: [RegressionData],
                batchSize: Int, name: String = "linear") {
        precondition(train.count == valid.count && train.count == test.count && !train.isEmpty)
        self.w0 = w0
        self.module = LoRAModule(name: name, dIn: w0.cols, dOut: w0.rows)
        self.train = train; self.valid = valid; self.test = test
        self.batchSize = batchSize
    }

    public var clientCount: Int { train.count }
    public var modules: [LoRAModule] { [module] }
    public func exampleCount(client: Int) -> Int { train[client].count }

    private static func ensure(_ t: inout Tensor, _ n: Int) { if t.count < n { t = Tensor(zeros: [n]) } }

    public func lossAndGradients(client: Int, adapter: TwoLevelAdapter, sharedGrad: ParameterSet?,
                                 localGrad: ParameterSet?, rng: inout RNG) -> Float {
        let data = train[client]
        let n = min(batchSize, data.count)
        let dIn = module.dIn, dOut = module.dOut
        Self.ensure(&xb, n * dIn); Self.ensure(&yb, n * dOut)
        if n == data.count {
            xb.data.update(from: data.x.data, count: n * dIn)
            yb.data.update(from: data.y.data, count: n * dOut)
        } else {
            for (row, i) in rng.sample(n, from: data.count).enumerated() {
                (xb.data + row * dIn).update(from: data.x.data + i * dIn, count: dIn)
                (yb.data + row * dOut).update(from: data.y.data + i * dOut, count: dOut)
            }
        }
        return pass(x: xb.data, y: yb.data, n: n, adapter: adapter, sharedGrad: sharedGrad, localGrad: localGrad)
    }

    public func evaluate(client: Int, adapter: TwoLevelAdapter, split: Split) -> Float {
        let data: RegressionData
        switch split {
        case .train: data = train[client]
        case .valid: data = valid[client]
        case .test: data = test[client]
        }
        return pass(x: data.x.data, y: data.y.data, n: data.count, adapter: adapter, sharedGrad: nil, localGrad: nil)
    }

    /// Forward and (when gradient sets are given) backward over n rows.
    private func pass(x: UnsafeMutablePointer<Float>, y: UnsafeMutablePointer<Float>, n: Int,
                      adapter: TwoLevelAdapter, sharedGrad: ParameterSet?, localGrad: ParameterSet?) -> Float {
        let dIn = module.dIn, dOut = module.dOut, m = module.name
        Self.ensure(&pred, n * dOut)
        // Base: (N,dIn) @ (dIn,dOut) -> (N,dOut)   [W0 is stored (dOut,dIn)]
        BLAS.gemm(x, w0.data, pred.data, m: n, n: dOut, k: dIn, transB: true)

        // Low-rank terms. low holds X A^T then X C^T side by side: (N, r) and (N, r2).
        var levels: [(down: Tensor, up: Tensor, scale: Float, grad: ParameterSet?, level: LoRALevel, offset: Int)] = []
        var width = 0
        if let s = adapter.shared {
            let (a, b) = loraPair(s, level: .shared, module: m)
            levels.append((a, b, adapter.sharedScale, sharedGrad, .shared, width)); width += a.rows
        }
        if let l = adapter.local {
            let (c, d) = loraPair(l, level: .client, module: m)
            levels.append((c, d, adapter.localScale, localGrad, .client, width)); width += c.rows
        }
        Self.ensure(&low, max(1, n * width)); Self.ensure(&back, max(1, n * width))
        for lv in levels {
            let r = lv.down.rows
            let xa = low.data + n * lv.offset
            BLAS.gemm(x, lv.down.data, xa, m: n, n: r, k: dIn, transB: true)                  // (N,dIn) @ (dIn,r) -> (N,r)
            BLAS.gemm(xa, lv.up.data, pred.data, m: n, n: dOut, k: r, transB: true, alpha: lv.scale, beta: 1)  // (N,r) @ (r,dOut)
        }

        // Residual and loss; the residual becomes dLoss/dPrediction in place.
        let total = n * dOut
        BLAS.axpy(total, -1, y, pred.data)
        let loss = BLAS.dot(total, pred.data, pred.data) / Float(total)
        let wantAny = levels.contains { $0.grad != nil }
        guard wantAny else { return loss }
        let g = pred.data
        let c = 2 / Float(total)
        for i in 0..<total { g[i] *= c }

        for lv in levels {
            guard let grad = lv.grad else { continue }
            let r = lv.down.rows
            let xa = low.data + n * lv.offset
            let (gDown, gUp) = loraPair(grad, level: lv.level, module: m)
            precondition(gDown.shape == lv.down.shape && gUp.shape == lv.up.shape, "gradient layout differs from the adapter's")
            // dUp = s * G^T (X A^T): (dOut,N) @ (N,r) -> (dOut,r)
            BLAS.gemm(g, xa, gUp.data, m: dOut, n: r, k: n, transA: true, alpha: lv.scale)
            // G B: (N,dOut) @ (dOut,r) -> (N,r);  dDown = s * (G B)^T X: (r,N) @ (N,dIn) -> (r,dIn)
            let gb = back.data + n * lv.offset
            BLAS.gemm(g, lv.up.data, gb, m: n, n: r, k: dOut)
            BLAS.gemm(gb, x, gDown.data, m: r, n: dIn, k: n, transA: true, alpha: lv.scale)
        }
        return loss
    }
}
