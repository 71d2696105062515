import Foundation
import Testing
@testable import PF2LoRA

@Suite struct AdapterStoreTests {
    let base = AdapterFixtures.base()

    func withStore(keep: Int = 3, cache: Int = 1 << 20, _ body: (String, AdapterStore) throws -> Void) throws {
        let root = TestPaths.tempDir("store")
        defer { try? FileManager.default.removeItem(atPath: root) }
        try body(root, try AdapterStore.open(root: root, base: base, keepVersions: keep, cacheBytes: cache))
    }

    func shared(_ seed: UInt64) -> LoRAAdapter { AdapterFixtures.adapter(base, level: .shared, rank: 4, seed: seed) }
    func client(_ seed: UInt64) -> LoRAAdapter { AdapterFixtures.adapter(base, level: .client, rank: 2, seed: seed) }
    func files(_ dir: String) -> [String] { ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted() }

    @Test func publishLoadVersionsAndPrune() throws {
        try withStore { root, store in
            #expect(try store.latestShared() == nil)
            for i in 1...4 { #expect(try store.publishShared(shared(UInt64(i))) == i) }
            #expect(store.versions(level: .shared) == [2, 3, 4])
            #expect(files(store.directory + "/shared") == ["v000002.safetensors.zst", "v000003.safetensors.zst", "v000004.safetensors.zst"])
            let latest = try #require(try store.latestShared())
            #expect(latest.version == 4 && AdapterFixtures.assertSame(latest.adapter, shared(4)))
            #expect(AdapterFixtures.assertSame(try store.load(level: .shared, version: 2), shared(2)))
            #expect(throws: AdapterStoreError.self) { try store.load(level: .shared, version: 1) }

            // A client trained without a stated shared version is recorded against the current one.
            #expect(try store.publishClient(id: "alice", client(10)) == 1)
            var c = client(11); c.metadata.sharedVersion = 3
            #expect(try store.publishClient(id: "alice", c) == 2)
            #expect(store.trainedOn(client: "alice", version: 1) == 4)
            #expect(store.trainedOn(client: "alice", version: 2) == 3)
            #expect(try store.latestClient("alice")?.adapter.metadata.clientID == "alice")
            #expect(try store.latestClient("bob") == nil)
            #expect(store.clients() == ["alice"])
            var future = client(12); future.metadata.sharedVersion = 99
            #expect(throws: AdapterStoreError.unknownSharedVersion(client: "alice", version: 99, latest: 4)) { try store.publishClient(id: "alice", future) }
            #expect(throws: AdapterStoreError.wrongLevel(expected: .shared, got: .client)) { try store.publishShared(client(1)) }

            // Shared v3 is pinned by alice's current version: publishing shared 5 and 6 keeps it.
            try store.publishShared(shared(5)); try store.publishShared(shared(6))
            #expect(store.versions(level: .shared) == [3, 4, 5, 6])

            // Reopening reads the same state.
            let again = try AdapterStore.open(root: root, base: base)
            #expect(again.currentVersion(level: .shared) == 6)
            #expect(again.currentVersion(level: .client, client: "alice") == 2)
            #expect(again.lastReconcile.manifestRewritten == false)
            let manifest = try String(contentsOfFile: store.directory + "/manifest.json", encoding: .utf8)
            #expect(manifest.contains("\"trained_on\""))
        }
    }

    @Test func invalidAdapterIsNeverPublished() throws {
        try withStore { _, store in
            let bad = shared(1)
            bad.modules["transformer.h.0.attn.c_attn"]!.a.data[0] = .nan
            #expect(throws: AdapterError.self) { try store.publishShared(bad) }
            let other = AdapterFixtures.adapter(AdapterFixtures.base(fingerprint: "ffffffffffffffff"), level: .shared, rank: 4)
            #expect(throws: AdapterError.self) { try store.publishShared(other) }
            #expect(store.currentVersion(level: .shared) == nil)
            #expect(files(store.directory + "/shared").isEmpty)
        }
    }

    @Test func reconcileAfterSimulatedCrashes() throws {
        try withStore { root, store in
            for i in 1...3 { try store.publishShared(shared(UInt64(i))) }
            try store.publishClient(id: "alice", client(1))
            try store.publishClient(id: "alice", client(2))
            let dir = store.directory
            // A crash mid-write leaves a temp file; a crash after the rename but before the manifest
            // leaves a whole file the manifest does not name (here: client version 3).
            try Data("partial".utf8).write(to: URL(fileURLWithPath: dir + "/shared/.tmp-v000004.safetensors.zst-123-456"))
            try Data("partial".utf8).write(to: URL(fileURLWithPath: dir + "/.tmp-manifest.json-1-2"))
            var c3 = client(3); c3.metadata.clientID = "alice"; c3.metadata.sharedVersion = 3
            try c3.encode().write(to: URL(fileURLWithPath: dir + "/clients/alice/v000003.safetensors.zst"))
            // The manifest's current shared file vanished; shared v2 was bit-flipped.
            try FileManager.default.removeItem(atPath: dir + "/shared/v000003.safetensors.zst")
            var v2 = try Data(contentsOf: URL(fileURLWithPath: dir + "/shared/v000002.safetensors.zst"))
            v2[v2.count / 2] ^= 0x40
            try v2.write(to: URL(fileURLWithPath: dir + "/shared/v000002.safetensors.zst"))

            let r = try AdapterStore.open(root: root, base: base)
            #expect(r.lastReconcile.removedTempFiles.sorted() == [".tmp-manifest.json-1-2", "shared/.tmp-v000004.safetensors.zst-123-456"])
            #expect(r.lastReconcile.quarantined == ["shared/v000002.safetensors.zst"])
            #expect(r.lastReconcile.repointed.sorted() == ["client 'alice' 2 -> 3", "shared adapter 3 -> 1"])
            #expect(r.lastReconcile.manifestRewritten)
            #expect(r.currentVersion(level: .shared) == 1)
            #expect(r.versions(level: .shared) == [1])
            #expect(r.currentVersion(level: .client, client: "alice") == 3)
            #expect(r.trainedOn(client: "alice", version: 3) == 3)
            #expect(AdapterFixtures.assertSame(try r.latestShared()!.adapter, shared(1)))
            #expect(!files(dir + "/shared").contains { $0.hasPrefix(".tmp-") })
            #expect(files(dir + "/shared").contains(".corrupt-v000002.safetensors.zst"))
            // Version numbers are never reused: the next shared is 4, not 2 or 3.
            #expect(try r.publishShared(shared(9)) == 4)
            // A second open finds nothing to fix.
            let again = try AdapterStore.open(root: root, base: base)
            #expect(again.lastReconcile == ReconcileReport())
        }
    }

    @Test func unreadableManifestIsRebuiltFromFiles() throws {
        try withStore { root, store in
            try store.publishShared(shared(1))
            try store.publishClient(id: "bob", client(1))
            try Data("{not json".utf8).write(to: URL(fileURLWithPath: store.directory + "/manifest.json"))
            let r = try AdapterStore.open(root: root, base: base)
            #expect(r.currentVersion(level: .shared) == 1)
            #expect(r.currentVersion(level: .client, client: "bob") == 1)
            #expect(r.trainedOn(client: "bob", version: 1) == 1)
        }
    }

    @Test func otherBaseCannotOpenTheStoreFolder() throws {
        try withStore { root, store in
            try store.publishShared(shared(1))
            let impostor = AdapterFixtures.base(fingerprint: "aaaaaaaaaaaaaaaa")
            #expect(throws: AdapterStoreError.self) { try AdapterStore.open(root: root, base: impostor) }
        }
    }

    @Test func rejectsUnsafeClientIDs() throws {
        let bad = ["", "../x", "..", ".", "/abs", "/etc/passwd", "%2e%2e", "%2e%2e%2fx", "a\0b", "a/b", "a\\b", ".hidden",
                   "shared", "manifest", "Manifest", "clients", "lock", "NUL",
                   "аlice",   // Cyrillic а
                   "alice\u{200B}", "ａｌｉｃｅ", "café", String(repeating: "a", count: 65), "a b", "a\nb", "-\u{0}"]
        for id in bad {
            #expect(!ClientID.isValid(id), "accepted \(id.debugDescription)")
            #expect(throws: AdapterStoreError.self) { try ClientID.validate(id) }
        }
        for id in ["alice", "a", "A-b_c.d", "client.v2", "-x", "_", String(repeating: "z", count: 64), "0"] {
            #expect(ClientID.isValid(id), "rejected \(id)")
        }
        do { try ClientID.validate("a/b"); Issue.record("a/b accepted") } catch let AdapterStoreError.invalidClientID(_, why) {
            #expect(why.contains("'/'"))
        }
        #expect(AdapterStoreError.invalidClientID(id: "x", why: "y").description.contains("A-Z a-z 0-9 _ - ."))
        try withStore { root, store in
            for id in bad {
                #expect(throws: AdapterStoreError.self) { try store.publishClient(id: id, client(1)) }
                #expect(throws: AdapterStoreError.self) { try store.latestClient(id) }
                #expect(throws: AdapterStoreError.self) { try store.load(level: .client, client: id, version: 1) }
            }
            // Nothing was written anywhere: the store holds only its manifest and lock.
            #expect(files(store.directory) == [".lock", "manifest.json"])
            #expect(files(root) == [base.name])
        }
    }

    @Test func symlinksOutOfTheStoreAreRefused() throws {
        let outside = TestPaths.tempDir("outside")
        defer { try? FileManager.default.removeItem(atPath: outside) }
        try withStore { root, store in
            // A client folder that links outside, holding what looks like a valid adapter.
            var c = client(1); c.metadata.clientID = "eve"
            try c.encode().write(to: URL(fileURLWithPath: outside + "/v000001.safetensors.zst"))
            try FileManager.default.createDirectory(atPath: store.directory + "/clients", withIntermediateDirectories: true)
            try FileManager.default.createSymbolicLink(atPath: store.directory + "/clients/eve", withDestinationPath: outside)
            #expect(throws: AdapterStoreError.symlink(path: store.directory + "/clients/eve", target: outside, outside: true)) {
                try store.load(level: .client, client: "eve", version: 1)
            }
            #expect(throws: AdapterStoreError.self) { try store.publishClient(id: "eve", c) }
            #expect(files(outside) == ["v000001.safetensors.zst"])
            // A version file that links outside.
            try store.publishClient(id: "mallory", client(2))
            try FileManager.default.createSymbolicLink(atPath: store.directory + "/clients/mallory/v000002.safetensors.zst",
                                                       withDestinationPath: outside + "/v000001.safetensors.zst")
            #expect(throws: AdapterStoreError.self) { try store.readAndValidate(level: .client, client: "mallory", version: 2) }
            // Reopening ignores the linked folder and sets the linked file aside without following it.
            let r = try AdapterStore.open(root: root, base: base)
            #expect(r.clients() == ["mallory"])
            #expect(r.currentVersion(level: .client, client: "mallory") == 1)
            #expect(r.lastReconcile.quarantined == ["clients/mallory/v000002.safetensors.zst"])
            #expect(files(outside) == ["v000001.safetensors.zst"])
        }
    }

    @Test func clientFileInAnotherClientsFolderIsRefused() throws {
        try withStore { _, store in
            try store.publishClient(id: "alice", client(1))
            try FileManager.default.createDirectory(atPath: store.directory + "/clients/bob", withIntermediateDirectories: true)
            try FileManager.default.copyItem(atPath: store.directory + "/clients/alice/v000001.safetensors.zst",
                                             toPath: store.directory + "/clients/bob/v000001.safetensors.zst")
            #expect(throws: AdapterError.self) { try store.load(level: .client, client: "bob", version: 1) }
            try FileManager.default.createDirectory(atPath: store.directory + "/shared", withIntermediateDirectories: true)
            try FileManager.default.copyItem(atPath: store.directory + "/clients/alice/v000001.safetensors.zst",
                                             toPath: store.directory + "/shared/v000001.safetensors.zst")
            #expect(throws: AdapterError.levelMismatch(file: "shared/v000001.safetensors.zst", found: "client", expected: "shared")) {
                try store.load(level: .shared, version: 1)
            }
        }
    }

    @Test func refreshSeesAnotherWritersVersions() throws {
        try withStore { root, reader in
            let writer = try AdapterStore.open(root: root, base: base)
            #expect(try reader.refresh() == false)
            try writer.publishShared(shared(1))
            try writer.publishClient(id: "carol", client(1))
            #expect(try reader.refresh() == true)
            #expect(try reader.refresh() == false)
            #expect(reader.currentVersion(level: .client, client: "carol") == 1)
            #expect(try reader.latestClient("carol")?.version == 1)
        }
    }

    @Test func concurrentWritersNeverInterleave() throws {
        try withStore(keep: 100) { root, a in
            let b = try AdapterStore.open(root: root, base: base, keepVersions: 100)
            let stores = [a, b]
            let errors = NSLock()
            var failures: [String] = []
            DispatchQueue.concurrentPerform(iterations: 2) { w in
                for i in 0..<8 {
                    do {
                        try stores[w].publishShared(shared(UInt64(100 * w + i)))
                        try stores[w].publishClient(id: "c\(i % 2)", client(UInt64(i)))
                    } catch { errors.lock(); failures.append("\(error)"); errors.unlock() }
                }
            }
            #expect(failures.isEmpty)
            let r = try AdapterStore.open(root: root, base: base, keepVersions: 100)
            #expect(r.versions(level: .shared) == Array(1...16))
            #expect(r.versions(level: .client, client: "c0") == Array(1...8))
            #expect(r.versions(level: .client, client: "c1") == Array(1...8))
            #expect(r.lastReconcile.manifestRewritten == false)
        }
    }

    @Test func cacheHitsAndEvictsByBytes() throws {
        let one = client(1).byteCount
        let cache = AdapterCache(capacityBytes: 2 * one + one / 2)
        let k = (1...3).map { AdapterCache.Key(level: .client, client: "c\($0)", version: 1) }
        cache.put(k[0], client(1)); cache.put(k[1], client(2))
        #expect(cache.get(k[0]) != nil)          // k0 now most recent
        cache.put(k[2], client(3))               // evicts k1, the least recently used
        #expect(cache.contains(k[0]) && !cache.contains(k[1]) && cache.contains(k[2]))
        var s = cache.currentStats
        #expect(s.hits == 1 && s.misses == 0 && s.evictions == 1 && s.entries == 2 && s.bytes == 2 * one)
        #expect(cache.get(k[1]) == nil)
        s = cache.currentStats
        #expect(s.misses == 1)
        cache.setCapacity(bytes: one)
        #expect(cache.currentStats.entries == 1 && cache.keys == [k[2]])
        cache.put(AdapterCache.Key(level: .shared, client: nil, version: 1), shared(1))   // larger than the budget: not kept
        #expect(cache.currentStats.entries == 1)
        #expect(cache.remove(k[2]) && cache.currentStats.bytes == 0)
    }

    @Test func storeLoadsGoThroughTheCache() throws {
        try withStore(cache: 10 << 20) { _, store in
            try store.publishShared(shared(1))
            store.cache.removeAll { _ in true }
            _ = try store.load(level: .shared, version: 1)
            _ = try store.load(level: .shared, version: 1)
            let s = store.cache.currentStats
            #expect(s.misses == 1 && s.hits == 1 && s.bytes == shared(1).byteCount)
        }
    }
}
