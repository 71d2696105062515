import Foundation

/// The `personalize` reply object (protocol and CLI).
public func personalizeReply(_ r: PersonalizeResult) -> [String: Any] {
    [
        "client": r.client, "version": r.version,
        "previous_version": r.previousVersion.map { $0 as Any } ?? NSNull(),
        "shared_version": r.sharedVersion.map { $0 as Any } ?? NSNull(),
        "steps": r.steps, "loss": r.loss.map { Double($0) }, "ranks": r.ranks,
        "rank_range": [r.rankRange.min, r.rankRange.max],
        "seconds": (r.seconds * 1000).rounded() / 1000, "texts": r.texts, "tokens": r.tokens,
    ]
}

/// The params `personalize` accepts.
public let personalizeParams = ["client", "texts", "steps", "lr", "max_seconds", "seed", "rank2", "alpha2", "batch", "seq"]

/// Installs the `personalize` method (DESIGN §5) on a server with an adapter store.
///
///     {"method":"personalize","params":{"client":"dana","texts":["...", ...],"steps":100,"lr":0.002,
///      "max_seconds":30,"seed":0,"rank2":2,"batch":8,"seq":64}}
///
/// Training runs on its own thread with its own buffers, reading the server's (read-only) base
/// weights, while the scheduler keeps serving; it does not take the step lock. One training method
/// runs at a time (`TrainingRunner`): another gets -32004 (overloaded). Bad params answer -32602, a
/// failed training -32005, a cancelled one -32006; the store keeps the client's last good version.
public func installPersonalize(on server: Server) {
    guard let store = server.runtime.store else { return }
    let weights = server.model.weights, tokenizer = server.tokenizer
    server.trainingMethods["personalize"] = TrainingMethod(params: personalizeParams) { call in
        let client: String, texts: [String], o: PersonalizeOptions
        do { (client, texts, o) = try parsePersonalizeParams(call.params.dict) } catch let e as RPCError {
            call.reply(.failure(e)); return
        } catch { call.reply(.failure(RPCError(.invalidParams, "\(error)"))); return }
        // A read-only store is served as it is: refused before any training is spent.
        if let why = store.readOnlyReason {
            call.reply(.failure(RPCError(.trainingFailed, "personalize '\(client)': \(AdapterStoreError.readOnly(store: store.directory, why: why).description)"))); return
        }
        call.spawn("personalize of client '\(client)'", thread: "pf2lora.personalize", mapError: { error in
            switch error {
            case let e as PersonalizeError: return RPCError(e.isBadInput ? .invalidParams : .trainingFailed, e.description)
            case let e as AdapterStoreError:
                if case .invalidClientID = e { return RPCError(.invalidParams, e.description) }
                if case .conflict = e { return RPCError(.conflict, "personalize '\(client)': \(e.description)") }
                return RPCError(.trainingFailed, "personalize '\(client)': \(e.description)")
            default: return RPCError(.trainingFailed, "personalize '\(client)': \(error)")
            }
        }) { task in
            let r = try personalize(weights: weights, tokenizer: tokenizer, store: store, client: client, texts: texts, options: o,
                                    control: task.control) { step, loss in
                if step % 20 == 0 { log(String(format: "personalize %@: step %d loss %.4f", client, step, loss)) }
            }
            log(String(format: "personalize %@: published v%d in %.1fs", client, r.version, r.seconds))
            return personalizeReply(r)
        }
    }
}

/// Reads and checks the params of a `personalize` request.
public func parsePersonalizeParams(_ dict: [String: Any]) throws -> (String, [String], PersonalizeOptions) {
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
