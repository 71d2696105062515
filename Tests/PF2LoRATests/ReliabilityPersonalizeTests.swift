import Foundation
import Testing
@testable import PF2LoRA

/// Personalization under faults (issue 7, items 3 and 6): the real server runs `personalize` for a
/// client over and over while that client's generates keep arriving, and is SIGKILLed at a random
/// point. After each kill the store opens with nothing damaged, the client's current version is at
/// least the last one a reply acknowledged and validates whole; before each kill, every generate
/// answer is consistent with exactly one version (same version, same text).
/// `PF2LORA_LONG=1`: 40 kills (CI: 4).
@Suite(.serialized) struct ReliabilityPersonalizeTests {
    @Test func sigkillDuringPersonalizeWhileServing() throws {
        let kills = ProcessInfo.processInfo.environment["PF2LORA_LONG"] == "1" ? 40 : 4
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let texts = PersonalizeTests.texts
        var rng = RNG(seed: 31)
        var acked = 1          // alice's newest acknowledged version (the fixture published v1)
        var personalized = 0, generates = 0, groupsSeen = 0
        var lastRound = ""
        for round in 0..<kills {
            let s = try fx.serve()
            var id = 0
            var byVersion: [Int: Set<String>] = [:]
            let roundStart = Date()
            let deadline = Date().addingTimeInterval(Double.random(in: 0.5...3, using: &rng))
            var pending: Int? = nil
            var gens: Set<Int> = []
            var unanswered: [Int] = []
            // The last round also waits (up to 5 minutes) for a personalize reply if none came yet: on a
            // loaded machine every random window can be shorter than one personalization.
            let patience = Date().addingTimeInterval(300)
            while Date() < deadline || (round == kills - 1 && personalized == 0 && Date() < patience) {
                if pending == nil {
                    id += 1; pending = id
                    s.request(id, "personalize", ["client": "alice", "texts": texts, "steps": 3, "batch": 2, "seq": 16, "seed": round])
                }
                // Generates keep coming, but at most 8 unanswered at a time (closed loop). The test
                // sent one every 20 ms whatever the server's pace: on a loaded machine the server fell
                // behind, hundreds of generates queued (--max-queue 256) ahead of the scheduler's work
                // and the personalize's thread, and the last round could run out of patience before a
                // personalize was answered.
                let lines = s.allLines
                let answered = Set(lines.compactMap { l -> Int? in
                    guard let i = l["id"] as? Int, l["result"] != nil || l["error"] != nil else { return nil }
                    return i
                })
                unanswered.removeAll { answered.contains($0) }
                if unanswered.count < 8 {
                    id += 1; gens.insert(id); unanswered.append(id)
                    s.request(id, "generate", ["client": "alice", "prompt": "The cat", "max_tokens": 4, "temperature": 0, "ignore_eos": true])
                }
                if let p = pending, let r = lines.first(where: { ($0["id"] as? Int) == p && ($0["result"] != nil || $0["error"] != nil) }) {
                    if let v = (r["result"] as? [String: Any])?["version"] as? Int { acked = max(acked, v); personalized += 1 }
                    pending = nil
                }
                usleep(20_000)
            }
            kill(s.process.processIdentifier, SIGKILL)
            s.process.waitUntilExit()
            usleep(20_000)
            var generatesThisRound = 0
            for l in s.allLines {
                guard let i = l["id"] as? Int, gens.contains(i), let res = l["result"] as? [String: Any],
                      let v = (res["adapter"] as? [String: Any])?["client"] as? Int, let t = res["text"] as? String else { continue }
                byVersion[v, default: []].insert(t)
                generates += 1; generatesThisRound += 1
            }
            // A personalize answered just before the kill counts as acknowledged.
            for l in s.allLines { if let v = (l["result"] as? [String: Any])?["version"] as? Int, (l["result"] as? [String: Any])?["client"] as? String == "alice" { acked = max(acked, v) } }
            for (v, t) in byVersion { #expect(t.count == 1, "round \(round): alice v\(v) gave \(t.count) texts") }
            groupsSeen += byVersion.count

            let store = try AdapterStore.open(root: fx.store, base: fx.storeHandle.base, cacheBytes: 0)
            #expect(store.lastReconcile.quarantined.isEmpty, "round \(round): \(store.lastReconcile.quarantined)")
            let cur = try #require(store.currentVersion(level: .client, client: "alice"))
            #expect(cur == acked || cur == acked + 1, "round \(round): current v\(cur), acknowledged v\(acked)")
            _ = try store.readAndValidate(level: .client, client: "alice", version: cur)
            acked = cur
            lastRound = String(format: "%.1f s, %d generates answered, server log: %@", Date().timeIntervalSince(roundStart), generatesThisRound, String(s.stderrText.suffix(600)))
        }
        #expect(personalized >= 1, "some personalizations completed between kills (last round: \(lastRound))")
        let summary = "personalize: \(kills) SIGKILLs of the server during \(personalized) acknowledged personalizations and \(generates) answered generates of the same client (\(groupsSeen) version groups, one text each); adapters lost 0, damaged files 0"
        print(summary)
        FuzzReport.append(summary)
    }
}
