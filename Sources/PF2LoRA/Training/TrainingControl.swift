import Foundation

/// What a caller running training for someone else (a server request) hands the training loop: a
/// memory bound checked before the run allocates its state, and a hook after every step that reports
/// progress and may throw to stop the run (a cancel). A stopped run publishes nothing.
public struct TrainingControl {
    /// Refuse the run (`TrainingMemoryError`) when its training state would take more bytes.
    public var maxStateBytes: Int?
    /// Called after step `step` of at most `steps` with that step's loss; a throw ends the run with it.
    public var afterStep: ((_ step: Int, _ steps: Int, _ loss: Float) throws -> Void)?

    public init(maxStateBytes: Int? = nil, afterStep: ((_ step: Int, _ steps: Int, _ loss: Float) throws -> Void)? = nil) {
        self.maxStateBytes = maxStateBytes; self.afterStep = afterStep
    }

    /// Throws when `bytes` (the run's estimate for batch × seq) is over `maxStateBytes`.
    func check(bytes: Int, batch: Int, seq: Int, config c: ModelArchitecture, training: Bool) throws {
        guard let limit = maxStateBytes, bytes > limit else { return }
        throw TrainingMemoryError(needed: bytes, limit: limit, batch: batch, seq: seq, layers: training ? c.layerCount : 1)
    }
}

/// A training request whose state would not fit the memory bound; nothing was allocated.
public struct TrainingMemoryError: Error, CustomStringConvertible, Equatable {
    public let needed: Int
    public let limit: Int
    public let batch: Int
    public let seq: Int
    public let layers: Int

    public var description: String {
        "batch \(batch) × seq \(seq) needs \(Self.mb(needed)) MB of training state (activations of \(layers) layer\(layers == 1 ? "" : "s") for \(batch * seq) tokens); the limit is \(Self.mb(limit)) MB (serve --max-train-mb): lower batch or seq"
    }

    static func mb(_ b: Int) -> String { String(format: "%.1f", Double(b) / Double(1 << 20)) }
}

extension LMTask {
    /// Bytes a run of `batch` windows of `seq` tokens takes on `config` before its first step
    /// allocates anything: the trainer's run state (`ModelTrainer.stateBytes` after the first call, to
    /// the byte) plus the task's own input and target buffers. `ranks`: the rank of every adapted
    /// (module, level); `training` false for evaluation (forward only, one layer's activations).
    public static func runBytes(config: ModelArchitecture, batch: Int, seq: Int, ranks: [Int], training: Bool) -> Int {
        TrainingState.bytes(B: batch, T: seq, config: config, training: training, ranks: ranks) + 2 * 4 * batch * seq
    }
}
