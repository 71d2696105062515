import ArgumentParser
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

/// Parses the command line and runs the command. Help and `--version` go to stdout with status 0;
/// any failure is one line on stderr, `error: <what is wrong and what to do>`, and status 64 for a
/// mistake in the command line (an unknown option, a value `validate()` refused) or 1 for a failure
/// while running. Swift-argument-parser's own `main()` would print `Error: ` followed by the usage
/// on more lines, which is why this does not use it: every error of every command reads the same.
func runCommandLine(_ root: ParsableCommand.Type, arguments: [String] = Array(CommandLine.arguments.dropFirst())) -> Never {
    do {
        var command = try root.parseAsRoot(arguments)
        try command.run()
        exit(0)
    } catch {
        let code = root.exitCode(for: error)
        if code == .success { root.exit(withError: error) }   // --help, --version
        let message = root.message(for: error).trimmingCharacters(in: .whitespacesAndNewlines)
        if !message.isEmpty {
            var line = "error: " + message.replacingOccurrences(of: "\n", with: " ")
            if code == .validationFailure { line += " (see '\(commandPath(root, arguments)) --help')" }
            FileHandle.standardError.write(Data((line + "\n").utf8))
        }
        exit(code.rawValue)
    }
}

/// The words of the command the arguments name (`pf2lora adapters list`), for the usage hint.
func commandPath(_ root: ParsableCommand.Type, _ arguments: [String]) -> String {
    var path = [root.configuration.commandName ?? "pf2lora"]
    var current = root
    for word in arguments {
        guard let sub = current.configuration.subcommands.first(where: { $0.configuration.commandName == word || $0._commandName == word }) else { break }
        path.append(word)
        current = sub
    }
    return path.joined(separator: " ")
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
        throw ValidationError("--targets: \(e)")
    }
}

/// `validate()`'s check of `--targets` against the model folder's config.json, when it can be read
/// (a missing or bad model folder is reported by `run()` with the model's own error).
func validateTargets(_ targets: String, modelFolder: String) throws {
    guard let a = try? ModelRegistry.architecture(folder: modelFolder) else { return }
    _ = try parseTargets(targets, a)
}

/// `--kv-cache auto|f32|f16`: what the KV caches keep keys and values at (nil: auto, f16 for a q8_0
/// base, else f32). Shared by generate, serve and the benchmarks.
enum KVCacheOption {
    static let help = "Precision of the KV cache: auto (f16 when the weights are q8_0, as llama.cpp's default cache, else f32), f32, or f16 (IEEE halves: half the bytes each decode step reads from the cache, one rounding of each key and value)."

    /// nil for auto, else the precision; throws a ValidationError naming the choices.
    static func parse(_ s: String) throws -> KVCachePrecision? {
        if s == "auto" { return nil }
        guard let p = KVCachePrecision(rawValue: s) else { throw ValidationError("--kv-cache must be auto, f32 or f16, not '\(s)'") }
        return p
    }
}

/// `--weights auto|f32|f16|bf16|q8_0`: the precision serving keeps the large tensors at (nil: auto,
/// as the checkpoint stores them). Shared by generate, serve and the benchmarks.
enum WeightsOption {
    static let help = "Precision the weights are kept and read at: auto (as the checkpoint stores them: an f16/bf16 checkpoint is served from its own bytes, no f32 copy), f32, f16, bf16, or q8_0 (8-bit blocks of 32 with an f16 scale, as GGUF's Q8_0, made at load; a matrix whose rows are not whole blocks stays as stored, see `model info`). Adapters stay f32."

    /// nil for auto, else the precision; throws a ValidationError naming the choices.
    static func parse(_ s: String) throws -> WeightPrecision? {
        if s == "auto" { return nil }
        guard let p = WeightPrecision(rawValue: s) else {
            throw ValidationError("--weights must be auto, f32, f16, bf16 or q8_0, not '\(s)'")
        }
        return p
    }
}
