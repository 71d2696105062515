import Foundation

// Full-parameter pretraining of a model (any supported family) from a token stream: deterministic random windows, AdamW
// (PyTorch semantics, decay on 2-D weights only, as nanoGPT groups them), warm-up + cosine learning
// rate, global-norm gradient clipping, and checkpoints in Hugging Face layout that resume exactly.

/// Hyperparameters of a pretraining run (saved in trainer_state.json).
public struct PretrainOptions: Codable, Equatable, Sendable {
    public var steps = 2000
    public var batch = 16
    public var seq = 128
    public var lr: Float = 1e-3
    public var minLRRatio: Float = 0.1
    public var warmup = 100
    public var weightDecay: Float = 0.1
    public var beta1: Float = 0.9
    public var beta2: Float = 0.95
    public var eps: Float = 1e-8
    public var clip: Float = 1.0
    public var seed: UInt64 = 0

    public init() {}

    enum CodingKeys: String, CodingKey {
        case steps, batch, seq, lr, minLRRatio = "min_lr_ratio", warmup, weightDecay = "weight_decay"
        case beta1, beta2, eps, clip, seed
    }

    public var schedule: LRSchedule { LRSchedule(base: lr, warmupSteps: warmup, totalSteps: steps, minRatio: minLRRatio) }
}

/// Errors of a pretraining run.
public enum PretrainError: Error, CustomStringConvertible {
    case tooFewTokens(have: Int, need: Int)
    case nonFinite(step: Int, loss: Float, lr: Float)
    case badCheckpoint(String)

    public var description: String {
        switch self {
        case let .tooFewTokens(have, need):
            return "the token stream has \(have) tokens but a window needs \(need); give more text or a smaller --seq"
        case let .nonFinite(step, loss, lr):
            return "step \(step): the loss or gradient is not finite (loss \(loss), lr \(lr)); the last checkpoint is kept. Lower --lr or raise --warmup and resume."
        case let .badCheckpoint(why): return "cannot resume: \(why)"
        }
    }
}

/// A token stream cut into training windows. Step s draws its B windows from `RNG(seed).derive(s)`, so
/// the data of a step depends only on (seed, step): a resumed run sees exactly what an uninterrupted one would.
public struct TokenWindows: Sendable {
    public let tokens: [Int32]

    public init(tokens: [Int32]) { self.tokens = tokens }

    /// B random windows of T + 1 tokens (inputs and shifted targets) for `step`.
    public func batch(step: Int, batch B: Int, seq T: Int, seed: UInt64) throws -> TrainingBatch {
        guard tokens.count > T + 1 else { throw PretrainError.tooFewTokens(have: tokens.count, need: T + 2) }
        var rng = RNG(seed: seed).derive(UInt64(step))
        var inp: [Int32] = [], tgt: [Int32] = []
        inp.reserveCapacity(B * T); tgt.reserveCapacity(B * T)
        for _ in 0..<B {
            let start = rng.int(below: tokens.count - T)
            inp.append(contentsOf: tokens[start..<(start + T)])
            tgt.append(contentsOf: tokens[(start + 1)...(start + T)])
        }
        return try TrainingBatch(batchSize: B, seqLen: T, inputs: inp, targets: tgt)
    }

    /// Consecutive non-overlapping windows from the start, at most `maxBatches` batches of B: a fixed
    /// evaluation set (the last batch may be smaller).
    public func evaluationBatches(batch B: Int, seq T: Int, maxBatches: Int) throws -> [TrainingBatch] {
        let windows = min((tokens.count - 1) / T, B * maxBatches)
        guard windows > 0 else { throw PretrainError.tooFewTokens(have: tokens.count, need: T + 1) }
        var out: [TrainingBatch] = []
        var w = 0
        while w < windows {
            let b = min(B, windows - w)
            var inp: [Int32] = [], tgt: [Int32] = []
            for i in w..<(w + b) {
                inp.append(contentsOf: tokens[(i * T)..<(i * T + T)])
                tgt.append(contentsOf: tokens[(i * T + 1)...(i * T + T)])
            }
            out.append(try TrainingBatch(batchSize: b, seqLen: T, inputs: inp, targets: tgt))
            w += b
        }
        return out
    }
}

/// What one optimizer step did.
public struct PretrainStepStats: Sendable {
    public let step: Int          // 1-based number of this step
    public let loss: Float
    public let lr: Float
    public let gradNorm: Float    // before clipping
}

/// Full-parameter training of a model: owns the weights (writable), the trainer, the two AdamW groups.
public final class Pretrainer {
    public let weights: ModelWeights
    public let options: PretrainOptions
    public let trainer: ModelTrainer
    /// Optimizer steps completed.
    public private(set) var step = 0

    private let decay: ParameterSet, noDecay: ParameterSet
    private let decayGrads: ParameterSet, noDecayGrads: ParameterSet, allGrads: ParameterSet
    private let optDecay: AdamW, optNoDecay: AdamW

    /// `weights` must own its memory (`ModelWeights.random`, or `load(_, writable: true)`): it is updated in place.
    public init(weights: ModelWeights, options: PretrainOptions) {
        self.weights = weights
        self.options = options
        trainer = ModelTrainer(weights: weights, fullGradients: true)
        let grads = Dictionary(uniqueKeysWithValues: trainer.gradients.named)
        var d: [(String, Tensor)] = [], nd: [(String, Tensor)] = []
        for (name, t) in weights.named { if t.shape.count >= 2 { d.append((name, t)) } else { nd.append((name, t)) } }
        decay = ParameterSet(d); noDecay = ParameterSet(nd)
        decayGrads = ParameterSet(d.map { ($0.0, grads[$0.0]!) })
        noDecayGrads = ParameterSet(nd.map { ($0.0, grads[$0.0]!) })
        allGrads = ParameterSet(trainer.gradients.named)
        optDecay = AdamW(beta1: options.beta1, beta2: options.beta2, eps: options.eps, weightDecay: options.weightDecay)
        optNoDecay = AdamW(beta1: options.beta1, beta2: options.beta2, eps: options.eps, weightDecay: 0)
    }

    /// Number of trainable parameters.
    public var parameterCount: Int { decay.scalarCount + noDecay.scalarCount }

    /// One step on `batch`: loss and gradients, clipping, AdamW at the scheduled rate.
    /// Throws (changing nothing) if the loss or the gradient norm is not finite.
    @discardableResult
    public func trainStep(_ batch: TrainingBatch) throws -> PretrainStepStats {
        let lr = options.schedule.lr(at: step)
        let loss = try trainer.lossAndGradients(batch)
        let norm = options.clip > 0 ? clipGradNorm(allGrads, maxNorm: options.clip) : allGrads.globalNorm()
        guard loss.isFinite, norm.isFinite else { throw PretrainError.nonFinite(step: step + 1, loss: loss, lr: lr) }
        optDecay.step(decay, decayGrads, lr: lr)
        optNoDecay.step(noDecay, noDecayGrads, lr: lr)
        step += 1
        return PretrainStepStats(step: step, loss: loss, lr: lr, gradNorm: norm)
    }

    /// Mean loss over `batches`, weighted by their target counts.
    public func evaluate(_ batches: [TrainingBatch]) throws -> Float {
        var total = 0.0, n = 0
        for b in batches {
            total += Double(try trainer.loss(b)) * Double(b.targetCount)
            n += b.targetCount
        }
        return Float(total / Double(max(n, 1)))
    }

    // MARK: Checkpoints

    /// Writes a checkpoint into `folder`, each file atomically: config.json, model.safetensors,
    /// optimizer.safetensors (AdamW moments as `exp_avg.<name>` / `exp_avg_sq.<name>`), and last
    /// trainer_state.json (step, options, `extra`). All three data files carry the step in their
    /// metadata, so a checkpoint torn by a crash between files is detected on resume.
    public func save(to folder: String, extra: [String: Any] = [:]) throws {
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        let meta = ["format": "pt", "pf2lora_step": String(step)]
        try AtomicFile.write(weights.architecture.configJSON(), to: folder + "/config.json")
        try AtomicFile.write(SafeTensorsWriter.serialize(Dictionary(uniqueKeysWithValues: weights.named), metadata: meta),
                             to: folder + "/model.safetensors")
        var moments: [String: Tensor] = [:]
        for opt in [optDecay, optNoDecay] {
            let s = opt.state
            for (k, t) in s.m { moments["exp_avg." + k] = t }
            for (k, t) in s.v { moments["exp_avg_sq." + k] = t }
        }
        try AtomicFile.write(SafeTensorsWriter.serialize(moments, metadata: meta), to: folder + "/optimizer.safetensors")
        var state: [String: Any] = extra
        state["step"] = step
        state["options"] = try JSONSerialization.jsonObject(with: JSONEncoder().encode(options))
        state["optimizer"] = ["type": "AdamW", "file": "optimizer.safetensors", "decay_group_step": optDecay.state.step,
                              "no_decay_group_step": optNoDecay.state.step]
        state["parameters"] = parameterCount
        try AtomicFile.write(JSONSerialization.data(withJSONObject: state, options: [.prettyPrinted, .sortedKeys]),
                             to: folder + "/trainer_state.json")
    }

    /// Loads a checkpoint written by `save` and continues with `options` (steps may be raised; the
    /// model shape comes from the checkpoint). Checks that the three files belong to the same step.
    public static func resume(from folder: String, options: PretrainOptions) throws -> (Pretrainer, [String: Any]) {
        guard let data = FileManager.default.contents(atPath: folder + "/trainer_state.json"),
              let state = try JSONSerialization.jsonObject(with: data) as? [String: Any], let step = state["step"] as? Int else {
            throw PretrainError.badCheckpoint("\(folder)/trainer_state.json is missing or unreadable")
        }
        let model = try LanguageModel.load(folder: folder, writable: true)
        let optFile = try SafeTensorsFile(path: folder + "/optimizer.safetensors")
        for (file, meta) in [("model.safetensors", model.file?.metadata ?? [:]), ("optimizer.safetensors", optFile.metadata)] {
            guard meta["pf2lora_step"] == String(step) else {
                throw PretrainError.badCheckpoint("\(folder)/\(file) is from step \(meta["pf2lora_step"] ?? "?") but trainer_state.json says \(step) (torn checkpoint)")
            }
        }
        guard step <= options.steps else { throw PretrainError.badCheckpoint("the checkpoint is at step \(step), past --steps \(options.steps)") }
        let p = Pretrainer(weights: model.weights, options: options)
        let opt = state["optimizer"] as? [String: Any] ?? [:]
        for (o, group, key) in [(p.optDecay, p.decay, "decay_group_step"), (p.optNoDecay, p.noDecay, "no_decay_group_step")] {
            var m: [String: Tensor] = [:], v: [String: Tensor] = [:]
            for name in group.names {
                guard let mi = optFile.tensors["exp_avg." + name], let vi = optFile.tensors["exp_avg_sq." + name] else {
                    throw PretrainError.badCheckpoint("optimizer.safetensors has no moments for \(name)")
                }
                m[name] = optFile.tensor(mi); v[name] = optFile.tensor(vi)   // restore copies
            }
            o.restore(step: opt[key] as? Int ?? step, m: m, v: v)
        }
        p.step = step
        return (p, state)
    }
}
