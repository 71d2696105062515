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

extension Trait where Self == ConditionTrait {
    /// A test that reads the real GPT-2 tokenizer from the shared folder; skipped, saying so, without it.
    static var needsSharedTokenizers: Self {
        .enabled(if: TestPaths.hasGPT2Tokenizer,
                 "needs the real GPT-2 tokenizer at \(TestPaths.gpt2Tokenizer.path) (absent in a clone; set PF2LORA_SHARED_DIR to the folder that holds gpt2-tokenizer/)")
    }
}
