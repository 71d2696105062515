import Foundation
import Synchronization

/// `pf2lora serve`: JSON-RPC 2.0 over stdin/stdout, one object per line (DESIGN §5): a thin adapter
/// over the method layer (`ServingCore`, Methods.swift), which an HTTP transport may share.
///
/// The reader (this thread) parses each line and answers the quick methods itself; `generate` has its
/// prompt tokenized on a tokenizer thread and then goes to the scheduler's continuous batch;
/// `personalize`, `train_local` and `evaluate_local` run on a training thread, `reload` (which may
/// fold a new shared version into a copy of the weights) on a reload thread. A bad line gets its
/// error and never stops the server.
///
/// Draining: EOF on the input, a `shutdown` request, SIGTERM or SIGINT (`handleTerminationSignals`),
/// or a broken output (the reader of stdout went away) stop the server from taking new work: every
/// reserved, queued and running generate and training request finishes and is answered (a training
/// run publishes as usual), then `run` returns 0. Until then requests that would start new work are
/// refused with -32004, the others (`cancel`, `health`, `stats`, ...) are answered; a broken output
/// also cancels the generates (their answers cannot be delivered) and stops reading.
///
/// Threads: `run`'s thread (the reader) alone reads stdin; the method layer (`core`) locks itself
/// (training methods are installed before `run`; `core.reload` runs on the core's reload thread and
/// counts as work in flight until answered); the drain state is read and written only while holding `stateLock`,
/// from the reader, signal-woken or not, and from any thread whose write finds the output broken.
public final class Server: @unchecked Sendable {
    /// The method layer this transport adapts (shared with the HTTP transport when there is one).
    public let core: ServingCore
    public var model: LanguageModel { core.model }
    public var tokenizer: BPETokenizer { core.tokenizer }
    public var runtime: AdapterRuntime { core.runtime }
    public var limits: ServerLimits { core.limits }
    /// Unknown request params are ignored instead of refused (the behaviour before issue 11).
    public let lenient: Bool
    let out: LineWriter
    var scheduler: Scheduler { core.scheduler }
    /// The training methods' runner (one at a time, cancel, progress, memory bound, drain).
    public var training: TrainingRunner { core.training }
    /// Installed training methods; a known one missing here answers that it needs --store.
    public var trainingMethods: [String: TrainingMethod] {
        get { core.trainingMethods }
        set { core.trainingMethods = newValue }
    }
    /// Whether stdin is read (false: the server runs for another transport and drains on a signal only).
    public var readsInput = true
    /// The methods the training layer can install: without their handler (no store), they answer so.
    static let trainingMethodNames = ["personalize", "train_local", "evaluate_local"]
    /// The params each built-in method accepts.
    static let builtinParams: [String: [String]] = [
        "generate": ["prompt", "messages", "client", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "ignore_eos"],
        "cancel": ["id"], "adapters.list": [], "adapters.load": ["client", "version"], "adapters.evict": ["client"],
        "reload": [], "stats": [], "health": [], "shutdown": [],
    ]
    static let methodList = "generate, cancel, personalize, train_local, evaluate_local, adapters.list, adapters.load, adapters.evict, reload, stats, health, shutdown"
    /// Written to wake the reader: by a signal handler, by a broken output.
    private let wakeRead: Int32, wakeWrite: Int32
    private let stateLock = NSLock()
    private var drainStarted = 0.0
    private var outputBroken = false
    /// Seconds a drain waits for the work in flight before cancelling it (every request is still
    /// answered: generates with the text so far, training with -32006, nothing published); nil waits
    /// for everything to finish.
    public var drainTimeout: Double?

    public convenience init(model: LanguageModel, tokenizer: BPETokenizer, store: AdapterStore?, unknownClients: UnknownClientPolicy = .refuse,
                limits: ServerLimits = ServerLimits(), lenient: Bool = false, outputFD: Int32 = 1) {
        self.init(core: ServingCore(model: model, tokenizer: tokenizer, store: store, unknownClients: unknownClients, limits: limits),
                  lenient: lenient, outputFD: outputFD)
    }

    public init(core: ServingCore, lenient: Bool = false, outputFD: Int32 = 1) {
        self.core = core
        self.lenient = lenient
        out = LineWriter(fd: outputFD)
        var fds: [Int32] = [-1, -1]
        if pipe(&fds) == 0 {
            for fd in fds { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        }
        wakeRead = fds[0]; wakeWrite = fds[1]
        out.onBroken = { [weak self] in
            guard let self else { return }
            self.stateLock.lock(); self.outputBroken = true; self.stateLock.unlock()
            self.wake()
        }
    }

    deinit {
        if wakeRead >= 0 { close(wakeRead) }
        if wakeWrite >= 0 && wakeWrite != Server.signalWakeFD.load(ordering: .acquiring) { close(wakeWrite) }
    }

    /// The lock that serializes forward steps; a trainer sharing the model's memory takes it too.
    public var stepLock: NSLock { core.stepLock }

    private func wake() {
        var b: UInt8 = 0
        _ = write(wakeWrite, &b, 1)
    }

    /// Why the server is draining (nil: it is not).
    public var draining: String? { core.draining }

    /// Stops taking new work (see the type's discussion); the first reason is kept.
    public func beginDrain(_ reason: String) {
        guard core.markDraining(reason) else { return }
        stateLock.lock(); drainStarted = Scheduler.clock(); stateLock.unlock()
        wake()   // a drain begun off the reader thread (the HTTP listener failed) must be seen by `run`
        scheduler.beginDrain()
        training.beginDrain(reason)
        let inFlight = scheduler.runningCount + scheduler.queueLength
        let trainingNow = training.running.map { "; \($0) runs until it has replied" } ?? ""
        log("serve: \(reason): draining \(inFlight) generate request\(inFlight == 1 ? "" : "s") in flight\(trainingNow)")
    }

    private var drainStartedAt: Double { stateLock.lock(); defer { stateLock.unlock() }; return drainStarted }

    /// Nothing reserved, queued, running or training.
    var isIdle: Bool { core.isIdle }

    // MARK: Signals

    /// The write end of the serving server's wake pipe, for the signal handler (-1: none).
    static let signalWakeFD = Atomic<Int32>(-1)
    /// Termination signals received.
    static let signalCount = Atomic<Int>(0)

    /// Makes SIGTERM and SIGINT drain this server like EOF (a second one exits at once with status
    /// 128 + signal), and ignores SIGPIPE, so a reader that closes stdout is a drain (`LineWriter`'s
    /// EPIPE) rather than death. For the process's one serving server (`pf2lora serve`); call it
    /// before `run` starts the server's threads, which inherit the signal mask set here.
    public func handleTerminationSignals() {
        signal(SIGPIPE, SIG_IGN)
        // A parent may have started us with these blocked (a thread pool's mask is inherited through
        // posix_spawn): then SIGTERM would stay pending for ever and never drain anything.
        var unblock = sigset_t()
        sigemptyset(&unblock)
        sigaddset(&unblock, SIGTERM)
        sigaddset(&unblock, SIGINT)
        pthread_sigmask(SIG_UNBLOCK, &unblock, nil)
        Server.signalCount.store(0, ordering: .relaxed)
        Server.signalWakeFD.store(wakeWrite, ordering: .releasing)
        let handler: @convention(c) (Int32) -> Void = { sig in
            // Async-signal-safe only: lock-free atomics, write(2), _exit(2).
            if Server.signalCount.add(1, ordering: .relaxed).newValue > 1 { _exit(128 + sig) }
            var b = UInt8(truncatingIfNeeded: sig)
            _ = write(Server.signalWakeFD.load(ordering: .acquiring), &b, 1)
        }
        signal(SIGTERM, handler)
        signal(SIGINT, handler)
    }

    // MARK: Reading

    /// Serves until EOF on `inputFD`, `shutdown`, a termination signal or a broken output, and until
    /// everything in flight has been answered; returns the exit code (0).
    public func run(inputFD: Int32 = 0) -> Int32 {
        core.start()
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        var reader = LineReader(maxLineBytes: limits.maxLineBytes)
        var inputOpen = readsInput
        var cancelledForTimeout = false
        while true {
            stateLock.lock(); let broken = outputBroken; stateLock.unlock()
            if broken && inputOpen {
                // Nobody can read an answer any more: stop reading, cancel the generates, let a
                // training run finish and publish.
                inputOpen = false
                beginDrain("stdout was closed")
                scheduler.cancelAll()
            }
            if draining != nil && isIdle { break }
            if let limit = drainTimeout, !cancelledForTimeout, draining != nil, Scheduler.clock() - drainStartedAt >= limit {
                cancelledForTimeout = true
                log("serve: drain timeout (\(limit) s): cancelling the work still in flight")
                scheduler.cancelAll()
                training.cancelAll()
            }
            var fds = [pollfd(fd: inputOpen ? inputFD : -1, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
            let r = poll(&fds, 2, draining != nil ? 20 : -1)
            if r < 0 && errno != EINTR { if inputOpen { inputOpen = false; beginDrain("cannot poll the input (errno \(errno))") }; continue }
            if fds[1].revents != 0 {
                var sink = [UInt8](repeating: 0, count: 64)
                var sig: UInt8 = 0
                while true {
                    let n = read(wakeRead, &sink, sink.count)
                    if n <= 0 { break }
                    for b in sink[..<n] where b != 0 { sig = b }
                }
                if sig != 0 { beginDrain(sig == UInt8(SIGINT) ? "SIGINT" : sig == UInt8(SIGTERM) ? "SIGTERM" : "signal \(sig)") }
            }
            guard inputOpen, fds[0].revents != 0 else { continue }
            let n = buf.withUnsafeMutableBytes { read(inputFD, $0.baseAddress!, $0.count) }
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            if n <= 0 {
                for line in reader.finish() { dispatch(line) }
                inputOpen = false
                beginDrain(n == 0 ? "end of input" : "cannot read the input (errno \(errno))")
                continue
            }
            for line in reader.feed(buf, count: n) {
                dispatch(line)
                stateLock.lock(); let b = outputBroken; stateLock.unlock()
                if b { break }
            }
        }
        scheduler.drainAndStop()
        training.waitIdle()
        return 0
    }

    private func dispatch(_ line: LineReader.Line) {
        switch line {
        case let .line(bytes): handle(bytes)
        case .overlong:
            core.countError()
            out.error(NSNull(), RPCError(.invalidRequest, "request line longer than \(limits.maxLineBytes) bytes; shorten the prompt or raise --max-line-bytes"))
        }
    }

    /// Handles one line; returns false when it was a `shutdown` (the server then drains).
    @discardableResult
    func handle(_ raw: [UInt8]) -> Bool {
        var line = raw
        if line.last == 0x0D { line.removeLast() }
        if line.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { return true }
        core.countRequest()
        let req: RPCRequest
        switch RPCParser.parse(line) {
        case let .failure(e):
            core.countError()
            // A notification (a valid envelope without an id) is never answered, not even with an error.
            if !e.notification { out.error(e.id, e.error) }
            return true
        case let .success(r): req = r
        }
        do {
            let isTraining = Self.trainingMethodNames.contains(req.method)
            guard isTraining || Self.builtinParams[req.method] != nil else {
                throw RPCError(.methodNotFound, "unknown method '\(req.method)'; methods are \(Self.methodList)")
            }
            let method = isTraining ? trainingMethods[req.method] : nil
            if isTraining && method == nil {
                throw RPCError(.methodNotFound, "\(req.method) is not available: the server has no adapter store (pass --store)")
            }
            if !lenient { try checkParams(req, accepted: method?.params ?? Self.builtinParams[req.method]!) }
            switch req.method {
            case "generate": try generate(req)
            case _ where isTraining:
                if let why = draining { throw RPCError(.overloaded, "the server is shutting down (\(why)) and takes no new requests; send it to another instance") }
                let out = self.out, id = SendableJSON(req.id)
                let responder = TrainingResponder(reply: { r in
                    switch r {
                    case let .success(v): out.result(id.value, v)
                    case let .failure(e): out.error(id.value, e)
                    }
                }, progress: { out.notify("progress", $0) })
                method!.handler(training.call(method: req.method, params: req.params, id: req.id, hasID: req.hasID, responder: responder))
            case "cancel": reply(req, try cancel(req.params))
            case "adapters.list": reply(req, try core.adaptersList().json)
            case "adapters.load":
                let p = req.params
                guard let id = try p.string("client") else { throw RPCError(.invalidParams, "params.client is required") }
                try ClientID.validate(id)
                let version = try p.int("version", min: 1)
                reply(req, try core.adaptersLoad(AdapterLoadRequest(client: id, version: version)).json)
            case "adapters.evict":
                guard let id = try req.params.string("client") else { throw RPCError(.invalidParams, "params.client is required") }
                reply(req, try core.adaptersEvict(client: id).json)
            case "reload": reload(req)
            case "stats": reply(req, core.stats().json)
            case "health": reply(req, core.health().json)
            case "shutdown":
                reply(req, ShutdownReply(status: "shutting down", inFlight: core.inFlight).json)
                beginDrain("shutdown request")
                return false
            default:
                throw RPCError(.methodNotFound, "unknown method '\(req.method)'; methods are \(Self.methodList)")
            }
        } catch {
            core.countError()
            if req.hasID { out.error(req.id, AdapterRuntime.rpcError(error)) }
        }
        return true
    }

    /// `reload` re-reads the store and folds a new shared version on the method layer's reload
    /// thread, so the reader keeps answering while a large model's weights are folded; the drain
    /// waits for its reply (`core.isIdle` counts it).
    private func reload(_ req: RPCRequest) {
        let out = self.out, id = SendableJSON(req.id), hasID = req.hasID
        core.reload { [weak self] r in
            switch r {
            case let .success(v): if hasID { out.result(id.value, v.json) }
            case let .failure(e):
                self?.core.countError()
                if hasID { out.error(id.value, AdapterRuntime.rpcError(e)) }
            }
            self?.wake()
        }
    }

    /// Refuses params the method does not take, naming them and the ones it does.
    private func checkParams(_ req: RPCRequest, accepted: [String]) throws {
        let unknown = req.params.dict.keys.filter { !accepted.contains($0) }.sorted()
        guard !unknown.isEmpty else { return }
        let takes = accepted.isEmpty ? "\(req.method) takes no params" : "\(req.method) accepts \(accepted.joined(separator: ", "))"
        throw RPCError(.invalidParams, "unknown param\(unknown.count == 1 ? "" : "s") \(unknown.map { "'\($0)'" }.joined(separator: ", ")); \(takes) (start the server with --lenient to ignore unknown params)")
    }

    /// `cancel`: ends the generate or training request with that id (see docs/PROTOCOL.md).
    private func cancel(_ p: Params) throws -> [String: Any] {
        guard p.has("id") else { throw RPCError(.invalidParams, "params.id (the id of the request to cancel) is required") }
        let id = p.dict["id"]!
        guard id is String || (id is NSNumber && !Params.isBool(id)) else { throw RPCError(.invalidParams, "params.id must be a string or a number: the id of the request to cancel") }
        let (methods, n) = core.cancel(id: id)
        var r: [String: Any] = ["id": id, "cancelled": !methods.isEmpty]
        if !methods.isEmpty { r["methods"] = methods; r["generates"] = n } else {
            r["reason"] = "no generate or training request with this id is waiting or running (it may have finished)"
        }
        return r
    }

    private func reply(_ req: RPCRequest, _ result: Any) {
        if req.hasID { out.result(req.id, result) }
    }

    /// Reads the params (errors name the field) into a `GenerateRequest` and hands it to the method
    /// layer, which checks it, reserves a place and tokenizes off the reader thread.
    private func generate(_ req: RPCRequest) throws {
        let p = req.params
        // "shared" (a reserved id, never a client's) asks for the shared pair alone, as no client
        // does and as HTTP's model "shared" does.
        let named = try p.string("client")
        let client = named == "shared" ? nil : named
        if let client { try ClientID.validate(client) }
        var messages: String?
        if p.has("messages") {
            guard p.dict["messages"] is [Any],
                  let data = try? JSONSerialization.data(withJSONObject: p.dict["messages"]!, options: [.fragmentsAllowed]) else {
                throw RPCError(.invalidParams, "params.messages must be an array of message objects ({\"role\": ..., \"content\": ...})")
            }
            guard !p.has("prompt") else { throw RPCError(.invalidParams, "give either params.prompt or params.messages, not both") }
            messages = String(decoding: data, as: UTF8.self)
        }
        let prompt = try p.string("prompt")
        guard prompt != nil || messages != nil else { throw RPCError(.invalidParams, "params.prompt (a string) is required") }
        let maxTokens = try p.int("max_tokens", min: 0, max: limits.maxNewTokens)
        let r = GenerateRequest(prompt: prompt, messagesJSON: messages, adapter: client.map { .client($0) } ?? .shared, maxTokens: maxTokens,
                                temperature: try p.float("temperature"), topP: try p.float("top_p"), topK: try p.int("top_k", min: 0),
                                seed: try p.uint64("seed"), stop: try p.strings("stop", maxCount: 16) ?? [],
                                stream: try p.bool("stream") ?? false, ignoreEOS: try p.bool("ignore_eos") ?? false)
        try core.generate(r, id: req.hasID ? req.id : nil, sink: req.hasID ? StdioGenerateSink(out: out, id: req.id) : nil)
    }

    /// Resident set size from /proc/self/statm (0 where unavailable).
    public static func residentBytes() -> Int {
        guard let s = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
        let parts = s.split(separator: " ")
        guard parts.count > 1, let pages = Int(parts[1]) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
}

/// A JSON value (an id as JSONSerialization made it: immutable) carried into a @Sendable closure.
struct SendableJSON: @unchecked Sendable {
    let value: Any?
    init(_ v: Any?) { value = v }
}

/// A stdio generate request's answers: `token` notifications and the JSON-RPC result or error.
final class StdioGenerateSink: GenerationSink, @unchecked Sendable {   // id: an immutable JSON value
    let out: LineWriter
    let id: Any?
    init(out: LineWriter, id: Any?) { self.out = out; self.id = id }
    func token(_ e: TokenEvent) { out.notify("token", ["id": id ?? NSNull(), "text": e.text, "token": e.token]) }
    func finished(_ r: GenerateResult) { out.result(id, r.json) }
    func failed(_ e: RPCError) { out.error(id, e) }
}

/// Splits the input into lines of at most `maxLineBytes` (a CR before the LF not counted); a longer
/// line is refused unread, however it arrives (whole in one read, split across reads, the last line
/// without a newline).
struct LineReader {
    enum Line { case line([UInt8]), overlong }
    let maxLineBytes: Int
    private var line: [UInt8] = []
    private var overlong = false
    init(maxLineBytes: Int) { self.maxLineBytes = maxLineBytes }

    mutating func feed(_ buf: [UInt8], count n: Int) -> [Line] {
        var lines: [Line] = []
        var start = 0
        for i in 0..<n where buf[i] == 0x0A {
            if !overlong { line.append(contentsOf: buf[start..<i]) }
            // A line that arrived whole within one read is measured here (the CR of a CRLF end excluded).
            if line.count - (line.last == 0x0D ? 1 : 0) > maxLineBytes { overlong = true }
            lines.append(overlong ? .overlong : .line(line))
            line.removeAll(keepingCapacity: true)
            overlong = false
            start = i + 1
        }
        if !overlong { line.append(contentsOf: buf[start..<n]) }
        // +1: the CR of a CRLF end may still come before its LF.
        if line.count > maxLineBytes + 1 { overlong = true; line.removeAll() }
        return lines
    }

    /// The last line, without a newline, at EOF.
    mutating func finish() -> [Line] {
        defer { line.removeAll(); overlong = false }
        if overlong || line.count - (line.last == 0x0D ? 1 : 0) > maxLineBytes { return [.overlong] }
        return line.isEmpty ? [] : [.line(line)]
    }
}
