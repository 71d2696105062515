import Foundation

/// Knobs of one personalization (docs/PERSONALIZE.md).
public struct PersonalizeOptions: Sendable {
    /// Optimizer steps at most.
    public var steps = 100
    /// Stop after the step that reaches this many seconds (nil: no time budget).
    public var maxSeconds: Double?
    /// AdamW learning rate of (C, D).
    public var lr: Float = 2e-3
    /// Rank of a new client's pair (nil: 2). An existing client keeps its rank; giving another is an error.
    public var rank2: Int?
    /// Alpha of a new client's pair (nil: 2 x rank2, the scale 2 PF2LoRA uses). An existing client keeps its alpha.
    public var alpha2: Float?
    /// B windows of T tokens per step; T is cut to the texts' length when they are shorter.
    public var batchSize = 8
    public var seqLen = 64
    public var seed: UInt64 = 0
    /// Gradient clipping to this global norm (0 = off).
    public var clipNorm: Float = 1
    /// Rank threshold for the reported ranks.
    public var tau: Float = LearnedRank.defaultTau
    public init() {}
}

/// What a personalization did.
public struct PersonalizeResult: Sendable {
    public let client: String
    /// The client's new version in the store.
    public let version: Int
    /// The version it replaced (nil: a new client).
    public let previousVersion: Int?
    /// The shared version it was trained against (nil: the store has no shared adapter).
    public let sharedVersion: Int?
    public let steps: Int
    /// Training minibatch loss of every step.
    public let loss: [Float]
    /// Learned rank of the client's effective update, per module (sigma_i > tau sigma_max).
    public let ranks: [String: Int]
    public let seconds: Double
    public let texts: Int
    public let tokens: Int

    public var rankRange: (min: Int, max: Int) { (ranks.values.min() ?? 0, ranks.values.max() ?? 0) }
}

/// Why a personalization was refused or stopped; the store keeps the client's last good version.
public enum PersonalizeError: Error, CustomStringConvertible, Equatable {
    case noTexts(client: String)
    case noTokens(client: String)
    case badOption(String)
    case rankMismatch(client: String, existing: Int, requested: Int)
    case nonFiniteLoss(client: String, step: Int, lr: Float)

    public var description: String {
        switch self {
        case let .noTexts(c): return "personalize '\(c)': no texts were given; give at least one non-empty text"
        case let .noTokens(c): return "personalize '\(c)': the texts tokenize to nothing; give real text"
        case let .badOption(s): return "personalize: \(s)"
        case let .rankMismatch(c, e, r):
            return "client '\(c)' already has a rank-\(e) pair; personalization warm-starts from it, so rank2 must be \(e) (or omitted), not \(r)"
        case let .nonFiniteLoss(c, step, lr):
            return "personalize '\(c)': the loss became non-finite at step \(step) with lr \(lr); lower the learning rate (try \(lr / 10)). The store keeps the client's last good version"
        }
    }

    /// True for errors of the request itself (bad params) rather than of training.
    public var isBadInput: Bool {
        switch self { case .nonFiniteLoss: return false; default: return true }
    }
}

/// Trains client `client`'s level-2 pair (C, D) on `texts` with the store's current shared pair
/// frozen, then publishes it atomically as the client's new version, recorded as trained on that
/// shared version. A server using the store serves it from the client's next request on.
///
/// - New client: C Kaiming-uniform (PEFT's init, uniform in ±1/sqrt(d_in)), D = 0, so training starts
///   from the shared model. Existing client: warm start from its current version (rank and alpha kept).
/// - Optimizer: AdamW (no weight decay), gradients clipped to `clipNorm`. A fixed small budget
///   (about 100 steps) from D = 0 needs a rate that works for every module's fan-in at once; Adam's
///   per-parameter normalization gives that, where SGD's good rate differs between the attention and
///   MLP modules and between models. (PF2LoRA's lower level uses SGD because there it runs many
///   rounds and its fixed point matters for the hypergradient; here only the end result does.)
/// - Data: the texts are packed into one stream (`TokenStream`), windows of T + 1 tokens drawn with
///   the seeded RNG: the same inputs and seed give the same adapter.
/// - The base weights are only read (a server may share them); the trainer owns all its buffers.
///
/// `progress(step, loss)` is called after every step, then `control.afterStep` (which may throw to stop
/// the run: a cancel); `control.maxStateBytes` refuses a batch × seq whose training state would not fit
/// (`TrainingMemoryError`) before anything is allocated. Throws `PersonalizeError`, `AdapterStoreError`
/// (invalid client id) or a store error; nothing is published unless training finished with finite values.
public func personalize(weights: ModelWeights, tokenizer: BPETokenizer, store: AdapterStore, client: String,
                        texts: [String], options o: PersonalizeOptions = PersonalizeOptions(),
                        control: TrainingControl = TrainingControl(),
                        progress: ((Int, Float) -> Void)? = nil) throws -> PersonalizeResult {
    let start = Date()
    try ClientID.validate(client)
    guard o.steps >= 1 || o.maxSeconds != nil else { throw PersonalizeError.badOption("steps must be >= 1") }
    guard o.lr > 0, o.lr.isFinite else { throw PersonalizeError.badOption("lr must be a positive number") }
    guard o.batchSize >= 1, o.seqLen >= 2 else { throw PersonalizeError.badOption("batch must be >= 1 and seq >= 2") }
    if let r = o.rank2, r < 1 || r > 256 { throw PersonalizeError.badOption("rank2 must be in 1...256") }
    if let s = o.maxSeconds, !(s > 0) { throw PersonalizeError.badOption("max_seconds must be positive") }
    let nonEmpty = texts.filter { !$0.allSatisfy(\.isWhitespace) }
    guard !nonEmpty.isEmpty else { throw PersonalizeError.noTexts(client: client) }
    let stream = TokenStream(texts: nonEmpty, tokenizer: tokenizer, separator: textSeparator(tokenizer))
    guard stream.textCount > 0, stream.targetCount > 0 else { throw PersonalizeError.noTokens(client: client) }

    try store.refresh()
    let shared = try store.latestShared()
    let existing = try store.latestClient(client)
    let c = weights.architecture
    // Adapt the modules the shared adapter adapts and every module the client's pair already has
    // (a new version keeps every module of the previous one: a shared pair that targets fewer
    // modules must not drop the client's others); with neither, every linear layer.
    let known = Set(shared?.adapter.modules.keys.map { $0 } ?? []).union(existing?.adapter.modules.keys.map { $0 } ?? [])
    let paths = known.isEmpty ? (0..<c.layerCount).flatMap { l in c.slots.map { c.modulePath(layer: l, slot: $0.index) } } : Array(known)
    let T = min(o.seqLen, c.contextLength, stream.tokens.count - 1)
    let clientRank = existing?.adapter.rank ?? o.rank2 ?? 2
    let stateRanks = paths.flatMap { p in [shared?.adapter.modules[p] != nil ? shared?.adapter.rank : nil, clientRank].compactMap { $0 } }
    try control.check(bytes: LMTask.runBytes(config: c, batch: o.batchSize, seq: T, ranks: stateRanks, training: true),
                      batch: o.batchSize, seq: T, config: c, training: true)
    let data = ClientTokenData(id: client, train: stream, valid: stream, test: stream)
    let task = try LMTask(weights: weights, clients: [data], batchSize: o.batchSize, seqLen: T, modulePaths: paths,
                              padToken: textSeparator(tokenizer))

    let rng = RNG(seed: o.seed)
    let rank: Int, alpha: Float, rslora: Bool
    let local: ParameterSet
    if let e = existing?.adapter {
        if let r = o.rank2, r != e.rank { throw PersonalizeError.rankMismatch(client: client, existing: e.rank, requested: r) }
        rank = e.rank; alpha = e.alpha; rslora = e.useRSLoRA
        local = parameterSet(from: e, level: .client, modules: task.modules)
        // A module the shared pair adapts but the client's pair does not yet: start it as a new
        // client's would (C Kaiming-uniform, D = 0: the served function is unchanged at step 0).
        let missing = task.modules.filter { e.modules[$0.name] == nil }
        if !missing.isEmpty {
            var initRNG = rng.derive(0x1A17)
            let fresh = makeLoRAParameters(modules: missing, rank: rank, level: .client, rng: &initRNG)
            for m in missing { local.tensor(LoRALevel.client.downName(m.name)).copy(from: fresh.tensor(LoRALevel.client.downName(m.name))) }
        }
    } else {
        rank = o.rank2 ?? 2
        alpha = o.alpha2 ?? 2 * Float(rank)
        rslora = shared?.adapter.useRSLoRA ?? false
        var initRNG = rng.derive(0x1A17)
        local = makeLoRAParameters(modules: task.modules, rank: rank, level: .client, rng: &initRNG)
    }
    let sharedSet = shared.map { parameterSet(from: $0.adapter, level: .shared, modules: task.modules) }
    let adapter = TwoLevelAdapter(shared: sharedSet, sharedScale: shared?.adapter.scale ?? 0,
                                  local: local, localScale: loraScale(alpha: alpha, rank: rank, rslora: rslora))
    let grad = local.zerosLike()
    let opt = AdamW(weightDecay: 0)
    var losses: [Float] = []
    var batchRNG = rng.derive(0xBA7C)
    let maxSteps = o.steps >= 1 ? o.steps : Int.max
    for step in 1...maxSteps {
        let loss = task.lossAndGradients(client: 0, adapter: adapter, sharedGrad: nil, localGrad: grad, rng: &batchRNG)
        guard loss.isFinite else { throw PersonalizeError.nonFiniteLoss(client: client, step: step, lr: o.lr) }
        if o.clipNorm > 0 { clipGradNorm(grad, maxNorm: o.clipNorm) }
        opt.step(local, grad, lr: o.lr)
        losses.append(loss)
        progress?(step, loss)
        try control.afterStep?(step, maxSteps == .max ? o.steps : maxSteps, loss)
        if let s = o.maxSeconds, Date().timeIntervalSince(start) >= s { break }
    }
    guard local.allFinite else { throw PersonalizeError.nonFiniteLoss(client: client, step: losses.count, lr: o.lr) }

    let spectra = LearnedRank.spectra(modules: task.modules, adapter: adapter)
    let ranks = spectra.mapValues { LearnedRank.rank($0, tau: o.tau) }
    let out = storeAdapter(local, setLevel: .client, as: .client, modules: task.modules, components: 0..<rank,
                           alpha: alpha, rslora: rslora, base: store.base,
                           extra: ["trained_by": "pf2lora personalize", "steps": String(losses.count), "texts": String(stream.textCount)])
    var meta = out
    meta.metadata.sharedVersion = shared?.version
    meta.metadata.clientID = client
    // Compare and swap on the version this run started from: a version another writer published
    // meanwhile is never silently superseded (the caller gets a conflict and may retry from it).
    let version = try store.publishClient(id: client, meta, expecting: ExpectedVersion(startedFrom: existing?.version))
    return PersonalizeResult(client: client, version: version, previousVersion: existing?.version, sharedVersion: shared?.version,
                             steps: losses.count, loss: losses, ranks: ranks, seconds: Date().timeIntervalSince(start),
                             texts: stream.textCount, tokens: stream.tokens.count)
}
