import Foundation
import Testing
@testable import PF2LoRA

/// Issue 11, store items: resolve + load as one step (8), compare-and-swap publishes (6), modules
/// kept across personalizations (7), stores that read-only commands leave alone (18), quarantine
/// reasons (19), read-only stores (20). Two store handles on one store hold separate open file
/// descriptions, manifests and caches, exactly as two processes do.
@Suite(.serialized) struct ReliabilityStoreTests {
    /// Item 8: a reader resolves a client (and folds the shared pair) while another handle publishes
    /// with `keepVersions` 1, so every version it read in the manifest may be pruned before its file
    /// is read. Before the fix: "client 'imp' has no version N; available: N" for a share of the
    /// requests. Now every resolve returns a whole adapter of a version that was current.
    @Test func resolveWhileAnotherWriterPrunesWithKeep1() throws {
        let fx = try ServerFixture(clients: ["imp"])
        defer { fx.cleanup() }
        let base = fx.storeHandle.base
        let writer = try AdapterStore.open(root: fx.store, base: base, keepVersions: 1, cacheBytes: 0)
        let reader = try AdapterStore.open(root: fx.store, base: base, cacheBytes: 0)
        let runtime = AdapterRuntime(model: fx.gpt2, store: reader)
        try runtime.prepare()
        let done = NSCondition()
        var finished = false, published = 0
        let publishes = 300
        let t = Thread {
            for n in 0..<publishes {
                if n % 5 == 4 {
                    _ = try? writer.publishShared(ServerFixture.randomAdapter(base: base, level: .shared, rank: 8, seed: UInt64(5000 + n)))
                } else {
                    _ = try? writer.publishClient(id: "imp", ServerFixture.randomAdapter(base: base, level: .client, rank: 2, seed: UInt64(n), clientID: "imp"))
                }
                done.lock(); published += 1; done.unlock()
            }
            done.lock(); finished = true; done.broadcast(); done.unlock()
        }
        t.start()
        var resolves = 0, failures: [String] = []
        var versions = Set<Int>()
        while true {
            done.lock(); let f = finished; done.unlock()
            if f { break }
            do {
                try runtime.refresh(idle: true)
                let b = try runtime.resolve(client: "imp")
                versions.insert(b.clientVersion ?? -1)
                if let a = try reader.latestClient("imp") { versions.insert(a.version) }
            } catch { failures.append("\(error)") }
            resolves += 1
        }
        #expect(published == publishes)
        #expect(resolves >= 50, "too few resolves overlapped the publishes (\(resolves))")
        #expect(failures.isEmpty, "\(failures.count) of \(resolves) resolves failed: \(failures.prefix(3))")
        #expect(!versions.contains(-1))
        #expect(versions.count >= 5, "the reader saw only \(versions.count) versions")
        // A version that is really gone says what is on disk, not the version it could not find.
        let current = try #require(reader.currentVersion(level: .client, client: "imp"))
        do { _ = try reader.load(level: .client, client: "imp", version: 1); Issue.record("version 1 loaded") } catch let e as AdapterStoreError {
            #expect(e == .noVersion(what: "client 'imp'", version: 1, available: [current]), "\(e)")
        }
    }
}
