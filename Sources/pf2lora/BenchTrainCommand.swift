import ArgumentParser
import Foundation
import PF2LoRA

struct BenchTrain: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train",
        abstract: "Time one training step (forward + backward, no optimizer) of two-level LoRA on a model.",
        discussion: """
        Random token ids, labels = inputs (every position but the last predicts). A rank --rank shared pair \
        and a rank --rank2 client pair on all four linear kinds of every layer, both trainable, the base \
        frozen; with --full, the base weights' gradients instead (no adapters). One warm-up step, then the \
        median of --repeats steps. Benchmarks/train_step_bench.py runs this next to the same PyTorch + PEFT step.
        """)

    @Option(help: "Model folder (Hugging Face layout, any supported family: gpt2, llama, mistral, qwen2, qwen3).")
    var model: String
    @Option(help: "Sequences per batch (B).")
    var batch: Int = 8
    @Option(help: "Tokens per sequence (T).")
    var seq: Int = 128
    @Option(help: "Shared (level-1) rank.")
    var rank: Int = 8
    @Option(help: "Client (level-2) rank.")
    var rank2: Int = 2
    @Option(help: "Shared alpha (scale alpha / rank).")
    var alpha: Float = 16
    @Option(help: "Client alpha (scale alpha2 / rank2).")
    var alpha2: Float = 4
    @Flag(help: "Full-parameter gradients instead of adapters.")
    var full = false
    @Option(help: "Threads (0 = PF2LORA_THREADS, else every core).")
    var threads: Int = 0
    @Option(help: "Timed steps (median reported).")
    var repeats: Int = 5

    func validate() throws {
        guard batch >= 1, seq >= 2, rank >= 1, rank2 >= 0, repeats >= 1, threads >= 0 else {
            throw ValidationError("need --batch >= 1, --seq >= 2, --rank >= 1, --rank2 >= 0, --repeats >= 1, --threads >= 0")
        }
    }

    func run() throws {
        BLAS.setThreads(threads)
        let m = try LanguageModel.load(folder: model)
        let c = m.architecture
        guard seq <= c.contextLength else { throw CLIError("--seq \(seq) is longer than the model's context (\(c.contextLength))") }
        var rng = RNG(seed: 1)
        let ids = (0..<batch).map { _ in (0..<seq).map { _ in rng.int(below: c.vocabSize) } }
        let b = try TrainingBatch(inputIds: ids, labels: ids)
        func level(_ r: Int, _ a: Float) -> AdapterWeights? {
            guard r > 0, !full else { return nil }
            var pairs: [String: (down: Tensor, up: Tensor)] = [:]
            for (path, dims) in m.linears.sorted(by: { $0.key < $1.key }) {   // sorted: same adapters every run
                let down = Tensor(zeros: [r, dims.inFeatures]), up = Tensor(zeros: [dims.outFeatures, r])
                let bound = 1 / Float(dims.inFeatures).squareRoot()
                for i in 0..<down.count { down.data[i] = rng.uniform(-bound, bound) }
                for i in 0..<up.count { up.data[i] = 0.01 * rng.normal() }
                pairs[path] = (down, up)
            }
            return AdapterWeights(pairs: pairs, scale: a / Float(r))
        }
        let shared = level(rank, alpha), client = level(rank2, alpha2)
        let trainer = ModelTrainer(weights: m.weights, fullGradients: full)
        var times: [Double] = [], fwd: [Double] = []
        var loss: Float = 0
        for rep in 0...repeats {
            var t0 = now()
            _ = try trainer.loss(b, shared: shared, client: client)
            let tf = now() - t0
            t0 = now()
            loss = try trainer.lossAndGradients(b, shared: shared, client: client)
            let ts = now() - t0
            if rep > 0 { times.append(ts); fwd.append(tf) }
            log(String(format: "bench train: run %d: step %.1f ms (forward only %.1f ms), loss %.4f", rep, ts * 1000, tf * 1000, loss))
        }
        let step = times.sorted()[times.count / 2], tf = fwd.sorted()[fwd.count / 2]
        print(jsonLine([
            "model": model, "batch": batch, "seq": seq, "rank": full ? 0 : rank, "rank2": full ? 0 : rank2,
            "mode": full ? "full" : "lora", "threads": BLAS.threads,
            "step_ms": step * 1000, "forward_ms": tf * 1000,
            "tokens_per_s": Double(batch * seq) / step,
            "state_mb": Double(trainer.stateBytes) / 1e6, "loss": Double(loss),
        ]))
    }
}
