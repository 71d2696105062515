// libFuzzer target: the request decoder and dispatcher of `pf2lora serve` (Server.handle).
// Built with the library's sources into one module by Fuzz/build.sh; see docs/RELIABILITY.md.
import Foundation

/// A server over a tiny random model and a store with a shared pair and one client, answering to
/// /dev/null, its scheduler running: every input line goes through the same path as stdin lines.
let fuzzServer: Server = {
    let root = NSTemporaryDirectory() + "pf2lora-fuzz-\(getpid())"
    let model = root + "/model"
    var cfg = GPT2Config(vocabSize: 400, nPositions: 64, nEmbd: 16, nLayer: 1, nHead: 2, eosTokenId: nil)
    cfg.bosTokenId = nil
    do {
        try LanguageModel(folder: model, weights: ModelWeights.random(architecture: cfg.architecture, seed: 1), checkpoint: nil).save(to: model)
        let fixture = ProcessInfo.processInfo.environment["PF2LORA_FUZZ_TOKENIZER"] ?? "Tests/PF2LoRATests/Fixtures/tiny-gpt2"
        for f in ["tokenizer.json", "vocab.json", "merges.txt"] {
            try? FileManager.default.copyItem(atPath: fixture + "/" + f, toPath: model + "/" + f)
        }
        let m = try LanguageModel.load(folder: model)
        let tok = try BPETokenizer(folder: model)
        let base = try BaseModelInfo.load(folder: model)
        let store = try AdapterStore.open(root: root + "/store", base: base, cacheBytes: 1 << 20)
        func adapter(_ level: AdapterLevel, rank: Int, client: String?) -> LoRAAdapter {
            var rng = RNG(seed: 3)
            var modules: [String: LoRAPair] = [:]
            for (path, (din, dout)) in base.linears {
                let a = Tensor(zeros: [rank, din]), b = Tensor(zeros: [dout, rank])
                rng.fillNormal(a, std: 0.1); rng.fillNormal(b, std: 0.1)
                modules[path] = LoRAPair(a: a, b: b)
            }
            return LoRAAdapter(level: level, rank: rank, alpha: 1, modules: modules,
                               metadata: AdapterMetadata(baseName: base.name, baseFingerprint: base.fingerprint, clientID: client))
        }
        try store.publishShared(adapter(.shared, rank: 2, client: nil))
        try store.publishClient(id: "alice", adapter(.client, rank: 1, client: "alice"))
        var limits = ServerLimits()
        limits.maxQueue = 16; limits.maxNewTokens = 4; limits.maxLineBytes = 4096
        let devnull = open("/dev/null", O_WRONLY)
        let s = Server(model: m, tokenizer: tok, store: store, limits: limits, outputFD: devnull)
        try s.runtime.prepare()
        s.scheduler.start()
        return s
    } catch {
        fatalError("fuzz setup failed: \(error) (run from the repository root, or set PF2LORA_FUZZ_TOKENIZER)")
    }
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func protocolFuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    // Each line alone through the parser, then through the dispatcher (as the read loop does).
    for line in bytes.split(separator: 0x0A, omittingEmptySubsequences: false) where line.count <= 4096 {
        let l = Array(line)
        _ = RPCParser.parse(l)
        // `shutdown` would stop nothing here (the loop is not running), but keep inputs independent.
        if !l.isEmpty, String(decoding: l, as: UTF8.self).contains("shutdown") { continue }
        _ = fuzzServer.handle(l)
    }
    return 0
}
