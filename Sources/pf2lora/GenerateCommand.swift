import ArgumentParser
import Foundation
import PF2LoRA

/// Options that open a model, its tokenizer and optionally an adapter store.
struct ModelOptions: ParsableArguments {
    @Option(help: "Model folder in Hugging Face GPT-2 layout (config.json, model.safetensors, tokenizer.json or vocab.json + merges.txt).")
    var model: String = "models/fortune-gpt2"
    @Option(help: "Adapter store folder (DESIGN §4). Without it, the base model alone is served.")
    var store: String?
    @Option(help: "OpenBLAS threads (0 = its default: all cores).")
    var threads: Int = 0

    func loadModel() throws -> (GPT2Model, BPETokenizer) {
        BLAS.setThreads(threads)
        let m = try GPT2Model.load(folder: model)
        let tok = try BPETokenizer(folder: model)
        guard tok.vocabSize <= m.config.vocabSize else {
            throw CLIError("\(model): the tokenizer has \(tok.vocabSize) tokens but the model's vocab_size is \(m.config.vocabSize); they do not belong together")
        }
        return (m, tok)
    }

    func openStore(_ m: GPT2Model, cacheBytes: Int = 256 << 20) throws -> AdapterStore? {
        guard let store else { return nil }
        let base = try BaseModelInfo.gpt2(folder: m.folder)
        return try AdapterStore.open(root: store, base: base, cacheBytes: cacheBytes)
    }
}

struct GenerateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate",
        abstract: "Continue a prompt; prints the continuation (not the prompt) to stdout as it is generated.",
        discussion: "Statistics go to stderr. --temperature 0 is greedy. With --store and --client, the client's two-level adapter is applied (the shared pair alone if the client has none).")

    @OptionGroup var options: ModelOptions
    @Option(help: "The prompt text.")
    var prompt: String
    @Option(name: .customLong("max-tokens"), help: "Tokens to generate at most.")
    var maxTokens: Int = 64
    @Option(help: "Sampling temperature (0 = greedy).")
    var temperature: Float = 0.8
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

    func run() throws {
        guard rawArgumentIsValidUTF8(option: "--prompt") else {
            throw CLIError("--prompt is not valid UTF-8; pass the text in UTF-8")
        }
        let (m, tok) = try options.loadModel()
        let sampling = SamplingParams(temperature: temperature, topK: topK, topP: topP, seed: seed)
        try sampling.validate()
        guard maxTokens >= 0 else { throw CLIError("--max-tokens must be >= 0") }
        let ids = tok.encode(prompt)
        guard !ids.isEmpty else { throw CLIError("the prompt is empty; give at least one character of text") }
        guard ids.count < m.config.nPositions else {
            throw CLIError("the prompt is \(ids.count) tokens but the model's context is \(m.config.nPositions); shorten the prompt")
        }
        var binding = AdapterBinding.base(m)
        if let store = try options.openStore(m) {
            let runtime = AdapterRuntime(model: m, store: store)
            try runtime.prepare()
            do { binding = try runtime.resolve(client: client) } catch { throw CLIError(AdapterRuntime.rpcError(error).message) }
        } else if client != nil {
            throw CLIError("--client needs --store DIR (the adapter store)")
        }
        let engine = InferenceEngine(model: m)
        let cache = KVCache(config: m.config, capacity: min(m.config.nPositions, ids.count + maxTokens + 1))
        let gen = GenerationState(request: GenerationRequest(prompt: ids, maxTokens: maxTokens, sampling: sampling, stop: stop, ignoreEOS: ignoreEOS),
                                  cache: cache, vocabSize: m.config.vocabSize, eos: tok.eosTokenId, decodeToken: { tok.decodeBytes([$0]) })
        let t0 = now()
        var tFirst = t0
        let stdout = FileHandle.standardOutput
        while !gen.isFinished {
            let logits = try engine.step([StepInput(cache: cache, tokens: gen.pendingInput, weights: binding.weights, client: binding.client)])
            if gen.isPrefill { tFirst = now() }
            let (_, delta) = gen.accept(logits: logits.data, vocabSize: m.config.vocabSize)
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
        """)

    @OptionGroup var options: ModelOptions
    @Flag(name: .customLong("strict-clients"), help: "Refuse clients with no adapter in the store (default: serve them the shared pair alone).")
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
    @Option(name: .customLong("cache-mb"), help: "Byte budget of the decompressed-adapter LRU cache, in MiB.")
    var cacheMB = 256
    @Option(name: .customLong("max-train-mb"), help: "Largest training state (activations for batch x seq) a personalize, train_local or evaluate_local may take, in MiB; a larger request is refused with the figure before anything is allocated (0: no bound).")
    var maxTrainMB = 2048
    @Flag(help: "Ignore unknown request params (by default they are refused with -32602 naming them).")
    var lenient = false

    func run() throws {
        let (m, tok) = try options.loadModel()
        let store = try options.openStore(m, cacheBytes: cacheMB << 20)
        var limits = ServerLimits()
        limits.maxBatch = maxBatch; limits.maxQueue = maxQueue; limits.maxPromptTokens = maxPromptTokens
        limits.maxNewTokens = maxNewTokens; limits.maxLineBytes = maxLineBytes
        guard maxBatch >= 1, maxQueue >= 0, maxPromptTokens >= 1, maxNewTokens >= 0, maxLineBytes >= 64, maxTrainMB >= 0 else {
            throw CLIError("limits must be positive (max-line-bytes at least 64)")
        }
        let server = Server(model: m, tokenizer: tok, store: store, strictClients: strictClients, limits: limits, lenient: lenient)
        server.training.maxStateBytes = maxTrainMB == 0 ? nil : maxTrainMB << 20
        do { try server.runtime.prepare() } catch {
            throw CLIError("the store's shared adapter failed to load: \(AdapterRuntime.rpcError(error).message)")
        }
        if let store {
            let rep = store.lastReconcile
            for f in rep.quarantined { log("serve: warning: \(store.directory)/\(f) failed validation and was moved aside (.corrupt-*); that adapter is refused until a valid version is published") }
            for r in rep.repointed { log("serve: store repaired: \(r)") }
            for r in rep.ignored { log("serve: store: ignored \(r)") }
            // Every client's current file was validated by the reconcile in `open` (a failing one
            // was moved aside and is reported above); validating them all again here doubled the
            // start time (1,000 clients: 3.9 s in a debug build of the tiny test model) for nothing.
        }
        installPersonalize(on: server)
        installFederatedClient(server)
        server.handleTerminationSignals()
        log("serve: \(m.folder) (\(m.config.nLayer) layers, vocab \(m.config.vocabSize)); store \(options.store ?? "none"); shared \(server.runtime.sharedVersion.map { "v\($0)" } ?? "none"); \(store?.clients().count ?? 0) clients; ready")
        let code = server.run()
        log("serve: drained, exiting")
        if code != 0 { throw ExitCode(code) }
    }
}
