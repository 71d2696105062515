import Foundation
@testable import PF2LoRA

/// A tiny GPT-2-shaped base (C = 8, 2 layers, MLP 32) and seeded random adapters for it.
enum AdapterFixtures {
    static func base(name: String = "tiny", fingerprint: String = "0123456789abcdef", c: Int = 8, layers: Int = 2) -> BaseModelInfo {
        var linears: [String: (inFeatures: Int, outFeatures: Int)] = [:]
        for i in 0..<layers {
            linears["transformer.h.\(i).attn.c_attn"] = (c, 3 * c)
            linears["transformer.h.\(i).attn.c_proj"] = (c, c)
            linears["transformer.h.\(i).mlp.c_fc"] = (c, 4 * c)
            linears["transformer.h.\(i).mlp.c_proj"] = (4 * c, c)
        }
        return BaseModelInfo(name: name, fingerprint: fingerprint, linears: linears)
    }

    struct RNG {
        var s: UInt64
        mutating func next() -> Float {
            s = s &+ 0x9E37_79B9_7F4A_7C15
            var z = s
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            z ^= z >> 31
            return Float(z >> 40) / Float(1 << 24) * 2 - 1
        }
    }

    static func random(_ shape: [Int], _ rng: inout RNG, scale: Float = 0.1) -> Tensor {
        let t = Tensor(zeros: shape)
        for i in 0..<t.count { t.data[i] = rng.next() * scale }
        return t
    }

    /// A random adapter of `level` over `modules` (default: every linear of `base`).
    static func adapter(_ base: BaseModelInfo, level: AdapterLevel, rank: Int, alpha: Float = 16, seed: UInt64 = 1,
                        modules: [String]? = nil, clientID: String? = nil, storage: DType = .f32, rslora: Bool = false) -> LoRAAdapter {
        var rng = RNG(s: seed)
        var pairs: [String: LoRAPair] = [:]
        for m in (modules ?? base.linears.keys.sorted()) {
            let (din, dout) = base.linears[m]!
            pairs[m] = LoRAPair(a: random([rank, din], &rng), b: random([dout, rank], &rng))
        }
        let meta = AdapterMetadata(storage: storage, baseName: base.name, baseFingerprint: base.fingerprint,
                                   clientID: level == .client ? (clientID ?? "alice") : nil)
        return LoRAAdapter(level: level, rank: rank, alpha: alpha, useRSLoRA: rslora, modules: pairs, metadata: meta)
    }

    /// The raw safetensors of an adapter with its tensors and metadata edited, compressed as a file.
    static func crafted(_ a: LoRAAdapter, dtype: DType = .f32, editTensors: (inout [String: Tensor]) -> Void = { _ in },
                        editMeta: (inout [String: String]) -> Void = { _ in }) throws -> Data {
        var tensors: [String: Tensor] = [:]
        for (m, p) in a.modules {
            tensors[LoRAAdapter.tensorName(module: m, level: a.level, up: false)] = p.a
            tensors[LoRAAdapter.tensorName(module: m, level: a.level, up: true)] = p.b
        }
        var meta = a.metadataStrings
        editTensors(&tensors)
        editMeta(&meta)
        return try Zstd.compress(SafeTensorsWriter.serialize(tensors, metadata: meta, dtype: dtype))
    }

    static func assertSame(_ x: LoRAAdapter, _ y: LoRAAdapter, tol: Float = 0) -> Bool {
        guard x.level == y.level, x.rank == y.rank, x.alpha == y.alpha, x.useRSLoRA == y.useRSLoRA,
              Set(x.modules.keys) == Set(y.modules.keys) else { return false }
        for (m, p) in x.modules {
            let q = y.modules[m]!
            guard p.a.shape == q.a.shape, p.b.shape == q.b.shape else { return false }
            for (u, v) in zip(p.a.array + p.b.array, q.a.array + q.b.array) where abs(u - v) > tol { return false }
        }
        return true
    }
}
