import Foundation

/// What one sequence is served with, fixed when it is admitted: a request in flight finishes on the
/// adapter versions it started with, whatever is published meanwhile.
public struct AdapterBinding {
    public let weights: LinearWeightSet
    public let sharedVersion: Int?
    public let client: ClientPairs?
    public let clientVersion: Int?
    /// The shared version the client pair was trained against, when recorded.
    public let clientTrainedOn: Int?

    public init(weights: LinearWeightSet, sharedVersion: Int?, client: ClientPairs?, clientVersion: Int?, clientTrainedOn: Int?) {
        self.weights = weights; self.sharedVersion = sharedVersion; self.client = client
        self.clientVersion = clientVersion; self.clientTrainedOn = clientTrainedOn
    }

    /// The base model alone (no adapter at all).
    public static func base(_ model: LanguageModel) -> AdapterBinding {
        AdapterBinding(weights: model.baseLinears, sharedVersion: nil, client: nil, clientVersion: nil, clientTrainedOn: nil)
    }
}

/// Resolves clients to adapters from the store, hot-swapping new versions without a restart.
///
/// - The shared pair is folded into a copy of the linear weights once per shared version
///   (DESIGN §6). A new version is folded on a background thread while the old one keeps serving,
///   unless nothing is being served, in which case it is folded at once.
/// - Client pairs come from the store's byte-bounded LRU cache of validated adapters; the
///   `ClientPairs` views built on them copy nothing and are dropped when the cache evicts.
/// - The store's manifest is re-read (one stat when unchanged) at most every `refreshInterval`.
public final class AdapterRuntime {
    public let model: LanguageModel
    public let store: AdapterStore?
    /// Refuse clients the store has never seen (otherwise they get the shared pair alone).
    public let strict: Bool
    /// Minimum seconds between manifest checks. A check is one stat() when nothing changed, so the
    /// default checks on every admission: a version published a moment ago is used by the next request.
    public var refreshInterval: Double = 0
    /// Client id -> what happened to its current file that failed validation when the store was
    /// opened: its path, whether it was renamed aside (`.corrupt-*`; nothing is deleted) or skipped
    /// (a read-only store), and which check failed.
    public let quarantined: [String: String]

    private let lock = NSLock()
    private var folded: (version: Int, set: LinearWeightSet)?
    private var folding: Int?
    private var views: [AdapterCache.Key: ClientPairs] = [:]
    private var lastRefresh = 0.0
    private let foldQueue = DispatchQueue(label: "pf2lora.fold")

    public init(model: LanguageModel, store: AdapterStore?, strict: Bool = false) {
        self.model = model
        self.store = store
        self.strict = strict
        var q: [String: String] = [:]
        let report = store?.lastReconcile ?? ReconcileReport()
        for path in report.quarantined + report.skipped {
            let parts = path.split(separator: "/")
            if parts.count == 3, parts[0] == "clients" {
                let moved = report.quarantined.contains(path) ? "was moved aside (renamed .corrupt-*)" : "was skipped (the store is read-only: nothing was renamed)"
                q[String(parts[1])] = "\(path) failed validation when the store was opened and \(moved): \(report.reasons[path] ?? "?")"
            }
        }
        quarantined = q
    }

    /// Loads the current shared version now (called at server start so a broken shipped file is
    /// reported at once with its path).
    public func prepare() throws {
        guard let store else { return }
        if let (v, set) = try store.loadCurrent(level: .shared, fold) {
            lock.lock(); folded = (v, set); lock.unlock()
        }
    }

    private func fold(version v: Int) throws -> LinearWeightSet {
        guard let store else { return model.baseLinears }
        let a = try store.load(level: .shared, version: v)
        var pairs: [String: LowRankPair] = [:]
        for (path, p) in a.modules { pairs[path] = LowRankPair(a: p.a, b: p.b, scale: a.scale) }
        return LinearWeightSet(base: model.baseLinears, architecture: model.architecture, folding: pairs, label: "shared v\(v)")
    }

    /// Re-reads the manifest if it is due (or `force`), and starts folding a new shared version.
    /// `idle` says no sequence is running, so a fold may block.
    public func refresh(force: Bool = false, idle: Bool = false) throws {
        guard let store else { return }
        let t = Double(DispatchTime.now().uptimeNanoseconds) * 1e-9
        lock.lock()
        let due = force || t - lastRefresh >= refreshInterval
        if due { lastRefresh = t }
        lock.unlock()
        if due { try store.refresh() }
        guard let v = store.currentVersion(level: .shared) else { return }
        lock.lock()
        let need = folded?.version != v && folding != v
        if need { folding = v }
        lock.unlock()
        guard need else { return }
        // The version folded is the store's current one when the fold reads it: if `v` was pruned
        // meanwhile (another process published again), the newer one is folded instead.
        if idle || folded == nil {
            do {
                if let (fv, set) = try store.loadCurrent(level: .shared, fold) {
                    lock.lock(); if (folded?.version ?? -1) < fv { folded = (fv, set) }; folding = nil; lock.unlock()
                } else {
                    lock.lock(); folding = nil; lock.unlock()
                }
            } catch {
                lock.lock(); folding = nil; lock.unlock()
                throw error
            }
        } else {
            foldQueue.async { [weak self] in
                guard let self else { return }
                var failure: Error?
                var result: (version: Int, value: LinearWeightSet)?
                do { result = try store.loadCurrent(level: .shared, self.fold) } catch { failure = error }
                self.lock.lock()
                if let (fv, set) = result, (self.folded?.version ?? -1) < fv { self.folded = (fv, set) }
                self.folding = nil
                let serving = self.folded?.version ?? 0
                self.lock.unlock()
                if let failure {
                    FileHandle.standardError.write("serve: shared v\(v) could not be loaded (\(failure)); still serving shared v\(serving)\n".data(using: .utf8)!)
                }
            }
        }
    }

    /// Waits until a background fold (if any) finished; for tests and `reload`.
    public func waitForFold() { foldQueue.sync {} }

    /// The binding for `client` (nil: shared pair alone).
    public func resolve(client: String?) throws -> AdapterBinding {
        lock.lock()
        let shared = folded
        lock.unlock()
        let weights = shared?.set ?? model.baseLinears
        guard let client else {
            return AdapterBinding(weights: weights, sharedVersion: shared?.version, client: nil, clientVersion: nil, clientTrainedOn: nil)
        }
        try ClientID.validate(client)
        // The current version and its pairs in one step: a version pruned by another process's
        // publish between reading the manifest and reading the file is retried at the new one.
        guard let store, let (v, pairs) = try store.loadCurrent(level: .client, client: client, { try clientPairs(client, version: $0) }) else {
            if let what = quarantined[client] {
                throw RPCError(.adapterInvalid, "client '\(client)' has no valid adapter: \(what); publish a new version (personalize, adapters import-peft) or restore the file, then reload")
            }
            if strict { throw RPCError(.unknownClient, "unknown client '\(client)': the store has no adapter for it (the server runs with --strict-clients); personalize it first or drop --strict-clients") }
            return AdapterBinding(weights: weights, sharedVersion: shared?.version, client: nil, clientVersion: nil, clientTrainedOn: nil)
        }
        return AdapterBinding(weights: weights, sharedVersion: shared?.version, client: pairs, clientVersion: v,
                              clientTrainedOn: store.trainedOn(client: client, version: v))
    }

    /// Client `id`'s pairs at `version`, from the cache or loaded (read, decompress, validate).
    public func clientPairs(_ id: String, version v: Int) throws -> ClientPairs {
        guard let store else { throw RPCError(.unknownClient, "no adapter store is open") }
        let key = AdapterCache.Key(level: .client, client: id, version: v)
        lock.lock()
        if let p = views[key], store.cache.contains(key) { lock.unlock(); return p }
        lock.unlock()
        let a = try store.load(level: .client, client: id, version: v)
        var pairs: [String: LowRankPair] = [:]
        for (path, p) in a.modules { pairs[path] = LowRankPair(a: p.a, b: p.b, scale: a.scale) }
        let cp = ClientPairs(architecture: model.architecture, pairs: pairs, label: "\(id) v\(v)")
        lock.lock()
        views[key] = cp
        // Drop the views of adapters the cache evicted, so their memory goes with them.
        if views.count > 8 { views = views.filter { store.cache.contains($0.key) } }
        lock.unlock()
        return cp
    }

    /// Drops a client's cached adapters (all versions).
    @discardableResult public func evict(client id: String) -> Int {
        guard let store else { return 0 }
        lock.lock()
        views = views.filter { $0.key.client != id }
        lock.unlock()
        return store.cache.removeAll { $0.level == .client && $0.client == id }
    }

    public var sharedVersion: Int? { lock.lock(); defer { lock.unlock() }; return folded?.version }

    /// Maps store and adapter errors to the protocol's codes.
    public static func rpcError(_ error: Error) -> RPCError {
        switch error {
        case let e as RPCError: return e
        case let e as AdapterError:
            if case .fingerprintMismatch = e { return RPCError(.baseMismatch, e.description) }
            return RPCError(.adapterInvalid, e.description)
        case let e as AdapterStoreError:
            switch e {
            case .baseMismatch: return RPCError(.baseMismatch, e.description)
            case .invalidClientID: return RPCError(.invalidParams, e.description)
            case .noAdapter, .noVersion: return RPCError(.unknownClient, e.description)
            case .conflict: return RPCError(.conflict, e.description)
            default: return RPCError(.adapterInvalid, e.description)
            }
        default: return RPCError(.internalError, "\(error)")
        }
    }
}
