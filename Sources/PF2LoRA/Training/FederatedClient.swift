import Foundation

/// A PF2LoRA client driven from outside this process: one node of a federation whose server (for
/// example a Flower ServerApp, `integrations/flower`) sends the shared pair x = (A, B) each round and
/// averages what the clients send back (DESIGN §7).
///
/// The node keeps its own pair y_k = (C_k, D_k) in its adapter store: it never leaves the node. Each
/// round (`trainLocalRound`) runs exactly PF2LoRA's local work of `runFederated` (the same
/// `pf2loraLocalIterations`, the same minibatch stream for the same seed, round and client index,
/// the same start for a new client), so a federation driven round by round through `train_local`
/// with FedAvg on the server equals `pf2lora federate --method pf2lora` on the same data (a test
/// checks it to the bit with the averaging done in Swift).
///
/// A round: the received x becomes the store's shared version (unless it already is), so the node
/// serves W0 + s B A + s2 D_k C_k with the newest global pair and the client's new version is
/// recorded as trained on it; then y_k and a copy of x are trained on the node's data; y_k is
/// published as a new client version; the copy of x is returned for the server to average.
public struct LocalRoundOptions: Sendable {
    /// 0-based round number and this client's index in the federation: with `seed` they pick the
    /// minibatch stream exactly as `runFederated` does (`RNG(seed).derive((round + 1) << 20 + index)`).
    public var round = 0
    public var clientIndex = 0
    public var seed: UInt64 = 0
    /// Local iterations, each `lowerSteps` SGD steps on (C, D) and one AdamW step on the copy of x.
    public var localSteps = 5
    public var lowerSteps = 2
    /// AdamW rate of x (times `lrFactor`, the server's schedule for this round) and SGD rate of y.
    public var lr: Float = 2e-3
    public var lr2: Float = 0.05
    public var lrFactor: Float = 1
    /// Rank and alpha of a new client's pair (alpha nil: 2 x rank2). An existing pair keeps its own;
    /// asking for another rank is an error.
    public var rank2: Int?
    public var alpha2: Float?
    /// Windows per minibatch, tokens per window, gradient clipping (0 = off): as `pf2lora federate`.
    public var batchSize = 8
    public var seqLen = 64
    public var clipNorm: Float = 1
    /// Publish the received x as the store's shared version first (unless it already is).
    public var publishShared = true
    public init() {}
}

/// What one local round did.
public struct LocalRoundResult {
    /// The client's updated copy of x, for the server to average (shared level, same rank and alpha).
    public let shared: LoRAAdapter
    /// n_k, the FedAvg weight: the client's training texts.
    public let numExamples: Int
    /// Mean upper-level minibatch loss of the round.
    public let trainLoss: Float
    /// The client's new version in the store, the one it replaced (nil: a new client), and the shared
    /// version it was trained against.
    public let clientVersion: Int
    public let previousClientVersion: Int?
    public let sharedVersion: Int?
    /// Learned rank of the client's effective update (shared + client), per module.
    public let ranks: [String: Int]
    public let seconds: Double
}

/// Why a local round or evaluation was refused; the store is unchanged unless the message says otherwise.
public enum FederatedClientError: Error, CustomStringConvertible, Equatable {
    case badOption(String)
    case notShared(String)
    case rankMismatch(client: String, existing: Int, requested: Int)
    case moduleMismatch(client: String, missing: [String])
    case nonFiniteLoss(client: String, round: Int)

    public var description: String {
        switch self {
        case let .badOption(s): return "train_local: \(s)"
        case let .notShared(what): return "\(what) is a client-level adapter; the server must send the shared level (lora_A / lora_B, level 'shared')"
        case let .rankMismatch(c, e, r):
            return "client '\(c)' already has a rank-\(e) pair in this store; a federation keeps each client's pair across rounds, so rank2 must be \(e) (or omitted), not \(r). Use a fresh store for a different rank"
        case let .moduleMismatch(c, missing):
            return "client '\(c)''s pair in this store does not adapt \(missing.prefix(3).joined(separator: ", "))\(missing.count > 3 ? " and \(missing.count - 3) more" : ""), which the shared pair adapts; it was trained for another federation. Use a fresh store"
        case let .nonFiniteLoss(c, r):
            return "train_local '\(c)': the loss became non-finite in round \(r); nothing was published. Lower lr / lr2, or set clip"
        }
    }

    /// True for errors of the request itself rather than of training.
    public var isBadInput: Bool {
        switch self { case .nonFiniteLoss: return false; default: return true }
    }
}

/// The shared pair a federation starts from, as `runFederated` makes it for PF2LoRA with `seed`:
/// A Kaiming-uniform, B = 0, rank `rank`, over `modules` (paths like `transformer.h.0.attn.c_attn`).
/// `pf2lora adapters init` writes it for a server to send in round 0.
public func initialSharedAdapter(weights: ModelWeights, base: BaseModelInfo, modules paths: [String], rank: Int, alpha: Float,
                                 rslora: Bool = false, seed: UInt64) throws -> LoRAAdapter {
    let modules = try loraModules(paths, architecture: weights.architecture)
    var c = FederatedConfig()
    c.rank = rank; c.alpha = alpha; c.rslora = rslora
    var rng = RNG(seed: seed).derive(0x1A17)
    let (x, _) = PF2LoRAAlgorithm.initialParameters(modules: modules, config: c, clients: 0, rng: &rng)
    return storeAdapter(x, setLevel: .shared, as: .shared, modules: modules, components: 0..<rank, alpha: alpha, rslora: rslora,
                        base: base, extra: ["trained_by": "pf2lora adapters init", "seed": String(seed)])
}

/// The LoRA modules of `paths` (`transformer.h.0.attn.c_attn`, `model.layers.0.self_attn.q_proj`, ...)
/// in the order every trainer uses (layer, then slot); a path that is not a linear layer of the
/// architecture throws `TrainingError.unknownModule`.
func loraModules(_ paths: [String], architecture a: ModelArchitecture) throws -> [LoRAModule] {
    try paths.map { p in
        guard let ls = a.parseModulePath(p) else { throw TrainingError.unknownModule(p) }
        return ls
    }.sorted { ($0.layer, $0.slot) < ($1.layer, $1.slot) }.map { ls in
        let (din, dout) = a.slots[ls.slot].dims
        return LoRAModule(name: a.modulePath(layer: ls.layer, slot: ls.slot), dIn: din, dOut: dout)
    }
}

/// Makes `shared` the store's current shared version unless it already is (same rank, alpha, modules
/// and values); returns that version. Refuses a shared pair whose shape differs from the store's,
/// whose clients were trained against the old shape.
@discardableResult
public func adoptShared(_ shared: LoRAAdapter, into store: AdapterStore, trainedBy: String) throws -> Int {
    try checkConsistent(shared, with: store)
    return try publishIfNew(shared, into: store, trainedBy: trainedBy)
}

/// `adoptShared` after its shape check (done by a caller that checked before doing other work).
func publishIfNew(_ shared: LoRAAdapter, into store: AdapterStore, trainedBy: String) throws -> Int {
    let cur = try store.latestShared()
    if let cur, sameValues(cur.adapter, shared) { return cur.version }
    var a = shared
    a.metadata = AdapterMetadata(baseName: store.base.name, baseFingerprint: store.base.fingerprint,
                                 extra: shared.metadata.extra.merging(["trained_by": trainedBy]) { $1 })
    // Replaces exactly the version compared against: another writer's shared version in between is
    // a conflict, not silently superseded.
    return try store.publishShared(a, expecting: ExpectedVersion(startedFrom: cur?.version))
}

/// True when two adapters hold the same tensors, to the bit.
func sameValues(_ a: LoRAAdapter, _ b: LoRAAdapter) -> Bool {
    guard a.rank == b.rank, a.alpha == b.alpha, a.useRSLoRA == b.useRSLoRA, Set(a.modules.keys) == Set(b.modules.keys) else { return false }
    for (m, p) in a.modules {
        let q = b.modules[m]!
        guard p.a.shape == q.a.shape, p.b.shape == q.b.shape,
              memcmp(p.a.data, q.a.data, 4 * p.a.count) == 0, memcmp(p.b.data, q.b.data, 4 * p.b.count) == 0 else { return false }
    }
    return true
}

/// One PF2LoRA client round on this node (see `LocalRoundOptions`). `shared` is the server's x,
/// already decoded and validated against the store's base model. Throws `FederatedClientError`,
/// `FederatedStoreError` (x's shape differs from the store's shared pair), `AdapterStoreError` or
/// a training error; nothing is published unless training finished with finite values (x may have
/// been adopted as the shared version first: it is the server's, so that is never wrong).
///
/// `control`: its memory bound is checked before anything is allocated; its `afterStep` runs after
/// every local iteration (step = iteration, loss = its upper-level loss) and may throw to stop the round
/// before anything is published.
public func trainLocalRound(weights: ModelWeights, store: AdapterStore, client: String, data: ClientTokenData,
                            shared: LoRAAdapter, padToken: Int, options o: LocalRoundOptions,
                            control: TrainingControl = TrainingControl()) throws -> LocalRoundResult {
    let start = Date()
    try ClientID.validate(client)
    guard shared.level == .shared else { throw FederatedClientError.notShared("the adapter sent as 'shared'") }
    guard o.localSteps >= 1, o.lowerSteps >= 0, o.round >= 0, o.clientIndex >= 0 else {
        throw FederatedClientError.badOption("local_steps must be >= 1, lower_steps, round and client_index >= 0")
    }
    guard o.lr > 0, o.lr2 > 0, o.lr.isFinite, o.lr2.isFinite, o.lrFactor >= 0, o.lrFactor.isFinite, o.clipNorm >= 0 else {
        throw FederatedClientError.badOption("lr and lr2 must be positive, lr_factor and clip >= 0")
    }
    guard o.batchSize >= 1, o.seqLen >= 2 else { throw FederatedClientError.badOption("batch must be >= 1 and seq >= 2") }
    if let r = o.rank2, r < 1 || r > 256 { throw FederatedClientError.badOption("rank2 must be in 1...256") }

    // Everything that can refuse the request is checked before the store is touched.
    try store.refresh()
    if o.publishShared { try checkConsistent(shared, with: store) }
    let existing = try store.latestClient(client)
    let modules = try loraModules(Array(shared.modules.keys), architecture: weights.architecture)
    let T = min(o.seqLen, weights.architecture.contextLength)
    let clientRank = existing?.adapter.rank ?? o.rank2 ?? 2
    try control.check(bytes: LMTask.runBytes(config: weights.architecture, batch: o.batchSize, seq: T,
                                                 ranks: modules.flatMap { _ in [shared.rank, clientRank] }, training: true),
                      batch: o.batchSize, seq: T, config: weights.architecture, training: true)
    let task = try LMTask(weights: weights, clients: [data], batchSize: o.batchSize, seqLen: T,
                              modulePaths: modules.map(\.name), padToken: padToken)

    var fc = FederatedConfig()
    fc.localSteps = o.localSteps; fc.lowerSteps = o.lowerSteps
    fc.rank = shared.rank; fc.alpha = shared.alpha; fc.rslora = shared.useRSLoRA
    fc.upperLR = o.lr; fc.lowerLR = o.lr2; fc.clipNorm = o.clipNorm; fc.seed = o.seed

    // y_k: the stored pair, else the start runFederated gives client `clientIndex` for this seed.
    let y: ParameterSet
    if let e = existing?.adapter {
        if let r = o.rank2, r != e.rank { throw FederatedClientError.rankMismatch(client: client, existing: e.rank, requested: r) }
        let missing = modules.map(\.name).filter { e.modules[$0] == nil }
        guard missing.isEmpty else { throw FederatedClientError.moduleMismatch(client: client, missing: missing) }
        fc.rank2 = e.rank; fc.alpha2 = e.alpha
        y = parameterSet(from: e, level: .client, modules: modules)
    } else {
        fc.rank2 = o.rank2 ?? 2
        fc.alpha2 = o.alpha2 ?? 2 * Float(fc.rank2)
        var rng = RNG(seed: o.seed).derive(0x1A17)
        y = PF2LoRAAlgorithm.initialParameters(modules: modules, config: fc, clients: o.clientIndex + 1, rng: &rng).local[o.clientIndex]
    }
    guard fc.rank2 >= 1 else { throw FederatedClientError.badOption("the stored pair of '\(client)' has rank 0") }
    let sharedVersion = o.publishShared ? try publishIfNew(shared, into: store, trainedBy: "train_local (federation)") : store.currentVersion(level: .shared)

    let x = parameterSet(from: shared, level: .shared, modules: modules)
    var rng = RNG(seed: o.seed).derive((UInt64(o.round + 1) << 20) &+ UInt64(o.clientIndex))
    let loss = try pf2loraLocalIterations(task: task, client: 0, shared: x, local: y, config: fc, lrFactor: o.lrFactor,
                                          upper: makeAdamW(fc), rng: &rng) { i, l in try control.afterStep?(i, o.localSteps, l) }
    guard loss.isFinite, x.allFinite, y.allFinite else { throw FederatedClientError.nonFiniteLoss(client: client, round: o.round) }

    let extra = ["trained_by": "train_local (federation)", "round": String(o.round)]
    var yAdapter = storeAdapter(y, setLevel: .client, as: .client, modules: modules, components: 0..<fc.rank2, alpha: fc.alpha2,
                                rslora: fc.rslora, base: store.base, extra: extra)
    yAdapter.metadata.sharedVersion = sharedVersion
    yAdapter.metadata.clientID = client
    // A new version keeps every module of the previous one: modules the client's pair adapts beyond
    // the shared pair's (which the federation does not train) are carried over unchanged.
    if let e = existing?.adapter {
        for (m, pair) in e.modules where yAdapter.modules[m] == nil { yAdapter.modules[m] = pair }
    }
    let version = try store.publishClient(id: client, yAdapter, expecting: ExpectedVersion(startedFrom: existing?.version))
    let xAdapter = storeAdapter(x, setLevel: .shared, as: .shared, modules: modules, components: 0..<fc.rank, alpha: fc.alpha,
                                rslora: fc.rslora, base: store.base, extra: extra.merging(["client_id": client]) { $1 })
    let adapter = TwoLevelAdapter(shared: x, sharedScale: fc.sharedScale, local: y, localScale: fc.localScale)
    let ranks = LearnedRank.spectra(modules: modules, adapter: adapter).mapValues { LearnedRank.rank($0) }
    return LocalRoundResult(shared: xAdapter, numExamples: data.train.textCount, trainLoss: loss, clientVersion: version,
                            previousClientVersion: existing?.version, sharedVersion: sharedVersion, ranks: ranks,
                            seconds: Date().timeIntervalSince(start))
}

/// What a client's evaluation found.
public struct LocalEvaluation {
    public let loss: Float
    /// Tokens predicted (the evaluation's weight).
    public let tokens: Int
    public let texts: Int
    public let clientVersion: Int?
    public let sharedVersion: Int?
    public let ranks: [String: Int]
}

/// Mean token cross-entropy of the store's current (shared, client) pair on one split of the
/// client's data, after adopting `shared` as the shared version when it is given (the server's
/// final x). A client with no pair yet is evaluated with the shared pair alone.
///
/// `control`: its memory bound is checked first (with rank 256, the largest a pair may have, for the
/// scratch); its `afterStep` runs after every batch of windows (step = windows done, loss = the mean so
/// far) and may throw to stop the evaluation.
public func evaluateLocal(weights: ModelWeights, store: AdapterStore, client: String, data: ClientTokenData, shared: LoRAAdapter?,
                          split: Split, seqLen: Int = 64, padToken: Int, control: TrainingControl = TrainingControl()) throws -> LocalEvaluation {
    try ClientID.validate(client)
    let evalT = min(max(2, seqLen), weights.architecture.contextLength)
    try control.check(bytes: LMTask.runBytes(config: weights.architecture, batch: 1, seq: evalT, ranks: [256], training: false),
                      batch: 1, seq: evalT, config: weights.architecture, training: false)
    if let shared {
        guard shared.level == .shared else { throw FederatedClientError.notShared("the adapter sent as 'shared'") }
        try adoptShared(shared, into: store, trainedBy: "train_local (federation)")
    }
    try store.refresh()
    let sh = try store.latestShared(), cl = try store.latestClient(client)
    let paths = (sh?.adapter.modules.keys).map(Array.init) ?? (cl?.adapter.modules.keys).map(Array.init)
        ?? (0..<weights.architecture.layerCount).map { weights.architecture.modulePath(layer: $0, slot: 0) }
    let modules = try loraModules(paths, architecture: weights.architecture)
    let task = try LMTask(weights: weights, clients: [data], batchSize: 1, seqLen: evalT,
                              modulePaths: modules.map(\.name), padToken: padToken)
    let x = sh.map { parameterSet(from: $0.adapter, level: .shared, modules: modules) }
    let y = cl.map { parameterSet(from: $0.adapter, level: .client, modules: modules) }
    let adapter = TwoLevelAdapter(shared: x, sharedScale: sh?.adapter.scale ?? 0, local: y, localScale: cl?.adapter.scale ?? 0)
    let loss = Float(try task.evaluateTotals(client: 0, adapter: adapter, split: split) { done, total, mean in
        try control.afterStep?(done, total, mean)
    }.meanLoss)
    let stream = data.split(split)
    let ranks = (x != nil || y != nil) ? LearnedRank.spectra(modules: modules, adapter: adapter).mapValues { LearnedRank.rank($0) } : [:]
    return LocalEvaluation(loss: loss, tokens: stream.targetCount, texts: stream.textCount, clientVersion: cl?.version,
                           sharedVersion: sh?.version, ranks: ranks)
}
