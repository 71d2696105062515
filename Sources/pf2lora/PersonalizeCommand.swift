import ArgumentParser
import Foundation
import PF2LoRA

/// `pf2lora personalize`: train one client's level-2 pair on a few texts and publish it (docs/PERSONALIZE.md).
struct PersonalizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "personalize",
        abstract: "Train a new or existing client's own LoRA pair (C, D) on its texts, the shared pair frozen, and publish it as a new version.",
        discussion: """
        --texts is JSONL ({"text": ...} per line) or plain text with one text per blank-line-separated \
        paragraph. A new client starts from C Kaiming-uniform, D = 0; an existing one from its current \
        version. Training is AdamW on (C, D) only. Progress goes to stderr, a JSON summary to stdout. A \
        running `pf2lora serve` on the same store uses the new version from the client's next request.
        """)

    @OptionGroup var options: ModelOptions
    @Option(help: "The client id.") var client: String
    @Option(help: "The client's texts: .jsonl or plain text.") var texts: String
    @Option(help: "Optimizer steps.") var steps: Int = 100
    @Option(name: .customLong("max-seconds"), help: "Stop after this many seconds (whichever of --steps and this comes first).") var maxSeconds: Double?
    @Option(help: "AdamW learning rate.") var lr: Float = PersonalizeOptions().lr
    @Option(help: "Rank of a new client's pair (an existing client keeps its rank).") var rank2: Int?
    @Option(help: "Alpha of a new client's pair (default 2 x rank2).") var alpha2: Float?
    @Option(help: "Windows per step.") var batch: Int = PersonalizeOptions().batchSize
    @Option(help: "Tokens per window (T).") var seq: Int = PersonalizeOptions().seqLen
    @Option(help: "Random seed.") var seed: UInt64 = 0

    func validate() throws {
        guard options.store != nil else { throw ValidationError("personalize needs --store DIR (the adapter store to publish into)") }
        guard steps >= 1 else { throw ValidationError("--steps must be >= 1") }
        if let s = maxSeconds { guard s.isFinite, s > 0 else { throw ValidationError("--max-seconds must be a positive number of seconds") } }
        guard lr.isFinite, lr > 0 else { throw ValidationError("--lr must be a positive number") }
        if let r = rank2 { guard (1...256).contains(r) else { throw ValidationError("--rank2 must be in 1...256") } }
        if let a = alpha2 { guard a.isFinite, a > 0 else { throw ValidationError("--alpha2 must be a positive number") } }
        guard (1...64).contains(batch) else { throw ValidationError("--batch must be in 1...64") }
        guard (2...4096).contains(seq) else { throw ValidationError("--seq must be in 2...4096") }
    }

    func run() throws {
        // The client id and the texts are checked before the store is opened: opening it for a
        // publish creates the store (and its base folder) when missing, which an empty or broken
        // --texts file or an unusable id used to leave behind.
        do { try ClientID.validate(client) } catch { throw CLIError("\(error)") }
        let list: [String]
        do { list = try TextFile.read(texts) } catch { throw CLIError("\(error)") }
        guard list.contains(where: { !$0.allSatisfy(\.isWhitespace) }) else {
            throw CLIError("\(PersonalizeError.noTexts(client: client)) (\(texts) holds none)")
        }
        let (m, tok) = try options.loadModel()
        guard let store = try options.openStore(m, access: .write, create: true, command: "personalize") else { throw CLIError("personalize needs --store DIR") }
        if let why = store.readOnlyReason { throw CLIError(AdapterStoreError.readOnly(store: store.directory, why: why).description) }
        var o = PersonalizeOptions()
        o.steps = steps; o.maxSeconds = maxSeconds; o.lr = lr; o.rank2 = rank2; o.alpha2 = alpha2
        o.batchSize = batch; o.seqLen = seq; o.seed = seed
        let t0 = now()
        let every = max(1, steps / 20)
        let r: PersonalizeResult
        do {
            r = try personalize(weights: m.weights, tokenizer: tok, store: store, client: client, texts: list, options: o) { step, loss in
                if step == 1 || step % every == 0 || step == steps {
                    let el = now() - t0
                    log(String(format: "personalize %@: step %d/%d  loss %.4f  (%.1fs, ~%.0fs left)", client, step, steps, loss, el,
                               el / Double(step) * Double(max(0, steps - step))))
                }
            }
        } catch { throw CLIError("\(error)") }
        print(jsonLine(personalizeReply(r)))
        log(String(format: "personalize %@: published v%d (trained on shared %@) in %.1fs; loss %.4f -> %.4f; ranks %d..%d",
                   client, r.version, r.sharedVersion.map { "v\($0)" } ?? "none", r.seconds, r.loss.first ?? .nan, r.loss.last ?? .nan,
                   r.rankRange.min, r.rankRange.max))
    }
}
