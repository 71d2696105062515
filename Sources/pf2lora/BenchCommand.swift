import ArgumentParser
import Foundation
import PF2LoRA

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure speed (build with -c release). Each prints one JSON object on stdout.",
        subcommands: [BenchDecode.self, BenchServe.self, BenchHTTP.self, BenchTrain.self, BenchBLAS.self, BenchTokenizer.self, BenchAdapters.self])
}

struct BenchDecode: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "decode",
        abstract: "Prefill and decode tokens/s of the base model on random token ids.",
        discussion: "Prefill runs `--batch` prompts of `--prompt-tokens` tokens in one step; decode then runs `--tokens` steps of the whole batch. A warm-up run comes first; the median of `--repeats` runs is reported.")

    @Option(help: "Model folder (Hugging Face layout, any supported family: gpt2, llama, mistral, qwen2, qwen3).")
    var model: String
    @Option(help: "Sequences decoded together.")
    var batch: Int = 1
    @Option(help: "Decode steps to time.")
    var tokens: Int = 64
    @Option(name: .customLong("prompt-tokens"), help: "Prompt length for the prefill measurement.")
    var promptTokens: Int = 128
    @Option(help: "Threads (0 = PF2LORA_THREADS, else every core).")
    var threads: Int = 0
    @Option(help: "Timed repeats (median reported).")
    var repeats: Int = 3
    @Option(name: .customLong("pool-policy"), help: "adaptive: decode steps run on one thread while the cores are oversubscribed (the default, as served); always: every step on every pool thread.")
    var poolPolicy = "adaptive"
    @Option(help: ArgumentHelp(WeightsOption.help, valueName: "auto|f32|f16|bf16|q8_0"))
    var weights = "auto"
    @Option(name: .customLong("pooled-rows"), help: "Decode steps of at most this many sequences run on the worker pool, larger ones as OpenBLAS GEMMs (0 = always GEMM; default: the engine's, \(InferenceEngine.maxPooledRows)).")
    var pooledRows: Int?
    @Option(name: .customLong("kv-cache"), help: ArgumentHelp(KVCacheOption.help, valueName: "auto|f32|f16"))
    var kvCache = "auto"
    @Option(name: .customLong("read-bound-rounds"), help: "Then this many rounds of 4 batch-1 decode steps (continuing after the prompt), each followed at once by a plain read of the weight bytes a step reads (the faster of two reads, with and without the kernels' software prefetch: which is faster depends on the CPU): decode_vs_read_bound is the median per-round ratio of the read's time (scaled to the weights plus that step's KV cache) to a step's. Decode and read minutes apart can meet different memory-bandwidth phases of a shared machine; milliseconds apart they meet the same. 0: none.")
    var readBoundRounds = 0

    func validate() throws {
        guard readBoundRounds >= 0 else { throw ValidationError("--read-bound-rounds must be >= 0") }
        _ = try KVCacheOption.parse(kvCache)
        if let p = pooledRows, p < 0 { throw ValidationError("--pooled-rows must be >= 0 (0 = decode every batch with GEMM)") }
        guard poolPolicy == "adaptive" || poolPolicy == "always" else { throw ValidationError("--pool-policy must be adaptive or always") }
        _ = try WeightsOption.parse(weights)
        guard batch >= 1, tokens >= 1, promptTokens >= 1, repeats >= 1, threads >= 0 else {
            throw ValidationError("need --batch, --tokens, --prompt-tokens, --repeats >= 1 and --threads >= 0")
        }
    }

    func run() throws {
        BLAS.setThreads(threads)
        WorkerPool.shared.adaptive = poolPolicy == "adaptive"
        let m = try LanguageModel.load(folder: model, precision: try WeightsOption.parse(weights))
        for f in m.base.fallbacks { log("weights: \(f)") }
        let c = m.architecture
        guard promptTokens + tokens <= c.contextLength else {
            throw CLIError("--prompt-tokens + --tokens is \(promptTokens + tokens), longer than the model's context (\(c.contextLength))")
        }
        let engine = InferenceEngine(model: m)
        if let p = pooledRows { engine.pooledRowLimit = p }
        var rng = RNG(seed: 1)
        let prompts = (0..<batch).map { _ in (0..<promptTokens).map { _ in Int(rng.next() % UInt64(c.vocabSize)) } }
        let kv = try KVCacheOption.parse(kvCache) ?? .automatic(for: m)
        let run = try timeBatch(engine, prompts: prompts, bindings: Array(repeating: .base(m), count: batch), tokens: tokens, repeats: repeats,
                                kvCache: kv, tag: "bench decode")
        let tp = run.prefill, td = run.decode
        var bound: [String: Any] = [:]
        if readBoundRounds > 0 {
            let steps = 4, binding = AdapterBinding.base(m)
            let cache = KVCache(architecture: c, capacity: promptTokens + readBoundRounds * steps + 1, precision: kv)
            var logits = try engine.step([StepInput(cache: cache, tokens: prompts[0], weights: binding.weights, client: binding.client)])
            let matrices = Array(m.base.linears.weights.joined()) + [m.base.head]
            let weightBytes = Double(m.base.bytesPerToken)
            let kvBytesPerPosition = Double(c.layerCount * 2 * c.kvHeadCount * c.headDim * (kv == .f16 ? 2 : 4))
            var sink = WorkerPool.shared.sumBytes(matrices)   // every page touched once
            var ratios: [Double] = [], bandwidths: [Double] = []
            for round in 0..<readBoundRounds {
                let context = Double(cache.length) + Double(steps + 1) / 2   // the mean length the steps read
                let t0 = now()
                for _ in 0..<steps {
                    let next = Sampler.argmax(logits.data, count: c.vocabSize)
                    logits = try engine.step([StepInput(cache: cache, tokens: [next], weights: binding.weights, client: binding.client)])
                }
                let step = (now() - t0) / Double(steps)
                let read = WorkerPool.shared.readBoundSeconds(matrices, round: round)
                sink &+= read.sum
                let bandwidth = weightBytes / read.seconds
                ratios.append((weightBytes + kvBytesPerPosition * context) / bandwidth / step)
                bandwidths.append(bandwidth)
            }
            let r = ratios.sorted(), b = bandwidths.sorted()
            bound = ["read_bound_rounds": readBoundRounds, "decode_vs_read_bound": r[r.count / 2], "decode_vs_read_bound_min": r[0],
                     "decode_vs_read_bound_max": r[r.count - 1], "read_gb_per_s_median": b[b.count / 2] / 1e9, "read_sink": Int(sink)]
        }
        print(jsonLine(bound.merging([
            "model": model, "batch": batch, "prompt_tokens": promptTokens, "decode_tokens": tokens,
            "threads": BLAS.threads, "pool_threads": WorkerPool.shared.count,
            "decode_path": batch <= engine.pooledRowLimit ? "pool" : "gemm",
            "pooled_rows": engine.pooledRowLimit, "pooled_rows_default": InferenceEngine.maxPooledRows,
            "pool_policy": poolPolicy, "pool_solo_steps": WorkerPool.shared.policy.soloRuns, "pool_solo_switches": WorkerPool.shared.policy.switches,
            "pool_mean_stall_fraction": WorkerPool.shared.policy.pooledJobs == 0 ? 0 : WorkerPool.shared.policy.stallFractionSum / Double(WorkerPool.shared.policy.pooledJobs),
            "weights": weights, "kv_cache": kv.rawValue, "weight_precisions": m.base.precisions.map { "\($0.key)x\($0.value)" }.sorted(),
            "weight_bytes": m.base.byteCount, "weight_bytes_per_token": m.base.bytesPerToken, "rss_bytes": Server.residentBytes(),
            "prefill_tokens_per_s": Double(batch * promptTokens) / tp,
            "decode_tokens_per_s": Double(batch * tokens) / td,
            "decode_ms_per_step": td / Double(tokens) * 1000,
        ]) { a, _ in a }))
    }
}

struct BenchBLAS: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blas",
        abstract: "The machine's limits for a model's shapes: memory-read bandwidth over its weights, OpenBLAS sgemv over them, and sgemm GFLOP/s on prefill shapes.",
        discussion: """
            read_gb_per_s is a plain read of the weight bytes one decode token reads (every linear weight and the tied head), summed by the worker pool: read_bound_tokens_per_s = that bandwidth / those bytes is the memory-bandwidth limit of batch-1 decode. sgemv_gb_per_s and decode_bound_tokens_per_s are the same bytes through OpenBLAS's sgemv, one call per weight, as pf2lora's decode used to run. sgemm_gflop_per_s is OpenBLAS on the four layer GEMMs of a prefill of --prompt-tokens rows.

            For each of --precisions, the same weights converted to that precision (matrices whose rows are not whole q8_0 blocks stay f32): weight_bytes_per_token_P, read_gb_per_s_P and read_bound_tokens_per_s_P (a plain read of those bytes by the worker pool: the memory-read bound of batch-1 decode at P), and matvec_tokens_per_s_P / matvec_gb_per_s_P (one pass of the decode kernels over them at batch 1: the products alone, no attention). Ten timed rounds (after an untimed one that touches every page), each reading the f32 weights (read_gb_per_s) and then every precision's bytes back to back, then running every precision's kernels: the reads report the fastest round (the bound: the best the machine read those bytes), the kernels the median.
            """)

    @Option(help: "Model folder.")
    var model: String
    @Option(name: .customLong("prompt-tokens"), help: "Rows of the prefill GEMMs.")
    var promptTokens: Int = 512
    @Option(help: "Threads (0 = PF2LORA_THREADS, else every core).")
    var threads: Int = 0
    @Option(help: "Weight precisions to measure the read bound and the decode kernels at, comma-separated (f32, f16, bf16, q8_0); empty for none.")
    var precisions = "f32,f16,bf16,q8_0"

    func validate() throws {
        guard promptTokens >= 1, threads >= 0 else { throw ValidationError("need --prompt-tokens >= 1 and --threads >= 0") }
        for p in precisionList where WeightPrecision(rawValue: p) == nil {
            throw ValidationError("unknown precision '\(p)' in --precisions; use f32, f16, bf16, q8_0")
        }
    }

    var precisionList: [String] { precisions.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty } }

    func run() throws {
        BLAS.setThreads(threads)
        let m = try LanguageModel.load(folder: model)
        let c = m.architecture
        let widest = c.slots.map { max($0.inFeatures, $0.outFeatures) }.max() ?? c.hiddenSize
        let x = Tensor(zeros: [max(widest, c.hiddenSize)]); x.fill(0.01)
        let y = Tensor(zeros: [max(c.vocabSize, widest)])
        // One decode token's weight reads: every linear weight and the tied head.
        func gemvPass() {
            for layer in m.weights.layers {
                for s in c.slots {
                    let w = layer.linW[s.index]   // as the checkpoint stores it: (in, out) Conv1D is read transposed
                    BLAS.gemv(w.data, x.data, y.data, m: w.rows, n: w.cols, trans: s.layout == .conv1D)
                }
            }
            BLAS.gemv(m.weights.head.data, x.data, y.data, m: c.vocabSize, n: c.hiddenSize)
        }
        let bytes = Double(m.weights.layers.reduce(0) { $0 + $1.linW.reduce(0) { $0 + $1.count } } + m.weights.head.count) * 4
        gemvPass()
        var times: [Double] = []
        for _ in 0..<7 { let t0 = now(); gemvPass(); times.append(now() - t0) }
        let tv = times.sorted()[3]
        // The same bytes read as plainly as possible, by the decode worker pool (timed below, in the
        // same rounds as each precision's read).
        let serving = m.baseLinears.weights.flatMap { $0 }.compactMap(\.f32) + [m.weights.head]
        // The GEMMs of one prefill of promptTokens rows.
        let T = promptTokens
        let a = Tensor(zeros: [T, widest]); a.fill(0.01)
        let out = Tensor(zeros: [T, widest])
        func gemmPass() -> Double {
            var flops = 0.0
            for layer in m.weights.layers {
                for s in c.slots {
                    let w = layer.linW[s.index]
                    // (T,in) @ (in,out) -> (T,out); an (out,in) weight is read transposed
                    BLAS.gemm(a.data, w.data, out.data, m: T, n: s.outFeatures, k: s.inFeatures, transB: s.layout == .linear)
                    flops += 2 * Double(T * w.rows * w.cols)
                }
            }
            return flops
        }
        // Each precision's bytes of one decode token, read plainly and through the decode kernels.
        let f32Set = serving.map { WeightMatrix($0) }
        let sets = precisionList.map { name -> (String, [WeightMatrix]) in
            let p = WeightPrecision(rawValue: name)!
            return (name, f32Set.map { p.fits(cols: $0.cols) ? $0.converted(to: p) : $0 })
        }
        let vin = Tensor(zeros: [f32Set.map(\.cols).max() ?? 1]); vin.fill(0.01)
        let vout = Tensor(zeros: [f32Set.map(\.rows).max() ?? 1])
        // The reads: the general one and each precision's back to back in every round, after the
        // conversions above (round 0, which touches every page, is not timed), and the fastest of the
        // rounds reported for all of them alike. Until session 10 the precisions' reads were timed
        // between their kernel passes, medians, and the general read in its own earlier loop: in the
        // 23:25 quiet-window peer run that read the same f32 bytes ~15 % slower in 9 of 11 rounds.
        var readTimes = [[Double]](repeating: [], count: sets.count), dotTimes = readTimes
        var rt: [Double] = []
        var checksum: Float = 0
        var byteSum: UInt32 = 0
        for round in 0..<11 {
            // The generic read, too, the faster of its forms with and without the prefetch.
            let generic = WorkerPool.timeBothForms(round: round) { WorkerPool.shared.sumAll(serving, prefetch: $0) }
            checksum += generic.results.reduce(0, +)
            if round > 0 { rt.append(generic.seconds) }
            for (i, (_, ms)) in sets.enumerated() {
                let read = WorkerPool.shared.readBoundSeconds(ms, round: round)
                byteSum &+= read.sum
                if round > 0 { readTimes[i].append(read.seconds) }
            }
            for (i, (_, ms)) in sets.enumerated() {
                let t0 = now(); WorkerPool.shared.dotAll(ms, input: vin, output: vout); let td = now() - t0
                if round > 0 { dotTimes[i].append(td) }
            }
        }
        let tr = rt.min()!
        var perPrecision: [String: Any] = ["read_byte_sum": Int(byteSum)]
        for (i, (name, ms)) in sets.enumerated() {
            let b = Double(ms.reduce(0) { $0 + $1.byteCount })
            let r = readTimes[i].min()!, d = dotTimes[i].sorted()[dotTimes[i].count / 2]
            perPrecision["weight_bytes_per_token_\(name)"] = b
            perPrecision["read_gb_per_s_\(name)"] = b / r / 1e9
            perPrecision["read_bound_tokens_per_s_\(name)"] = 1 / r
            perPrecision["matvec_gb_per_s_\(name)"] = b / d / 1e9
            perPrecision["matvec_tokens_per_s_\(name)"] = 1 / d
        }
        _ = gemmPass()
        var gt: [Double] = []
        var flops = 0.0
        for _ in 0..<3 { let t0 = now(); flops = gemmPass(); gt.append(now() - t0) }
        let tg = gt.sorted()[1]
        print(jsonLine(perPrecision.merging([
            "model": model, "threads": BLAS.threads,
            "weight_bytes_per_token": bytes,
            "sgemv_gb_per_s": bytes / tv / 1e9,
            "decode_bound_tokens_per_s": 1 / tv,
            "read_gb_per_s": bytes / tr / 1e9,
            "read_bound_tokens_per_s": 1 / tr,
            "read_threads": WorkerPool.shared.count,
            "read_checksum_finite": checksum.isFinite,
            "sgemm_gflop_per_s": flops / tg / 1e9,
            "prefill_rows": T,
        ]) { a, _ in a }))
    }
}

/// Times one batch: a prefill step of every prompt, then `tokens` greedy decode steps of the whole
/// batch; a warm-up run first, then the median of `repeats` runs (seconds). Each sequence is served
/// with its binding; callers order bindings by client, as the scheduler does.
func timeBatch(_ engine: InferenceEngine, prompts: [[Int]], bindings: [AdapterBinding], tokens: Int, repeats: Int,
               kvCache: KVCachePrecision, tag: String) throws -> (prefill: Double, decode: Double) {
    let c = engine.model.architecture
    let caches = prompts.map { KVCache(architecture: c, capacity: $0.count + tokens + 1, precision: kvCache) }
    var prefill: [Double] = [], decode: [Double] = []
    for rep in 0...repeats {
        caches.forEach { $0.reset() }
        var t0 = now()
        let lg = try engine.step(prompts.indices.map { StepInput(cache: caches[$0], tokens: prompts[$0], weights: bindings[$0].weights, client: bindings[$0].client) })
        let tp = now() - t0
        var next = prompts.indices.map { Sampler.argmax(lg.data + $0 * c.vocabSize, count: c.vocabSize) }
        t0 = now()
        for _ in 0..<tokens {
            let l = try engine.step(prompts.indices.map { StepInput(cache: caches[$0], tokens: [next[$0]], weights: bindings[$0].weights, client: bindings[$0].client) })
            next = prompts.indices.map { Sampler.argmax(l.data + $0 * c.vocabSize, count: c.vocabSize) }
        }
        let td = now() - t0
        if rep > 0 { prefill.append(tp); decode.append(td) }
        log(String(format: "%@: run %d: prefill %.3f s, decode %.3f s", tag, rep, tp, td))
    }
    return (prefill.sorted()[prefill.count / 2], decode.sorted()[decode.count / 2])
}
