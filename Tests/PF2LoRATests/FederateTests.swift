import Foundation
import Testing
@testable import PF2LoRA

/// Runs the `pf2lora` executable to completion; returns its exit code, stdout and stderr.
func runCLI(_ args: [String]) throws -> (code: Int32, out: String, err: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: ServerProcess.binary)
    p.arguments = args
    let out = Pipe(), err = Pipe()
    p.standardOutput = out; p.standardError = err
    try p.run()
    // Both pipes read at once (a child that fills one while we wait on the other would block).
    final class Box: @unchecked Sendable { var data = Data() }   // written by one thread, read after g.wait()
    let o = Box(), e = Box()
    let g = DispatchGroup()
    g.enter(); DispatchQueue.global().async { o.data = out.fileHandleForReading.readDataToEndOfFile(); g.leave() }
    g.enter(); DispatchQueue.global().async { e.data = err.fileHandleForReading.readDataToEndOfFile(); g.leave() }
    g.wait()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: o.data, as: UTF8.self), String(decoding: e.data, as: UTF8.self))
}

/// `pf2lora federate` end to end: data folders in, adapters in the store that `serve` then uses.
@Suite(.serialized) struct FederateTests {
    static let styles = [
        "ann": ["The cat sat on the mat.", "The cat ran.", "A cat and a mat.", "The mat, the cat.", "Cat on mat."],
        "ben": ["Once upon a time there was a king.", "Once upon a time a king.", "There was a time.", "A king was there once.", "Upon a time."],
    ]

    static func makeData(_ root: String) throws -> String {
        let data = root + "/data"
        for (id, texts) in styles {
            try FileManager.default.createDirectory(atPath: data + "/" + id, withIntermediateDirectories: true)
            let jsonl = texts.map { "{\"text\": \"\($0)\"}" }.joined(separator: "\n") + "\n"
            try jsonl.write(toFile: "\(data)/\(id)/train.jsonl", atomically: true, encoding: .utf8)
            try texts.prefix(2).joined(separator: "\n\n").write(toFile: "\(data)/\(id)/valid.txt", atomically: true, encoding: .utf8)
            try texts.suffix(2).joined(separator: "\n\n").write(toFile: "\(data)/\(id)/test.txt", atomically: true, encoding: .utf8)
        }
        return data
    }

    @Test func federateThenServe() throws {
        let fx = try ServerFixture(clients: [])
        defer { fx.cleanup() }
        let data = try Self.makeData(fx.root)
        // A store with no shared adapter yet: the fixture's is rank 8, alpha 8; pass the same shape.
        let common = ["federate", "--model", fx.model, "--store", fx.store, "--data", data, "--rounds", "2", "--local-steps", "2",
                      "--lower-steps", "1", "--batch", "2", "--seq", "16", "--threads", "1", "--lr", "0.01", "--lr2", "0.1"]
        let out = fx.root + "/out"
        let r = try runCLI(common + ["--alpha", "8", "--out", out])
        #expect(r.code == 0, "\(r.err)")
        #expect(r.err.contains("round 2/2"))
        let store = try AdapterStore.open(root: fx.store, base: try BaseModelInfo.load(folder: fx.model))
        #expect(store.currentVersion(level: .shared) == 2)
        #expect(store.clients() == ["ann", "ben"])
        #expect(store.trainedOn(client: "ann", version: 1) == 2)
        let metrics = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/metrics.json"))) as? [String: Any]
        let clients = metrics?["clients"] as? [[String: Any]]
        #expect(clients?.count == 2 && (clients?[0]["train_loss"] as? [Any])?.count == 2)
        #expect(clients?.allSatisfy { ($0["test_perplexity"] as? Double ?? 0) > 1 } == true)
        #expect(FileManager.default.fileExists(atPath: out + "/loss.svg") && FileManager.default.fileExists(atPath: out + "/results.md"))

        // Deterministic: the same seed into a fresh store gives byte-identical adapter tensors.
        let store2 = fx.root + "/store2"
        let r2 = try runCLI(common.map { $0 == fx.store ? store2 : $0 } + ["--alpha", "8"])
        #expect(r2.code == 0, "\(r2.err)")
        let s2 = try AdapterStore.open(root: store2, base: store.base)
        let a = try store.load(level: .client, client: "ben", version: 1), b = try s2.load(level: .client, client: "ben", version: 1)
        #expect(a.modules.keys.sorted() == b.modules.keys.sorted())
        #expect(a.modules.allSatisfy { (k, p) in p.a.array == b.modules[k]!.a.array && p.b.array == b.modules[k]!.b.array })

        // serve uses them: each client reports its version, and the two clients differ.
        let s = try fx.serve()
        func gen(_ c: String) -> [String: Any] { ["client": c, "prompt": "The cat", "max_tokens": 12, "temperature": 0, "ignore_eos": true] }
        let ann = ServerProcess.result(s.response(s.request(1, "generate", gen("ann"))))
        let ben = ServerProcess.result(s.response(s.request(2, "generate", gen("ben"))))
        #expect((ann?["adapter"] as? [String: Any])?["shared"] as? Int == 2)
        #expect((ann?["adapter"] as? [String: Any])?["client"] as? Int == 1)
        #expect((ben?["adapter"] as? [String: Any])?["client"] as? Int == 1)
        #expect(s.finish() == 0)

        // A run whose shared shape differs from the store's is refused and writes nothing.
        let before = FileManager.default.contents(atPath: store.directory + "/manifest.json")
        let bad = try runCLI(common + ["--rank", "4"])
        #expect(bad.code != 0)
        #expect(bad.err.contains("already has a shared adapter with rank 8"), "\(bad.err)")
        #expect(FileManager.default.contents(atPath: store.directory + "/manifest.json") == before)
        // Non-finite loss: an error naming the round, nothing written.
        let nan = try runCLI(common + ["--alpha", "8", "--lr", "1e30", "--lr2", "1e30", "--clip", "0"])
        #expect(nan.code != 0)
        #expect(nan.err.contains("non-finite in round"), "\(nan.err)")
        #expect(FileManager.default.contents(atPath: store.directory + "/manifest.json") == before)
        // Missing data: the client and file are named.
        try FileManager.default.removeItem(atPath: data + "/ben/test.txt")
        let miss = try runCLI(common + ["--alpha", "8"])
        #expect(miss.code != 0 && miss.err.contains("client 'ben' has no test data"), "\(miss.err)")
    }

    /// A single-level method (local-only): a zero shared pair and each client's own LoRA as its client level.
    @Test func localMethodStoresEachClientsOwnLoRA() throws {
        let fx = try ServerFixture(clients: [])
        defer { fx.cleanup() }
        let data = try Self.makeData(fx.root)
        let store = fx.root + "/store-local"
        let r = try runCLI(["federate", "--model", fx.model, "--store", store, "--data", data, "--method", "local", "--rounds", "1",
                            "--local-steps", "2", "--batch", "2", "--seq", "16", "--threads", "1", "--lr", "0.01"])
        #expect(r.code == 0, "\(r.err)")
        let st = try AdapterStore.open(root: store, base: try BaseModelInfo.load(folder: fx.model))
        let shared = try #require(try st.latestShared()).adapter
        #expect(shared.rank == 10 && shared.metadata.extra["zero"] == "true")
        #expect(shared.modules.values.allSatisfy { p in p.b.array.allSatisfy { $0 == 0 } })
        let ann = try #require(try st.latestClient("ann")).adapter
        #expect(ann.rank == 10 && ann.metadata.extra["method"] == "local")
        #expect(ann.modules.values.contains { p in p.b.array.contains { $0 != 0 } })
    }

    /// `--budget compute` through the CLI: PF2LoRA (2 x (2 + 1)) and HOMLoRA (6 iterations) report the same
    /// gradient evaluations and tokens; `--token-cache` gives the same numbers as tokenizing afresh, and
    /// `--no-test` leaves the test losses null.
    @Test func computeBudgetTokensAndTokenCache() throws {
        let fx = try ServerFixture(clients: [])
        defer { fx.cleanup() }
        let data = try Self.makeData(fx.root)
        func run(_ method: String, _ tag: String, _ extra: [String]) throws -> [String: Any] {
            let out = fx.root + "/out-" + tag
            let r = try runCLI(["federate", "--model", fx.model, "--store", fx.root + "/store-" + tag, "--data", data, "--method", method,
                                "--rounds", "2", "--local-steps", "2", "--lower-steps", "2", "--batch", "2", "--seq", "16", "--threads", "1",
                                "--lr", "0.01", "--lr2", "0.1", "--budget", "compute", "--out", out] + extra)
            #expect(r.code == 0, "\(r.err)")
            return try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/metrics.json"))) as? [String: Any])
        }
        let cache = fx.root + "/token-cache"
        let pf = try run("pf2lora", "pf", ["--alpha", "8"])
        let hom = try run("homlora", "hom", ["--token-cache", cache])
        let homCached = try run("homlora", "hom2", ["--token-cache", cache, "--no-test"])
        #expect(pf["gradient_evaluations_per_round"] as? Int == 6 && hom["gradient_evaluations_per_round"] as? Int == 6)
        #expect(pf["local_iterations"] as? Int == 2 && hom["local_iterations"] as? Int == 6)
        #expect(pf["tokens"] as? Int == 2 * 2 * 6 * 2 * 16 && hom["tokens"] as? Int == pf["tokens"] as? Int)
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: cache)) ?? []).contains { $0.hasSuffix(".tokens") })
        #expect(hom["mean_valid_loss"] as? Double == homCached["mean_valid_loss"] as? Double)
        #expect(homCached["mean_test_loss"] is NSNull && homCached["test_read"] as? Bool == false)
    }
}
