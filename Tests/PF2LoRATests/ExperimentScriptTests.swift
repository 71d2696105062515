import Foundation
import Testing

/// scripts/experiment.py's own checks (`--self-test`, no binary, under a second): equal grid sizes with
/// --extra-points, knob names per method, grid extensions, and the refusal to reuse a run made with another command.
@Suite struct ExperimentScriptTests {
    @Test func experimentSelfTest() throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", TestPaths.repoRoot.appendingPathComponent("scripts/experiment.py").path, "--self-test"]
        let o = Pipe(), e = Pipe()
        p.standardOutput = o; p.standardError = e
        try p.run()
        let out = String(decoding: o.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let err = String(decoding: e.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0, "\(out)\n\(err)")
        #expect(out.contains("experiment self-test: ok"), "\(out)\n\(err)")
    }
}
