import Foundation
import Testing
@testable import PF2LoRA

/// `FederatedConfig.lowerOptimizer` (issue 13, docs/RESULTS-data-to-text-why.md): the client level (C_k, D_k) stepped by
/// SGD or by an AdamW of its own, in the bilevel and the joint variant. The tests replay the first lower step by hand and
/// check the joint variant's default is the AdamW option at the upper rate.
@Suite struct LowerOptimizerTests {
    static func config() -> FederatedConfig {
        var c = FederatedConfig()
        c.rounds = 4; c.localSteps = 3; c.lowerSteps = 2; c.rank = 3; c.rank2 = 2; c.evalEvery = 0
        c.upperLR = 0.02; c.lowerLR = 0.02; c.minLRRatio = 0.1
        return c
    }

    /// One bilevel iteration with one lower step and the shared rate 0 (x cannot move: only the lower step acts on y):
    /// SGD moves y by -eta g, AdamW's first step by -eta g / (|g| + eps), i.e. eta per coordinate whatever the
    /// gradient's size. Both replayed from the same minibatch (the first one drawn from the round's stream).
    @Test(arguments: [LowerOptimizer.sgd, .adamw])
    func firstLowerStepIsTheOptimizers(_ opt: LowerOptimizer) throws {
        let task = FederatedTests.smallFederation().task
        var c = Self.config()
        c.localSteps = 1; c.lowerSteps = 1; c.upperLR = 0; c.lowerLR = 0.05; c.lowerOptimizer = opt
        var initRNG = RNG(seed: 7)
        let x = makeLoRAParameters(modules: task.modules, rank: 3, level: .shared, rng: &initRNG)
        let y = makeLoRAParameters(modules: task.modules, rank: 2, level: .client, rng: &initRNG)
        // y's D starts at zero, so only D has a gradient at the start: give D a start of its own so C's moves too.
        for (name, t) in y.entries where name.hasSuffix("lora_D.weight") {
            for i in 0..<t.count { t.data[i] = 0.1 * Float(i % 7) - 0.3 }
        }
        let x0 = x.clone(), y0 = y.clone()
        let g = y.zerosLike()
        var replay = RNG(seed: 11)
        _ = task.lossAndGradients(client: 1, adapter: TwoLevelAdapter(shared: x0, sharedScale: c.sharedScale, local: y0,
                                                                       localScale: c.localScale),
                                  sharedGrad: nil, localGrad: g, rng: &replay)
        var rng = RNG(seed: 11)
        _ = pf2loraLocalIterations(task: task, client: 1, shared: x, local: y, config: c, lrFactor: 1, upper: makeAdamW(c),
                                   rng: &rng, afterIteration: { _, _ in })
        var worst: Float = 0, unitSteps = 0, moved = 0
        for (name, t) in y.entries {
            let t0 = y0.tensor(name), gt = g.tensor(name)
            for i in 0..<t.count {
                let gi = gt.data[i]
                let want = opt == .sgd ? t0.data[i] - 0.05 * gi : t0.data[i] - 0.05 * gi / (abs(gi) + 1e-8)
                worst = max(worst, abs(t.data[i] - want))
                if t.data[i] != t0.data[i] { moved += 1 }
                if abs(abs(t.data[i] - t0.data[i]) - 0.05) < 1e-5 { unitSteps += 1 }
            }
        }
        #expect(worst < 1e-6, "\(opt): y differs from the replayed step by \(worst)")
        #expect(moved > 20, "\(opt): only \(moved) coordinates moved")
        // AdamW's first step is eta on every coordinate with a gradient; SGD's is eta |g| (|g| is far from 1 here).
        if opt == .adamw { #expect(unitSteps == moved) } else { #expect(unitSteps < moved / 2) }
        for (name, t) in x.entries { #expect(t.array == x0.tensor(name).array) }   // rate 0: the shared level did not move
    }

    /// The joint variant's default (one AdamW on all four matrices at upperLR, scheduled) is exactly `lowerOptimizer =
    /// .adamw` with lowerLR = upperLR and the schedule on; without the schedule, or with SGD, the run differs.
    @Test func jointDefaultIsAdamWAtTheUpperRate() throws {
        let task = FederatedTests.smallFederation().task
        var c = Self.config()
        c.pf2loraVariant = .joint
        let def = try runFederated(.pf2lora, task: task, config: c)
        var a = c
        a.lowerOptimizer = .adamw; a.scheduleLowerLR = true
        let same = try runFederated(.pf2lora, task: task, config: a)
        #expect(same.testLoss == def.testLoss)
        for k in 0..<5 {
            for (name, t) in def.clientAdapters[k].local!.entries { #expect(same.clientAdapters[k].local!.tensor(name).array == t.array) }
        }
        a.scheduleLowerLR = false
        let unscheduled = try runFederated(.pf2lora, task: task, config: a)
        #expect(unscheduled.testLoss != def.testLoss)
        var s = c
        s.lowerOptimizer = .sgd
        let sgd = try runFederated(.pf2lora, task: task, config: s)
        #expect(sgd.testLoss != def.testLoss)
        // The budget is the variant's: one evaluation per iteration whatever the optimizer.
        #expect(sgd.trainingEvaluations == def.trainingEvaluations)
    }

    /// The bilevel default is SGD: setting `.sgd` explicitly changes nothing, `.adamw` changes the run.
    @Test func bilevelDefaultIsSGD() throws {
        let task = FederatedTests.smallFederation().task
        let c = Self.config()
        let def = try runFederated(.pf2lora, task: task, config: c)
        var s = c; s.lowerOptimizer = .sgd
        #expect(try runFederated(.pf2lora, task: task, config: s).testLoss == def.testLoss)
        var a = c; a.lowerOptimizer = .adamw
        let adam = try runFederated(.pf2lora, task: task, config: a)
        #expect(adam.testLoss != def.testLoss)
        #expect(adam.trainingEvaluations == def.trainingEvaluations)
    }
}
