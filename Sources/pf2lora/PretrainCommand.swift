import ArgumentParser
import Foundation
import PF2LoRA

struct PretrainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pretrain",
        abstract: "Train a small model (GPT-2 or Llama family) from scratch on JSONL text (full-parameter, AdamW, warm-up + cosine).",
        discussion: """
        --data is a JSONL file, or a folder holding train.jsonl (else every *.jsonl in it). Each line is \
        {"text": "..."} (tokenized with --tokenizer; texts are joined with <|endoftext|>) or {"ids": [...]} \
        (already tokenized). Validation text: --valid, else valid.jsonl next to the training file, else the \
        last 1% of the token stream is held out. Each step draws --batch random windows of --seq + 1 tokens; \
        the windows of step s depend only on (--seed, s), so a resumed run continues exactly as an \
        uninterrupted one. --out becomes a Hugging Face folder (config.json, model.safetensors, tokenizer \
        files) plus trainer_state.json and optimizer.safetensors; every file is replaced atomically at each \
        checkpoint. Progress goes to stderr; a JSON summary to stdout at the end.
        """)

    @Option(help: "Training data: a JSONL file or a folder (see above).")
    var data: String
    @Option(help: "Validation JSONL file (default: valid.jsonl next to the training data, else a 1% hold-out).")
    var valid: String?
    @Option(help: "Tokenizer folder (tokenizer.json or vocab.json + merges.txt); its files are copied into --out.")
    var tokenizer: String
    @Option(help: "Output folder (the checkpoint).")
    var out: String
    @Option(help: "Model shape preset: small (GPT-2, 4 layers, 256 wide, 4 heads, 256 positions), tiny, distilgpt2, gpt2, or a Llama-family shape: small-llama (4 layers, 256 wide), llama-<layers>x<hidden> (e.g. llama-6x256: head dim 32, a quarter as many KV heads, SwiGLU 8/3 wide, 512 positions), tiny-llama, smollm2-135m, ... (see `model random`). The vocabulary is the tokenizer's.")
    var config: String = "small"
    @Option(help: "Optimizer steps in total (the cosine schedule ends here).")
    var steps: Int = 2000
    @Option(help: "Sequences per step.")
    var batch: Int = 16
    @Option(help: "Tokens per sequence.")
    var seq: Int = 128
    @Option(help: "Peak learning rate.")
    var lr: Float = 1e-3
    @Option(name: .customLong("min-lr-ratio"), help: "Final learning rate as a fraction of the peak.")
    var minLRRatio: Float = 0.1
    @Option(help: "Linear warm-up steps.")
    var warmup: Int = 100
    @Option(name: .customLong("weight-decay"), help: "AdamW weight decay (2-D weights only; biases and layer norms get none).")
    var weightDecay: Float = 0.1
    @Option(help: "Gradient clipping: maximum global L2 norm (0 = off).")
    var clip: Float = 1.0
    @Option(help: "Seed of the initial weights and of the window sampler.")
    var seed: UInt64 = 0
    @Flag(help: "Continue from the checkpoint in --out.")
    var resume = false
    @Option(name: .customLong("eval-every"), help: "Steps between validation losses.")
    var evalEvery: Int = 200
    @Option(name: .customLong("eval-batches"), help: "Validation batches (fixed, consecutive windows).")
    var evalBatches: Int = 8
    @Option(name: .customLong("save-every"), help: "Steps between checkpoints (one is always written at the end).")
    var saveEvery: Int = 500
    @Option(name: .customLong("log-every"), help: "Steps between progress lines.")
    var logEvery: Int = 10
    @Option(help: "Threads (0 = PF2LORA_THREADS, else every core).")
    var threads: Int = 0

    func validate() throws {
        guard steps >= 1, batch >= 1, seq >= 2, evalEvery >= 1, saveEvery >= 1, logEvery >= 1, lr.isFinite, lr > 0 else {
            throw ValidationError("need --steps, --batch, --eval-every, --save-every, --log-every >= 1, --seq >= 2 and --lr > 0")
        }
        guard threads >= 0 else { throw ValidationError("--threads must be >= 0 (0 = OpenBLAS's default, all cores)") }
    }

    func run() throws {
        BLAS.setThreads(threads)
        var opts = PretrainOptions()
        opts.steps = steps; opts.batch = batch; opts.seq = seq; opts.lr = lr; opts.minLRRatio = minLRRatio
        opts.warmup = warmup; opts.weightDecay = weightDecay; opts.clip = clip; opts.seed = seed

        // Tokenizer and data.
        let tok = try BPETokenizer(folder: tokenizer)
        guard let eos = tok.eosTokenId else { throw CLIError("\(tokenizer) has no <|endoftext|> token to join texts with") }
        let t0 = now()
        let (trainFile, validFile) = try dataFiles()
        var trainTokens = try Self.tokens(files: trainFile, tokenizer: tok, eos: eos)
        var validTokens: [Int32]
        if let validFile { validTokens = try Self.tokens(files: [validFile], tokenizer: tok, eos: eos) } else {
            let cut = trainTokens.count - max(trainTokens.count / 100, 2 * (seq + 1))
            guard cut > seq + 1 else { throw CLIError("too little training text (\(trainTokens.count) tokens) for --seq \(seq)") }
            validTokens = Array(trainTokens[cut...]); trainTokens.removeLast(trainTokens.count - cut)
        }
        log(String(format: "pretrain: %d training tokens from %@, %d validation tokens from %@ (tokenized in %.1f s)",
                   trainTokens.count, trainFile.joined(separator: ", "), validTokens.count,
                   validFile ?? "a 1% hold-out", now() - t0))
        let train = TokenWindows(tokens: trainTokens), validation = TokenWindows(tokens: validTokens)
        let evalSet = try validation.evaluationBatches(batch: batch, seq: seq, maxBatches: evalBatches)

        // Model: fresh or resumed.
        let fm = FileManager.default
        let p: Pretrainer
        var history: [[String: Any]] = [], validHistory: [[String: Any]] = []
        var elapsedBefore = 0.0
        if resume {
            let (r, state) = try Pretrainer.resume(from: out, options: opts)
            p = r
            history = state["train_log"] as? [[String: Any]] ?? []
            validHistory = state["valid_log"] as? [[String: Any]] ?? []
            elapsedBefore = state["elapsed_s"] as? Double ?? 0
            log("pretrain: resumed \(out) at step \(p.step)")
        } else {
            if fm.fileExists(atPath: out + "/trainer_state.json") || fm.fileExists(atPath: out + "/model.safetensors") {
                throw CLIError("\(out) already holds a checkpoint; pass --resume to continue it or choose a new --out")
            }
            guard let arch = ModelRegistry.preset(config, vocabSize: tok.vocabSize, eosTokenId: eos) else {
                throw CLIError("unknown --config '\(config)'; use \(ModelRegistry.presetNames.joined(separator: ", "))")
            }
            p = Pretrainer(weights: ModelWeights.random(architecture: arch, seed: seed), options: opts)
        }
        let c = p.weights.architecture
        guard seq <= c.contextLength else { throw CLIError("--seq \(seq) exceeds the model's context \(c.contextLength)") }
        guard c.vocabSize >= tok.vocabSize else { throw CLIError("the tokenizer has \(tok.vocabSize) tokens but the checkpoint's vocab_size is \(c.vocabSize)") }
        try fm.createDirectory(atPath: out, withIntermediateDirectories: true)
        for f in ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
            where fm.fileExists(atPath: tokenizer + "/" + f) && !fm.fileExists(atPath: out + "/" + f) {
            try AtomicFile.write(Data(contentsOf: URL(fileURLWithPath: tokenizer + "/" + f)), to: out + "/" + f)
        }
        log(String(format: "pretrain: %@ config: %d layers, %d wide, %d heads, %d positions, vocab %d: %.2fM parameters; %d steps of %d x %d tokens, lr %g, warm-up %d",
                   config, c.layerCount, c.hiddenSize, c.headCount, c.contextLength, c.vocabSize, Double(p.parameterCount) / 1e6,
                   steps, batch, seq, Double(lr), warmup))

        func checkpoint(_ elapsed: Double) throws {
            try p.save(to: out, extra: [
                "train_log": history, "valid_log": validHistory, "elapsed_s": elapsed,
                "tokens_seen": p.step * batch * seq, "data": trainFile, "valid": validFile ?? "hold-out",
                "tokenizer": tokenizer, "config_preset": config,
            ])
        }

        let start = now()
        var windowLoss = 0.0, windowSteps = 0, windowStart = now()
        var lastValid: Float = .nan
        var stepTime = 0.0
        var reportedState = false
        while p.step < steps {
            let t = now()
            let stats: PretrainStepStats
            do { stats = try p.trainStep(try train.batch(step: p.step, batch: batch, seq: seq, seed: seed)) } catch {
                log("pretrain: \(error)")
                throw error
            }
            let dt = now() - t
            if !reportedState {
                reportedState = true
                log(String(format: "pretrain: run state %.0f MB (activations and backward scratch for %d x %d)", Double(p.trainer.stateBytes) / 1e6, batch, seq))
            }
            stepTime = stepTime == 0 ? dt : 0.9 * stepTime + 0.1 * dt
            windowLoss += Double(stats.loss); windowSteps += 1
            if stats.step % logEvery == 0 || stats.step == steps {
                let mean = windowLoss / Double(windowSteps)
                let tps = Double(windowSteps * batch * seq) / (now() - windowStart)
                history.append(["step": stats.step, "loss": mean, "lr": Double(stats.lr), "grad_norm": Double(stats.gradNorm)])
                log(String(format: "step %5d/%d | loss %.4f | lr %.2e | grad %.2f | %.0f tok/s | %@ elapsed | %@ left",
                           stats.step, steps, mean, Double(stats.lr), Double(stats.gradNorm), tps,
                           Self.duration(now() - start), Self.duration(stepTime * Double(steps - stats.step))))
                windowLoss = 0; windowSteps = 0; windowStart = now()
            }
            if stats.step % evalEvery == 0 || stats.step == steps {
                lastValid = try p.evaluate(evalSet)
                validHistory.append(["step": stats.step, "loss": Double(lastValid)])
                log(String(format: "step %5d: validation loss %.4f (perplexity %.1f)", stats.step, Double(lastValid), exp(Double(lastValid))))
                windowStart = now()
            }
            if stats.step % saveEvery == 0 || stats.step == steps {
                try checkpoint(elapsedBefore + now() - start)
                log("step \(stats.step): checkpoint written to \(out)")
                windowStart = now()
            }
        }
        if lastValid.isNaN { lastValid = try p.evaluate(evalSet) }
        let elapsed = now() - start
        print(jsonLine([
            "out": out, "steps": p.step, "parameters": p.parameterCount, "valid_loss": Double(lastValid),
            "valid_perplexity": exp(Double(lastValid)), "train_loss": history.last?["loss"] ?? NSNull(),
            "seconds": elapsedBefore + elapsed, "tokens_per_s": stepTime > 0 ? Double(batch * seq) / stepTime : 0,
        ]))
    }

    /// The training files and the validation file.
    func dataFiles() throws -> ([String], String?) {
        let fm = FileManager.default
        var isDir: ObjCBool = false
        guard fm.fileExists(atPath: data, isDirectory: &isDir) else { throw CLIError("--data \(data) does not exist") }
        var train: [String]
        if isDir.boolValue {
            if fm.fileExists(atPath: data + "/train.jsonl") { train = [data + "/train.jsonl"] } else {
                train = try fm.contentsOfDirectory(atPath: data).filter { $0.hasSuffix(".jsonl") && !$0.hasPrefix(".") && $0 != "valid.jsonl" && $0 != "test.jsonl" }
                    .sorted().map { data + "/" + $0 }
            }
            guard !train.isEmpty else { throw CLIError("--data \(data) has no .jsonl files") }
        } else { train = [data] }
        if let valid { return (train, valid) }
        let sibling = URL(fileURLWithPath: train[0]).deletingLastPathComponent().appendingPathComponent("valid.jsonl").path
        return (train, fm.fileExists(atPath: sibling) && !train.contains(sibling) ? sibling : nil)
    }

    /// Every line's tokens, each text followed by <|endoftext|>.
    static func tokens(files: [String], tokenizer: BPETokenizer, eos: Int) throws -> [Int32] {
        var out: [Int32] = []
        for file in files {
            guard let data = FileManager.default.contents(atPath: file) else { throw CLIError("cannot read \(file)") }
            var lineNo = 0
            for line in data.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: true) {
                lineNo += 1
                guard let obj = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any] else {
                    throw CLIError("\(file):\(lineNo): not a JSON object; each line must be {\"text\": ...} or {\"ids\": [...]}")
                }
                if let text = obj["text"] as? String {
                    out.append(contentsOf: tokenizer.encode(text).map(Int32.init))
                } else if let ids = obj["ids"] as? [Int] {
                    guard ids.allSatisfy({ $0 >= 0 && $0 < tokenizer.vocabSize }) else {
                        throw CLIError("\(file):\(lineNo): a token id is outside the tokenizer's vocabulary 0..<\(tokenizer.vocabSize)")
                    }
                    out.append(contentsOf: ids.map(Int32.init))
                } else {
                    throw CLIError("\(file):\(lineNo): no \"text\" string or \"ids\" list")
                }
                out.append(Int32(eos))
            }
        }
        guard !out.isEmpty else { throw CLIError("\(files.joined(separator: ", ")) holds no text") }
        return out
    }

    static func duration(_ s: Double) -> String {
        let t = Int(s.rounded())
        return t >= 3600 ? String(format: "%dh%02dm", t / 3600, t % 3600 / 60) : String(format: "%dm%02ds", t / 60, t % 60)
    }
}
