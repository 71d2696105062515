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
        /// The publisher's progress, shared with this thread under its lock.
        final class Progress: @unchecked Sendable {
            let lock = NSLock()
            var finished = false, published = 0
        }
        let progress = Progress()
        let publishes = 300
        let t = Thread {
            for n in 0..<publishes {
                if n % 5 == 4 {
                    _ = try? writer.publishShared(ServerFixture.randomAdapter(base: base, level: .shared, rank: 8, seed: UInt64(5000 + n)))
                } else {
                    _ = try? writer.publishClient(id: "imp", ServerFixture.randomAdapter(base: base, level: .client, rank: 2, seed: UInt64(n), clientID: "imp"))
                }
                progress.lock.lock(); progress.published += 1; progress.lock.unlock()
            }
            progress.lock.lock(); progress.finished = true; progress.lock.unlock()
        }
        t.start()
        var resolves = 0, failures: [String] = []
        var versions = Set<Int>()
        while true {
            progress.lock.lock(); let f = progress.finished; progress.lock.unlock()
            if f { break }
            do {
                try runtime.refresh(idle: true)
                let b = try runtime.resolve(client: "imp")
                versions.insert(b.clientVersion ?? -1)
                if let a = try reader.latestClient("imp") { versions.insert(a.version) }
            } catch { failures.append("\(error)") }
            resolves += 1
        }
        #expect(progress.published == publishes)
        #expect(resolves >= 50, "too few resolves overlapped the publishes (\(resolves))")
        #expect(failures.isEmpty, "\(failures.count) of \(resolves) resolves failed: \(failures.prefix(3))")
        #expect(!versions.contains(-1))
        #expect(versions.count >= 5, "the reader saw only \(versions.count) versions")
        // A version that is really gone says what is on disk, not the version it could not find.
        try reader.refresh(force: true)
        let current = try #require(reader.currentVersion(level: .client, client: "imp"))
        do { _ = try reader.load(level: .client, client: "imp", version: 1); Issue.record("version 1 loaded") } catch let e as AdapterStoreError {
            #expect(e == .noVersion(what: "client 'imp'", version: 1, available: [current]), "\(e)")
        }
    }

    static func client(_ fx: ServerFixture, _ id: String, seed: UInt64, rank: Int = 2) -> LoRAAdapter {
        ServerFixture.randomAdapter(base: fx.storeHandle.base, level: .client, rank: rank, seed: seed, clientID: id, std: 0.05)
    }

    /// Item 6, in process: a personalization whose client gets a new version from another writer
    /// (a second store handle) while it trains. Before the fix it published over that version and
    /// reported a stale `previousVersion`; now it is refused with a conflict naming both versions,
    /// nothing is written, and a retry starts from the other writer's version.
    @Test func personalizeIsACompareAndSwap() throws {
        let fx = try ServerFixture(clients: ["dana"])
        defer { fx.cleanup() }
        let tok = try BPETokenizer(folder: fx.model)
        let other = try AdapterStore.open(root: fx.store, base: fx.storeHandle.base)
        let mine = try AdapterStore.open(root: fx.store, base: fx.storeHandle.base)
        var o = PersonalizeOptions(); o.steps = 3; o.batchSize = 2; o.seqLen = 16
        var theirs: Int?
        do {
            _ = try personalize(weights: fx.gpt2.weights, tokenizer: tok, store: mine, client: "dana", texts: PersonalizeTests.texts, options: o) { step, _ in
                if step == 1 { theirs = try? other.publishClient(id: "dana", Self.client(fx, "dana", seed: 99)) }
            }
            Issue.record("personalize published over the version another writer made meanwhile")
        } catch let e as AdapterStoreError {
            #expect(e == .conflict(what: "client 'dana'", expected: 1, current: 2), "\(e)")
            #expect(e.description.contains("started from version 1") && e.description.contains("version 2"))
        }
        #expect(theirs == 2)
        try mine.refresh(force: true)
        #expect(mine.currentVersion(level: .client, client: "dana") == 2)
        #expect(mine.versions(level: .client, client: "dana") == [1, 2], "a refused publish wrote a file")
        // The retry starts from the other writer's version and replaces exactly it.
        let r = try personalize(weights: fx.gpt2.weights, tokenizer: tok, store: mine, client: "dana", texts: PersonalizeTests.texts, options: o)
        #expect(r.previousVersion == 2 && r.version == 3)

        // The store API: a publish expecting a version is refused once another handle moved on,
        // also for the shared level and for a client that did not exist when the run started.
        #expect(throws: AdapterStoreError.conflict(what: "client 'dana'", expected: 2, current: 3)) {
            try other.publishClient(id: "dana", Self.client(fx, "dana", seed: 5), expecting: .version(2))
        }
        #expect(throws: AdapterStoreError.conflict(what: "client 'dana'", expected: nil, current: 3)) {
            try other.publishClient(id: "dana", Self.client(fx, "dana", seed: 5), expecting: .absent)
        }
        let sharedNow = try #require(other.currentVersion(level: .shared))
        try mine.publishShared(ServerFixture.randomAdapter(base: fx.storeHandle.base, level: .shared, rank: 8, seed: 3))
        #expect(throws: AdapterStoreError.conflict(what: "shared adapter", expected: sharedNow, current: sharedNow + 1)) {
            try other.publishShared(ServerFixture.randomAdapter(base: fx.storeHandle.base, level: .shared, rank: 8, seed: 4), expecting: .version(sharedNow))
        }
        #expect(try other.publishClient(id: "dana", Self.client(fx, "dana", seed: 5), expecting: .version(3)) == 4)
    }

    /// Item 6, two processes: `serve`'s personalize and the CLI's `personalize` of the same client on
    /// one store. The CLI publishes while the server trains; the server's publish is then refused
    /// with -32007 (conflict), and a retry replaces the CLI's version. Before the fix both reported
    /// success and the server's `previous_version` was stale.
    @Test func serverAndCLIPersonalizeConflict() throws {
        let fx = try ServerFixture(clients: ["dana"])
        defer { fx.cleanup() }
        let texts = fx.root + "/texts.jsonl"
        try PersonalizeTests.texts.map { String(decoding: try JSONSerialization.data(withJSONObject: ["text": $0]), as: UTF8.self) }
            .joined(separator: "\n").write(toFile: texts, atomically: true, encoding: .utf8)
        let s = try fx.serve()
        s.request(1, "personalize", ["client": "dana", "texts": PersonalizeTests.texts, "steps": 100_000, "max_seconds": 12, "batch": 2, "seq": 16])
        let cli = try CLITests.run(["personalize", "--model", fx.model, "--store", fx.store, "--client", "dana", "--texts", texts,
                                    "--steps", "2", "--batch", "2", "--seq", "16", "--threads", "1"])
        #expect(cli.code == 0, "\(cli.err)")
        let cliVersion = (try? JSONSerialization.jsonObject(with: Data(cli.out.utf8)) as? [String: Any])?["version"] as? Int
        #expect(cliVersion == 2)
        let r = s.response(1, timeout: 120)
        #expect(ServerProcess.errorCode(r) == -32007, "the server's publish was not refused: \(r ?? [:])")
        let msg = ((r?["error"] as? [String: Any])?["message"] as? String) ?? ""
        #expect(msg.contains("started from version 1") && msg.contains("version 2"), "\(msg)")
        s.request(2, "personalize", ["client": "dana", "texts": PersonalizeTests.texts, "steps": 2, "batch": 2, "seq": 16])
        let r2 = try #require(ServerProcess.result(s.response(2, timeout: 120)), "\(s.stderrText)")
        #expect(r2["previous_version"] as? Int == 2 && r2["version"] as? Int == 3)
        #expect(s.finish() == 0)
    }

    /// Item 7: a client with pairs on every linear layer, personalized (and trained through
    /// train_local) under a shared pair that adapts only attn.c_attn. Before the fix the new version
    /// held only the shared pair's modules; now every module of the previous version is kept
    /// (personalize trains them all; train_local carries those outside the federation unchanged).
    @Test func newVersionsKeepEveryModule() throws {
        let fx = try ServerFixture(clients: ["dana"])
        defer { fx.cleanup() }
        let base = fx.storeHandle.base
        let all = Set(base.linears.keys)
        var narrow = ServerFixture.randomAdapter(base: base, level: .shared, rank: 8, seed: 7)
        narrow.modules = narrow.modules.filter { $0.key.hasSuffix("attn.c_attn") }
        #expect(narrow.modules.count == 2 && all.count == 8)
        try fx.storeHandle.publishShared(narrow)
        let before = try #require(try fx.storeHandle.latestClient("dana")).adapter
        #expect(Set(before.modules.keys) == all)

        let tok = try BPETokenizer(folder: fx.model)
        var o = PersonalizeOptions(); o.steps = 2; o.batchSize = 2; o.seqLen = 16
        let r = try personalize(weights: fx.gpt2.weights, tokenizer: tok, store: fx.storeHandle, client: "dana", texts: PersonalizeTests.texts, options: o)
        let after = try fx.storeHandle.load(level: .client, client: "dana", version: r.version)
        #expect(Set(after.modules.keys) == all, "personalize dropped \(all.subtracting(after.modules.keys).sorted())")
        let outside = all.filter { !$0.hasSuffix("attn.c_attn") }
        #expect(outside.contains { m in after.modules[m].map { !FederatedClientTests.bitsEqual($0.b, before.modules[m]!.b) } ?? false },
                "modules outside the shared pair were not trained")

        // train_local: the federation trains the shared pair's modules; the others are kept as they were.
        let data = fx.root + "/data"
        try FederatedClientTests.writeClientData(data, texts: PersonalizeTests.texts)
        var lo = LocalRoundOptions(); lo.localSteps = 1; lo.lowerSteps = 1; lo.batchSize = 2; lo.seqLen = 16
        let x = try initialSharedAdapter(weights: fx.gpt2.weights, base: base, modules: Array(narrow.modules.keys), rank: 8, alpha: 8, seed: 1)
        let round = try trainLocalRound(weights: fx.gpt2.weights, store: fx.storeHandle, client: "dana",
                                        data: try loadClientFolder(data, client: "dana", tokenizer: tok), shared: x,
                                        padToken: textSeparator(tok), options: lo)
        let fed = try fx.storeHandle.load(level: .client, client: "dana", version: round.clientVersion)
        #expect(Set(fed.modules.keys) == all, "train_local dropped \(all.subtracting(fed.modules.keys).sorted())")
        for m in outside {
            guard let f = fed.modules[m], let p = after.modules[m] else { continue }
            #expect(FederatedClientTests.bitsEqual(f.a, p.a) && FederatedClientTests.bitsEqual(f.b, p.b), "\(m) changed")
        }
    }

    /// Every path under `root` with its kind, size and modification time: what a read-only command
    /// must leave exactly as it was.
    static func tree(_ root: String) -> [String: String] {
        var out: [String: String] = [:]
        for p in (try? FileManager.default.subpathsOfDirectory(atPath: root)) ?? [] {
            var st = stat()
            guard lstat(root + "/" + p, &st) == 0 else { continue }
            out[p] = "\(st.st_mode & S_IFMT) \(st.st_size) \(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)"
        }
        return out
    }

    static func waitForStderr(_ s: ServerProcess, _ needle: String, timeout: Double = 10) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while !s.stderrText.contains(needle) && Date() < deadline { usleep(20_000) }
        return s.stderrText.contains(needle)
    }

    /// Flips one byte in the middle of a file (the zstd checksum catches it: check 1).
    static func corrupt(_ path: String) throws {
        var d = try Data(contentsOf: URL(fileURLWithPath: path))
        d[d.count / 2] ^= 0x5A
        try d.write(to: URL(fileURLWithPath: path))
    }

    /// Item 18: a mistyped --store, a model folder of another name than the store's base folder, a
    /// client that does not exist, and read-only commands over a store with a damaged file. Before
    /// the fix `generate` and `serve` made an empty store (or base folder) and answered with the base
    /// model, `generate --client` of an unknown client served the shared pair, and `generate` renamed
    /// the damaged file. Now: one clear error naming what the store holds and how to pick it, and
    /// nothing in any store is created or changed by a command that only reads.
    @Test func readOnlyCommandsChangeNothingAndNeverFallBackSilently() throws {
        let fx = try ServerFixture(clients: ["alice", "bob"])
        defer { fx.cleanup() }
        let prompt = ["--prompt", "The cat", "--max-tokens", "3", "--temperature", "0", "--threads", "1"]
        // A mistyped store path: an error, and no folder appears.
        let typo = fx.root + "/adapterz"
        let g1 = try CLITests.run(["generate", "--model", fx.model, "--store", typo] + prompt)
        #expect(g1.code != 0 && g1.err.contains("no adapter store at"), "\(g1.err)")
        #expect(!FileManager.default.fileExists(atPath: typo), "generate created the mistyped store")
        let s1 = try ServerProcess(["serve", "--model", fx.model, "--store", typo, "--threads", "1"])
        #expect(s1.finish() != 0)
        #expect(Self.waitForStderr(s1, "no adapter store at"), "\(s1.stderrText)")
        #expect(!FileManager.default.fileExists(atPath: typo), "serve created the mistyped store")

        // The same weights in a model folder of another name: not a new empty base folder; the
        // error names the folder that holds them and --base.
        let copy = fx.root + "/renamed-model"
        try FileManager.default.copyItem(atPath: fx.model, toPath: copy)
        let before = Self.tree(fx.store)
        let g2 = try CLITests.run(["generate", "--model", copy, "--store", fx.store, "--client", "alice"] + prompt)
        let folder = (fx.storeHandle.directory as NSString).lastPathComponent
        #expect(g2.code != 0 && g2.err.contains("--base \(folder)"), "\(g2.err)")
        let s2 = try ServerProcess(["serve", "--model", copy, "--store", fx.store, "--threads", "1"])
        #expect(s2.finish() != 0)
        #expect(Self.waitForStderr(s2, "--base \(folder)"), "\(s2.stderrText)")
        let g3 = try CLITests.run(["generate", "--model", copy, "--store", fx.store, "--base", folder, "--client", "alice"] + prompt)
        #expect(g3.code == 0 && g3.err.contains("client v1"), "\(g3.err)")
        // Another model altogether: the error lists the bases the store holds.
        let other = fx.root + "/other-model"
        var cfg = GPT2Config(vocabSize: 400, nPositions: 64, nEmbd: 32, nLayer: 1, nHead: 2, eosTokenId: nil)
        cfg.bosTokenId = nil
        try LanguageModel(folder: other, weights: ModelWeights.random(architecture: cfg.architecture, seed: 3), checkpoint: nil).save(to: other)
        for f in ["tokenizer.json", "vocab.json", "merges.txt"] { try FileManager.default.copyItem(atPath: fx.model + "/" + f, toPath: other + "/" + f) }
        let g4 = try CLITests.run(["generate", "--model", other, "--store", fx.store] + prompt)
        #expect(g4.code != 0 && g4.err.contains("holds no adapters for base 'other-model'") && g4.err.contains("\(folder)/ (base"), "\(g4.err)")
        // A client the store has no adapter for: an error, not the shared pair alone.
        let g5 = try CLITests.run(["generate", "--model", fx.model, "--store", fx.store, "--client", "alcie"] + prompt)
        #expect(g5.code != 0 && g5.err.contains("no adapter for client 'alcie'") && g5.err.contains("alice, bob"), "\(g5.err)")
        let g6 = try CLITests.run(["generate", "--model", fx.model, "--store", fx.store] + prompt)
        #expect(g6.code == 0 && g6.err.contains("shared v1 client none"), "\(g6.err)")

        // A damaged file: generate, adapters list and inspect leave it where it is.
        try Self.corrupt(fx.storeHandle.directory + "/clients/bob/v000001.safetensors.zst")
        let damaged = Self.tree(fx.store)
        let g7 = try CLITests.run(["generate", "--model", fx.model, "--store", fx.store, "--client", "alice"] + prompt)
        #expect(g7.code == 0, "\(g7.err)")
        #expect(g7.err.contains("clients/bob/v000001.safetensors.zst failed validation and is skipped") && g7.err.contains("check 1"), "\(g7.err)")
        _ = try CLITests.run(["adapters", "list", "--store", fx.store])
        _ = try CLITests.run(["adapters", "inspect", "--store", fx.store, "--client", "alice", "--model", fx.model])
        _ = try CLITests.run(["adapters", "export-peft", "--store", fx.store, "--model", fx.model, "--client", "bob", "--out", fx.root + "/peft"])
        _ = try CLITests.run(["rank", "--store", fx.store, "--model", fx.model, "--client", "alice"])
        #expect(Self.tree(fx.store) == damaged, "a read-only command changed the store")
        #expect(before.keys.allSatisfy { damaged[$0] != nil })
    }

    /// `--store` pointed at one base's folder inside a store (`--store adapters/debian-llama` for
    /// `--store adapters`, the natural slip with the shipped default). Before the fix the folder was
    /// read as a store with no folder for this base: `serve` and `generate` answered with the base
    /// model alone ("shared none; 0 clients; ready"), and a publishing command would have made a base
    /// folder inside the base folder. Now every access mode refuses with the `--store` (and `--base`)
    /// to pass, and nothing is created.
    @Test func aBaseFolderGivenAsTheStoreIsRefusedWithTheStoreToPass() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let baseDir = fx.storeHandle.directory
        let storeRoot = (baseDir as NSString).deletingLastPathComponent
        let before = Self.tree(fx.store)
        for (access, create) in [(StoreAccess.read, false), (.write, false), (.write, true)] {
            do {
                _ = try AdapterStore.open(root: baseDir, base: fx.storeHandle.base, access: access, create: create)
                Issue.record("opened the base folder \(baseDir) as a store (\(access), create \(create))")
            } catch let e as AdapterStoreError {
                #expect("\(e)".contains("is the folder of one base model inside an adapter store") && "\(e)".contains("--store \(storeRoot)"), "\(e)")
            }
        }
        // The same with a trailing slash, and with the manifest lost (shared/ and clients/ remain).
        #expect(throws: AdapterStoreError.self) { _ = try AdapterStore.open(root: baseDir + "/", base: fx.storeHandle.base, access: .read, create: false) }
        let prompt = ["--prompt", "The cat", "--max-tokens", "2", "--temperature", "0", "--threads", "1"]
        let g = try CLITests.run(["generate", "--model", fx.model, "--store", baseDir, "--client", "alice"] + prompt)
        #expect(g.code != 0 && g.err.contains("Pass --store \(storeRoot)"), "\(g.err)")
        let s = try ServerProcess(["serve", "--model", fx.model, "--store", baseDir, "--threads", "1"])
        #expect(s.finish() != 0)
        #expect(Self.waitForStderr(s, "is the folder of one base model inside an adapter store"), "\(s.stderrText)")
        #expect(Self.tree(fx.store) == before, "a refused open changed the store")
        // A base folder that is not this model's: the error says so rather than suggesting --store.
        var other = fx.storeHandle.base
        other = BaseModelInfo(name: "other", fingerprint: "0123456789abcdef", linears: other.linears)
        do {
            _ = try AdapterStore.open(root: baseDir, base: other, access: .read, create: false)
            Issue.record("opened another base's folder")
        } catch let e as AdapterStoreError {
            #expect("\(e)".contains("other weights than this model's"), "\(e)")
        }
        try FileManager.default.removeItem(atPath: baseDir + "/manifest.json")
        do {
            _ = try AdapterStore.open(root: baseDir, base: fx.storeHandle.base, access: .read, create: false)
            Issue.record("opened a manifest-less base folder as a store")
        } catch let e as AdapterStoreError {
            #expect("\(e)".contains("no manifest"), "\(e)")
        }
    }

    /// A mistyped `--base`. Before the fix `personalize --base <typo>` made a second, empty base
    /// folder beside the one holding this model's adapters and trained the client on no shared pair
    /// (published, exit 0); `generate`/`serve --base <typo>` said the store "holds no adapters for
    /// base '<model>'" while listing the folder that does. Now every command refuses, naming the
    /// folder with these weights, and the store is unchanged; a new --base in a store that holds no
    /// folder for these weights is still created by a publishing command. Also: `personalize` with
    /// an empty --texts file or an unusable client id created the store before refusing.
    @Test func aMistypedBaseFolderIsRefusedNamingTheRightOne() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let folder = (fx.storeHandle.directory as NSString).lastPathComponent
        let typo = folder + "x"
        let before = Self.tree(fx.store)
        for (access, create) in [(StoreAccess.read, false), (.write, false), (.write, true)] {
            do {
                _ = try AdapterStore.open(root: fx.store, base: fx.storeHandle.base, folder: typo, access: access, create: create)
                Issue.record("opened --base \(typo) (\(access), create \(create))")
            } catch let e as AdapterStoreError {
                #expect("\(e)".contains("no base folder '\(typo)'") && "\(e)".contains("pass --base \(folder)"), "\(e)")
            }
        }
        let prompt = ["--prompt", "The cat", "--max-tokens", "2", "--temperature", "0", "--threads", "1"]
        let g = try CLITests.run(["generate", "--model", fx.model, "--store", fx.store, "--base", typo, "--client", "alice"] + prompt)
        #expect(g.code != 0 && g.err.contains("pass --base \(folder)"), "\(g.err)")
        let texts = fx.root + "/texts.txt"
        try "a cat sat on the mat\n\nthe dog ran".write(toFile: texts, atomically: true, encoding: .utf8)
        let p = try CLITests.run(["personalize", "--model", fx.model, "--store", fx.store, "--base", typo, "--client", "carol",
                                  "--texts", texts, "--steps", "1", "--threads", "1"])
        #expect(p.code != 0 && p.err.contains("pass --base \(folder)"), "\(p.err)")
        let s = try ServerProcess(["serve", "--model", fx.model, "--store", fx.store, "--base", typo, "--threads", "1"])
        #expect(s.finish() != 0)
        #expect(Self.waitForStderr(s, "pass --base \(folder)"), "\(s.stderrText)")
        #expect(Self.tree(fx.store) == before, "a mistyped --base changed the store")
        // A store without a folder for these weights: an explicit new --base is made by a publish.
        let fresh = fx.root + "/fresh-store"
        let p2 = try CLITests.run(["personalize", "--model", fx.model, "--store", fresh, "--base", "mine", "--client", "carol",
                                   "--texts", texts, "--steps", "1", "--threads", "1"])
        #expect(p2.code == 0 && FileManager.default.fileExists(atPath: fresh + "/mine/manifest.json"), "\(p2.err)")
        // Nothing to train on, or an unusable id: refused before the store is created.
        let empty = fx.root + "/empty.txt"
        try " \n\n".write(toFile: empty, atomically: true, encoding: .utf8)
        for (client, file, says) in [("carol", empty, "no texts were given"), ("../x", texts, "invalid client id")] {
            let none = fx.root + "/never-made"
            let r = try CLITests.run(["personalize", "--model", fx.model, "--store", none, "--client", client, "--texts", file, "--steps", "1"])
            #expect(r.code != 0 && r.err.contains(says), "\(r.err)")
            #expect(!FileManager.default.fileExists(atPath: none), "personalize created \(none) before refusing")
        }
        // The same for federate (no --data folder, an empty one) and import-peft (no PEFT folder).
        let none = fx.root + "/never-made"
        let emptyData = fx.root + "/empty-data"
        try FileManager.default.createDirectory(atPath: emptyData, withIntermediateDirectories: true)
        for (args, says) in [(["federate", "--model", fx.model, "--store", none, "--data", fx.root + "/no-data", "--rounds", "1"], "is not a folder"),
                             (["federate", "--model", fx.model, "--store", none, "--data", emptyData, "--rounds", "1"], "has no client folders"),
                             (["adapters", "import-peft", "--model", fx.model, "--store", none, "--peft", fx.root + "/no-peft",
                               "--level", "client", "--client", "carol"], "has no adapter_config.json")] {
            let r = try CLITests.run(args)
            #expect(r.code != 0 && r.err.contains(says), "\(args[0]): \(r.err)")
            #expect(!FileManager.default.fileExists(atPath: none), "\(args[0]) created \(none) before refusing")
        }
    }

    /// `adapters export-peft --out` inside the store (its base folder, a client's folder, the store
    /// root) wrote adapter_config.json and adapter_model.safetensors among the store's own files;
    /// `--out` naming a file said "cannot create the folder". Now both are refused before anything
    /// is written, naming what to pass; a folder outside the store (also through a relative path
    /// and a link into the store) is checked by its resolved path.
    @Test func exportPEFTNeverWritesIntoTheStore() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let dir = fx.storeHandle.directory
        let before = Self.tree(fx.store)
        let link = fx.root + "/into-store"
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: dir + "/clients")
        for out in [dir, dir + "/clients/alice", fx.store, dir + "/new/deeper", link + "/x"] {
            let r = try CLITests.run(["adapters", "export-peft", "--store", fx.store, "--model", fx.model, "--client", "alice", "--out", out])
            #expect(r.code != 0 && r.err.contains("is inside the adapter store"), "\(out): \(r.err)")
        }
        let file = fx.root + "/a-file"
        try Data("x".utf8).write(to: URL(fileURLWithPath: file))
        let f = try CLITests.run(["adapters", "export-peft", "--store", fx.store, "--model", fx.model, "--client", "alice", "--out", file])
        #expect(f.code != 0 && f.err.contains("exists and is not a folder"), "\(f.err)")
        #expect(Self.tree(fx.store) == before, "export-peft changed the store")
        let ok = try CLITests.run(["adapters", "export-peft", "--store", fx.store, "--model", fx.model, "--client", "alice", "--out", fx.root + "/peft"])
        #expect(ok.code == 0 && FileManager.default.fileExists(atPath: fx.root + "/peft/adapter_model.safetensors"), "\(ok.err)")
        #expect(!AdapterStore.isInside(fx.root + "/peft", root: fx.store) && AdapterStore.isInside(fx.store + "/../store/x", root: fx.store))
    }

    /// Item 19: a file that fails its check at open is renamed aside, and the log says which file,
    /// the new name and which check failed; `adapters inspect --file` reads any file, the
    /// `.corrupt-*` one included, and names the check it fails. Before the fix the log said only
    /// "failed validation" and inspect could not be pointed at a quarantined file.
    @Test func quarantineSaysWhichCheckFailed() throws {
        let fx = try ServerFixture(clients: ["alice", "bob"])
        defer { fx.cleanup() }
        let dir = fx.storeHandle.directory
        try Self.corrupt(dir + "/clients/bob/v000001.safetensors.zst")
        let s = try fx.serve()
        #expect(Self.waitForStderr(s, "ready"), "\(s.stderrText)")
        let log = s.stderrText
        #expect(log.contains("clients/bob/v000001.safetensors.zst failed validation and was moved aside as .corrupt-v000001.safetensors.zst"), "\(log)")
        #expect(log.contains("check 1 (zstd frame) failed"), "\(log)")
        s.request(1, "generate", ["client": "bob", "prompt": "The cat", "max_tokens": 2])
        let r = s.response(1)
        #expect(ServerProcess.errorCode(r) == -32002)
        #expect(ServerProcess.errorMessage(r).contains("check 1"), "\(r ?? [:])")
        #expect(s.finish() == 0)
        let moved = dir + "/clients/bob/.corrupt-v000001.safetensors.zst"
        #expect(FileManager.default.fileExists(atPath: moved))
        let i = try CLITests.run(["adapters", "inspect", "--file", moved, "--model", fx.model])
        #expect(i.code != 0 && (i.out + i.err).contains("check 1 (zstd frame) failed"), "\(i.out)\(i.err)")
        let ok = try CLITests.run(["adapters", "inspect", "--file", dir + "/clients/alice/v000001.safetensors.zst", "--model", fx.model])
        #expect(ok.code == 0 && ok.out.contains("valid       a client adapter"), "\(ok.out)\(ok.err)")
    }

    /// Item 20: a store on a read-only mount (bind-mounted read-only; skipped where mounting is not
    /// permitted). Before the fix `serve` would not start (it opened its lock file for writing). Now
    /// it serves it read-only: generates answer, a damaged file is skipped (not renamed), and
    /// personalize is refused at once with an error that says the store is read-only.
    @Test func serveReadOnlyStore() throws {
        let fx = try ServerFixture(clients: ["alice", "bob"])
        defer { fx.cleanup() }
        try Self.corrupt(fx.storeHandle.directory + "/clients/bob/v000001.safetensors.zst")
        let mnt = fx.root + "/ro"
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        func run(_ args: [String]) -> Bool {
            let p = Process(); p.executableURL = URL(fileURLWithPath: "/bin/mount"); p.arguments = args
            p.standardError = FileHandle.nullDevice
            guard (try? p.run()) != nil else { return false }
            p.waitUntilExit(); return p.terminationStatus == 0
        }
        guard run(["--bind", fx.store, mnt]) else { print("read-only store test skipped: cannot bind-mount here"); return }
        defer { let u = Process(); u.executableURL = URL(fileURLWithPath: "/bin/umount"); u.arguments = [mnt]; try? u.run(); u.waitUntilExit() }
        guard run(["-o", "remount,bind,ro", mnt]) else { print("read-only store test skipped: cannot remount read-only"); return }
        let before = Self.tree(mnt)
        let s = try ServerProcess(["serve", "--model", fx.model, "--store", mnt, "--threads", "1"])
        s.request(1, "generate", ["client": "alice", "prompt": "The cat", "max_tokens": 3, "temperature": 0])
        let g = s.response(1, timeout: 60)
        #expect(ServerProcess.result(g) != nil, "\(g ?? [:]) \(s.stderrText)")
        #expect(s.stderrText.contains("read-only") && s.stderrText.contains("is skipped"), "\(s.stderrText)")
        s.request(2, "personalize", ["client": "alice", "texts": PersonalizeTests.texts, "steps": 2])
        let p = s.response(2, timeout: 60)
        #expect(ServerProcess.errorCode(p) == -32005)
        #expect(ServerProcess.errorMessage(p).contains("read-only"), "\(p ?? [:])")
        s.request(3, "generate", ["client": "bob", "prompt": "The cat", "max_tokens": 3])
        #expect(ServerProcess.errorCode(s.response(3)) == -32002)
        #expect(s.finish() == 0)
        #expect(Self.tree(mnt) == before)
        // In process: .read opens create and change nothing, and publishing is refused.
        let ro = try AdapterStore.open(root: fx.store, base: fx.storeHandle.base, access: .read, create: false)
        #expect(ro.lastReconcile.skipped == ["clients/bob/v000001.safetensors.zst"] && ro.lastReconcile.quarantined.isEmpty)
        #expect(throws: AdapterStoreError.self) { try ro.publishClient(id: "alice", Self.client(fx, "alice", seed: 1)) }
        #expect(FileManager.default.fileExists(atPath: fx.storeHandle.directory + "/clients/bob/v000001.safetensors.zst"))
    }
}
