import Foundation
import Testing
@testable import PF2LoRA

/// A federation driven from outside, one client node at a time (`train_local`, DESIGN §7): equal to
/// `runFederated` to the bit, and through the real server process with its errors.
@Suite(.serialized) struct FederatedClientTests {
    static func base(_ modules: [LoRAModule]) -> BaseModelInfo {
        BaseModelInfo(name: "tiny", fingerprint: "0123456789abcdef",
                      linears: Dictionary(uniqueKeysWithValues: modules.map { ($0.name, ($0.dIn, $0.dOut)) }))
    }

    static func bitsEqual(_ a: Tensor, _ b: Tensor) -> Bool {
        a.shape == b.shape && memcmp(a.data, b.data, 4 * a.count) == 0
    }

    /// Three client nodes, each with its own store, trained round by round through `trainLocalRound`
    /// with the server's FedAvg done here, end with exactly the shared pair and client pairs that
    /// `runFederated(.pf2lora)` computes in one process: same start (`initialSharedAdapter` and the
    /// replayed client init), same minibatches, same schedule, same average.
    @Test func roundsThroughTrainLocalEqualRunFederated() throws {
        let weights = GPT2TaskTests.weights
        let clients = GPT2TaskTests.clients(3)
        var fc = FederatedConfig()
        fc.rounds = 3; fc.localSteps = 2; fc.lowerSteps = 2; fc.rank = 4; fc.rank2 = 2; fc.alpha = 8; fc.alpha2 = 4
        fc.upperLR = 0.03; fc.lowerLR = 0.3; fc.clipNorm = 1; fc.evalEvery = 0; fc.seed = 9; fc.minLRRatio = 0.1
        let task = try LMTask(weights: weights, clients: clients, batchSize: 4, seqLen: 12)
        let reference = try runFederated(.pf2lora, task: task, config: fc)

        let base = Self.base(task.modules)
        let roots = (0..<3).map { _ in TestPaths.tempDir("fednode") }
        defer { for r in roots { try? FileManager.default.removeItem(atPath: r) } }
        let stores = try roots.map { try AdapterStore.open(root: $0, base: base) }
        var x = try initialSharedAdapter(weights: weights, base: base, modules: task.modules.map(\.name), rank: fc.rank,
                                         alpha: fc.alpha, seed: fc.seed)
        let schedule = LRSchedule(base: 1, totalSteps: fc.rounds, minRatio: fc.minLRRatio)
        let shares = task.exampleShares([0, 1, 2])
        for t in 0..<fc.rounds {
            var uploads: [ParameterSet] = []
            for k in 0..<3 {
                var o = LocalRoundOptions()
                o.round = t; o.clientIndex = k; o.seed = fc.seed; o.localSteps = fc.localSteps; o.lowerSteps = fc.lowerSteps
                o.lr = fc.upperLR; o.lr2 = fc.lowerLR; o.lrFactor = schedule.lr(at: t); o.rank2 = fc.rank2; o.alpha2 = fc.alpha2
                o.batchSize = 4; o.seqLen = 12; o.clipNorm = fc.clipNorm
                let r = try trainLocalRound(weights: weights, store: stores[k], client: "c\(k)", data: clients[k], shared: x, padToken: 0, options: o)
                #expect(r.numExamples == clients[k].train.textCount && r.trainLoss.isFinite)
                #expect(r.clientVersion == t + 1 && r.sharedVersion == t + 1)
                #expect(stores[k].trainedOn(client: "c\(k)", version: t + 1) == t + 1)
                uploads.append(parameterSet(from: r.shared, level: .shared, modules: task.modules))
            }
            let avg = uploads[0].zerosLike()
            avg.setWeightedAverage(of: uploads, weights: shares)
            x = storeAdapter(avg, setLevel: .shared, as: .shared, modules: task.modules, components: 0..<fc.rank, alpha: fc.alpha,
                             rslora: false, base: base)
        }
        let refX = try #require(reference.clientAdapters[0].shared)
        let gotX = parameterSet(from: x, level: .shared, modules: task.modules)
        #expect(refX.entries.count == gotX.entries.count)
        for (name, t) in refX.entries { #expect(Self.bitsEqual(t, gotX.tensor(name)), "shared \(name) differs") }
        for k in 0..<3 {
            let refY = try #require(reference.clientAdapters[k].local)
            let stored = try #require(try stores[k].latestClient("c\(k)")).adapter
            #expect(stored.rank == fc.rank2 && stored.alpha == fc.alpha2)
            let gotY = parameterSet(from: stored, level: .client, modules: task.modules)
            for (name, t) in refY.entries { #expect(Self.bitsEqual(t, gotY.tensor(name)), "client \(k) \(name) differs") }
        }
        // The round's work moved the pairs: the test is not comparing two starting points.
        let x0 = try initialSharedAdapter(weights: weights, base: base, modules: task.modules.map(\.name), rank: fc.rank, alpha: fc.alpha, seed: fc.seed)
        #expect(!sameValues(x0, x))

        // evaluateLocal on a node gives the loss runFederated reports for that client.
        let last = try evaluateLocal(weights: weights, store: stores[1], client: "c1", data: clients[1], shared: x, split: .test, seqLen: 12, padToken: 0)
        #expect(abs(last.loss - reference.testLoss[1]) <= 1e-6 * reference.testLoss[1])
        #expect(last.clientVersion == fc.rounds && last.sharedVersion == fc.rounds + 1)
    }

    /// max |a - b| / max |b| over every tensor of two adapters of the same layout.
    static func maxRelativeDifference(_ a: LoRAAdapter, _ b: LoRAAdapter) -> Float {
        var diff: Float = 0, mag: Float = 0
        for (m, p) in b.modules {
            guard let q = a.modules[m], q.a.shape == p.a.shape, q.b.shape == p.b.shape else { return .infinity }
            for (x, y) in [(q.a, p.a), (q.b, p.b)] {
                for i in 0..<y.count { diff = max(diff, abs(x.data[i] - y.data[i])); mag = max(mag, abs(y.data[i])) }
            }
        }
        return diff / max(mag, 1e-30)
    }

    /// Writes one client's data folder of texts.
    static func writeClientData(_ dir: String, texts: [String]) throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for split in ["train", "valid", "test"] {
            let lines = texts.map { String(data: try! JSONSerialization.data(withJSONObject: ["text": $0]), encoding: .utf8)! }
            try (lines.joined(separator: "\n") + "\n").write(toFile: "\(dir)/\(split).jsonl", atomically: true, encoding: .utf8)
        }
    }

    /// `train_local` and `evaluate_local` through the real `pf2lora serve`: the answer's x equals an
    /// in-process round's, versions advance, generation keeps working, and every bad input gets a clear
    /// error while the server keeps running and the store keeps what it had.
    @Test func trainLocalThroughTheServer() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let exchange = fx.root + "/exchange"
        let data = exchange + "/dana"
        try Self.writeClientData(data, texts: PersonalizeTests.texts)
        // The server's x: a fresh shared pair of the store's shape (rank 8, alpha 8 as the fixture's).
        let sharedNow = try #require(try fx.storeHandle.latestShared()).adapter
        let x0 = try initialSharedAdapter(weights: fx.gpt2.weights, base: fx.storeHandle.base, modules: Array(sharedNow.modules.keys),
                                          rank: sharedNow.rank, alpha: sharedNow.alpha, seed: 4)
        let round: [String: Any] = ["client": "dana", "data": data, "round": 0, "client_index": 1, "seed": 4, "local_steps": 2,
                                    "lower_steps": 1, "lr": 0.01, "lr2": 0.1, "batch": 2, "seq": 16]
        func withShared(_ p: [String: Any], _ a: LoRAAdapter) -> [String: Any] {
            p.merging(["shared": ["safetensors": a.safetensors().base64EncodedString()]]) { $1 }
        }

        // The same round in process, on a copy of the store, for the reference answer.
        let copyRoot = fx.root + "/store-copy"
        try FileManager.default.copyItem(atPath: fx.store, toPath: copyRoot)
        let copy = try AdapterStore.open(root: copyRoot, base: fx.storeHandle.base)
        let tok = try BPETokenizer(folder: fx.model)
        var o = LocalRoundOptions()
        o.round = 0; o.clientIndex = 1; o.seed = 4; o.localSteps = 2; o.lowerSteps = 1; o.lr = 0.01; o.lr2 = 0.1; o.batchSize = 2; o.seqLen = 16
        let expected = try trainLocalRound(weights: fx.gpt2.weights, store: copy, client: "dana",
                                           data: try loadClientFolder(data, client: "dana", tokenizer: tok), shared: x0,
                                           padToken: textSeparator(tok), options: o)

        let s = try fx.serve(["--exchange-dir", exchange])
        s.request(1, "train_local", withShared(round, x0))
        // Generation keeps being answered while the node trains.
        s.request(2, "generate", ["client": "alice", "prompt": "The cat", "max_tokens": 4, "temperature": 0])
        let r1 = try #require(ServerProcess.result(s.response(1, timeout: 120)), "\(s.stderrText)")
        #expect(ServerProcess.result(s.response(2)) != nil)
        #expect(r1["client_version"] as? Int == 1 && r1["shared_version"] as? Int == 2)
        #expect(r1["num_examples"] as? Int == PersonalizeTests.texts.count)
        let b64 = try #require((r1["shared"] as? [String: Any])?["safetensors"] as? String)
        let x1 = try LoRAAdapter.decode(compressedOrPlain: try #require(Data(base64Encoded: b64)), name: "answer", base: fx.storeHandle.base, expectedLevel: .shared)
        // The server runs OpenBLAS on 1 thread (the fixture's --threads 1), this process on its default, and
        // GEMM sums in another order across thread counts: equal within float rounding, not to the bit.
        #expect(Self.maxRelativeDifference(x1, expected.shared) <= 1e-5, "the protocol's x differs from the in-process round's")
        #expect(!sameValues(x1, x0))
        #expect(abs((r1["train_loss"] as? Double ?? 0) - Double(expected.trainLoss)) < 1e-6)

        // Round 2 with an averaged x (here: the answer itself), written to a file instead of inline.
        let outFile = exchange + "/x2.safetensors"
        s.request(3, "train_local", withShared(round, x1).merging(["round": 1, "shared_out": outFile]) { $1 })
        let r3 = try #require(ServerProcess.result(s.response(3, timeout: 120)), "\(s.stderrText)")
        #expect(r3["client_version"] as? Int == 2 && r3["previous_client_version"] as? Int == 1 && r3["shared_version"] as? Int == 3)
        let x2 = try LoRAAdapter.decode(compressedOrPlain: try Data(contentsOf: URL(fileURLWithPath: outFile)), name: outFile,
                                        base: fx.storeHandle.base, expectedLevel: .shared)
        #expect(!sameValues(x2, x1))

        // evaluate_local with the final x: adopted as the shared version, the client's pair is used.
        s.request(4, "evaluate_local", ["client": "dana", "data": data, "shared": ["path": outFile], "split": "test", "seq": 16])
        let e = try #require(ServerProcess.result(s.response(4, timeout: 120)), "\(s.stderrText)")
        #expect(e["shared_version"] as? Int == 4 && e["client_version"] as? Int == 2)
        #expect((e["loss"] as? Double).map { $0.isFinite && $0 > 0 } == true)
        s.request(5, "generate", ["client": "dana", "prompt": "The cat", "max_tokens": 4, "temperature": 0])
        #expect((ServerProcess.result(s.response(5))?["adapter"] as? [String: Any])?["client"] as? Int == 2)

        // Bad input: each a clear -32602 / -32003, nothing new in the store, the server still answers.
        let manifestBefore = PersonalizeTests.manifest(fx)
        let otherBase = BaseModelInfo(name: "other", fingerprint: "fedcba9876543210", linears: fx.storeHandle.base.linears)
        var wrongBase = x1
        wrongBase.metadata = AdapterMetadata(baseName: otherBase.name, baseFingerprint: otherBase.fingerprint)
        var clientLevel = x1
        clientLevel.level = .client
        clientLevel.metadata.clientID = "dana"
        let cases: [(String, [String: Any], Int, String)] = [
            ("no shared", round, -32602, "params.shared is required"),
            ("bad base64", round.merging(["shared": ["safetensors": "***"]]) { $1 }, -32602, "not valid base64"),
            ("truncated", round.merging(["shared": ["safetensors": x1.safetensors().prefix(100).base64EncodedString()]]) { $1 }, -32002, "params.shared"),
            ("other base", withShared(round, wrongBase), -32003, "check 10"),
            ("client level", withShared(round, clientLevel), -32002, "level"),
            ("missing data", withShared(round, x1).merging(["data": fx.root + "/nowhere"]) { $1 }, -32602, "nowhere"),
            ("unsafe id", withShared(round, x1).merging(["client": "../x"]) { $1 }, -32602, "client"),
            ("rank change", withShared(round, x1).merging(["rank2": 3]) { $1 }, -32602, "rank-2 pair"),
            ("bad option", withShared(round, x1).merging(["local_steps": 0]) { $1 }, -32602, "local_steps"),
            ("wrong shape", withShared(round, try initialSharedAdapter(weights: fx.gpt2.weights, base: fx.storeHandle.base,
                                                                        modules: Array(sharedNow.modules.keys), rank: 3, alpha: 3, seed: 1)), -32602, "rank 3"),
        ]
        for (i, c) in cases.enumerated() {
            let id = 100 + i
            s.request(id, "train_local", c.1)
            let r = s.response(id, timeout: 120)
            #expect(ServerProcess.errorCode(r) == c.2, "\(c.0): \(r ?? [:])")
            let msg = ((r?["error"] as? [String: Any])?["message"] as? String) ?? ""
            #expect(msg.contains(c.3), "\(c.0): \(msg)")
        }
        #expect(PersonalizeTests.manifest(fx) == manifestBefore, "a refused train_local changed the store")
        s.request(200, "health")
        #expect(ServerProcess.result(s.response(200))?["status"] as? String == "ok")
        #expect(s.finish() == 0)
    }
}
