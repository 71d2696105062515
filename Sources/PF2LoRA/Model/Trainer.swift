import Foundation

// Training forward and backward of any supported model for a causal-LM cross-entropy loss, llm.c
// style: one batch type, one run state holding every activation the backward pass reads (allocated
// once per (B, T) and reused), one gradient store. The block's forward is `runBlock` (Block.swift),
// run here by `TrainingBlockRunner`; its backward, `blockBackward`, is below, the same steps in reverse.
//
// Two modes, chosen when the trainer is made:
// - LoRA (default): the base is frozen (read in place, never written); every adapted linear layer computes
//     out = x W0^T + b + s1 (x A^T) B^T + s2 (x C^T) D^T
//   and only A, B (shared level) and C, D (client level) get gradients. The base-weight gradient GEMMs
//   are skipped; the dx GEMMs that carry the gradient down to earlier layers are kept.
// - full (`fullGradients: true`): every base weight gets its gradient too (a tied head: embedding +
//   head), for pretraining.
//
// Shapes: B batch, T sequence length, BT = B * T rows, C hidden, H query heads and KV key/value heads
// of hd, qW = H hd, kvW = KV hd, W = qW + 2 kvW (a [q | k | v] row), I the MLP width, V vocabulary,
// r a LoRA rank. Each block product is one GEMM over its group (`SlotGroup`); weights are in the
// checkpoint's layout (GPT-2 Conv1D (in, out), nn.Linear (out, in)); LoRA factors in PEFT's: A (r, in), B (out, r).

/// Errors of the training path; each says what was wrong and what to do.
public enum TrainingError: Error, CustomStringConvertible, Equatable {
    case badBatch(String)
    case noTargets
    case unknownModule(String)
    case adapterShape(module: String, tensor: String, expected: [Int], found: [Int])

    public var description: String {
        switch self {
        case let .badBatch(why): return "bad training batch: \(why)"
        case .noTargets: return "the batch has no target tokens (every label is -100): give sequences of at least 2 tokens"
        case let .unknownModule(p):
            return "adapter module '\(p)' is not a linear layer of this model; expected module paths like transformer.h.0.attn.c_attn (GPT-2) or model.layers.0.self_attn.q_proj (Llama family)"
        case let .adapterShape(m, t, e, f):
            return "adapter \(m): \(t) has shape \(f) but this model needs \(e) (A/C are (r, in), B/D are (out, r))"
        }
    }
}

// MARK: - Batch

/// B sequences of T tokens for causal-LM training, with per-position targets.
///
/// `targets[b * T + t]` is the token position t must predict, or -100 where nothing is predicted
/// (padding, the last position). The loss is the mean cross-entropy over the positions with a target,
/// exactly as Hugging Face's causal-LM loss. Padding must be at the end of a sequence (right padding):
/// attention is causal only, so padded positions never influence real ones.
public struct TrainingBatch: Sendable {
    public static let ignoreIndex: Int32 = -100
    /// B
    public let batchSize: Int
    /// T
    public let seqLen: Int
    /// (B * T) input token ids.
    public let inputs: [Int32]
    /// (B * T) targets, -100 = ignored.
    public let targets: [Int32]
    /// Number of positions with a target (the loss's denominator).
    public let targetCount: Int

    /// Explicit inputs and already-shifted targets, both (B * T).
    public init(batchSize: Int, seqLen: Int, inputs: [Int32], targets: [Int32]) throws {
        guard batchSize > 0, seqLen > 0 else { throw TrainingError.badBatch("batch size and sequence length must be positive") }
        guard inputs.count == batchSize * seqLen, targets.count == batchSize * seqLen else {
            throw TrainingError.badBatch("expected \(batchSize * seqLen) inputs and targets, got \(inputs.count) and \(targets.count)")
        }
        self.batchSize = batchSize; self.seqLen = seqLen; self.inputs = inputs; self.targets = targets
        targetCount = targets.reduce(0) { $0 + ($1 == TrainingBatch.ignoreIndex ? 0 : 1) }
    }

    /// Hugging Face semantics: `inputIds` and `labels` are (B, T), labels -100 where ignored, and the
    /// logits at position t predict labels[t + 1] (transformers shifts inside the loss).
    public init(inputIds: [[Int]], labels: [[Int]]) throws {
        guard let T = inputIds.first?.count, T > 0, inputIds.allSatisfy({ $0.count == T }), labels.count == inputIds.count,
              labels.allSatisfy({ $0.count == T }) else {
            throw TrainingError.badBatch("input_ids and labels must be B rows of the same length T")
        }
        var inp: [Int32] = [], tgt: [Int32] = []
        inp.reserveCapacity(inputIds.count * T); tgt.reserveCapacity(inputIds.count * T)
        for (ids, lab) in zip(inputIds, labels) {
            for t in 0..<T {
                inp.append(Int32(ids[t]))
                tgt.append(t + 1 < T ? Int32(lab[t + 1]) : TrainingBatch.ignoreIndex)
            }
        }
        try self.init(batchSize: inputIds.count, seqLen: T, inputs: inp, targets: tgt)
    }

    /// Sequences of different lengths, right-padded with `padToken` to `length` (default: the longest);
    /// the model learns to predict every token of each sequence from the ones before it.
    public init(sequences: [[Int]], padToken: Int, length: Int? = nil) throws {
        let T = length ?? (sequences.map(\.count).max() ?? 0)
        guard sequences.allSatisfy({ $0.count <= T }) else { throw TrainingError.badBatch("a sequence is longer than length \(T)") }
        let ids = sequences.map { $0 + Array(repeating: padToken, count: T - $0.count) }
        let labels = sequences.map { $0 + Array(repeating: Int(TrainingBatch.ignoreIndex), count: T - $0.count) }
        try self.init(inputIds: ids, labels: labels)
    }

    /// Pretraining windows of T + 1 tokens each: inputs w[0..<T], targets w[1...T] (every position predicts).
    public init(windows: [[Int]]) throws {
        guard let n = windows.first?.count, n >= 2, windows.allSatisfy({ $0.count == n }) else {
            throw TrainingError.badBatch("windows must all have the same length T + 1 >= 2")
        }
        var inp: [Int32] = [], tgt: [Int32] = []
        for w in windows {
            for t in 0..<(n - 1) { inp.append(Int32(w[t])); tgt.append(Int32(w[t + 1])) }
        }
        try self.init(batchSize: windows.count, seqLen: n - 1, inputs: inp, targets: tgt)
    }
}

// MARK: - Adapter parameters and gradients

/// One LoRA level's parameters: a (down, up) pair per module path (`transformer.h.3.attn.c_attn`),
/// in PEFT's shapes down = A or C (r, in), up = B or D (out, r), and the level's scale (alpha / r).
/// The tensors are read, never written; the caller's optimizer updates them between calls.
public struct AdapterWeights {
    public var pairs: [String: (down: Tensor, up: Tensor)]
    public var scale: Float

    public init(pairs: [String: (down: Tensor, up: Tensor)], scale: Float) {
        self.pairs = pairs; self.scale = scale
    }
}

/// Gradients written by `ModelTrainer.lossAndGradients`. Tensors are allocated once per module and
/// shape and overwritten by every call that asks for them (a level not asked for is left as it was).
public final class ModelGradients {
    /// d loss / d (A, B) per module path, shapes as the parameters.
    public internal(set) var shared: [String: (down: Tensor, up: Tensor)] = [:]
    /// d loss / d (C, D) per module path.
    public internal(set) var client: [String: (down: Tensor, up: Tensor)] = [:]
    /// Full mode: gradients of every base weight, same structure as the weights (nil in LoRA mode).
    public let base: ModelWeights?
    let architecture: ModelArchitecture

    init(base: ModelWeights?, architecture: ModelArchitecture) { self.base = base; self.architecture = architecture }

    /// Full mode: (Hugging Face name, gradient) in `ModelWeights.named` order.
    public var named: [(String, Tensor)] { base?.named ?? [] }

    func pair(level: Int, path: String, like p: (down: Tensor, up: Tensor)) -> (down: Tensor, up: Tensor) {
        if let g = level == 0 ? shared[path] : client[path], g.down.shape == p.down.shape, g.up.shape == p.up.shape { return g }
        let g = (down: Tensor(zeros: p.down.shape), up: Tensor(zeros: p.up.shape))
        if level == 0 { shared[path] = g } else { client[path] = g }
        return g
    }
}

// MARK: - Run state

/// Every activation of one layer that the backward pass reads.
final class LayerActivations {
    let ln1: Tensor, ln1Mean: Tensor, ln1Rstd: Tensor   // (BT,C), (BT), (BT)
    let qkv: Tensor                                     // (BT,W) [q | k | v] as attention reads it
    let qkvRaw: Tensor?                                 // (BT,W) before the per-head q/k norms (Qwen3)
    let qkRstd: Tensor?                                 // (BT,H+KV) their 1/rms
    let att: Tensor                                     // (B,H,T,T) softmax probabilities
    let atty: Tensor                                    // (BT,qW) attention output, heads concatenated
    let resMid: Tensor                                  // (BT,C) residual after attention
    let ln2: Tensor, ln2Mean: Tensor, ln2Rstd: Tensor   // (BT,C), (BT), (BT)
    let fch: Tensor                                     // (BT,I) or (BT,2I): mlpIn's output
    let act: Tensor                                     // (BT,I) GELU or SwiGLU output
    let resOut: Tensor                                  // (BT,C) residual after the MLP: the next layer's input

    init(B: Int, T: Int, c: ModelArchitecture) {
        let BT = B * T, C = c.hiddenSize, W = c.group(.attnIn).outFeatures
        ln1 = Tensor(zeros: [BT, C]); ln1Mean = Tensor(zeros: [BT]); ln1Rstd = Tensor(zeros: [BT])
        qkv = Tensor(zeros: [BT, W])
        qkvRaw = c.qkNorm ? Tensor(zeros: [BT, W]) : nil
        qkRstd = c.qkNorm ? Tensor(zeros: [BT, c.headCount + c.kvHeadCount]) : nil
        att = Tensor(zeros: [B, c.headCount, T, T]); atty = Tensor(zeros: [BT, c.qWidth])
        resMid = Tensor(zeros: [BT, C])
        ln2 = Tensor(zeros: [BT, C]); ln2Mean = Tensor(zeros: [BT]); ln2Rstd = Tensor(zeros: [BT])
        fch = Tensor(zeros: [BT, c.group(.mlpIn).outFeatures]); act = Tensor(zeros: [BT, c.intermediateSize])
        resOut = Tensor(zeros: [BT, C])
    }

    var byteCount: Int {
        ([ln1, ln1Mean, ln1Rstd, qkv, att, atty, resMid, ln2, ln2Mean, ln2Rstd, fch, act, resOut] + [qkvRaw, qkRstd].compactMap { $0 })
            .reduce(0) { $0 + $1.count * 4 }
    }
}

/// The run state for one (B, T) (llm.c's ActivationTensors plus the backward scratch): allocated once,
/// reused by every call of that shape. A forward-only call allocates one layer's activations and reuses
/// them for every layer; the first training call grows it to all layers.
final class TrainingState {
    let B: Int, T: Int
    let config: ModelArchitecture
    let encoded: Tensor                 // (BT,C) token (+ position) embeddings: layer 0's input
    var layers: [LayerActivations]      // 1 (forward only) or n_layer
    let proj: Tensor                    // (BT,C) scratch: attention / MLP projection output
    let lnf: Tensor, lnfMean: Tensor, lnfRstd: Tensor   // (BT,C), (BT), (BT)
    let scores: Tensor                  // (T,T) scratch for forward-only attention
    let ropeCS: Tensor?                 // (T,hd) cos | sin of positions 0..<T
    // LoRA: u = x A^T of every adapted module and level, (BT, r) each; index (l * slots + slot) * 2 + level.
    var loraU: [Tensor?]
    var loraTmp: Tensor                 // (BT, maxRank) scratch, grown on demand
    var loraTmpCap: Int
    // Classifier: logits of a chunk of target rows.
    let headRows: Int
    let headIn: Tensor                  // (chunk,C) final-norm rows with a target
    let logits: Tensor                  // (chunk,V) logits, then their gradient in place
    let rowList: UnsafeMutablePointer<Int>   // (BT) rows with a target, in order
    // Backward scratch, shared by every layer. With GELU, dact is dfch (the backward runs in place).
    var dresid: Tensor?, dln: Tensor?, dqkv: Tensor?, datty: Tensor?, dfch: Tensor?, dact: Tensor?, dscores: Tensor?, dlnf: Tensor?
    var ones: Tensor?                   // (BT) of 1, for bias gradients as a GEMV
    var headTmp: Tensor?                // (hd) a q/k head's input gradient (per-head norm backward)

    init(B: Int, T: Int, config c: ModelArchitecture, rope: RoPE?) {
        self.B = B; self.T = T; self.config = c
        let BT = B * T, C = c.hiddenSize
        encoded = Tensor(zeros: [BT, C])
        layers = [LayerActivations(B: B, T: T, c: c)]
        proj = Tensor(zeros: [BT, C])
        lnf = Tensor(zeros: [BT, C]); lnfMean = Tensor(zeros: [BT]); lnfRstd = Tensor(zeros: [BT])
        scores = Tensor(zeros: [T, T])
        if let rope {
            let t = Tensor(zeros: [T, c.headDim])
            for p in 0..<T { rope.table(position: p, into: t.data + p * c.headDim) }
            ropeCS = t
        } else {
            ropeCS = nil
        }
        loraU = Array(repeating: nil, count: c.layerCount * c.slots.count * 2)
        loraTmpCap = 0
        loraTmp = Tensor(zeros: [0])
        headRows = min(BT, 256)
        headIn = Tensor(zeros: [headRows, C]); logits = Tensor(zeros: [headRows, c.vocabSize])
        rowList = .allocate(capacity: BT)
    }

    deinit { rowList.deallocate() }

    /// Grows to every layer's activations and the backward scratch (first training call).
    func ensureTraining() {
        let c = config, BT = B * T, C = c.hiddenSize
        while layers.count < c.layerCount { layers.append(LayerActivations(B: B, T: T, c: c)) }
        if dresid == nil {
            dresid = Tensor(zeros: [BT, C]); dln = Tensor(zeros: [BT, C]); dqkv = Tensor(zeros: [BT, c.group(.attnIn).outFeatures])
            datty = Tensor(zeros: [BT, c.qWidth]); dfch = Tensor(zeros: [BT, c.group(.mlpIn).outFeatures]); dscores = Tensor(zeros: [T, T])
            dact = c.mlp == .swiglu ? Tensor(zeros: [BT, c.intermediateSize]) : dfch
            dlnf = Tensor(zeros: [BT, C])
            ones = Tensor(zeros: [BT]); ones!.fill(1)
            headTmp = c.qkNorm ? Tensor(zeros: [c.headDim]) : nil
        }
    }

    /// u buffer (BT, r) of a module and level.
    func u(_ slot: Int, rank r: Int) -> Tensor {
        if let t = loraU[slot], t.count >= B * T * r { return t }
        let t = Tensor(zeros: [B * T * r]); loraU[slot] = t; return t
    }

    /// Layer l's input: the embeddings, or the previous layer's output (with one reused layer buffer
    /// in forward-only mode, that buffer's resOut).
    func input(_ l: Int, save: Bool) -> Tensor { l == 0 ? encoded : layers[save ? l - 1 : 0].resOut }

    var byteCount: Int {
        var n = layers.reduce(0) { $0 + $1.byteCount }
        n += (encoded.count + proj.count + lnf.count + 2 * lnfMean.count + scores.count + headIn.count + logits.count) * 4
        for t in [dresid, dln, dqkv, datty, dfch, dscores, dlnf, ones, ropeCS, headTmp] { n += (t?.count ?? 0) * 4 }
        if let d = dact, d !== dfch { n += d.count * 4 }
        n += loraU.reduce(0) { $0 + ($1?.count ?? 0) * 4 }
        n += loraTmp.count * 4 + B * T * MemoryLayout<Int>.stride   // LoRA scratch, rowList
        return n
    }

    /// `byteCount` of the state a call of shape (B, T) leaves, computed without allocating: a training
    /// call (every layer's activations, the backward scratch, a u buffer per adapted module and level
    /// of rank `ranks[i]`) or a forward-only one (one layer's activations). Must follow `init`,
    /// `ensureTraining`, `u` and `prepare` (a test compares it with `byteCount` after real calls).
    static func bytes(B: Int, T: Int, config c: ModelArchitecture, training: Bool, ranks: [Int]) -> Int {
        let BT = B * T, C = c.hiddenSize, I = c.intermediateSize
        let W = c.group(.attnIn).outFeatures, F = c.group(.mlpIn).outFeatures, qW = c.qWidth, heads = c.headCount + c.kvHeadCount
        // ln1, resMid, ln2, resOut (C); qkv (W); atty (qW); fch (F); act (I); the norms' mean and 1/std (4);
        // the q/k norms' raw [q | k | v] and 1/rms; the attention probabilities.
        let layer = BT * (4 * C + W + qW + F + I + 4) + (c.qkNorm ? BT * (W + heads) : 0) + B * c.headCount * T * T
        var floats = (training ? c.layerCount : 1) * layer
        floats += 3 * BT * C + 2 * BT + T * T                 // encoded, proj, lnf, lnfMean, lnfRstd, scores
        if c.hasPositionStep, case .rope = c.positions { floats += T * c.headDim }   // ropeCS
        floats += min(BT, 256) * (C + c.vocabSize)            // headIn, logits
        if training {
            floats += BT * (3 * C + W + qW + F + 1) + T * T   // dresid, dln, dlnf, dqkv, datty, dfch, ones, dscores
            if c.mlp == .swiglu { floats += BT * I }          // dact (GELU runs in dfch)
            if c.qkNorm { floats += c.headDim }               // headTmp
            floats += ranks.reduce(0) { $0 + BT * $1 }        // u of every adapted module and level
        }
        floats += BT * (ranks.max() ?? 0)                     // loraTmp
        return floats * 4 + BT * MemoryLayout<Int>.stride
    }
}

/// One adapted module's level, resolved for a call.
struct ResolvedPair {
    let down: UnsafeMutablePointer<Float>     // A or C (r, in)
    let up: UnsafeMutablePointer<Float>       // B or D (out, r)
    let rank: Int
    let scale: Float
    let gradDown: UnsafeMutablePointer<Float>?   // nil: no gradient wanted
    let gradUp: UnsafeMutablePointer<Float>?
}

// MARK: - Trainer

/// Forward and backward of any supported model for the causal-LM loss, on a frozen base with
/// two-level LoRA adapters (or, with `fullGradients`, for every base weight).
///
/// Not thread-safe: one trainer per thread. Calls of the same (B, T) allocate nothing after the first
/// (adapter gradients are allocated once per module and shape).
public final class ModelTrainer {
    public let weights: ModelWeights
    public let config: ModelArchitecture
    /// Full mode: base-weight gradients are computed.
    public let fullGradients: Bool
    /// Where gradients are written.
    public let gradients: ModelGradients
    let rope: RoPE?

    private var state: TrainingState?
    private let paths: [[String]]                  // [layer][slot] module path
    var resolved: [ResolvedPair?]                  // (l * slots + slot) * 2 + level
    private var anyGradWanted = false

    /// `weights` is read, never written (in full mode the caller's optimizer updates it between calls,
    /// so it must then be writable: `ModelWeights.load(_, writable: true)` or `random`).
    public init(weights: ModelWeights, fullGradients: Bool = false) {
        self.weights = weights
        self.config = weights.architecture
        self.fullGradients = fullGradients
        let c = weights.architecture
        rope = RoPE(c)
        let shapes = Dictionary(uniqueKeysWithValues: c.tensors.map { ($0.name, $0.shape) })
        gradients = ModelGradients(base: fullGradients ? (try! ModelWeights.assemble(architecture: c, file: "gradients") { name in
            Tensor(zeros: shapes[name]!)
        }) : nil, architecture: c)
        paths = (0..<c.layerCount).map { l in c.slots.map { c.modulePath(layer: l, slot: $0.index) } }
        resolved = Array(repeating: nil, count: c.layerCount * c.slots.count * 2)
    }

    /// Bytes of the run state currently allocated (activations and backward scratch).
    public var stateBytes: Int { state?.byteCount ?? 0 }

    /// Mean cross-entropy of `batch` (no gradients; saves nothing for backward). For evaluation and perplexity.
    public func loss(_ batch: TrainingBatch, shared: AdapterWeights? = nil, client: AdapterWeights? = nil) throws -> Float {
        let st = try prepare(batch, shared: shared, client: client, wantShared: false, wantClient: false)
        forward(batch, st, save: false)
        return classifier(batch, st, backward: false)
    }

    /// Mean cross-entropy of `batch` and its gradients, written into `gradients`: `shared[path]` (dA, dB)
    /// when `wantShared`, `client[path]` (dC, dD) when `wantClient`, and in full mode `base` (every weight).
    /// Either adapter level may be nil (absent from the model).
    public func lossAndGradients(_ batch: TrainingBatch, shared: AdapterWeights? = nil, client: AdapterWeights? = nil,
                                 wantShared: Bool = true, wantClient: Bool = true) throws -> Float {
        let st = try prepare(batch, shared: shared, client: client, wantShared: wantShared, wantClient: wantClient)
        if !anyGradWanted {   // nothing to differentiate
            forward(batch, st, save: false)
            return classifier(batch, st, backward: false)
        }
        st.ensureTraining()
        forward(batch, st, save: true)
        let loss = classifier(batch, st, backward: true)
        backward(batch, st)
        return loss
    }

    // MARK: Setup

    private func prepare(_ batch: TrainingBatch, shared: AdapterWeights?, client: AdapterWeights?,
                         wantShared: Bool, wantClient: Bool) throws -> TrainingState {
        let c = config
        guard batch.seqLen <= c.contextLength else {
            throw TrainingError.badBatch("sequence length \(batch.seqLen) exceeds the model's context \(c.contextLength)")
        }
        guard batch.targetCount > 0 else { throw TrainingError.noTargets }
        for t in batch.inputs where t < 0 || Int(t) >= c.vocabSize {
            throw TrainingError.badBatch("input token \(t) is outside the vocabulary 0..<\(c.vocabSize)")
        }
        for t in batch.targets where t != TrainingBatch.ignoreIndex && (t < 0 || Int(t) >= c.vocabSize) {
            throw TrainingError.badBatch("target \(t) is outside the vocabulary 0..<\(c.vocabSize) (and is not -100)")
        }
        // Resolve the adapters into the per-module table.
        anyGradWanted = fullGradients
        var maxRank = 0
        for level in 0..<2 {
            let w = level == 0 ? shared : client
            let want = level == 0 ? wantShared : wantClient
            var matched = 0
            for l in 0..<c.layerCount {
                for s in c.slots {
                    let slot = (l * c.slots.count + s.index) * 2 + level
                    guard let w, let p = w.pairs[paths[l][s.index]] else { resolved[slot] = nil; continue }
                    matched += 1
                    let path = paths[l][s.index]
                    let (din, dout) = s.dims
                    let r = p.down.shape.first ?? 0
                    guard p.down.shape == [r, din], r > 0 else {
                        throw TrainingError.adapterShape(module: path, tensor: level == 0 ? "lora_A" : "lora_C", expected: [r, din], found: p.down.shape)
                    }
                    guard p.up.shape == [dout, r] else {
                        throw TrainingError.adapterShape(module: path, tensor: level == 0 ? "lora_B" : "lora_D", expected: [dout, r], found: p.up.shape)
                    }
                    var g: (down: Tensor, up: Tensor)?
                    if want { g = gradients.pair(level: level, path: path, like: p); anyGradWanted = true }
                    resolved[slot] = ResolvedPair(down: p.down.data, up: p.up.data, rank: r, scale: w.scale,
                                                  gradDown: g?.down.data, gradUp: g?.up.data)
                    maxRank = max(maxRank, r)
                }
            }
            if let w, matched != w.pairs.count {
                let unknown = w.pairs.keys.sorted().first { c.parseModulePath($0) == nil } ?? w.pairs.keys.sorted()[0]
                throw TrainingError.unknownModule(unknown)
            }
        }
        let st: TrainingState
        if let s = state, s.B == batch.batchSize, s.T == batch.seqLen { st = s } else {
            st = TrainingState(B: batch.batchSize, T: batch.seqLen, config: c, rope: rope)
            state = st
        }
        if st.loraTmpCap < maxRank {
            st.loraTmpCap = maxRank
            st.loraTmp = Tensor(zeros: [st.B * st.T * maxRank])
        }
        return st
    }

    // MARK: Forward and backward of the whole model

    private func forward(_ batch: TrainingBatch, _ st: TrainingState, save: Bool) {
        let c = config, BT = st.B * st.T, C = c.hiddenSize
        embeddingForward(batch, st)
        let runner = TrainingBlockRunner(trainer: self, st: st, save: save)
        for l in 0..<c.layerCount { runBlock(runner, layer: l) }
        normRows(c.norm, st.input(c.layerCount, save: save).data, weights.finalNorm.data, weights.finalNormBias?.data, st.lnf.data,
                 rows: BT, C: C, eps: c.normEps, mean: st.lnfMean.data, rstd: st.lnfRstd.data)
    }

    /// Backward from d lnf (filled by the classifier) down to the embeddings.
    private func backward(_ batch: TrainingBatch, _ st: TrainingState) {
        let c = config, BT = st.B * st.T, C = c.hiddenSize
        let dresid = st.dresid!
        if let g = gradients.base {
            for t in [g.finalNorm, g.finalNormBias, g.positions].compactMap({ $0 }) { t.fill(0) }
            if !c.tiedHead { g.embed.fill(0) }   // the classifier wrote the head's; the embeddings' are added below
            for gl in g.layers {
                for t in [gl.attnNorm, gl.attnNormBias, gl.mlpNorm, gl.mlpNormBias, gl.qNorm, gl.kNorm].compactMap({ $0 }) { t.fill(0) }
            }
        }
        // Final norm: dresid = d input of the final norm.
        dresid.fill(0)
        let last = st.layers[c.layerCount - 1].resOut
        normBackward(c.norm, st.dlnf!.data, last.data, weights.finalNorm.data, mean: st.lnfMean.data, rstd: st.lnfRstd.data,
                     dx: dresid.data, dw: gradients.base?.finalNorm.data, db: gradients.base?.finalNormBias?.data, rows: BT, C: C)
        for l in stride(from: c.layerCount - 1, through: 0, by: -1) { blockBackward(layer: l, st) }
        if gradients.base != nil { embeddingBackward(batch, st) }
    }

    /// `runBlock`'s steps in reverse for layer l. On entry dresid holds d (layer l's output); on return
    /// d (its input). The residual passes dresid through unchanged; each branch adds its part.
    private func blockBackward(layer l: Int, _ st: TrainingState) {
        let c = config, BT = st.B * st.T, C = c.hiddenSize
        let a = st.layers[l], w = weights.layers[l], gl = gradients.base?.layers[l]
        let dresid = st.dresid!, dln = st.dln!, dfch = st.dfch!, dact = st.dact!, datty = st.datty!, dqkv = st.dqkv!
        let input = st.input(l, save: true)
        // MLP branch. dresid is d resOut.
        linearBackward(dresid, x: a.act, dx: dact, layer: l, site: .mlpOut, st)          // (BT,C) -> (BT,I)
        switch c.mlp {                                                                 // (BT,I) -> (BT,I or 2I)
        case .gelu: geluBackwardInPlace(a.fch.data, dfch.data, count: BT * c.intermediateSize)
        case .swiglu: swigluBackward(a.fch.data, dact.data, dfch.data, rows: BT, I: c.intermediateSize)
        }
        linearBackward(dfch, x: a.ln2, dx: dln, layer: l, site: .mlpIn, st)              // (BT,I or 2I) -> (BT,C)
        normBackward(c.norm, dln.data, a.resMid.data, w.mlpNorm.data, mean: a.ln2Mean.data, rstd: a.ln2Rstd.data,
                     dx: dresid.data, dw: gl?.mlpNorm.data, db: gl?.mlpNormBias?.data, rows: BT, C: C)
        // Attention branch. dresid is now d resMid.
        linearBackward(dresid, x: a.atty, dx: datty, layer: l, site: .attnOut, st)      // (BT,C) -> (BT,qW)
        attentionBackward(a, datty: datty, dqkv: dqkv, st)                              // (BT,qW) -> (BT,W)
        if c.hasPositionStep { positionBackward(a, dqkv: dqkv, layer: l, st) }
        // Layer 0's norm input gradient only reaches the embeddings: skip it unless they train.
        let needDx = l > 0 || gradients.base != nil
        linearBackward(dqkv, x: a.ln1, dx: needDx ? dln : nil, layer: l, site: .attnIn, st)  // (BT,W) -> (BT,C)
        if needDx {
            normBackward(c.norm, dln.data, input.data, w.attnNorm.data, mean: a.ln1Mean.data, rstd: a.ln1Rstd.data,
                         dx: dresid.data, dw: gl?.attnNorm.data, db: gl?.attnNormBias?.data, rows: BT, C: C)
        }
    }

    // MARK: Embedding

    /// encoded[b,t] = embed[token] (+ positions[t] when learned).
    private func embeddingForward(_ batch: TrainingBatch, _ st: TrainingState) {
        let C = config.hiddenSize, T = st.T
        batch.inputs.withUnsafeBufferPointer { tok in
            for row in 0..<(st.B * T) {
                let o = st.encoded.data + row * C
                o.update(from: weights.embed.data + Int(tok[row]) * C, count: C)
                if let pos = weights.positions { addInPlace(o, pos.data + (row % T) * C, count: C) }
            }
        }
    }

    /// dembed[token] += dresid[b,t], dpositions[t] += dresid[b,t] (a tied dembed already holds the head's part).
    private func embeddingBackward(_ batch: TrainingBatch, _ st: TrainingState) {
        guard let g = gradients.base else { return }
        let C = config.hiddenSize, T = st.T, d = st.dresid!.data
        batch.inputs.withUnsafeBufferPointer { tok in
            for row in 0..<(st.B * T) {
                addInPlace(g.embed.data + Int(tok[row]) * C, d + row * C, count: C)
                if let gp = g.positions { addInPlace(gp.data + (row % T) * C, d + row * C, count: C) }
            }
        }
    }

    // MARK: Linear layer (a group of slots) with two LoRA levels

    /// out (BT,gOut) = x W^T + b + per slot and level s (x A^T) B^T into the slot's columns.
    /// Saves u = x A^T per slot and level when `save`.
    fileprivate func linearForward(_ x: Tensor, _ out: Tensor, layer l: Int, site: GroupSite, _ st: TrainingState, save: Bool) {
        let c = config, g = c.groups[site.rawValue]
        let din = g.inFeatures, gOut = g.outFeatures
        let BT = st.B * st.T
        let lw = weights.layers[l]
        // (BT,in) @ (in,gOut) -> (BT,gOut); an (out,in) weight is read transposed
        BLAS.gemm(x.data, lw.groupW[site.rawValue].data, out.data, m: BT, n: gOut, k: din, transB: g.layout == .linear)
        if let b = lw.groupB[site.rawValue] { addBias(out.data, b.data, rows: BT, cols: gOut) }
        for (s, off) in zip(g.slots, g.offsets) {
            let so = c.slots[s].outFeatures
            for level in 0..<2 {
                let slot = (l * c.slots.count + s) * 2 + level
                guard let p = resolved[slot] else { continue }
                let u = save ? st.u(slot, rank: p.rank).data : st.loraTmp.data
                BLAS.gemm(x.data, p.down, u, m: BT, n: p.rank, k: din, transB: true)                       // (BT,in) @ (in,r) -> (BT,r)
                BLAS.gemm(u, p.up, out.data + off, m: BT, n: so, k: p.rank, transB: true, ldc: gOut,
                          alpha: p.scale, beta: 1)                                                      // s (BT,r) @ (r,out) -> (BT,out)
            }
        }
    }

    /// From dout (BT,gOut): dx (BT,in) when given (overwritten), the wanted LoRA gradients, and in full
    /// mode dW, db. The frozen base in LoRA mode gets no gradient GEMM.
    private func linearBackward(_ dout: Tensor, x: Tensor, dx: Tensor?, layer l: Int, site: GroupSite, _ st: TrainingState) {
        let c = config, g = c.groups[site.rawValue]
        let din = g.inFeatures, gOut = g.outFeatures
        let conv = g.layout == .conv1D
        let BT = st.B * st.T
        if let dx {
            BLAS.gemm(dout.data, weights.layers[l].groupW[site.rawValue].data, dx.data, m: BT, n: din, k: gOut, transB: conv)  // (BT,out) @ (out,in) -> (BT,in)
        }
        if let gw = gradients.base?.layers[l] {
            if conv {
                BLAS.gemm(x.data, dout.data, gw.groupW[site.rawValue].data, m: din, n: gOut, k: BT, transA: true)   // (in,BT) @ (BT,out) -> (in,out)
            } else {
                BLAS.gemm(dout.data, x.data, gw.groupW[site.rawValue].data, m: gOut, n: din, k: BT, transA: true)   // (out,BT) @ (BT,in) -> (out,in)
            }
            if let gb = gw.groupB[site.rawValue] { BLAS.gemv(dout.data, st.ones!.data, gb.data, m: BT, n: gOut, trans: true) }  // (out,BT) @ (BT) -> (out)
        }
        for (s, off) in zip(g.slots, g.offsets) {
            let so = c.slots[s].outFeatures
            let ds = dout.data + off   // the slot's columns of dout, rows gOut apart
            for level in 0..<2 {
                let slot = (l * c.slots.count + s) * 2 + level
                guard let p = resolved[slot] else { continue }
                let wantGrad = p.gradDown != nil
                guard wantGrad || dx != nil else { continue }
                let u = st.u(slot, rank: p.rank).data, du = st.loraTmp.data
                if let gUp = p.gradUp {
                    BLAS.gemm(ds, u, gUp, m: so, n: p.rank, k: BT, transA: true, lda: gOut, alpha: p.scale)      // s (out,BT) @ (BT,r) -> (out,r)
                }
                BLAS.gemm(ds, p.up, du, m: BT, n: p.rank, k: so, lda: gOut, alpha: p.scale)                    // s (BT,out) @ (out,r) -> (BT,r)
                if let gDown = p.gradDown {
                    BLAS.gemm(du, x.data, gDown, m: p.rank, n: din, k: BT, transA: true)                     // (r,BT) @ (BT,in) -> (r,in)
                }
                if let dx {
                    BLAS.gemm(du, p.down, dx.data, m: BT, n: din, k: p.rank, beta: 1)                        // (BT,r) @ (r,in) -> (BT,in)
                }
            }
        }
    }

    // MARK: Causal grouped-query self-attention

    /// Per sequence b and query head h over key/value head h / (H / KV): P = softmax(causal(q k^T / sqrt(hd))),
    /// y = P v. Saves P when `save`.
    fileprivate func attentionForward(_ a: LayerActivations, _ st: TrainingState, save: Bool) {
        let c = config, T = st.T, H = c.headCount, hd = c.headDim, qW = c.qWidth, kvW = c.kvWidth
        let W = c.group(.attnIn).outFeatures, perKV = H / c.kvHeadCount
        let scale = 1 / Float(hd).squareRoot()
        for b in 0..<st.B {
            for h in 0..<H {
                let q = a.qkv.data + b * T * W + h * hd, k = a.qkv.data + b * T * W + qW + (h / perKV) * hd, v = k + kvW
                let p = save ? a.att.data + (b * H + h) * T * T : st.scores.data
                let y = a.atty.data + b * T * qW + h * hd
                BLAS.gemm(q, k, p, m: T, n: T, k: hd, transB: true, lda: W, ldb: W, ldc: T, alpha: scale)  // (T,hd) @ (hd,T) -> (T,T)
                for i in 0..<T {
                    softmaxInPlace(p + i * T, count: i + 1)
                    if i + 1 < T { (p + i * T + i + 1).update(repeating: 0, count: T - i - 1) }
                }
                BLAS.gemm(p, v, y, m: T, n: hd, k: T, lda: T, ldb: W, ldc: qW)                           // (T,T) @ (T,hd) -> (T,hd)
            }
        }
    }

    /// dy (BT,qW) -> dq, dk, dv written into dqkv (BT,W); a key/value head's gradient is the sum over its query heads.
    private func attentionBackward(_ a: LayerActivations, datty: Tensor, dqkv: Tensor, _ st: TrainingState) {
        let c = config, T = st.T, H = c.headCount, hd = c.headDim, qW = c.qWidth, kvW = c.kvWidth
        let W = c.group(.attnIn).outFeatures, perKV = H / c.kvHeadCount
        let scale = 1 / Float(hd).squareRoot()
        let dp = st.dscores!.data
        for b in 0..<st.B {
            for h in 0..<H {
                let kOff = qW + (h / perKV) * hd
                let q = a.qkv.data + b * T * W + h * hd, k = a.qkv.data + b * T * W + kOff, v = k + kvW
                let dq = dqkv.data + b * T * W + h * hd, dk = dqkv.data + b * T * W + kOff, dv = dk + kvW
                let p = a.att.data + (b * H + h) * T * T
                let dy = datty.data + b * T * qW + h * hd
                let acc: Float = h % perKV == 0 ? 0 : 1   // the group's first head writes dk, dv; the others add
                BLAS.gemm(dy, v, dp, m: T, n: T, k: hd, transB: true, lda: qW, ldb: W, ldc: T)                  // (T,hd) @ (hd,T) -> (T,T)
                BLAS.gemm(p, dy, dv, m: T, n: hd, k: T, transA: true, lda: T, ldb: qW, ldc: W, beta: acc)      // (T,T)^T @ (T,hd) -> (T,hd)
                for i in 0..<T { softmaxBackwardRow(p + i * T, dp + i * T, count: i + 1, zeroTo: T) }          // dP -> dS in place
                BLAS.gemm(dp, k, dq, m: T, n: hd, k: T, lda: T, ldb: W, ldc: W, alpha: scale)                  // (T,T) @ (T,hd) -> (T,hd)
                BLAS.gemm(dp, q, dk, m: T, n: hd, k: T, transA: true, lda: T, ldb: W, ldc: W, alpha: scale, beta: acc)  // (T,T)^T @ (T,hd) -> (T,hd)
            }
        }
    }

    /// The position step's forward on a layer's [q | k | v] (after attnIn): per-head q/k norms (saving
    /// the raw heads and 1/rms for the backward), then the rotation by each row's position.
    fileprivate func positionForward(_ a: LayerActivations, layer l: Int, _ st: TrainingState, save: Bool) {
        let c = config, BT = st.B * st.T, W = c.group(.attnIn).outFeatures, hd = c.headDim, heads = c.headCount + c.kvHeadCount
        let lw = weights.layers[l]
        if save, let raw = a.qkvRaw { raw.copy(from: a.qkv) }
        for row in 0..<BT {
            positionStep(c, rope, a.qkv.data + row * W, heads: 0..<heads, qNorm: lw.qNorm, kNorm: lw.kNorm,
                         cs: st.ropeCS?.data.advanced(by: (row % st.T) * hd) ?? a.qkv.data,
                         rstd: save ? a.qkRstd?.data.advanced(by: row * heads) : nil)
        }
    }

    /// The position step's backward on dq and dk in dqkv, in place: the inverse rotation, then the
    /// per-head norms' backward (their weight gradients in full mode).
    private func positionBackward(_ a: LayerActivations, dqkv: Tensor, layer l: Int, _ st: TrainingState) {
        let c = config, BT = st.B * st.T, W = c.group(.attnIn).outFeatures, hd = c.headDim
        let H = c.headCount, heads = H + c.kvHeadCount
        let lw = weights.layers[l], gl = gradients.base?.layers[l]
        let tmp = st.headTmp?.data   // only with per-head norms
        for row in 0..<BT {
            for h in 0..<heads {
                let d = dqkv.data + row * W + h * hd
                if let rope, let cs = st.ropeCS { rope.rotateBack(d, cs.data + (row % st.T) * hd) }
                if let tmp, let raw = a.qkvRaw, let rstd = a.qkRstd, let w = h < H ? lw.qNorm : lw.kNorm {
                    tmp.update(repeating: 0, count: hd)
                    rmsNormBackward(d, raw.data + row * W + h * hd, w.data, rstd.data + row * heads + h,
                                    dx: tmp, dw: (h < H ? gl?.qNorm : gl?.kNorm)?.data, rows: 1, C: hd)
                    d.update(from: tmp, count: hd)
                }
            }
        }
    }

    // MARK: Classifier (the head) and cross-entropy, forward and backward fused

    /// Loss over the rows with a target, in chunks: logits = lnf @ head^T, cross-entropy, and with
    /// `backward` the logits' gradient in place, then d lnf = dlogits @ head and (full mode) dhead.
    /// Rows without a target get no logits at all.
    private func classifier(_ batch: TrainingBatch, _ st: TrainingState, backward: Bool) -> Float {
        let c = config, C = c.hiddenSize, V = c.vocabSize
        var n = 0
        batch.targets.withUnsafeBufferPointer { tg in
            for row in 0..<(st.B * st.T) where tg[row] != TrainingBatch.ignoreIndex { st.rowList[n] = row; n += 1 }
        }
        let invN = 1 / Float(n)
        if backward { st.dlnf!.fill(0) }
        var total = 0.0
        var first = true
        var start = 0
        while start < n {
            let m = min(st.headRows, n - start)
            for i in 0..<m { st.headIn.data.advanced(by: i * C).update(from: st.lnf.data + st.rowList[start + i] * C, count: C) }
            BLAS.gemm(st.headIn.data, weights.head.data, st.logits.data, m: m, n: V, k: C, transB: true)        // (m,C) @ (C,V) -> (m,V)
            batch.targets.withUnsafeBufferPointer { tg in
                for i in 0..<m {
                    let target = Int(tg[st.rowList[start + i]])
                    total += crossEntropyRow(st.logits.data + i * V, count: V, target: target, gradScale: backward ? invN : nil)
                }
            }
            if backward {
                // d headIn = dlogits @ head: (m,V) @ (V,C) -> (m,C), reusing headIn as the output.
                if let g = gradients.base {
                    BLAS.gemm(st.logits.data, st.headIn.data, g.head.data, m: V, n: C, k: m, transA: true, beta: first ? 0 : 1)  // (V,m) @ (m,C) -> (V,C)
                }
                BLAS.gemm(st.logits.data, weights.head.data, st.headIn.data, m: m, n: C, k: V)                   // (m,V) @ (V,C) -> (m,C)
                for i in 0..<m { (st.dlnf!.data + st.rowList[start + i] * C).update(from: st.headIn.data + i * C, count: C) }
            }
            first = false
            start += m
        }
        return Float(total / Double(n))
    }
}

/// `runBlock`'s steps over a training batch's B x T rows, saving what the backward reads.
private struct TrainingBlockRunner: BlockRunner {
    unowned let trainer: ModelTrainer
    let st: TrainingState
    let save: Bool

    func acts(_ l: Int) -> LayerActivations { st.layers[save ? l : 0] }

    func norm(_ site: NormSite, layer l: Int) {
        let c = trainer.config, a = acts(l), BT = st.B * st.T
        let (w, b) = trainer.weights.norm(site, layer: l)
        switch site {
        case .attention:
            normRows(c.norm, st.input(l, save: save).data, w.data, b?.data, a.ln1.data, rows: BT, C: c.hiddenSize, eps: c.normEps,
                     mean: a.ln1Mean.data, rstd: a.ln1Rstd.data)
        case .mlp:
            normRows(c.norm, a.resMid.data, w.data, b?.data, a.ln2.data, rows: BT, C: c.hiddenSize, eps: c.normEps,
                     mean: a.ln2Mean.data, rstd: a.ln2Rstd.data)
        }
    }

    func linear(_ site: GroupSite, layer l: Int) {
        let a = acts(l), n = st.B * st.T * trainer.config.hiddenSize
        switch site {
        case .attnIn: trainer.linearForward(a.ln1, a.qkv, layer: l, site: site, st, save: save)      // (BT,C) -> (BT,W)
        case .attnOut:
            trainer.linearForward(a.atty, st.proj, layer: l, site: site, st, save: save)              // (BT,qW) -> (BT,C)
            residualForward(st.input(l, save: save).data, st.proj.data, a.resMid.data, count: n)
        case .mlpIn: trainer.linearForward(a.ln2, a.fch, layer: l, site: site, st, save: save)       // (BT,C) -> (BT,I or 2I)
        case .mlpOut:
            trainer.linearForward(a.act, st.proj, layer: l, site: site, st, save: save)               // (BT,I) -> (BT,C)
            residualForward(a.resMid.data, st.proj.data, a.resOut.data, count: n)
        }
    }

    func attention(layer l: Int) {
        let a = acts(l)
        if trainer.config.hasPositionStep { trainer.positionForward(a, layer: l, st, save: save) }
        trainer.attentionForward(a, st, save: save)                                                  // (BT,W) -> (BT,qW)
    }

    func activation(layer l: Int) {
        let c = trainer.config, a = acts(l), BT = st.B * st.T
        switch c.mlp {
        case .gelu: geluForward(a.fch.data, a.act.data, count: BT * c.intermediateSize)
        case .swiglu: swigluForward(a.fch.data, a.act.data, rows: BT, I: c.intermediateSize)
        }
    }
}

// MARK: - Bridge to the federated training's parameter sets

extension AdapterWeights {
    /// One level of a `TwoLevelAdapter`: a `ParameterSet` with PEFT names (`<module>.lora_A.weight` /
    /// `lora_B` for the shared level, `lora_C` / `lora_D` for the client level; the module with or without
    /// `transformer.`), keyed by module path for the trainer. The tensors are shared, not copied.
    public init(_ set: ParameterSet, level: LoRALevel, scale: Float, architecture: ModelArchitecture) throws {
        let (downSuffix, upSuffix) = level == .shared ? (".lora_A.weight", ".lora_B.weight") : (".lora_C.weight", ".lora_D.weight")
        var pairs: [String: (down: Tensor, up: Tensor)] = [:]
        for name in set.names where name.hasSuffix(downSuffix) {
            let module = String(name.dropLast(downSuffix.count))
            guard let (l, s) = architecture.parseModulePath(module) else { throw TrainingError.unknownModule(module) }
            guard let up = set[module + upSuffix] else { throw TrainingError.unknownModule(module + upSuffix) }
            pairs[architecture.modulePath(layer: l, slot: s)] = (set.tensor(name), up)
        }
        self.init(pairs: pairs, scale: scale)
    }
}

extension ModelGradients {
    /// Copies one level's gradients into `set`, which has the parameters' names and shapes
    /// (see `AdapterWeights.init(_:level:scale:)`), overwriting it.
    public func copy(level: LoRALevel, into set: ParameterSet) {
        let (downSuffix, upSuffix) = level == .shared ? (".lora_A.weight", ".lora_B.weight") : (".lora_C.weight", ".lora_D.weight")
        let source = level == .shared ? shared : client
        for name in set.names where name.hasSuffix(downSuffix) {
            let module = String(name.dropLast(downSuffix.count))
            guard let (l, s) = architecture.parseModulePath(module), let g = source[architecture.modulePath(layer: l, slot: s)] else {
                preconditionFailure("ModelGradients: no \(level) gradient for \(module); was it asked for?")
            }
            set.tensor(name).copy(from: g.down)
            set.tensor(module + upSuffix).copy(from: g.up)
        }
    }
}

// The names these types had while only GPT-2 was supported, for code written against them.
@available(*, deprecated, renamed: "ModelTrainer") public typealias GPT2Trainer = ModelTrainer
@available(*, deprecated, renamed: "ModelGradients") public typealias GPT2Gradients = ModelGradients
@available(*, deprecated, renamed: "LMTask") public typealias GPT2LMTask = LMTask
@available(*, deprecated, renamed: "Pretrainer") public typealias GPT2Pretrainer = Pretrainer
