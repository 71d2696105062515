import Foundation
import Testing
@testable import PF2LoRA

/// "A greedy generate gives the same text whatever else is in the stream or batch" (docs/PROTOCOL.md,
/// docs/RELIABILITY.md), checked across batch widths as the server serves them: W concurrent requests
/// with W distinct client adapters through the method layer's scheduler (continuous batching,
/// arrivals staggered by the tokenizer thread, prefill chunks mixed with decode rows), for W = 1 ... 13,
/// 16 and 32 (the pooled decode kernel takes steps of at most `InferenceEngine.maxPooledRows` = 12
/// sequences, the GEMM path wider ones and mixed prefill+decode steps). Each request's token ids and
/// the log-probability of each chosen token must equal, to the bit, those of the same request served
/// alone: the text is only guaranteed if the logits are.
@Suite struct BatchInvarianceTests {
    static let widths = Array(1...13) + [16, 32]
    /// Prompts of 1 to a dozen tokens (a 1-token prompt is a decode-shaped row with an empty cache).
    static let prompts = ["a", "The cat", "It is a", "Once upon a time there", "hello world, this is", "A dog and a cat sat on the mat", "x y"]

    struct Answer: Equatable, CustomStringConvertible {
        var tokens: [Int]
        var logprobBits: [UInt64]
        var text: String
        var description: String { "\(tokens) \(text.debugDescription)" }
    }

    static func answer(_ s: MethodLayerTests.Collect) throws -> Answer {
        let r = try #require(s.result, "answered: \(String(describing: s.error))")
        let lps = try #require(r.logprobs)
        return Answer(tokens: lps.map(\.token), logprobBits: lps.map(\.logprob.bitPattern), text: r.text)
    }

    static func request(_ i: Int, _ clients: [String]) -> GenerateRequest {
        GenerateRequest(prompt: prompts[i % prompts.count], adapter: .client(clients[i]), maxTokens: 12, temperature: 0,
                        ignoreEOS: true, logprobs: 0)
    }

    @Test(arguments: ["gpt2", "llama"]) func greedyTextDoesNotDependOnBatchWidth(family: String) throws {
        let clients = (0..<32).map { "c\($0)" }
        let fx = try ServerFixture(clients: clients, family: family)
        defer { fx.cleanup() }
        let core = try MethodLayerTests.core(fx)
        var alone: [Answer] = []
        for i in clients.indices {
            let s = MethodLayerTests.Collect()
            try core.generate(Self.request(i, clients), sink: s)
            s.wait()
            alone.append(try Self.answer(s))
        }
        #expect(Set(alone.map(\.text)).count > 8, "the adapters change the text: \(alone)")
        var differing: [String] = []
        var textsDiffering = 0
        for w in Self.widths {
            let sinks = (0..<w).map { _ in MethodLayerTests.Collect() }
            for i in 0..<w { try core.generate(Self.request(i, clients), sink: sinks[i]) }
            for i in 0..<w {
                sinks[i].wait()
                let a = try Self.answer(sinks[i])
                if a != alone[i] {
                    if a.text != alone[i].text { textsDiffering += 1 }
                    let firstDiff = zip(a.logprobBits, alone[i].logprobBits).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? -1
                    differing.append("width \(w) request \(i): first differing token \(firstDiff): \(a) vs alone \(alone[i])")
                }
            }
        }
        #expect(differing.isEmpty, "\(differing.count) requests differ from their answer alone (\(textsDiffering) in text): \(differing.prefix(8).joined(separator: "; "))")
        #expect(core.stats().meanBatchRows > 4, "the requests were batched: \(core.stats().json)")
    }
}
