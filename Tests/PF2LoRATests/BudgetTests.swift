import Foundation
import Testing
@testable import PF2LoRA

/// Budget accounting (issue 13, DESIGN §9): under `.compute` every method draws the same number of
/// minibatches per client per round as PF2LoRA; counted by an independent wrapper around the task,
/// not derived from the config. And Per-FedAvg's adaptation at evaluation uses the inner rate of
/// the round schedule, as in training.
@Suite struct BudgetTests {
    /// Counts every `lossAndGradients` call per client (the test's own count, independent of `CountingTask`).
    final class CallCounter: FederatedTask {
        let base: FederatedTask
        var calls: [Int]
        init(_ base: FederatedTask) { self.base = base; calls = Array(repeating: 0, count: base.clientCount) }
        var clientCount: Int { base.clientCount }
        var modules: [LoRAModule] { base.modules }
        func exampleCount(client: Int) -> Int { base.exampleCount(client: client) }
        func lossAndGradients(client: Int, adapter: TwoLevelAdapter, sharedGrad: ParameterSet?,
                              localGrad: ParameterSet?, rng: inout RNG) -> Float {
            calls[client] += 1
            return base.lossAndGradients(client: client, adapter: adapter, sharedGrad: sharedGrad, localGrad: localGrad, rng: &rng)
        }
        func evaluate(client: Int, adapter: TwoLevelAdapter, split: Split) -> Float {
            base.evaluate(client: client, adapter: adapter, split: split)
        }
    }

    static func config(_ budget: BudgetMode) -> FederatedConfig {
        var c = FederatedConfig()
        c.rounds = 3; c.localSteps = 4; c.lowerSteps = 5; c.rank = 3; c.rank2 = 2; c.evalEvery = 0; c.budget = budget
        return c
    }

    /// Compute budget: 3 rounds x 4 iterations x (5 + 1) = 72 minibatches per client for every method, FedAvg+FT's
    /// fine-tuning included (it used to come on top: 72 + 120); Per-FedAvg adapts once per evaluation, outside training.
    @Test(arguments: FederatedMethod.allCases)
    func computeBudgetDrawsTheSameMinibatches(_ method: FederatedMethod) throws {
        let counter = CallCounter(FederatedTests.smallFederation().task)
        let res = try runFederated(method, task: counter, config: Self.config(.compute))
        let budget = 3 * 4 * 6
        #expect(res.trainingEvaluations == Array(repeating: budget, count: 5), "\(method)")
        let adaptation = method == .perfedavg ? 2 : 0   // two evaluations: after the last round and at the end
        #expect(res.adaptationEvaluations == Array(repeating: adaptation, count: 5))
        #expect(counter.calls == Array(repeating: budget + adaptation, count: 5))
        // FedAvg+FT reserves one round's worth (24) for fine-tuning: (72 - 24) / 3 = 16 iterations per round.
        #expect(res.localIterations == (method == .pf2lora ? 4 : method == .perfedavg ? 12 : method == .fedavgFT ? 16 : 24))
        #expect(Self.config(.compute).trainingEvaluations(for: method) == budget)
    }

    /// The accounting is equal across methods for any split of the evaluations and any fine-tuning share, the
    /// rounding remainder going to FedAvg+FT's fine-tuning (counted at the task).
    @Test(arguments: [(2, 2, 8, nil), (2, 2, 8, 10), (4, 5, 3, 10), (1, 1, 5, 3), (3, 2, 7, 0)] as [(Int, Int, Int, Int?)])
    func fedAvgFTFineTuningIsInsideTheComputeBudget(_ local: Int, _ lower: Int, _ rounds: Int, _ fineTune: Int?) throws {
        var c = Self.config(.compute)
        c.localSteps = local; c.lowerSteps = lower; c.rounds = rounds; c.fineTuneSteps = fineTune
        let budget = rounds * local * (lower + 1)
        #expect(c.computeBudgetPerClient == budget)
        for m in FederatedMethod.allCases where m != .perfedavg { #expect(c.trainingEvaluations(for: m) == budget, "\(m)") }
        #expect(c.fineTuneIterations() >= (fineTune ?? local * (lower + 1)))
        let counter = CallCounter(FederatedTests.smallFederation().task)
        let res = try runFederated(.fedavgFT, task: counter, config: c)
        #expect(res.trainingEvaluations == Array(repeating: budget, count: 5))
        #expect(res.localIterations * rounds + c.fineTuneIterations() == budget)
    }

    /// A fine-tuning share that leaves the rounds nothing is refused, not silently over budget.
    @Test func fedAvgFTFineTuningLargerThanTheBudgetIsRefused() {
        var c = Self.config(.compute)
        c.fineTuneSteps = 72   // the whole budget: no iteration left for the 3 rounds
        #expect(throws: FederatedError.self) { try runFederated(.fedavgFT, task: FederatedTests.smallFederation().task, config: c) }
    }

    /// Steps budget (today's): PF2LoRA draws (lowerSteps + 1) = 6 x the minibatches of a single-level
    /// baseline, Per-FedAvg 2 x.
    @Test(arguments: FederatedMethod.allCases)
    func stepsBudgetDrawsWhatEachIterationNeeds(_ method: FederatedMethod) throws {
        let counter = CallCounter(FederatedTests.smallFederation().task)
        let res = try runFederated(method, task: counter, config: Self.config(.steps))
        let perIteration = method == .pf2lora ? 6 : method == .perfedavg ? 2 : 1
        let fineTune = method == .fedavgFT ? 5 * 4 : 0
        #expect(res.trainingEvaluations == Array(repeating: 3 * 4 * perIteration + fineTune, count: 5), "\(method)")
        #expect(res.localIterations == 4)
    }

    /// The ablations draw PF2LoRA's minibatches too; client-only never moves or uploads the shared pair,
    /// and both still learn (test loss well below the base's).
    @Test(arguments: [PF2LoRAVariant.joint, .clientOnly])
    func ablationsUnderCompute(_ variant: PF2LoRAVariant) throws {
        let task = FederatedTests.smallFederation().task
        var c = Self.config(.compute)
        c.pf2loraVariant = variant; c.rounds = 20; c.lowerLR = 0.1
        let res = try runFederated(.pf2lora, task: task, config: c)
        #expect(res.trainingEvaluations == Array(repeating: 20 * 24, count: 5))
        #expect(res.localIterations == 24)
        let base = (0..<5).map { task.evaluate(client: $0, adapter: .none, split: .test) }.reduce(0, +) / 5
        #expect(res.meanTestLoss < 0.7 * base, "\(variant): \(res.meanTestLoss) vs base \(base)")
        if variant == .clientOnly {
            #expect(res.uploadedParameters == Array(repeating: 0, count: 5))
            let bs = res.clientAdapters[0].shared!.entries.filter { $0.0.hasSuffix("lora_B.weight") }
            #expect(!bs.isEmpty && bs.allSatisfy { $0.1.array.allSatisfy { $0 == 0 } })
        }
    }

    @Test func evaluationsPerRoundMatchUnderCompute() {
        for lower in [0, 1, 2, 5] {
            var c = Self.config(.compute)
            c.lowerSteps = lower; c.localSteps = 4
            let pf = c.evaluationsPerRound(for: .pf2lora)
            #expect(pf == 4 * (lower + 1))
            for m in FederatedMethod.allCases where m != .perfedavg && m != .fedavgFT { #expect(c.evaluationsPerRound(for: m) == pf) }
            // Per-FedAvg: two evaluations per iteration, so it matches when PF2LoRA's count is even.
            #expect(c.evaluationsPerRound(for: .perfedavg) == pf - pf % 2)
            // FedAvg+FT: fewer per round (one round's worth is reserved for its fine-tuning), the same over the run.
            #expect(c.evaluationsPerRound(for: .fedavgFT) == (3 * pf - pf) / 3)
            #expect(c.trainingEvaluations(for: .fedavgFT) == 3 * pf)
        }
    }

    /// Per-FedAvg trains its meta-objective with the inner step alpha x lrFactor of each round; the
    /// adaptation at evaluation must take that same step (it used alpha unscaled before the fix).
    @Test func perFedAvgAdaptsWithTheScheduledInnerRate() throws {
        let task = FederatedTests.smallFederation().task
        var cfg = Self.config(.steps)
        cfg.perFedAvgInnerLR = 0.3
        var initRNG = RNG(seed: 1)
        var alg = PerFedAvgAlgorithm(task: task, config: cfg, rng: &initRNG)
        _ = alg.round(0, clients: Array(0..<task.clientCount), lrFactor: 0.1) { k in RNG(seed: 100 + UInt64(k)) }
        var evalRNG = RNG(seed: 42)
        let adapted = alg.evaluationAdapter(client: 2, rng: &evalRNG).shared!
        // Independently: one gradient of the global LoRA on the same minibatch, step 0.3 x 0.1.
        let g = alg.global.zerosLike()
        var r = RNG(seed: 42)
        _ = task.lossAndGradients(client: 2, adapter: TwoLevelAdapter(shared: alg.global, sharedScale: cfg.singleScale),
                                  sharedGrad: g, localGrad: nil, rng: &r)
        var worst: Float = 0, moved: Float = 0
        for (name, t) in alg.global.entries {
            let a = adapted.tensor(name), gt = g.tensor(name)
            for i in 0..<t.count {
                worst = max(worst, abs(a.data[i] - (t.data[i] - 0.03 * gt.data[i])))
                moved = max(moved, abs(a.data[i] - t.data[i]))
            }
        }
        #expect(moved > 1e-4)          // the step is not trivially zero
        #expect(worst < 1e-6, "adapted LoRA differs from x - 0.3 * 0.1 * g by \(worst)")
    }
}
