import Foundation

/// The federated algorithms: PF2LoRA and the baselines it is compared with (DESIGN §2, docs/METHOD.md).
public enum FederatedMethod: String, CaseIterable, Codable, Sendable {
    /// Two-level LoRA, bilevel: shared (A, B) by FedAvg, client (C, D) kept on the client.
    case pf2lora
    /// FedAvg of one homogeneous LoRA; one model for every client.
    case homlora
    /// First-order Per-FedAvg on one LoRA; each client adapts with one SGD step before use.
    case perfedavg
    /// Heterogeneous client ranks, rank self-pruning, zero-padded sparsity-weighted aggregation.
    case hetlora
    /// Every client trains its own LoRA, no communication.
    case local
    /// HOMLoRA, then each client fine-tunes the global LoRA on its own data.
    case fedavgFT = "fedavg-ft"

    public var displayName: String {
        switch self {
        case .pf2lora: return "PF2LoRA"
        case .homlora: return "HOMLoRA"
        case .perfedavg: return "Per-FedAvg-LoRA"
        case .hetlora: return "HETLoRA"
        case .local: return "Local-only LoRA"
        case .fedavgFT: return "FedAvg-LoRA+FT"
        }
    }
}

/// How the local work of one round is matched across methods (DESIGN §9, docs/METHOD.md "Budgets").
public enum BudgetMode: String, CaseIterable, Codable, Sendable {
    /// The same local iterations: every method runs `localSteps` iterations per client per round. A PF2LoRA
    /// iteration makes `lowerSteps + 1` gradient evaluations, a Per-FedAvg iteration 2, the others 1, so
    /// PF2LoRA sees (lowerSteps + 1) x the tokens of a single-level baseline.
    case steps
    /// The same gradient evaluations (minibatches, hence tokens) per client per round: PF2LoRA's
    /// `localSteps x (lowerSteps + 1)`. HOMLoRA, Local-only, HETLoRA and FedAvg+FT run that many
    /// iterations, Per-FedAvg half as many (two evaluations each, rounded down).
    case compute
}

/// PF2LoRA and its ablations (docs/METHOD.md "Ablations").
public enum PF2LoRAVariant: String, CaseIterable, Codable, Sendable {
    /// The method: `lowerSteps` SGD steps on (C_k, D_k), then one AdamW step on (A, B), alternating.
    case bilevel
    /// Both levels trained jointly: one minibatch, the gradients of both levels, one AdamW step on all four
    /// matrices (one optimizer, rate `upperLR`); no alternation, no lower loop.
    case joint
    /// No shared level: only (C_k, D_k) are trained, one SGD step (at `lowerLR`) per local iteration, like a
    /// single-level baseline's iteration; nothing is uploaded.
    case clientOnly = "client-only"
}

/// The optimizer of PF2LoRA's client level (C_k, D_k), an ablation knob (docs/METHOD.md "Ablations"; issue 13: which
/// part of the client level's training makes the difference between the method and its joint ablation).
public enum LowerOptimizer: String, CaseIterable, Codable, Sendable {
    /// `torch.optim.SGD` with `lowerMomentum`: the method's.
    case sgd
    /// An AdamW of its own (the config's betas and weight decay), fresh each round like the client's copy of the shared
    /// level's; the same per-coordinate update as the joint variant's one AdamW gives the client level.
    case adamw
}

/// How HETLoRA's server weighs the zero-padded client uploads.
public enum HETLoRAAggregation: String, Codable, Sendable {
    /// The paper's sparsity-weighted aggregation: weight ||s B_k A_k||_F / Z.
    case sparsity
    /// FedAvg weights n_k / n.
    case examples
}

/// Every knob of a federated run. Defaults are the synthetic experiment's; see docs/METHOD.md.
public struct FederatedConfig: Codable, Sendable {
    public var rounds = 150
    /// Clients sampled per round (uniformly, without replacement); 0 or >= clientCount means all.
    public var clientsPerRound = 0
    /// Local iterations per round (each: `lowerSteps` SGD steps on the client level, then one AdamW step on the shared level).
    /// Under `budget = .compute` the baselines run more iterations (`localIterations(for:)`).
    public var localSteps = 10
    /// Which quantity is equal across methods: local iterations or gradient evaluations.
    public var budget: BudgetMode = .steps
    /// PF2LoRA's SGD steps on (C_k, D_k) per local iteration.
    public var lowerSteps = 5
    /// Shared rank r and alpha (scale alpha / r).
    public var rank = 8
    public var alpha: Float = 16
    /// Client rank r2 and alpha2 (scale alpha2 / r2).
    public var rank2 = 2
    public var alpha2: Float = 4
    /// rsLoRA scales alpha / sqrt(r).
    public var rslora = false
    /// AdamW rate of the shared level (and of every single-level baseline).
    public var upperLR: Float = 0.01
    /// SGD rate of PF2LoRA's client level.
    public var lowerLR: Float = 0.05
    /// PF2LoRA as published (`.bilevel`) or an ablation of it.
    public var pf2loraVariant: PF2LoRAVariant = .bilevel
    public var lowerMomentum: Float = 0
    /// The client level's optimizer, at the rate `lowerLR` (times the round schedule when `scheduleLowerLR`), in every
    /// variant. nil: the variant's own: SGD for bilevel and client-only; for joint, the one AdamW
    /// of both levels at `upperLR`, scheduled (then `lowerLR` is unused). With `.adamw`, `lowerLR = upperLR` and
    /// `scheduleLowerLR`, the joint variant takes exactly its default steps.
    public var lowerOptimizer: LowerOptimizer? = nil
    /// Whether the round schedule also scales the lower-level rate (false: the lower SGD rate is constant,
    /// so the client level keeps converging to its optimum at the end, which the hypergradient relies on).
    public var scheduleLowerLR = false
    /// Keep each client's upper-level AdamW moments across rounds (true) or start them fresh every round (false).
    public var persistClientOptimizer = false
    /// AdamW decoupled weight decay.
    public var weightDecay: Float = 0
    public var adamBeta1: Float = 0.9
    public var adamBeta2: Float = 0.999
    /// Clip every gradient to this global norm; 0 = off.
    public var clipNorm: Float = 0
    /// LR schedule over rounds: linear warm-up, then cosine down to `minLRRatio` x base at the last round.
    public var warmupRounds = 0
    public var minLRRatio: Float = 0.01
    /// Evaluate every client on its valid split every `evalEvery` rounds (0 = only at the end).
    public var evalEvery = 5
    /// Leave the test split unread (test losses are NaN): for runs that select hyperparameters on valid.
    public var skipTest = false
    public var seed: UInt64 = 0

    /// Rank of the single-level baselines (HOMLoRA, Per-FedAvg, local, FedAvg+FT); nil = rank + rank2.
    public var baselineRank: Int?
    /// Per-FedAvg inner (adaptation) SGD rate; nil = lowerLR.
    public var perFedAvgInnerLR: Float?
    /// HETLoRA client ranks lie in [min, max]; nil = [rank - rank2, rank + rank2].
    public var hetloraMinRank: Int?
    public var hetloraMaxRank: Int?
    /// HETLoRA sparsity penalty weight lambda on ||s B_tail A_tail||_F, tail = last `hetloraGamma` ranks.
    public var hetloraLambda: Float = 1e-3
    public var hetloraGamma = 1
    /// A client prunes its `hetloraGamma` tail ranks when their norm falls below this fraction of its whole update's norm.
    public var hetloraPruneRatio: Float = 0.05
    public var hetloraAggregation: HETLoRAAggregation = .sparsity
    /// FedAvg+FT: local AdamW steps after federation. Under `.steps` they come on top of the rounds (nil = 5 x
    /// localSteps). Under `.compute` they are taken out of the same budget (nil = one round's worth of PF2LoRA's
    /// evaluations): see `fineTuneIterations()`.
    public var fineTuneSteps: Int?

    public init() {}

    /// Gradient evaluations (minibatches) one local iteration of `method` makes, not counting HETLoRA's penalty
    /// (closed form) or evaluation.
    public func evaluationsPerIteration(_ method: FederatedMethod) -> Int {
        switch method {
        case .pf2lora:
            switch pf2loraVariant {
            case .bilevel: return lowerSteps + 1
            case .joint, .clientOnly: return 1
            }
        case .perfedavg: return 2
        case .homlora, .hetlora, .local, .fedavgFT: return 1
        }
    }

    /// Under `.compute`: the gradient evaluations every method makes per client over the whole run, PF2LoRA's
    /// `rounds x localSteps x (lowerSteps + 1)` (FedAvg+FT's fine-tuning included).
    public var computeBudgetPerClient: Int { rounds * localSteps * (lowerSteps + 1) }

    /// Local iterations per client per round that `method` runs under `budget`.
    public func localIterations(for method: FederatedMethod) -> Int {
        switch budget {
        case .steps: return localSteps
        case .compute:
            let evaluations = localSteps * (lowerSteps + 1)   // PF2LoRA's (bilevel)
            if method == .fedavgFT {
                // Its fine-tuning is reserved out of the run's budget; the rounds share the rest (rounded down).
                let reserve = fineTuneSteps ?? evaluations
                return max(0, (computeBudgetPerClient - reserve) / rounds)
            }
            return max(1, evaluations / evaluationsPerIteration(method))
        }
    }

    /// FedAvg+FT's fine-tuning steps (one gradient evaluation each). `.steps`: `fineTuneSteps ?? 5 x localSteps`,
    /// on top of the rounds. `.compute`: what the rounds leave of `computeBudgetPerClient` (at least
    /// `fineTuneSteps ?? one round's worth`; the rounding remainder too), so rounds plus fine-tuning make
    /// exactly PF2LoRA's evaluations.
    public func fineTuneIterations() -> Int {
        switch budget {
        case .steps: return fineTuneSteps ?? 5 * localSteps
        case .compute: return computeBudgetPerClient - rounds * localIterations(for: .fedavgFT)
        }
    }

    /// Gradient evaluations per client per round of `method` under `budget` (the training rounds; FedAvg+FT's
    /// fine-tuning after them, and Per-FedAvg's adaptation at evaluation, are not in it).
    public func evaluationsPerRound(for method: FederatedMethod) -> Int {
        localIterations(for: method) * evaluationsPerIteration(method)
    }

    /// Gradient evaluations per client over the whole training of `method` (rounds, all clients sampled, plus
    /// FedAvg+FT's fine-tuning; not Per-FedAvg's adaptation at evaluation). Under `.compute` every method's is
    /// `computeBudgetPerClient` (Per-FedAvg's less by `rounds` when PF2LoRA's per-round count is odd).
    public func trainingEvaluations(for method: FederatedMethod) -> Int {
        rounds * evaluationsPerRound(for: method) + (method == .fedavgFT ? fineTuneIterations() : 0)
    }

    /// The config an algorithm runs with: `localSteps` set to `localIterations(for:)`, FedAvg+FT's
    /// `fineTuneSteps` to `fineTuneIterations()`.
    func effective(for method: FederatedMethod) -> FederatedConfig {
        var c = self
        c.localSteps = localIterations(for: method)
        if method == .fedavgFT { c.fineTuneSteps = fineTuneIterations() }
        return c
    }

    public var sharedScale: Float { loraScale(alpha: alpha, rank: rank, rslora: rslora) }
    public var localScale: Float { loraScale(alpha: alpha2, rank: rank2, rslora: rslora) }
    public var singleRank: Int { baselineRank ?? (rank + rank2) }
    /// Scale of the single-level baselines: the same alpha / r ratio as the shared level.
    public var singleScale: Float { loraScale(alpha: alpha * Float(singleRank) / Float(rank), rank: singleRank, rslora: rslora) }
}

/// What one round did.
public struct RoundRecord: Codable, Sendable {
    public let round: Int
    /// Mean training minibatch loss of each client this round (nil: not sampled).
    public let trainLoss: [Float?]
    /// Each client's valid loss with its evaluation adapter (nil: not evaluated this round).
    public let validLoss: [Float]?
    public var meanTrainLoss: Float {
        let v = trainLoss.compactMap { $0 }
        return v.isEmpty ? .nan : v.reduce(0, +) / Float(v.count)
    }
    public var meanValidLoss: Float? { validLoss.map { $0.reduce(0, +) / Float($0.count) } }
}

/// The outcome of a run: per-round metrics, and for every client the adapter it would use.
public struct FederatedResult {
    public let method: FederatedMethod
    public let config: FederatedConfig
    public let rounds: [RoundRecord]
    /// The adapter each client is evaluated with (PF2LoRA: shared + its own level 2; Per-FedAvg: after its
    /// one-step adaptation; HETLoRA: the global LoRA truncated to its rank; FedAvg+FT: its fine-tuned copy).
    public let clientAdapters: [TwoLevelAdapter]
    public let validLoss: [Float]
    public let testLoss: [Float]
    /// Trainable parameters a client holds (both levels), and parameters it uploads per round.
    public let trainableParameters: [Int]
    public let uploadedParameters: [Int]
    /// HETLoRA's final client ranks (nil for other methods).
    public let clientRanks: [Int]?
    /// Local iterations per client per round the method ran (`FederatedConfig.localIterations(for:)`).
    public let localIterations: Int
    /// Gradient evaluations (minibatches drawn by `lossAndGradients`) per client in training: the rounds
    /// plus FedAvg+FT's fine-tuning; counted at the task, not derived from the config.
    public let trainingEvaluations: [Int]
    /// Gradient evaluations per client spent adapting at evaluation time (Per-FedAvg's one step per
    /// evaluation; 0 for the others), over all evaluations of the run.
    public let adaptationEvaluations: [Int]
    /// Wall-clock of the whole run, and of training only (rounds and fine-tuning, no evaluation).
    public let seconds: Double
    public let trainingSeconds: Double

    public var meanTestLoss: Float { testLoss.reduce(0, +) / Float(testLoss.count) }
}

/// Errors of a federated run.
public enum FederatedError: Error, CustomStringConvertible {
    case nonFiniteLoss(method: FederatedMethod, round: Int, client: Int)
    case badConfig(String)
    public var description: String {
        switch self {
        case let .nonFiniteLoss(m, r, c):
            return "\(m.displayName): the loss of client \(c) became non-finite in round \(r). Lower the learning rates (--upper-lr / --lower-lr) or set --clip."
        case let .badConfig(s): return "federated config: \(s)"
        }
    }
}

/// One algorithm, as the round loop in `runFederated` drives it.
protocol FederatedAlgorithm {
    /// Trains the sampled clients for one round and aggregates; returns each sampled client's mean train loss.
    /// `lrFactor` is the schedule's multiplier for this round; `rng(k)` is client k's stream for the round.
    mutating func round(_ t: Int, clients: [Int], lrFactor: Float, rng: (Int) -> RNG) -> [Int: Float]
    /// The adapter client k is evaluated with now (may adapt first, using `rng`).
    func evaluationAdapter(client k: Int, rng: inout RNG) -> TwoLevelAdapter
    /// Work after the last round (FedAvg+FT's local fine-tuning).
    mutating func finish(rng: (Int) -> RNG)
    var trainableParameters: [Int] { get }
    var uploadedParameters: [Int] { get }
    var clientRanks: [Int]? { get }
}

extension FederatedAlgorithm {
    mutating func finish(rng: (Int) -> RNG) {}
    var clientRanks: [Int]? { nil }
}

/// Runs `method` on `task` for `config.rounds` rounds and evaluates every client at the end.
/// Deterministic for `config.seed`. `log` receives one line per evaluated round (the CLI prints it on stderr).
public func runFederated(_ method: FederatedMethod, task: FederatedTask, config: FederatedConfig,
                         log: ((String) -> Void)? = nil) throws -> FederatedResult {
    guard config.rounds >= 1, config.localSteps >= 1, config.rank >= 1, config.rank2 >= 1, config.lowerSteps >= 0 else {
        throw FederatedError.badConfig("rounds, localSteps, rank and rank2 must be >= 1 and lowerSteps >= 0")
    }
    let start = Date()
    let root = RNG(seed: config.seed)
    var initRNG = root.derive(0x1A17)
    let counter = CountingTask(task)
    let task: FederatedTask = counter
    let runConfig = config.effective(for: method)
    if method == .fedavgFT && (runConfig.localSteps < 1 || runConfig.fineTuneSteps ?? 0 < 0) {
        throw FederatedError.badConfig("FedAvg+FT: fineTuneSteps \(config.fineTuneSteps ?? 0) leaves no local iteration for the "
            + "\(config.rounds) rounds in the compute budget of \(config.computeBudgetPerClient) gradient evaluations per client")
    }
    var alg: FederatedAlgorithm
    switch method {
    case .pf2lora: alg = PF2LoRAAlgorithm(task: task, config: runConfig, rng: &initRNG)
    case .homlora: alg = FedAvgLoRAAlgorithm(task: task, config: runConfig, fineTune: false, rng: &initRNG)
    case .fedavgFT: alg = FedAvgLoRAAlgorithm(task: task, config: runConfig, fineTune: true, rng: &initRNG)
    case .local: alg = LocalLoRAAlgorithm(task: task, config: runConfig, rng: &initRNG)
    case .perfedavg: alg = PerFedAvgAlgorithm(task: task, config: runConfig, rng: &initRNG)
    case .hetlora: alg = try HETLoRAAlgorithm(task: task, config: runConfig, rng: &initRNG)
    }
    var trainingSeconds = 0.0
    let n = task.clientCount
    let perRound = (config.clientsPerRound <= 0 || config.clientsPerRound >= n) ? n : config.clientsPerRound
    let schedule = LRSchedule(base: 1, warmupSteps: config.warmupRounds, totalSteps: config.rounds, minRatio: config.minLRRatio)
    var records: [RoundRecord] = []

    func evaluateAll(_ t: Int, split: Split) -> ([TwoLevelAdapter], [Float]) {
        counter.phase = .adaptation
        defer { counter.phase = .training }
        var adapters: [TwoLevelAdapter] = [], losses: [Float] = []
        for k in 0..<n {
            var r = root.derive(0xE7A1_0000 &+ UInt64(t) &* 131 &+ UInt64(k))
            let a = alg.evaluationAdapter(client: k, rng: &r)
            adapters.append(a)
            losses.append(task.evaluate(client: k, adapter: a, split: split))
        }
        return (adapters, losses)
    }

    for t in 0..<config.rounds {
        var sampler = root.derive(0x5A3E_0000 &+ UInt64(t))
        let clients = perRound == n ? Array(0..<n) : sampler.sample(perRound, from: n).sorted()
        let lrFactor = config.rounds == 1 ? 1 : schedule.lr(at: t)
        let roundStart = Date()
        let losses = alg.round(t, clients: clients, lrFactor: lrFactor) { k in
            root.derive((UInt64(t + 1) << 20) &+ UInt64(k))
        }
        trainingSeconds += Date().timeIntervalSince(roundStart)
        for (k, l) in losses where !l.isFinite { throw FederatedError.nonFiniteLoss(method: method, round: t, client: k) }
        let isLast = t == config.rounds - 1
        var valid: [Float]? = nil
        if isLast || (config.evalEvery > 0 && (t + 1) % config.evalEvery == 0) {
            valid = evaluateAll(t, split: .valid).1
        }
        let rec = RoundRecord(round: t + 1, trainLoss: (0..<n).map { losses[$0] }, validLoss: valid)
        records.append(rec)
        if let valid, let log {
            let mv = valid.reduce(0, +) / Float(valid.count)
            let elapsed = Date().timeIntervalSince(start)
            let left = elapsed / Double(t + 1) * Double(config.rounds - t - 1)
            log(String(format: "%@ round %d/%d  train %.5f  valid %.5f  (%.1fs, ~%.0fs left)",
                       method.displayName, t + 1, config.rounds, rec.meanTrainLoss, mv, elapsed, left))
        }
    }
    let finishStart = Date()
    alg.finish { k in root.derive(0xF17E_0000 &+ UInt64(k)) }
    trainingSeconds += Date().timeIntervalSince(finishStart)
    let (adapters, validLoss) = evaluateAll(config.rounds, split: .valid)
    let testLoss = config.skipTest ? [Float](repeating: .nan, count: n)
                                   : (0..<n).map { task.evaluate(client: $0, adapter: adapters[$0], split: .test) }
    return FederatedResult(method: method, config: config, rounds: records, clientAdapters: adapters,
                           validLoss: validLoss, testLoss: testLoss,
                           trainableParameters: alg.trainableParameters, uploadedParameters: alg.uploadedParameters,
                           clientRanks: alg.clientRanks, localIterations: runConfig.localSteps,
                           trainingEvaluations: counter.training, adaptationEvaluations: counter.adaptation,
                           seconds: Date().timeIntervalSince(start), trainingSeconds: trainingSeconds)
}

/// Forwards to a task and counts `lossAndGradients` calls (one minibatch each) per client, split by phase:
/// training (rounds, fine-tuning) or adaptation at evaluation time.
final class CountingTask: FederatedTask {
    enum Phase { case training, adaptation }
    let base: FederatedTask
    var phase = Phase.training
    private(set) var training: [Int]
    private(set) var adaptation: [Int]

    init(_ base: FederatedTask) {
        self.base = base
        training = Array(repeating: 0, count: base.clientCount)
        adaptation = training
    }

    var clientCount: Int { base.clientCount }
    var modules: [LoRAModule] { base.modules }
    func exampleCount(client: Int) -> Int { base.exampleCount(client: client) }
    func lossAndGradients(client: Int, adapter: TwoLevelAdapter, sharedGrad: ParameterSet?,
                          localGrad: ParameterSet?, rng: inout RNG) -> Float {
        switch phase {
        case .training: training[client] += 1
        case .adaptation: adaptation[client] += 1
        }
        return base.lossAndGradients(client: client, adapter: adapter, sharedGrad: sharedGrad, localGrad: localGrad, rng: &rng)
    }
    func evaluate(client: Int, adapter: TwoLevelAdapter, split: Split) -> Float {
        base.evaluate(client: client, adapter: adapter, split: split)
    }
}

// MARK: - Shared helpers of the algorithms

/// Number of LoRA scalars of rank `rank` over `modules`.
func loraParameterCount(_ modules: [LoRAModule], rank: Int) -> Int {
    modules.reduce(0) { $0 + rank * ($1.dIn + $1.dOut) }
}

/// Clips `grads` when the config asks for it.
@inline(__always) func maybeClip(_ grads: ParameterSet, _ config: FederatedConfig) {
    if config.clipNorm > 0 { clipGradNorm(grads, maxNorm: config.clipNorm) }
}

/// A fresh AdamW with the config's betas and weight decay.
func makeAdamW(_ config: FederatedConfig) -> AdamW {
    AdamW(beta1: config.adamBeta1, beta2: config.adamBeta2, eps: 1e-8, weightDecay: config.weightDecay)
}

/// `localSteps` AdamW steps of a single-level LoRA on client k's data, starting from `params` (updated in place),
/// with a fresh optimizer unless one is given. Returns the mean minibatch loss.
func trainSingleLevel(task: FederatedTask, client k: Int, params: ParameterSet, scale: Float, steps: Int,
                      lr: Float, optimizer: AdamW, config: FederatedConfig, rng: inout RNG) -> Float {
    let grad = params.zerosLike()
    var sum: Float = 0
    for _ in 0..<steps {
        let adapter = TwoLevelAdapter(shared: params, sharedScale: scale)
        sum += task.lossAndGradients(client: k, adapter: adapter, sharedGrad: grad, localGrad: nil, rng: &rng)
        maybeClip(grad, config)
        optimizer.step(params, grad, lr: lr)
    }
    return sum / Float(steps)
}
