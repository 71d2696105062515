import Foundation
import PF2LoRA

/// Writes a line to stderr (logs and progress; stdout carries results only).
func log(_ s: String) {
    FileHandle.standardError.write((s + "\n").data(using: .utf8)!)
}

/// Seconds since an arbitrary origin, monotonic.
func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) * 1e-9 }

/// JSON text of a dictionary with sorted keys (for results printed on stdout).
func jsonLine(_ obj: [String: Any]) -> String {
    let data = try! JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])
    return String(decoding: data, as: UTF8.self)
}

/// A CLI error: one line on stderr, exit code 1.
struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ s: String) { description = s }
}

/// Where the real GPT-2 tokenizer files are, when the user did not say: $PF2LORA_GPT2_TOKENIZER,
/// then ../shared/gpt2-tokenizer and shared/gpt2-tokenizer relative to the working directory.
func defaultGPT2TokenizerFolder() -> String? {
    var candidates: [String] = []
    if let env = ProcessInfo.processInfo.environment["PF2LORA_GPT2_TOKENIZER"] { candidates.append(env) }
    candidates += ["../shared/gpt2-tokenizer", "shared/gpt2-tokenizer"]
    return candidates.first { FileManager.default.fileExists(atPath: $0 + "/vocab.json") || FileManager.default.fileExists(atPath: $0 + "/tokenizer.json") }
}

/// Swift repairs invalid UTF-8 in command-line arguments (U+FFFD), so a wrong encoding would go
/// unnoticed; this checks the raw bytes of `option`'s value (`--opt VALUE` or `--opt=VALUE`).
func rawArgumentIsValidUTF8(option: String) -> Bool {
    let argv = CommandLine.unsafeArgv
    var i = 1
    while i < Int(CommandLine.argc) {
        guard let raw = argv[i] else { i += 1; continue }
        let valid = String(validatingCString: raw) != nil
        let arg = String(cString: raw)
        if arg == option, i + 1 < Int(CommandLine.argc), let next = argv[i + 1] {
            if String(validatingCString: next) == nil { return false }
        } else if arg.hasPrefix(option + "="), !valid {
            return false
        }
        i += 1
    }
    return true
}

/// The slots of a `--targets` list (`attn.c_attn,mlp.c_fc`, `q_proj,v_proj`, or `all`) of an architecture.
func parseTargets(_ targets: String, _ a: ModelArchitecture) throws -> [LinearSlot] {
    if targets.trimmingCharacters(in: .whitespaces) == "all" { return a.slots }
    do {
        return try a.slots(named: targets.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
    } catch let e as ModelError {
        throw CLIError("--targets: \(e)")
    }
}
