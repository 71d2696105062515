import Foundation

/// Why trained adapters were not published; nothing in the store was written.
public enum FederatedStoreError: Error, CustomStringConvertible, Equatable {
    case inconsistentShared(store: String, existing: String, new: String)
    case nonFinite(what: String)

    public var description: String {
        switch self {
        case let .inconsistentShared(store, existing, new):
            return "store \(store) already has a shared adapter with \(existing), but this run would publish \(new); the clients already in the store were trained against the old shape. Use a fresh --store, or match --rank/--alpha (and --rank2/--alpha2 for single-level methods, whose rank is rank + rank2) and the target modules"
        case let .nonFinite(what):
            return "\(what) has non-finite values after training; nothing was published. Lower the learning rates (--lr / --lr2)"
        }
    }
}

/// The adapters a federated run publishes: one shared level and one client level per client, such
/// that the store's pair (shared, client k) is exactly the adapter the method evaluates client k with.
///
/// How each method maps onto the two store levels (s = the method's LoRA scale):
/// - pf2lora: shared = (A, B) rank r; client k = (C_k, D_k) rank r2.
/// - homlora: shared = the global LoRA (rank R = r + r2, alpha scaled to keep s); client k = a zero
///   pair (rank r2, C = D = 0): every client gets the global model, and no client pair left from an
///   earlier run stays paired with the new shared version.
/// - hetlora: the global LoRA truncated to client k's rank r_k. With m = min_k r_k, shared = the first
///   m components; client k = components m..<r_k (rank r_k - m, same s), or a zero rank-1 pair when
///   r_k = m. shared + client k is exactly the truncation to r_k.
/// - local, perfedavg, fedavg-ft: every client has its own full LoRA (local: trained alone; Per-FedAvg:
///   the global after its one-step adaptation; FedAvg+FT: its fine-tuned copy), and there is no common
///   part to share. shared = a zero pair (rank R, B = 0, so W0 unchanged for every client, including
///   new ones); client k = its own LoRA, rank R, scale s.
public struct FederatedAdapters {
    public let method: FederatedMethod
    public let shared: LoRAAdapter
    /// Client id -> its level-2 adapter, in the run's client order.
    public let clients: [(id: String, adapter: LoRAAdapter)]
}

/// The alpha that gives `scale` at `rank` (alpha / r, or alpha / sqrt(r) with rsLoRA).
func alphaFor(scale: Float, rank: Int, rslora: Bool) -> Float {
    rslora ? scale * Float(rank).squareRoot() : scale * Float(rank)
}

/// A store adapter from one level of a parameter set (`level` names the set's tensors; the adapter
/// may be of either store level). `componentRange` keeps only those rank components.
func storeAdapter(_ set: ParameterSet?, setLevel: LoRALevel, as level: AdapterLevel, modules: [LoRAModule],
                  components range: Range<Int>, alpha: Float, rslora: Bool, base: BaseModelInfo,
                  extra: [String: String] = [:]) -> LoRAAdapter {
    let rank = max(1, range.count)
    var out: [String: LoRAPair] = [:]
    for m in modules {
        let a = Tensor(zeros: [rank, m.dIn]), b = Tensor(zeros: [m.dOut, rank])
        if let set, !range.isEmpty {
            let (down, up) = loraPair(set, level: setLevel, module: m.name)
            let full = down.rows
            a.data.update(from: down.data + range.lowerBound * m.dIn, count: range.count * m.dIn)
            for o in 0..<m.dOut { (b.data + o * rank).update(from: up.data + o * full + range.lowerBound, count: range.count) }
        }
        out[m.name] = LoRAPair(a: a, b: b)
    }
    let meta = AdapterMetadata(baseName: base.name, baseFingerprint: base.fingerprint, extra: extra)
    return LoRAAdapter(level: level, rank: rank, alpha: alpha, useRSLoRA: rslora, modules: out, metadata: meta)
}

/// A trainable parameter set (copied, in `modules` order) from a store adapter, under `level`'s names.
public func parameterSet(from adapter: LoRAAdapter, level: LoRALevel, modules: [LoRAModule]) -> ParameterSet {
    let set = ParameterSet()
    for m in modules {
        if let p = adapter.modules[m.name] {
            set.insert(level.downName(m.name), p.a.clone()); set.insert(level.upName(m.name), p.b.clone())
        } else {
            set.insert(level.downName(m.name), Tensor(zeros: [adapter.rank, m.dIn]))
            set.insert(level.upName(m.name), Tensor(zeros: [m.dOut, adapter.rank]))
        }
    }
    return set
}

/// The store adapters of a finished run (see `FederatedAdapters` for the mapping of each method).
public func federatedAdapters(_ result: FederatedResult, modules: [LoRAModule], clientIDs: [String],
                              base: BaseModelInfo) throws -> FederatedAdapters {
    let c = result.config
    let R = c.singleRank, s1 = c.singleScale
    precondition(clientIDs.count == result.clientAdapters.count)
    let extra = ["trained_by": "pf2lora federate", "method": result.method.rawValue]
    for (id, a) in zip(clientIDs, result.clientAdapters) {
        if a.shared?.allFinite == false || a.local?.allFinite == false { throw FederatedStoreError.nonFinite(what: "client '\(id)''s adapter") }
    }
    let shared: LoRAAdapter
    var clients: [(String, LoRAAdapter)] = []
    switch result.method {
    case .pf2lora:
        shared = storeAdapter(result.clientAdapters[0].shared, setLevel: .shared, as: .shared, modules: modules,
                              components: 0..<c.rank, alpha: c.alpha, rslora: c.rslora, base: base, extra: extra)
        for (id, a) in zip(clientIDs, result.clientAdapters) {
            clients.append((id, storeAdapter(a.local, setLevel: .client, as: .client, modules: modules,
                                             components: 0..<c.rank2, alpha: c.alpha2, rslora: c.rslora, base: base, extra: extra)))
        }
    case .homlora:
        shared = storeAdapter(result.clientAdapters[0].shared, setLevel: .shared, as: .shared, modules: modules,
                              components: 0..<R, alpha: alphaFor(scale: s1, rank: R, rslora: c.rslora), rslora: c.rslora, base: base, extra: extra)
        for id in clientIDs {
            clients.append((id, storeAdapter(nil, setLevel: .client, as: .client, modules: modules, components: 0..<c.rank2,
                                             alpha: c.alpha2, rslora: c.rslora, base: base, extra: extra.merging(["zero": "true"]) { $1 })))
        }
    case .hetlora:
        let ranks = result.clientRanks ?? result.clientAdapters.map { $0.shared?.tensor(LoRANames.a(modules[0].name)).rows ?? R }
        let m = ranks.min() ?? R
        let kMin = ranks.firstIndex(of: m)!
        shared = storeAdapter(result.clientAdapters[kMin].shared, setLevel: .shared, as: .shared, modules: modules,
                              components: 0..<m, alpha: alphaFor(scale: s1, rank: m, rslora: c.rslora), rslora: c.rslora, base: base, extra: extra)
        for (k, (id, a)) in zip(clientIDs, result.clientAdapters).enumerated() {
            let q = ranks[k] - m
            clients.append((id, storeAdapter(q > 0 ? a.shared : nil, setLevel: .shared, as: .client, modules: modules,
                                             components: m..<ranks[k], alpha: alphaFor(scale: s1, rank: max(1, q), rslora: c.rslora),
                                             rslora: c.rslora, base: base, extra: extra.merging(["hetlora_rank": String(ranks[k])]) { $1 })))
        }
    case .local, .perfedavg, .fedavgFT:
        shared = storeAdapter(nil, setLevel: .shared, as: .shared, modules: modules, components: 0..<R,
                              alpha: alphaFor(scale: s1, rank: R, rslora: c.rslora), rslora: c.rslora, base: base,
                              extra: extra.merging(["zero": "true"]) { $1 })
        for (id, a) in zip(clientIDs, result.clientAdapters) {
            clients.append((id, storeAdapter(a.shared, setLevel: .shared, as: .client, modules: modules, components: 0..<R,
                                             alpha: alphaFor(scale: s1, rank: R, rslora: c.rslora), rslora: c.rslora, base: base, extra: extra)))
        }
    }
    return FederatedAdapters(method: result.method, shared: shared, clients: clients)
}

/// The (rank, alpha) of the shared level `method` publishes with `config` (nil for HETLoRA, whose
/// shared rank is the smallest client rank at the end of training).
public func sharedLayout(_ method: FederatedMethod, _ c: FederatedConfig) -> (rank: Int, alpha: Float)? {
    switch method {
    case .pf2lora: return (c.rank, c.alpha)
    case .hetlora: return nil
    case .homlora, .local, .perfedavg, .fedavgFT:
        return (c.singleRank, alphaFor(scale: c.singleScale, rank: c.singleRank, rslora: c.rslora))
    }
}

/// Throws unless a shared adapter of `rank`, `alpha`, `rslora` over `modules` matches the store's
/// current shared adapter (when there is one).
public func checkConsistent(rank: Int, alpha: Float, rslora: Bool, modules: Set<String>, with store: AdapterStore) throws {
    try store.refresh()
    guard let cur = try store.latestShared()?.adapter else { return }
    func describe(_ r: Int, _ a: Float, _ rs: Bool, _ n: Int) -> String { "rank \(r), alpha \(a)\(rs ? " (rsLoRA)" : ""), \(n) modules" }
    if cur.rank != rank || cur.alpha != alpha || cur.useRSLoRA != rslora || Set(cur.modules.keys) != modules {
        throw FederatedStoreError.inconsistentShared(store: store.directory, existing: describe(cur.rank, cur.alpha, cur.useRSLoRA, cur.modules.count),
                                                     new: describe(rank, alpha, rslora, modules.count))
    }
}

/// `checkConsistent` for a built shared adapter.
public func checkConsistent(_ shared: LoRAAdapter, with store: AdapterStore) throws {
    try checkConsistent(rank: shared.rank, alpha: shared.alpha, rslora: shared.useRSLoRA, modules: Set(shared.modules.keys), with: store)
}

/// The store's current versions when a run started (`startVersions`), for the compare-and-swap of
/// its publish.
public struct StartVersions: Sendable {
    public var shared: Int?
    public var clients: [String: Int?]
}

/// The current shared version and each client's, read now (call before a long run).
public func startVersions(_ store: AdapterStore, clients ids: [String]) throws -> StartVersions {
    try store.refresh(force: true)
    var c: [String: Int?] = [:]
    for id in ids { try ClientID.validate(id); c[id] = .some(store.currentVersion(level: .client, client: id)) }
    return StartVersions(shared: store.currentVersion(level: .shared), clients: c)
}

/// Publishes the shared level, then every client's level trained against it. Every adapter is
/// encoded and validated before the first write, so a bad adapter publishes nothing. With `from`
/// (the versions the run started from), every publish is a compare-and-swap on them, checked for
/// all adapters before the first write and again by each publish under the store's lock: a version
/// another writer published meanwhile is a conflict, never silently superseded.
/// Returns the new shared version and each client's new version.
@discardableResult
public func publish(_ f: FederatedAdapters, to store: AdapterStore, from start: StartVersions? = nil) throws -> (shared: Int, clients: [String: Int]) {
    for (id, a) in [("shared", f.shared)] + f.clients.map({ ($0.id, $0.adapter) }) {
        var a = a
        if a.level == .client { try ClientID.validate(id); a.metadata.clientID = id }
        _ = try LoRAAdapter.decode(from: try a.encode(), name: "new adapter for \(id)", base: store.base, expectedLevel: a.level)
    }
    func expected(_ id: String?) -> ExpectedVersion {
        guard let start else { return .any }
        guard let id else { return ExpectedVersion(startedFrom: start.shared) }
        guard let v = start.clients[id] else { return .any }
        return ExpectedVersion(startedFrom: v)
    }
    try store.checkExpected(expected(nil), level: .shared)
    for (id, _) in f.clients { try store.checkExpected(expected(id), level: .client, client: id) }
    let sv = try store.publishShared(f.shared, expecting: expected(nil))
    var out: [String: Int] = [:]
    for (id, a) in f.clients {
        var a = a
        a.metadata.sharedVersion = sv
        out[id] = try store.publishClient(id: id, a, expecting: expected(id))
    }
    return (sv, out)
}

/// The singular values of a client's effective update per module, as the store serves it: the
/// current shared pair plus the client's current pair (either may be absent).
public struct ClientSpectra {
    public let client: String
    public let sharedVersion: Int?
    public let clientVersion: Int?
    /// Module paths in layer order, and the descending singular values of s1 B A + s2 D C for each.
    public let modules: [String]
    public let spectra: [String: [Float]]

    /// Rank of each module under sigma_i > tau * sigma_max.
    public func ranks(tau: Float = LearnedRank.defaultTau) -> [String: Int] { spectra.mapValues { LearnedRank.rank($0, tau: tau) } }
}

/// Reads client `id`'s and the shared adapter's current versions from `store` and computes the spectra.
public func clientSpectra(store: AdapterStore, client id: String) throws -> ClientSpectra {
    try ClientID.validate(id)
    try store.refresh()
    let shared = try store.latestShared()
    let cl = try store.latestClient(id)
    guard shared != nil || cl != nil else { throw AdapterStoreError.noAdapter(what: "adapter for client '\(id)' (nor a shared one)", store: store.directory) }
    let paths = Set((shared?.adapter.modules.keys).map(Array.init) ?? []).union((cl?.adapter.modules.keys).map(Array.init) ?? [])
    // Layer, then slot order (without a known architecture: the layer number, then the path).
    let arch = store.base.architecture
    func key(_ p: String) -> (Int, Int, String) {
        if let ls = arch?.parseModulePath(p) { return (ls.layer, ls.slot, p) }
        let layer = p.split(separator: ".").lazy.compactMap { Int($0) }.first ?? 0
        return (layer, 0, p)
    }
    let ordered = paths.sorted { key($0) < key($1) }
    var out: [String: [Float]] = [:]
    for p in ordered {
        var terms: [(up: Tensor, down: Tensor, scale: Float)] = []
        if let s = shared?.adapter, let pair = s.modules[p] { terms.append((pair.b, pair.a, s.scale)) }
        if let c = cl?.adapter, let pair = c.modules[p] { terms.append((pair.b, pair.a, c.scale)) }
        out[p] = LearnedRank.singularValues(terms: terms)
    }
    return ClientSpectra(client: id, sharedVersion: shared?.version, clientVersion: cl?.version, modules: ordered, spectra: out)
}
