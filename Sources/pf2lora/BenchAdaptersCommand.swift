import ArgumentParser
import Foundation
import PF2LoRA

/// `pf2lora bench adapters`: adapter file sizes and cold load time.
struct BenchAdapters: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "adapters",
        abstract: "Measure adapter sizes (compressed vs raw f32/f16) and cold load time on the GPT-2-124M shape.")

    @Option(name: .long, help: "Shared rank r.")
    var rank: Int = 8

    @Option(name: .long, help: "Client rank r2.")
    var clientRank: Int = 2

    @Option(name: .long, help: "Cold loads timed per adapter.")
    var repeats: Int = 50

    @Option(name: .long, help: "zstd level used to write the files.")
    var zstdLevel: Int = 3

    @Flag(name: .long, help: "Print JSON instead of a table.")
    var json = false

    func validate() throws {
        guard rank >= 1, clientRank >= 1 else { throw ValidationError("--rank and --client-rank must be >= 1") }
        guard repeats >= 1 else { throw ValidationError("--repeats must be >= 1") }
        guard (1...22).contains(zstdLevel) else { throw ValidationError("--zstd-level must be in 1...22 (zstd's levels; 3 is the store's)") }
    }

    /// GPT-2 124M: C = 768, 12 layers, MLP 3072; all four linears of every layer adapted.
    static func gpt2Small() -> BaseModelInfo {
        var linears: [String: (inFeatures: Int, outFeatures: Int)] = [:]
        for i in 0..<12 {
            linears["transformer.h.\(i).attn.c_attn"] = (768, 2304)
            linears["transformer.h.\(i).attn.c_proj"] = (768, 768)
            linears["transformer.h.\(i).mlp.c_fc"] = (768, 3072)
            linears["transformer.h.\(i).mlp.c_proj"] = (3072, 768)
        }
        return BaseModelInfo(name: "gpt2-124m-shape", fingerprint: "bench0000000000", linears: linears)
    }

    /// What the values look like:
    /// - uniform: i.i.d. uniform in [-0.1, 0.1] — the incompressible worst case;
    /// - trained: A as PEFT initialises it (Kaiming-uniform, bound 1/sqrt(d_in)) plus a drift of 10%
    ///   of that bound, B Gaussian with std 2e-3 — the magnitudes a few hundred steps of LoRA
    ///   training give; mantissas are as random as in `uniform`;
    /// - fresh: a just-initialised pair (B = 0), what a new client holds before personalization.
    enum Values: String, CaseIterable { case uniform, trained, fresh }

    struct RNG {
        var s: UInt64
        mutating func next() -> UInt64 {
            s = s &+ 0x9E37_79B9_7F4A_7C15
            var z = s
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        mutating func uniform() -> Float { Float(next() >> 40) / Float(1 << 24) * 2 - 1 }
        mutating func gaussian() -> Float {
            let u1 = max(Float(next() >> 40) / Float(1 << 24), 1e-7), u2 = Float(next() >> 40) / Float(1 << 24)
            return (-2 * log(u1)).squareRoot() * cos(2 * .pi * u2)
        }
    }

    static func adapter(_ base: BaseModelInfo, level: AdapterLevel, rank: Int, values: Values, storage: DType, seed: UInt64) -> LoRAAdapter {
        var rng = RNG(s: seed)
        var modules: [String: LoRAPair] = [:]
        for m in base.linears.keys.sorted() {
            let (din, dout) = base.linears[m]!
            let a = Tensor(zeros: [rank, din]), b = Tensor(zeros: [dout, rank])
            let bound = 1 / Float(din).squareRoot()
            for i in 0..<a.count {
                switch values {
                case .uniform: a.data[i] = 0.1 * rng.uniform()
                case .trained: a.data[i] = bound * rng.uniform() + 0.1 * bound * rng.gaussian()
                case .fresh: a.data[i] = bound * rng.uniform()
                }
            }
            for i in 0..<b.count {
                switch values {
                case .uniform: b.data[i] = 0.1 * rng.uniform()
                case .trained: b.data[i] = 2e-3 * rng.gaussian()
                case .fresh: b.data[i] = 0
                }
            }
            modules[m] = LoRAPair(a: a, b: b)
        }
        let meta = AdapterMetadata(storage: storage, baseName: base.name, baseFingerprint: base.fingerprint,
                                   clientID: level == .client ? "bench" : nil)
        return LoRAAdapter(level: level, rank: rank, alpha: Float(2 * rank), modules: modules, metadata: meta)
    }

    func run() throws {
        let base = Self.gpt2Small()
        var sizes: [[String: Any]] = []
        if !json {
            print("GPT-2 124M shape, all 4 linears x 12 layers, zstd level \(zstdLevel)")
            print(pad("pair", 14) + pad("values", 9) + pad("raw f32", 12) + pad("raw f16", 12) + pad("zst f32", 12) + pad("ratio", 7)
                  + pad("zst f16", 12) + pad("ratio", 7))
        }
        for (level, r) in [(AdapterLevel.shared, rank), (.client, clientRank)] {
            for values in Values.allCases {
                let a32 = Self.adapter(base, level: level, rank: r, values: values, storage: .f32, seed: 7)
                var a16 = a32
                a16.metadata.storage = .f16
                let raw32 = a32.safetensors().count, raw16 = a16.safetensors().count
                let z32 = try a32.encode(compressionLevel: zstdLevel).count, z16 = try a16.encode(compressionLevel: zstdLevel).count
                sizes.append(["level": level.rawValue, "rank": r, "values": values.rawValue, "raw_f32_bytes": raw32, "raw_f16_bytes": raw16,
                              "zstd_f32_bytes": z32, "zstd_f16_bytes": z16])
                if !json {
                    print(pad("\(level.rawValue) r=\(r)", 14) + pad(values.rawValue, 9) + pad(bytes(raw32), 12) + pad(bytes(raw16), 12)
                          + pad(bytes(z32), 12) + pad(String(format: "%.2f", Double(raw32) / Double(z32)), 7)
                          + pad(bytes(z16), 12) + pad(String(format: "%.2f", Double(raw16) / Double(z16)), 7))
                }
            }
        }
        // Cold loads: read + decompress + validate, bypassing the cache (the file is in the page cache).
        let root = NSTemporaryDirectory() + "pf2lora-bench-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: root) }
        let store = try AdapterStore.open(root: root, base: base)
        var loads: [[String: Any]] = []
        for storage in [DType.f32, .f16] {
            let s = Self.adapter(base, level: .shared, rank: rank, values: .trained, storage: storage, seed: 1)
            let c = Self.adapter(base, level: .client, rank: clientRank, values: .trained, storage: storage, seed: 2)
            let t0 = DispatchTime.now().uptimeNanoseconds
            let sv = try store.publishShared(s)
            let t1 = DispatchTime.now().uptimeNanoseconds
            let cv = try store.publishClient(id: "bench", c)
            let t2 = DispatchTime.now().uptimeNanoseconds
            for (level, id, v, publishNs) in [(AdapterLevel.shared, nil as String?, sv, t1 - t0), (.client, "bench", cv, t2 - t1)] {
                var ms: [Double] = []
                for _ in 0..<repeats {
                    let a = DispatchTime.now().uptimeNanoseconds
                    _ = try store.readAndValidate(level: level, client: id, version: v)
                    ms.append(Double(DispatchTime.now().uptimeNanoseconds - a) / 1e6)
                }
                ms.sort()
                let row: [String: Any] = ["level": level.rawValue, "rank": level == .shared ? rank : clientRank, "dtype": storage == .f16 ? "f16" : "f32",
                                          "cold_load_ms_median": ms[ms.count / 2], "cold_load_ms_p90": ms[ms.count * 9 / 10],
                                          "cold_load_ms_min": ms[0], "publish_ms": Double(publishNs) / 1e6]
                loads.append(row)
            }
        }
        if json {
            let obj: [String: Any] = ["shape": "gpt2-124m", "zstd_level": zstdLevel, "sizes": sizes, "loads": loads, "repeats": repeats]
            print(String(decoding: try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys]), as: UTF8.self))
        } else {
            print("\ncold load (read + decompress + validate; file in page cache), \(repeats) runs, trained-looking values")
            for l in loads {
                print(pad("\(l["level"]!) r=\(l["rank"]!) \(l["dtype"]!)", 18)
                      + String(format: "median %.3f ms  p90 %.3f ms  min %.3f ms   publish (encode+validate+fsync) %.1f ms",
                               l["cold_load_ms_median"] as! Double, l["cold_load_ms_p90"] as! Double, l["cold_load_ms_min"] as! Double,
                               l["publish_ms"] as! Double))
            }
        }
    }
}
