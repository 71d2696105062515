import Foundation

/// PF2LoRA's bilevel round (DESIGN §2, docs/METHOD.md).
///
/// Server state: x = {A, B} of rank r. Client state: y_k = {C_k, D_k} of rank r2, never uploaded,
/// kept across rounds. In a round every sampled client copies x and runs `localSteps` iterations of
///   a. `lowerSteps` SGD steps on y_k with x fixed (gradient of f_k with respect to y only; AdamW with
///      `lowerOptimizer = .adamw`, an ablation),
///   b. one AdamW step on its copy of x with the first-order hypergradient grad_x f_k(x, y_k)
///      at the current y_k (exact at the lower optimum by the envelope theorem);
/// the server then sets x to the average of the copies weighted by p_k = n_k / sum over the sampled n_j.
/// The client's AdamW state is fresh each round (its copy of x is new each round); the lower SGD's
/// momentum buffer, when momentum is used, is also reset per round.
struct PF2LoRAAlgorithm: FederatedAlgorithm {
    let task: FederatedTask
    let config: FederatedConfig
    var shared: ParameterSet
    var local: [ParameterSet]
    /// Client AdamW states when `persistClientOptimizer` is set.
    let optimizers: [AdamW]

    init(task: FederatedTask, config: FederatedConfig, rng: inout RNG) {
        self.task = task
        self.config = config
        (shared, local) = Self.initialParameters(modules: task.modules, config: config, clients: task.clientCount, rng: &rng)
        optimizers = (0..<task.clientCount).map { _ in makeAdamW(config) }
    }

    /// The starting point of a run: x from `rng`, then y_0, y_1, ... in client order from the same
    /// stream. A federated client outside this process (`trainLocalRound`) replays this to start
    /// exactly where `runFederated` would.
    static func initialParameters(modules: [LoRAModule], config: FederatedConfig, clients: Int,
                                  rng: inout RNG) -> (shared: ParameterSet, local: [ParameterSet]) {
        let shared = makeLoRAParameters(modules: modules, rank: config.rank, level: .shared, rng: &rng)
        let local = (0..<clients).map { _ in makeLoRAParameters(modules: modules, rank: config.rank2, level: .client, rng: &rng) }
        return (shared, local)
    }

    var trainableParameters: [Int] {
        Array(repeating: loraParameterCount(task.modules, rank: config.rank) + loraParameterCount(task.modules, rank: config.rank2),
              count: task.clientCount)
    }
    var uploadedParameters: [Int] {
        Array(repeating: config.pf2loraVariant == .clientOnly ? 0 : loraParameterCount(task.modules, rank: config.rank), count: task.clientCount)
    }

    mutating func round(_ t: Int, clients: [Int], lrFactor: Float, rng: (Int) -> RNG) -> [Int: Float] {
        var uploads: [ParameterSet] = [], losses: [Int: Float] = [:]
        for k in clients {
            var r = rng(k)
            let (x, loss) = clientUpdate(k, lrFactor: lrFactor, rng: &r)
            uploads.append(x)
            losses[k] = loss
        }
        if config.pf2loraVariant != .clientOnly {   // client-only: x never moves and is not uploaded
            shared.setWeightedAverage(of: uploads, weights: task.exampleShares(clients))
        }
        return losses
    }

    /// One client's local work; returns its updated copy of x and its mean upper-level loss.
    func clientUpdate(_ k: Int, lrFactor: Float, rng: inout RNG) -> (ParameterSet, Float) {
        let x = shared.clone()
        let upper = config.persistClientOptimizer ? optimizers[k] : makeAdamW(config)
        let loss = pf2loraLocalIterations(task: task, client: k, shared: x, local: local[k], config: config,
                                          lrFactor: lrFactor, upper: upper, rng: &rng, afterIteration: { _, _ in })
        return (x, loss)
    }

    func evaluationAdapter(client k: Int, rng: inout RNG) -> TwoLevelAdapter {
        TwoLevelAdapter(shared: shared, sharedScale: config.sharedScale, local: local[k], localScale: config.localScale)
    }
}

/// PF2LoRA's local work of one client in one round (steps a and b above, `localSteps` times), on x
/// and y_k in place: the round of `runFederated` and of a client driven from outside (`train_local`).
/// Returns the mean upper-level minibatch loss.
func pf2loraLocalIterations(task: FederatedTask, client k: Int, shared x: ParameterSet, local y: ParameterSet,
                            config: FederatedConfig, lrFactor: Float, upper: AdamW, rng: inout RNG,
                            afterIteration: (_ iteration: Int, _ upperLoss: Float) throws -> Void) rethrows -> Float {
    let gx = x.zerosLike(), gy = y.zerosLike()
    // The client level's optimizer (fresh each call, i.e. each round, as the shared level's copy) and rate.
    let lower: Optimizer = config.lowerOptimizer == .adamw ? makeAdamW(config) : SGD(momentum: config.lowerMomentum)
    let lowerRate = config.lowerLR * (config.scheduleLowerLR ? lrFactor : 1)
    let adapter = TwoLevelAdapter(shared: x, sharedScale: config.sharedScale, local: y, localScale: config.localScale)
    var sum: Float = 0
    switch config.pf2loraVariant {
    case .bilevel: break
    case .joint:
        // Ablation: one minibatch, both gradients (clipped together), then one step on (A, B, C_k, D_k): by one AdamW at
        // upperLR (default), or with `lowerOptimizer` set, AdamW on (A, B) and the client level's own optimizer on (C_k, D_k).
        let both = ParameterSet(x.entries + y.entries), grads = ParameterSet(gx.entries + gy.entries)
        for it in 0..<config.localSteps {
            let loss = task.lossAndGradients(client: k, adapter: adapter, sharedGrad: gx, localGrad: gy, rng: &rng)
            sum += loss
            maybeClip(grads, config)
            if config.lowerOptimizer == nil {
                upper.step(both, grads, lr: config.upperLR * lrFactor)
            } else {
                upper.step(x, gx, lr: config.upperLR * lrFactor)
                lower.step(y, gy, lr: lowerRate)
            }
            try afterIteration(it + 1, loss)
        }
        return sum / Float(config.localSteps)
    case .clientOnly:
        // Ablation: the client level alone, one SGD step per iteration (x stays at its start, B = 0, so W_k = W0 + s2 D_k C_k).
        for it in 0..<config.localSteps {
            let loss = task.lossAndGradients(client: k, adapter: adapter, sharedGrad: nil, localGrad: gy, rng: &rng)
            sum += loss
            maybeClip(gy, config)
            lower.step(y, gy, lr: lowerRate)
            try afterIteration(it + 1, loss)
        }
        return sum / Float(config.localSteps)
    }
    for it in 0..<config.localSteps {
        for _ in 0..<config.lowerSteps {   // lower level: y_k <- y_k - eta grad_y f_k(x, y_k)
            _ = task.lossAndGradients(client: k, adapter: adapter, sharedGrad: nil, localGrad: gy, rng: &rng)
            maybeClip(gy, config)
            lower.step(y, gy, lr: lowerRate)
        }
        // upper level: hypergradient estimate grad_x f_k(x, y_k) at the current y_k
        let upperLoss = task.lossAndGradients(client: k, adapter: adapter, sharedGrad: gx, localGrad: nil, rng: &rng)
        sum += upperLoss
        maybeClip(gx, config)
        upper.step(x, gx, lr: config.upperLR * lrFactor)
        try afterIteration(it + 1, upperLoss)
    }
    return sum / Float(config.localSteps)
}
