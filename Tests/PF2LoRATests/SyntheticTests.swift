import Foundation
import Testing
@testable import PF2LoRA

/// The synthetic federation's generator and a small end-to-end rank-recovery run.
@Suite struct SyntheticTests {
    static func config(seed: UInt64) -> SyntheticConfig {
        var c = SyntheticConfig()
        c.clients = 8; c.dIn = 24; c.dOut = 20; c.rank = 8; c.rank2 = 2
        c.validCount = 50; c.testCount = 200; c.seed = seed
        return c
    }

    @Test func patternsCoverEveryRank() {
        let p = SyntheticFederation.patterns(rank2: 2, count: 8)
        #expect(Set(p.map { 8 - $0.m + $0.a }) == Set(6...10))
        #expect(p.allSatisfy { $0.m + $0.a <= 2 })
        #expect(Set(SyntheticFederation.patterns(rank2: 3, count: 7).map { 5 - $0.m + $0.a }) == Set(2...8))
    }

    /// The stated ground truth agrees with a dense SVD of Delta_k*, and Delta_k* - S has rank <= r2.
    @Test func generatorTruthMatchesDenseSpectrum() {
        var c = SyntheticConfig()
        c.seed = 3; c.trainMin = 20; c.trainMax = 30; c.validCount = 5; c.testCount = 5
        let fed = SyntheticFederation(c)
        #expect(Set(fed.truths.map(\.rank)) == Set(6...10))
        #expect(Set(fed.truths.map(\.trainCount)).count > 1)
        // S itself = the delta of a client that removed and added nothing.
        let sIndex = fed.truths.firstIndex { $0.removed.isEmpty && $0.added == 0 }!
        for (k, t) in fed.truths.enumerated() {
            let d = fed.deltas[k]
            let dense = LearnedRank.jacobiSingularValues(d.array.map(Double.init), rows: d.rows, cols: d.cols)
            let numericRank = dense.filter { $0 > 1e-4 * dense[0] }.count
            #expect(numericRank == t.rank)
            for (a, b) in zip(dense, t.singularValues) { #expect(abs(a - Double(b)) < 1e-4) }
            var diff = d.array
            for i in 0..<diff.count { diff[i] -= fed.deltas[sIndex].data[i] }
            let dd = LearnedRank.jacobiSingularValues(diff.map(Double.init), rows: d.rows, cols: d.cols)
            #expect(dd.filter { $0 > 1e-4 * dense[0] }.count <= c.rank2)
        }
    }

    /// A small PF2LoRA run (small dims, 60 rounds) recovers every client's rank exactly (ranks 6..10).
    /// The truth comes from the generator; the learned rank only from the trained adapters.
    @Test(arguments: [UInt64(1), 2])
    func pf2loraRecoversEveryRank(seed: UInt64) throws {
        let sc = Self.config(seed: seed)
        var fc = FederatedConfig()
        fc.rank = 8; fc.alpha = 16; fc.rank2 = 2; fc.alpha2 = 4; fc.rounds = 60; fc.evalEvery = 0; fc.seed = seed
        let (report, results, fed) = try SyntheticExperiment(synthetic: sc, federated: fc, methods: [.pf2lora, .homlora]).run()
        #expect(Set(fed.truths.map(\.rank)) == Set(6...10))
        for row in report.clients {
            #expect(row.learnedRank == row.trueRank, "client \(row.client): learned \(row.learnedSingularValues), truth \(row.trueSingularValues)")
        }
        // The personalized model beats the single global LoRA on average.
        #expect(results[0].meanTestLoss < results[1].meanTestLoss)
    }
}
