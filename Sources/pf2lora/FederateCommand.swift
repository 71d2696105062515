import ArgumentParser
import Foundation
import PF2LoRA

/// `pf2lora federate`: federated LoRA training of a base model over client text folders, published into the store.
struct FederateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "federate",
        abstract: "Train a federation of clients with PF2LoRA (or a baseline) on a base model (GPT-2 or Llama family) and publish the adapters into the store.",
        discussion: """
        --data holds one folder per client (its name is the client id) with train, valid and test as \
        .jsonl ({"text": ...} per line) or .txt (texts separated by blank lines). Progress goes to stderr. \
        On success the shared adapter and every client's adapter are published as new versions (see \
        docs/PERSONALIZE.md for how single-level methods are stored); a failed run writes nothing to \
        the store. --out gets metrics.json, loss.svg and results.md.
        """)

    @OptionGroup var options: ModelOptions
    @Option(help: "Folder with one sub-folder of texts per client.") var data: String
    @Option(help: "pf2lora, homlora, perfedavg, hetlora, local or fedavg-ft.") var method: String = "pf2lora"
    @Option(help: "Only these clients (comma-separated folder names).") var clients: String?
    @Option(help: "Communication rounds.") var rounds: Int = 10
    @Option(name: .customLong("clients-per-round"), help: "Clients sampled per round (0 = all).") var clientsPerRound: Int = 0
    @Option(name: .customLong("local-steps"), help: "Local iterations per round.") var localSteps: Int = 5
    @Option(name: .customLong("lower-steps"), help: "PF2LoRA: SGD steps on (C, D) per local iteration.") var lowerSteps: Int = 2
    @Option(help: "Shared rank r.") var rank: Int = 8
    @Option(help: "Client rank r2.") var rank2: Int = 2
    @Option(help: "Shared alpha (default 2 x rank).") var alpha: Float?
    @Option(help: "Client alpha (default 2 x rank2).") var alpha2: Float?
    @Option(help: "AdamW rate of the shared level (and of single-level baselines).") var lr: Float = 2e-3
    @Option(help: "SGD rate of PF2LoRA's client level (and Per-FedAvg's inner step unless --inner-lr is given).") var lr2: Float = 0.05
    @Option(help: "steps: every method runs --local-steps iterations per round; compute: every method makes PF2LoRA's gradient evaluations (local-steps x (lower-steps + 1)) per client per round.")
    var budget: String = "steps"
    @Option(name: .customLong("inner-lr"), help: "Per-FedAvg's inner (adaptation) SGD rate (default: --lr2).") var innerLR: Float?
    @Option(name: .customLong("hetlora-lambda"), help: "HETLoRA's sparsity penalty weight.") var hetloraLambda: Float = 1e-3
    @Option(name: .customLong("hetlora-prune"), help: "HETLoRA prunes its tail rank when its norm falls below this fraction of the whole update's.") var hetloraPrune: Float = 0.05
    @Option(help: "PF2LoRA ablations: bilevel (the method), joint (one AdamW on both levels, no alternation) or client-only (no shared level).")
    var variant: String = "bilevel"
    @Option(name: .customLong("lower-optimizer"), help: "PF2LoRA ablation: the client level's optimizer, sgd or adamw (its own, fresh each round), at --lr2. Default: the variant's own (bilevel: SGD; joint: the one AdamW of both levels at --lr).")
    var lowerOptimizer: String?
    @Option(name: .customLong("schedule-lower-lr"), help: "PF2LoRA: whether the round schedule (cosine) also scales --lr2 (true/false).")
    var scheduleLowerLR: Bool = false
    @Option(name: .customLong("fine-tune-steps"), help: "FedAvg+FT's fine-tuning steps after the rounds. --budget steps: on top of the rounds (default 5 x --local-steps); compute: taken out of the same budget, the rounds share the rest (default one round's worth).")
    var fineTuneSteps: Int?
    @Option(name: .customLong("baseline-rank"), help: "Rank of the single-level baselines (default rank + rank2; HOMLoRA at --baseline-rank = rank is PF2LoRA with r2 = 0).")
    var baselineRank: Int?
    @Option(name: .customLong("token-cache"), help: "Folder caching the tokenized --data (keyed by the bytes of the data and tokenizer files).")
    var tokenCache: String?
    @Flag(name: .customLong("no-test"), help: "Do not read the test split (hyperparameter selection on valid); test losses are reported as null.")
    var noTest = false
    @Option(help: "Gradient clipping norm (0 = off).") var clip: Float = 1
    @Option(help: "Windows per minibatch.") var batch: Int = 8
    @Option(help: "Tokens per window (T).") var seq: Int = 64
    @Option(help: "Random seed (the same seed gives the same adapters).") var seed: UInt64 = 0
    @Option(help: "Adapted linear layers, comma-separated: the model's slots (GPT-2: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; Llama family: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), or all.")
    var targets: String = "all"
    @Option(name: .customLong("eval-every"), help: "Evaluate on the valid split every N rounds (0 = only at the end).") var evalEvery: Int = 0
    @Option(name: .customLong("eval-windows"), help: "Evaluate on at most this many windows per split (0 = whole split).") var evalWindows: Int = 0
    @Option(help: "Folder for metrics.json, loss.svg and results.md.") var out: String?

    func validate() throws {
        guard FederatedMethod(rawValue: method) != nil else {
            throw ValidationError("unknown --method '\(method)'; use \(FederatedMethod.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard options.store != nil else { throw ValidationError("federate needs --store DIR (where the trained adapters are published)") }
        guard rounds >= 1, localSteps >= 1, lowerSteps >= 0, rank >= 1, rank2 >= 1, batch >= 1, seq >= 2, clientsPerRound >= 0 else {
            throw ValidationError("need --rounds, --local-steps, --rank, --rank2, --batch >= 1, --seq >= 2, --lower-steps and --clients-per-round >= 0")
        }
        guard lr.isFinite, lr > 0, lr2.isFinite, lr2 > 0, clip.isFinite, clip >= 0 else {
            throw ValidationError("--lr and --lr2 must be positive numbers, --clip a number >= 0 (0 = off)")
        }
        guard BudgetMode(rawValue: budget) != nil else { throw ValidationError("unknown --budget '\(budget)'; use steps or compute") }
        guard PF2LoRAVariant(rawValue: variant) != nil else {
            throw ValidationError("unknown --variant '\(variant)'; use \(PF2LoRAVariant.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if let o = lowerOptimizer, LowerOptimizer(rawValue: o) == nil {
            throw ValidationError("unknown --lower-optimizer '\(o)'; use \(LowerOptimizer.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if let r = baselineRank, r < 1 { throw ValidationError("--baseline-rank must be >= 1") }
        if let f = fineTuneSteps, f < 0 { throw ValidationError("--fine-tune-steps must be >= 0") }
        guard evalEvery >= 0, evalWindows >= 0 else { throw ValidationError("--eval-every and --eval-windows must be >= 0 (0 = off)") }
        try validateTargets(targets, modelFolder: options.model)
    }

    func run() throws {
        let m = FederatedMethod(rawValue: method)!
        let budgetMode = BudgetMode(rawValue: budget)!
        let pf2loraVariant = PF2LoRAVariant(rawValue: variant)!
        let (model, tok) = try options.loadModel()
        let kinds = try parseTargets(targets, model.architecture)
        let only = clients?.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        let t0 = now()
        let clientData = try tokenCache.map { try TokenCache.load(folder: data, modelFolder: options.model, tokenizer: tok, clients: only, cacheDir: $0) }
            ?? loadClientData(folder: data, tokenizer: tok, clients: only)
        let T = min(seq, model.architecture.contextLength)
        let task = try LMTask(weights: model.weights, clients: clientData, batchSize: batch, seqLen: T, targets: kinds,
                                  padToken: textSeparator(tok))
        if evalWindows > 0 { task.evalWindowLimit = evalWindows }
        // The store is opened (and created when missing) only once --data has been read: a missing
        // or empty data folder used to leave a new, empty store behind.
        guard let store = try options.openStore(model, access: .write, create: true, command: "federate") else { throw CLIError("federate needs --store DIR") }
        if let why = store.readOnlyReason { throw CLIError(AdapterStoreError.readOnly(store: store.directory, why: why).description) }
        log(String(format: "federate: %d clients (%@), %d train texts, %d train tokens; tokenized in %.1fs", clientData.count,
                   clientData.map(\.id).joined(separator: ", "), clientData.reduce(0) { $0 + $1.train.textCount },
                   clientData.reduce(0) { $0 + $1.train.tokens.count }, now() - t0))

        var fc = FederatedConfig()
        fc.rounds = rounds; fc.clientsPerRound = clientsPerRound; fc.localSteps = localSteps; fc.lowerSteps = lowerSteps
        fc.rank = rank; fc.rank2 = rank2; fc.alpha = alpha ?? 2 * Float(rank); fc.alpha2 = alpha2 ?? 2 * Float(rank2)
        fc.upperLR = lr; fc.lowerLR = lr2; fc.clipNorm = clip; fc.seed = seed; fc.evalEvery = evalEvery
        fc.minLRRatio = 0.1
        fc.budget = budgetMode; fc.skipTest = noTest; fc.pf2loraVariant = pf2loraVariant; fc.baselineRank = baselineRank
        fc.perFedAvgInnerLR = innerLR; fc.hetloraLambda = hetloraLambda; fc.hetloraPruneRatio = hetloraPrune
        fc.fineTuneSteps = fineTuneSteps
        fc.lowerOptimizer = lowerOptimizer.flatMap(LowerOptimizer.init(rawValue:)); fc.scheduleLowerLR = scheduleLowerLR

        // Refuse early when the shared level's shape would not match the store's (HETLoRA's is known only at the end).
        let ids = clientData.map(\.id)
        if let (r, a) = sharedLayout(m, fc) {
            try checkConsistent(rank: r, alpha: a, rslora: fc.rslora, modules: Set(task.modules.map(\.name)), with: store)
        }

        // The versions this run starts from: its publish is a compare-and-swap on them.
        let start = try startVersions(store, clients: ids)
        let result: FederatedResult
        do {
            result = try runFederated(m, task: task, config: fc) { line in log("federate: " + line) }
        } catch let FederatedError.nonFiniteLoss(_, round, client) {
            throw CLIError("\(m.displayName): the training loss of client '\(ids[client])' became non-finite in round \(round + 1); nothing was written to the store. Lower --lr (now \(lr)) or --lr2 (now \(lr2)), or set --clip")
        }
        log(String(format: "federate: trained in %.1fs", result.seconds))

        let adapters = try federatedAdapters(result, modules: task.modules, clientIDs: ids, base: store.base)
        try checkConsistent(adapters.shared, with: store)
        let versions = try publish(adapters, to: store, from: start)
        log("federate: published shared v\(versions.shared) and \(versions.clients.count) client versions into \(store.directory)")

        // Metrics.
        let baseTest = (0..<ids.count).map { noTest ? Float.nan : task.evaluate(client: $0, adapter: .none, split: .test) }
        let baseValid = (0..<ids.count).map { task.evaluate(client: $0, adapter: .none, split: .valid) }
        // A two-level result's shared pair alone (what a client without a pair of its own is served with).
        let sharedOnly: [TwoLevelAdapter?] = result.clientAdapters.map { a in
            a.shared != nil && a.local != nil ? TwoLevelAdapter(shared: a.shared, sharedScale: a.sharedScale) : nil
        }
        let sharedTest = (0..<ids.count).map { k in noTest ? Float.nan : sharedOnly[k].map { task.evaluate(client: k, adapter: $0, split: .test) } ?? .nan }
        let sharedValid = (0..<ids.count).map { k in sharedOnly[k].map { task.evaluate(client: k, adapter: $0, split: .valid) } ?? .nan }
        let tokensPerEvaluation = batch * T
        var perClient: [[String: Any]] = []
        var table = MarkdownTable(["client", "train texts", "base test loss", "valid loss", "valid ppl", "test loss", "test ppl", "rank min-max (mean)", "version"],
                                  align: [.left, .right, .right, .right, .right, .right, .right, .center, .right])
        for (k, id) in ids.enumerated() {
            let spectra = LearnedRank.spectra(modules: task.modules, adapter: result.clientAdapters[k])
            let ranks = spectra.mapValues { LearnedRank.rank($0) }
            let rv = Array(ranks.values)
            let mean = Double(rv.reduce(0, +)) / Double(max(1, rv.count))
            perClient.append([
                "client": id, "train_texts": clientData[k].train.textCount, "train_tokens": clientData[k].train.tokens.count,
                "train_loss": result.rounds.map { $0.trainLoss[k].map { Double($0) as Any } ?? NSNull() },
                "valid_loss_by_round": result.rounds.compactMap { r in r.validLoss.map { ["round": r.round, "loss": Double($0[k])] } },
                "valid_loss": Double(result.validLoss[k]), "valid_perplexity": exp(Double(result.validLoss[k])),
                "test_loss": json(result.testLoss[k]), "test_perplexity": json(exp(result.testLoss[k])),
                "base_test_loss": json(baseTest[k]), "base_valid_loss": Double(baseValid[k]),
                "shared_only_test_loss": json(sharedTest[k]), "shared_only_valid_loss": json(sharedValid[k]),
                "gradient_evaluations": result.trainingEvaluations[k], "adaptation_evaluations": result.adaptationEvaluations[k],
                "tokens": result.trainingEvaluations[k] * tokensPerEvaluation,
                "trainable_parameters": result.trainableParameters[k], "uploaded_parameters_per_round": result.uploadedParameters[k],
                "ranks": ranks, "rank_min": rv.min() ?? 0, "rank_max": rv.max() ?? 0, "rank_mean": mean,
                "version": versions.clients[id] ?? 0,
            ])
            table.add([id, "\(clientData[k].train.textCount)", f4(baseTest[k]), f4(result.validLoss[k]), f2(exp(result.validLoss[k])),
                       f4(result.testLoss[k]), f2(exp(result.testLoss[k])), String(format: "%d-%d (%.1f)", rv.min() ?? 0, rv.max() ?? 0, mean),
                       "v\(versions.clients[id] ?? 0)"])
        }
        let meanTest = result.meanTestLoss
        let evaluations = result.trainingEvaluations.reduce(0, +)
        let summary = "\(m.displayName), budget \(budgetMode.rawValue): \(rounds) rounds x \(result.localIterations) local iterations (\(fc.evaluationsPerRound(for: m)) gradient evaluations per client per round; \(evaluations) in all, \(evaluations * tokensPerEvaluation) tokens), r=\(rank) r2=\(rank2), B=\(batch) T=\(T), seed \(seed): mean valid loss \(f4(mean(result.validLoss))), mean test loss \(noTest ? "not read" : f4(meanTest) + " (ppl " + f2(exp(meanTest)) + ")"), \(String(format: "%.1f", result.seconds)) s (training \(String(format: "%.1f", result.trainingSeconds)) s); store shared v\(versions.shared)"
        print(summary)
        print(table.render())
        if let out {
            try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            let obj: [String: Any] = [
                "method": m.rawValue, "seed": Int(seed), "rounds": rounds, "clients_per_round": clientsPerRound, "local_steps": localSteps,
                "lower_steps": lowerSteps, "rank": rank, "rank2": rank2, "alpha": Double(fc.alpha), "alpha2": Double(fc.alpha2),
                "lr": Double(lr), "lr2": Double(lr2), "batch": batch, "seq": T, "targets": kinds.map(\.path),
                "rank_rule": "sigma_i > \(LearnedRank.defaultTau) * sigma_max", "seconds": result.seconds,
                "model": model.folder, "store": store.directory, "shared_version": versions.shared,
                "budget": budgetMode.rawValue, "local_iterations": result.localIterations,
                "variant": pf2loraVariant.rawValue, "baseline_rank": fc.singleRank,
                "lower_optimizer": fc.lowerOptimizer?.rawValue ?? "default", "schedule_lower_lr": scheduleLowerLR,
                "gradient_evaluations_per_round": fc.evaluationsPerRound(for: m), "tokens_per_evaluation": tokensPerEvaluation,
                "fine_tune_steps": m == .fedavgFT ? fc.fineTuneIterations() : 0,
                "gradient_evaluations": evaluations, "tokens": evaluations * tokensPerEvaluation,
                "training_seconds": result.trainingSeconds, "seconds_per_round": result.trainingSeconds / Double(rounds),
                "peak_rss_bytes": peakResidentBytes(),
                "inner_lr": Double(fc.perFedAvgInnerLR ?? fc.lowerLR), "hetlora_lambda": Double(hetloraLambda), "hetlora_prune": Double(hetloraPrune),
                "test_read": !noTest, "data": data,
                "mean_valid_loss": Double(mean(result.validLoss)), "mean_base_valid_loss": Double(mean(baseValid)),
                "mean_valid_loss_by_round": result.rounds.compactMap { r in r.meanValidLoss.map { ["round": r.round, "loss": Double($0)] } },
                "mean_test_loss": json(meanTest), "mean_train_loss_by_round": result.rounds.map { Double($0.meanTrainLoss) },
                "clients": perClient,
            ]
            try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys]).write(to: URL(fileURLWithPath: out + "/metrics.json"))
            var plot = LinePlot(title: "\(m.displayName): per-client training loss", xLabel: "round", yLabel: "mean minibatch cross-entropy")
            for (k, id) in ids.enumerated() {
                let pts = result.rounds.compactMap { r in r.trainLoss[k].map { (Double(r.round), Double($0)) } }
                plot.add(LinePlot.Series(name: id, x: pts.map(\.0), y: pts.map(\.1), color: SVG.palette[k % SVG.palette.count]))
            }
            try plot.svg().write(toFile: out + "/loss.svg", atomically: true, encoding: .utf8)
            try ("# pf2lora federate\n\n" + summary + "\n\n" + table.render() + "\n").write(toFile: out + "/results.md", atomically: true, encoding: .utf8)
            log("federate: wrote \(out)/metrics.json, loss.svg, results.md")
        }
    }

}

private func f4(_ x: Float) -> String { String(format: "%.4f", x) }
private func f2(_ x: Float) -> String { String(format: "%.2f", x) }
private func mean(_ v: [Float]) -> Float { v.reduce(0, +) / Float(max(1, v.count)) }
/// A loss for metrics.json: null when it was not computed (test split not read).
private func json(_ x: Float) -> Any { x.isFinite ? Double(x) : NSNull() }

/// The process's peak resident set size in bytes (VmHWM of /proc/self/status; 0 where it is unavailable).
private func peakResidentBytes() -> Int {
    guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
          let line = s.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
          let kb = Int(line.split(separator: " ").dropFirst().first ?? "") else { return 0 }
    return kb * 1024
}
