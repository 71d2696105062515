import ArgumentParser
import Foundation
import PF2LoRA

struct PF2LoRACommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pf2lora",
        abstract: "Serve and personalize language models (GPT-2 and the Llama family: SmolLM2, Qwen2.5, Qwen3, Llama-3.x) for many clients with two-level LoRA (PF2LoRA).",
        discussion: """
        Every client k is served W0 + (alpha/r) B A + (alpha2/r2) D_k C_k: a frozen base, a LoRA pair \
        shared by the federation, and a small pair of its own. Logs and progress go to stderr; a \
        failure is one line on stderr starting `error: ` and a non-zero exit status (64 for a \
        mistake in the command line, 1 otherwise).

        Start with `pf2lora serve --model DIR --store DIR` (docs/PROTOCOL.md); `federate` trains a \
        federation in one process, and `serve`'s train_local method makes a process one node of a \
        federation across machines (docs/FLOWER.md).
        """,
        version: PF2LoRAVersion.string,
        subcommands: [GenerateCommand.self, ServeCommand.self, PersonalizeCommand.self, FederateCommand.self, PretrainCommand.self,
                      SyntheticCommand.self, Adapters.self, Tokenize.self, ModelCommand.self, BenchCommand.self])
}

runCommandLine(PF2LoRACommand.self)
