import Foundation
import Testing
@testable import PF2LoRA

/// The pooled decode step's client terms (DecodeStep.swift): the flat per-step table of pairs, kept
/// while the batch's pairs stay the same, and the vectorized up-projection.
@Suite struct PooledLowRankTests {
    /// `lowRankUp` gives the bits of its definition, y[o] += ((0 + t0 B[o,0]) + t1 B[o,1]) + ..., at
    /// every rank (the 16-lane paths for 1, 2 and 4, the scalar loop otherwise) and every length
    /// (whole vectors and tails).
    @Test func upProjectionGivesTheBitsOfItsDefinition() {
        var rng = RNG(seed: 7)
        for r in 1...9 {
            for n in [0, 1, 3, 4, 7, 8, 9, 15, 16, 17, 33, 64, 70] {
                let t = (0..<r).map { _ in rng.normal() }, b = (0..<(n * r)).map { _ in rng.normal() }
                let y0 = (0..<n).map { _ in rng.normal() }
                var want = y0
                for o in 0..<n {
                    var acc: Float = 0
                    for j in 0..<r { acc += t[j] * b[o * r + j] }
                    want[o] += acc
                }
                var got = y0
                t.withUnsafeBufferPointer { tp in b.withUnsafeBufferPointer { bp in got.withUnsafeMutableBufferPointer { yp in
                    lowRankUp(tp.baseAddress!, rank: r, bp.baseAddress ?? UnsafePointer(bitPattern: 64)!, yp.baseAddress ?? UnsafeMutablePointer(bitPattern: 64)!, count: n)
                } } }
                #expect(got.map(\.bitPattern) == want.map(\.bitPattern), "rank \(r), \(n) outputs")
            }
        }
    }

    /// Sequences whose clients change from step to step (rotated over three PEFT client pairs and
    /// none) get their own client's terms in every pooled step: each row the same bits as that
    /// sequence decoded alone with that client. A table reused across batches whose pairs differ
    /// (same width, other clients or order) would give rows another client's terms.
    @Test func everyStepUsesItsOwnRowsClients() throws {
        typealias L = LlamaFamilyModelTests
        let name = "qwen3-qknorm-f16"
        let m = try L.model(name)
        let clients: [ClientPairs?] = try ["lora-all7", "lora-subset", "two-level/client"].map {
            ClientPairs(architecture: m.architecture, pairs: L.pairs(try L.peft(name, $0, level: .client, m: m)), label: $0)
        } + [nil]
        let cs = try L.cases(name)
        let V = m.architecture.vocabSize
        let batched = InferenceEngine(model: m, pool: WorkerPool(threads: 2)), alone = InferenceEngine(model: m, pool: WorkerPool(threads: 2))
        batched.pooledRowLimit = .max; alone.pooledRowLimit = .max
        let cb = cs.map { _ in KVCache(architecture: m.architecture, capacity: 80) }
        let ca = cs.map { _ in KVCache(architecture: m.architecture, capacity: 80) }
        for (i, c) in cs.enumerated() {
            _ = try batched.step([StepInput(cache: cb[i], tokens: c.ids, weights: m.baseLinears)])
            _ = try alone.step([StepInput(cache: ca[i], tokens: c.ids, weights: m.baseLinears)])
        }
        var next = cs.map { $0.greedy[0] }
        for k in 0..<5 {
            // Steps 0 and 1 keep the assignment (the table is reused), then it rotates every step.
            let client = { (i: Int) in clients[(i + max(0, k - 1)) % clients.count] }
            let rows = try batched.step(cs.indices.map { StepInput(cache: cb[$0], tokens: [next[$0]], weights: m.baseLinears, client: client($0)) }).array
            var nb: [Int] = []
            for i in cs.indices {
                let la = try alone.step([StepInput(cache: ca[i], tokens: [next[i]], weights: m.baseLinears, client: client(i))])
                #expect((0..<V).allSatisfy { la.data[$0] == rows[i * V + $0] }, "step \(k) sequence \(i) (\(client(i)?.label ?? "no client")): batched logits differ from alone")
                nb.append(Sampler.argmax(la.data, count: V))
            }
            next = nb
        }
    }
}
