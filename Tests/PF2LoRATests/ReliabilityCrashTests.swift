import Foundation
import Testing
@testable import PF2LoRA

/// Crash safety of the adapter store (issue 7, item 3) and two writer processes (item 6).
///
/// A child `TestPublishLoop` (a test-only executable) publishes adapters in a loop and is SIGKILLed at a random
/// point after its first acknowledged publish, many times over one store. After each kill the
/// manifest as left on disk must name only whole, valid files and be at least as new as every
/// acknowledged publish; opening the store (reconcile) must quarantine nothing, leave no temporary
/// file, and make each adapter's current version the last acknowledged one or the one in flight,
/// with exactly the content that publish wrote. `PF2LORA_LONG=1` kills 500 times (CI: 20).
@Suite(.serialized) struct ReliabilityCrashTests {
    /// Same formula as `TestPublishLoopCommand.reliabilityValue` (the executable's code).
    static func value(seq: Int, index i: Int) -> Float { Float((seq &* 31 &+ i) % 1000) / 1024 }

    struct Ack: Hashable { let level: AdapterLevel; let client: String?; let version: Int; let seq: Int }

    /// Runs the publish loop; returns the process and a function that collects its acks so far.
    static func publisher(_ fx: ServerFixture, clients: String, seq: Int, count: Int = 1_000_000) throws -> (Process, () -> [Ack], Pipe) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: ServerProcess.publishLoopBinary)
        p.arguments = ["--model", fx.model, "--store", fx.store, "--clients", clients, "--seq", String(seq), "--count", String(count)]
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let lock = NSLock()
        final class Text: @unchecked Sendable { var value = "" }   // only under `lock`
        let text = Text()
        Thread.detachNewThread {
            let h = out.fileHandleForReading
            while true {
                let d = h.availableData
                if d.isEmpty { break }
                lock.lock(); text.value += String(decoding: d, as: UTF8.self); lock.unlock()
            }
        }
        let acks = { () -> [Ack] in
            lock.lock(); defer { lock.unlock() }
            return text.value.split(separator: "\n").compactMap { l -> Ack? in
                let f = l.split(separator: " ")
                guard f.count == 5, f[0] == "ack", let v = Int(f[3]), let q = Int(f[4]) else { return nil }   // a torn last line is ignored
                return Ack(level: f[1] == "shared" ? .shared : .client, client: f[1] == "shared" ? nil : String(f[2]), version: v, seq: q)
            }
        }
        return (p, acks, err)
    }

    /// Checks every element of `a` against the formula for its `test_seq`; returns that seq.
    static func wholeSeq(_ a: LoRAAdapter) -> Int? {
        guard let s = a.metadata.extra["test_seq"], let q = Int(s) else { return nil }
        for p in a.modules.values {
            for t in [p.a, p.b] { for i in 0..<t.count where t.data[i] != value(seq: q, index: i) { return nil } }
        }
        return q
    }

    struct Key: Hashable { let level: AdapterLevel; let client: String? }

    @Test func sigkillDuringPublishes() throws {
        let env = ProcessInfo.processInfo.environment
        let kills = Int(env["PF2LORA_CRASH_KILLS"] ?? "") ?? (env["PF2LORA_LONG"] == "1" ? 500 : 20)
        let fx = try ServerFixture(clients: [])
        defer { fx.cleanup() }
        let clients = ["alice", "bob", "carol"]
        var rng = RNG(seed: 5)
        var lastAck: [Key: Ack] = [:]        // the newest acknowledged publish of each adapter
        var seq = 1_000
        var published = 0, rolledForward = 0
        for round in 0..<kills {
            let (p, acks, _) = try Self.publisher(fx, clients: clients.joined(separator: ","), seq: seq)
            // Kill at a random point once it is publishing (or after 10 s, whatever it is doing).
            let t0 = Date()
            while acks().isEmpty && p.isRunning && Date().timeIntervalSince(t0) < 10 { usleep(500) }
            usleep(UInt32.random(in: 0...60_000, using: &rng))
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            #expect(p.terminationReason == .uncaughtSignal, "round \(round): the publisher exited by itself (\(p.terminationStatus))")
            usleep(20_000)   // let the reader drain the pipe
            let got = acks()
            published += got.count
            for a in got { lastAck[Key(level: a.level, client: a.client)] = a }
            seq += 1_000_000 / max(kills, 1) + got.count + 10

            // 1. The manifest exactly as the kill left it: parses, and names whole files at least as
            //    new as every acknowledged publish.
            let dir = fx.storeHandle.directory
            let raw = try Data(contentsOf: URL(fileURLWithPath: dir + "/manifest.json"))
            let m = try JSONDecoder().decode(Manifest.self, from: raw)
            for (k, a) in lastAck {
                let cur = k.level == .shared ? m.shared?.current : m.clients[k.client!]?.current
                #expect((cur ?? 0) >= a.version, "round \(round): manifest lost the acknowledged \(k) v\(a.version) (current \(String(describing: cur)))")
            }
            let checker = try AdapterStore.open(root: fx.store, base: fx.storeHandle.base, cacheBytes: 0)   // reconciles
            let report = checker.lastReconcile
            #expect(report.quarantined.isEmpty, "round \(round): a crash left a damaged version file: \(report.quarantined)")
            // 2. After reconcile: the current version is the acknowledged one or the one in flight, whole.
            for (k, a) in lastAck {
                guard let cur = checker.currentVersion(level: k.level, client: k.client) else { Issue.record("\(k) has no current version"); continue }
                #expect(cur == a.version || cur == a.version + 1, "round \(round): \(k) current v\(cur), last acknowledged v\(a.version)")
                let loaded = try checker.readAndValidate(level: k.level, client: k.client, version: cur)
                let q = Self.wholeSeq(loaded)
                #expect(q != nil, "round \(round): \(k) v\(cur) is not whole")
                if cur == a.version { #expect(q == a.seq, "round \(round): \(k) v\(cur) holds seq \(String(describing: q)), published \(a.seq)") } else {
                    rolledForward += 1
                    lastAck[k] = Ack(level: k.level, client: k.client, version: cur, seq: q ?? -1)
                }
                // Every version the manifest lists is on disk and valid.
                for v in checker.versions(level: k.level, client: k.client) {
                    #expect((try? checker.readAndValidate(level: k.level, client: k.client, version: v)) != nil, "\(k) v\(v) listed but unreadable")
                }
            }
            // 3. No temporary file survives reconcile.
            let leftovers = (FileManager.default.enumerator(atPath: dir)?.allObjects as? [String] ?? []).filter { ($0 as NSString).lastPathComponent.hasPrefix(".tmp-") }
            #expect(leftovers.isEmpty, "round \(round): \(leftovers)")
        }
        #expect(published > kills, "the publisher made progress between kills")
        let summary = "crash safety: \(kills) SIGKILLs during \(published) acknowledged publishes (+\(rolledForward) in-flight publishes rolled forward by reconcile); adapters lost 0, damaged files 0"
        print(summary)
        FuzzReport.append(summary)
    }

    /// Two real processes publishing to the same clients of one store at once: every publish gets
    /// its own version number, nothing is lost or torn, and the manifest ends at the newest.
    @Test func twoWriterProcesses() throws {
        let fx = try ServerFixture(clients: [])
        defer { fx.cleanup() }
        let n = 24
        let (p1, acks1, _) = try Self.publisher(fx, clients: "alice,bob", seq: 0, count: n)
        let (p2, acks2, _) = try Self.publisher(fx, clients: "bob,alice", seq: 100_000, count: n)
        p1.waitUntilExit(); p2.waitUntilExit()
        #expect(p1.terminationStatus == 0 && p2.terminationStatus == 0)
        usleep(50_000)
        let all = acks1() + acks2()
        #expect(all.count == 2 * n)
        let store = try AdapterStore.open(root: fx.store, base: fx.storeHandle.base, cacheBytes: 0)
        #expect(store.lastReconcile.quarantined.isEmpty && store.lastReconcile.repointed.isEmpty)
        for key in [Key(level: .shared, client: nil), Key(level: .client, client: "alice"), Key(level: .client, client: "bob")] {
            let mine = all.filter { $0.level == key.level && $0.client == key.client }
            #expect(Set(mine.map(\.version)).count == mine.count, "\(key): a version number was given twice: \(mine.map(\.version).sorted())")
            let newest = mine.max { $0.version < $1.version }!
            #expect(store.currentVersion(level: key.level, client: key.client) == newest.version)
            #expect(Self.wholeSeq(try store.readAndValidate(level: key.level, client: key.client, version: newest.version)) == newest.seq)
        }
    }

    /// A full disk (a 96 KiB tmpfs; skipped where mounting is not permitted): publishing fails with
    /// an error that names the file and the cause, the old version stays current and whole, no
    /// temporary file is left, and the store reopens as it was.
    @Test func fullDiskKeepsTheOldVersion() throws {
        let fx = try ServerFixture(clients: [])
        defer { fx.cleanup() }
        let mnt = TestPaths.tempDir("tmpfs")
        defer { try? FileManager.default.removeItem(atPath: mnt) }
        let mount = Process()
        mount.executableURL = URL(fileURLWithPath: "/bin/mount")
        mount.arguments = ["-t", "tmpfs", "-o", "size=96k", "tmpfs", mnt]
        mount.standardError = FileHandle.nullDevice
        guard (try? mount.run()) != nil, ({ mount.waitUntilExit(); return mount.terminationStatus == 0 }()) else {
            print("full-disk test skipped: cannot mount a tmpfs here")
            return
        }
        defer {
            let u = Process(); u.executableURL = URL(fileURLWithPath: "/bin/umount"); u.arguments = [mnt]
            try? u.run(); u.waitUntilExit()
        }
        let base = fx.storeHandle.base
        // keepVersions 1: every publish prunes, so the store itself never fills the disk; a ballast
        // file takes all but a few pages, one page more each round, so that publishes fail at every
        // stage: writing the version file, or (file written) writing the manifest.
        let store = try AdapterStore.open(root: mnt, base: base, keepVersions: 1, cacheBytes: 0)
        func client(_ seq: Int) -> LoRAAdapter {
            var a = ServerFixture.randomAdapter(base: base, level: .client, rank: 2, seed: UInt64(seq), clientID: "alice")
            a.metadata.extra["test_seq"] = String(seq)
            return a
        }
        var lastGood = (version: try store.publishClient(id: "alice", client(1)), seq: 1)
        var failures = (file: 0, manifest: 0), successes = 0, seq = 1
        var example = ""
        let ballast = mnt + "/ballast"
        for size in stride(from: 96 << 10, through: 0, by: -4096) {
            try? FileManager.default.removeItem(atPath: ballast)
            guard FileManager.default.createFile(atPath: ballast, contents: Data(count: size)) else { continue }
            seq += 1
            do { lastGood = (try store.publishClient(id: "alice", client(seq)), seq); successes += 1 } catch {
                let message = "\(error)"
                if message.contains("manifest.json") { failures.manifest += 1 } else { failures.file += 1 }
                if example.isEmpty { example = message }
                #expect(message.contains("No space left on device"), "the error says the disk is full: \(message)")
                #expect(message.contains("/clients/alice/") || message.contains("manifest.json"), "the error names the file: \(message)")
                #expect(store.currentVersion(level: .client, client: "alice") == lastGood.version)
                let names = try FileManager.default.subpathsOfDirectory(atPath: mnt)
                #expect(!names.contains { ($0 as NSString).lastPathComponent.hasPrefix(".tmp-") }, "\(names)")
                let again = try AdapterStore.open(root: mnt, base: base, keepVersions: 1, cacheBytes: 0)
                #expect(again.currentVersion(level: .client, client: "alice") == lastGood.version, "a failed publish became current: \(message)")
                #expect(again.lastReconcile.quarantined.isEmpty)
            }
        }
        try? FileManager.default.removeItem(atPath: ballast)
        #expect(failures.file >= 1 && failures.manifest >= 1 && successes >= 1, "\(failures) \(successes)")
        let reopened = try AdapterStore.open(root: mnt, base: base, cacheBytes: 0)
        #expect(reopened.currentVersion(level: .client, client: "alice") == lastGood.version)
        let back = try reopened.readAndValidate(level: .client, client: "alice", version: lastGood.version)
        #expect(back.metadata.extra["test_seq"] == String(lastGood.seq))
        #expect(AdapterFixtures.assertSame(back, client(lastGood.seq)))
        FuzzReport.append("full disk: tmpfs 96 KiB, free space varied page by page: \(failures.file) publishes failed writing the version file, \(failures.manifest) writing the manifest (\"\(example.prefix(110))…\"), \(successes) fitted; after every failure the old version stayed current and whole, also after reopening")
    }
}
