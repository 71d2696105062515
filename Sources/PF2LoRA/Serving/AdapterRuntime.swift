import Foundation
import Synchronization

/// What one sequence is served with, fixed when it is admitted: a request in flight finishes on the
/// adapter versions it started with, whatever is published meanwhile.
public struct AdapterBinding: Sendable {
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
/// What a generate for a client without an adapter in the store gets (issue 11, item 18).
public enum UnknownClientPolicy: Sendable, Equatable {
    /// -32001 (HTTP 404) naming the client, the store's clients and how to ask for the shared pair.
    case refuse
    /// The shared pair alone, `adapter.client` null (DESIGN §5; `serve --unknown-clients-get-shared`).
    case sharedPair
}

public final class AdapterRuntime: Sendable {
    public let model: LanguageModel
    public let store: AdapterStore?
    /// What a generate for a client the store has no adapter for gets: an error (the default), or
    /// the shared pair alone (DESIGN §5's behaviour, `serve --unknown-clients-get-shared`).
    public let unknownClients: UnknownClientPolicy
    /// Minimum seconds between manifest checks. A check is one stat() when nothing changed, so the
    /// default checks on every admission: a version published a moment ago is used by the next request.
    public var refreshInterval: Double {
        get { state.withLock { $0.refreshInterval } }
        set { state.withLock { $0.refreshInterval = newValue } }
    }
    /// Client id -> what happened to its current file that failed validation when the store was
    /// opened: its path, whether it was renamed aside (`.corrupt-*`; nothing is deleted) or skipped
    /// (a read-only store), and which check failed.
    public let quarantined: [String: String]

    /// What the serving threads, the fold thread and the reader share; only ever read or written
    /// inside `state.withLock`.
    private struct State {
        var folded: (version: Int, set: LinearWeightSet)?
        var folding: Int?
        var views: [AdapterCache.Key: ClientPairs] = [:]
        var lastRefresh = 0.0
        var refreshInterval = 0.0
    }
    private let state = Mutex(State())
    private let foldQueue = DispatchQueue(label: "pf2lora.fold")

    /// How the shared pair is applied (nil: `SharedPairMode.default` for the base's precision).
    public let sharedPairMode: SharedPairMode?

    public init(model: LanguageModel, store: AdapterStore?, unknownClients: UnknownClientPolicy = .refuse, sharedPairMode: SharedPairMode? = nil) {
        self.model = model
        self.store = store
        self.unknownClients = unknownClients
        self.sharedPairMode = sharedPairMode
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
            state.withLock { $0.folded = (v, set) }
        }
    }

    private func fold(version v: Int) throws -> LinearWeightSet {
        guard let store else { return model.baseLinears }
        let a = try store.load(level: .shared, version: v)
        var pairs: [String: LowRankPair] = [:]
        for (path, p) in a.modules { pairs[path] = LowRankPair(a: p.a, b: p.b, scale: a.scale) }
        return LinearWeightSet(base: model.baseLinears, architecture: model.architecture, folding: pairs, label: "shared v\(v)", mode: sharedPairMode)
    }

    /// Re-reads the manifest if it is due (or `force`), and starts folding a new shared version.
    /// `idle` says no sequence is running, so a fold may block.
    public func refresh(force: Bool = false, idle: Bool = false) throws {
        guard let store else { return }
        let t = Double(DispatchTime.now().uptimeNanoseconds) * 1e-9
        let due = state.withLock { s in
            let due = force || t - s.lastRefresh >= s.refreshInterval
            if due { s.lastRefresh = t }
            return due
        }
        if due { try store.refresh() }
        guard let v = store.currentVersion(level: .shared) else { return }
        // Whether to fold `v`, and whether anything is folded yet, in one look at the state (the
        // second was read without the lock before).
        let (need, nothingFolded) = state.withLock { s in
            let need = s.folded?.version != v && s.folding != v
            if need { s.folding = v }
            return (need, s.folded == nil)
        }
        guard need else { return }
        // The version folded is the store's current one when the fold reads it: if `v` was pruned
        // meanwhile (another process published again), the newer one is folded instead.
        if idle || nothingFolded {
            do {
                _ = adoptFold(try store.loadCurrent(level: .shared, fold))
            } catch {
                _ = adoptFold(nil)
                throw error
            }
        } else {
            foldQueue.async { [weak self] in
                guard let self else { return }
                var failure: Error?
                var result: (version: Int, value: LinearWeightSet)?
                do { result = try store.loadCurrent(level: .shared, self.fold) } catch { failure = error }
                let serving = self.adoptFold(result)
                if let failure {
                    FileHandle.standardError.write("serve: shared v\(v) could not be loaded (\(failure)); still serving shared v\(serving)\n".data(using: .utf8)!)
                }
            }
        }
    }

    /// Keeps a finished fold's result unless a newer version was folded meanwhile, ends the fold;
    /// returns the shared version served now (0: none).
    private func adoptFold(_ result: (version: Int, value: LinearWeightSet)?) -> Int {
        state.withLock { s in
            if let (fv, set) = result, (s.folded?.version ?? -1) < fv { s.folded = (fv, set) }
            s.folding = nil
            return s.folded?.version ?? 0
        }
    }

    /// Waits until a background fold (if any) finished; for tests and `reload`.
    public func waitForFold() { foldQueue.sync {} }

    /// The binding for `client` (nil: shared pair alone).
    public func resolve(client: String?) throws -> AdapterBinding {
        let shared = state.withLock { $0.folded }
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
            if unknownClients == .refuse { throw unknownClientError(client) }
            return AdapterBinding(weights: weights, sharedVersion: shared?.version, client: nil, clientVersion: nil, clientTrainedOn: nil)
        }
        return AdapterBinding(weights: weights, sharedVersion: shared?.version, client: pairs, clientVersion: v,
                              clientTrainedOn: store.trainedOn(client: client, version: v))
    }

    /// Whether `client` may be served: it has a current version in the store (the manifest is
    /// re-read once when it has none), or unknown clients get the shared pair. Throws the same
    /// -32001 `resolve` would, so a transport can refuse before queueing anything.
    public func checkServable(client: String) throws {
        guard unknownClients == .refuse else { return }
        if let store {
            if store.currentVersion(level: .client, client: client) != nil { return }
            _ = try? store.refresh()
            if store.currentVersion(level: .client, client: client) != nil { return }
            if let what = quarantined[client] {
                throw RPCError(.adapterInvalid, "client '\(client)' has no valid adapter: \(what); publish a new version (personalize, adapters import-peft) or restore the file, then reload")
            }
        }
        throw unknownClientError(client)
    }

    /// -32001 for a client with no adapter: names it, says how many clients the store holds and
    /// the closest ids, and how to ask for the shared pair alone.
    public func unknownClientError(_ client: String) -> RPCError {
        let alone = "name the client 'shared' (or give none) for the shared pair alone"
        guard let store else {
            return RPCError(.unknownClient, "unknown client '\(client)': the server has no adapter store (start it with --store DIR); \(alone)")
        }
        let known = store.clients()
        let close = ClientID.closest(to: client, among: known, count: 3)
        let held = known.isEmpty ? "it holds no clients yet" : "it holds \(known.count) client\(known.count == 1 ? "" : "s")" + (close.isEmpty ? "" : "; closest: " + close.joined(separator: ", "))
        return RPCError(.unknownClient, "unknown client '\(client)': the store has no adapter for it (\(held)); personalize it first, \(alone), or start the server with --unknown-clients-get-shared to serve unknown clients the shared pair")
    }

    /// Client `id`'s pairs at `version`, from the cache or loaded (read, decompress, validate).
    public func clientPairs(_ id: String, version v: Int) throws -> ClientPairs {
        guard let store else { throw RPCError(.unknownClient, "no adapter store is open") }
        let key = AdapterCache.Key(level: .client, client: id, version: v)
        if let p = state.withLock({ $0.views[key] }), store.cache.contains(key) { return p }
        let a = try store.load(level: .client, client: id, version: v)
        var pairs: [String: LowRankPair] = [:]
        for (path, p) in a.modules { pairs[path] = LowRankPair(a: p.a, b: p.b, scale: a.scale) }
        let cp = ClientPairs(architecture: model.architecture, pairs: pairs, label: "\(id) v\(v)")
        state.withLock { s in
            s.views[key] = cp
            // Drop the views of adapters the cache evicted, so their memory goes with them.
            if s.views.count > 8 { s.views = s.views.filter { store.cache.contains($0.key) } }
        }
        return cp
    }

    /// Drops a client's cached adapters (all versions).
    @discardableResult public func evict(client id: String) -> Int {
        guard let store else { return 0 }
        state.withLock { $0.views = $0.views.filter { $0.key.client != id } }
        return store.cache.removeAll { $0.level == .client && $0.client == id }
    }

    public var sharedVersion: Int? { state.withLock { $0.folded?.version } }

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
