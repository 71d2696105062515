import Foundation

/// How to pick the next token. `temperature` below `SamplingParams.greedyBelow` (0 included) is greedy.
public struct SamplingParams: Sendable, Equatable {
    /// Temperatures below this are greedy: 1/T would overflow (1e-40) or make exp((l - max)/T) 0 for
    /// every token but the largest anyway (a logit gap of 1e-3 at T = 1e-5 is a factor e^-100).
    public static let greedyBelow: Float = 1e-5
    public var temperature: Float = 1
    /// Keep only the k most likely tokens (0 = off).
    public var topK: Int = 0
    /// Keep the smallest set of tokens whose probability reaches p (1 = off).
    public var topP: Float = 1
    public var seed: UInt64 = 0

    public init(temperature: Float = 1, topK: Int = 0, topP: Float = 1, seed: UInt64 = 0) {
        self.temperature = temperature; self.topK = topK; self.topP = topP; self.seed = seed
    }

    /// Says what is wrong with out-of-range values.
    public func validate() throws {
        guard temperature.isFinite, temperature >= 0 else { throw SamplingError.bad("temperature must be a finite number >= 0 (0 is greedy)") }
        guard topK >= 0 else { throw SamplingError.bad("top_k must be >= 0 (0 turns it off)") }
        guard topP.isFinite, topP > 0, topP <= 1 else { throw SamplingError.bad("top_p must be in (0, 1] (1 turns it off)") }
    }
}

public enum SamplingError: Error, CustomStringConvertible {
    case bad(String)
    public var description: String { if case let .bad(s) = self { return s }; return "" }
}

/// Picks tokens from logits with an explicit seeded generator: the same seed gives the same text.
/// Its buffers are allocated once per vocabulary size.
public struct Sampler {
    public let params: SamplingParams
    private var rng: RNG
    private var probs: [Float]
    private var order: [Int32]

    public init(params: SamplingParams, vocabSize: Int) {
        self.params = params
        rng = RNG(seed: params.seed)
        probs = [Float](repeating: 0, count: vocabSize)
        order = [Int32](repeating: 0, count: vocabSize)
    }

    /// The index of the largest logit (the first one on ties, as torch.argmax).
    public static func argmax(_ logits: UnsafePointer<Float>, count n: Int) -> Int {
        var best = 0
        var bv = logits[0]
        for i in 1..<n where logits[i] > bv { bv = logits[i]; best = i }
        return best
    }

    public mutating func sample(_ logits: UnsafePointer<Float>, count n: Int) -> Int {
        if params.temperature < SamplingParams.greedyBelow || params.topK == 1 { return Self.argmax(logits, count: n) }
        let invT = 1 / params.temperature
        let u = rng.uniform()
        return probs.withUnsafeMutableBufferPointer { p in
            order.withUnsafeMutableBufferPointer { ord in
                // Softmax of logits / T.
                var mx = -Float.infinity
                for i in 0..<n { mx = max(mx, logits[i]) }
                var sum: Float = 0
                for i in 0..<n { let e = exp((logits[i] - mx) * invT); p[i] = e; sum += e }
                // Non-finite logits (never from a healthy model) cannot be sampled: take the argmax.
                guard sum > 0, sum.isFinite else { return Self.argmax(logits, count: n) }
                let inv = 1 / sum
                for i in 0..<n { p[i] *= inv }
                let k = params.topK > 0 ? min(params.topK, n) : n
                if k == n && params.topP >= 1 {
                    var cdf: Float = 0
                    for i in 0..<n { cdf += p[i]; if u < cdf { return i } }
                    return n - 1
                }
                // Candidates: drop tokens that cannot be in the top-p set (llama2.c's cutoff), then sort.
                // When top_p < 1/n every token can fall below the cutoff (a near-uniform distribution
                // at a huge temperature): the most likely token always stays, it alone reaches top_p then.
                let cutoff = params.topP < 1 ? (1 - params.topP) / Float(max(n - 1, 1)) : 0
                var m = 0
                for i in 0..<n where p[i] >= cutoff { ord[m] = Int32(i); m += 1 }
                if m == 0 { ord[0] = Int32(Self.argmax(logits, count: n)); m = 1 }
                var cand = UnsafeMutableBufferPointer(rebasing: ord[0..<m])
                // Equal probabilities (rounded equal at a huge temperature) are ordered by their logits.
                cand.sort { (i: Int32, j: Int32) -> Bool in
                    let pi = p[Int(i)], pj = p[Int(j)]
                    if pi != pj { return pi > pj }
                    let li = logits[Int(i)], lj = logits[Int(j)]
                    return li > lj || (li == lj && i < j)
                }
                var keep = max(1, min(k, m))
                var mass: Float = 0
                for j in 0..<keep {
                    mass += p[Int(cand[j])]
                    if mass >= params.topP { keep = j + 1; break }
                }
                mass = 0
                for j in 0..<keep { mass += p[Int(cand[j])] }
                let r = u * mass
                var cdf: Float = 0
                for j in 0..<keep {
                    cdf += p[Int(cand[j])]
                    if r < cdf { return Int(cand[j]) }
                }
                return Int(cand[keep - 1])
            }
        }
    }
}
