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
