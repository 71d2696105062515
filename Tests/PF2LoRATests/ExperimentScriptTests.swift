import Foundation
import Testing

/// scripts/experiment.py's own checks (`--self-test`, no binary, a few seconds with the page): equal grid sizes with
/// --extra-points, knob names per method, grid extensions, the refusal to reuse a run made with another command, and a
/// page written from made-up runs (it counts their clients; skipped, saying so, without scipy).
@Suite struct ExperimentScriptTests {
    @Test func experimentSelfTest() throws {
        let (status, out, err) = try PythonScript.run("experiment.py", ["--self-test"])
        #expect(status == 0, "\(out)\n\(err)")
        #expect(out.contains("experiment self-test: ok"), "\(out)\n\(err)")
    }
}
