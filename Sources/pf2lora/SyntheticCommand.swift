import ArgumentParser
import Foundation
import PF2LoRA

/// `pf2lora synthetic`: the synthetic rank experiment (docs/SYNTHETIC.md).
struct SyntheticCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "synthetic",
        abstract: "Run PF2LoRA and every baseline on a synthetic federation with known client ranks.",
        discussion: "Writes results.md, results.json, spectra.svg, loss.svg and mse.svg into --out; progress goes to stderr.")

    @Option(help: "Seed of the federation and of training.") var seed: UInt64 = 0
    @Option(help: "Output folder.") var out: String = "runs/synthetic"
    @Option(help: "Number of clients.") var clients: Int = 8
    @Option(help: "Communication rounds.") var rounds: Int = 150
    @Option(name: .customLong("local-steps"), help: "Local iterations per round.") var localSteps: Int = 10
    @Option(name: .customLong("lower-steps"), help: "PF2LoRA SGD steps on (C, D) per local iteration.") var lowerSteps: Int = 5
    @Option(name: .customLong("clients-per-round"), help: "Clients sampled per round (0 = all).") var clientsPerRound: Int = 0
    @Option(help: "Shared rank r.") var rank: Int = 8
    @Option(name: .customLong("rank2"), help: "Client rank r2.") var rank2: Int = 2
    @Option(name: .customLong("true-rank"), help: "Generator's shared rank (default --rank): a truth the model is not specified for.") var trueRank: Int?
    @Option(name: .customLong("true-rank2"), help: "Generator's client budget m_k + a_k (default --rank2): true ranks span [true-rank - true-rank2, true-rank + true-rank2].") var trueRank2: Int?
    @Option(name: .customLong("d-in"), help: "Input dimension.") var dIn: Int = 40
    @Option(name: .customLong("d-out"), help: "Output dimension.") var dOut: Int = 32
    @Option(name: .customLong("upper-lr"), help: "AdamW rate of the shared level and of the baselines.") var upperLR: Float = 0.01
    @Option(help: "Shared alpha (default 2 x rank; the single-level baselines keep the same alpha / rank ratio).") var alpha: Float?
    @Option(name: .customLong("lower-lr"), help: "SGD rate of PF2LoRA's client level.") var lowerLR: Float = 0.05
    @Option(name: .customLong("noise"), help: "Target noise standard deviation.") var noise: Float = 0.1
    @Option(name: .customLong("batch"), help: "Minibatch size.") var batch: Int = 64
    @Option(name: .customLong("train-min"), help: "Fewest training examples of a client.") var trainMin: Int = 100
    @Option(name: .customLong("train-max"), help: "Most training examples of a client.") var trainMax: Int = 400
    @Option(help: "Rank threshold tau (relative to the largest singular value).") var tau: Float = LearnedRank.defaultTau
    @Option(help: "Comma-separated methods (pf2lora,homlora,perfedavg,hetlora,local,fedavg-ft); default all.") var methods: String?
    @Option(name: .customLong("eval-every"), help: "Evaluate on the valid split every N rounds.") var evalEvery: Int = 5
    @Flag(help: "Print only the final table.") var quiet = false
    @Flag(name: .customLong("schedule-lower"), help: "Decay the lower-level rate with the round schedule too.") var scheduleLower = false
    @Flag(name: .customLong("persist-adam"), help: "Keep client AdamW moments across rounds.") var persistAdam = false
    @Option(name: .customLong("min-lr-ratio"), help: "Cosine floor of the round schedule.") var minLRRatio: Float = 0.01
    @Option(help: "steps (every method runs --local-steps iterations) or compute (every method makes PF2LoRA's local-steps x (lower-steps + 1) gradient evaluations per client per round).")
    var budget: String = "steps"
    @Option(name: .customLong("inner-lr"), help: "Per-FedAvg's inner SGD rate (default --lower-lr).") var innerLR: Float?
    @Option(name: .customLong("hetlora-lambda"), help: "HETLoRA's sparsity penalty weight.") var hetloraLambda: Float = 1e-3
    @Option(name: .customLong("hetlora-prune"), help: "HETLoRA's tail-pruning ratio.") var hetloraPrune: Float = 0.05
    @Option(help: "PF2LoRA: bilevel, joint or client-only (ablations, docs/METHOD.md).") var variant: String = "bilevel"
    @Option(name: .customLong("baseline-rank"), help: "Rank of the single-level baselines (default rank + rank2).") var baselineRank: Int?

    func validate() throws {
        guard clients >= 1, rounds >= 1, rank >= rank2, rank2 >= 1 else {
            throw ValidationError("need --clients >= 1, --rounds >= 1 and --rank >= --rank2 >= 1")
        }
        guard rank + rank2 <= min(dIn, dOut) else { throw ValidationError("--rank + --rank2 must be <= min(--d-in, --d-out)") }
        if let alpha { guard alpha.isFinite, alpha > 0 else { throw ValidationError("--alpha must be a positive number") } }
    }

    func run() throws {
        var sc = SyntheticConfig()
        sc.clients = clients; sc.dIn = dIn; sc.dOut = dOut; sc.rank = trueRank ?? rank; sc.rank2 = trueRank2 ?? rank2
        guard sc.rank >= sc.rank2, sc.rank2 >= 1, sc.rank + sc.rank2 <= min(dIn, dOut) else {
            throw ValidationError("need true-rank >= true-rank2 >= 1 and true-rank + true-rank2 <= min(d-in, d-out)")
        }
        sc.noiseStd = noise; sc.trainMin = trainMin; sc.trainMax = trainMax; sc.batchSize = batch; sc.seed = seed
        var fc = FederatedConfig()
        fc.rounds = rounds; fc.localSteps = localSteps; fc.lowerSteps = lowerSteps; fc.clientsPerRound = clientsPerRound
        fc.rank = rank; fc.rank2 = rank2; fc.alpha = alpha ?? 2 * Float(rank); fc.alpha2 = 2 * Float(rank2)
        fc.upperLR = upperLR; fc.lowerLR = lowerLR; fc.seed = seed; fc.evalEvery = evalEvery
        fc.scheduleLowerLR = scheduleLower; fc.persistClientOptimizer = persistAdam; fc.minLRRatio = minLRRatio
        guard let b = BudgetMode(rawValue: budget) else { throw ValidationError("--budget must be steps or compute") }
        guard let v = PF2LoRAVariant(rawValue: variant) else {
            throw ValidationError("--variant must be one of \(PF2LoRAVariant.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if let r = baselineRank, r < 1 { throw ValidationError("--baseline-rank must be >= 1") }
        fc.budget = b; fc.pf2loraVariant = v; fc.baselineRank = baselineRank; fc.perFedAvgInnerLR = innerLR
        fc.hetloraLambda = hetloraLambda; fc.hetloraPruneRatio = hetloraPrune
        var list = FederatedMethod.allCases
        if let methods {
            list = try methods.split(separator: ",").map { s in
                guard let m = FederatedMethod(rawValue: s.trimmingCharacters(in: .whitespaces)) else {
                    throw ValidationError("unknown method '\(s)'; use \(FederatedMethod.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                return m
            }
        }
        let log: ((String) -> Void)? = quiet ? nil : { line in FileHandle.standardError.write(Data((line + "\n").utf8)) }
        let exp = SyntheticExperiment(synthetic: sc, federated: fc, methods: list, tau: tau)
        let (report, _, _) = try exp.run(log: log)
        try SyntheticExperiment.write(report, to: out)
        print(SyntheticExperiment.markdown(report))
        FileHandle.standardError.write(Data("wrote \(out)/results.md, results.json, spectra.svg, loss.svg, mse.svg\n".utf8))
    }
}
