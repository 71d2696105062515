import Foundation

/// Causal-LM fine-tuning of a frozen base model (any supported family) with two-level LoRA, split over clients: the
/// `FederatedTask` that `pf2lora federate` and personalization train.
///
/// Data: each client's split is one packed token stream (`TokenStream`: `eos t1 eos t2 ...`).
/// - `lossAndGradients` draws B windows of T + 1 consecutive tokens at offsets uniform over the
///   client's training stream (with `rng`); inputs are tokens 0..<T, targets 1...T. A stream shorter
///   than T + 1 gives one window of all of it, right-padded (targets -100).
/// - `evaluate` cuts the split into consecutive windows of T + 1 tokens overlapping by one, so every
///   token but the first is predicted exactly once, and returns the mean token cross-entropy over all
///   of them (perplexity = exp of it). The last window is right-padded with ignored targets.
///
/// Parameters: a module name is the Hugging Face path (`transformer.h.0.attn.c_attn`), so a
/// `ParameterSet` (`<module>.lora_A.weight` ...) maps one to one onto the trainer's `AdapterWeights`
/// and onto the adapter store's tensors. The `AdapterWeights` views of a parameter set are built once
/// per set and reused; the batch buffers and the trainer's run state are allocated once per (B, T):
/// after the first call, a call allocates nothing but the trainer's batch struct.
public final class LMTask: FederatedTask {
    public let trainer: ModelTrainer
    public let clients: [ClientTokenData]
    public let modules: [LoRAModule]
    /// B
    public let batchSize: Int
    /// T
    public let seqLen: Int
    /// Evaluate on at most this many windows per split (nil: the whole split).
    public var evalWindowLimit: Int?
    /// Padding input token (its targets are ignored).
    public let padToken: Int32

    // Batch buffers (B * T), filled in place; a TrainingBatch shares them without copying.
    private var inputs: [Int32]
    private var targets: [Int32]
    // AdapterWeights views of the parameter sets seen, kept with the sets they view.
    private var viewCache: [ObjectIdentifier: (set: ParameterSet, level: LoRALevel, scale: Float, weights: AdapterWeights)] = [:]

    /// - Parameters:
    ///   - weights: the frozen base (read only; may be shared with a server's inference engine).
    ///   - clients: tokenized client data; every token must be in the model's vocabulary.
    ///   - targets: the slots to adapt in every layer (nil: all of the architecture's).
    ///   - modulePaths: the exact modules to adapt (`transformer.h.0.attn.c_attn`, ...), overriding
    ///     `targets` (to match an existing adapter that adapts only some layers).
    public init(weights: ModelWeights, clients: [ClientTokenData], batchSize: Int, seqLen: Int,
                targets: [LinearSlot]? = nil, modulePaths: [String]? = nil, padToken: Int = 0) throws {
        let c = weights.architecture
        let targets = targets ?? c.slots
        guard !clients.isEmpty else { throw TrainingError.badBatch("no clients") }
        guard batchSize >= 1, seqLen >= 1, seqLen <= c.contextLength else {
            throw TrainingError.badBatch("batch \(batchSize) and sequence length \(seqLen) must be >= 1, the length <= the model's context \(c.contextLength)")
        }
        guard !targets.isEmpty else { throw TrainingError.badBatch("no target modules") }
        for cl in clients {
            for s in [Split.train, .valid, .test] {
                let st = cl.split(s)
                guard st.targetCount > 0 else { throw ClientDataError.noTokens(client: cl.id, file: s.rawValue) }
                if let bad = st.tokens.first(where: { $0 < 0 || Int($0) >= c.vocabSize }) {
                    throw TrainingError.badBatch("client '\(cl.id)' \(s.rawValue): token \(bad) is outside the model's vocabulary 0..<\(c.vocabSize); the tokenizer does not belong to this model")
                }
            }
        }
        trainer = ModelTrainer(weights: weights)
        self.clients = clients
        self.batchSize = batchSize
        self.seqLen = seqLen
        self.padToken = Int32(padToken)
        modules = try loraModules(modulePaths ?? (0..<c.layerCount).flatMap { l in targets.map { c.modulePath(layer: l, slot: $0.index) } },
                                  architecture: c)
        guard !modules.isEmpty else { throw TrainingError.badBatch("no target modules") }
        inputs = Array(repeating: 0, count: batchSize * seqLen)
        self.targets = Array(repeating: TrainingBatch.ignoreIndex, count: batchSize * seqLen)
    }

    public var clientCount: Int { clients.count }
    public func exampleCount(client: Int) -> Int { clients[client].train.textCount }

    // MARK: Adapter mapping

    /// The trainer's view of one level of `set` (no copy: the tensors are the set's own).
    public func adapterWeights(_ set: ParameterSet, level: LoRALevel, scale: Float) -> AdapterWeights {
        var pairs: [String: (down: Tensor, up: Tensor)] = [:]
        for m in modules { pairs[m.name] = loraPair(set, level: level, module: m.name) }
        return AdapterWeights(pairs: pairs, scale: scale)
    }

    private func views(_ adapter: TwoLevelAdapter) -> (AdapterWeights?, AdapterWeights?) {
        (adapter.shared.map { view($0, .shared, adapter.sharedScale) }, adapter.local.map { view($0, .client, adapter.localScale) })
    }

    private func view(_ set: ParameterSet, _ level: LoRALevel, _ scale: Float) -> AdapterWeights {
        let key = ObjectIdentifier(set)
        if let v = viewCache[key], v.set === set, v.level == level, v.scale == scale { return v.weights }
        // The cache holds the sets it views, so an identifier is never reused while cached; it is
        // cleared when it grows past a few sets per client (algorithms clone sets every round).
        if viewCache.count >= 4 * clients.count + 8 { viewCache.removeAll(keepingCapacity: true) }
        let w = adapterWeights(set, level: level, scale: scale)
        viewCache[key] = (set, level, scale, w)
        return w
    }

    /// Copies the trainer's gradients of one level into `grad` (the FederatedTask layout).
    private func copyGradients(_ src: [String: (down: Tensor, up: Tensor)], into grad: ParameterSet, level: LoRALevel) {
        for m in modules {
            let (gd, gu) = loraPair(grad, level: level, module: m.name)
            guard let s = src[m.name] else { gd.fill(0); gu.fill(0); continue }
            gd.copy(from: s.down); gu.copy(from: s.up)
        }
    }

    // MARK: FederatedTask

    public func lossAndGradients(client: Int, adapter: TwoLevelAdapter, sharedGrad: ParameterSet?,
                                 localGrad: ParameterSet?, rng: inout RNG) -> Float {
        let stream = clients[client].train.tokens
        let T = seqLen, B = batchSize
        let span = T + 1
        inputs.withUnsafeMutableBufferPointer { inp in
            targets.withUnsafeMutableBufferPointer { tgt in
                stream.withUnsafeBufferPointer { s in
                    for b in 0..<B {
                        let start = s.count > span ? rng.int(below: s.count - span + 1) : 0
                        fillWindow(s, start: start, row: b, inp: inp, tgt: tgt)
                    }
                }
            }
        }
        let (sw, lw) = views(adapter)
        let wantShared = sharedGrad != nil && sw != nil, wantLocal = localGrad != nil && lw != nil
        let batch: TrainingBatch
        do { batch = try TrainingBatch(batchSize: B, seqLen: T, inputs: inputs, targets: targets) } catch {
            preconditionFailure("LMTask: \(error)")   // shapes are fixed at init
        }
        let loss: Float
        do {
            loss = try trainer.lossAndGradients(batch, shared: sw, client: lw, wantShared: wantShared, wantClient: wantLocal)
        } catch {
            // Tokens and shapes were validated at init and adapters come from makeLoRAParameters over
            // `modules`; anything else is a programming error.
            preconditionFailure("LMTask: \(error)")
        }
        if let g = sharedGrad { if wantShared { copyGradients(trainer.gradients.shared, into: g, level: .shared) } else { g.zero() } }
        if let g = localGrad { if wantLocal { copyGradients(trainer.gradients.client, into: g, level: .client) } else { g.zero() } }
        return loss
    }

    /// Row `row` of the batch from stream[start ..< start + T + 1], right-padded when the stream ends.
    private func fillWindow(_ s: UnsafeBufferPointer<Int32>, start: Int, row: Int,
                            inp: UnsafeMutableBufferPointer<Int32>, tgt: UnsafeMutableBufferPointer<Int32>) {
        let T = seqLen
        let n = min(T + 1, s.count - start)   // tokens available in this window
        for t in 0..<T {
            let o = row * T + t
            if t < n { inp[o] = s[start + t] } else { inp[o] = padToken }
            tgt[o] = t + 1 < n ? s[start + t + 1] : TrainingBatch.ignoreIndex
        }
    }

    public func evaluate(client: Int, adapter: TwoLevelAdapter, split: Split) -> Float {
        Float(evaluateTotals(client: client, adapter: adapter, split: split).meanLoss)
    }

    /// Sum of token cross-entropies and the number of predicted tokens over the split.
    public func evaluateTotals(client: Int, adapter: TwoLevelAdapter, split: Split) -> (sum: Double, tokens: Int, meanLoss: Double) {
        evaluateTotals(client: client, adapter: adapter, split: split, afterBatch: { _, _, _ in })
    }

    /// `evaluateTotals`, with `afterBatch(windows done, windows, mean loss so far)` after every batch
    /// (it may throw to stop).
    public func evaluateTotals(client: Int, adapter: TwoLevelAdapter, split: Split,
                               afterBatch: (_ done: Int, _ total: Int, _ meanLoss: Float) throws -> Void) rethrows -> (sum: Double, tokens: Int, meanLoss: Double) {
        let stream = clients[client].split(split).tokens
        let T = seqLen, B = batchSize
        var windows = stride(from: 0, to: max(1, stream.count - 1), by: T).map { $0 }
        if let lim = evalWindowLimit, windows.count > lim { windows = Array(windows.prefix(lim)) }
        let (sw, lw) = views(adapter)
        var sum = 0.0, count = 0
        var i = 0
        while i < windows.count {
            let rows = min(B, windows.count - i)
            inputs.withUnsafeMutableBufferPointer { inp in
                targets.withUnsafeMutableBufferPointer { tgt in
                    stream.withUnsafeBufferPointer { s in
                        for b in 0..<B {
                            if b < rows { fillWindow(s, start: windows[i + b], row: b, inp: inp, tgt: tgt) } else {
                                for t in 0..<T { inp[b * T + t] = padToken; tgt[b * T + t] = TrainingBatch.ignoreIndex }
                            }
                        }
                    }
                }
            }
            let batch = try! TrainingBatch(batchSize: B, seqLen: T, inputs: inputs, targets: targets)
            guard batch.targetCount > 0 else { i += rows; continue }
            let l: Float
            do { l = try trainer.loss(batch, shared: sw, client: lw) } catch { preconditionFailure("LMTask: \(error)") }
            sum += Double(l) * Double(batch.targetCount)
            count += batch.targetCount
            i += rows
            try afterBatch(i, windows.count, Float(sum / Double(count)))
        }
        return (sum, count, count == 0 ? .nan : sum / Double(count))
    }
}
