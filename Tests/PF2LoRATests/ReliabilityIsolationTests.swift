import Foundation
import Testing
@testable import PF2LoRA

/// Isolation (issue 7, item 4): hostile client ids through every protocol method that takes one,
/// and symlinks inside the store pointing out of it. A sentinel folder outside the store holds a
/// valid adapter file; the test shows it is neither read (its access time, set older than its
/// modification time, would move on a read under relatime) nor written (content, mtime, listing).
@Suite(.serialized) struct ReliabilityIsolationTests {
    static let hostileIDs: [String] = [
        "../x", "..", ".", "../../etc/passwd", "/etc/passwd", "/tmp", "%2e%2e", "%2e%2e%2fx", "a/b", "a\\b", "a\u{0}b", "\u{0}",
        "alice\u{0}", "ａlice", "alice\u{200B}", "аlice" /* Cyrillic а */, "ﬁle", "Ａ", "x\n", " alice", "alice ", "~root",
        String(repeating: "a", count: 65), String(repeating: "a", count: 10_000), "shared", "clients", "manifest.json", "CON", "nul",
        ".hidden", ".corrupt-v000001.safetensors.zst", ".tmp-x", "",
    ]

    static func times(_ path: String) -> (atime: Int, mtime: Int, size: Int)? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        return (Int(st.st_atim.tv_sec), Int(st.st_mtim.tv_sec), Int(st.st_size))
    }

    static func setTimes(_ path: String, atime: Int, mtime: Int) {
        var tv = [timeval(tv_sec: atime, tv_usec: 0), timeval(tv_sec: mtime, tv_usec: 0)]
        _ = utimes(path, &tv)
    }

    @Test func hostileIDsAndOutwardSymlinks() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let dir = fx.storeHandle.directory
        // Outside the store: a sentinel folder with a valid adapter for "mallory" and one for "eve".
        let outside = fx.root + "/outside"
        try FileManager.default.createDirectory(atPath: outside + "/mallory", withIntermediateDirectories: true)
        let base = fx.storeHandle.base
        let secret = outside + "/mallory/v000001.safetensors.zst"
        let secretBytes = try ServerFixture.randomAdapter(base: base, level: .client, rank: 2, seed: 77, clientID: "mallory").encode()
        try secretBytes.write(to: URL(fileURLWithPath: secret))
        let eveFile = outside + "/eve.safetensors.zst"
        try ServerFixture.randomAdapter(base: base, level: .client, rank: 2, seed: 78, clientID: "eve").encode().write(to: URL(fileURLWithPath: eveFile))
        let aliceOut = outside + "/alice-v2.safetensors.zst"
        try ServerFixture.randomAdapter(base: base, level: .client, rank: 2, seed: 79, clientID: "alice").encode().write(to: URL(fileURLWithPath: aliceOut))
        let sentinels = [secret, eveFile, aliceOut]
        // Symlinks in the store: a client folder linking out, a version file linking out, and a newer
        // version of a real client linking out.
        try FileManager.default.createSymbolicLink(atPath: dir + "/clients/mallory", withDestinationPath: outside + "/mallory")
        try FileManager.default.createDirectory(atPath: dir + "/clients/eve", withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: dir + "/clients/eve/v000001.safetensors.zst", withDestinationPath: eveFile)
        try FileManager.default.createSymbolicLink(atPath: dir + "/clients/alice/v000002.safetensors.zst", withDestinationPath: "../../../../outside/alice-v2.safetensors.zst")
        // Access times older than modification times: under relatime a read moves them.
        for p in sentinels { Self.setTimes(p, atime: 1_000_000_000, mtime: 1_500_000_000) }
        let control = outside + "/control"
        try Data("x".utf8).write(to: URL(fileURLWithPath: control))
        Self.setTimes(control, atime: 1_000_000_000, mtime: 1_500_000_000)
        _ = try Data(contentsOf: URL(fileURLWithPath: control))
        let atimeWorks = Self.times(control)!.atime != 1_000_000_000
        let before = sentinels.map { Self.times($0)! }
        let listing = try FileManager.default.subpathsOfDirectory(atPath: outside).sorted()

        let s = try fx.serve()
        var id = 0
        var expectations: [(Int, String)] = []
        for bad in Self.hostileIDs {
            // A generate's "shared" names the shared pair alone (item 18); every other method refuses it.
            let generate: [(String, [String: Any])] = bad == "shared" ? [] : [("generate", ["client": bad, "prompt": "The cat", "max_tokens": 2, "temperature": 0])]
            for (method, params) in generate + [("adapters.load", ["client": bad] as [String: Any]), ("adapters.evict", ["client": bad]),
                                     ("adapters.load", ["client": bad, "version": 1]),
                                     ("personalize", ["client": bad, "texts": ["The cat sat."], "steps": 1])] {
                id += 1
                s.request(id, method, params)
                expectations.append((id, "\(method) \(bad.debugDescription.prefix(40))"))
            }
        }
        for (i, what) in expectations {
            let r = s.response(i)
            #expect(ServerProcess.errorCode(r) == -32602, "\(what): \(r ?? [:])")
            #expect(ServerProcess.errorMessage(r).contains("client id"), "\(what)")
        }
        // The linked clients: never served from outside. mallory's folder link is ignored (an unknown
        // client, like a new one: -32001); eve's and alice's linked files were moved aside.
        let g = { (c: String, n: Int) -> [String: Any]? in s.request(n, "generate", ["client": c, "prompt": "The cat", "max_tokens": 3, "temperature": 0]); return s.response(n) }
        let mallory = g("mallory", 9001), eve = g("eve", 9002), alice = g("alice", 9003), newbie = g("newbie", 9004)
        #expect(ServerProcess.errorCode(mallory) == -32001, "\(mallory ?? [:])")
        #expect(ServerProcess.errorCode(newbie) == -32001, "\(newbie ?? [:])")
        #expect(ServerProcess.errorCode(eve) == -32002, "\(eve ?? [:])")
        #expect((ServerProcess.result(alice)?["adapter"] as? [String: Any])?["client"] as? Int == 1, "alice stays on her real v1: \(alice ?? [:])")
        for (n, c) in [(9005, "mallory"), (9006, "eve")] {
            s.request(n, "adapters.load", ["client": c, "version": 1])
            #expect([-32001, -32002].contains(ServerProcess.errorCode(s.response(n)) ?? 0), "\(c)")
        }
        s.request(9007, "adapters.load", ["client": "alice", "version": 2])
        #expect([-32001, -32002].contains(ServerProcess.errorCode(s.response(9007)) ?? 0))
        #expect(s.finish() == 0)

        // Publishing through a linked folder is refused too, and writes nothing outside.
        #expect(throws: AdapterStoreError.self) {
            try fx.storeHandle.publishClient(id: "mallory", ServerFixture.randomAdapter(base: base, level: .client, rank: 2, seed: 80, clientID: "mallory"))
        }
        let after = sentinels.map { Self.times($0)! }
        for (p, (b, a)) in zip(sentinels, zip(before, after)) {
            #expect(a.mtime == b.mtime && a.size == b.size, "\(p) was written")
            if atimeWorks { #expect(a.atime == b.atime, "\(p) was read") }
        }
        #expect(try FileManager.default.subpathsOfDirectory(atPath: outside).sorted() == listing, "nothing created or removed outside")
        #expect(try Data(contentsOf: URL(fileURLWithPath: secret)) == secretBytes)
        FuzzReport.append("isolation: \(Self.hostileIDs.count) hostile ids x 5 requests (generate, adapters.load twice, adapters.evict, personalize) = \(expectations.count) requests, all -32602; 3 outward symlinks (client folder, version file, newer version of a real client) never followed; sentinel files unread (atime check \(atimeWorks ? "active" : "unavailable: noatime")) and unwritten")
    }
}
