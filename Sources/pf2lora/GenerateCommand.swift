import ArgumentParser
import Foundation
import Synchronization
import PF2LoRA
import PF2LoRAHTTP

/// Options that open a model, its tokenizer and optionally an adapter store.
struct ModelOptions: ParsableArguments {
    @Option(help: "Model folder in Hugging Face layout (config.json of a supported family, model.safetensors, tokenizer.json or vocab.json + merges.txt).")
    var model: String = "models/debian-llama"
    @Option(help: "Adapter store folder (DESIGN §4): personalize and federate publish into it and need it; generate and serve apply its adapters, and serve the base model alone without it.")
    var store: String?
    @Option(help: "Which base folder of the store to use (default: the one named after the model folder). Errors that find none say which bases the store holds.")
    var base: String?
    @Option(help: "Threads (0 = PF2LORA_THREADS, else every core).")
    var threads: Int = 0
    @Option(help: ArgumentHelp(WeightsOption.help, valueName: "auto|f32|f16|bf16|q8_0"))
    var weights = "auto"
    @Option(name: .customLong("kv-cache"), help: ArgumentHelp(KVCacheOption.help, valueName: "auto|f32|f16"))
    var kvCache = "auto"

    func validate() throws {
        guard threads >= 0 else { throw ValidationError("--threads must be >= 0 (0 = OpenBLAS's default, all cores)") }
        _ = try WeightsOption.parse(weights)
        _ = try KVCacheOption.parse(kvCache)
    }

    /// `--kv-cache` for `m` (auto resolved).
    func kvCachePrecision(_ m: LanguageModel) throws -> KVCachePrecision {
        try KVCacheOption.parse(kvCache) ?? .automatic(for: m)
    }

    func loadModel() throws -> (LanguageModel, BPETokenizer) {
        BLAS.setThreads(threads)
        let m = try LanguageModel.load(folder: model, precision: try WeightsOption.parse(weights))
        for f in m.base.fallbacks { log("weights: \(f)") }
        let tok = try BPETokenizer(folder: model)
        guard tok.vocabSize <= m.architecture.vocabSize else {
            throw CLIError("\(model): the tokenizer has \(tok.vocabSize) tokens but the model's vocab_size is \(m.architecture.vocabSize); they do not belong together")
        }
        return (m, tok)
    }

    /// Opens `--store` for this model: `.read` (generate) creates and changes nothing and needs the
    /// store to hold this base; `.write` with `create` (personalize, federate) makes a missing store;
    /// `.write` without it (serve) needs the root to exist and makes the base folder at its first
    /// publish. What the open's reconcile found goes to stderr, prefixed with `command`.
    func openStore(_ m: LanguageModel, access: StoreAccess, create: Bool, command: String, cacheBytes: Int = 256 << 20) throws -> AdapterStore? {
        guard let store else { return nil }
        let info = try BaseModelInfo.load(folder: m.folder)
        let s: AdapterStore
        do { s = try AdapterStore.open(root: store, base: info, folder: base, access: access, create: create, cacheBytes: cacheBytes) } catch let e as AdapterStoreError {
            throw CLIError(e.description)
        }
        logStoreOpen(s, command: command)
        return s
    }
}

struct GenerateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate",
        abstract: "Continue a prompt; prints the continuation (not the prompt) to stdout as it is generated.",
        discussion: """
            Statistics go to stderr. --temperature 0 is greedy. With --store, the store's shared pair is \
            applied, and with --client that client's two-level adapter (a client the store has no adapter \
            for is an error: omit --client for the shared pair alone). The store is only read: nothing in \
            it is created or changed.

            Instead of --prompt, --messages takes a JSON array of chat messages \
            ('[{"role": "user", "content": "Hi"}]'): they are rendered with the model's chat template \
            (tokenizer_config.json, as transformers' apply_chat_template; the plain "Role: content" format of \
            docs/CHAT.md for models without one) with the assistant generation prompt, and the continuation is \
            the assistant's reply.
            """)

    @OptionGroup var options: ModelOptions
    @Option(help: "The prompt text.")
    var prompt: String?
    @Option(help: ArgumentHelp("Chat messages as a JSON array, rendered with the model's chat template (instead of --prompt).", valueName: "JSON"))
    var messages: String?
    @Option(name: .customLong("max-tokens"), help: "Tokens to generate at most.")
    var maxTokens: Int = 64
    @Option(help: "Sampling temperature, >= 0 (0 = greedy; the larger, the flatter).")
    var temperature: Double = 0.8
    @Option(name: .customLong("top-k"), help: "Sample from the k most likely tokens only (0 = off).")
    var topK: Int = 0
    @Option(name: .customLong("top-p"), help: "Nucleus sampling: smallest set of tokens with probability >= p (1 = off).")
    var topP: Float = 0.95
    @Option(help: "Random seed: the same seed gives the same text.")
    var seed: UInt64 = 0
    @Option(help: "Stop when this string appears (repeatable); it is not printed.")
    var stop: [String] = []
    @Option(help: "Client id whose adapter to use (needs --store).")
    var client: String?
    @Flag(name: .customLong("ignore-eos"), help: "Keep going past the end-of-text token.")
    var ignoreEOS = false

    /// The sampling options; a temperature beyond Float's range is as flat as Float's largest.
    var sampling: SamplingParams {
        SamplingParams(temperature: Float(min(temperature, Double(Float.greatestFiniteMagnitude))), topK: topK, topP: topP, seed: seed)
    }

    func validate() throws {
        guard rawArgumentIsValidUTF8(option: "--prompt") else { throw ValidationError("--prompt is not valid UTF-8; pass the text in UTF-8") }
        guard (prompt == nil) != (messages == nil) else { throw ValidationError("give either --prompt TEXT or --messages JSON (one of them)") }
        guard maxTokens >= 0 else { throw ValidationError("--max-tokens must be >= 0") }
        guard temperature.isFinite, temperature >= 0 else { throw ValidationError("--temperature must be a number >= 0 (0 is greedy)") }
        guard topK >= 0 else { throw ValidationError("--top-k must be >= 0 (0 turns it off)") }
        guard topP.isFinite, topP > 0, topP <= 1 else { throw ValidationError("--top-p must be in (0, 1] (1 turns it off)") }
        guard client == nil || options.store != nil else { throw ValidationError("--client needs --store DIR (the adapter store)") }
    }

    func run() throws {
        let (m, tok) = try options.loadModel()
        let sampling = self.sampling
        let ids: [Int]
        if let messages {
            // The template writes the special tokens (BOS) itself.
            let text = try ChatTemplate(folder: options.model).render(messages: try ChatMessage.openAI(json: messages), addGenerationPrompt: true)
            ids = tok.encode(text, addSpecialTokens: false)
        } else {
            ids = tok.encode(prompt ?? "")
        }
        guard !ids.isEmpty else { throw CLIError("the prompt is empty; give at least one character of text") }
        guard ids.count < m.architecture.contextLength else {
            throw CLIError("the prompt is \(ids.count) tokens but the model's context is \(m.architecture.contextLength); shorten the prompt")
        }
        var binding = AdapterBinding.base(m)
        if let store = try options.openStore(m, access: .read, create: false, command: "generate") {
            // A client given must have an adapter: a mistyped id is an error, not a silent fallback
            // to the shared pair (omit --client for the shared pair alone).
            if let client {
                try ClientID.validate(client)
                guard store.currentVersion(level: .client, client: client) != nil else {
                    let known = store.clients()
                    throw CLIError("store \(store.directory) has no adapter for client '\(client)' (\(known.isEmpty ? "it has no clients" : "clients: " + known.prefix(10).joined(separator: ", ") + (known.count > 10 ? ", … (\(known.count))" : ""))); omit --client for the shared pair alone")
                }
            }
            let runtime = AdapterRuntime(model: m, store: store)
            try runtime.prepare()
            do { binding = try runtime.resolve(client: client) } catch { throw CLIError(AdapterRuntime.rpcError(error).message) }
        }
        let engine = InferenceEngine(model: m)
        let cache = KVCache(architecture: m.architecture, capacity: min(m.architecture.contextLength, ids.count + maxTokens + 1),
                            precision: try options.kvCachePrecision(m))
        let gen = GenerationState(request: GenerationRequest(prompt: ids, maxTokens: maxTokens, sampling: sampling, stop: stop, ignoreEOS: ignoreEOS),
                                  cache: cache, vocabSize: m.architecture.vocabSize, eosTokens: m.eosTokenIds(tokenizer: tok), tokenizer: tok)
        let t0 = now()
        var tFirst = t0
        let stdout = FileHandle.standardOutput
        while !gen.isFinished {
            let logits = try engine.step([StepInput(cache: cache, tokens: gen.pendingInput, weights: binding.weights, client: binding.client)])
            if gen.isPrefill { tFirst = now() }
            let (_, delta) = gen.accept(logits: logits.data, vocabSize: m.architecture.vocabSize)
            if !delta.isEmpty { stdout.write(Data(delta.utf8)) }
        }
        stdout.write(Data("\n".utf8))
        let t1 = now()
        let n = gen.tokens.count
        log(String(format: "generate: %d prompt tokens in %.1f ms, %d new tokens in %.1f ms (%.1f tok/s), finish: %@, adapter: shared %@ client %@",
                   ids.count, (tFirst - t0) * 1000, n, (t1 - tFirst) * 1000, Double(max(n - 1, 0)) / max(t1 - tFirst, 1e-9),
                   gen.finish?.rawValue ?? "?", binding.sharedVersion.map { "v\($0)" } ?? "none", binding.clientVersion.map { "v\($0)" } ?? "none"))
    }
}

struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve many clients over JSON-RPC 2.0 on stdin/stdout (one JSON object per line).",
        discussion: """
        Methods: generate, cancel, personalize, train_local, evaluate_local, adapters.list, adapters.load, \
        adapters.evict, reload, stats, health, shutdown (train_local and evaluate_local make this \
        process a federated client node, see docs/FLOWER.md). Responses and `token` notifications go to stdout, logs to stderr. Requests \
        of different clients are batched together (continuous batching); a new adapter version in the \
        store is used by the client's next request without a restart. EOF on stdin, `shutdown`, SIGTERM \
        or SIGINT drain: no new work is taken, everything in flight (training included) finishes and \
        is answered, then the server exits 0; a second signal exits at once. See docs/PROTOCOL.md for \
        every method, parameter and error code.

        --http HOST:PORT also serves the OpenAI-compatible HTTP API (completions, chat completions, \
        models, vLLM's load/unload_lora_adapter, personalize, health, metrics; docs/HTTP.md) from the \
        same batch, cache and training slot; stdin is then read only with --stdio.
        """)

    @OptionGroup var options: ModelOptions
    @Flag(name: .customLong("unknown-clients-get-shared"), help: "Serve a generate for a client with no adapter in the store the shared pair alone (adapter.client null; DESIGN §5). By default such a client is an error (-32001, HTTP 404) naming the store's closest clients; ask for the shared pair alone with client \"shared\" (HTTP model \"shared\").")
    var unknownClientsGetShared = false
    @Flag(name: .customLong("strict-clients"), help: ArgumentHelp("Deprecated, no effect: refusing unknown clients is now the default.", visibility: .hidden))
    var strictClients = false
    @Option(name: .customLong("max-batch"), help: "Sequences decoded together.")
    var maxBatch = 32
    @Option(name: .customLong("max-queue"), help: "Requests waiting while the batch is full; past them new requests are refused as overloaded (0: none waits, requests are taken only while the batch has room).")
    var maxQueue = 256
    @Option(name: .customLong("max-prompt-tokens"), help: "Longest prompt accepted, in tokens.")
    var maxPromptTokens = 4096
    @Option(name: .customLong("max-new-tokens"), help: "Largest max_tokens accepted; a request without max_tokens gets min(64, this).")
    var maxNewTokens = 4096
    @Option(name: .customLong("max-line-bytes"), help: "Longest request line accepted.")
    var maxLineBytes = 1 << 20
    @Option(name: .customLong("cache-mb"), help: "Byte budget of the decompressed-adapter LRU cache, in MiB (0 = no cache: every request loads its adapter from the store).")
    var cacheMB = 256
    @Option(name: .customLong("exchange-dir"), help: "The folder train_local/evaluate_local requests may name files in (data folders, shared.path, shared_out); paths are resolved inside it, never following links, never into the store. Without it, requests that name a path are refused.")
    var exchangeDir: String?
    @Option(name: .customLong("exchange-max-mb"), help: "The largest file a request may make the server read from the exchange folder, in MiB.")
    var exchangeMaxMB = 1024
    @Option(name: .customLong("max-train-mb"), help: "Largest training state (activations for batch x seq) a personalize, train_local or evaluate_local may take, in MiB; a larger request is refused with the figure before anything is allocated (0: no bound).")
    var maxTrainMB = 2048
    @Flag(help: "Ignore unknown request params (by default they are refused with -32602 naming them).")
    var lenient = false
    @Flag(name: .customLong("fast-batching"), help: "Decode batches wider than 12 sequences, and prompts arriving together, as one GEMM pass: a sequence's logits then change in float rounding with what else is in the batch, so a greedy text may differ (by default every sequence gets the same bits whatever else runs). Not faster at decode since the wide pooled kernel (measured at 16-32 sequences, 1 thread; Benchmarks/README.md).")
    var fastBatching = false
    @Option(name: .customLong("http"), help: ArgumentHelp("Serve the OpenAI-compatible HTTP API on HOST:PORT (port 0: any free port, logged). Loopback unless --api-key is given.", valueName: "HOST:PORT"))
    var http: String?
    @Flag(name: .customLong("stdio"), help: "With --http: also read JSON-RPC requests on stdin (without --http stdin is always read).")
    var stdio = false
    @Option(name: .customLong("api-key"), help: "With --http: require 'Authorization: Bearer KEY' (default: the PF2LORA_API_KEY environment variable).")
    var apiKey: String?
    @Option(name: .customLong("http-max-body-mb"), help: "With --http: the largest request body, in MiB (413 past it).")
    var httpMaxBodyMB = 8
    @Option(name: .customLong("http-body-timeout"), help: "With --http: seconds a request body may take to arrive (408 past it).")
    var httpBodyTimeout = 30.0
    @Option(name: .customLong("http-idle-timeout"), help: "With --http: seconds an idle connection (before its first request or between requests) is kept.")
    var httpIdleTimeout = 60.0
    @Option(name: .customLong("http-header-timeout"), help: "With --http: seconds a request header may take from its first byte (slow clients are closed past it).")
    var httpHeaderTimeout = 10.0
    @Option(name: .customLong("drain-timeout"), help: "Seconds a drain (EOF, shutdown, SIGTERM, SIGINT) waits for the work in flight before cancelling it; every request is still answered (default: wait for all of it).")
    var drainTimeout: Double?

    func validate() throws {
        guard maxBatch >= 1, maxQueue >= 0, maxPromptTokens >= 1, maxNewTokens >= 0, maxLineBytes >= 64 else {
            throw ValidationError("limits must be positive (max-line-bytes at least 64)")
        }
        let memoryMB = Int(ProcessInfo.processInfo.physicalMemory >> 20)
        try Self.require("--cache-mb", Double(cacheMB), 0...Double(memoryMB), "this machine's memory in MiB; 0 turns the cache off")
        try Self.require("--max-train-mb", Double(maxTrainMB), 0...Double(1 << 30), "0: no bound")
        guard !(strictClients && unknownClientsGetShared) else {
            throw ValidationError("--strict-clients (deprecated: refusing unknown clients is the default) contradicts --unknown-clients-get-shared; drop one")
        }
        if let t = drainTimeout { try Self.require("--drain-timeout", t, 0...1e9, "seconds") }
        try Self.require("--exchange-max-mb", Double(exchangeMaxMB), 1...Double(1 << 20))
        if let http { _ = try Self.hostPort(http) }
        try Self.require("--http-max-body-mb", Double(httpMaxBodyMB), 1...Double(1 << 20))
        for (flag, seconds) in [("--http-body-timeout", httpBodyTimeout), ("--http-idle-timeout", httpIdleTimeout), ("--http-header-timeout", httpHeaderTimeout)] {
            try Self.require(flag, seconds, 0.001...1e9, "seconds")
        }
        guard exchangeDir == nil || options.store != nil else {
            throw ValidationError("--exchange-dir needs --store: it is where train_local and evaluate_local read and write, and they need a store")
        }
    }

    /// Throws a usage error naming `flag`, its value and `range` unless `value` is a number in `range`.
    static func require(_ flag: String, _ value: Double, _ range: ClosedRange<Double>, _ hint: String? = nil) throws {
        guard value.isFinite, range.contains(value) else {
            func text(_ x: Double) -> String { x == x.rounded() && abs(x) < 1e15 ? String(Int(x)) : "\(x)" }
            throw ValidationError("\(flag) \(text(value)) is outside \(text(range.lowerBound))...\(text(range.upperBound))\(hint.map { " (\($0))" } ?? "")")
        }
    }

    func run() throws {
        let (m, tok) = try options.loadModel()
        // serve creates nothing at start: the store root must exist (a mistyped --store is an error);
        // a base folder is made at the first publish; a store it cannot write is served read-only.
        let store = try options.openStore(m, access: .write, create: false, command: "serve", cacheBytes: cacheMB << 20)
        var limits = ServerLimits()
        limits.maxBatch = maxBatch; limits.maxQueue = maxQueue; limits.maxPromptTokens = maxPromptTokens
        limits.maxNewTokens = maxNewTokens; limits.maxLineBytes = maxLineBytes
        limits.batchInvariant = !fastBatching
        limits.kvCache = try options.kvCachePrecision(m)
        if strictClients { log("serve: --strict-clients is deprecated and has no effect: unknown clients are refused by default (--unknown-clients-get-shared serves them the shared pair)") }
        let server = Server(model: m, tokenizer: tok, store: store, unknownClients: unknownClientsGetShared ? .sharedPair : .refuse, limits: limits, lenient: lenient)
        server.training.maxStateBytes = maxTrainMB == 0 ? nil : maxTrainMB << 20
        server.drainTimeout = drainTimeout
        do { try server.runtime.prepare() } catch {
            throw CLIError("the store's shared adapter failed to load: \(AdapterRuntime.rpcError(error).message)")
        }
        // Every client's current file was validated by the reconcile in `open` (a failing one was
        // moved aside and reported by openStore); validating them all again here doubled the start
        // time (1,000 clients: 3.9 s in a debug build of the tiny test model) for nothing.
        var exchange: ConfinedFolder?
        if let exchangeDir {
            do {
                exchange = try ConfinedFolder(exchangeDir, readLimit: exchangeMaxMB << 20, excluding: [options.store!, store!.directory])
            } catch { throw CLIError("\(error)") }
        }
        installPersonalize(on: server)
        installFederatedClient(on: server, exchange: exchange)
        var transport: HTTPTransport?
        if let http {
            var o = HTTPOptions()
            (o.host, o.port) = try Self.hostPort(http)
            o.apiKey = apiKey ?? ProcessInfo.processInfo.environment["PF2LORA_API_KEY"].flatMap { $0.isEmpty ? nil : $0 }
            o.maxBodyBytes = httpMaxBodyMB << 20
            o.bodyTimeout = httpBodyTimeout
            o.idleTimeout = httpIdleTimeout
            o.headerTimeout = httpHeaderTimeout
            o.exchangeDir = exchangeDir
            do { transport = try HTTPTransport(core: server.core, options: o) } catch { throw CLIError("\(error)") }
            server.readsInput = stdio
        }
        server.handleTerminationSignals()
        if let transport, let http {
            let host = transport.options.host
            // "ready" only once the port is bound: a port in use (or a host that does not resolve)
            // was logged after "ready" as "serve: http: bind(...)", then the server drained and
            // exited with status 0. Now it is an error line and status 1, before anything is served.
            let bound = DispatchSemaphore(value: 0)
            let startError = Mutex<String?>(nil), listening = Mutex(false)
            Task.detached {
                do {
                    try await transport.run(onListening: { port in
                        log("serve: http: listening on http://\(host.contains(":") && !host.hasPrefix("[") ? "[\(host)]" : host):\(port)\(transport.options.apiKey == nil ? "" : " (API key required)")")
                        listening.withLock { $0 = true }
                        bound.signal()
                    })
                } catch {
                    if listening.withLock({ $0 }) {
                        log("serve: http: \(error)")
                        server.beginDrain("the HTTP listener failed")
                    } else {
                        startError.withLock { $0 = "\(error)" }
                        bound.signal()
                    }
                }
            }
            bound.wait()
            if let e = startError.withLock({ $0 }) {
                let inUse = e.contains("in use") || e.contains("errno: 98")
                throw CLIError("cannot serve HTTP on \(http): \(e)" + (inUse
                    ? "; another process listens on that port: stop it, or choose another port (port 0 picks a free one)"
                    : "; check the host and port of --http"))
            }
        }
        log("serve: pf2lora \(PF2LoRAVersion.string), \(m.folder) (\(m.architecture.layerCount) layers, vocab \(m.architecture.vocabSize)); store \(options.store ?? "none"); shared \(server.runtime.sharedVersion.map { "v\($0)" } ?? "none"); \(store?.clients().count ?? 0) clients; ready")
        let code = server.run()
        // Every generation has ended; the HTTP responses still being written finish before the exit.
        transport?.shutdown()
        log("serve: drained, exiting")
        if code != 0 { throw ExitCode(code) }
    }
}

extension ServeCommand {
    /// HOST:PORT, [IPv6]:PORT, or :PORT (loopback).
    static func hostPort(_ s: String) throws -> (String, Int) {
        guard let colon = s.lastIndex(of: ":"), let port = Int(s[s.index(after: colon)...]), (0...65535).contains(port) else {
            throw ValidationError("--http takes HOST:PORT (e.g. 127.0.0.1:8000; port 0 picks a free one), got '\(s)'")
        }
        var host = String(s[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host.isEmpty ? "127.0.0.1" : host, port)
    }
}

/// Reports on stderr what opening a store did: folders created, files that failed validation (moved
/// aside or, read-only, skipped) with the check that failed, adapters repointed, links ignored, and
/// whether the store is read-only.
func logStoreOpen(_ store: AdapterStore, command: String) {
    let rep = store.lastReconcile
    for f in store.createdFolders { log("\(command): created the store folder \(f)") }
    for f in rep.quarantined {
        log("\(command): warning: \(store.directory)/\(f) failed validation and was moved aside as .corrupt-\((f as NSString).lastPathComponent): \(rep.reasons[f] ?? "?"); that adapter falls back to its newest valid version (`pf2lora adapters inspect --file` shows the file)")
    }
    for f in rep.skipped {
        log("\(command): warning: \(store.directory)/\(f) failed validation and is skipped (the store is not written): \(rep.reasons[f] ?? "?")")
    }
    for r in rep.repointed { log("\(command): store repaired: \(r)") }
    for r in rep.ignored { log("\(command): store: ignored \(r)") }
    if let why = store.readOnlyReason, why != "opened read-only" {
        log("\(command): the store \(store.directory) is read-only (\(why)): it is served as it is; personalize, train_local and imports are refused")
    }
}
