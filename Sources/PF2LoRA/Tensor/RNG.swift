import Foundation

/// A seeded pseudo-random generator (xoshiro256**, seeded through SplitMix64), used by every
/// training and data-generation path so that a run is reproducible from its seed.
///
/// It is a value type: copying it forks the stream. `derive(_:)` makes an independent child stream
/// from a key (a client index, a round number), so results do not depend on the order in which
/// clients happen to be processed.
public struct RNG: RandomNumberGenerator, Sendable {
    private var s0: UInt64, s1: UInt64, s2: UInt64, s3: UInt64

    /// A generator for `seed`; equal seeds give equal streams on every platform.
    public init(seed: UInt64) {
        var sm = SplitMix64(seed: seed)
        s0 = sm.next(); s1 = sm.next(); s2 = sm.next(); s3 = sm.next()
    }

    /// The next 64 random bits.
    public mutating func next() -> UInt64 {
        let result = ((s1 &* 5) << 7 | (s1 &* 5) >> 57) &* 9
        let t = s1 << 17
        s2 ^= s0; s3 ^= s1; s1 ^= s2; s0 ^= s3
        s2 ^= t
        s3 = (s3 << 45) | (s3 >> 19)
        return result
    }

    /// An independent generator derived from this one's current state and `key`
    /// (this generator is not advanced).
    public func derive(_ key: UInt64) -> RNG {
        RNG(seed: s0 ^ (s1 &* 0x9E37_79B9_7F4A_7C15) ^ (key &* 0xD1B5_4A32_D192_ED03) ^ (s3 >> 7))
    }

    /// Uniform in [0, 1) with 24 bits of resolution.
    public mutating func uniform() -> Float { Float(next() >> 40) * (1.0 / 16_777_216.0) }

    /// Uniform in [lo, hi).
    public mutating func uniform(_ lo: Float, _ hi: Float) -> Float { lo + (hi - lo) * uniform() }

    /// Standard normal (Box–Muller in double precision).
    public mutating func normal() -> Float {
        let u1 = max(Double(next() >> 11) * 0x1.0p-53, 1e-300)
        let u2 = Double(next() >> 11) * 0x1.0p-53
        return Float((-2 * Foundation.log(u1)).squareRoot() * Foundation.cos(2 * Double.pi * u2))
    }

    /// Uniform integer in [0, n).
    public mutating func int(below n: Int) -> Int {
        precondition(n > 0)
        return Int(next() % UInt64(n))  // bias < n / 2^64, negligible for our n
    }

    /// `k` distinct indices from [0, n), in random order (partial Fisher–Yates).
    public mutating func sample(_ k: Int, from n: Int) -> [Int] {
        precondition(k <= n, "sample: \(k) of \(n)")
        var idx = Array(0..<n)
        for i in 0..<k { idx.swapAt(i, i + int(below: n - i)) }
        return Array(idx[0..<k])
    }

    /// Fills `t` with values uniform in [-bound, bound).
    public mutating func fillUniform(_ t: Tensor, bound: Float) {
        for i in 0..<t.count { t.data[i] = uniform(-bound, bound) }
    }

    /// Fills `t` with normal values of standard deviation `std`.
    public mutating func fillNormal(_ t: Tensor, std: Float = 1) {
        for i in 0..<t.count { t.data[i] = std * normal() }
    }
}

/// SplitMix64 (Steele, Lea and Flood 2014): a tiny seeded generator. It seeds `RNG` and makes the
/// deterministic texts of the benchmarks and tests; use `RNG` for anything statistical.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    public private(set) var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
