import Foundation

/// A training method the training layer installs on a server (`personalize`, `train_local`,
/// `evaluate_local`): the params it accepts (others are refused unless the server is lenient) and
/// its handler, which checks the params and either replies at once or `spawn`s the work.
public struct TrainingMethod {
    public let params: [String]
    public let handler: (TrainingCall) -> Void
    public init(params: [String], handler: @escaping (TrainingCall) -> Void) {
        self.params = params; self.handler = handler
    }
}

/// Where a training request's answer and progress go (the transport's side of a `TrainingCall`).
public struct TrainingResponder: Sendable {
    /// Called once with the answer.
    public let reply: @Sendable (Result<[String: Any], RPCError>) -> Void
    /// Called with each progress record (`{"id","method","step","steps","loss","elapsed_s"}`); nil: none wanted.
    public let progress: (@Sendable ([String: Any]) -> Void)?
    public init(reply: @escaping @Sendable (Result<[String: Any], RPCError>) -> Void, progress: (@Sendable ([String: Any]) -> Void)?) {
        self.reply = reply; self.progress = progress
    }
}

/// One request of a training method, as its handler gets it. `id` is a JSON value (NSNumber or
/// NSString as JSONSerialization made it, immutable), the rest are values and the runner.
public struct TrainingCall: @unchecked Sendable {
    public let method: String
    public let params: Params
    let id: Any?
    /// The caller wants the answer (a JSON-RPC request with an id, any HTTP request).
    let hasID: Bool
    let runner: TrainingRunner
    let responder: TrainingResponder

    /// Answers at once (a param error); a notification gets nothing.
    public func reply(_ result: Result<[String: Any], RPCError>) { runner.reply(self, result) }

    /// Runs `work` on its own thread (named `thread`) holding the server's one training slot, and
    /// replies with its result. Refused at once with -32004 while another training method runs or the
    /// server drains. An `RPCError` thrown by `work` is the reply as it is; a cancel (`TrainingCancelled`
    /// from `TrainingTask.step`) answers -32006 with the steps done; a `TrainingMemoryError` -32602;
    /// anything else goes through `mapError`. The server's drain waits for the reply.
    public func spawn(_ what: String, thread: String, mapError: @escaping @Sendable (Error) -> RPCError,
                      _ work: @escaping @Sendable (TrainingTask) throws -> [String: Any]) {
        runner.spawn(self, what: what, thread: thread, mapError: mapError, work)
    }
}

/// Thrown by `TrainingTask.step` when the request was cancelled; nothing is published.
public struct TrainingCancelled: Error, CustomStringConvertible {
    public let step: Int
    public let steps: Int
    public var description: String { "cancelled after step \(step) of \(steps)" }
}

/// A training request in progress: the work calls `step` between steps, which throws once the
/// request was cancelled and sends `progress` notifications.
public final class TrainingTask: @unchecked Sendable {
    public let what: String
    public let method: String
    let id: Any?
    let hasID: Bool
    private let progress: (@Sendable ([String: Any]) -> Void)?
    private let interval: Double
    /// The memory bound of the server (`--max-train-mb`), for `control`.
    public let maxStateBytes: Int?
    private let lock = NSLock()
    private var cancelled = false
    private var lastProgress = -Double.infinity
    private var losses: [Double] = []
    private var lastStep = 0
    private let started = Scheduler.clock()

    init(what: String, method: String, id: Any?, hasID: Bool, progress: (@Sendable ([String: Any]) -> Void)?, interval: Double, maxStateBytes: Int?) {
        self.what = what; self.method = method; self.id = id; self.hasID = hasID; self.progress = progress
        self.interval = interval; self.maxStateBytes = maxStateBytes
    }

    public var isCancelled: Bool { lock.lock(); defer { lock.unlock() }; return cancelled }
    func cancel() { lock.lock(); cancelled = true; lock.unlock() }

    /// After step `step` of at most `steps` with its loss: throws `TrainingCancelled` once the request
    /// was cancelled; otherwise sends `{"method":"progress","params":{"id","method","step","steps",
    /// "loss","elapsed_s"}}` for the first and last step and at most every `progressInterval` seconds
    /// between (never for a notification, which has no id to report against).
    public func step(_ step: Int, of steps: Int, loss: Float) throws {
        let now = Scheduler.clock()
        lock.lock()
        lastStep = step
        losses.append(loss.isFinite ? Double(loss) : .nan)
        let isCancelled = cancelled
        let due = hasID && progress != nil && !isCancelled && (step == 1 || step >= steps || now - lastProgress >= interval)
        if due { lastProgress = now }
        lock.unlock()
        if isCancelled { throw TrainingCancelled(step: step, steps: steps) }
        if due {
            progress?(["id": id ?? NSNull(), "method": method, "step": step, "steps": steps,
                                    "loss": loss.isFinite ? Double(loss) : NSNull(), "elapsed_s": ((now - started) * 1000).rounded() / 1000])
        }
    }

    /// A `TrainingControl` for the library's training functions: this task's memory bound and `step`.
    public var control: TrainingControl {
        TrainingControl(maxStateBytes: maxStateBytes) { [self] s, n, l in try self.step(s, of: n, loss: l) }
    }

    /// The steps done and their losses (for a cancelled reply).
    var record: [String: Any] {
        lock.lock(); defer { lock.unlock() }
        return ["steps_done": lastStep, "loss": losses.map { $0.isFinite ? $0 as Any : NSNull() }]
    }
}

/// Runs the training methods of one server, one at a time (so training never takes more than its
/// share of the cores from serving), each on its own thread; tracks them for `cancel` and for the
/// drain, which waits until every spawned method has replied.
///
/// Every `var` is read and written only while holding `cond`.
public final class TrainingRunner: @unchecked Sendable {
    /// `--max-train-mb` in bytes (nil: unbounded).
    public var maxStateBytes: Int? {
        get { cond.lock(); defer { cond.unlock() }; return maxBytes }
        set { cond.lock(); maxBytes = newValue; cond.unlock() }
    }
    /// Seconds between two progress notifications of one request.
    public var progressInterval: Double {
        get { cond.lock(); defer { cond.unlock() }; return interval }
        set { cond.lock(); interval = newValue; cond.unlock() }
    }
    private let cond = NSCondition()
    private var maxBytes: Int?
    private var interval = 0.25
    private var current: TrainingTask?
    private var active = 0
    private var drainReason: String?
    private var started = 0

    init() {}

    /// A call of `method` whose answer and progress go to `responder`; `id` is the key `cancel` finds it by.
    public func call(method: String, params: Params, id: Any?, hasID: Bool, responder: TrainingResponder) -> TrainingCall {
        TrainingCall(method: method, params: params, id: id, hasID: hasID, runner: self, responder: responder)
    }

    func reply(_ call: TrainingCall, _ result: Result<[String: Any], RPCError>) {
        guard call.hasID else { return }
        call.responder.reply(result)
    }

    /// Training requests spawned since start (for /metrics).
    public var jobsStarted: Int { cond.lock(); defer { cond.unlock() }; return started }

    func spawn(_ call: TrainingCall, what: String, thread name: String, mapError: @escaping @Sendable (Error) -> RPCError,
               _ work: @escaping @Sendable (TrainingTask) throws -> [String: Any]) {
        cond.lock()
        if let why = drainReason {
            cond.unlock()
            reply(call, .failure(RPCError(.overloaded, "the server is shutting down (\(why)) and takes no new requests; send it to another instance")))
            return
        }
        if let other = current {
            cond.unlock()
            reply(call, .failure(RPCError(.overloaded, "\(other.what) is already running; one training method runs at a time — retry when it has replied")))
            return
        }
        let task = TrainingTask(what: what, method: call.method, id: call.id, hasID: call.hasID, progress: call.responder.progress,
                                interval: interval, maxStateBytes: maxBytes)
        current = task
        active += 1
        started += 1
        cond.unlock()
        let t = Thread { [self] in
            let outcome: Result<[String: Any], RPCError>
            do { outcome = .success(try work(task)) } catch let e as RPCError { outcome = .failure(e) } catch let c as TrainingCancelled {
                log("serve: \(what) \(c); nothing was published")
                outcome = .failure(RPCError(.cancelled, "\(what) was cancelled after step \(c.step) of \(c.steps); nothing was published", data: task.record))
            } catch let m as TrainingMemoryError {
                outcome = .failure(RPCError(.invalidParams, "\(call.method): \(m.description)"))
            } catch { outcome = .failure(mapError(error)) }
            // Free the slot before replying, so a request sent after the reply is never refused as overloaded.
            cond.lock(); current = nil; cond.unlock()
            reply(call, outcome)
            cond.lock(); active -= 1; cond.broadcast(); cond.unlock()
        }
        t.name = name
        t.stackSize = 8 << 20
        t.start()
    }

    /// Cancels the running training request with this id; returns its method, or nil.
    public func cancel(id: Any?) -> String? {
        cond.lock(); defer { cond.unlock() }
        guard let t = current, t.hasID, sameID(t.id, id) else { return nil }
        t.cancel()
        return t.method
    }

    /// Cancels whatever training request runs (a drain that timed out).
    func cancelAll() {
        cond.lock(); current?.cancel(); cond.unlock()
    }

    /// New training requests are refused from now on.
    func beginDrain(_ reason: String) {
        cond.lock(); if drainReason == nil { drainReason = reason }; cond.unlock()
    }

    /// Nothing spawned is still to reply.
    var isIdle: Bool { cond.lock(); defer { cond.unlock() }; return active == 0 }
    var running: String? { cond.lock(); defer { cond.unlock() }; return current?.what }

    func waitIdle() {
        cond.lock()
        while active > 0 { cond.wait() }
        cond.unlock()
    }
}

/// Whether two JSON-RPC ids are the same request id (strings equal, or numbers equal).
func sameID(_ a: Any?, _ b: Any?) -> Bool {
    switch (a, b) {
    case let (x as String, y as String): return x == y
    case let (x as NSNumber, y as NSNumber): return !Params.isBool(x) && !Params.isBool(y) && x == y
    case (is NSNull, is NSNull): return true
    default: return false
    }
}
