import Foundation

/// The four linear layers of a GPT-2 block, in Conv1D layout (weight is in x out). They are the
/// modules LoRA adapts; `path` is the module path inside the block as PEFT names it.
public enum LinearKind: Int, CaseIterable, Sendable {
    case qkv = 0, attnProj, fc, mlpProj

    public var path: String {
        switch self {
        case .qkv: return "attn.c_attn"
        case .attnProj: return "attn.c_proj"
        case .fc: return "mlp.c_fc"
        case .mlpProj: return "mlp.c_proj"
        }
    }

    /// (in, out) for a config.
    public func dims(_ c: GPT2Config) -> (inFeatures: Int, outFeatures: Int) {
        switch self {
        case .qkv: return (c.nEmbd, 3 * c.nEmbd)
        case .attnProj: return (c.nEmbd, c.nEmbd)
        case .fc: return (c.nEmbd, c.inner)
        case .mlpProj: return (c.inner, c.nEmbd)
        }
    }

    /// Module path in the whole model, as Hugging Face and PEFT name it: `transformer.h.3.attn.c_attn`.
    public static func modulePath(layer: Int, _ kind: LinearKind) -> String { "transformer.h.\(layer).\(kind.path)" }

    /// Parses a module path (with or without the `transformer.` prefix) into (layer, kind).
    public static func parse(_ path: String) -> (layer: Int, kind: LinearKind)? {
        var p = Substring(path)
        if p.hasPrefix("transformer.") { p = p.dropFirst("transformer.".count) }
        guard p.hasPrefix("h.") else { return nil }
        p = p.dropFirst(2)
        guard let dot = p.firstIndex(of: "."), let layer = Int(p[..<dot]) else { return nil }
        let rest = String(p[p.index(after: dot)...])
        guard let kind = LinearKind.allCases.first(where: { $0.path == rest }) else { return nil }
        return (layer, kind)
    }
}

/// All GPT-2 parameters. f32 tensors are views of the memory-mapped file when possible.
public final class GPT2Weights {
    /// One transformer block.
    public final class Layer {
        public let ln1W: Tensor, ln1B: Tensor       // (C)
        public let ln2W: Tensor, ln2B: Tensor       // (C)
        /// Indexed by LinearKind: qkv (C,3C), attnProj (C,C), fc (C,4C), mlpProj (4C,C).
        public let linW: [Tensor]
        /// Indexed by LinearKind: (3C), (C), (4C), (C).
        public let linB: [Tensor]

        init(ln1W: Tensor, ln1B: Tensor, ln2W: Tensor, ln2B: Tensor, linW: [Tensor], linB: [Tensor]) {
            self.ln1W = ln1W; self.ln1B = ln1B; self.ln2W = ln2W; self.ln2B = ln2B; self.linW = linW; self.linB = linB
        }
    }

    public let config: GPT2Config
    public let wte: Tensor      // (V, C), also the tied lm_head
    public let wpe: Tensor      // (P, C)
    public let layers: [Layer]
    public let lnfW: Tensor, lnfB: Tensor   // (C)

    init(config: GPT2Config, wte: Tensor, wpe: Tensor, layers: [Layer], lnfW: Tensor, lnfB: Tensor) {
        self.config = config; self.wte = wte; self.wpe = wpe; self.layers = layers; self.lnfW = lnfW; self.lnfB = lnfB
    }

    /// Every parameter under its Hugging Face name (with the `transformer.` prefix, as transformers saves it),
    /// with the shape config.json implies.
    public static func expectedShapes(_ c: GPT2Config) -> [(String, [Int])] {
        let C = c.nEmbd
        var out: [(String, [Int])] = [("transformer.wte.weight", [c.vocabSize, C]), ("transformer.wpe.weight", [c.nPositions, C])]
        for l in 0..<c.nLayer {
            let p = "transformer.h.\(l)."
            out.append((p + "ln_1.weight", [C])); out.append((p + "ln_1.bias", [C]))
            for kind in LinearKind.allCases {
                let (i, o) = kind.dims(c)
                out.append((p + kind.path + ".weight", [i, o])); out.append((p + kind.path + ".bias", [o]))
            }
            out.append((p + "ln_2.weight", [C])); out.append((p + "ln_2.bias", [C]))
        }
        out.append(("transformer.ln_f.weight", [C])); out.append(("transformer.ln_f.bias", [C]))
        return out
    }

    /// The parameters in `expectedShapes` order.
    public var named: [(String, Tensor)] {
        var out: [(String, Tensor)] = [("transformer.wte.weight", wte), ("transformer.wpe.weight", wpe)]
        for (l, layer) in layers.enumerated() {
            let p = "transformer.h.\(l)."
            out.append((p + "ln_1.weight", layer.ln1W)); out.append((p + "ln_1.bias", layer.ln1B))
            for kind in LinearKind.allCases {
                out.append((p + kind.path + ".weight", layer.linW[kind.rawValue]))
                out.append((p + kind.path + ".bias", layer.linB[kind.rawValue]))
            }
            out.append((p + "ln_2.weight", layer.ln2W)); out.append((p + "ln_2.bias", layer.ln2B))
        }
        out.append(("transformer.ln_f.weight", lnfW)); out.append(("transformer.ln_f.bias", lnfB))
        return out
    }

    /// Builds the weights from tensors found by name, checking every name and shape.
    /// `lookup` gets the canonical name (with `transformer.`).
    static func assemble(config c: GPT2Config, file: String, lookup: (String) throws -> Tensor?) throws -> GPT2Weights {
        var byName: [String: Tensor] = [:]
        for (name, shape) in expectedShapes(c) {
            guard let t = try lookup(name) else { throw ModelError.missingTensor(file: file, tensor: name) }
            guard t.shape == shape else { throw ModelError.shapeMismatch(file: file, tensor: name, expected: shape, found: t.shape) }
            byName[name] = t
        }
        let layers = (0..<c.nLayer).map { l -> Layer in
            let p = "transformer.h.\(l)."
            return Layer(ln1W: byName[p + "ln_1.weight"]!, ln1B: byName[p + "ln_1.bias"]!,
                         ln2W: byName[p + "ln_2.weight"]!, ln2B: byName[p + "ln_2.bias"]!,
                         linW: LinearKind.allCases.map { byName[p + $0.path + ".weight"]! },
                         linB: LinearKind.allCases.map { byName[p + $0.path + ".bias"]! })
        }
        return GPT2Weights(config: c, wte: byName["transformer.wte.weight"]!, wpe: byName["transformer.wpe.weight"]!,
                           layers: layers, lnfW: byName["transformer.ln_f.weight"]!, lnfB: byName["transformer.ln_f.bias"]!)
    }

    /// Reads the weights from a safetensors file, accepting names with or without `transformer.`,
    /// ignoring the attention-mask buffers old checkpoints carry, and checking a present lm_head is tied.
    /// With `writable`, every tensor is copied into owned memory (for full-parameter training).
    public static func load(_ st: SafeTensorsFile, config: GPT2Config, writable: Bool = false) throws -> GPT2Weights {
        var canonical: [String: String] = [:]   // canonical name -> name in file
        for name in st.tensors.keys {
            let canon = name.hasPrefix("transformer.") ? name : "transformer." + name
            if name == "lm_head.weight" {
                guard st.tensors[name]!.shape == [config.vocabSize, config.nEmbd] else {
                    throw ModelError.shapeMismatch(file: st.name, tensor: name, expected: [config.vocabSize, config.nEmbd], found: st.tensors[name]!.shape)
                }
                continue
            }
            if canon.hasSuffix(".attn.bias") || canon.hasSuffix(".attn.masked_bias") { continue }
            canonical[canon] = name
        }
        let expected = Set(expectedShapes(config).map(\.0))
        if let extra = canonical.keys.sorted().first(where: { !expected.contains($0) }) {
            throw ModelError.unexpectedTensor(file: st.name, tensor: canonical[extra]!)
        }
        return try assemble(config: config, file: st.name) { name in
            guard let fileName = canonical[name] else { return nil }
            let t = try st.tensor(fileName)
            return writable ? t.clone() : t
        }
    }

    /// Random weights as GPT-2 initializes them: N(0, 0.02), residual projections scaled by
    /// 1/sqrt(2 * n_layer), zero biases, unit layer norms.
    public static func random(config c: GPT2Config, seed: UInt64) -> GPT2Weights {
        var rng = RNG(seed: seed)
        let projStd = 0.02 / Float(2 * c.nLayer).squareRoot()
        return try! assemble(config: c, file: "random") { name in
            let shape = expectedShapes(c).first { $0.0 == name }!.1
            let t = Tensor(zeros: shape)
            if name.hasSuffix("ln_1.weight") || name.hasSuffix("ln_2.weight") || name.hasSuffix("ln_f.weight") {
                t.fill(1)
            } else if name.hasSuffix(".weight") {
                let std: Float = name.hasSuffix("c_proj.weight") ? projStd : 0.02
                for i in 0..<t.count { t.data[i] = std * rng.normal() }
            }
            return t
        }
    }

    /// Serializes as a Hugging Face model.safetensors (names with `transformer.`, lm_head tied so omitted).
    public func safetensors(dtype: DType = .f32) -> Data {
        SafeTensorsWriter.serialize(Dictionary(uniqueKeysWithValues: named), metadata: ["format": "pt"], dtype: dtype)
    }
}
