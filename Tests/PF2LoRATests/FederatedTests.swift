import Foundation
import Testing
@testable import PF2LoRA

/// The linear task's closed-form gradients, PEFT initialization, determinism, and every algorithm on a small federation.
@Suite struct FederatedTests {
    static func smallFederation(seed: UInt64 = 1) -> SyntheticFederation {
        var c = SyntheticConfig()
        c.clients = 5; c.dIn = 12; c.dOut = 10; c.rank = 3; c.rank2 = 2
        c.trainMin = 60; c.trainMax = 120; c.validCount = 30; c.testCount = 100; c.batchSize = 32; c.seed = seed
        return SyntheticFederation(c)
    }

    @Test func peftInitialization() {
        var rng = RNG(seed: 3)
        let p = makeLoRAParameters(modules: [LoRAModule(name: "q", dIn: 64, dOut: 16)], rank: 4, level: .shared, rng: &rng)
        #expect(p.names == ["q.lora_A.weight", "q.lora_B.weight"])
        let a = p.tensor("q.lora_A.weight")
        #expect(a.shape == [4, 64] && a.array.allSatisfy { abs($0) <= 0.125 } && a.array.contains { abs($0) > 0.1 })
        #expect(p.tensor("q.lora_B.weight").array.allSatisfy { $0 == 0 })
        #expect(loraScale(alpha: 16, rank: 8) == 2 && loraScale(alpha: 16, rank: 4, rslora: true) == 8)
    }

    /// Central finite differences in float32 on every parameter of both levels; full-batch so the
    /// minibatch is the same for every evaluation.
    @Test func linearTaskGradientsMatchFiniteDifferences() {
        let fed = Self.smallFederation()
        let task = fed.task
        task.batchSize = 10_000
        var rng = RNG(seed: 9)
        let x = makeLoRAParameters(modules: task.modules, rank: 3, level: .shared, rng: &rng)
        let y = makeLoRAParameters(modules: task.modules, rank: 2, level: .client, rng: &rng)
        for (_, t) in x.entries + y.entries { rng.fillNormal(t, std: 0.3) }
        let adapter = TwoLevelAdapter(shared: x, sharedScale: 1.5, local: y, localScale: 0.7)
        let gx = x.zerosLike(), gy = y.zerosLike()
        _ = task.lossAndGradients(client: 2, adapter: adapter, sharedGrad: gx, localGrad: gy, rng: &rng)
        var worst: Float = 0
        for (set, grad) in [(x, gx), (y, gy)] {
            for (name, t) in set.entries {
                for i in stride(from: 0, to: t.count, by: 7) {
                    let old = t.data[i], h: Float = 1e-2
                    t.data[i] = old + h; let up = task.evaluate(client: 2, adapter: adapter, split: .train)
                    t.data[i] = old - h; let down = task.evaluate(client: 2, adapter: adapter, split: .train)
                    t.data[i] = old
                    let fd = (up - down) / (2 * h), an = grad.tensor(name).data[i]
                    worst = max(worst, abs(fd - an) / max(1e-2, abs(an)))
                }
            }
        }
        #expect(worst < 2e-2, "worst relative gradient error \(worst)")
    }

    @Test func onlyRequestedLevelsAreComputed() {
        let task = Self.smallFederation().task
        var rng = RNG(seed: 1)
        let x = makeLoRAParameters(modules: task.modules, rank: 3, level: .shared, rng: &rng)
        let y = makeLoRAParameters(modules: task.modules, rank: 2, level: .client, rng: &rng)
        let gy = y.zerosLike()
        for (_, t) in gy.entries { t.fill(42) }
        var r1 = RNG(seed: 4), r2 = RNG(seed: 4)
        let adapter = TwoLevelAdapter(shared: x, sharedScale: 2, local: y, localScale: 1)
        let l1 = task.lossAndGradients(client: 0, adapter: adapter, sharedGrad: nil, localGrad: gy, rng: &r1)
        let l2 = task.lossAndGradients(client: 0, adapter: adapter, sharedGrad: nil, localGrad: nil, rng: &r2)
        #expect(l1 == l2)                                            // same seed, same minibatch
        #expect(!gy.tensor("linear.lora_C.weight").array.contains(42)) // overwritten, not accumulated
    }

    @Test func runsAreDeterministicForASeed() throws {
        let task = Self.smallFederation().task
        var cfg = FederatedConfig()
        cfg.rounds = 6; cfg.localSteps = 3; cfg.lowerSteps = 2; cfg.rank = 3; cfg.rank2 = 2; cfg.clientsPerRound = 3; cfg.seed = 7
        let a = try runFederated(.pf2lora, task: task, config: cfg)
        let b = try runFederated(.pf2lora, task: task, config: cfg)
        #expect(a.testLoss == b.testLoss)
        #expect(a.rounds.map(\.trainLoss) == b.rounds.map(\.trainLoss))
        #expect(a.rounds[0].trainLoss.compactMap { $0 }.count == 3)  // 3 of 5 clients sampled
        cfg.seed = 8
        #expect(try runFederated(.pf2lora, task: task, config: cfg).testLoss != a.testLoss)
    }

    /// Every method trains: the mean test MSE ends well below the base model's (adapter-free) MSE.
    @Test(arguments: FederatedMethod.allCases)
    func everyMethodLearns(_ method: FederatedMethod) throws {
        let task = Self.smallFederation().task
        var cfg = FederatedConfig()
        cfg.rounds = 30; cfg.localSteps = 5; cfg.lowerSteps = 2; cfg.rank = 3; cfg.rank2 = 2; cfg.evalEvery = 10
        let base = (0..<task.clientCount).map { task.evaluate(client: $0, adapter: .none, split: .test) }.reduce(0, +) / Float(task.clientCount)
        let res = try runFederated(method, task: task, config: cfg)
        #expect(res.meanTestLoss < 0.5 * base, "\(method): \(res.meanTestLoss) vs base \(base)")
        #expect(res.rounds.count == 30 && res.rounds.last?.validLoss != nil)
        if method == .pf2lora {
            #expect(res.uploadedParameters[0] == 3 * 22 && res.trainableParameters[0] == 5 * 22)
        }
        if method == .hetlora { #expect(res.clientRanks!.allSatisfy { (1...5).contains($0) }) }
    }

    /// HETLoRA's regularizer gradient (Gram-matrix form) against finite differences.
    @Test func hetloraTailNormGradient() throws {
        let task = Self.smallFederation().task
        var cfg = FederatedConfig(); cfg.rank = 3; cfg.rank2 = 2
        var rng = RNG(seed: 2)
        let alg = try HETLoRAAlgorithm(task: task, config: cfg, rng: &rng)
        let p = makeLoRAParameters(modules: task.modules, rank: 5, level: .shared, rng: &rng)
        for (_, t) in p.entries { rng.fillNormal(t, std: 0.5) }
        let g = p.zerosLike()
        _ = alg.blockNorm(p, lo: 3, hi: 5, addGradient: g, weight: 1)
        for (name, t) in p.entries {
            for i in stride(from: 0, to: t.count, by: 5) {
                let old = t.data[i], h: Float = 1e-2
                t.data[i] = old + h; let up = alg.blockNorm(p, lo: 3, hi: 5)
                t.data[i] = old - h; let down = alg.blockNorm(p, lo: 3, hi: 5)
                t.data[i] = old
                let fd = (up - down) / (2 * h)
                #expect(abs(fd - g.tensor(name).data[i]) < 2e-2 * max(0.1, abs(fd)), "\(name)[\(i)]")
            }
        }
    }

    @Test func nonFiniteLossIsReported() {
        let task = Self.smallFederation().task
        var cfg = FederatedConfig()
        cfg.rounds = 20; cfg.localSteps = 5; cfg.rank = 3; cfg.rank2 = 2; cfg.upperLR = 1e6; cfg.lowerLR = 1e6
        #expect(throws: FederatedError.self) { _ = try runFederated(.pf2lora, task: task, config: cfg) }
    }
}
