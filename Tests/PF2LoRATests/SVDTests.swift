import Foundation
import Testing
@testable import PF2LoRA

/// The learned-rank spectrum (QR of the stacked factors + Jacobi on the small core) against
/// closed forms built from known singular values.
@Suite struct SVDTests {
    /// `count` orthonormal columns of length n, as a row-major (n, count) array.
    static func orthonormal(_ n: Int, _ count: Int, _ rng: inout RNG) -> [[Float]] {
        SyntheticFederation.orthonormal(rows: n, count: count, against: [], rng: &rng)
    }

    @Test func twoByTwoClosedForm() {
        // [[3, 0], [4, 5]]: singular values sqrt(45) and sqrt(5).
        let sv = LearnedRank.jacobiSingularValues([3, 0, 4, 5], rows: 2, cols: 2)
        #expect(abs(sv[0] - 45.0.squareRoot()) < 1e-12 && abs(sv[1] - 5.0.squareRoot()) < 1e-12)
    }

    @Test func twoLevelFactorsGiveTheKnownSpectrum() {
        var rng = RNG(seed: 11)
        let dOut = 24, dIn = 30, r = 4, r2 = 2, k = r + r2
        let truth: [Float] = [5, 3, 2, 1.5, 0.7, 0.2]
        let u = Self.orthonormal(dOut, k, &rng), v = Self.orthonormal(dIn, k, &rng)
        // Delta = U diag(s) V^T = (U diag(s) M) (M^-1 V^T) with M unit upper-triangular (so M^-1 is exact to compute).
        var mMat = [[Double]](repeating: [Double](repeating: 0, count: k), count: k)
        for i in 0..<k { mMat[i][i] = 1; for j in (i + 1)..<k { mMat[i][j] = Double(rng.uniform(-1, 1)) } }
        var inv = [[Double]](repeating: [Double](repeating: 0, count: k), count: k)
        for j in 0..<k {   // back substitution, column j of M^-1
            for i in stride(from: k - 1, through: 0, by: -1) {
                var s = i == j ? 1.0 : 0.0
                for l in (i + 1)..<k { s -= mMat[i][l] * inv[l][j] }
                inv[i][j] = s
            }
        }
        let s1: Float = 2, s2: Float = 0.5
        // Split columns 0..<r to the shared level (scale s1) and r..<k to the client level (scale s2).
        let a = Tensor(zeros: [r, dIn]), b = Tensor(zeros: [dOut, r]), c = Tensor(zeros: [r2, dIn]), d = Tensor(zeros: [dOut, r2])
        for col in 0..<k {
            for i in 0..<dOut {
                var x = 0.0
                for l in 0..<k { x += Double(u[l][i]) * Double(truth[l]) * mMat[l][col] }
                if col < r { b.data[i * r + col] = Float(x) / s1 } else { d.data[i * r2 + col - r] = Float(x) / s2 }
            }
            for j in 0..<dIn {
                var y = 0.0
                for l in 0..<k { y += inv[col][l] * Double(v[l][j]) }
                if col < r { a.data[col * dIn + j] = Float(y) } else { c.data[(col - r) * dIn + j] = Float(y) }
            }
        }
        let sv = LearnedRank.singularValues(terms: [(b, a, s1), (d, c, s2)])
        #expect(sv.count == k)
        for (got, want) in zip(sv, truth) { #expect(abs(got - want) < 1e-4 * truth[0], "\(sv) vs \(truth)") }
        #expect(LearnedRank.rank(sv, tau: 0.1) == 5)    // 0.2 is below 0.1 x 5: dropped
        #expect(LearnedRank.rank(sv, tau: 0.03) == 6)
    }

    @Test func agreesWithDenseJacobiOnRandomFactors() {
        var rng = RNG(seed: 5)
        let dOut = 12, dIn = 9, r = 3, r2 = 2
        let a = Tensor(zeros: [r, dIn]), b = Tensor(zeros: [dOut, r]), c = Tensor(zeros: [r2, dIn]), d = Tensor(zeros: [dOut, r2])
        for t in [a, b, c, d] { rng.fillNormal(t) }
        let delta = Tensor(zeros: [dOut, dIn])
        b.matmul(a, into: delta, alpha: 1.5, accumulate: true)
        d.matmul(c, into: delta, alpha: 0.5, accumulate: true)
        let dense = LearnedRank.jacobiSingularValues(delta.array.map(Double.init), rows: dOut, cols: dIn)
        let fast = LearnedRank.singularValues(terms: [(b, a, 1.5), (d, c, 0.5)])
        for i in 0..<(r + r2) { #expect(abs(Double(fast[i]) - dense[i]) < 1e-4 * dense[0]) }
        #expect(dense[r + r2] < 1e-5 * dense[0])   // the dense spectrum has nothing beyond rank r + r2
    }

    @Test func zeroClientLevelAndRankRule() {
        var rng = RNG(seed: 2)
        let mods = [LoRAModule(name: "m", dIn: 10, dOut: 8)]
        let shared = makeLoRAParameters(modules: mods, rank: 3, level: .shared, rng: &rng)
        let local = makeLoRAParameters(modules: mods, rank: 2, level: .client, rng: &rng)
        // B = D = 0 at init: the update is zero, rank 0.
        let sv = LearnedRank.spectra(modules: mods, adapter: TwoLevelAdapter(shared: shared, sharedScale: 2, local: local, localScale: 1))["m"]!
        #expect(sv.allSatisfy { $0 == 0 } && LearnedRank.rank(sv) == 0)
        #expect(LearnedRank.rank([1, 0.5, 0.11, 0.1, 0.01]) == 3)   // strictly above 0.1 x max
    }
}
