import Foundation

/// `pf2lora serve`: JSON-RPC 2.0 over stdin/stdout, one object per line (DESIGN §5).
///
/// The reader (this thread) parses each line and answers the quick methods itself; `generate` goes
/// to the scheduler's continuous batch, `personalize`, `train_local` and `evaluate_local` to a
/// training thread. A bad line gets its error and never stops the server; EOF or `shutdown` drains
/// in-flight work and returns 0.
public final class Server {
    public let model: LanguageModel
    public let tokenizer: BPETokenizer
    public let runtime: AdapterRuntime
    public let limits: ServerLimits
    let out: LineWriter
    let scheduler: Scheduler
    let started = Scheduler.clock()
    private var requests = 0
    private var errors = 0
    /// A method the training layer installs (`personalize`, `train_local`, `evaluate_local`): it gets
    /// the params and replies once, from any thread, while the server keeps serving.
    public typealias MethodHandler = (_ params: [String: Any], _ reply: @escaping (Result<[String: Any], RPCError>) -> Void) -> Void
    /// The installed training methods; a method missing here answers that it needs --store.
    public var trainingMethods: [String: MethodHandler] = [:]
    /// The methods the training layer can install: without their handler (no store), they answer so.
    static let trainingMethodNames = ["personalize", "train_local", "evaluate_local"]

    public init(model: LanguageModel, tokenizer: BPETokenizer, store: AdapterStore?, strictClients: Bool = false,
                limits: ServerLimits = ServerLimits(), outputFD: Int32 = 1) {
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits
        _ = model.baseLinears   // the serving layout of the base weights, made now rather than on the first request
        runtime = AdapterRuntime(model: model, store: store, strict: strictClients)
        out = LineWriter(fd: outputFD)
        scheduler = Scheduler(engine: InferenceEngine(model: model), runtime: runtime, tokenizer: tokenizer, out: out, limits: limits)
    }

    /// The lock that serializes forward steps; a trainer sharing the model's memory takes it too.
    public var stepLock: NSLock { scheduler.stepLock }

    /// Serves until EOF on `inputFD` or a `shutdown` request; returns the exit code.
    public func run(inputFD: Int32 = 0) -> Int32 {
        scheduler.start()
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        var line: [UInt8] = []
        var overlong = false
        var stop = false
        while !stop {
            let n = buf.withUnsafeMutableBytes { read(inputFD, $0.baseAddress!, $0.count) }
            if n < 0 { if errno == EINTR { continue }; break }
            if n == 0 { break }
            var start = 0
            for i in 0..<n where buf[i] == 0x0A {
                if !overlong { line.append(contentsOf: buf[start..<i]) }
                // A line that arrived whole within one read is measured here (the CR of a CRLF end excluded).
                if line.count - (line.last == 0x0D ? 1 : 0) > limits.maxLineBytes { overlong = true }
                if overlong {
                    errors += 1
                    out.error(NSNull(), RPCError(.invalidRequest, "request line longer than \(limits.maxLineBytes) bytes; shorten the prompt or raise --max-line-bytes"))
                } else if handle(line) == false {
                    stop = true
                }
                line.removeAll(keepingCapacity: true)
                overlong = false
                start = i + 1
                if stop { break }
            }
            if stop { break }
            if !overlong { line.append(contentsOf: buf[start..<n]) }
            // +1: the CR of a CRLF end may still come before its LF.
            if line.count > limits.maxLineBytes + 1 { overlong = true; line.removeAll() }
        }
        if !stop && (overlong || line.count - (line.last == 0x0D ? 1 : 0) > limits.maxLineBytes) {
            errors += 1
            out.error(NSNull(), RPCError(.invalidRequest, "request line longer than \(limits.maxLineBytes) bytes; shorten the prompt or raise --max-line-bytes"))
        } else if !stop && !line.isEmpty { _ = handle(line) }
        scheduler.drainAndStop()
        return 0
    }

    /// Handles one line; returns false when the server should stop reading (shutdown).
    func handle(_ raw: [UInt8]) -> Bool {
        var line = raw
        if line.last == 0x0D { line.removeLast() }
        if line.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { return true }
        requests += 1
        let req: RPCRequest
        switch RPCParser.parse(line) {
        case let .failure(e):
            errors += 1
            // A notification (a valid envelope without an id) is never answered, not even with an error.
            if !e.notification { out.error(e.id, e.error) }
            return true
        case let .success(r): req = r
        }
        do {
            switch req.method {
            case "generate": try generate(req)
            case let name where Self.trainingMethodNames.contains(name):
                guard let h = trainingMethods[name] else { throw RPCError(.methodNotFound, "\(name) is not available: the server has no adapter store (pass --store)") }
                let id = req.id, hasID = req.hasID
                h(req.params.dict) { [out] result in
                    guard hasID else { return }
                    switch result {
                    case let .success(v): out.result(id, v)
                    case let .failure(e): out.error(id, e)
                    }
                }
            case "adapters.list": reply(req, try adaptersList())
            case "adapters.load": reply(req, try adaptersLoad(req.params))
            case "adapters.evict": reply(req, try adaptersEvict(req.params))
            case "reload":
                try runtime.refresh(force: true, idle: scheduler.runningCount == 0)
                runtime.waitForFold()
                reply(req, ["shared": runtime.sharedVersion.map { $0 as Any } ?? NSNull(), "clients": runtime.store?.clients().count ?? 0])
            case "stats": reply(req, stats())
            case "health": reply(req, ["status": "ok", "uptime_s": Scheduler.clock() - started])
            case "shutdown":
                reply(req, ["status": "shutting down", "in_flight": scheduler.runningCount + scheduler.queueLength])
                return false
            default:
                throw RPCError(.methodNotFound, "unknown method '\(req.method)'; methods are generate, personalize, train_local, evaluate_local, adapters.list, adapters.load, adapters.evict, reload, stats, health, shutdown")
            }
        } catch {
            errors += 1
            if req.hasID { out.error(req.id, AdapterRuntime.rpcError(error)) }
        }
        return true
    }

    private func reply(_ req: RPCRequest, _ result: Any) {
        if req.hasID { out.result(req.id, result) }
    }

    private func generate(_ req: RPCRequest) throws {
        let p = req.params
        let client = try p.string("client")
        if let client { try ClientID.validate(client) }
        guard let prompt = try p.string("prompt") else { throw RPCError(.invalidParams, "params.prompt (a string) is required") }
        let ids = tokenizer.encode(prompt)
        guard !ids.isEmpty else { throw RPCError(.invalidParams, "params.prompt is empty; give at least one character of text") }
        let maxTokens = try p.int("max_tokens", min: 0, max: limits.maxNewTokens) ?? min(limits.defaultMaxTokens, limits.maxNewTokens)
        let ctx = model.architecture.contextLength
        guard ids.count <= limits.maxPromptTokens, ids.count < ctx else {
            throw RPCError(.invalidParams, "the prompt is \(ids.count) tokens; the limit is \(min(limits.maxPromptTokens, ctx - 1)) (context \(ctx)); shorten it")
        }
        var sampling = SamplingParams()
        sampling.temperature = try p.float("temperature") ?? 1
        sampling.topP = try p.float("top_p") ?? 1
        sampling.topK = try p.int("top_k", min: 0) ?? 0
        sampling.seed = try p.uint64("seed") ?? 0
        do { try sampling.validate() } catch { throw RPCError(.invalidParams, "\(error)") }
        let stop = try p.strings("stop", maxCount: 16) ?? []
        let stream = try p.bool("stream") ?? false
        let ignoreEOS = try p.bool("ignore_eos") ?? false
        let job = Job(id: req.hasID ? req.id : nil, client: client,
                      request: GenerationRequest(prompt: ids, maxTokens: maxTokens, sampling: sampling, stop: stop, ignoreEOS: ignoreEOS),
                      stream: stream)
        try scheduler.submit(job)
    }

    private func adaptersList() throws -> [String: Any] {
        guard let store = runtime.store else { return ["shared": NSNull(), "clients": []] }
        try store.refresh()
        let clients: [[String: Any]] = store.clients().map { id in
            let v = store.currentVersion(level: .client, client: id)
            var d: [String: Any] = ["id": id, "version": v.map { $0 as Any } ?? NSNull(), "versions": store.versions(level: .client, client: id)]
            if let v, let t = store.trainedOn(client: id, version: v) { d["trained_on_shared"] = t }
            d["cached"] = v.map { store.cache.contains(AdapterCache.Key(level: .client, client: id, version: $0)) } ?? false
            return d
        }
        let st = store.cache.currentStats
        return ["shared": ["version": store.currentVersion(level: .shared).map { $0 as Any } ?? NSNull(),
                           "serving": runtime.sharedVersion.map { $0 as Any } ?? NSNull(),
                           "versions": store.versions(level: .shared)],
                "clients": clients,
                "cache": ["entries": st.entries, "bytes": st.bytes, "capacity_bytes": st.capacityBytes]]
    }

    private func adaptersLoad(_ p: Params) throws -> [String: Any] {
        guard let id = try p.string("client") else { throw RPCError(.invalidParams, "params.client is required") }
        try ClientID.validate(id)
        guard let store = runtime.store else { throw RPCError(.unknownClient, "no adapter store is open (start with --store DIR)") }
        try store.refresh()
        let wanted = try p.int("version", min: 1) ?? store.currentVersion(level: .client, client: id)
        guard let v = wanted else { throw RPCError(.unknownClient, "unknown client '\(id)': the store has no adapter for it") }
        let t0 = Scheduler.clock()
        _ = try runtime.clientPairs(id, version: v)
        return ["client": id, "version": v, "load_ms": (Scheduler.clock() - t0) * 1000]
    }

    private func adaptersEvict(_ p: Params) throws -> [String: Any] {
        guard let id = try p.string("client") else { throw RPCError(.invalidParams, "params.client is required") }
        try ClientID.validate(id)
        return ["client": id, "evicted": runtime.evict(client: id)]
    }

    private func stats() -> [String: Any] {
        let c = scheduler.counters
        var d: [String: Any] = [
            "requests": requests, "errors": errors,
            "completed": c.completed, "failed": c.failed,
            "running": scheduler.runningCount, "queued": scheduler.queueLength,
            "steps": c.steps, "generated_tokens": c.generatedTokens, "prompt_tokens": c.promptTokens,
            "mean_batch_rows": c.steps == 0 ? 0 : Double(c.rowsStepped) / Double(c.steps),
            "uptime_s": Scheduler.clock() - started,
            "rss_bytes": Self.residentBytes(),
        ]
        if let store = runtime.store {
            let s = store.cache.currentStats
            d["adapter_cache"] = ["hits": s.hits, "misses": s.misses, "evictions": s.evictions, "entries": s.entries, "bytes": s.bytes, "capacity_bytes": s.capacityBytes]
        }
        return d
    }

    /// Resident set size from /proc/self/statm (0 where unavailable).
    public static func residentBytes() -> Int {
        guard let s = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
        let parts = s.split(separator: " ")
        guard parts.count > 1, let pages = Int(parts[1]) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
}
