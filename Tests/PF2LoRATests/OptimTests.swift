import Foundation
import Testing
@testable import PF2LoRA

/// Optimizers, clipping and the schedule against PyTorch trajectories
/// (Tests/FixtureScripts/fixtures/optim_ref.py -> Fixtures/optim-ref/). Tolerance: 2e-6 absolute + 2e-6 relative,
/// float32 rounding over six steps.
@Suite struct OptimTests {
    struct Case: Decodable {
        let name: String
        let names: [String]
        let shapes: [String: [Int]]
        let `init`: [String: [Float]]
        let lrs: [Float]
        let grads: [[String: [Float]]]
        let after: [[String: [Float]]]
    }

    static func load<T: Decodable>(_ file: String, as: T.Type) throws -> T {
        let data = try Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("optim-ref/\(file)")))
        return try JSONDecoder().decode(T.self, from: data)
    }

    static func set(_ names: [String], _ shapes: [String: [Int]], _ values: [String: [Float]]) -> ParameterSet {
        ParameterSet(names.map { ($0, Tensor(values[$0]!, shape: shapes[$0]!)) })
    }

    static func replay(_ file: String, _ opt: Optimizer) throws {
        let c = try load(file, as: Case.self)
        let p = set(c.names, c.shapes, c.`init`)
        for s in 0..<c.lrs.count {
            let g = set(c.names, c.shapes, c.grads[s])
            opt.step(p, g, lr: c.lrs[s])
            for n in c.names {
                let got = p.tensor(n).array, want = c.after[s][n]!
                for i in 0..<got.count {
                    #expect(abs(got[i] - want[i]) <= 2e-6 + 2e-6 * abs(want[i]),
                            "\(c.name) step \(s) \(n)[\(i)]: \(got[i]) vs torch \(want[i])")
                }
            }
        }
    }

    @Test func sgdPlain() throws { try Self.replay("sgd_plain.json", SGD()) }
    @Test func sgdMomentumWeightDecay() throws {
        try Self.replay("sgd_momentum_wd.json", SGD(momentum: 0.9, dampening: 0.1, weightDecay: 0.01))
    }
    @Test func sgdNesterov() throws { try Self.replay("sgd_nesterov.json", SGD(momentum: 0.8, nesterov: true)) }
    @Test func adamW() throws { try Self.replay("adamw.json", AdamW(weightDecay: 0.01)) }
    @Test func adamWLargeDecay() throws {
        try Self.replay("adamw_wd_big.json", AdamW(beta1: 0.8, beta2: 0.99, eps: 1e-6, weightDecay: 0.5))
    }

    struct Clip: Decodable {
        let max_norm: Float
        let names: [String]
        let shapes: [String: [Int]]
        let grads: [String: [Float]]
        let norm: Float
        let clipped: [String: [Float]]
    }

    @Test func clipping() throws {
        for c in try Self.load("clip.json", as: [Clip].self) {
            let g = Self.set(c.names, c.shapes, c.grads)
            let norm = clipGradNorm(g, maxNorm: c.max_norm)
            #expect(abs(norm - c.norm) <= 1e-5 * c.norm)
            for n in c.names {
                for (a, b) in zip(g.tensor(n).array, c.clipped[n]!) { #expect(abs(a - b) <= 1e-6 + 1e-6 * abs(b)) }
            }
        }
    }

    struct Sched: Decodable { let base: Float; let warmup: Int; let total: Int; let min_ratio: Float; let lrs: [Float] }

    @Test func warmupCosine() throws {
        for c in try Self.load("schedule.json", as: [Sched].self) {
            let s = LRSchedule(base: c.base, warmupSteps: c.warmup, totalSteps: c.total, minRatio: c.min_ratio)
            for (i, want) in c.lrs.enumerated() {
                #expect(abs(s.lr(at: i) - want) <= 1e-6 * c.base, "step \(i): \(s.lr(at: i)) vs \(want)")
            }
        }
    }

    @Test func parameterSetArithmetic() {
        let a = ParameterSet([("x", Tensor([1, 2, 3], shape: [3])), ("y", Tensor([4], shape: [1]))])
        let b = a.clone()
        b.scale(2)
        #expect(a.tensor("x").array == [1, 2, 3])      // clone is deep
        let avg = a.zerosLike()
        avg.setWeightedAverage(of: [a, b], weights: [0.25, 0.75])
        #expect(avg.tensor("x").array == [1.75, 3.5, 5.25])
        #expect(abs(a.globalNorm() - Float(30).squareRoot()) < 1e-6)
        a.axpy(-1, avg)
        #expect(a.tensor("y").array == [-3])
    }

    @Test func rngIsDeterministicAndDerivesIndependentStreams() {
        var a = RNG(seed: 7), b = RNG(seed: 7)
        #expect((0..<5).map { _ in a.next() } == (0..<5).map { _ in b.next() })
        let c1 = a.derive(1), c2 = a.derive(2)
        var x = c1, y = c2
        #expect(x.next() != y.next())
        var n = RNG(seed: 3)
        let xs = (0..<20000).map { _ in n.normal() }
        let mean = xs.reduce(0, +) / Float(xs.count)
        let varc = xs.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Float(xs.count)
        #expect(abs(mean) < 0.03 && abs(varc - 1) < 0.05)
    }
}
