import Foundation

/// Limits that keep the server's memory and latency bounded; past one a request is refused at once.
public struct ServerLimits: Sendable {
    /// Sequences decoded together in one batch.
    public var maxBatch = 32
    /// Requests waiting beyond the batch: a request is refused (overloaded) when the batch is full and
    /// this many already wait. 0: none waits, a request is taken only while the batch has room.
    public var maxQueue = 256
    /// Prompt tokens per request (also bounded by the model's context).
    public var maxPromptTokens = 4096
    /// max_tokens per request: the largest accepted, and the default (with `defaultMaxTokens`) of a
    /// request that gives none.
    public var maxNewTokens = 4096
    /// max_tokens of a request that gives none: min(this, `maxNewTokens`).
    public var defaultMaxTokens = 64
    /// Prompt tokens fed per step across the batch (chunked prefill keeps decode latency bounded);
    /// also the size of each prompt's chunks, which start at multiples of it whatever else runs.
    public var prefillChunk = 256
    /// Every sequence's logits are the same, to the bit, whatever else is in the batch (and so is a
    /// greedy text): decode rows of any width run the pooled decode kernel, whose sums run in one
    /// order per row, and each prompt chunk is its own forward pass. Off (`serve --fast-batching`),
    /// decode steps wider than `InferenceEngine.maxPooledRows` and steps mixing prompt chunks with
    /// decode rows run as one GEMM pass: more tokens per second above 12 sequences, but a sequence's
    /// logits then change in float rounding with the batch, so a near tie can change a greedy text.
    public var batchInvariant = true
    /// Bytes of one request line.
    public var maxLineBytes = 1 << 20
    /// What the sequences' KV caches keep keys and values at; nil: `KVCachePrecision.automatic`
    /// (f16 for a q8_0 base, else f32).
    public var kvCache: KVCachePrecision?
    public init() {}
}

/// A generate request: reserved while its prompt is tokenized, then waiting for, or running in, the batch.
///
/// Shared by the reader, the tokenizer queue and the scheduler thread: `id` is a JSON value
/// (immutable), the other `let`s are values; `request` and `cancelRequested` are written only
/// under the scheduler's lock (`Scheduler.enqueue` sets the tokenized prompt), and read under it or
/// after the scheduler thread took the job from the queue under it.
final class Job: @unchecked Sendable {
    /// The key `cancel` finds it by (the JSON-RPC id; nil: only its handle cancels it).
    let id: Any?
    let adapter: AdapterChoice
    var client: String? { if case let .client(c) = adapter { return c }; return nil }
    /// Its prompt is set when the job is queued (the prompt is tokenized off the reader thread).
    var request: GenerationRequest
    let stream: Bool
    /// Log-probabilities to report per token (nil: none; 0: the chosen token's only).
    let logprobs: Int?
    /// Where its tokens, result or error go (nil: nobody listens, a JSON-RPC notification).
    let sink: GenerationSink?
    let enqueued: Double
    /// A `cancel` asked for it (guarded by the scheduler's lock).
    var cancelRequested = false
    init(id: Any?, adapter: AdapterChoice, request: GenerationRequest, stream: Bool, logprobs: Int? = nil, sink: GenerationSink?) {
        self.id = id; self.adapter = adapter; self.request = request; self.stream = stream; self.logprobs = logprobs; self.sink = sink
        enqueued = Scheduler.clock()
    }
    convenience init(id: Any?, client: String?, request: GenerationRequest, stream: Bool, sink: GenerationSink?) {
        self.init(id: id, adapter: client.map { .client($0) } ?? .shared, request: request, stream: stream, sink: sink)
    }
}

/// A running sequence.
final class Running {
    let job: Job
    let binding: AdapterBinding
    let gen: GenerationState
    var fed = 0              // prompt tokens already in the cache
    let admitted: Double
    var firstToken: Double = 0
    /// Per-token log-probabilities, when the job asked for them.
    var logprobs: [TokenLogprob] = []
    init(job: Job, binding: AdapterBinding, gen: GenerationState) {
        self.job = job; self.binding = binding; self.gen = gen
        admitted = Scheduler.clock()
    }
}

/// Continuous batching: sequences of different clients join and leave one running batch at token
/// boundaries. Each step feeds every running sequence its next token (or a chunk of its prompt),
/// grouped by weight set and client so the engine shares each weight read: every decode row in one
/// pooled pass and each prompt chunk in a pass of its own (`ServerLimits.batchInvariant`: a
/// sequence's logits do not depend on what else runs), or all of them in one pass (`--fast-batching`).
///
/// Shared by the reader, the tokenizer queue, training threads (`stepLock`) and its own thread: every
/// `var` below is read and written only while holding `cond`, the counters only while holding
/// `countersLock`; the engine is used only by the scheduler thread, inside `stepLock`.
final class Scheduler: @unchecked Sendable {
    let engine: InferenceEngine
    let runtime: AdapterRuntime
    let tokenizer: BPETokenizer
    /// The ids that end a generation (the model's and the tokenizer's).
    let eos: Set<Int>
    let limits: ServerLimits
    private let cond = NSCondition()
    /// Jobs whose prompt is being tokenized: they hold a place like queued ones.
    private var reserved: [Job] = []
    private var queue: [Job] = []
    private var running: [Running] = []
    /// Jobs taken from the queue into the batch and not finished yet (being admitted or running).
    private var inBatch: [Job] = []
    private var draining = false
    private var thread: Thread?
    private let done = DispatchSemaphore(value: 0)
    /// Serializes forward steps with anything else that uses the engine's model concurrently.
    let stepLock = NSLock()

    /// Counters for `stats`: written by the scheduler thread, read by the reader thread.
    struct Counters {
        var steps = 0, rowsStepped = 0, completed = 0, failed = 0, generatedTokens = 0, promptTokens = 0
        /// Of `completed`: those answered with finish_reason "cancelled" (a cancel, a client gone away, a drain timeout).
        var cancelled = 0
    }
    private var countersStorage = Counters()
    private let countersLock = NSLock()
    /// A consistent snapshot of the counters (safe from any thread).
    var counters: Counters { countersLock.lock(); defer { countersLock.unlock() }; return countersStorage }
    private func count(_ update: (inout Counters) -> Void) {
        countersLock.lock(); update(&countersStorage); countersLock.unlock()
    }

    static func clock() -> Double { Double(DispatchTime.now().uptimeNanoseconds) * 1e-9 }

    init(engine: InferenceEngine, runtime: AdapterRuntime, tokenizer: BPETokenizer, limits: ServerLimits) {
        self.engine = engine; self.runtime = runtime; self.tokenizer = tokenizer; eos = engine.model.eosTokenIds(tokenizer: tokenizer); self.limits = limits
        if limits.batchInvariant { engine.pooledRowLimit = .max }
    }

    func start() {
        let t = Thread { [weak self] in self?.loop() }
        t.name = "pf2lora.scheduler"
        t.stackSize = 8 << 20
        cond.lock(); thread = t; cond.unlock()
        t.start()
    }

    /// Holds a place for a job whose prompt is still being tokenized, or refuses it at once when the
    /// batch is full and `maxQueue` jobs wait already (reserved ones count as waiting), or the server
    /// is draining. Jobs the batch has room for do not count as waiting, even before the scheduler
    /// thread has moved them in. Follow with `enqueue` or `abandon`.
    func reserve(_ job: Job) throws {
        cond.lock(); defer { cond.unlock() }
        if draining { throw RPCError(.overloaded, "the server is shutting down and takes no new requests; send it to another instance") }
        let room = max(0, limits.maxBatch - inBatch.count)
        let waiting = queue.count + reserved.count
        guard waiting < limits.maxQueue + room else {
            throw RPCError(.overloaded, "the server is overloaded: \(inBatch.count) requests running (--max-batch \(limits.maxBatch)) and \(waiting - room) waiting (--max-queue \(limits.maxQueue)); retry later")
        }
        reserved.append(job)
    }

    /// Queues a reserved job with its tokenized prompt; one cancelled meanwhile is answered as cancelled.
    func enqueue(_ job: Job, prompt: [Int]) {
        cond.lock()
        job.request.prompt = prompt
        reserved.removeAll { $0 === job }
        let cancelled = job.cancelRequested
        if !cancelled { queue.append(job) }
        cond.signal()
        cond.unlock()
        if cancelled { replyCancelledBeforeStart(job) }
    }

    /// Gives up a reserved job (its prompt was refused; the caller answered).
    func abandon(_ job: Job) {
        cond.lock()
        reserved.removeAll { $0 === job }
        cond.signal()
        cond.unlock()
    }

    /// Reserves and queues a job whose request is set (tests, and callers that tokenized already).
    func submit(_ job: Job) throws {
        try reserve(job)
        enqueue(job, prompt: job.request.prompt)
    }

    /// Cancels every job with this id: a waiting one is answered at once (finish_reason "cancelled",
    /// no text), a running one ends at the next step with the text streamed so far. Returns how many.
    func cancel(id: Any?) -> Int {
        cond.lock()
        let waiting = queue.filter { $0.id != nil && sameID($0.id, id) }
        queue.removeAll { q in waiting.contains { $0 === q } }
        var n = waiting.count
        for j in reserved + inBatch where j.id != nil && sameID(j.id, id) && !j.cancelRequested { j.cancelRequested = true; n += 1 }
        cond.signal()
        cond.unlock()
        for j in waiting { replyCancelledBeforeStart(j) }
        return n
    }

    /// Cancels one job (its handle: an HTTP client went away). Returns whether it was still waiting or running.
    @discardableResult
    func cancel(job: Job) -> Bool {
        cond.lock()
        let waiting = queue.contains { $0 === job }
        queue.removeAll { $0 === job }
        var found = waiting
        if !waiting, !job.cancelRequested, (reserved + inBatch).contains(where: { $0 === job }) { job.cancelRequested = true; found = true }
        cond.signal()
        cond.unlock()
        if waiting { replyCancelledBeforeStart(job) }
        return found
    }

    /// Cancels everything (the output broke: no answer can be delivered any more).
    func cancelAll() {
        cond.lock()
        let waiting = queue
        queue.removeAll()
        for j in reserved + inBatch { j.cancelRequested = true }
        cond.signal()
        cond.unlock()
        for j in waiting { replyCancelledBeforeStart(j) }
    }

    private func replyCancelledBeforeStart(_ job: Job) {
        count { $0.completed += 1; $0.cancelled += 1 }
        job.sink?.finished(GenerateResult(text: "", finishReason: FinishReason.cancelled.rawValue,
                                          usage: .init(promptTokens: job.request.prompt.count, completionTokens: 0), adapter: nil,
                                          timing: .init(queueMs: ms(Scheduler.clock() - job.enqueued), prefillMs: 0, decodeMs: 0)))
    }

    /// Stops taking jobs; the scheduler thread ends once every reserved, queued and running one is done.
    func beginDrain() {
        cond.lock()
        draining = true
        cond.signal()
        cond.unlock()
    }

    /// No job reserved, queued or in the batch.
    var isIdle: Bool { cond.lock(); defer { cond.unlock() }; return reserved.isEmpty && queue.isEmpty && inBatch.isEmpty }

    /// Stops taking jobs, finishes every reserved, queued and running one, then returns.
    func drainAndStop() {
        beginDrain()
        cond.lock(); let started = thread != nil; thread = nil; cond.unlock()
        if started { done.wait() }
    }

    /// Requests taken and not yet in the batch (queued or being tokenized).
    var queueLength: Int { cond.lock(); defer { cond.unlock() }; return queue.count + reserved.count }
    /// Requests taken and not yet in the batch, split into those waiting beyond the batch's free
    /// places (what `--max-queue` bounds) and the others (tokenizing or about to be moved in).
    var waiting: (beyondBatch: Int, admitting: Int) {
        cond.lock(); defer { cond.unlock() }
        let all = queue.count + reserved.count, beyond = max(0, all - max(0, limits.maxBatch - inBatch.count))
        return (beyond, all - beyond)
    }
    var runningCount: Int { cond.lock(); defer { cond.unlock() }; return running.count }

    private func loop() {
        while true {
            cond.lock()
            while queue.isEmpty && running.isEmpty && (!draining || !reserved.isEmpty) { cond.wait() }
            if queue.isEmpty && running.isEmpty && reserved.isEmpty && draining { cond.unlock(); break }
            let idle = running.isEmpty
            var admitted: [Job] = []
            while !queue.isEmpty && inBatch.count < limits.maxBatch { let j = queue.removeFirst(); admitted.append(j); inBatch.append(j) }
            let cancelled = running.filter { $0.job.cancelRequested }
            cond.unlock()
            // A cancelled sequence ends between steps with the text released so far.
            for r in cancelled { r.gen.cancel(); finish(r) }
            if !admitted.isEmpty {
                do { try runtime.refresh(idle: idle) } catch {
                    log("serve: adapter refresh failed: \(error)")
                }
            }
            for job in admitted { admit(job) }
            cond.lock(); let batch = running; cond.unlock()
            if !batch.isEmpty { stepOnce(batch) }
        }
        done.signal()
    }

    private func admit(_ job: Job) {
        do {
            let binding = try job.adapter == .base ? AdapterBinding.base(engine.model) : runtime.resolve(client: job.client)
            let req = job.request
            let capacity = min(engine.model.architecture.contextLength, req.prompt.count + max(req.maxTokens, 0) + 1)
            let cache = KVCache(model: engine.model, capacity: capacity, precision: limits.kvCache)
            let gen = GenerationState(request: req, cache: cache, vocabSize: engine.model.architecture.vocabSize,
                                      eosTokens: eos, tokenizer: tokenizer)
            let r = Running(job: job, binding: binding, gen: gen)
            if gen.isFinished { finish(r); return }
            cond.lock(); running.append(r); cond.unlock()
        } catch {
            cond.lock(); inBatch.removeAll { $0 === job }; cond.unlock()
            count { $0.failed += 1 }
            // A notification (no sink) is never answered, not even with an error.
            job.sink?.failed(AdapterRuntime.rpcError(error))
        }
    }

    /// One forward step of `batch` (the running sequences, read under the lock by the caller).
    private func stepOnce(_ batch: [Running]) {
        // Group by weight set and client so the engine's segments are as long as possible.
        let order = batch.sorted {
            let a = (ObjectIdentifier($0.binding.weights).hashValue, $0.binding.client.map { ObjectIdentifier($0).hashValue } ?? 0)
            let b = (ObjectIdentifier($1.binding.weights).hashValue, $1.binding.client.map { ObjectIdentifier($0).hashValue } ?? 0)
            return a < b
        }
        var inputs: [StepInput] = []
        var fedNow: [Int] = []
        var budget = limits.prefillChunk
        var members: [Running] = []
        for r in order {
            let prompt = r.job.request.prompt
            var toks: [Int]
            if r.fed < prompt.count {
                // Chunks of `prefillChunk` tokens from the prompt's start (the last one shorter): where
                // a prompt is cut depends on the prompt alone. The first prompt of a step always fits.
                let n = min(prompt.count - r.fed, max(1, limits.prefillChunk))
                guard n <= budget || budget == limits.prefillChunk else { continue }
                toks = Array(prompt[r.fed..<(r.fed + n)])
                budget -= n
            } else {
                toks = r.gen.pendingInput
            }
            inputs.append(StepInput(cache: r.gen.cache, tokens: toks, weights: r.binding.weights, client: r.binding.client))
            fedNow.append(toks.count)
            members.append(r)
        }
        guard !inputs.isEmpty else { return }
        // The engine passes of this step: batch-invariant, every prompt chunk alone, then every decode
        // row (one token, a 1-token prompt included) in one pooled pass; otherwise one pass for all.
        var passes: [[Int]] = [Array(inputs.indices)]
        if limits.batchInvariant {
            passes = inputs.indices.filter { inputs[$0].tokens.count > 1 }.map { [$0] }
            let decode = inputs.indices.filter { inputs[$0].tokens.count == 1 }
            if !decode.isEmpty { passes.append(decode) }
        }
        let rows = inputs.reduce(0) { $0 + $1.tokens.count }
        count { $0.steps += 1; $0.rowsStepped += rows }
        let V = engine.model.architecture.vocabSize
        stepLock.lock()
        for pass in passes {
            let logits: Tensor
            do { logits = try engine.step(pass.map { inputs[$0] }) } catch {
                // A step failure fails the sequences in it, never the server.
                for i in pass { fail(members[i], RPCError(.internalError, "forward step failed: \(error)")) }
                continue
            }
            for (k, i) in pass.enumerated() { absorb(members[i], fed: fedNow[i], logits: logits.data + k * V, vocabSize: V) }
        }
        stepLock.unlock()
    }

    /// One sequence's share of a step: its prompt progress, or its next token from its logits row.
    private func absorb(_ r: Running, fed: Int, logits row: UnsafeMutablePointer<Float>, vocabSize V: Int) {
        if r.fed < r.job.request.prompt.count {
            r.fed += fed
            count { $0.promptTokens += fed }
            if r.fed < r.job.request.prompt.count { return }
        }
        // Log-probabilities of the model's distribution (before temperature and truncation), as
        // OpenAI and vLLM report them; computed before `accept`, which may scale the row.
        let lse = r.job.logprobs != nil ? Self.logSumExp(row, V) : 0
        var top: [(Int, Float)] = []
        if let k = r.job.logprobs, k > 0 { top = Self.topK(row, V, k) }
        let (tok, delta) = r.gen.accept(logits: row, vocabSize: V)
        count { $0.generatedTokens += 1 }
        if r.firstToken == 0 { r.firstToken = Scheduler.clock() }
        var lp: TokenLogprob?
        if r.job.logprobs != nil {
            let tb = tokenizer.decodeBytes([tok])
            lp = TokenLogprob(token: tok, text: String(decoding: tb, as: UTF8.self), bytes: tb.map(Int.init), logprob: Double(row[tok] - lse),
                              top: top.map { .init(token: $0.0, text: String(decoding: tokenizer.decodeBytes([$0.0]), as: UTF8.self), logprob: Double($0.1 - lse)) })
            r.logprobs.append(lp!)
        }
        if r.job.stream, let sink = r.job.sink {
            sink.token(TokenEvent(text: delta, token: tok, logprob: lp))
        }
        if r.gen.isFinished { finish(r) }
    }

    /// Takes a finished sequence out of the batch (also one that finished as it was admitted).
    private func remove(_ r: Running) {
        cond.lock()
        running.removeAll { $0 === r }
        inBatch.removeAll { $0 === r.job }
        cond.unlock()
    }

    private func finish(_ r: Running) {
        remove(r)
        let cancelled = r.gen.finish == .cancelled
        count { $0.completed += 1; if cancelled { $0.cancelled += 1 } }
        guard let sink = r.job.sink else { return }
        let end = Scheduler.clock()
        let b = r.binding
        let first = r.firstToken == 0 ? end : r.firstToken
        var result = GenerateResult(
            text: r.gen.outputText, finishReason: (r.gen.finish ?? .length).rawValue,
            usage: .init(promptTokens: r.job.request.prompt.count, completionTokens: r.gen.tokens.count),
            adapter: .init(shared: b.sharedVersion, client: b.clientVersion, clientTrainedOnShared: b.clientTrainedOn),
            timing: .init(queueMs: ms(r.admitted - r.job.enqueued), prefillMs: ms(first - r.admitted), decodeMs: ms(end - first)))
        if r.job.logprobs != nil { result.logprobs = r.logprobs }
        sink.finished(result)
    }

    private func fail(_ r: Running, _ e: RPCError) {
        remove(r)
        count { $0.failed += 1 }
        r.job.sink?.failed(e)
    }

    static func logSumExp(_ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var m = -Float.infinity
        for i in 0..<n where x[i] > m { m = x[i] }
        var s: Double = 0
        for i in 0..<n { s += Double(expf(x[i] - m)) }
        return m + Float(log(s))
    }

    /// The k largest entries (index, value), largest first (the first index on ties).
    static func topK(_ x: UnsafePointer<Float>, _ n: Int, _ k: Int) -> [(Int, Float)] {
        var best: [(Int, Float)] = []
        for i in 0..<n {
            if best.count == k, let last = best.last, x[i] <= last.1 { continue }
            var j = best.count
            while j > 0 && best[j - 1].1 < x[i] { j -= 1 }
            best.insert((i, x[i]), at: j)
            if best.count > k { best.removeLast() }
        }
        return best
    }

    private func ms(_ s: Double) -> Double { (s * 1e5).rounded() / 100 }
}

func log(_ s: String) {
    FileHandle.standardError.write((s + "\n").data(using: .utf8)!)
}
