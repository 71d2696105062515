import ArgumentParser
import Foundation
import PF2LoRA

struct ModelCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "model",
        abstract: "Make and inspect base models.",
        subcommands: [RandomModel.self])
}

struct RandomModel: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "random",
        abstract: "Write a random-weight GPT-2 in Hugging Face layout (config.json, model.safetensors, tokenizer files).",
        discussion: """
        For tests and benchmarks at real shapes with nothing downloaded. Weights are drawn as GPT-2 \
        initializes them (N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)) from --seed. \
        The tokenizer files are copied from --tokenizer (default: $PF2LORA_GPT2_TOKENIZER or \
        ../shared/gpt2-tokenizer), so the model has the real 50,257-token GPT-2 vocabulary.
        """)

    @Option(help: "Shape preset: gpt2 (124M), gpt2-medium (355M), distilgpt2, small (4 layers, 256 wide: the embedded default's shape), tiny (2 layers, 64 wide).")
    var config: String = "tiny"
    @Option(help: "Output folder (created if missing).")
    var out: String
    @Option(help: "Random seed.")
    var seed: UInt64 = 0
    @Option(help: "Folder with the tokenizer files to copy (tokenizer.json and/or vocab.json + merges.txt).")
    var tokenizer: String?
    @Option(help: "Storage dtype of the weights: f32, f16 or bf16.")
    var dtype: String = "f32"
    @Option(name: .customLong("vocab-size"), help: "Vocabulary size (default: the tokenizer's, else 50257).")
    var vocabSize: Int?

    func run() throws {
        let tokDir = tokenizer ?? defaultGPT2TokenizerFolder()
        var vocab = vocabSize ?? 50257
        if vocabSize == nil, let tokDir {
            vocab = try BPETokenizer(folder: tokDir).vocabSize
        }
        guard vocab > 0 else { throw CLIError("--vocab-size must be positive") }
        guard let cfg = GPT2Config.preset(config, vocabSize: vocab) else {
            throw CLIError("unknown --config '\(config)'; use gpt2, gpt2-medium, distilgpt2 or tiny")
        }
        guard let dt = DType(rawValue: dtype.uppercased()) else { throw CLIError("unknown --dtype '\(dtype)'; use f32, f16 or bf16") }
        let t0 = now()
        log("model random: \(config) (\(cfg.nLayer) layers, \(cfg.nEmbd) wide, vocab \(cfg.vocabSize)), seed \(seed)")
        let weights = ModelWeights.random(architecture: cfg.architecture, seed: seed)
        let model = LanguageModel(folder: out, weights: weights, file: nil)
        try model.save(to: out, dtype: dt)
        if let tokDir {
            var copied = 0
            for f in ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"] where FileManager.default.fileExists(atPath: tokDir + "/" + f) {
                let dst = out + "/" + f
                try? FileManager.default.removeItem(atPath: dst)
                try FileManager.default.copyItem(atPath: tokDir + "/" + f, toPath: dst)
                copied += 1
            }
            if copied == 0 { throw CLIError("--tokenizer \(tokDir) has no tokenizer.json or vocab.json + merges.txt") }
        } else {
            log("model random: no GPT-2 tokenizer found (pass --tokenizer DIR); the folder has no tokenizer files")
        }
        let params = weights.named.reduce(0) { $0 + $1.1.count }
        log(String(format: "model random: wrote %@ (%.1fM parameters) in %.1f s", out, Double(params) / 1e6, now() - t0))
    }
}
