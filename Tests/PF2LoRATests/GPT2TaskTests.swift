import Foundation
import Testing
@testable import PF2LoRA

/// The GPT-2 federated task: gradients as the trainer computes them, evaluation over the whole
/// split, data validation, a small federated run that learns, and the store mapping of every method.
@Suite struct GPT2TaskTests {
    static let config: GPT2Config = {
        var c = GPT2Config(vocabSize: 48, nPositions: 32, nEmbd: 32, nLayer: 2, nHead: 2)
        c.bosTokenId = nil
        return c
    }()
    /// Random GPT-2 weights with a wider tied embedding (std 0.2): at GPT-2's 0.02 the final layer norm
    /// caps every logit near ±0.6 at this width, so no adapter could lower the loss much below ln V.
    static let weights: ModelWeights = {
        let w = ModelWeights.random(architecture: config.architecture, seed: 3)
        for i in 0..<w.embed.count { w.embed.data[i] *= 10 }
        return w
    }()

    /// Client k's stream: a repeating pattern of its own tokens, so clients differ and are learnable.
    static func stream(_ k: Int, length: Int, seed: UInt64) -> TokenStream {
        var rng = RNG(seed: seed)
        let motif = (0..<5).map { _ in Int32(1 + 8 * k + rng.int(below: 8)) }
        var toks: [Int32] = []
        while toks.count < length { toks.append(0); toks += motif.shuffled(using: &rng) }
        return TokenStream(tokens: Array(toks.prefix(length)), textCount: length / 6)
    }

    static func clients(_ n: Int = 2) -> [ClientTokenData] {
        (0..<n).map { k in
            ClientTokenData(id: "c\(k)", train: stream(k, length: 300, seed: UInt64(k)), valid: stream(k, length: 70, seed: 100 + UInt64(k)),
                            test: stream(k, length: 50, seed: 200 + UInt64(k)))
        }
    }

    static func randomized(_ set: ParameterSet, seed: UInt64, std: Float = 0.2) -> ParameterSet {
        var r = RNG(seed: seed)
        for (_, t) in set.entries { r.fillNormal(t, std: std) }
        return set
    }

    @Test func gradientsAreTheTrainers() throws {
        let task = try LMTask(weights: Self.weights, clients: Self.clients(), batchSize: 3, seqLen: 8)
        var r0 = RNG(seed: 1)
        let shared = Self.randomized(makeLoRAParameters(modules: task.modules, rank: 4, level: .shared, rng: &r0), seed: 5)
        let local = Self.randomized(makeLoRAParameters(modules: task.modules, rank: 2, level: .client, rng: &r0), seed: 6)
        let adapter = TwoLevelAdapter(shared: shared, sharedScale: 2, local: local, localScale: 1.5)
        let gs = shared.zerosLike(), gl = local.zerosLike()
        var rng = RNG(seed: 42)
        let rngBefore = rng
        let loss = task.lossAndGradients(client: 1, adapter: adapter, sharedGrad: gs, localGrad: gl, rng: &rng)

        // The same windows by hand, through a separate trainer.
        var r = rngBefore
        let s = Self.clients()[1].train.tokens
        var windows: [[Int]] = []
        for _ in 0..<3 {
            let start = r.int(below: s.count - 9 + 1)
            windows.append(s[start..<(start + 9)].map(Int.init))
        }
        let batch = try TrainingBatch(windows: windows)
        let trainer = ModelTrainer(weights: Self.weights)
        let sw = task.adapterWeights(shared, level: .shared, scale: 2), lw = task.adapterWeights(local, level: .client, scale: 1.5)
        let ref = try trainer.lossAndGradients(batch, shared: sw, client: lw)
        #expect(abs(loss - ref) <= 1e-6 * abs(ref))
        var maxDiff: Float = 0, maxAbs: Float = 0
        for m in task.modules {
            let pairs = [(loraPair(gs, level: .shared, module: m.name), trainer.gradients.shared[m.name]!),
                         (loraPair(gl, level: .client, module: m.name), trainer.gradients.client[m.name]!)]
            for (mine, theirs) in pairs {
                for (a, b) in [(mine.down, theirs.down), (mine.up, theirs.up)] {
                    for i in 0..<a.count { maxDiff = max(maxDiff, abs(a.data[i] - b.data[i])); maxAbs = max(maxAbs, abs(b.data[i])) }
                }
            }
        }
        #expect(maxAbs > 1e-4, "gradients are all zero")
        #expect(maxDiff <= 1e-6 * maxAbs)

        // Only the level asked for is computed; the other set is left untouched... and nil skips it.
        gs.zero()
        var r2 = rngBefore
        let loss2 = task.lossAndGradients(client: 1, adapter: adapter, sharedGrad: nil, localGrad: gl, rng: &r2)
        #expect(loss2 == loss)
        #expect(gs.squaredNorm() == 0)
    }

    @Test func evaluateCoversEveryToken() throws {
        let task = try LMTask(weights: Self.weights, clients: Self.clients(), batchSize: 2, seqLen: 8)
        let c = Self.clients()[0]
        let totals = task.evaluateTotals(client: 0, adapter: .none, split: .valid)
        #expect(totals.tokens == c.valid.tokens.count - 1)
        // Equal to one long pass over the stream in a single window (context limits aside, the first
        // window's tokens see the same context): compare the first 9 tokens' mean loss.
        let trainer = ModelTrainer(weights: Self.weights)
        var sum = 0.0
        var start = 0
        let s = c.valid.tokens.map(Int.init)
        while start < s.count - 1 {
            let w = Array(s[start..<min(s.count, start + 9)])
            let b = try TrainingBatch(windows: [w])
            sum += Double(try trainer.loss(b)) * Double(b.targetCount)
            start += 8
        }
        #expect(abs(sum / Double(totals.tokens) - totals.meanLoss) < 1e-5)
    }

    @Test func federatedRunLearnsAndIsDeterministic() throws {
        let task = try LMTask(weights: Self.weights, clients: Self.clients(), batchSize: 4, seqLen: 12)
        var fc = FederatedConfig()
        fc.rounds = 4; fc.localSteps = 4; fc.lowerSteps = 1; fc.rank = 4; fc.rank2 = 2; fc.alpha = 8; fc.alpha2 = 4
        fc.upperLR = 0.03; fc.lowerLR = 0.3; fc.clipNorm = 1; fc.evalEvery = 0; fc.seed = 9
        let base = (0..<2).map { task.evaluate(client: $0, adapter: .none, split: .valid) }
        let r1 = try runFederated(.pf2lora, task: task, config: fc)
        for k in 0..<2 { #expect(r1.validLoss[k] < base[k] - 0.3, "client \(k): \(base[k]) -> \(r1.validLoss[k])") }
        let r2 = try runFederated(.pf2lora, task: task, config: fc)
        #expect(r1.validLoss == r2.validLoss)
        #expect(r1.rounds.map(\.trainLoss) == r2.rounds.map(\.trainLoss))
    }

    /// For every method, the published (shared, client k) pair is exactly the adapter client k was evaluated with.
    @Test(arguments: FederatedMethod.allCases)
    func storeMappingReproducesEachClientsModel(_ method: FederatedMethod) throws {
        let dir = TestPaths.tempDir("fedmap")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let task = try LMTask(weights: Self.weights, clients: Self.clients(3), batchSize: 2, seqLen: 8)
        var fc = FederatedConfig()
        fc.rounds = 2; fc.localSteps = 2; fc.lowerSteps = 1; fc.rank = 3; fc.rank2 = 1; fc.alpha = 6; fc.alpha2 = 2
        fc.upperLR = 0.05; fc.lowerLR = 0.5; fc.evalEvery = 0; fc.fineTuneSteps = 2; fc.hetloraPruneRatio = 0.9
        let result = try runFederated(method, task: task, config: fc)
        let base = BaseModelInfo(name: "tiny", fingerprint: "0123456789abcdef",
                                 linears: Dictionary(uniqueKeysWithValues: task.modules.map { ($0.name, ($0.dIn, $0.dOut)) }))
        let store = try AdapterStore.open(root: dir, base: base)
        let ids = ["c0", "c1", "c2"]
        let f = try federatedAdapters(result, modules: task.modules, clientIDs: ids, base: base)
        let v = try publish(f, to: store)
        #expect(v.shared == 1 && v.clients.count == 3)
        if let (r, a) = sharedLayout(method, fc) { #expect(f.shared.rank == r && f.shared.alpha == a) }
        for (k, id) in ids.enumerated() {
            let sh = try #require(try store.latestShared()).adapter
            let cl = try #require(try store.latestClient(id)).adapter
            #expect(store.trainedOn(client: id, version: 1) == 1)
            let adapter = TwoLevelAdapter(shared: parameterSet(from: sh, level: .shared, modules: task.modules), sharedScale: sh.scale,
                                          local: parameterSet(from: cl, level: .client, modules: task.modules), localScale: cl.scale)
            let fromStore = task.evaluate(client: k, adapter: adapter, split: .test)
            #expect(abs(fromStore - result.testLoss[k]) < 1e-4, "\(method) client \(k): store \(fromStore) vs run \(result.testLoss[k])")
        }
        // A second run with another shared shape is refused before anything is written.
        var other = fc
        other.rank = 5
        if let (r, a) = sharedLayout(method, other) {
            #expect(throws: FederatedStoreError.self) { try checkConsistent(rank: r, alpha: a, rslora: false, modules: Set(task.modules.map(\.name)), with: store) }
        }
    }

    @Test func clientDataErrorsNameTheClientAndFile() throws {
        let tok = try BPETokenizer(folder: TestPaths.fixture("tiny-gpt2"))
        let dir = TestPaths.tempDir("data")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func write(_ path: String, _ s: String) throws {
            try FileManager.default.createDirectory(atPath: (dir + "/" + path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try s.write(toFile: dir + "/" + path, atomically: true, encoding: .utf8)
        }
        #expect(throws: ClientDataError.noClients(dir)) { try loadClientData(folder: dir, tokenizer: tok) }
        try write("ann/train.jsonl", "{\"text\": \"The cat sat.\"}\n{\"text\": \"A dog ran.\"}\n")
        try write("ann/valid.txt", "The cat.\n\nThe dog.\n")
        #expect(throws: ClientDataError.missingSplit(client: "ann", split: "test", folder: dir + "/ann")) { try loadClientData(folder: dir, tokenizer: tok) }
        try write("ann/test.jsonl", "\n  \n")
        #expect(throws: ClientDataError.noTexts(client: "ann", file: dir + "/ann/test.jsonl")) { try loadClientData(folder: dir, tokenizer: tok) }
        try write("ann/test.jsonl", "{\"text\": \"ok\"}\n{\"txt\": 1}\n")
        #expect(throws: ClientDataError.badJSONL(file: dir + "/ann/test.jsonl", line: 2, why: "no string field \"text\"")) { try loadClientData(folder: dir, tokenizer: tok) }
        try write("ann/test.jsonl", "{\"text\": \"The end.\"}\n")
        let data = try loadClientData(folder: dir, tokenizer: tok)
        #expect(data.count == 1 && data[0].train.textCount == 2 && data[0].valid.textCount == 2)
        #expect(data[0].train.tokens.first == Int32(tok.eosTokenId ?? -1))
        #expect(TextFile.paragraphs("a\nb\n\n\n  \nc\r\n") == ["a\nb", "c"])
    }
}
