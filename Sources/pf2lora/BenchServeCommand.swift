import ArgumentParser
import Foundation
import PF2LoRA

struct BenchServe: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Multi-client decode throughput with per-client adapters vs the base alone, adapter cold-load and switch cost, adapter sizes.",
        discussion: """
        Builds a temporary store for the model with one rank-`--rank` shared pair and `--clients` distinct \
        rank-`--rank2` client pairs (random values at a trained-looking scale, every linear slot \
        of every layer). Then decodes one batch of `--clients` sequences, one per client (shared pair folded, \
        client pairs per token, grouped per client), and the same batch on the base alone, in the same run, \
        and reports the throughput ratio. Cold load = read + decompress + validate one client file \
        (median); switch = resolving a request to an already-cached adapter (median).
        """)

    @Option(help: "Model folder.")
    var model: String
    @Option(help: "Concurrent clients (sequences in the batch), each with its own adapter.")
    var clients: Int = 32
    @Option(help: "Shared rank r.")
    var rank: Int = 8
    @Option(help: "Client rank r2.")
    var rank2: Int = 2
    @Option(help: "Decode steps timed.")
    var tokens: Int = 32
    @Option(name: .customLong("prompt-tokens"), help: "Prompt length of each sequence.")
    var promptTokens: Int = 16
    @Option(help: ArgumentHelp(WeightsOption.help, valueName: "auto|f32|f16|bf16|q8_0"))
    var weights = "auto"
    @Option(name: .customLong("shared-pair"), help: "How the shared pair is applied: fold (into a copy of the weights at their precision), per-token (a rank-r term per token, no copy), or default (fold on f32 and q8_0, per token on f16 and bf16).")
    var sharedPair = "default"
    @Option(help: "Timed repeats (median).")
    var repeats: Int = 3
    @Flag(name: .customLong("fast-batching"), help: "Decode as `serve --fast-batching` does: batches wider than 12 sequences as one GEMM pass (by default as `serve` does: every batch width on the worker pool, each sequence's logits the same bits whatever else runs).")
    var fastBatching = false
    @Option(help: "Threads (0 = PF2LORA_THREADS, else every core).")
    var threads: Int = 0
    @Option(name: .customLong("pooled-rows"), help: "Decode steps of at most this many sequences run on the worker pool (every sequence summed in the same order whatever the batch: how `serve` runs by default, at any width), larger ones as OpenBLAS GEMMs (`serve --fast-batching`). Default: no limit, as `serve` (\(InferenceEngine.maxPooledRows) with --fast-batching).")
    var pooledRows: Int?
    @Option(name: .customLong("kv-cache"), help: ArgumentHelp(KVCacheOption.help, valueName: "auto|f32|f16"))
    var kvCache = "auto"

    func validate() throws {
        _ = try KVCacheOption.parse(kvCache)
        guard clients >= 1, rank >= 1, rank2 >= 1, tokens >= 1, promptTokens >= 1, repeats >= 1, threads >= 0, (pooledRows ?? 0) >= 0 else {
            throw ValidationError("need --clients, --rank, --rank2, --tokens, --prompt-tokens, --repeats >= 1 and --threads >= 0")
        }
        _ = try WeightsOption.parse(weights)
        guard ["default", "fold", "per-token"].contains(sharedPair) else { throw ValidationError("--shared-pair must be default, fold or per-token") }
    }

    func run() throws {
        BLAS.setThreads(threads)
        let m = try LanguageModel.load(folder: model, precision: try WeightsOption.parse(weights))
        let c = m.architecture
        let bench = try BenchStore(model: model, name: "serve", seed: 3)
        defer { bench.remove() }
        let store = bench.store
        log("bench serve: publishing a rank-\(rank) shared pair and \(clients) rank-\(rank2) client pairs")
        let ids = (0..<clients).map { "client-\($0)" }
        try bench.publish(sharedRank: rank, clientRank: rank2, clients: ids)
        let mode: SharedPairMode? = sharedPair == "fold" ? .fold : sharedPair == "per-token" ? .perToken : nil
        let runtime = AdapterRuntime(model: m, store: store, sharedPairMode: mode)
        try runtime.prepare()
        let bindings = try ids.map { try runtime.resolve(client: $0) }

        // Sizes of one client file and the shared file.
        let cv = store.currentVersion(level: .client, client: ids[0])!
        let (cz, craw) = try store.fileSizes(level: .client, client: ids[0], version: cv)
        let (sz, sraw) = try store.fileSizes(level: .shared, version: store.currentVersion(level: .shared)!)
        let f16Client = try bench.adapter(.client, rank: rank2, id: "x").encodedSizeF16()

        // Cold load and cached switch.
        var cold: [Double] = []
        for i in 0..<min(50, clients * 4) {
            let id = ids[i % clients]
            let t0 = now(); _ = try store.readAndValidate(level: .client, client: id, version: store.currentVersion(level: .client, client: id)!); cold.append(now() - t0)
        }
        var sw: [Double] = []
        for i in 0..<1000 { let t0 = now(); _ = try runtime.resolve(client: ids[i % clients]); sw.append(now() - t0) }

        let engine = InferenceEngine(model: m)
        // As the server's scheduler sets it (Scheduler.init): batch-invariant unless --fast-batching;
        // an explicit --pooled-rows overrides both.
        if !fastBatching { engine.pooledRowLimit = .max }
        if let p = pooledRows { engine.pooledRowLimit = p }
        let kv = try KVCacheOption.parse(kvCache) ?? .automatic(for: m)
        var prng = RNG(seed: 9)
        let prompts = (0..<clients).map { _ in (0..<promptTokens).map { _ in prng.int(below: c.vocabSize) } }
        func decodeRate(_ bs: [AdapterBinding]) throws -> Double {
            Double(bs.count * tokens) / (try timeBatch(engine, prompts: prompts, bindings: bs, tokens: tokens, repeats: repeats, kvCache: kv, tag: "bench serve").decode)
        }
        let baseOnly = Array(repeating: AdapterBinding.base(m), count: clients)
        // Interleave the two measurements so drift on a busy machine hits both alike.
        var baseRates: [Double] = [], adapterRates: [Double] = []
        for _ in 0..<2 {
            baseRates.append(try decodeRate(baseOnly))
            adapterRates.append(try decodeRate(bindings))
        }
        let b = baseRates.max()!, a = adapterRates.max()!
        let rss = Server.residentBytes()
        print(jsonLine([
            "model": model, "clients": clients, "rank": rank, "rank2": rank2, "threads": BLAS.threads,
            "weights": weights, "kv_cache": kv.rawValue, "fast_batching": fastBatching, "pooled_rows": engine.pooledRowLimit == .max ? -1 : engine.pooledRowLimit, "weight_bytes": m.base.byteCount, "shared_pair": (mode ?? .default(for: m.baseLinears)).rawValue,
            "shared_owned_bytes": bindings[0].weights.ownedBytes(base: m.baseLinears),
            "client_pair_modules": bench.adapter(.client, rank: rank2, id: "x").modules.count,
            "decode_path": clients <= engine.pooledRowLimit ? "pool" : "gemm",
            "base_decode_tokens_per_s": b, "adapters_decode_tokens_per_s": a, "ratio": a / b,
            "client_cold_load_ms_median": cold.sorted()[cold.count / 2] * 1000,
            "cached_switch_us_median": sw.sorted()[sw.count / 2] * 1e6,
            "client_file_bytes_zstd_f32": cz, "client_raw_bytes_f32": craw, "client_file_bytes_zstd_f16": f16Client,
            "shared_file_bytes_zstd_f32": sz, "shared_raw_bytes_f32": sraw,
            "rss_bytes": rss,
        ]))
    }
}

extension LoRAAdapter {
    /// The size of this adapter's file when stored as f16.
    func encodedSizeF16() throws -> Int {
        var a = self
        a.metadata.storage = .f16
        return try a.encode().count
    }
}
