import Foundation
import Testing
@testable import PF2LoRA

/// Issue 11 (hardening, round 2): the server's limits, notifications, params and prompts, end to end
/// through the real `pf2lora serve` process.
@Suite(.serialized) struct ServerHardeningTests {
    static func gen(_ client: String?, _ prompt: String = "The cat", max: Int? = 2, extra: [String: Any] = [:]) -> [String: Any] {
        var p: [String: Any] = ["prompt": prompt, "temperature": 0, "ignore_eos": true]
        if let max { p["max_tokens"] = max }
        if let client { p["client"] = client }
        for (k, v) in extra { p[k] = v }
        return p
    }

    static func message(_ r: [String: Any]?) -> String { ((r?["error"] as? [String: Any])?["message"] as? String) ?? "" }

    /// Item 14: `--max-new-tokens` is also the cap of a request without max_tokens (64 came back with
    /// a limit of 10); `--max-queue 0` means no request waits (it refused everything);
    /// `--max-queue 8 --max-batch 32` takes 40 requests sent at once (it refused those that fit the batch).
    @Test func limitsCompose() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let s = try fx.serve(["--max-new-tokens", "10"])
        let r = ServerProcess.result(s.response({ s.request(1, "generate", Self.gen("alice", max: nil)); return 1 }()))
        #expect((r?["usage"] as? [String: Any])?["completion_tokens"] as? Int == 10, "\(r ?? [:])")
        let small = ServerProcess.result(s.response({ s.request(2, "generate", Self.gen("alice", max: nil)); return 2 }()))
        #expect(small?["finish_reason"] as? String == "length")
        #expect(s.finish() == 0)
        // Without the flag a request without max_tokens gets 64.
        let d = try fx.serve()
        let r64 = ServerProcess.result(d.response({ d.request(1, "generate", Self.gen(nil, max: nil)); return 1 }()))
        #expect((r64?["usage"] as? [String: Any])?["completion_tokens"] as? Int == 64)
        #expect(d.finish() == 0)

        // --max-queue 0: requests are taken while the batch has room, the next one is refused at once.
        let z = try fx.serve(["--max-queue", "0", "--max-batch", "2"])
        z.request(1, "generate", Self.gen("alice", max: 200))
        z.request(2, "generate", Self.gen(nil, max: 200))
        z.request(3, "generate", Self.gen("alice", max: 2))
        let refused = z.response(3)
        #expect(ServerProcess.errorCode(refused) == -32004, "\(refused ?? [:])")
        #expect(Self.message(refused).contains("--max-batch 2") && Self.message(refused).contains("--max-queue 0"))
        #expect(ServerProcess.result(z.response(1)) != nil && ServerProcess.result(z.response(2)) != nil)
        // Room again once they finished.
        #expect(ServerProcess.result(z.response({ z.request(4, "generate", Self.gen("alice")); return 4 }())) != nil)
        #expect(z.finish() == 0)

        // --max-queue 8 --max-batch 32: 40 requests at once are all taken.
        let q = try fx.serve(["--max-queue", "8", "--max-batch", "32"])
        var burst = Data()
        for i in 1...40 {
            burst.append(try JSONSerialization.data(withJSONObject: ["jsonrpc": "2.0", "id": i, "method": "generate", "params": Self.gen(i % 2 == 0 ? "alice" : nil, max: 20)]))
            burst.append(0x0A)
        }
        q.sendRaw(burst)
        let outcomes = (1...40).map { q.response($0) }
        #expect(outcomes.allSatisfy { ServerProcess.result($0) != nil }, "refused: \(outcomes.filter { ServerProcess.result($0) == nil }.map { Self.message($0) }.prefix(3))")
        #expect(q.finish() == 0)
    }

    /// Item 15: a notification (no id) is never answered, not even with an error, also under
    /// --strict-clients (an unknown client's notification got an error with a null id).
    @Test func notificationsAreNeverAnswered() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let s = try fx.serve(["--strict-clients"])
        s.send(["jsonrpc": "2.0", "method": "generate", "params": Self.gen("zed")])            // unknown client
        s.send(["jsonrpc": "2.0", "method": "generate", "params": ["prompt": 5]])              // bad params
        s.send(["jsonrpc": "2.0", "method": "generate", "params": [1, 2]])                     // params not an object
        s.send(["jsonrpc": "2.0", "method": "no.such.method"])
        s.send(["jsonrpc": "2.0", "method": "adapters.load", "params": ["client": "nobody"]])
        s.send(["jsonrpc": "2.0", "method": "generate", "params": Self.gen("alice")])          // served, not answered
        s.request(1, "generate", Self.gen("alice"))
        #expect(ServerProcess.result(s.response(1)) != nil)
        s.request(2, "stats")
        let st = ServerProcess.result(s.response(2))
        #expect(s.finish() == 0)
        let others = s.allLines.filter { ($0["id"] as? Int) != 1 && ($0["id"] as? Int) != 2 }
        #expect(others.isEmpty, "answers to notifications: \(others)")
        #expect((st?["completed"] as? Int ?? 0) >= 1 && (st?["failed"] as? Int ?? 0) >= 1, "the notifications were carried out: \(st ?? [:])")
    }
}
