import Foundation

/// Paths the tests read: committed fixtures, the repository root and ../shared beside it
/// (or $PF2LORA_SHARED_DIR).
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

    static func fixture(_ relative: String) -> String { fixtures.appendingPathComponent(relative).path }

    /// A fresh empty temporary folder, removed by the caller with `cleanup`.
    static func tempDir(_ tag: String = "t") -> String {
        let p = NSTemporaryDirectory() + "pf2lora-\(tag)-\(UUID().uuidString)"
        try? FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
        return p
    }
}
