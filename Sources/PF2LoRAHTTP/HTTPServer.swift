import Foundation
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import PF2LoRA
import ServiceLifecycle

/// Settings of the HTTP transport (`pf2lora serve --http HOST:PORT`, docs/HTTP.md).
public struct HTTPOptions: Sendable {
    public var host = "127.0.0.1"
    /// 0: any free port (the one bound is logged and passed to `onListening`).
    public var port = 8000
    /// Required as `Authorization: Bearer KEY` on every route but /health (nil: none required,
    /// which is refused on a non-loopback address).
    public var apiKey: String?
    /// The largest request body accepted (413 past it).
    public var maxBodyBytes = 8 << 20
    /// Seconds a request's body may take to arrive (408 past it: slow clients hold no slot for ever).
    public var bodyTimeout: Double = 30
    /// Seconds a connection may sit idle (before its first request, between requests) before it is closed.
    public var idleTimeout: Double = 60
    /// Seconds a request's header may take from its first byte to its end (slow-loris clients are
    /// closed past it, whatever the idle timeout).
    public var headerTimeout: Double = 10
    /// The folder `lora_path` of /v1/load_lora_adapter must be inside (nil: loading is refused).
    public var exchangeDir: String?
    public init() {}

    /// Whether `host` is a loopback address (where serving without a key is allowed).
    public static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host == "::1" || host == "[::1]" || host.hasPrefix("127.")
    }
}

/// An error answered as an OpenAI error object: `{"error": {"message", "type", "param", "code"}}`.
struct APIError: Error {
    let status: HTTPResponse.Status
    let message: String
    let type: String
    let code: String?
    let param: String?
    init(_ status: HTTPResponse.Status, _ message: String, type: String = "invalid_request_error", code: String? = nil, param: String? = nil) {
        self.status = status; self.message = message; self.type = type; self.code = code; self.param = param
    }

    /// The status and type of a method-layer error: 400 bad params, 404 unknown model or client,
    /// 409 version conflict, 429 overloaded (503 while draining), 500 otherwise.
    static func from(_ e: RPCError, draining: Bool) -> APIError {
        switch e.code {
        case .invalidParams:
            // The method layer names a field as JSON-RPC sees it ("params.max_tokens must be ...");
            // over HTTP the field is a top-level one of the body: name it as such, and in `param`.
            if e.message.hasPrefix("params."), let end = e.message.firstIndex(of: " ") {
                let field = String(e.message[e.message.index(e.message.startIndex, offsetBy: 7)..<end])
                if !field.isEmpty, !field.contains(".") {
                    return APIError(.badRequest, String(e.message.dropFirst(7)), param: field)
                }
            }
            return APIError(.badRequest, e.message)
        case .parseError, .invalidRequest, .baseMismatch:
            return APIError(.badRequest, e.message, code: e.code == .baseMismatch ? "base_mismatch" : nil)
        case .methodNotFound: return APIError(.notFound, e.message, type: "not_found_error")
        case .unknownClient: return APIError(.notFound, e.message, type: "not_found_error", code: "model_not_found", param: "model")
        case .conflict: return APIError(.conflict, e.message, type: "conflict_error", code: "version_conflict")
        case .overloaded:
            return draining ? APIError(.serviceUnavailable, e.message, type: "server_error", code: "draining")
                            : APIError(.tooManyRequests, e.message, type: "rate_limit_error", code: "overloaded")
        case .adapterInvalid: return APIError(.internalServerError, e.message, type: "server_error", code: "adapter_invalid")
        case .trainingFailed: return APIError(.internalServerError, e.message, type: "server_error", code: "training_failed")
        case .cancelled: return APIError(.internalServerError, e.message, type: "server_error", code: "cancelled")
        case .internalError: return APIError(.internalServerError, e.message, type: "server_error")
        }
    }

    var body: [String: Any] {
        ["error": ["message": message, "type": type, "param": param ?? NSNull(), "code": code ?? NSNull()] as [String: Any]]
    }
}

/// Collects one generate request's answer (non-streaming) or forwards its events (streaming).
final class HTTPSink: GenerationSink, @unchecked Sendable {   // the continuation is used once, under `lock`
    enum Event { case token(TokenEvent), finished(GenerateResult), failed(RPCError) }
    private let lock = NSLock()
    private let continuation: AsyncStream<Event>.Continuation
    let events: AsyncStream<Event>
    init() {
        (events, continuation) = AsyncStream<Event>.makeStream()
    }
    func token(_ e: TokenEvent) { continuation.yield(.token(e)) }
    func finished(_ r: GenerateResult) { continuation.yield(.finished(r)); continuation.finish() }
    func failed(_ e: RPCError) { continuation.yield(.failed(e)); continuation.finish() }
}

/// The handles of the generate requests one HTTP request started, to cancel them when its client goes away.
final class Handles: @unchecked Sendable {   // guarded by `lock`
    private let lock = NSLock()
    private var handles: [GenerationHandle] = []
    private var cancelled = false
    func add(_ h: GenerationHandle) {
        lock.lock(); handles.append(h); let c = cancelled; lock.unlock()
        if c { h.cancel() }
    }
    func cancelAll() {
        lock.lock(); cancelled = true; let hs = handles; lock.unlock()
        for h in hs { h.cancel() }
    }
}

/// The request context: Hummingbird's basic one plus the connection, whose closing cancels the
/// requests a non-streaming call is waiting for.
public struct PF2LoRARequestContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    let channel: any Channel
    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }
}

/// The OpenAI-compatible HTTP transport: a thin adapter over the method layer (`ServingCore`),
/// sharing its scheduler, batch, adapter cache and training slot with the stdio transport.
public final class HTTPTransport: Sendable {
    public let core: ServingCore
    public let options: HTTPOptions
    let started = Int(Date().timeIntervalSince1970)
    let metricsRegistry = HTTPMetrics()
    private let serviceGroup = GroupBox()

    public init(core: ServingCore, options: HTTPOptions) throws {
        if options.apiKey == nil && !HTTPOptions.isLoopback(options.host) {
            throw HTTPConfigError("refusing to serve HTTP on \(options.host), which is not a loopback address, without an API key: pass --api-key KEY (or set PF2LORA_API_KEY), or bind 127.0.0.1")
        }
        self.core = core; self.options = options
    }

    /// Serves until the task is cancelled; `onListening` gets the bound port.
    public func run(onListening: @escaping @Sendable (Int) -> Void = { _ in }) async throws {
        let responder = CallbackResponder<PF2LoRARequestContext> { [self] req, ctx in
            await self.respond(req, ctx)
        }
        let http1 = HTTP1Channel.Configuration(idleTimeout: .milliseconds(Int64(options.idleTimeout * 1000)),
                                               httpDecoderConfiguration: .init(maxHeaderFieldSize: 16 << 10, maxHeaderListSize: 64 << 10, maxHeaderFieldCount: 100))
        // Logs go to stderr (stdout may carry the stdio protocol), errors only.
        var logger = Logger(label: "pf2lora.http", factory: { StreamLogHandler.standardError(label: $0) })
        logger.logLevel = .error
        let headerTimeout = TimeAmount.milliseconds(Int64(options.headerTimeout * 1000))
        let server = HTTPServerBuilder { responder in GuardedHTTP1Channel(responder: responder, configuration: http1, headerTimeout: headerTimeout) }
        let app = Application(responder: responder, server: server,
                              configuration: .init(address: .hostname(options.host, port: options.port), serverName: "pf2lora"),
                              onServerRunning: { channel in onListening(channel.localAddress?.port ?? 0) },
                              logger: logger)
        let group = ServiceGroup(configuration: .init(services: [app], gracefulShutdownSignals: [], logger: logger))
        serviceGroup.set(group)
        defer { serviceGroup.set(nil) }
        try await group.run()
    }

    /// Stops listening and returns once every response in flight has been written and its connection
    /// closed (or after `timeout` seconds): the end of a drain, after the method layer is idle.
    public func shutdown(timeout: Double = 10) {
        guard let group = serviceGroup.get() else { return }
        let done = DispatchSemaphore(value: 0)
        Task.detached {
            await group.triggerGracefulShutdown()
            while self.serviceGroup.get() != nil { try? await Task.sleep(nanoseconds: 5_000_000) }
            done.signal()
        }
        _ = done.wait(timeout: .now() + timeout)
    }

    // MARK: Routing

    func respond(_ request: Request, _ context: PF2LoRARequestContext) async -> Response {
        let path = request.uri.path
        let method = request.method
        let route = Self.routeName(method, path)
        do {
            if path != "/health", let key = options.apiKey {
                let given = request.headers[.authorization] ?? ""
                guard Self.constantTimeEqual(given, "Bearer " + key) else {
                    throw APIError(.unauthorized, given.isEmpty ? "missing API key: send the header 'Authorization: Bearer KEY'" : "incorrect API key",
                                   type: "authentication_error", code: "invalid_api_key")
                }
            }
            let response: Response
            switch (method, path) {
            case (.get, "/health"): response = health()
            case (.get, "/metrics"): response = metrics()
            case (.get, "/v1/models"): response = try models()
            case (.post, "/v1/completions"): response = try await completions(request, context, chat: false)
            case (.post, "/v1/chat/completions"): response = try await completions(request, context, chat: true)
            case (.post, "/v1/load_lora_adapter"): response = try await loadAdapter(request)
            case (.post, "/v1/unload_lora_adapter"): response = try await unloadAdapter(request)
            case (.post, "/v1/personalize"): response = try await personalize(request, context)
            case (.get, _) where path.hasPrefix("/v1/adapters/"): response = try adapter(String(path.dropFirst("/v1/adapters/".count)))
            case (_, "/health"), (_, "/metrics"), (_, "/v1/models"), (_, "/v1/completions"), (_, "/v1/chat/completions"),
                 (_, "/v1/load_lora_adapter"), (_, "/v1/unload_lora_adapter"), (_, "/v1/personalize"):
                throw APIError(.methodNotAllowed, "\(method) is not allowed on \(path)")
            default:
                throw APIError(.notFound, "no route \(method) \(path); routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter, POST /v1/personalize, GET /v1/adapters/{client}, GET /health, GET /metrics",
                               type: "not_found_error")
            }
            metricsRegistry.request(route: route, outcome: response.status.code < 400 ? "ok" : "\(response.status.code)")
            return response
        } catch let e as APIError {
            metricsRegistry.request(route: route, outcome: "\(e.status.code)")
            return Self.json(e.body, status: e.status)
        } catch let e as RPCError {
            let a = APIError.from(e, draining: core.draining != nil)
            metricsRegistry.request(route: route, outcome: "\(a.status.code)")
            return Self.json(a.body, status: a.status)
        } catch {
            // Store and adapter errors get their protocol code (a bad client id is 400, a conflict 409 ...).
            let a = APIError.from(AdapterRuntime.rpcError(error), draining: core.draining != nil)
            metricsRegistry.request(route: route, outcome: "\(a.status.code)")
            return Self.json(a.body, status: a.status)
        }
    }

    static func routeName(_ method: HTTPRequest.Method, _ path: String) -> String {
        path.hasPrefix("/v1/adapters/") ? "/v1/adapters/{client}" :
            ["/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
             "/v1/unload_lora_adapter", "/v1/personalize"].contains(path) ? path : "other"
    }

    static func constantTimeEqual(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        var diff = x.count ^ y.count
        for i in 0..<max(x.count, y.count) { diff |= Int((i < x.count ? x[i] : 0) ^ (i < y.count ? y[i] : 0)) }
        return diff == 0
    }

    // MARK: Bodies

    /// Reads the body as a JSON object within the size limit and the body timeout.
    func body(_ request: Request) async throws -> [String: Any] {
        let limit = options.maxBodyBytes, timeout = options.bodyTimeout
        let buffer: ByteBuffer = try await withThrowingTaskGroup(of: ByteBuffer?.self) { group in
            group.addTask { try await request.body.collect(upTo: limit + 1) }
            group.addTask { try await Task.sleep(nanoseconds: UInt64(timeout * 1e9)); return nil }
            defer { group.cancelAll() }
            do {
                guard let first = try await group.next(), let b = first else {
                    throw APIError(.requestTimeout, "the request body did not arrive within \(timeout) s", code: "body_timeout")
                }
                return b
            } catch let e as APIError { throw e } catch {
                throw APIError(.contentTooLarge, "the request body is larger than \(limit) bytes (the limit)", code: "body_too_large")
            }
        }
        guard buffer.readableBytes <= limit else {
            throw APIError(.contentTooLarge, "the request body is larger than \(limit) bytes (the limit)", code: "body_too_large")
        }
        let bytes = Array(buffer.readableBytesView)
        if JSONNesting.exceeds(bytes, JSONNesting.maxDepth) {
            throw APIError(.badRequest, "JSON nested deeper than \(JSONNesting.maxDepth) levels", code: "invalid_json")
        }
        guard let obj = try? JSONSerialization.jsonObject(with: Data(bytes), options: [.fragmentsAllowed]) else {
            throw APIError(.badRequest, "the request body is not valid JSON", code: "invalid_json")
        }
        guard let dict = obj as? [String: Any] else { throw APIError(.badRequest, "the request body must be a JSON object", code: "invalid_json") }
        return dict
    }

    static func checkFields(_ d: [String: Any], _ accepted: Set<String>, _ what: String) throws {
        let unknown = d.keys.filter { !accepted.contains($0) }.sorted()
        guard unknown.isEmpty else {
            throw APIError(.badRequest, "unknown field\(unknown.count == 1 ? "" : "s") \(unknown.map { "'\($0)'" }.joined(separator: ", ")) for \(what); accepted: \(accepted.sorted().joined(separator: ", "))",
                           code: "unknown_field", param: unknown[0])
        }
    }

    static func json(_ obj: Any, status: HTTPResponse.Status = .ok) -> Response {
        let data = (try? JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data("{}".utf8)
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }

    /// One server-sent event's JSON (a chunk per token: keys unsorted, as sorting them costs a
    /// locale-aware string comparison per key pair).
    static func encode(_ obj: Any) -> ByteBuffer {
        ByteBuffer(bytes: (try? JSONSerialization.data(withJSONObject: obj, options: [.withoutEscapingSlashes])) ?? Data("{}".utf8))
    }

    // MARK: Models

    /// The adapter a `model` names: the base model's name (or "base"), "shared", or a client id with an adapter in the store.
    func adapterChoice(_ model: String) throws -> AdapterChoice {
        if model == core.baseName || model == "base" { return .base }
        if model == "shared" { return .shared }
        do { try ClientID.validate(model) } catch {
            throw APIError(.notFound, "the model '\(model)' does not exist: give the base model's name '\(core.baseName)', 'shared', or a client id (GET /v1/models lists them)",
                           type: "not_found_error", code: "model_not_found", param: "model")
        }
        // The method layer's rule (the same -32001 text stdio answers, as 404 model_not_found):
        // a client without an adapter is refused unless unknown clients get the shared pair.
        do { try core.runtime.checkServable(client: model) } catch let e as RPCError {
            throw APIError.from(e, draining: core.draining != nil)
        }
        return .client(model)
    }

    func models() throws -> Response {
        let list = try core.adaptersList()
        var data: [[String: Any]] = [
            ["id": core.baseName, "object": "model", "created": started, "owned_by": "pf2lora", "root": core.baseName, "parent": NSNull(),
             "pf2lora": ["kind": "base"]],
            ["id": "shared", "object": "model", "created": started, "owned_by": "pf2lora", "root": core.baseName, "parent": core.baseName,
             "pf2lora": ["kind": "shared", "version": list.sharedServing.map { $0 as Any } ?? NSNull(), "versions": list.sharedVersions]],
        ]
        for c in list.clients {
            data.append(["id": c.id, "object": "model", "created": started, "owned_by": "pf2lora", "root": core.baseName, "parent": core.baseName,
                         "pf2lora": ["kind": "client", "version": c.version.map { $0 as Any } ?? NSNull(), "versions": c.versions,
                                     "trained_on_shared": c.trainedOnShared.map { $0 as Any } ?? NSNull(), "cached": c.cached,
                                     "pinned": core.runtime.store?.cache.isPinned(client: c.id) ?? false]])
        }
        return Self.json(["object": "list", "data": data])
    }

    func adapter(_ client: String) throws -> Response {
        guard let info = try core.adapterInfo(client: client) else {
            throw APIError(.notFound, "client '\(client)' has no adapter in the store", type: "not_found_error", code: "model_not_found")
        }
        var d = info.json
        d["rank"] = info.rank.map { $0 as Any } ?? NSNull()
        d["pinned"] = core.runtime.store?.cache.isPinned(client: client) ?? false
        return Self.json(d)
    }

    // MARK: Completions

    static let completionFields: Set<String> = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                                                "stream_options", "logprobs", "echo", "user", "ignore_eos", "presence_penalty", "frequency_penalty", "best_of"]
    static let chatFields: Set<String> = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                                          "n", "stream", "stream_options", "logprobs", "top_logprobs", "user", "ignore_eos", "presence_penalty",
                                          "frequency_penalty"]

    /// One choice's generate request and how it is shown.
    struct Plan {
        var requests: [GenerateRequest]
        var model: String
        var includeUsage: Bool
        var logprobs: Bool
        /// The prompt each request answers (usage counts a prompt once however many choices it has).
        var promptOf: [Int]
    }

    /// A prompt of /v1/completions: text, or token ids (OpenAI accepts both).
    enum Prompt { case text(String), tokens([Int]) }

    /// `prompt` as OpenAI takes it: a string, a list of strings, a list of token ids, or a list of lists of token ids.
    static func prompts(_ v: Any?) throws -> [Prompt] {
        func tokens(_ x: Any) -> [Int]? {
            guard let a = x as? [Any], !a.isEmpty else { return nil }
            var ids: [Int] = []
            for e in a {
                guard let n = e as? NSNumber, !Params.isBool(n), let i = Int(exactly: n.doubleValue) else { return nil }
                ids.append(i)
            }
            return ids
        }
        let what = "'prompt' must be a string, a non-empty array of strings, an array of token ids, or an array of arrays of token ids"
        switch v {
        case let s as String: return [.text(s)]
        case nil, is NSNull: throw APIError(.badRequest, "'prompt' is required: a string, an array of strings, or token ids", param: "prompt")
        case let a as [Any] where !a.isEmpty:
            if a.allSatisfy({ $0 is String }) { return a.map { .text($0 as! String) } }
            if let ids = tokens(a) { return [.tokens(ids)] }
            var out: [Prompt] = []
            for e in a {
                guard let ids = tokens(e) else { throw APIError(.badRequest, what, param: "prompt") }
                out.append(.tokens(ids))
            }
            return out
        default: throw APIError(.badRequest, what, param: "prompt")
        }
    }

    func plan(_ d: [String: Any], chat: Bool) throws -> Plan {
        try Self.checkFields(d, chat ? Self.chatFields : Self.completionFields, chat ? "/v1/chat/completions" : "/v1/completions")
        let p = Params(d)
        func bad(_ s: String, _ param: String) -> APIError { APIError(.badRequest, s, param: param) }
        guard let model = try p.string("model") else { throw bad("'model' is required: the base model's name '\(core.baseName)', 'shared', or a client id", "model") }
        let adapter = try adapterChoice(model)
        var r = GenerateRequest(adapter: adapter)
        r.maxTokens = try p.int(chat && p.has("max_completion_tokens") ? "max_completion_tokens" : "max_tokens", min: 0, max: core.limits.maxNewTokens)
            ?? (chat ? core.limits.maxNewTokens : nil).map { min($0, core.limits.maxNewTokens) }
        if chat, r.maxTokens == core.limits.maxNewTokens, !p.has("max_tokens"), !p.has("max_completion_tokens") {
            r.maxTokens = min(core.limits.maxNewTokens, max(0, core.model.architecture.contextLength / 2))
        }
        r.temperature = try p.float("temperature")
        r.topP = try p.float("top_p")
        r.topK = try p.int("top_k", min: 0)
        if let k = r.topK, k < 0 { r.topK = 0 }
        // Without a seed every request samples afresh, as OpenAI's and vLLM's servers do: the seed
        // defaulted to 0 (the stdio protocol's documented default), so at temperature > 0 every
        // "regenerate" returned the same text. Choice i still uses seed + i.
        r.seed = try p.uint64("seed") ?? UInt64.random(in: 0..<(1 << 62))
        r.stop = try p.strings("stop", maxCount: 16) ?? []
        r.ignoreEOS = try p.bool("ignore_eos") ?? false
        r.stream = try p.bool("stream") ?? false
        for k in ["presence_penalty", "frequency_penalty"] {
            if let v = try p.float(k), v != 0 { throw bad("\(k) is not supported (only 0)", k) }
        }
        if try p.bool("echo") == true { throw bad("echo is not supported", "echo") }
        let n = try p.int("n", min: 1, max: 16) ?? 1
        if let b = try p.int("best_of", min: 1, max: 16), b != n { throw bad("best_of must equal n (no server-side ranking)", "best_of") }
        var includeUsage = false
        if p.has("stream_options") {
            guard let so = d["stream_options"] as? [String: Any] else { throw bad("stream_options must be an object", "stream_options") }
            guard r.stream else { throw bad("stream_options is only allowed with stream: true", "stream_options") }
            try Self.checkFields(so, ["include_usage"], "stream_options")
            includeUsage = try Params(so).bool("include_usage") ?? false
        }
        var wantLogprobs = false
        if chat {
            wantLogprobs = try p.bool("logprobs") ?? false
            let top = try p.int("top_logprobs", min: 0, max: 20)
            if top != nil && !wantLogprobs { throw bad("top_logprobs needs logprobs: true", "top_logprobs") }
            if wantLogprobs { r.logprobs = top ?? 0 }
            guard let msgs = d["messages"] as? [Any], !msgs.isEmpty, msgs.allSatisfy({ $0 is [String: Any] }),
                  let data = try? JSONSerialization.data(withJSONObject: msgs) else {
                throw bad("'messages' is required: a non-empty array of message objects ({\"role\": ..., \"content\": ...})", "messages")
            }
            r.messagesJSON = String(decoding: data, as: UTF8.self)
            return Plan(requests: (0..<n).map { i in var q = r; q.seed = (r.seed ?? 0) &+ UInt64(i); return q }, model: model,
                        includeUsage: includeUsage, logprobs: wantLogprobs, promptOf: [Int](repeating: 0, count: n))
        }
        if let k = try p.int("logprobs", min: 0, max: 5) { r.logprobs = k; wantLogprobs = true }
        let prompts = try Self.prompts(d["prompt"])
        guard prompts.count * n <= 64 else { throw bad("\(prompts.count) prompts x n \(n) is more than 64 choices", "n") }
        var reqs: [GenerateRequest] = []
        var promptOf: [Int] = []
        for (k, prompt) in prompts.enumerated() {
            for i in 0..<n {
                var q = r
                switch prompt {
                case let .text(t): q.prompt = t
                case let .tokens(ids): q.promptTokens = ids
                }
                q.seed = (r.seed ?? 0) &+ UInt64(i)
                reqs.append(q); promptOf.append(k)
            }
        }
        return Plan(requests: reqs, model: model, includeUsage: includeUsage, logprobs: wantLogprobs, promptOf: promptOf)
    }

    func completions(_ request: Request, _ context: PF2LoRARequestContext, chat: Bool) async throws -> Response {
        let d = try await body(request)
        let plan: Plan
        do { plan = try self.plan(d, chat: chat) } catch let e as RPCError {
            throw e.code == .invalidParams ? APIError.from(e, draining: false) : APIError(.badRequest, e.message)
        }
        let id = (chat ? "chatcmpl-" : "cmpl-") + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased().prefix(24)
        let created = Int(Date().timeIntervalSince1970)
        let handles = Handles()
        var sinks: [HTTPSink] = []
        let t0 = Date()
        do {
            for r in plan.requests {
                let sink = HTTPSink()
                handles.add(try core.generate(r, sink: sink))
                sinks.append(sink)
            }
        } catch {
            handles.cancelAll()
            throw error
        }
        // A client that goes away (closes its socket: an end of input, as Hummingbird allows
        // half-closure, or the channel closing) cancels its requests; a finished request's handle
        // cancels nothing. A streaming request is also cancelled when a write fails.
        let watch = UInt64.random(in: 0...UInt64.max)
        let channel = context.channel
        ClientWatch.watch(channel, id: watch) { handles.cancelAll() }
        if plan.requests.first?.stream == true {
            return stream(plan, sinks: sinks, handles: handles, id: String(id), created: created, chat: chat, t0: t0,
                          done: { ClientWatch.unwatch(channel, id: watch) })
        }
        defer { ClientWatch.unwatch(channel, id: watch) }
        let results: [Result<GenerateResult, RPCError>] = await withTaskCancellationHandler {
            var out: [Result<GenerateResult, RPCError>] = []
            for s in sinks {
                var r: Result<GenerateResult, RPCError> = .failure(RPCError(.internalError, "no answer"))
                for await e in s.events {
                    switch e {
                    case .token: break
                    case let .finished(g): r = .success(g)
                    case let .failed(err): r = .failure(err)
                    }
                }
                out.append(r)
            }
            return out
        } onCancel: { handles.cancelAll() }
        var choices: [[String: Any]] = []
        var promptTokens = 0, completionTokens = 0
        for (i, r) in results.enumerated() {
            let g: GenerateResult
            switch r {
            case let .success(x): g = x
            case let .failure(e): throw e
            }
            completionTokens += g.usage.completionTokens
            // Each prompt counts once however many choices it has (as OpenAI counts n).
            if i == 0 || plan.promptOf[i] != plan.promptOf[i - 1] { promptTokens += g.usage.promptTokens }
            ttft(g)
            let finish = g.finishReason == "length" ? "length" : "stop"
            if chat {
                var c: [String: Any] = ["index": i, "message": ["role": "assistant", "content": g.text], "finish_reason": finish]
                c["logprobs"] = plan.logprobs ? Self.chatLogprobs(g.logprobs ?? []) : NSNull()
                choices.append(c)
            } else {
                var c: [String: Any] = ["index": i, "text": g.text, "finish_reason": finish]
                c["logprobs"] = plan.logprobs ? Self.completionLogprobs(g.logprobs ?? []) : NSNull()
                choices.append(c)
            }
        }
        return Self.json([
            "id": id, "object": chat ? "chat.completion" : "text_completion", "created": created, "model": plan.model,
            "choices": choices, "system_fingerprint": NSNull(),
            "usage": ["prompt_tokens": promptTokens, "completion_tokens": completionTokens, "total_tokens": promptTokens + completionTokens],
        ])
    }

    func ttft(_ g: GenerateResult) {
        metricsRegistry.ttft.record((g.timing.queueMs + g.timing.prefillMs) / 1000)
        metricsRegistry.finished(g)
    }

    static func completionLogprobs(_ lps: [TokenLogprob]) -> [String: Any] {
        var offset = 0
        var offsets: [Int] = []
        for l in lps { offsets.append(offset); offset += l.text.utf16.count }
        return ["tokens": lps.map(\.text), "token_logprobs": lps.map(\.logprob),
                "top_logprobs": lps.map { l in Dictionary(l.top.map { ($0.text, $0.logprob) }, uniquingKeysWith: { a, _ in a }) },
                "text_offset": offsets]
    }

    static func chatLogprobs(_ lps: [TokenLogprob]) -> [String: Any] {
        ["content": lps.map { l -> [String: Any] in
            ["token": l.text, "logprob": l.logprob, "bytes": l.bytes,
             "top_logprobs": l.top.map { ["token": $0.text, "logprob": $0.logprob, "bytes": Array($0.text.utf8).map(Int.init)] as [String: Any] }]
        }]
    }

    /// Server-sent events: one `data: {chunk}` per token, the finish of each choice, the usage when
    /// asked, then `data: [DONE]`. A failed write (the client went away) cancels the requests.
    func stream(_ plan: Plan, sinks: [HTTPSink], handles: Handles, id: String, created: Int, chat: Bool, t0: Date,
                done: @escaping @Sendable () -> Void) -> Response {
        var headers = HTTPFields()
        headers[.contentType] = "text/event-stream"
        headers[.cacheControl] = "no-cache"
        let object = chat ? "chat.completion.chunk" : "text_completion"
        let model = plan.model
        let logprobs = plan.logprobs
        let includeUsage = plan.includeUsage
        let core = self.core
        let metrics = metricsRegistry
        let body = ResponseBody { writer in
            defer { done() }
            func send(_ obj: Any) async throws {
                var b = ByteBuffer(string: "data: ")
                var j = HTTPTransport.encode(obj)
                b.writeBuffer(&j)
                b.writeString("\n\n")
                try await writer.write(b)
            }
            func chunk(_ choice: [String: Any]) -> [String: Any] {
                ["id": id, "object": object, "created": created, "model": model, "choices": [choice], "system_fingerprint": NSNull()]
            }
            // A token's chunk without log-probabilities, written by hand (the per-token cost of the stream).
            let head = "data: {\"id\":\"\(JSONText.escaped(id))\",\"object\":\"\(object)\",\"created\":\(created),\"model\":\"\(JSONText.escaped(model))\",\"system_fingerprint\":null,\"choices\":[{\"index\":"
            func sendText(_ i: Int, _ text: String) async throws {
                var b = ByteBuffer()
                b.reserveCapacity(head.utf8.count + text.utf8.count + 96)
                b.writeString(head)
                b.writeString(chat ? "\(i),\"delta\":{\"content\":\"" : "\(i),\"text\":\"")
                b.writeString(JSONText.escaped(text))
                b.writeString(chat ? "\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n" : "\",\"logprobs\":null,\"finish_reason\":null}]}\n\n")
                try await writer.write(b)
            }
            do {
                try await withTaskCancellationHandler {
                    if chat {
                        for i in sinks.indices {
                            try await send(chunk(["index": i, "delta": ["role": "assistant", "content": ""], "logprobs": NSNull(), "finish_reason": NSNull()]))
                        }
                    }
                    var promptTokens = 0, completionTokens = 0
                    var counted = Set<Int>()
                    var firstTokenAt: [Int: Date] = [:]
                    func handle(_ i: Int, _ e: HTTPSink.Event) async throws {
                        switch e {
                        case let .token(t):
                            if firstTokenAt[i] == nil {
                                firstTokenAt[i] = Date()
                                metrics.ttft.record(Date().timeIntervalSince(t0))
                            }
                            guard !t.text.isEmpty || logprobs else { return }
                            if !logprobs { try await sendText(i, t.text); return }
                            var c: [String: Any] = ["index": i, "finish_reason": NSNull()]
                            if chat {
                                c["delta"] = ["content": t.text]
                                c["logprobs"] = logprobs ? HTTPTransport.chatLogprobs(t.logprob.map { [$0] } ?? []) : NSNull()
                            } else {
                                c["text"] = t.text
                                c["logprobs"] = logprobs ? HTTPTransport.completionLogprobs(t.logprob.map { [$0] } ?? []) : NSNull()
                            }
                            try await send(chunk(c))
                        case let .finished(g):
                            completionTokens += g.usage.completionTokens
                            if counted.insert(plan.promptOf[i]).inserted { promptTokens += g.usage.promptTokens }
                            metrics.finished(g)
                            var c: [String: Any] = ["index": i, "finish_reason": g.finishReason == "length" ? "length" : "stop", "logprobs": NSNull()]
                            if chat { c["delta"] = [String: Any]() } else { c["text"] = "" }
                            try await send(chunk(c))
                        case let .failed(err):
                            let a = APIError.from(err, draining: core.draining != nil)
                            try await send(a.body)
                        }
                    }
                    if sinks.count == 1 {
                        for await e in sinks[0].events { try await handle(0, e) }
                    } else {
                        // Events of all choices, merged in arrival order.
                        let merged = AsyncStream<(Int, HTTPSink.Event)> { cont in
                            let task = Task {
                                await withTaskGroup(of: Void.self) { group in
                                    for (i, s) in sinks.enumerated() {
                                        group.addTask { for await e in s.events { cont.yield((i, e)) } }
                                    }
                                }
                                cont.finish()
                            }
                            cont.onTermination = { _ in task.cancel() }
                        }
                        for await (i, e) in merged { try await handle(i, e) }
                    }
                    if includeUsage {
                        try await send(["id": id, "object": object, "created": created, "model": model, "choices": [Any](),
                                        "usage": ["prompt_tokens": promptTokens, "completion_tokens": completionTokens,
                                                  "total_tokens": promptTokens + completionTokens]])
                    }
                    try await writer.write(ByteBuffer(string: "data: [DONE]\n\n"))
                } onCancel: { handles.cancelAll() }
            } catch {
                handles.cancelAll()
                throw error
            }
            try await writer.finish(nil)
        }
        return Response(status: .ok, headers: headers, body: body)
    }

    // MARK: Adapters and training

    func loadAdapter(_ request: Request) async throws -> Response {
        let d = try await body(request)
        try Self.checkFields(d, ["lora_name", "lora_path", "load_inplace"], "/v1/load_lora_adapter")
        let p = Params(d)
        guard let name = try p.string("lora_name") else { throw APIError(.badRequest, "'lora_name' (the client id) is required", param: "lora_name") }
        guard let path = try p.string("lora_path") else { throw APIError(.badRequest, "'lora_path' (a PEFT folder inside the exchange folder) is required", param: "lora_path") }
        let folder = try confined(path)
        let reply = try await Self.offThread { [core] in try core.importPEFT(client: name, folder: folder) }
        core.runtime.store?.cache.pin(client: name)
        return Self.json(["status": "ok", "message": "Success: LoRA adapter '\(name)' added successfully.", "lora_name": name,
                          "version": reply.version, "load_ms": reply.loadMs, "pinned": true])
    }

    func unloadAdapter(_ request: Request) async throws -> Response {
        let d = try await body(request)
        try Self.checkFields(d, ["lora_name", "lora_int_id"], "/v1/unload_lora_adapter")
        guard let name = try Params(d).string("lora_name") else { throw APIError(.badRequest, "'lora_name' (the client id) is required", param: "lora_name") }
        try ClientID.validate(name)
        guard try core.adapterInfo(client: name) != nil else {
            throw APIError(.notFound, "the LoRA adapter '\(name)' does not exist", type: "not_found_error", code: "model_not_found", param: "lora_name")
        }
        core.runtime.store?.cache.unpin(client: name)
        let r = try core.adaptersEvict(client: name)
        return Self.json(["status": "ok", "message": "Success: LoRA adapter '\(name)' removed successfully.", "lora_name": name, "evicted": r.evicted])
    }

    /// `lora_path` resolved inside the exchange folder (no `..`, no link leaving it).
    func confined(_ path: String) throws -> String {
        guard let dir = options.exchangeDir else {
            throw APIError(.badRequest, "loading adapters over HTTP needs the server started with --exchange-dir DIR (lora_path must be inside it)", param: "lora_path")
        }
        let root = URL(fileURLWithPath: dir).resolvingSymlinksInPath().path
        let full = path.hasPrefix("/") ? path : root + "/" + path
        guard !full.split(separator: "/").contains("..") else { throw APIError(.badRequest, "lora_path must not contain '..'", param: "lora_path") }
        let resolved = URL(fileURLWithPath: full).resolvingSymlinksInPath().path
        guard resolved == root || resolved.hasPrefix(root + "/") else {
            throw APIError(.badRequest, "lora_path '\(path)' is outside the exchange folder \(root)", param: "lora_path")
        }
        return resolved
    }

    func personalize(_ request: Request, _ context: PF2LoRARequestContext) async throws -> Response {
        let d = try await body(request)
        guard let method = core.trainingMethods["personalize"] else {
            throw APIError(.notFound, "personalize is not available: the server has no adapter store (pass --store)", type: "not_found_error")
        }
        try Self.checkFields(d, Set(method.params), "/v1/personalize")
        if let why = core.draining { throw RPCError(.overloaded, "the server is shutting down (\(why)) and takes no new requests") }
        let key = "http-personalize-" + UUID().uuidString
        let training = core.training
        let params = Params(d)
        // A client that goes away cancels the training (see `completions`).
        let watch = UInt64.random(in: 0...UInt64.max)
        ClientWatch.watch(context.channel, id: watch) { _ = training.cancel(id: key) }
        defer { ClientWatch.unwatch(context.channel, id: watch) }
        let outcome: TrainingOutcome = await withTaskCancellationHandler {
            await withCheckedContinuation { (cont: CheckedContinuation<TrainingOutcome, Never>) in
                let once = OnceBox(cont)
                let responder = TrainingResponder(reply: { once.resume(TrainingOutcome(result: $0)) }, progress: nil)
                method.handler(training.call(method: "personalize", params: params, id: key, hasID: true, responder: responder))
            }
        } onCancel: { _ = training.cancel(id: key) }
        switch outcome.result {
        case let .success(v): return Self.json(v)
        case let .failure(e): throw e
        }
    }

    static func offThread<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { cont in
            DispatchQueue.global().async {
                do { cont.resume(returning: try work()) } catch { cont.resume(throwing: error) }
            }
        }
    }

    // MARK: Health and metrics

    func health() -> Response {
        let h = core.health()
        var d: [String: Any] = ["status": h.status, "uptime_s": h.uptimeS]
        if let why = h.draining { d["draining"] = why }
        return Self.json(d, status: h.draining == nil ? .ok : .serviceUnavailable)
    }

    func metrics() -> Response {
        var headers = HTTPFields()
        headers[.contentType] = "text/plain; version=0.0.4; charset=utf-8"
        return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: metricsRegistry.render(core))))
    }
}

/// The running HTTP server's service group (nil once it has stopped).
final class GroupBox: @unchecked Sendable {   // guarded by `lock`
    private let lock = NSLock()
    private var group: ServiceGroup?
    func set(_ g: ServiceGroup?) { lock.lock(); group = g; lock.unlock() }
    func get() -> ServiceGroup? { lock.lock(); defer { lock.unlock() }; return group }
}

/// A training reply (JSON values: immutable) carried across tasks.
struct TrainingOutcome: @unchecked Sendable { let result: Result<[String: Any], RPCError> }

/// Resumes a continuation at most once.
final class OnceBox<T: Sendable>: @unchecked Sendable {   // guarded by `lock`
    private let lock = NSLock()
    private var cont: CheckedContinuation<T, Never>?
    init(_ c: CheckedContinuation<T, Never>) { cont = c }
    func resume(_ v: T) {
        lock.lock(); let c = cont; cont = nil; lock.unlock()
        c?.resume(returning: v)
    }
}

public struct HTTPConfigError: Error, CustomStringConvertible {
    public let description: String
    init(_ s: String) { description = s }
}
