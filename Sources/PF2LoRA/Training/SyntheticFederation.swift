import Foundation

/// The generator of the synthetic federation (docs/SYNTHETIC.md).
public struct SyntheticConfig: Codable, Sendable {
    public var clients = 8
    public var dIn = 40
    public var dOut = 32
    /// Rank r of the shared part S and the client budget r2: true client ranks span [r - r2, r + r2].
    public var rank = 8
    public var rank2 = 2
    /// S's singular values, geometric from `sharedTop` down to `sharedBottom`.
    public var sharedTop: Float = 3
    public var sharedBottom: Float = 1
    /// Singular values of a client's added directions, uniform in this range.
    public var addedLow: Float = 1
    public var addedHigh: Float = 2
    /// Standard deviation of the target noise (the test-MSE floor is noiseStd^2).
    public var noiseStd: Float = 0.1
    /// Training examples per client: spread log-uniformly over [trainMin, trainMax], assigned in a seeded order.
    public var trainMin = 100
    public var trainMax = 400
    public var validCount = 100
    public var testCount = 1000
    public var batchSize = 64
    public var seed: UInt64 = 0
    public init() {}
}

/// What the generator knows about one client.
public struct SyntheticClientTruth: Codable, Sendable {
    /// Directions of S removed (m_k of them, their indices in S) and directions added (a_k).
    public let removed: [Int]
    public let added: Int
    /// rank(Delta_k*) = r - m_k + a_k, by construction.
    public let rank: Int
    /// Singular values of Delta_k*, descending, by construction (the components are orthogonal).
    public let singularValues: [Float]
    public let trainCount: Int
}

/// A federation of linear-regression clients whose true updates have known ranks.
///
///     S        = U diag(s) V^T                                  rank r, shared
///     Delta_k* = S - sum_{i in removed_k} s_i u_i v_i^T + sum_{j < a_k} t_j p_j q_j^T
///     y        = (W0 + Delta_k*) x + noise,  x ~ N(0, I)
///
/// with p_j ⟂ span(U), q_j ⟂ span(V), so Delta_k* - S has rank m_k + a_k <= r2 and the singular values
/// of Delta_k* are exactly s minus the removed ones plus the t_j.
public final class SyntheticFederation {
    public let config: SyntheticConfig
    public let w0: Tensor
    /// Delta_k* per client, (dOut, dIn).
    public let deltas: [Tensor]
    public let truths: [SyntheticClientTruth]
    public let task: LinearLoRATask

    /// (m_k, a_k) patterns in order: first every rank from r - r2 to r + r2, then mixed ones, repeating.
    public static func patterns(rank2: Int, count: Int) -> [(m: Int, a: Int)] {
        var base: [(Int, Int)] = []
        for m in stride(from: rank2, through: 1, by: -1) { base.append((m, 0)) }
        base.append((0, 0))
        for a in 1...max(1, rank2) where a <= rank2 { base.append((0, a)) }
        for m in 1..<max(1, rank2) { for a in 1...(rank2 - m) { base.append((m, a)) } }
        return (0..<count).map { base[$0 % base.count] }.map { (m: $0.0, a: $0.1) }
    }

    public init(_ config: SyntheticConfig) {
        precondition(config.rank >= config.rank2 && config.clients >= 1)
        self.config = config
        var rng = RNG(seed: config.seed ^ 0x5E7E_11C0_FFEE)
        let dIn = config.dIn, dOut = config.dOut, r = config.rank
        precondition(r + config.rank2 <= min(dIn, dOut), "synthetic: r + r2 must not exceed min(dIn, dOut)")

        let w0 = Tensor(zeros: [dOut, dIn])
        rng.fillNormal(w0, std: 1 / Float(dIn).squareRoot())
        self.w0 = w0
        let u = Self.orthonormal(rows: dOut, count: r, against: [], rng: &rng)
        let v = Self.orthonormal(rows: dIn, count: r, against: [], rng: &rng)
        let s: [Float] = (0..<r).map { i in
            r == 1 ? config.sharedTop
                   : config.sharedTop * pow(config.sharedBottom / config.sharedTop, Float(i) / Float(r - 1))
        }
        // Client sizes: log-uniform grid over [trainMin, trainMax], in a seeded order.
        let nClients = config.clients
        var sizes: [Int] = (0..<nClients).map { i in
            let f = nClients == 1 ? 0 : Double(i) / Double(nClients - 1)
            return Int((Double(config.trainMin) * pow(Double(config.trainMax) / Double(config.trainMin), f)).rounded())
        }
        for i in stride(from: nClients - 1, to: 0, by: -1) { sizes.swapAt(i, rng.int(below: i + 1)) }
        let pats = Self.patterns(rank2: config.rank2, count: nClients)

        var deltas: [Tensor] = [], truths: [SyntheticClientTruth] = []
        var train: [RegressionData] = [], valid: [RegressionData] = [], test: [RegressionData] = []
        for k in 0..<nClients {
            let (m, a) = pats[k]
            let removed = rng.sample(m, from: r).sorted()
            let p = Self.orthonormal(rows: dOut, count: a, against: u, rng: &rng)
            let q = Self.orthonormal(rows: dIn, count: a, against: v, rng: &rng)
            let t: [Float] = (0..<a).map { _ in rng.uniform(config.addedLow, config.addedHigh) }
            let delta = Tensor(zeros: [dOut, dIn])
            for i in 0..<r where !removed.contains(i) { Self.addOuter(delta, s[i], u[i], v[i]) }
            for j in 0..<a { Self.addOuter(delta, t[j], p[j], q[j]) }
            deltas.append(delta)
            let sv = ((0..<r).filter { !removed.contains($0) }.map { s[$0] } + t).sorted(by: >)
            truths.append(SyntheticClientTruth(removed: removed, added: a, rank: r - m + a, singularValues: sv, trainCount: sizes[k]))
            // W_k = W0 + Delta_k*
            let wk = w0.clone()
            BLAS.axpy(wk.count, 1, delta.data, wk.data)
            var dataRNG = rng.derive(UInt64(k) &+ 0xDA7A)
            train.append(Self.sample(wk, n: sizes[k], noise: config.noiseStd, rng: &dataRNG))
            valid.append(Self.sample(wk, n: config.validCount, noise: config.noiseStd, rng: &dataRNG))
            test.append(Self.sample(wk, n: config.testCount, noise: config.noiseStd, rng: &dataRNG))
        }
        self.deltas = deltas
        self.truths = truths
        self.task = LinearLoRATask(w0: w0, train: train, valid: valid, test: test, batchSize: config.batchSize)
    }

    /// n examples y = W x + noise.
    static func sample(_ w: Tensor, n: Int, noise: Float, rng: inout RNG) -> RegressionData {
        let x = Tensor(zeros: [n, w.cols]), y = Tensor(zeros: [n, w.rows])
        rng.fillNormal(x)
        BLAS.gemm(x.data, w.data, y.data, m: n, n: w.rows, k: w.cols, transB: true)   // (n,dIn) @ (dIn,dOut)
        for i in 0..<y.count { y.data[i] += noise * rng.normal() }
        return RegressionData(x: x, y: y)
    }

    /// delta += s * u v^T.
    static func addOuter(_ delta: Tensor, _ s: Float, _ u: [Float], _ v: [Float]) {
        for i in 0..<u.count { for j in 0..<v.count { delta.data[i * v.count + j] += s * u[i] * v[j] } }
    }

    /// `count` random orthonormal vectors of length `rows`, orthogonal to `against` (Gram–Schmidt twice, in double).
    static func orthonormal(rows: Int, count: Int, against: [[Float]], rng: inout RNG) -> [[Float]] {
        var basis: [[Double]] = against.map { $0.map(Double.init) }
        var out: [[Float]] = []
        while out.count < count {
            var v = (0..<rows).map { _ in Double(rng.normal()) }
            for _ in 0..<2 {
                for b in basis {
                    let d = zip(v, b).reduce(0) { $0 + $1.0 * $1.1 }
                    for i in 0..<rows { v[i] -= d * b[i] }
                }
            }
            let norm = v.reduce(0) { $0 + $1 * $1 }.squareRoot()
            guard norm > 1e-6 else { continue }
            v = v.map { $0 / norm }
            basis.append(v)
            out.append(v.map(Float.init))
        }
        return out
    }
}
