import ArgumentParser
import PF2LoRA

struct PF2LoRACommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pf2lora",
        abstract: "Serve and personalize GPT-2 language models for many clients with two-level LoRA (PF2LoRA).",
        discussion: """
        Every client k is served W0 + (alpha/r) B A + (alpha2/r2) D_k C_k: a frozen base, a LoRA pair
        shared by the federation, and a small pair of its own. Logs and progress go to stderr.
        """,
        subcommands: [GenerateCommand.self, ServeCommand.self, PersonalizeCommand.self, FederateCommand.self, PretrainCommand.self,
                      SyntheticCommand.self, Adapters.self, Tokenize.self, ModelCommand.self, BenchCommand.self, TestPublishLoopCommand.self])
}
PF2LoRACommand.main()
