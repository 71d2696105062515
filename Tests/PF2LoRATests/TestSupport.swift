import Foundation
import Testing

/// Paths the tests read: committed fixtures, the repository root, and the shared folder of real
/// tokenizers that sits beside the repository on the development machines (`../shared`, or
/// wherever $PF2LORA_SHARED_DIR says). A user's clone has no shared folder: the tests that need it
/// are skipped with a message (`.needsSharedTokenizers`), the rest run.
enum TestPaths {
    static let testsDir = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    static let fixtures = testsDir.appendingPathComponent("Fixtures")
    static let repoRoot = testsDir.deletingLastPathComponent().deletingLastPathComponent()
    /// The shared folder (real tokenizers): $PF2LORA_SHARED_DIR, else ../shared beside the repository.
    static let shared: URL = {
        if let dir = ProcessInfo.processInfo.environment["PF2LORA_SHARED_DIR"], !dir.isEmpty { return URL(fileURLWithPath: dir) }
        return repoRoot.deletingLastPathComponent().appendingPathComponent("shared")
    }()
    static let gpt2Tokenizer = shared.appendingPathComponent("gpt2-tokenizer")
    /// Whether the real GPT-2 tokenizer is there to test against.
    static let hasGPT2Tokenizer = FileManager.default.fileExists(atPath: gpt2Tokenizer.appendingPathComponent("tokenizer.json").path)

    static func fixture(_ relative: String) -> String { fixtures.appendingPathComponent(relative).path }

    /// A fresh empty temporary folder, removed by the caller with `cleanup`.
    static func tempDir(_ tag: String = "t") -> String {
        let p = NSTemporaryDirectory() + "pf2lora-\(tag)-\(UUID().uuidString)"
        try? FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
        return p
    }
}

/// Runs one of the repository's Python scripts (`scripts/<name>`) with `python3` from PATH and collects its exit
/// status, standard output and standard error.
enum PythonScript {
    static func run(_ script: String, _ arguments: [String]) throws -> (status: Int32, out: String, err: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", TestPaths.repoRoot.appendingPathComponent("scripts/\(script)").path] + arguments
        let o = Pipe(), e = Pipe()
        p.standardOutput = o; p.standardError = e
        try p.run()
        let out = String(decoding: o.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let err = String(decoding: e.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return (p.terminationStatus, out, err)
    }
}

extension Trait where Self == ConditionTrait {
    /// A test that reads the real GPT-2 tokenizer from the shared folder; skipped, saying so, without it.
    static var needsSharedTokenizers: Self {
        .enabled(if: TestPaths.hasGPT2Tokenizer,
                 "needs the real GPT-2 tokenizer at \(TestPaths.gpt2Tokenizer.path) (absent in a clone; set PF2LORA_SHARED_DIR to the folder that holds gpt2-tokenizer/)")
    }
}
