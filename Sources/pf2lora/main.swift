import ArgumentParser
import Foundation
import CQuant
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

// Before anything runs: a build for AVX2 CPUs refuses a CPU without them with one clear line
// instead of an illegal instruction somewhere later (this file is compiled for baseline x86-64).
#if PF2LORA_X86_64_V3
if let e = pf2lora_cpu_requirement_error(1, pf2lora_cpu_isa()) {
    FileHandle.standardError.write(Data(("error: " + String(cString: e) + "\n").utf8))
    exit(1)
}
#endif

runCommandLine(PF2LoRACommand.self)
