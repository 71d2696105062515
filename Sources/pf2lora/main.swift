import ArgumentParser
import PF2LoRA

struct PF2LoRACommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "pf2lora", abstract: "Serve and personalize language models with two-level LoRA (PF2LoRA).", subcommands: [SyntheticCommand.self])
}
PF2LoRACommand.main()
