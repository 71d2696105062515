import Foundation
import PF2LoRA

/// The temporary adapter store of the serving benchmarks (`bench serve`, `bench http`): random
/// pairs at a trained-looking scale (A ~ N(0, 1/in), B ~ N(0, 0.01)) on every linear slot of the
/// base, one shared pair and distinct client pairs. `remove()` deletes the folder.
final class BenchStore {
    let root: String
    let base: BaseModelInfo
    let store: AdapterStore
    private var rng: RNG

    init(model: String, name: String, seed: UInt64) throws {
        base = try BaseModelInfo.load(folder: model)
        root = NSTemporaryDirectory() + "pf2lora-bench-\(name)-\(getpid())"
        store = try AdapterStore.open(root: root, base: base, cacheBytes: 1 << 30)
        rng = RNG(seed: seed)
    }

    /// A random rank-`r` adapter of `level` (for client `id`).
    func adapter(_ level: AdapterLevel, rank r: Int, id: String?) -> LoRAAdapter {
        var modules: [String: LoRAPair] = [:]
        for (path, dims) in base.linears {
            let a = Tensor(zeros: [r, dims.inFeatures]), b = Tensor(zeros: [dims.outFeatures, r])
            rng.fillNormal(a, std: 1 / Float(dims.inFeatures).squareRoot())
            rng.fillNormal(b, std: 0.01)
            modules[path] = LoRAPair(a: a, b: b)
        }
        return LoRAAdapter(level: level, rank: r, alpha: Float(2 * r), modules: modules,
                           metadata: AdapterMetadata(baseName: base.name, baseFingerprint: base.fingerprint, clientID: id))
    }

    /// Publishes a rank-`sharedRank` shared pair and a rank-`clientRank` pair for each of `clients`.
    func publish(sharedRank: Int, clientRank: Int, clients: [String]) throws {
        try store.publishShared(adapter(.shared, rank: sharedRank, id: nil))
        for id in clients { try store.publishClient(id: id, adapter(.client, rank: clientRank, id: id)) }
    }

    func remove() { try? FileManager.default.removeItem(atPath: root) }
}
