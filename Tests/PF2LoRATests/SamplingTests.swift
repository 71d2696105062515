import Foundation
import Testing
@testable import PF2LoRA

@Suite struct SamplingTests {
    /// A fixed distribution over 8 tokens: probabilities 0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005.
    static let probs: [Float] = [0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005]
    static let logits: [Float] = probs.map { log($0) }

    static func histogram(_ p: SamplingParams, n: Int = 20000) -> [Int] {
        var s = Sampler(params: p, vocabSize: 8)
        var h = [Int](repeating: 0, count: 8)
        logits.withUnsafeBufferPointer { lp in for _ in 0..<n { h[s.sample(lp.baseAddress!, count: 8)] += 1 } }
        return h
    }

    @Test func greedyIsArgmax() {
        var s = Sampler(params: SamplingParams(temperature: 0), vocabSize: 8)
        let l: [Float] = [0.1, 3, 3, -1, 2, 0, 0, 0]
        #expect(l.withUnsafeBufferPointer { s.sample($0.baseAddress!, count: 8) } == 1, "first of equal maxima, as torch.argmax")
    }

    @Test func sameSeedSameSamplesOtherSeedOther() {
        let a = Self.histogram(SamplingParams(temperature: 1, seed: 5), n: 200)
        let b = Self.histogram(SamplingParams(temperature: 1, seed: 5), n: 200)
        let c = Self.histogram(SamplingParams(temperature: 1, seed: 6), n: 200)
        #expect(a == b)
        #expect(a != c)
    }

    /// Temperature 1 samples the softmax: frequencies within 4 standard errors of the probabilities.
    @Test func temperatureOneMatchesTheDistribution() {
        let n = 20000
        let h = Self.histogram(SamplingParams(temperature: 1, seed: 1), n: n)
        for (i, p) in Self.probs.enumerated() {
            let se = (Double(p) * (1 - Double(p)) / Double(n)).squareRoot()
            #expect(abs(Double(h[i]) / Double(n) - Double(p)) < 4 * se + 1e-9, "token \(i): \(h[i])")
        }
    }

    /// top-k keeps the k most likely tokens, renormalized; top-p the smallest set reaching p.
    @Test func topKAndTopP() {
        let n = 20000
        let k = Self.histogram(SamplingParams(temperature: 1, topK: 2, seed: 2), n: n)
        #expect(k[2...].allSatisfy { $0 == 0 })
        let share = Double(k[0]) / Double(n)   // 0.4 / 0.65
        #expect(abs(share - 0.4 / 0.65) < 0.02)
        // p = 0.79: 0.4 + 0.25 = 0.65 is short of it, + 0.15 = 0.8 reaches it: three tokens.
        let p = Self.histogram(SamplingParams(temperature: 1, topP: 0.79, seed: 3), n: n)
        #expect(p[3...].allSatisfy { $0 == 0 } && p[2] > 0)
        // p = 0.81 needs the fourth.
        let p2 = Self.histogram(SamplingParams(temperature: 1, topP: 0.81, seed: 3), n: n)
        #expect(p2[3] > 0 && p2[4...].allSatisfy { $0 == 0 })
        // Low temperature sharpens: the top token dominates.
        let cold = Self.histogram(SamplingParams(temperature: 0.2, seed: 4), n: 2000)
        #expect(cold[0] > 1800)
    }

    @Test func invalidParamsAreRefused() {
        #expect(throws: SamplingError.self) { try SamplingParams(temperature: -1).validate() }
        #expect(throws: SamplingError.self) { try SamplingParams(topP: 0).validate() }
        #expect(throws: SamplingError.self) { try SamplingParams(topP: 1.5).validate() }
        #expect(throws: SamplingError.self) { try SamplingParams(topK: -3).validate() }
        #expect(throws: SamplingError.self) { try SamplingParams(temperature: .nan).validate() }
    }

    // MARK: Generation state: stop strings, UTF-8, limits

    /// Feeds a fixed token script through a GenerationState (greedy over one-hot logits).
    static func run(_ script: [[UInt8]], stop: [String] = [], maxTokens: Int = 100, eos: Int? = nil) -> (String, [String], FinishReason?) {
        let vocab = script.count + 1
        let cfg = GPT2Config(vocabSize: vocab, nPositions: 256, nEmbd: 16, nLayer: 1, nHead: 1)
        let g = GenerationState(request: GenerationRequest(prompt: [0], maxTokens: maxTokens, sampling: SamplingParams(temperature: 0), stop: stop),
                                cache: KVCache(architecture: cfg.architecture, capacity: 256), vocabSize: vocab, eos: eos,
                                decodeToken: { $0 < script.count ? script[$0] : [] })
        var deltas: [String] = []
        var logits = [Float](repeating: 0, count: vocab)
        for i in 0..<script.count where !g.isFinished {
            for j in 0..<vocab { logits[j] = j == i ? 1 : 0 }
            let (_, d) = logits.withUnsafeBufferPointer { g.accept(logits: $0.baseAddress!, vocabSize: vocab) }
            deltas.append(d)
        }
        return (g.outputText, deltas, g.finish)
    }

    @Test func multiByteCharactersStreamWhole() {
        let euro = Array("€".utf8), emoji = Array("🙂".utf8)
        let (text, deltas, _) = Self.run([Array("a".utf8), [euro[0]], [euro[1], euro[2]], [emoji[0], emoji[1]], [emoji[2]], [emoji[3], 0x21]])
        #expect(text == "a€🙂!")
        #expect(deltas == ["a", "", "€", "", "", "🙂!"])
        #expect(deltas.joined() == text)
    }

    @Test func stopStringEndsBeforeItAndIsNeverStreamed() {
        let script = ["Hello", " wor", "ld", "\n", "\n", "more"].map { Array($0.utf8) }
        let (text, deltas, finish) = Self.run(script, stop: ["\n\n"])
        #expect(text == "Hello world")
        #expect(finish == .stop)
        #expect(deltas.joined() == text)
        #expect(!deltas.contains { $0.contains("\n") }, "a possible stop prefix is held back: \(deltas)")
        // A held-back prefix that turns out not to stop is released.
        let (t2, d2, f2) = Self.run(["a", "\n", "b"].map { Array($0.utf8) }, stop: ["\n\n"], maxTokens: 3)
        #expect(t2 == "a\nb" && d2.joined() == t2 && f2 == .length)
    }

    @Test func maxTokensAndEOS() {
        let script = (0..<10).map { Array("t\($0)".utf8) }
        #expect(Self.run(script, maxTokens: 3).0 == "t0t1t2")
        #expect(Self.run(script, maxTokens: 3).2 == .length)
        let (text, _, finish) = Self.run(script, eos: 4)
        #expect(text == "t0t1t2t3" && finish == .eos)
    }
}

/// Issue 11, items 10–13: the sampler is defined for every accepted parameter value, stop strings cut
/// at the earliest occurrence of any of them, and a stream adds up to the final text byte for byte.
@Suite struct SamplingEdgeTests {
    /// Random logits whose argmax is not token 0 (a fallback to token 0 must not pass by luck).
    static func logits(_ n: Int, seed: UInt64) -> [Float] {
        var rng = RNG(seed: seed)
        var l = (0..<n).map { _ in 3 * rng.normal() }
        l[n - 1] = (l.max() ?? 0) + 0.01
        return l
    }

    static func sample(_ p: SamplingParams, _ l: [Float], times: Int = 1) -> [Int] {
        var s = Sampler(params: p, vocabSize: l.count)
        return l.withUnsafeBufferPointer { b in (0..<times).map { _ in s.sample(b.baseAddress!, count: l.count) } }
    }

    /// Item 12: a huge temperature makes the distribution nearly uniform; with top_p below 1/n every
    /// token fell under the candidate cutoff (keep = 0, then cand[-1]: out of bounds, token 0). The
    /// top-p set is then the most likely token alone.
    @Test func hugeTemperatureWithTinyTopPKeepsTheMostLikelyToken() {
        for n in [2, 8, 400] {
            let l = Self.logits(n, seed: UInt64(n))
            let best = Sampler.argmax(l, count: n)
            for t: Float in [1e6, 1e20, 3e38] {
                for topP: Float in [1e-9, 1e-4, 0.5 / Float(n)] {
                    let got = Self.sample(SamplingParams(temperature: t, topP: topP, seed: 3), l, times: 50)
                    #expect(got.allSatisfy { $0 == best }, "n \(n) T \(t) top_p \(topP): \(Set(got))")
                }
            }
        }
    }

    /// Item 13: a tiny positive temperature overflowed 1/T (1e-40 → inf, then 0 · inf = NaN): every
    /// probability NaN and the last token sampled. Below `greedyBelow` sampling is greedy.
    @Test func tinyTemperatureIsGreedy() {
        let l = Self.logits(400, seed: 9)
        let best = Sampler.argmax(l, count: 400)
        for t: Float in [Float.leastNonzeroMagnitude, Float(Double(1e-40)), 1e-30, 1e-10, 9e-6] {
            for topP: Float in [1, 0.9] {
                #expect(Self.sample(SamplingParams(temperature: t, topP: topP, seed: 1), l, times: 20).allSatisfy { $0 == best }, "T \(t)")
            }
        }
        // Just above the threshold it still samples (and is still well-defined).
        let warm = Self.sample(SamplingParams(temperature: 1e-5, seed: 1), l, times: 20)
        #expect(warm.allSatisfy { $0 >= 0 && $0 < 400 })
    }

    /// Every accepted combination (temperature, top_p, top_k) over logits with ties, equal logits and
    /// large ranges returns a token in range; top_k 1 or top_p below every probability is the argmax.
    @Test func everyAcceptedParameterIsWellDefined() {
        let n = 50
        var cases: [[Float]] = [[Float](repeating: 0, count: n), [Float](repeating: -1e30, count: n)]
        for seed in 0..<6 { cases.append(Self.logits(n, seed: UInt64(100 + seed)).map { $0 * Float(pow(10.0, Double(seed * 6 - 12))) }) }
        var ties = Self.logits(n, seed: 7); ties[3] = ties.max()!; cases.append(ties)
        for l in cases {
            let best = Sampler.argmax(l, count: n)
            for t: Float in [0, Float(Double(1e-40)), 1e-6, 1e-5, 0.01, 1, 100, 1e30, .greatestFiniteMagnitude] {
                for topP: Float in [.leastNonzeroMagnitude, 1e-6, 0.3, 0.999, 1] {
                    for topK in [0, 1, 2, n, n + 7] {
                        let p = SamplingParams(temperature: t, topK: topK, topP: topP, seed: 5)
                        let got = Self.sample(p, l, times: 8)
                        #expect(got.allSatisfy { $0 >= 0 && $0 < n }, "\(p)")
                        if topK == 1 || t < SamplingParams.greedyBelow || topP <= 1e-6 {
                            #expect(got.allSatisfy { $0 == best }, "\(p): \(got), argmax \(best)")
                        }
                    }
                }
            }
        }
    }

    /// Item 10: several stop strings cut at the earliest occurrence of any of them, whatever their
    /// order in the list ("stop": ["t", " "] returned text containing " ").
    @Test func severalStopStringsCutAtTheEarliest() {
        let script = ["a", " t", "x"].map { Array($0.utf8) }
        for stop in [["t", " "], [" ", "t"], ["xx", "t", " t", " "]] {
            let (text, deltas, finish) = SamplingTests.run(script, stop: stop)
            #expect(text == "a", "stop \(stop)")
            #expect(finish == .stop && deltas.joined() == text)
        }
        // Both complete in the same token: the earlier start wins, not the shorter or the first listed.
        let (t2, _, _) = SamplingTests.run(["ab", "cd"].map { Array($0.utf8) }, stop: ["d", "bc"])
        #expect(t2 == "a")
    }

    /// Item 11: a combining mark (U+0301) joins the character before it, so a stream that counted
    /// Characters never emitted it. The pieces now add up to the text byte for byte.
    @Test func combiningMarksAreStreamed() {
        let acute = Array("\u{301}".utf8)
        let script: [[UInt8]] = [Array("e".utf8), acute, Array(" x".utf8), [acute[0]], [acute[1]], Array("y".utf8), acute]
        let (text, deltas, _) = SamplingTests.run(script)
        let joined = deltas.flatMap { Array($0.utf8) }
        #expect(joined == Array("e\u{301} x\u{301}y\u{301}".utf8), "\(deltas.map { Array($0.utf8) })")
        #expect(Array(text.utf8) == joined)
    }

    /// The reference: generation ends after the first token whose complete text holds a stop string,
    /// cut at the earliest occurrence in that text; otherwise all bytes decoded.
    static func reference(_ script: [[UInt8]], stops: [String]) -> [UInt8] {
        var bytes: [UInt8] = []
        for tok in script {
            bytes += tok
            let (complete, _) = GenerationState.splitUTF8(bytes)
            let text = Array(String(decoding: complete, as: UTF8.self).utf8)
            var cut: Int?
            for s in stops.map({ Array($0.utf8) }) where !s.isEmpty && s.count <= text.count {
                for i in 0...(text.count - s.count) where text[i..<(i + s.count)].elementsEqual(s) { cut = min(cut ?? i, i); break }
            }
            if let cut { return Array(text[..<cut]) }
        }
        return Array(String(decoding: bytes, as: UTF8.self).utf8)
    }

    /// Random token byte strings (ASCII, combining marks, multi-byte characters split across tokens,
    /// invalid and stray bytes) with random stop strings: the stream adds up to the text byte for byte
    /// and the text equals the reference.
    @Test func randomOutputsStreamExactly() {
        var rng = RNG(seed: 77)
        let pieces: [[UInt8]] = ["a", "b", " ", "e", "\u{301}", "\u{308}", "€", "🙂", "\n", "ab", "é", "ê"].map { Array($0.utf8) }
            + [[0xFF], [0x80], [0xC3], [0xE2, 0x82], [0xF0, 0x9F], [0x98], [0xED, 0xA0, 0x80], [0xC0, 0xAF]]
        let stopPool = ["a", "b ", "e\u{301}", "\u{301}", "🙂", "\n\n", "ba", "€a", "\u{FFFD}", "zz"]
        var streamedTokens = 0
        for trial in 0..<3000 {
            let len = Int.random(in: 1...12, using: &rng)
            let script: [[UInt8]] = (0..<len).map { _ in
                var t: [UInt8] = []
                for _ in 0..<Int.random(in: 1...3, using: &rng) { t += pieces[Int.random(in: 0..<pieces.count, using: &rng)] }
                // Split a piece's bytes across tokens now and then.
                if t.count > 1 && Int.random(in: 0..<3, using: &rng) == 0 { t.removeFirst() }
                return t
            }
            let stops = (0..<Int.random(in: 0...3, using: &rng)).map { _ in stopPool[Int.random(in: 0..<stopPool.count, using: &rng)] }
            let (text, deltas, _) = SamplingTests.run(script, stop: stops, maxTokens: len)
            let joined = deltas.flatMap { Array($0.utf8) }
            streamedTokens += deltas.count
            #expect(joined == Array(text.utf8), "trial \(trial): \(script) stops \(stops)")
            #expect(Array(text.utf8) == Self.reference(script, stops: stops), "trial \(trial): \(script) stops \(stops)")
        }
        #expect(streamedTokens > 10_000)
    }
}
