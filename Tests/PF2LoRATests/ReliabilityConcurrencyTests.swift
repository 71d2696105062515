import Foundation
import Testing
@testable import PF2LoRA

/// Concurrency (issue 7, item 6): generate for clients while another process republishes their
/// adapters (and the shared one) as fast as it can, with `reload`s and streams in between. Every
/// answer names the (shared, client) versions it was served with; answers with the same versions
/// must have the same text (a mix of two versions would not), streams must concatenate to their
/// text, and after the publisher stops a request served alone gives the text its versions gave
/// under load.
@Suite(.serialized) struct ReliabilityConcurrencyTests {
    @Test func generateWhileRepublishing() throws {
        let fx = try ServerFixture(clients: [])
        defer { fx.cleanup() }
        // Seed versions so both clients exist before the server starts.
        let (seed, _, _) = try ReliabilityCrashTests.publisher(fx, clients: "alice,bob", seq: 0, count: 3)
        seed.waitUntilExit()
        let s = try fx.serve()
        let (pub, acks, _) = try ReliabilityCrashTests.publisher(fx, clients: "alice,bob", seq: 10_000, count: 30)
        var id = 0
        var streamed: Set<Int> = []
        let t0 = Date()
        while pub.isRunning && Date().timeIntervalSince(t0) < 60 {
            for c in ["alice", "bob"] {
                id += 1
                let stream = id % 3 == 0
                if stream { streamed.insert(id) }
                s.request(id, "generate", ["client": c, "prompt": "The cat", "max_tokens": 6, "temperature": 0, "ignore_eos": true, "stream": stream])
            }
            if id % 10 == 0 { s.request(100_000 + id, "reload") }
            usleep(15_000)
        }
        pub.waitUntilExit()
        #expect(pub.terminationStatus == 0)
        var groups: [String: Set<String>] = [:]
        var served = 0
        for i in 1...id {
            let r = s.response(i)
            guard let res = ServerProcess.result(r), let text = res["text"] as? String, let ad = res["adapter"] as? [String: Any] else {
                Issue.record("request \(i): \(r ?? [:])"); continue
            }
            served += 1
            let client = i % 2 == 1 ? "alice" : "bob"
            groups["\(client) shared \(ad["shared"] ?? "-") client \(ad["client"] ?? "-")", default: []].insert(text)
            if streamed.contains(i) {
                let toks = s.allLines.filter { $0["method"] as? String == "token" && (($0["params"] as? [String: Any])?["id"] as? Int) == i }
                #expect(toks.map { ($0["params"] as! [String: Any])["text"] as! String }.joined() == text, "request \(i): stream and text differ")
            }
        }
        for (k, texts) in groups { #expect(texts.count == 1, "\(k) gave \(texts.count) different texts: \(texts)") }
        #expect(groups.count >= 4, "requests saw several versions: \(groups.keys.sorted())")
        // After the publisher stopped: the current versions served alone give the same text as under load.
        let final = ["alice", "bob"].map { c -> (String, [String: Any]?) in
            id += 1
            s.request(id, "generate", ["client": c, "prompt": "The cat", "max_tokens": 6, "temperature": 0, "ignore_eos": true])
            return (c, ServerProcess.result(s.response(id)))
        }
        for (c, res) in final {
            let ad = res?["adapter"] as? [String: Any] ?? [:]
            let k = "\(c) shared \(ad["shared"] ?? "-") client \(ad["client"] ?? "-")"
            if let seen = groups[k] { #expect(seen == [res?["text"] as? String ?? ""], "\(k)") }
        }
        #expect(s.finish() == 0)
        FuzzReport.append("concurrency: \(served) generates (\(streamed.count) streamed) and \(id / 10) reloads while another process made \(acks().count) publishes; \(groups.count) (client, shared, client-version) groups, each with one text")
    }
}
