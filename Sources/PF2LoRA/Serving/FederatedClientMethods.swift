import Foundation

/// Installs `train_local` and `evaluate_local` (DESIGN §7, docs/FLOWER.md): the methods that make a
/// `pf2lora serve` process one client node of a federation driven from outside (a Flower ClientApp).
///
///     {"method":"train_local","params":{"client":"debian","data":"debian",
///      "shared":{"safetensors":"<base64>"},"round":0,"client_index":3,"seed":0,"local_steps":5,
///      "lower_steps":2,"lr":0.002,"lr2":0.05,"lr_factor":1,"rank2":2,"batch":8,"seq":64,"clip":1}}
///     -> {"client":"debian","shared":{"safetensors":"<base64>"},"num_examples":412,"train_loss":3.91,
///         "client_version":4,"shared_version":3,...}
///
/// `shared` is the server's x as adapter bytes, base64: uncompressed safetensors (what a Python peer
/// writes with the `safetensors` package) or the store's zstd file; `{"path": FILE}` instead reads a
/// file of the exchange folder, and `shared_out: FILE` writes the answer's x to a `.safetensors`
/// file there (atomically) instead of inline, for adapters larger than a request line. Both are
/// validated like any adapter file (base model, shapes, values). Like `personalize`, these run on a
/// training thread while the server keeps serving, one training method at a time; bad params answer
/// -32602, a failed round -32005.
///
/// Every path a request carries (`data`, `shared.path`, `shared_out`) is resolved inside the
/// operator's `--exchange-dir` (`ConfinedFolder`: no `..`, no link followed, never into the store,
/// sizes checked before reading); without that flag a request that names a path is refused. Files
/// are read on the training thread, never on the reader thread.
public func installFederatedClient(on server: Server, exchange: ConfinedFolder?) {
    guard let store = server.runtime.store else { return }
    let weights = server.model.weights, tokenizer = server.tokenizer
    let pad = textSeparator(tokenizer)

    /// What a failed round or evaluation answers (an `RPCError` thrown by the work passes as it is).
    func rpcError(_ what: String) -> @Sendable (Error) -> RPCError {
        { error in
            switch error {
            case let e as FederatedClientError: return RPCError(e.isBadInput ? .invalidParams : .trainingFailed, e.description)
            case let e as ClientDataError: return RPCError(.invalidParams, e.description)
            case let e as ConfinedPathError: return RPCError(.invalidParams, e.description)
            case let e as FederatedStoreError: return RPCError(.invalidParams, e.description)
            case let e as AdapterStoreError:
                if case .invalidClientID = e { return RPCError(.invalidParams, e.description) }
                if case .conflict = e { return RPCError(.conflict, "\(what): \(e.description)") }
                return RPCError(.trainingFailed, "\(what): \(e.description)")
            default: return AdapterRuntime.rpcError(error)
            }
        }
    }

    server.trainingMethods["train_local"] = TrainingMethod(params: trainLocalParams) { call in
        let p = call.params
        let client: String, data: [String], shared: SharedSource, out: [String]?, o: LocalRoundOptions
        do {
            client = try clientParam(p)
            data = try dataParam(p, exchange)
            shared = try sharedParam(p, exchange, required: true)!
            out = try sharedOutParam(p, exchange)
            o = try localRoundOptions(p)
        } catch let e as RPCError { call.reply(.failure(e)); return } catch { call.reply(.failure(RPCError(.invalidParams, "\(error)"))); return }
        let what = "train_local of client '\(client)'"
        // A read-only store is served as it is: refused before any training is spent.
        if let why = store.readOnlyReason {
            call.reply(.failure(RPCError(.trainingFailed, "\(what): \(AdapterStoreError.readOnly(store: store.directory, why: why).description)"))); return
        }
        call.spawn(what, thread: "pf2lora.train", mapError: rpcError(what)) { task in
            // Everything that can refuse the request is checked before the store is touched: the
            // output's folder too (it is opened again, the same way, when the answer is written).
            if let out, let exchange {
                let dir = Array(out.dropLast()), shown = out.joined(separator: "/")
                guard try exchange.isFolder(dir, param: "params.shared_out", path: shown) else {
                    throw ConfinedPathError.notFolder(param: "params.shared_out", path: ConfinedPathError.shown(shown))
                }
            }
            let x = try shared.load(base: store.base, sizeLimit: store.sizeLimit)
            let data = try loadExchangeData(exchange!, data, param: "params.data", client: client, tokenizer: tokenizer)
            let r = try trainLocalRound(weights: weights, store: store, client: client, data: data, shared: x, padToken: pad, options: o,
                                        control: task.control)
            log(String(format: "train_local %@: round %d, loss %.4f, client v%d (shared v%@), %.1fs", client, o.round, r.trainLoss,
                       r.clientVersion, r.sharedVersion.map(String.init) ?? "none", r.seconds))
            let bytes = r.shared.safetensors()
            var answer: [String: Any] = [
                "client": client, "round": o.round, "num_examples": r.numExamples, "train_loss": Double(r.trainLoss),
                "client_version": r.clientVersion, "previous_client_version": r.previousClientVersion.map { $0 as Any } ?? NSNull(),
                "shared_version": r.sharedVersion.map { $0 as Any } ?? NSNull(),
                "ranks": r.ranks, "rank_range": [r.ranks.values.min() ?? 0, r.ranks.values.max() ?? 0],
                "seconds": (r.seconds * 1000).rounded() / 1000,
            ]
            if let out, let exchange {
                // The client version is published already; a failed write is reported with that said.
                let path = out.joined(separator: "/")
                do { try exchange.writeAtomically(bytes, to: out, param: "params.shared_out", path: path) } catch let e as ConfinedPathError {
                    throw RPCError(.invalidParams, "\(e.description) (client version \(r.clientVersion) was published; the answer's shared pair was not written)")
                }
                answer["shared"] = ["path": path, "bytes": bytes.count]
            } else {
                answer["shared"] = ["safetensors": bytes.base64EncodedString()]
            }
            return answer
        }
    }

    server.trainingMethods["evaluate_local"] = TrainingMethod(params: evaluateLocalParams) { call in
        let p = call.params
        let client: String, data: [String], shared: SharedSource?, split: Split, seq: Int
        do {
            client = try clientParam(p)
            data = try dataParam(p, exchange)
            shared = try sharedParam(p, exchange, required: false)
            let s = try p.string("split") ?? "valid"
            guard let sp = Split(rawValue: s) else { throw RPCError(.invalidParams, "params.split must be 'train', 'valid' or 'test' (got '\(ConfinedPathError.shown(s))')") }
            split = sp
            seq = try p.int("seq", min: 2, max: 1 << 16) ?? 64
        } catch let e as RPCError { call.reply(.failure(e)); return } catch { call.reply(.failure(RPCError(.invalidParams, "\(error)"))); return }
        let what = "evaluate_local of client '\(client)'"
        call.spawn(what, thread: "pf2lora.train", mapError: rpcError(what)) { task in
            let x = try shared?.load(base: store.base, sizeLimit: store.sizeLimit)
            let data = try loadExchangeData(exchange!, data, param: "params.data", client: client, tokenizer: tokenizer)
            let e = try evaluateLocal(weights: weights, store: store, client: client, data: data, shared: x, split: split,
                                      seqLen: seq, padToken: pad, control: task.control)
            return [
                "client": client, "split": split.rawValue, "loss": Double(e.loss), "perplexity": exp(Double(e.loss)),
                "tokens": e.tokens, "texts": e.texts,
                "client_version": e.clientVersion.map { $0 as Any } ?? NSNull(), "shared_version": e.sharedVersion.map { $0 as Any } ?? NSNull(),
                "ranks": e.ranks, "rank_range": [e.ranks.values.min() ?? 0, e.ranks.values.max() ?? 0],
            ]
        }
    }
}

/// The params `train_local` and `evaluate_local` accept.
public let trainLocalParams = ["client", "data", "shared", "shared_out", "round", "client_index", "seed", "local_steps", "lower_steps",
                        "lr", "lr2", "lr_factor", "rank2", "alpha2", "batch", "seq", "clip", "publish_shared"]
public let evaluateLocalParams = ["client", "data", "shared", "split", "seq"]

private func clientParam(_ p: Params) throws -> String {
    guard let client = try p.string("client") else { throw RPCError(.invalidParams, "params.client (a string) is required") }
    do { try ClientID.validate(client) } catch { throw RPCError(.invalidParams, "\(error)") }
    return client
}

/// A request path's components inside the exchange folder (string work only: nothing is opened here,
/// on the reader thread).
private func exchangePath(_ path: String, _ exchange: ConfinedFolder?, param: String) throws -> [String] {
    guard let exchange else { throw RPCError(.invalidParams, ConfinedPathError.noFolder(param: param).description) }
    do { return try exchange.components(path, param: param) } catch let e as ConfinedPathError { throw RPCError(.invalidParams, e.description) }
}

private func dataParam(_ p: Params, _ exchange: ConfinedFolder?) throws -> [String] {
    guard let d = try p.string("data"), !d.isEmpty else {
        throw RPCError(.invalidParams, "params.data (this client's data folder inside the server's --exchange-dir: train.jsonl, valid.jsonl, test.jsonl) is required")
    }
    return try exchangePath(d, exchange, param: "params.data")
}

/// A client's data folder read through the exchange folder: no link followed, each file size-checked
/// before it is read.
private func loadExchangeData(_ exchange: ConfinedFolder, _ comps: [String], param: String, client: String,
                              tokenizer: BPETokenizer) throws -> ClientTokenData {
    let shown = comps.isEmpty ? "." : comps.joined(separator: "/")
    guard try exchange.isFolder(comps, param: param, path: shown) else { throw ConfinedPathError.notFolder(param: param, path: shown) }
    return try loadClientFiles(folder: param + " '" + ConfinedPathError.shown(shown) + "'", client: client, tokenizer: tokenizer) { name in
        try exchange.read(comps + [name], param: param, path: shown + "/" + name)
    }
}

/// Where `shared` comes from: inline bytes, or a file of the exchange folder (read on the training thread).
private enum SharedSource {
    case inline(String)
    case file(ConfinedFolder, [String])

    func load(base: BaseModelInfo, sizeLimit: Int) throws -> LoRAAdapter {
        let data: Data, name: String
        switch self {
        case let .inline(b64):
            guard let d = Data(base64Encoded: b64) else { throw RPCError(.invalidParams, "params.shared.safetensors is not valid base64") }
            data = d; name = "params.shared"
        case let .file(exchange, comps):
            let path = comps.joined(separator: "/")
            guard let d = try exchange.read(comps, param: "params.shared.path", path: path, limit: sizeLimit) else {
                throw ConfinedPathError.missing(param: "params.shared.path", path: ConfinedPathError.shown(path))
            }
            data = d; name = "params.shared.path '\(ConfinedPathError.shown(path))'"
        }
        do { return try LoRAAdapter.decode(compressedOrPlain: data, name: name, base: base, expectedLevel: .shared, sizeLimit: sizeLimit) } catch {
            throw AdapterRuntime.rpcError(error)
        }
    }
}

/// `shared`: {"safetensors": base64} or {"path": FILE in the exchange folder}; decoded and validated
/// against the store's base on the training thread.
private func sharedParam(_ p: Params, _ exchange: ConfinedFolder?, required: Bool) throws -> SharedSource? {
    guard p.has("shared") else {
        if required { throw RPCError(.invalidParams, "params.shared is required: the server's shared pair as {\"safetensors\": base64} or {\"path\": file}") }
        return nil
    }
    guard let obj = p.dict["shared"] as? [String: Any] else {
        throw RPCError(.invalidParams, "params.shared must be an object: {\"safetensors\": base64 of the adapter bytes} or {\"path\": a file in the exchange folder}")
    }
    if let b64 = obj["safetensors"] as? String { return .inline(b64) }
    if let path = obj["path"] as? String {
        let comps = try exchangePath(path, exchange, param: "params.shared.path")
        return .file(exchange!, comps)
    }
    throw RPCError(.invalidParams, "params.shared needs 'safetensors' (base64) or 'path' (a file in the exchange folder)")
}

/// `shared_out`: a `.safetensors` file in the exchange folder (not hidden), replaced atomically.
private func sharedOutParam(_ p: Params, _ exchange: ConfinedFolder?) throws -> [String]? {
    guard let out = try p.string("shared_out") else { return nil }
    let comps = try exchangePath(out, exchange, param: "params.shared_out")
    guard let name = comps.last, name.hasSuffix(".safetensors"), name.count > ".safetensors".count else {
        throw RPCError(.invalidParams, "params.shared_out '\(ConfinedPathError.shown(out))' must name a file ending in .safetensors inside the exchange folder (it is replaced atomically)")
    }
    return comps
}

private func localRoundOptions(_ p: Params) throws -> LocalRoundOptions {
    var o = LocalRoundOptions()
    if let v = try p.int("round", min: 0, max: 1 << 30) { o.round = v }
    if let v = try p.int("client_index", min: 0, max: 1 << 20) { o.clientIndex = v }
    if let v = try p.uint64("seed") { o.seed = v }
    if let v = try p.int("local_steps", min: 1, max: 100_000) { o.localSteps = v }
    if let v = try p.int("lower_steps", min: 0, max: 100_000) { o.lowerSteps = v }
    if let v = try p.float("lr") { o.lr = v }
    if let v = try p.float("lr2") { o.lr2 = v }
    if let v = try p.float("lr_factor") { o.lrFactor = v }
    if let v = try p.int("rank2", min: 1, max: 256) { o.rank2 = v }
    if let v = try p.float("alpha2") { o.alpha2 = v }
    if let v = try p.int("batch", min: 1, max: 4096) { o.batchSize = v }
    if let v = try p.int("seq", min: 2, max: 1 << 16) { o.seqLen = v }
    if let v = try p.float("clip") { o.clipNorm = v }
    if let v = try p.bool("publish_shared") { o.publishShared = v }
    return o
}
