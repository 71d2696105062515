import Foundation

/// The project's one seeded random generator (xoshiro256**, seeded through SplitMix64).
/// Sampling, weight initialization and training all take one explicitly: same seed, same result.
public struct Xoshiro256: RandomNumberGenerator, Sendable {
    private var s0: UInt64, s1: UInt64, s2: UInt64, s3: UInt64
    private var spareNormal: Float?

    public init(seed: UInt64) {
        var sm = seed
        func next() -> UInt64 {
            sm &+= 0x9e37_79b9_7f4a_7c15
            var z = sm
            z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
            z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
            return z ^ (z >> 31)
        }
        s0 = next(); s1 = next(); s2 = next(); s3 = next()
    }

    @inline(__always)
    public mutating func next() -> UInt64 {
        let result = ((s1 &* 5) << 7 | (s1 &* 5) >> 57) &* 9
        let t = s1 << 17
        s2 ^= s0; s3 ^= s1; s1 ^= s2; s0 ^= s3
        s2 ^= t
        s3 = (s3 << 45) | (s3 >> 19)
        return result
    }

    /// Uniform in [0, 1) with 24 random bits.
    @inline(__always)
    public mutating func nextFloat() -> Float {
        Float(next() >> 40) * (1.0 / 16_777_216.0)
    }

    /// Uniform in [lo, hi).
    @inline(__always)
    public mutating func uniform(_ lo: Float, _ hi: Float) -> Float { lo + (hi - lo) * nextFloat() }

    /// Standard normal (Box-Muller, both values used).
    public mutating func nextNormal() -> Float {
        if let s = spareNormal { spareNormal = nil; return s }
        var u1 = Double(next() >> 11) * (1.0 / 9_007_199_254_740_992.0)
        if u1 < 1e-300 { u1 = 1e-300 }
        let u2 = Double(next() >> 11) * (1.0 / 9_007_199_254_740_992.0)
        let r = (-2 * log(u1)).squareRoot()
        spareNormal = Float(r * sin(2 * .pi * u2))
        return Float(r * cos(2 * .pi * u2))
    }

    /// A new generator whose stream is independent of this one's (for per-client or per-request streams).
    public mutating func fork() -> Xoshiro256 { Xoshiro256(seed: next()) }
}
