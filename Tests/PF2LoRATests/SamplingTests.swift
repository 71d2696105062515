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
