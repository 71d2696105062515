import Foundation
import Testing
@testable import PF2LoRA

/// End-to-end tests of `pf2lora serve`: the real process, talked to through pipes.
@Suite(.serialized) struct ServerTests {
    static func gen(_ client: String?, _ prompt: String, max: Int = 12, extra: [String: Any] = [:]) -> [String: Any] {
        var p: [String: Any] = ["prompt": prompt, "max_tokens": max, "temperature": 0, "ignore_eos": true]
        if let client { p["client"] = client }
        for (k, v) in extra { p[k] = v }
        return p
    }

    static let workload: [(String?, String)] = [("alice", "The cat"), ("bob", "The cat"), ("carol", "Alice was"), (nil, "The cat"),
                                                ("alice", "It is a"), ("shared", "The cat"), ("bob", "Once upon a time there")]

    /// Greedy text of N clients batched together equals each client served alone, token for token.
    @Test func batchedClientsEqualEachAlone() throws {
        let fx = try ServerFixture()
        defer { fx.cleanup() }
        func run(_ extra: [String]) throws -> [String] {
            let s = try fx.serve(extra)
            for (i, w) in Self.workload.enumerated() { s.request(i + 1, "generate", Self.gen(w.0, w.1)) }
            let texts = Self.workload.indices.map { ServerProcess.result(s.response($0 + 1))?["text"] as? String ?? "<missing>" }
            let stats = ServerProcess.result(s.response({ s.request(99, "stats"); return 99 }()))
            #expect(s.finish() == 0)
            if extra.isEmpty { #expect((stats?["mean_batch_rows"] as? Double ?? 0) > 1.5, "requests were not batched: \(stats ?? [:])") }
            return texts
        }
        let together = try run([])
        let alone = try run(["--max-batch", "1"])
        #expect(together == alone)
        #expect(!together.contains("<missing>"))
        // The adapters matter: same prompt, different clients, different text.
        #expect(Set([together[0], together[1], together[3], together[5]]).count >= 3, "\(together)")
        // "shared" names the shared pair alone, like no client at all.
        #expect(together[5] == together[3])
    }

    /// A new version written mid-stream: the request in flight finishes on its version, the next
    /// request of that client uses the new one; a new shared version is folded in without a restart.
    @Test func hotSwapMidStream() throws {
        let fx = try ServerFixture()
        defer { fx.cleanup() }
        let s = try fx.serve()
        s.request(1, "generate", Self.gen("alice", "The cat", max: 150, extra: ["stream": true]))
        #expect(s.waitFor(count: 3) { $0["method"] as? String == "token" })
        let base = try BaseModelInfo.load(folder: fx.model)
        let v2 = try fx.storeHandle.publishClient(id: "alice", ServerFixture.randomAdapter(base: base, level: .client, rank: 2, seed: 999, clientID: "alice"))
        #expect(v2 == 2)
        s.request(2, "generate", Self.gen("alice", "The cat"))
        let r1 = ServerProcess.result(s.response(1)), r2 = ServerProcess.result(s.response(2))
        #expect((r1?["adapter"] as? [String: Any])?["client"] as? Int == 1)
        #expect((r2?["adapter"] as? [String: Any])?["client"] as? Int == 2)
        #expect((r1?["usage"] as? [String: Any])?["completion_tokens"] as? Int == 150)
        let tokens = s.allLines.filter { $0["method"] as? String == "token" }
        #expect(tokens.count == 150, "one notification per token")
        let streamed = tokens.map { ($0["params"] as! [String: Any])["text"] as! String }.joined()
        #expect(streamed == r1?["text"] as? String)
        // A new shared version.
        let sv = try fx.storeHandle.publishShared(ServerFixture.randomAdapter(base: base, level: .shared, rank: 8, seed: 555))
        let reload = ServerProcess.result(s.response({ s.request(3, "reload"); return 3 }()))
        #expect(reload?["shared"] as? Int == sv)
        let r4 = ServerProcess.result(s.response({ s.request(4, "generate", Self.gen("alice", "The cat")); return 4 }()))
        #expect((r4?["adapter"] as? [String: Any])?["shared"] as? Int == sv)
        #expect(r4?["text"] as? String != r2?["text"] as? String)
        #expect(s.finish() == 0)
    }

    /// Every protocol error code, each with a message, and the server keeps answering.
    @Test func everyErrorCode() throws {
        let fx = try ServerFixture(clients: ["alice", "bob", "carol", "dave"])
        defer { fx.cleanup() }
        // A corrupt file for bob and an adapter of another base for dave.
        let bobPath = try fx.storeHandle.path(level: .client, client: "bob", version: 1)
        var bytes = try Data(contentsOf: URL(fileURLWithPath: bobPath))
        bytes[bytes.count / 2] ^= 0x40
        try bytes.write(to: URL(fileURLWithPath: bobPath))
        let davePath = try fx.storeHandle.path(level: .client, client: "dave", version: 1)
        var other = ServerFixture.randomAdapter(base: fx.storeHandle.base, level: .client, rank: 2, seed: 5, clientID: "dave")
        other.metadata.baseFingerprint = "0123456789abcdef"
        other.metadata.baseName = "another-model"
        other.metadata.sharedVersion = 1

        let s = try fx.serve()
        // Files that break after the server started: carol bit-flipped, dave from another base.
        let carolPath = try fx.storeHandle.path(level: .client, client: "carol", version: 1)
        _ = s.response({ s.request(100, "health"); return 100 }())
        var cb = try Data(contentsOf: URL(fileURLWithPath: carolPath))
        cb[cb.count - 9] ^= 0x01
        try cb.write(to: URL(fileURLWithPath: carolPath))
        try other.encode().write(to: URL(fileURLWithPath: davePath))
        for c in ["carol", "dave"] { _ = s.response({ s.request(101, "adapters.evict", ["client": c]); return 101 }()) }
        s.sendRaw(Data("this is not json\n".utf8))
        s.sendRaw(Data("[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"health\"}]\n".utf8))
        s.send(["jsonrpc": "1.0", "id": 2, "method": "health"])
        s.request(3, "no.such.method")
        s.request(4, "generate", ["prompt": "x", "max_tokens": "many"])
        s.request(5, "generate", ["client": "../etc/passwd", "prompt": "x"])
        s.request(6, "generate", ["prompt": String(repeating: "The cat sat. ", count: 200)])
        s.request(7, "generate", Self.gen("bob", "x"))
        s.request(8, "generate", Self.gen("dave", "x"))
        s.request(9, "generate", [:])
        s.request(10, "health")
        s.request(12, "generate", Self.gen("carol", "x"))
        let lines = { s.allLines }
        #expect(s.waitFor(count: 2) { $0["id"] is NSNull })
        let nullIDErrors = lines().filter { $0["id"] is NSNull }.map { ServerProcess.errorCode($0) }
        #expect(nullIDErrors.contains(-32700) && nullIDErrors.contains(-32600))
        #expect(ServerProcess.errorCode(s.response(2)) == -32600)
        #expect(ServerProcess.errorCode(s.response(3)) == -32601)
        #expect(ServerProcess.errorCode(s.response(4)) == -32602)
        let unsafe = s.response(5)
        #expect(ServerProcess.errorCode(unsafe) == -32602)
        #expect(ServerProcess.errorMessage(unsafe).contains("client id"))
        #expect(ServerProcess.errorCode(s.response(6)) == -32602)
        let corrupt = s.response(7)
        #expect(ServerProcess.errorCode(corrupt) == -32002)
        #expect(ServerProcess.errorMessage(corrupt).contains("moved aside"))
        let flipped = s.response(12)
        #expect(ServerProcess.errorCode(flipped) == -32002)
        #expect(ServerProcess.errorMessage(flipped).contains("check 1"))
        #expect(ServerProcess.errorCode(s.response(8)) == -32003)
        #expect(ServerProcess.errorCode(s.response(9)) == -32602)
        #expect(ServerProcess.result(s.response(10))?["status"] as? String == "ok")
        // Other clients are still served, and alice's stored adapter is untouched.
        #expect(ServerProcess.result(s.response({ s.request(11, "generate", Self.gen("alice", "The cat")); return 11 }()))?["text"] != nil)
        #expect(s.finish() == 0)
        #expect(s.stderrText.contains("clients/bob/v000001.safetensors.zst failed validation"), "a broken stored file is reported at start with its path")

        // An unknown client is refused (ServerHardeningTests.unknownClientsAreRefusedUnlessOptedIn).
        let strict = try fx.serve()
        #expect(ServerProcess.errorCode(strict.response({ strict.request(1, "generate", Self.gen("zed", "x")); return 1 }())) == -32001)
        #expect(strict.finish() == 0)

        // Overload: one running and one queued at most; the rest are refused at once, the others answered.
        let small = try fx.serve(["--max-batch", "1", "--max-queue", "1"])
        for i in 1...4 { small.request(i, "generate", Self.gen("alice", "The cat", max: i == 1 ? 200 : 5)) }
        let outcomes = (1...4).map { small.response($0, timeout: 600) }   // 200 tokens: minutes on a loaded CI box
        let refused = outcomes.filter { ServerProcess.errorCode($0) == -32004 }.count
        let served = outcomes.filter { ServerProcess.result($0) != nil }.count
        #expect(refused >= 1 && refused + served == 4, "\(outcomes)")
        #expect(small.finish() == 0)
    }

    /// EOF drains in-flight work and exits 0; shutdown answers, drains and exits 0.
    @Test func eofAndShutdownDrain() throws {
        let fx = try ServerFixture()
        defer { fx.cleanup() }
        let s = try fx.serve()
        for i in 1...4 { s.request(i, "generate", Self.gen("alice", "The cat", max: 30)) }
        #expect(s.finish() == 0)
        for i in 1...4 { #expect(ServerProcess.result(s.response(i, timeout: 1)) != nil, "request \(i) answered before exit") }

        let t = try fx.serve()
        t.request(1, "generate", Self.gen("carol", "The cat", max: 40))
        t.request(2, "shutdown")
        t.request(3, "health")   // after shutdown: not read
        #expect(ServerProcess.result(t.response(2))?["status"] as? String == "shutting down")
        #expect(ServerProcess.result(t.response(1)) != nil)
        let deadline = Date().addingTimeInterval(30)
        while t.process.isRunning && Date() < deadline { usleep(10_000) }
        #expect(!t.process.isRunning && t.process.terminationStatus == 0)
    }

    @Test func adaptersMethods() throws {
        let fx = try ServerFixture()
        defer { fx.cleanup() }
        let s = try fx.serve()
        let list = ServerProcess.result(s.response({ s.request(1, "adapters.list"); return 1 }()))
        let ids = (list?["clients"] as? [[String: Any]])?.compactMap { $0["id"] as? String }
        #expect(ids == ["alice", "bob", "carol"])
        #expect((list?["shared"] as? [String: Any])?["version"] as? Int == 1)
        let load = ServerProcess.result(s.response({ s.request(2, "adapters.load", ["client": "bob"]); return 2 }()))
        #expect(load?["version"] as? Int == 1)
        let evict = ServerProcess.result(s.response({ s.request(3, "adapters.evict", ["client": "bob"]); return 3 }()))
        #expect(evict?["evicted"] as? Int ?? 0 >= 1)
        #expect(ServerProcess.errorCode(s.response({ s.request(4, "adapters.load", ["client": "nobody"]); return 4 }())) == -32001)
        #expect(s.finish() == 0)
    }
}
