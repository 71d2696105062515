import Foundation

/// HOMLoRA (FedAvg of one homogeneous LoRA of rank `singleRank`) and, with `fineTune`, FedAvg-LoRA +
/// local fine-tuning: after the last round each client fine-tunes its own copy of the global LoRA for
/// `fineTuneSteps` AdamW steps (cosine-decayed from upperLR to minLRRatio x upperLR).
struct FedAvgLoRAAlgorithm: FederatedAlgorithm {
    let task: FederatedTask
    let config: FederatedConfig
    let fineTune: Bool
    var global: ParameterSet
    var tuned: [ParameterSet]? = nil

    init(task: FederatedTask, config: FederatedConfig, fineTune: Bool, rng: inout RNG) {
        self.task = task; self.config = config; self.fineTune = fineTune
        global = makeLoRAParameters(modules: task.modules, rank: config.singleRank, level: .shared, rng: &rng)
    }

    var trainableParameters: [Int] { Array(repeating: loraParameterCount(task.modules, rank: config.singleRank), count: task.clientCount) }
    var uploadedParameters: [Int] { trainableParameters }

    mutating func round(_ t: Int, clients: [Int], lrFactor: Float, rng: (Int) -> RNG) -> [Int: Float] {
        var uploads: [ParameterSet] = [], losses: [Int: Float] = [:]
        for k in clients {
            var r = rng(k)
            let x = global.clone()
            losses[k] = trainSingleLevel(task: task, client: k, params: x, scale: config.singleScale, steps: config.localSteps,
                                         lr: config.upperLR * lrFactor, optimizer: makeAdamW(config), config: config, rng: &r)
            uploads.append(x)
        }
        global.setWeightedAverage(of: uploads, weights: task.exampleShares(clients))
        return losses
    }

    mutating func finish(rng: (Int) -> RNG) {
        guard fineTune else { return }
        // `effective(for:)` set fineTuneSteps to `fineTuneIterations()` (under `.compute`, the budget's share).
        let steps = config.fineTuneSteps ?? 5 * config.localSteps
        let sched = LRSchedule(base: config.upperLR, totalSteps: steps, minRatio: config.minLRRatio)
        tuned = (0..<task.clientCount).map { k in
            var r = rng(k)
            let x = global.clone(), g = x.zerosLike(), opt = makeAdamW(config)
            for s in 0..<steps {
                _ = task.lossAndGradients(client: k, adapter: TwoLevelAdapter(shared: x, sharedScale: config.singleScale),
                                          sharedGrad: g, localGrad: nil, rng: &r)
                maybeClip(g, config)
                opt.step(x, g, lr: sched.lr(at: s))
            }
            return x
        }
    }

    func evaluationAdapter(client k: Int, rng: inout RNG) -> TwoLevelAdapter {
        TwoLevelAdapter(shared: tuned?[k] ?? global, sharedScale: config.singleScale)
    }
}

/// Local-only LoRA: each client trains its own rank-`singleRank` LoRA on its own data, `localSteps`
/// AdamW steps in every round it is sampled (the same schedule as the federated methods), one
/// optimizer kept across rounds (its training is one continuous run). Nothing is communicated.
struct LocalLoRAAlgorithm: FederatedAlgorithm {
    let task: FederatedTask
    let config: FederatedConfig
    var params: [ParameterSet]
    var optimizers: [AdamW]

    init(task: FederatedTask, config: FederatedConfig, rng: inout RNG) {
        self.task = task; self.config = config
        params = (0..<task.clientCount).map { _ in
            makeLoRAParameters(modules: task.modules, rank: config.singleRank, level: .shared, rng: &rng)
        }
        optimizers = (0..<task.clientCount).map { _ in makeAdamW(config) }
    }

    var trainableParameters: [Int] { Array(repeating: loraParameterCount(task.modules, rank: config.singleRank), count: task.clientCount) }
    var uploadedParameters: [Int] { Array(repeating: 0, count: task.clientCount) }

    mutating func round(_ t: Int, clients: [Int], lrFactor: Float, rng: (Int) -> RNG) -> [Int: Float] {
        var losses: [Int: Float] = [:]
        for k in clients {
            var r = rng(k)
            losses[k] = trainSingleLevel(task: task, client: k, params: params[k], scale: config.singleScale, steps: config.localSteps,
                                         lr: config.upperLR * lrFactor, optimizer: optimizers[k], config: config, rng: &r)
        }
        return losses
    }

    func evaluationAdapter(client k: Int, rng: inout RNG) -> TwoLevelAdapter {
        TwoLevelAdapter(shared: params[k], sharedScale: config.singleScale)
    }
}

/// First-order Per-FedAvg (Fallah, Mokhtari, Ozdaglar 2020) on one LoRA of rank `singleRank`.
///
/// Each local iteration, on two independent minibatches D, D':
///     x_tmp = x - alpha grad f_k(x; D)            (inner SGD step, alpha = perFedAvgInnerLR)
///     x    <- x - beta-step(grad f_k(x_tmp; D'))  (outer step: AdamW at upperLR, the FO-MAML gradient)
/// The inner rate follows the round schedule (alpha_t = alpha x lrFactor_t). The server averages the copies
/// of x weighted by p_k. A client is evaluated after one inner SGD step on one minibatch of its training
/// data with the rate of the last round trained, the step the meta-objective was trained for:
/// x_k = x - alpha_t grad f_k(x; D).
struct PerFedAvgAlgorithm: FederatedAlgorithm {
    let task: FederatedTask
    let config: FederatedConfig
    var global: ParameterSet
    var inner: Float { config.perFedAvgInnerLR ?? config.lowerLR }
    /// The schedule factor of the last round trained (the inner step at evaluation uses it).
    var lastLRFactor: Float = 1

    init(task: FederatedTask, config: FederatedConfig, rng: inout RNG) {
        self.task = task; self.config = config
        global = makeLoRAParameters(modules: task.modules, rank: config.singleRank, level: .shared, rng: &rng)
    }

    var trainableParameters: [Int] { Array(repeating: loraParameterCount(task.modules, rank: config.singleRank), count: task.clientCount) }
    var uploadedParameters: [Int] { trainableParameters }

    mutating func round(_ t: Int, clients: [Int], lrFactor: Float, rng: (Int) -> RNG) -> [Int: Float] {
        var uploads: [ParameterSet] = [], losses: [Int: Float] = [:]
        let s = config.singleScale
        lastLRFactor = lrFactor
        for k in clients {
            var r = rng(k)
            let x = global.clone(), tmp = x.zerosLike(), g = x.zerosLike()
            let opt = makeAdamW(config)
            var sum: Float = 0
            for _ in 0..<config.localSteps {
                sum += task.lossAndGradients(client: k, adapter: TwoLevelAdapter(shared: x, sharedScale: s), sharedGrad: g, localGrad: nil, rng: &r)
                maybeClip(g, config)
                tmp.copy(from: x)
                tmp.axpy(-inner * lrFactor, g)
                _ = task.lossAndGradients(client: k, adapter: TwoLevelAdapter(shared: tmp, sharedScale: s), sharedGrad: g, localGrad: nil, rng: &r)
                maybeClip(g, config)
                opt.step(x, g, lr: config.upperLR * lrFactor)
            }
            uploads.append(x)
            losses[k] = sum / Float(config.localSteps)
        }
        global.setWeightedAverage(of: uploads, weights: task.exampleShares(clients))
        return losses
    }

    func evaluationAdapter(client k: Int, rng: inout RNG) -> TwoLevelAdapter {
        let x = global.clone(), g = x.zerosLike()
        _ = task.lossAndGradients(client: k, adapter: TwoLevelAdapter(shared: x, sharedScale: config.singleScale), sharedGrad: g, localGrad: nil, rng: &rng)
        maybeClip(g, config)
        x.axpy(-inner * lastLRFactor, g)
        return TwoLevelAdapter(shared: x, sharedScale: config.singleScale)
    }
}
