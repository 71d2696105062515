import Foundation
import Testing
@testable import PF2LoRA

/// Issue 11, items 3–5: nothing in flight is lost when the server is told to stop — EOF on stdin,
/// `shutdown`, SIGTERM or SIGINT, or a reader that closes stdout. End to end through the real
/// `pf2lora serve` process (run them against another build with PF2LORA_TEST_BINARY).
@Suite(.serialized) struct ServerDrainTests {
    static let texts = PersonalizeTests.texts

    init() {
        // Writing to a server that died must fail with EPIPE here, not kill the test process.
        signal(SIGPIPE, SIG_IGN)
    }

    static func personalize(_ extra: [String: Any] = [:]) -> [String: Any] {
        ["client": "alice", "texts": texts, "batch": 2, "seq": 16, "seed": 3].merging(extra) { $1 }
    }

    /// The client's current version in a fresh open of the store (nothing quarantined).
    static func currentVersion(_ fx: ServerFixture, _ client: String) throws -> Int? {
        let store = try AdapterStore.open(root: fx.store, base: fx.storeHandle.base, cacheBytes: 0)
        #expect(store.lastReconcile.quarantined.isEmpty)
        return store.currentVersion(level: .client, client: client)
    }

    /// `serve` flags naming the exchange folder where `dana`'s data is (train_local's paths must be inside it).
    static func exchange(_ fx: ServerFixture) throws -> [String] {
        let data = fx.root + "/exchange/dana"
        if !FileManager.default.fileExists(atPath: data) { try FederatedClientTests.writeClientData(data, texts: texts) }
        return ["--exchange-dir", fx.root + "/exchange"]
    }

    /// A train_local round's params for client `dana` with its data folder and the store's shape.
    static func trainLocal(_ fx: ServerFixture, extra: [String: Any] = [:]) throws -> [String: Any] {
        let data = fx.root + "/exchange/dana"
        _ = try exchange(fx)
        let sharedNow = try #require(try fx.storeHandle.latestShared()).adapter
        let x0 = try initialSharedAdapter(weights: fx.gpt2.weights, base: fx.storeHandle.base, modules: Array(sharedNow.modules.keys),
                                          rank: sharedNow.rank, alpha: sharedNow.alpha, seed: 4)
        return ["client": "dana", "data": data, "shared": ["safetensors": x0.safetensors().base64EncodedString()],
                "local_steps": 3, "lower_steps": 1, "batch": 2, "seq": 16].merging(extra) { $1 }
    }

    /// Item 3: EOF right after a training request: the server used to exit at once (0.16 s, no
    /// reply, nothing published). Each training method now finishes, publishes and replies first.
    @Test func eofWaitsForEveryTrainingMethod() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        // personalize
        let s = try fx.serve()
        s.request(1, "personalize", Self.personalize(["steps": 30]))
        s.closeInput()
        #expect(s.waitExit(), "the server did not exit")
        #expect(s.process.terminationStatus == 0)
        let r = ServerProcess.result(s.response(1, timeout: 1))
        #expect(r?["version"] as? Int == 2, "personalize was answered before exit: \(s.allLines)")
        #expect(try Self.currentVersion(fx, "alice") == 2, "and published")

        // train_local, then evaluate_local, each alone before EOF.
        let t = try fx.serve(try Self.exchange(fx))
        t.request(2, "train_local", try Self.trainLocal(fx))
        t.closeInput()
        #expect(t.waitExit(timeout: 120) && t.process.terminationStatus == 0)
        #expect(ServerProcess.result(t.response(2, timeout: 1))?["client_version"] as? Int == 1, "\(t.allLines) \(t.stderrText)")
        #expect(try Self.currentVersion(fx, "dana") == 1)

        let e = try fx.serve(try Self.exchange(fx))
        e.request(3, "evaluate_local", ["client": "dana", "data": fx.root + "/exchange/dana", "split": "valid", "seq": 16])
        e.closeInput()
        #expect(e.waitExit(timeout: 120) && e.process.terminationStatus == 0)
        #expect((ServerProcess.result(e.response(3, timeout: 1))?["loss"] as? Double).map { $0.isFinite } == true, "\(e.allLines)")
    }

    /// Item 3: `shutdown` while a personalize runs: both are answered, the version is published,
    /// the server exits 0; requests after `shutdown` that would start work get -32004, others an answer.
    @Test func shutdownWaitsForTraining() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let s = try fx.serve()
        s.request(1, "personalize", Self.personalize(["steps": 40]))
        s.request(2, "shutdown")
        s.request(3, "generate", ["prompt": "The cat", "max_tokens": 2])
        s.request(4, "health")
        #expect(ServerProcess.result(s.response(2))?["status"] as? String == "shutting down")
        let refused = s.response(3)
        #expect(ServerProcess.errorCode(refused) == -32004 && ServerHardeningTests.message(refused).contains("shutting down"), "\(refused ?? [:])")
        let health = ServerProcess.result(s.response(4))
        #expect(health?["status"] as? String == "draining")
        #expect(s.waitExit() && s.process.terminationStatus == 0)
        #expect(ServerProcess.result(s.response(1, timeout: 1))?["version"] as? Int == 2, "\(s.allLines)")
        #expect(try Self.currentVersion(fx, "alice") == 2)
    }

    /// Item 5: SIGTERM while 40 streaming generates and a personalize run: it used to kill the server
    /// at once. Now every request is answered (the streams add up to their texts), the personalize
    /// publishes, a request sent after the signal gets -32004, and the exit status is 0. SIGINT too.
    @Test(arguments: [SIGTERM, SIGINT]) func terminationSignalDrains(_ sig: Int32) throws {
        let fx = try ServerFixture(clients: ["alice", "bob"])
        defer { fx.cleanup() }
        let s = try fx.serve()
        let n = sig == SIGTERM ? 40 : 8
        s.request(1, "personalize", Self.personalize(["steps": 25]))
        for i in 0..<n {
            s.request(100 + i, "generate", ["client": i % 2 == 0 ? "alice" : "bob", "prompt": "The cat", "max_tokens": 40,
                                            "temperature": 0, "ignore_eos": true, "stream": true])
        }
        #expect(s.waitFor(count: 5) { $0["method"] as? String == "token" })
        kill(s.process.processIdentifier, sig)
        usleep(100_000)
        if s.process.isRunning { s.request(2, "generate", ["prompt": "The cat", "max_tokens": 2]) }
        #expect(s.waitExit(timeout: 120), "the server did not exit after the signal")
        #expect(s.process.terminationReason == .exit && s.process.terminationStatus == 0,
                "killed by the signal or failed: reason \(s.process.terminationReason.rawValue), status \(s.process.terminationStatus)")
        var answered = 0
        for i in 0..<n {
            guard let r = ServerProcess.result(s.response(100 + i, timeout: 1)), let text = r["text"] as? String else { continue }
            answered += 1
            let streamed = s.notifications("token", id: 100 + i).compactMap { $0["text"] as? String }.joined()
            #expect(Array(streamed.utf8) == Array(text.utf8), "request \(100 + i): the stream differs from its text")
        }
        #expect(answered == n, "\(n - answered) generates lost")
        #expect(ServerProcess.errorCode(s.response(2, timeout: 1)) == -32004)
        #expect(ServerProcess.result(s.response(1, timeout: 1))?["version"] as? Int == 2)
        #expect(try Self.currentVersion(fx, "alice") == 2)
        #expect(s.stderrText.contains(sig == SIGTERM ? "SIGTERM" : "SIGINT"))
    }

    /// Item 5: a second signal exits at once (status 128 + signal), without waiting for the training
    /// in flight; the store stays whole and at the last published version.
    @Test func secondSignalExitsAtOnce() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let s = try fx.serve()
        s.request(1, "personalize", Self.personalize(["max_seconds": 60]))
        #expect(s.waitFor(timeout: 30) { $0["method"] as? String == "progress" }, "the personalize started")
        kill(s.process.processIdentifier, SIGTERM)
        usleep(200_000)
        let t0 = Date()
        kill(s.process.processIdentifier, SIGTERM)
        #expect(s.waitExit(timeout: 10))
        #expect(Date().timeIntervalSince(t0) < 5, "the second signal exits at once")
        #expect(s.process.terminationReason == .exit && s.process.terminationStatus == 128 + SIGTERM)
        #expect(try Self.currentVersion(fx, "alice") == 1)
    }

    /// Item 4: the reader of stdout goes away while a personalize runs. The next answer used to kill
    /// the server with SIGPIPE (the personalize lost); now a broken stdout is a drain: the training
    /// still publishes, the server exits 0.
    @Test func closedStdoutIsADrain() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let input = Pipe(), output = Pipe(), errors = Pipe()
        let p = try SpawnedProcess(ServerProcess.binary, ["serve", "--model", fx.model, "--store", fx.store, "--threads", "1"],
                                   stdin: input, stdout: output, stderr: errors)
        func send(_ obj: [String: Any]) {
            var d = try! JSONSerialization.data(withJSONObject: obj)
            d.append(0x0A)
            try? input.fileHandleForWriting.write(contentsOf: d)
        }
        send(["jsonrpc": "2.0", "id": 1, "method": "personalize", "params": Self.personalize(["max_seconds": 6])])
        // Read stdout until the personalize has started (its first progress line), at most 3 s.
        let fd = output.fileHandleForReading.fileDescriptor
        var seen = Data()
        let deadline = Date().addingTimeInterval(3)
        while !String(decoding: seen, as: UTF8.self).contains("\"progress\"") && Date() < deadline {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&pfd, 1, 100) > 0 {
                var b = [UInt8](repeating: 0, count: 4096)
                let k = read(fd, &b, b.count)
                if k <= 0 { break }
                seen.append(contentsOf: b[..<k])
            }
        }
        try output.fileHandleForReading.close()
        // Answers now go to a closed pipe.
        for i in 2...4 { send(["jsonrpc": "2.0", "id": i, "method": "health"]); usleep(50_000) }
        let end = Date().addingTimeInterval(120)
        while p.isRunning && Date() < end { usleep(20_000) }
        let stderr = String(decoding: errors.fileHandleForReading.availableData, as: UTF8.self)
        #expect(!p.isRunning)
        #expect(p.terminationReason == .exit && p.terminationStatus == 0,
                "reason \(p.terminationReason.rawValue) status \(p.terminationStatus): \(stderr.suffix(500))")
        #expect(try Self.currentVersion(fx, "alice") == 2, "the personalize in flight was published")
        if p.isRunning { p.terminate() }
    }

    /// `--drain-timeout`: a drain that would wait too long cancels what is still running, and still
    /// answers every request (the generate with the text so far, the personalize with -32006), publishes
    /// nothing half-done, and exits 0.
    @Test func drainTimeoutCancelsWithAnAnswer() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let s = try fx.serve(["--drain-timeout", "1"])
        s.request(1, "personalize", Self.personalize(["max_seconds": 120]))
        s.request(2, "generate", ["client": "alice", "prompt": "The cat", "max_tokens": 4000, "temperature": 0, "ignore_eos": true, "stream": true])
        #expect(s.waitFor(timeout: 30) { $0["method"] as? String == "progress" })
        let t0 = Date()
        kill(s.process.processIdentifier, SIGTERM)
        #expect(s.waitExit(timeout: 60))
        #expect(Date().timeIntervalSince(t0) < 30)
        #expect(s.process.terminationReason == .exit && s.process.terminationStatus == 0)
        #expect(ServerProcess.errorCode(s.response(1, timeout: 1)) == -32006)
        let g = ServerProcess.result(s.response(2, timeout: 1))
        #expect(g?["finish_reason"] as? String == "cancelled" || g?["finish_reason"] as? String == "context", "\(g ?? [:])")
        #expect(try Self.currentVersion(fx, "alice") == 1)
    }
}
