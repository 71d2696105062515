import ArgumentParser
import Foundation
import PF2LoRA

/// `pf2lora personalize`: train one client's level-2 pair on a few texts and publish it (docs/PERSONALIZE.md).
struct PersonalizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "personalize",
        abstract: "Train a new or existing client's own LoRA pair (C, D) on its texts, the shared pair frozen, and publish it as a new version.",
        discussion: """
        --texts is JSONL ({"text": ...} per line) or plain text with one text per blank-line-separated \
        paragraph. A new client starts from C Kaiming-uniform, D = 0; an existing one from its current \
        version. Training is AdamW on (C, D) only. Progress goes to stderr, a JSON summary to stdout. A \
        running `pf2lora serve` on the same store uses the new version from the client's next request.
        """)

    @OptionGroup var options: ModelOptions
    @Option(help: "The client id.") var client: String
    @Option(help: "The client's texts: .jsonl or plain text.") var texts: String
    @Option(help: "Optimizer steps.") var steps: Int = 100
    @Option(name: .customLong("max-seconds"), help: "Stop after this many seconds (whichever of --steps and this comes first).") var maxSeconds: Double?
    @Option(help: "AdamW learning rate.") var lr: Float = PersonalizeOptions().lr
    @Option(help: "Rank of a new client's pair (an existing client keeps its rank).") var rank2: Int?
    @Option(help: "Alpha of a new client's pair (default 2 x rank2).") var alpha2: Float?
    @Option(help: "Windows per step.") var batch: Int = PersonalizeOptions().batchSize
    @Option(help: "Tokens per window (T).") var seq: Int = PersonalizeOptions().seqLen
    @Option(help: "Random seed.") var seed: UInt64 = 0

    func validate() throws {
        guard options.store != nil else { throw ValidationError("personalize needs --store DIR (the adapter store to publish into)") }
        guard steps >= 1 else { throw ValidationError("--steps must be >= 1") }
        if let s = maxSeconds { guard s.isFinite, s > 0 else { throw ValidationError("--max-seconds must be a positive number of seconds") } }
        guard lr.isFinite, lr > 0 else { throw ValidationError("--lr must be a positive number") }
        if let r = rank2 { guard (1...256).contains(r) else { throw ValidationError("--rank2 must be in 1...256") } }
        if let a = alpha2 { guard a.isFinite, a > 0 else { throw ValidationError("--alpha2 must be a positive number") } }
        guard (1...64).contains(batch) else { throw ValidationError("--batch must be in 1...64") }
        guard (2...4096).contains(seq) else { throw ValidationError("--seq must be in 2...4096") }
    }

    func run() throws {
        let (m, tok) = try options.loadModel()
        guard let store = try options.openStore(m, access: .write, create: true, command: "personalize") else { throw CLIError("personalize needs --store DIR") }
        if let why = store.readOnlyReason { throw CLIError(AdapterStoreError.readOnly(store: store.directory, why: why).description) }
        let list: [String]
        do { list = try TextFile.read(texts) } catch { throw CLIError("\(error)") }
        var o = PersonalizeOptions()
        o.steps = steps; o.maxSeconds = maxSeconds; o.lr = lr; o.rank2 = rank2; o.alpha2 = alpha2
        o.batchSize = batch; o.seqLen = seq; o.seed = seed
        let t0 = now()
        let every = max(1, steps / 20)
        let r: PersonalizeResult
        do {
            r = try personalize(weights: m.weights, tokenizer: tok, store: store, client: client, texts: list, options: o) { step, loss in
                if step == 1 || step % every == 0 || step == steps {
                    let el = now() - t0
                    log(String(format: "personalize %@: step %d/%d  loss %.4f  (%.1fs, ~%.0fs left)", client, step, steps, loss, el,
                               el / Double(step) * Double(max(0, steps - step))))
                }
            }
        } catch { throw CLIError("\(error)") }
        print(jsonLine(personalizeReply(r)))
        log(String(format: "personalize %@: published v%d (trained on shared %@) in %.1fs; loss %.4f -> %.4f; ranks %d..%d",
                   client, r.version, r.sharedVersion.map { "v\($0)" } ?? "none", r.seconds, r.loss.first ?? .nan, r.loss.last ?? .nan,
                   r.rankRange.min, r.rankRange.max))
    }
}

/// The `personalize` reply object (protocol and CLI).
func personalizeReply(_ r: PersonalizeResult) -> [String: Any] {
    [
        "client": r.client, "version": r.version,
        "previous_version": r.previousVersion.map { $0 as Any } ?? NSNull(),
        "shared_version": r.sharedVersion.map { $0 as Any } ?? NSNull(),
        "steps": r.steps, "loss": r.loss.map { Double($0) }, "ranks": r.ranks,
        "rank_range": [r.rankRange.min, r.rankRange.max],
        "seconds": (r.seconds * 1000).rounded() / 1000, "texts": r.texts, "tokens": r.tokens,
    ]
}

/// Serializes the training methods of one server (personalize, train_local, evaluate_local): one
/// runs at a time, so training never takes more than its share of the cores from serving.
final class TrainingSlot: @unchecked Sendable {
    private let lock = NSLock()
    private var running: String?
    /// Takes the slot for `what`; returns what holds it instead when it is taken.
    func acquire(_ what: String) -> String? {
        lock.lock(); defer { lock.unlock() }
        if let r = running { return r }
        running = what
        return nil
    }
    func release() { lock.lock(); running = nil; lock.unlock() }

    /// Runs `work` for the method described by `what` on its own thread (named `thread`) holding the
    /// slot, and replies with its result; answers -32004 at once if another training method holds
    /// it. An `RPCError` thrown by `work` is the reply as it is; anything else goes through `mapError`.
    func spawn(_ what: String, thread: String, reply: @escaping (Result<[String: Any], RPCError>) -> Void,
               mapError: @escaping (Error) -> RPCError, _ work: @escaping () throws -> [String: Any]) {
        if let other = acquire(what) {
            reply(.failure(RPCError(.overloaded, "\(other) is already running; one training method runs at a time — retry when it has replied")))
            return
        }
        let t = Thread {
            let outcome: Result<[String: Any], RPCError>
            do { outcome = .success(try work()) } catch let e as RPCError { outcome = .failure(e) } catch { outcome = .failure(mapError(error)) }
            // Free the slot before replying, so a request sent after the reply is never refused as overloaded.
            self.release()
            reply(outcome)
        }
        t.name = thread
        t.stackSize = 8 << 20
        t.start()
    }
}

/// Installs the `personalize` method (DESIGN §5) on a server with an adapter store.
///
///     {"method":"personalize","params":{"client":"dana","texts":["...", ...],"steps":100,"lr":0.002,
///      "max_seconds":30,"seed":0,"rank2":2,"batch":8,"seq":64}}
///
/// Training runs on its own thread with its own buffers, reading the server's (read-only) base
/// weights, while the scheduler keeps serving; it does not take the step lock. One training method
/// runs at a time (`TrainingSlot`): another gets -32004 (overloaded). Bad params answer -32602, a failed training
/// -32005; the store keeps the client's last good version either way.
func installPersonalize(_ server: Server, slot: TrainingSlot) {
    guard let store = server.runtime.store else { return }
    let weights = server.model.weights, tokenizer = server.tokenizer
    server.trainingMethods["personalize"] = { params, reply in
        let client: String, texts: [String], o: PersonalizeOptions
        do { (client, texts, o) = try parsePersonalizeParams(params) } catch let e as RPCError {
            reply(.failure(e)); return
        } catch { reply(.failure(RPCError(.invalidParams, "\(error)"))); return }
        // A read-only store is served as it is: refused before any training is spent.
        if let why = store.readOnlyReason {
            reply(.failure(RPCError(.trainingFailed, "personalize '\(client)': \(AdapterStoreError.readOnly(store: store.directory, why: why).description)"))); return
        }
        slot.spawn("personalize of client '\(client)'", thread: "pf2lora.personalize", reply: reply, mapError: { error in
            switch error {
            case let e as PersonalizeError: return RPCError(e.isBadInput ? .invalidParams : .trainingFailed, e.description)
            case let e as AdapterStoreError:
                if case .invalidClientID = e { return RPCError(.invalidParams, e.description) }
                if case .conflict = e { return RPCError(.conflict, "personalize '\(client)': \(e.description)") }
                return RPCError(.trainingFailed, "personalize '\(client)': \(e.description)")
            default: return RPCError(.trainingFailed, "personalize '\(client)': \(error)")
            }
        }) {
            let r = try personalize(weights: weights, tokenizer: tokenizer, store: store, client: client, texts: texts, options: o) { step, loss in
                if step % 20 == 0 { log(String(format: "personalize %@: step %d loss %.4f", client, step, loss)) }
            }
            log(String(format: "personalize %@: published v%d in %.1fs", client, r.version, r.seconds))
            return personalizeReply(r)
        }
    }
}

/// Reads and checks the params of a `personalize` request.
func parsePersonalizeParams(_ dict: [String: Any]) throws -> (String, [String], PersonalizeOptions) {
    func bad(_ s: String) -> RPCError { RPCError(.invalidParams, s) }
    let p = Params(dict)
    guard let client = try p.string("client") else { throw bad("params.client (a string) is required") }
    do { try ClientID.validate(client) } catch { throw bad("\(error)") }
    guard let raw = dict["texts"] else { throw bad("params.texts (an array of strings) is required") }
    guard let texts = raw as? [Any], texts.allSatisfy({ $0 is String }) else { throw bad("params.texts must be an array of strings") }
    guard texts.count <= 100_000 else { throw bad("params.texts has \(texts.count) texts; the limit is 100000") }
    var o = PersonalizeOptions()
    if let s = try p.int("steps", min: 1, max: 100_000) { o.steps = s }
    if let lr = try p.float("lr") {
        guard lr > 0 else { throw bad("params.lr must be positive") }
        o.lr = lr
    }
    if let s = try p.float("max_seconds") {
        guard s > 0 else { throw bad("params.max_seconds must be positive") }
        o.maxSeconds = Double(s)
        if !p.has("steps") { o.steps = 100_000 }
    }
    if let s = try p.uint64("seed") { o.seed = s }
    if let r = try p.int("rank2", min: 1, max: 256) { o.rank2 = r }
    if let a = try p.float("alpha2") { o.alpha2 = a }
    if let b = try p.int("batch", min: 1, max: 64) { o.batchSize = b }
    if let t = try p.int("seq", min: 2, max: 4096) { o.seqLen = t }
    return (client, texts as! [String], o)
}
