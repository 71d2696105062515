import Foundation

// The method layer (issue 15): every protocol method as a typed handler with Codable request and reply
// types, independent of the transport. `Server` (JSON-RPC on stdio) and the HTTP transport
// (Sources/PF2LoRAHTTP) are thin adapters over one `ServingCore`: one scheduler, one continuous batch,
// one adapter cache, one training slot. Errors are `RPCError`s; each transport maps their codes
// (JSON-RPC codes on stdio, HTTP statuses and OpenAI error objects over HTTP).

/// Which weights serve a generate request.
public enum AdapterChoice: Sendable, Equatable, Codable {
    /// The base model alone, without the shared pair (HTTP `model` = the base model's name).
    case base
    /// The shared pair alone (stdio without `client`; HTTP `model` = "shared").
    case shared
    /// That client's two-level adapter (a client with none is -32001, or the shared pair alone
    /// under `UnknownClientPolicy.sharedPair`).
    case client(String)
}

/// A generate request, as every transport hands it to `ServingCore.generate`.
public struct GenerateRequest: Codable, Sendable {
    /// The prompt text, or nil when `messages` or `promptTokens` are given.
    public var prompt: String?
    /// The prompt as token ids (OpenAI's token-array prompts; fed as given, no BOS added).
    public var promptTokens: [Int]?
    /// Chat messages (a JSON array of objects), rendered with the model's chat template and the
    /// generation prompt; the template writes the special tokens (no BOS is added).
    public var messagesJSON: String?
    public var adapter: AdapterChoice
    public var maxTokens: Int?
    public var temperature: Float?
    public var topP: Float?
    public var topK: Int?
    public var seed: UInt64?
    public var stop: [String]
    public var stream: Bool
    public var ignoreEOS: Bool
    /// Per-token log-probabilities: nil none, 0 the chosen token's, k also the k most likely.
    public var logprobs: Int?
    public init(prompt: String? = nil, promptTokens: [Int]? = nil, messagesJSON: String? = nil, adapter: AdapterChoice = .shared,
                maxTokens: Int? = nil, temperature: Float? = nil, topP: Float? = nil, topK: Int? = nil, seed: UInt64? = nil,
                stop: [String] = [], stream: Bool = false, ignoreEOS: Bool = false, logprobs: Int? = nil) {
        self.prompt = prompt; self.promptTokens = promptTokens; self.messagesJSON = messagesJSON; self.adapter = adapter; self.maxTokens = maxTokens
        self.temperature = temperature; self.topP = topP; self.topK = topK; self.seed = seed; self.stop = stop
        self.stream = stream; self.ignoreEOS = ignoreEOS; self.logprobs = logprobs
    }
}

/// One token's log-probability (of the model's distribution, before temperature and truncation).
public struct TokenLogprob: Codable, Sendable {
    public struct Alternative: Codable, Sendable {
        public var token: Int, text: String, logprob: Double
    }
    public var token: Int
    public var text: String
    public var bytes: [Int]
    public var logprob: Double
    public var top: [Alternative]
}

/// A token as it is streamed: the text it released (stop strings may hold text back), its id.
public struct TokenEvent: Sendable {
    public var text: String
    public var token: Int
    public var logprob: TokenLogprob?
}

/// The answer to a generate request.
public struct GenerateResult: Codable, Sendable {
    public struct Usage: Codable, Sendable { public var promptTokens: Int, completionTokens: Int }
    public struct Adapter: Codable, Sendable {
        public var shared: Int?
        public var client: Int?
        public var clientTrainedOnShared: Int?
    }
    public struct Timing: Codable, Sendable { public var queueMs: Double, prefillMs: Double, decodeMs: Double }
    public var text: String
    /// "stop", "length" or "cancelled".
    public var finishReason: String
    public var usage: Usage
    /// The adapter versions that served it (nil: cancelled before it started).
    public var adapter: Adapter?
    public var timing: Timing
    public var logprobs: [TokenLogprob]?

    /// The JSON-RPC result object (docs/PROTOCOL.md).
    public var json: [String: Any] {
        var d: [String: Any] = [
            "text": text, "finish_reason": finishReason,
            "usage": ["prompt_tokens": usage.promptTokens, "completion_tokens": usage.completionTokens],
            "timing": ["queue_ms": timing.queueMs, "prefill_ms": timing.prefillMs, "decode_ms": timing.decodeMs],
        ]
        if let a = adapter {
            var ad: [String: Any] = ["shared": a.shared.map { $0 as Any } ?? NSNull(), "client": a.client.map { $0 as Any } ?? NSNull()]
            if let t = a.clientTrainedOnShared { ad["client_trained_on_shared"] = t }
            d["adapter"] = ad
        }
        return d
    }
}

/// Where a generate request's tokens and answer go; called from the scheduler's and the tokenizer's
/// threads, once `finished` or `failed` per request, `token` before it for a streaming request.
public protocol GenerationSink: AnyObject, Sendable {
    func token(_ event: TokenEvent)
    func finished(_ result: GenerateResult)
    func failed(_ error: RPCError)
}

/// A generate request taken by the server: cancel it (a client went away) with `cancel()`.
public final class GenerationHandle: Sendable {
    let job: Job
    let scheduler: Scheduler
    init(job: Job, scheduler: Scheduler) { self.job = job; self.scheduler = scheduler }
    /// Ends the request: a waiting one at once, a running one at the next step (its sink still gets its answer).
    public func cancel() { scheduler.cancel(job: job) }
}

public struct CancelRequest: Codable, Sendable { public var id: String }
public struct AdapterLoadRequest: Codable, Sendable {
    public var client: String
    public var version: Int?
    public init(client: String, version: Int? = nil) { self.client = client; self.version = version }
}
public struct AdapterLoadReply: Codable, Sendable {
    public var client: String, version: Int, loadMs: Double
    public var json: [String: Any] { ["client": client, "version": version, "load_ms": loadMs] }
}
public struct AdapterEvictReply: Codable, Sendable {
    public var client: String, evicted: Int
    public var json: [String: Any] { ["client": client, "evicted": evicted] }
}

/// One client of the store, as `adapters.list` and the HTTP models and adapters endpoints show it.
public struct ClientInfo: Codable, Sendable {
    public var id: String
    public var version: Int?
    public var versions: [Int]
    public var trainedOnShared: Int?
    public var cached: Bool
    /// Rank of the current version's adapter (read from the cache or the store; nil if unreadable).
    public var rank: Int?
    public var json: [String: Any] {
        var d: [String: Any] = ["id": id, "version": version.map { $0 as Any } ?? NSNull(), "versions": versions, "cached": cached]
        if let t = trainedOnShared { d["trained_on_shared"] = t }
        return d
    }
}

public struct CacheStats: Codable, Sendable {
    public var hits: Int, misses: Int, evictions: Int, entries: Int, bytes: Int, capacityBytes: Int
}

public struct AdaptersListReply: Codable, Sendable {
    public var sharedVersion: Int?
    public var sharedServing: Int?
    public var sharedVersions: [Int]
    public var clients: [ClientInfo]
    public var cache: CacheStats?
    public var json: [String: Any] {
        guard let cache else { return ["shared": NSNull(), "clients": [Any]()] }
        return ["shared": ["version": sharedVersion.map { $0 as Any } ?? NSNull(), "serving": sharedServing.map { $0 as Any } ?? NSNull(),
                           "versions": sharedVersions],
                "clients": clients.map(\.json),
                "cache": ["entries": cache.entries, "bytes": cache.bytes, "capacity_bytes": cache.capacityBytes]]
    }
}

public struct ReloadReply: Codable, Sendable {
    public var shared: Int?
    public var clients: Int
    public var json: [String: Any] { ["shared": shared.map { $0 as Any } ?? NSNull(), "clients": clients] }
}

public struct HealthReply: Codable, Sendable {
    public var status: String
    public var uptimeS: Double
    public var draining: String?
    public var json: [String: Any] {
        var h: [String: Any] = ["status": status, "uptime_s": uptimeS]
        if let draining { h["draining"] = draining }
        return h
    }
}

public struct StatsReply: Codable, Sendable {
    public var requests: Int, errors: Int, completed: Int, failed: Int
    /// Of `completed`: answered as cancelled (a cancel, a client gone away, a drain timeout).
    public var cancelled: Int
    public var running: Int, queued: Int, admitting: Int
    public var training: String?
    public var steps: Int, generatedTokens: Int, promptTokens: Int, meanBatchRows: Double, uptimeS: Double, rssBytes: Int
    public var adapterCache: CacheStats?
    public var json: [String: Any] {
        var d: [String: Any] = [
            "requests": requests, "errors": errors, "completed": completed, "failed": failed, "cancelled": cancelled,
            "running": running, "queued": queued, "admitting": admitting, "training": training ?? NSNull(),
            "steps": steps, "generated_tokens": generatedTokens, "prompt_tokens": promptTokens,
            "mean_batch_rows": meanBatchRows, "uptime_s": uptimeS, "rss_bytes": rssBytes,
        ]
        if let s = adapterCache {
            d["adapter_cache"] = ["hits": s.hits, "misses": s.misses, "evictions": s.evictions, "entries": s.entries, "bytes": s.bytes, "capacity_bytes": s.capacityBytes]
        }
        return d
    }
}

public struct ShutdownReply: Codable, Sendable {
    public var status: String, inFlight: Int
    public var json: [String: Any] { ["status": status, "in_flight": inFlight] }
}

/// The state both transports share, and a typed handler per method.
///
/// Thread-safe: the scheduler, runtime and training runner lock themselves; the counters and the
/// drain state below are guarded by `lock`.
public final class ServingCore: @unchecked Sendable {
    public let model: LanguageModel
    public let tokenizer: BPETokenizer
    public let runtime: AdapterRuntime
    public let limits: ServerLimits
    let scheduler: Scheduler
    /// The training methods' runner (one at a time, cancel, progress, memory bound, drain).
    public let training: TrainingRunner
    /// The model's chat template (its own, or the documented plain format).
    public let chatTemplate: ChatTemplate
    let started = Scheduler.clock()
    private let lock = NSLock()
    private var requestCount = 0
    private var errorCount = 0
    private var drainReason: String?
    /// Installed training methods; a known one missing here answers that it needs --store.
    public var trainingMethods: [String: TrainingMethod] {
        get { lock.lock(); defer { lock.unlock() }; return methods }
        set { lock.lock(); methods = newValue; lock.unlock() }
    }
    private var methods: [String: TrainingMethod] = [:]
    /// The most bytes one token stands for (see `generate`).
    let maxTokenBytes: Int
    var maxPromptBytesPerToken: Int { maxTokenBytes * (tokenizer.normalizesText ? 4 : 1) }
    private let tokenizeQueue = DispatchQueue(label: "pf2lora.tokenize")
    /// Runs `reload(completion:)` requests, one at a time, off the transports' threads.
    private let reloadQueue = DispatchQueue(label: "pf2lora.reload")
    /// `reload(completion:)` calls not yet answered (under `lock`).
    private var reloading = 0

    public init(model: LanguageModel, tokenizer: BPETokenizer, store: AdapterStore?, unknownClients: UnknownClientPolicy = .refuse,
                limits: ServerLimits = ServerLimits()) {
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits
        _ = model.baseLinears   // the serving layout of the base weights, made now rather than on the first request
        runtime = AdapterRuntime(model: model, store: store, unknownClients: unknownClients)
        scheduler = Scheduler(engine: InferenceEngine(model: model), runtime: runtime, tokenizer: tokenizer, limits: limits)
        training = TrainingRunner()
        maxTokenBytes = max(1, (0..<tokenizer.vocabSize).reduce(0) { max($0, tokenizer.decodeBytes([$1]).count) })
        chatTemplate = (try? ChatTemplate(folder: model.folder)) ?? ChatTemplate.plain
    }

    /// The lock that serializes forward steps; a trainer sharing the model's memory takes it too.
    public var stepLock: NSLock { scheduler.stepLock }

    /// The base model's name (its folder's last component): what HTTP clients pass as `model` for no adapter.
    public var baseName: String { (model.folder as NSString).lastPathComponent }

    public func start() { scheduler.start() }

    // MARK: Accounting and drain

    public func countRequest() { lock.lock(); requestCount += 1; lock.unlock() }
    public func countError() { lock.lock(); errorCount += 1; lock.unlock() }

    /// Why the server is draining (nil: it is not).
    public var draining: String? { lock.lock(); defer { lock.unlock() }; return drainReason }

    /// Stops new work; true the first time (the first reason is kept).
    @discardableResult
    func markDraining(_ reason: String) -> Bool {
        lock.lock(); defer { lock.unlock() }
        guard drainReason == nil else { return false }
        drainReason = reason
        return true
    }

    /// Nothing reserved, queued, running, training or reloading.
    public var isIdle: Bool {
        lock.lock(); let reloads = reloading; lock.unlock()
        return reloads == 0 && scheduler.isIdle && training.isIdle
    }
    public var inFlight: Int {
        lock.lock(); let reloads = reloading; lock.unlock()
        return scheduler.runningCount + scheduler.queueLength + (training.isIdle ? 0 : 1) + reloads
    }

    // MARK: generate

    /// Checks the request (a prompt longer in bytes than any prompt of the token limit is refused
    /// unread), reserves a place in the batch (or throws overloaded / draining), and tokenizes on the
    /// tokenizer thread, which queues the job or answers the prompt's error to `sink`. `id` is the key
    /// `cancel(id:)` finds it by. Throws `RPCError` (invalid params, overloaded) before anything is queued.
    @discardableResult
    public func generate(_ r: GenerateRequest, id: Any? = nil, sink: GenerationSink?) throws -> GenerationHandle {
        if case let .client(c) = r.adapter {
            do { try ClientID.validate(c) } catch { throw AdapterRuntime.rpcError(error) }
            // A client with no adapter is refused here, before anything is queued, for every
            // transport alike (unless unknown clients get the shared pair).
            try runtime.checkServable(client: c)
        }
        let maxTokens = r.maxTokens ?? min(limits.defaultMaxTokens, limits.maxNewTokens)
        guard maxTokens >= 0, maxTokens <= limits.maxNewTokens else {
            throw RPCError(.invalidParams, "max_tokens must be in 0...\(limits.maxNewTokens) (got \(maxTokens))")
        }
        let ctx = model.architecture.contextLength
        let tokenLimit = min(limits.maxPromptTokens, ctx - 1)
        let text: String
        let addSpecial: Bool
        if let ids = r.promptTokens {
            guard r.prompt == nil, r.messagesJSON == nil else { throw RPCError(.invalidParams, "give one of prompt, prompt tokens or messages") }
            guard !ids.isEmpty else { throw RPCError(.invalidParams, "the prompt is an empty token array; give at least one token") }
            guard ids.count <= tokenLimit else {
                throw RPCError(.invalidParams, "the prompt is \(ids.count) tokens; the limit is \(tokenLimit) (context \(ctx)); shorten it")
            }
            let vocab = model.architecture.vocabSize
            if let bad = ids.first(where: { $0 < 0 || $0 >= vocab }) {
                throw RPCError(.invalidParams, "prompt token \(bad) is not in the vocabulary (ids 0..<\(vocab))")
            }
            text = ""; addSpecial = false
        } else if let m = r.messagesJSON {
            guard r.prompt == nil else { throw RPCError(.invalidParams, "give either prompt or messages, not both") }
            let messages: [ChatMessage]
            do { messages = try ChatMessage.openAI(json: m) } catch { throw RPCError(.invalidParams, "\(error)") }
            do { text = try chatTemplate.render(messages: messages, addGenerationPrompt: true) } catch {
                throw RPCError(.invalidParams, "the chat template rejected the messages: \(error)")
            }
            addSpecial = false
        } else {
            guard let p = r.prompt else { throw RPCError(.invalidParams, "params.prompt (a string) is required") }
            text = p; addSpecial = true
        }
        let bytes = text.utf8.count
        guard bytes <= tokenLimit * maxPromptBytesPerToken else {
            throw RPCError(.invalidParams, "the prompt is \(bytes) bytes: more than \(tokenLimit) tokens (the limit, context \(ctx)) whatever it says, as no token stands for more than \(maxTokenBytes) bytes\(tokenizer.normalizesText ? " (\(maxPromptBytesPerToken) before normalization)" : ""); shorten it")
        }
        guard bytes > 0 || r.promptTokens != nil else { throw RPCError(.invalidParams, "params.prompt is empty; give at least one character of text") }
        var sampling = SamplingParams()
        sampling.temperature = r.temperature ?? 1
        sampling.topP = r.topP ?? 1
        sampling.topK = r.topK ?? 0
        sampling.seed = r.seed ?? 0
        do { try sampling.validate() } catch { throw RPCError(.invalidParams, "\(error)") }
        guard r.stop.count <= 16 else { throw RPCError(.invalidParams, "params.stop has \(r.stop.count) entries; at most 16") }
        if let k = r.logprobs { guard k >= 0, k <= 20 else { throw RPCError(.invalidParams, "logprobs must be in 0...20 (got \(k))") } }
        let job = Job(id: id, adapter: r.adapter,
                      request: GenerationRequest(prompt: [], maxTokens: maxTokens, sampling: sampling, stop: r.stop, ignoreEOS: r.ignoreEOS),
                      stream: r.stream, logprobs: r.logprobs, sink: sink)
        try scheduler.reserve(job)
        let given = r.promptTokens
        tokenizeQueue.async { [tokenizer, scheduler] in   // token prompts pass through too, to keep arrival order
            let ids = given ?? tokenizer.encode(text, addSpecialTokens: addSpecial)
            let refusal: RPCError?
            if ids.isEmpty {
                refusal = RPCError(.invalidParams, "params.prompt is empty; give at least one character of text")
            } else if ids.count > tokenLimit {
                refusal = RPCError(.invalidParams, "the prompt is \(ids.count) tokens; the limit is \(tokenLimit) (context \(ctx)); shorten it")
            } else { refusal = nil }
            if let refusal {
                scheduler.abandon(job)
                sink?.failed(refusal)
                return
            }
            scheduler.enqueue(job, prompt: ids)
        }
        return GenerationHandle(job: job, scheduler: scheduler)
    }

    /// Tokens of a text as `generate` counts them (HTTP usage of an echo, tests).
    public func promptTokens(_ text: String) -> [Int] { tokenizer.encode(text) }

    // MARK: cancel

    /// Ends the generate and training requests whose id is `id` (a JSON value: string or number).
    public func cancel(id: Any) -> (methods: [String], generates: Int) {
        var methods: [String] = []
        if let m = training.cancel(id: id) { methods.append(m) }
        let n = scheduler.cancel(id: id)
        if n > 0 { methods.append("generate") }
        return (methods, n)
    }

    // MARK: adapters

    public func adaptersList() throws -> AdaptersListReply {
        guard let store = runtime.store else { return AdaptersListReply(sharedVersion: nil, sharedServing: nil, sharedVersions: [], clients: [], cache: nil) }
        try store.refresh()
        let clients = store.clients().map { clientInfo(store, $0, withRank: false) }
        let st = store.cache.currentStats
        return AdaptersListReply(sharedVersion: store.currentVersion(level: .shared), sharedServing: runtime.sharedVersion,
                                 sharedVersions: store.versions(level: .shared), clients: clients, cache: cacheStats(st))
    }

    /// One client's adapters (nil: the store has none for it).
    public func adapterInfo(client id: String) throws -> ClientInfo? {
        try ClientID.validate(id)
        guard let store = runtime.store else { return nil }
        try store.refresh()
        guard store.currentVersion(level: .client, client: id) != nil || !store.versions(level: .client, client: id).isEmpty else { return nil }
        return clientInfo(store, id, withRank: true)
    }

    func clientInfo(_ store: AdapterStore, _ id: String, withRank: Bool) -> ClientInfo {
        let v = store.currentVersion(level: .client, client: id)
        var rank: Int?
        if withRank, let v, let a = try? store.load(level: .client, client: id, version: v) { rank = a.rank }
        return ClientInfo(id: id, version: v, versions: store.versions(level: .client, client: id),
                          trainedOnShared: v.flatMap { store.trainedOn(client: id, version: $0) },
                          cached: v.map { store.cache.contains(AdapterCache.Key(level: .client, client: id, version: $0)) } ?? false,
                          rank: rank)
    }

    func cacheStats(_ s: AdapterCache.Stats) -> CacheStats {
        CacheStats(hits: s.hits, misses: s.misses, evictions: s.evictions, entries: s.entries, bytes: s.bytes, capacityBytes: s.capacityBytes)
    }

    public func adaptersLoad(_ r: AdapterLoadRequest) throws -> AdapterLoadReply {
        try ClientID.validate(r.client)
        guard let store = runtime.store else { throw RPCError(.unknownClient, "no adapter store is open (start with --store DIR)") }
        try store.refresh()
        guard let v = r.version ?? store.currentVersion(level: .client, client: r.client) else {
            throw RPCError(.unknownClient, "unknown client '\(r.client)': the store has no adapter for it")
        }
        let t0 = Scheduler.clock()
        _ = try runtime.clientPairs(r.client, version: v)
        return AdapterLoadReply(client: r.client, version: v, loadMs: (Scheduler.clock() - t0) * 1000)
    }

    public func adaptersEvict(client id: String) throws -> AdapterEvictReply {
        try ClientID.validate(id)
        return AdapterEvictReply(client: id, evicted: runtime.evict(client: id))
    }

    /// Imports a PEFT LoRA folder as `client`'s next version (a compare-and-swap on the version it
    /// read: a concurrent publish answers a conflict) and loads it into the cache.
    public func importPEFT(client id: String, folder: String) throws -> AdapterLoadReply {
        try ClientID.validate(id)
        guard let store = runtime.store else { throw RPCError(.unknownClient, "no adapter store is open (start with --store DIR)") }
        if let why = store.readOnlyReason { throw RPCError(.trainingFailed, AdapterStoreError.readOnly(store: store.directory, why: why).description) }
        try store.refresh()
        let from = ExpectedVersion(startedFrom: store.currentVersion(level: .client, client: id))
        let adapter = try PEFT.read(folder: folder, base: store.base, level: .client, clientID: id)
        let v = try store.publishClient(id: id, adapter, expecting: from)
        return try adaptersLoad(AdapterLoadRequest(client: id, version: v))
    }

    // MARK: server

    /// `reload` on the reload thread: re-reading the store and folding a new shared version into a
    /// copy of the weights takes seconds for a real model, and no transport's reader or event loop
    /// may wait for it. `completion` runs on the reload thread; until it has returned the reload
    /// counts as work in flight (`isIdle` is false), so a drain waits for its answer.
    public func reload(completion: @escaping @Sendable (Result<ReloadReply, Error>) -> Void) {
        lock.lock(); reloading += 1; lock.unlock()
        reloadQueue.async { [self] in
            completion(Result { try reload() })
            lock.lock(); reloading -= 1; lock.unlock()
        }
    }

    /// `reload` on the caller's thread (see `reload(completion:)` for transports).
    public func reload() throws -> ReloadReply {
        try runtime.refresh(force: true, idle: scheduler.runningCount == 0)
        runtime.waitForFold()
        return ReloadReply(shared: runtime.sharedVersion, clients: runtime.store?.clients().count ?? 0)
    }

    public func health() -> HealthReply {
        let why = draining
        return HealthReply(status: why == nil ? "ok" : "draining", uptimeS: Scheduler.clock() - started, draining: why)
    }

    public func stats() -> StatsReply {
        let c = scheduler.counters
        let waiting = scheduler.waiting
        lock.lock(); let (req, err) = (requestCount, errorCount); lock.unlock()
        return StatsReply(requests: req, errors: err, completed: c.completed, failed: c.failed, cancelled: c.cancelled,
                          running: scheduler.runningCount, queued: waiting.beyondBatch, admitting: waiting.admitting,
                          training: training.running, steps: c.steps, generatedTokens: c.generatedTokens, promptTokens: c.promptTokens,
                          meanBatchRows: c.steps == 0 ? 0 : Double(c.rowsStepped) / Double(c.steps),
                          uptimeS: Scheduler.clock() - started, rssBytes: Server.residentBytes(),
                          adapterCache: runtime.store.map { cacheStats($0.cache.currentStats) })
    }
}
