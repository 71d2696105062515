import Foundation
import Testing
@testable import PF2LoRA

/// Full-parameter pretraining on top of the backward pass: the loss goes down on a learnable stream,
/// and a checkpoint + resume continues bit for bit like an uninterrupted run.
@Suite struct GradientPretrainTests {
    static let config = GPT2Config(vocabSize: 37, nPositions: 16, nEmbd: 32, nLayer: 2, nHead: 2, eosTokenId: 36)

    /// A stream with structure: a few short "words" repeated in random order, each ending with 36.
    static func stream(_ n: Int) -> TokenWindows {
        let words: [[Int32]] = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11], [12, 13, 14]]
        var rng = RNG(seed: 5)
        var t: [Int32] = []
        while t.count < n { t += words[rng.int(below: words.count)] + [36] }
        return TokenWindows(tokens: t)
    }

    static func options(steps: Int) -> PretrainOptions {
        var o = PretrainOptions()
        o.steps = steps; o.batch = 4; o.seq = 12; o.lr = 3e-3; o.warmup = 5; o.seed = 11
        return o
    }

    @Test func lossGoesDown() throws {
        let data = Self.stream(4000)
        let p = Pretrainer(weights: ModelWeights.random(architecture: Self.config.architecture, seed: 1), options: Self.options(steps: 80))
        let eval = try data.evaluationBatches(batch: 4, seq: 12, maxBatches: 4)
        let before = try p.evaluate(eval)
        var last: PretrainStepStats?
        while p.step < 80 { last = try p.trainStep(try data.batch(step: p.step, batch: 4, seq: 12, seed: 11)) }
        let after = try p.evaluate(eval)
        #expect(before > 3.4)                 // about ln 37 at GPT-2's init
        #expect(after < 1.6, "validation loss \(before) -> \(after)")
        #expect(last!.step == 80 && last!.gradNorm.isFinite)
    }

    @Test func resumeContinuesExactly() throws {
        let data = Self.stream(2000)
        let dir = TestPaths.tempDir("pretrain")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let opts = Self.options(steps: 6)
        // Uninterrupted.
        let a = Pretrainer(weights: ModelWeights.random(architecture: Self.config.architecture, seed: 1), options: opts)
        while a.step < 6 { try a.trainStep(try data.batch(step: a.step, batch: 4, seq: 12, seed: 11)) }
        // Three steps, checkpoint, resume, three more.
        let b = Pretrainer(weights: ModelWeights.random(architecture: Self.config.architecture, seed: 1), options: opts)
        while b.step < 3 { try b.trainStep(try data.batch(step: b.step, batch: 4, seq: 12, seed: 11)) }
        try b.save(to: dir, extra: ["note": "test"])
        let (c, state) = try Pretrainer.resume(from: dir, options: opts)
        #expect(c.step == 3 && state["note"] as? String == "test")
        while c.step < 6 { try c.trainStep(try data.batch(step: c.step, batch: 4, seq: 12, seed: 11)) }
        for ((name, x), (_, y)) in zip(a.weights.named, c.weights.named) {
            #expect(x.array == y.array, "\(name) differs after resume")
        }
        // The checkpoint is a Hugging Face folder the runtime loads.
        let m = try LanguageModel.load(folder: dir)
        #expect(m.architecture == Self.config.architecture)
        // A torn checkpoint (model from another step) is refused.
        let d = Pretrainer(weights: ModelWeights.random(architecture: Self.config.architecture, seed: 2), options: opts)
        try AtomicFile.write(SafeTensorsWriter.serialize(Dictionary(uniqueKeysWithValues: d.weights.named), metadata: ["pf2lora_step": "0"]),
                             to: dir + "/model.safetensors")
        #expect(throws: PretrainError.self) { _ = try Pretrainer.resume(from: dir, options: opts) }
    }

    @Test func windowsAreDeterministicPerStep() throws {
        let data = Self.stream(500)
        let x = try data.batch(step: 7, batch: 3, seq: 10, seed: 1)
        let y = try data.batch(step: 7, batch: 3, seq: 10, seed: 1)
        let z = try data.batch(step: 8, batch: 3, seq: 10, seed: 1)
        #expect(x.inputs == y.inputs && x.inputs != z.inputs)
        #expect(Array(x.inputs[1..<10]) == Array(x.targets[0..<9]))   // targets are the inputs shifted by one
        #expect(throws: PretrainError.self) { _ = try TokenWindows(tokens: [1, 2, 3]).batch(step: 0, batch: 1, seq: 10, seed: 0) }
    }
}
