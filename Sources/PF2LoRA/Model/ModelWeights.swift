import Foundation

/// Every parameter of a model, whatever its family, as the checkpoint stores it (linear weights in
/// their slot's layout). f32 tensors are views of the memory-mapped file when possible.
public final class ModelWeights: Sendable {
    /// One block.
    public final class Layer: Sendable {
        /// The norm before attention and before the MLP: (C) each; biases only for LayerNorm.
        public let attnNorm: Tensor, attnNormBias: Tensor?
        public let mlpNorm: Tensor, mlpNormBias: Tensor?
        /// Per-head RMSNorm weights of q and k, (hd) each (Qwen3), else nil.
        public let qNorm: Tensor?, kNorm: Tensor?
        /// Indexed by slot: each linear weight in its slot's layout (`LinearSlot.weightShape`). A slot
        /// of a multi-slot group is a view of that group's rows in `groupW`.
        public let linW: [Tensor]
        /// Indexed by slot: the bias (out), or nil for a slot without one.
        public let linB: [Tensor?]
        /// Indexed by group (`GroupSite`): the group's weight, its slots' rows stacked, (out, in) for
        /// nn.Linear; a one-slot group is its slot's tensor (GPT-2's Conv1D (in, out) included).
        public let groupW: [Tensor]
        /// Indexed by group: the slots' biases stacked (out), zeros for a slot without one; nil when no slot has one.
        public let groupB: [Tensor?]

        /// Stacks the slots of each multi-slot group into one tensor (a copy) and makes the slots views of it.
        init(architecture a: ModelArchitecture, attnNorm: Tensor, attnNormBias: Tensor?, mlpNorm: Tensor, mlpNormBias: Tensor?,
             qNorm: Tensor?, kNorm: Tensor?, linW slotW: [Tensor], linB slotB: [Tensor?]) {
            self.attnNorm = attnNorm; self.attnNormBias = attnNormBias; self.mlpNorm = mlpNorm; self.mlpNormBias = mlpNormBias
            self.qNorm = qNorm; self.kNorm = kNorm
            var w = slotW, b = slotB
            var gw: [Tensor] = [], gb: [Tensor?] = []
            for g in a.groups {
                if g.slots.count == 1 {
                    gw.append(w[g.slots[0]]); gb.append(b[g.slots[0]])
                    continue
                }
                let fused = Tensor(zeros: [g.outFeatures, g.inFeatures])
                let fusedB: Tensor? = g.slots.contains { b[$0] != nil } ? Tensor(zeros: [g.outFeatures]) : nil
                for (s, off) in zip(g.slots, g.offsets) {
                    let n = a.slots[s].outFeatures
                    (fused.data + off * g.inFeatures).update(from: w[s].data, count: n * g.inFeatures)
                    w[s] = Tensor(viewing: fused.data + off * g.inFeatures, shape: w[s].shape, owner: fused)
                    if let fb = fusedB, let bs = b[s] {
                        (fb.data + off).update(from: bs.data, count: n)
                        b[s] = Tensor(viewing: fb.data + off, shape: bs.shape, owner: fb)
                    }
                }
                gw.append(fused); gb.append(fusedB)
            }
            linW = w; linB = b; groupW = gw; groupB = gb
        }
    }

    public let architecture: ModelArchitecture
    /// (V, C) token embeddings; also the output head when it is tied.
    public let embed: Tensor
    /// (P, C) learned positions, or nil with rotary ones.
    public let positions: Tensor?
    public let layers: [Layer]
    /// (C) final norm, with its bias for LayerNorm.
    public let finalNorm: Tensor, finalNormBias: Tensor?
    /// (V, C) the untied output head, or nil when tied to `embed`.
    public let lmHead: Tensor?

    /// The output head: (V, C), the untied lm_head or the embeddings.
    public var head: Tensor { lmHead ?? embed }

    init(architecture: ModelArchitecture, byRole t: [ModelArchitecture.TensorRole: Tensor]) {
        self.architecture = architecture
        embed = t[.embed]!
        positions = t[.positions]
        layers = (0..<architecture.layerCount).map { l in
            Layer(architecture: architecture, attnNorm: t[.attnNorm(l)]!, attnNormBias: t[.attnNormBias(l)], mlpNorm: t[.mlpNorm(l)]!,
                  mlpNormBias: t[.mlpNormBias(l)], qNorm: t[.qNorm(l)], kNorm: t[.kNorm(l)],
                  linW: architecture.slots.map { t[.weight(l, $0.index)]! }, linB: architecture.slots.map { t[.bias(l, $0.index)] })
        }
        finalNorm = t[.finalNorm]!
        finalNormBias = t[.finalNormBias]
        lmHead = t[.lmHead]
    }

    /// The tensor of a role.
    func tensor(_ role: ModelArchitecture.TensorRole) -> Tensor? {
        switch role {
        case .embed: return embed
        case .positions: return positions
        case .finalNorm: return finalNorm
        case .finalNormBias: return finalNormBias
        case .lmHead: return lmHead
        case let .attnNorm(l): return layers[l].attnNorm
        case let .attnNormBias(l): return layers[l].attnNormBias
        case let .mlpNorm(l): return layers[l].mlpNorm
        case let .mlpNormBias(l): return layers[l].mlpNormBias
        case let .qNorm(l): return layers[l].qNorm
        case let .kNorm(l): return layers[l].kNorm
        case let .weight(l, s): return layers[l].linW[s]
        case let .bias(l, s): return layers[l].linB[s]
        }
    }

    /// Every parameter under its Hugging Face name, in `ModelArchitecture.tensors` order.
    public var named: [(String, Tensor)] {
        architecture.tensors.map { ($0.name, tensor($0.role)!) }
    }

    /// Builds the weights from tensors found by canonical name, checking every name and shape.
    static func assemble(architecture a: ModelArchitecture, file: String, lookup: (String) throws -> Tensor?) throws -> ModelWeights {
        var byRole: [ModelArchitecture.TensorRole: Tensor] = [:]
        for (name, shape, role) in a.tensors {
            guard let t = try lookup(name) else { throw ModelError.missingTensor(file: file, tensor: name, modelType: a.modelType) }
            guard t.shape == shape else { throw ModelError.shapeMismatch(file: file, tensor: name, expected: shape, found: t.shape) }
            byRole[role] = t
        }
        return ModelWeights(architecture: a, byRole: byRole)
    }

    /// Reads the weights from a checkpoint (one file or shards), accepting the family's name variants
    /// (GPT-2 without `transformer.`), ignoring the buffers it names, and checking a present lm_head of
    /// a tied model has the head's shape. With `writable`, every tensor is copied into owned memory
    /// (for full-parameter training).
    public static func load(_ ck: Checkpoint, architecture a: ModelArchitecture, writable: Bool = false) throws -> ModelWeights {
        let canonical = try fileNames(ck, architecture: a)
        return try assemble(architecture: a, file: ck.name) { name in
            guard let fileName = canonical[name] else { return nil }
            let t = try ck.tensor(fileName)
            return writable ? t.clone() : t
        }
    }

    /// Canonical name -> the name the checkpoint stores it under, after checking that the checkpoint
    /// holds nothing foreign, that every shape matches, and that a present lm_head of a tied model has
    /// the head's shape (from the headers alone: nothing is read). Missing names are left out.
    static func fileNames(_ ck: Checkpoint, architecture a: ModelArchitecture) throws -> [String: String] {
        var canonical: [String: String] = [:]   // canonical name -> name in file
        func file(_ name: String) -> String { ck.files[ck.tensors[name]!.file].name }
        for (name, (_, info)) in ck.tensors {
            if a.tiedHead, name == a.names.lmHead {
                guard info.shape == [a.vocabSize, a.hiddenSize] else {
                    throw ModelError.shapeMismatch(file: file(name), tensor: name, expected: [a.vocabSize, a.hiddenSize], found: info.shape)
                }
                continue
            }
            guard let canon = a.canonicalName(name) else { continue }
            canonical[canon] = name
        }
        let expected = Set(a.tensors.map(\.name))
        if let extra = canonical.keys.sorted().first(where: { !expected.contains($0) }) {
            throw ModelError.unexpectedTensor(file: file(canonical[extra]!), tensor: canonical[extra]!, modelType: a.modelType)
        }
        // Shapes are checked from the headers before anything is read or converted.
        for (name, shape, _) in a.tensors {
            if let fileName = canonical[name], ck.tensors[fileName]!.info.shape != shape {
                throw ModelError.shapeMismatch(file: file(fileName), tensor: fileName, expected: shape, found: ck.tensors[fileName]!.info.shape)
            }
        }
        return canonical
    }

    /// Random weights as the family initializes them: linear weights and embeddings N(0, 0.02)
    /// (GPT-2: residual projections scaled by 1/sqrt(2 L)), zero biases, unit norms.
    public static func random(architecture a: ModelArchitecture, seed: UInt64) -> ModelWeights {
        var rng = RNG(seed: seed)
        let projStd = 0.02 / Float(2 * a.layerCount).squareRoot()
        return try! assemble(architecture: a, file: "random") { name in
            let (_, shape, role) = a.tensors.first { $0.name == name }!
            let t = Tensor(zeros: shape)
            switch role {
            case .attnNorm, .mlpNorm, .finalNorm, .qNorm, .kNorm:
                t.fill(1)
            case .embed, .positions, .lmHead:
                for i in 0..<t.count { t.data[i] = 0.02 * rng.normal() }
            case let .weight(_, s):
                let r = a.slots[s].role
                let std: Float = a.scaledResidualInit && (r == .attnOut || r == .down) ? projStd : 0.02
                for i in 0..<t.count { t.data[i] = std * rng.normal() }
            case .attnNormBias, .mlpNormBias, .finalNormBias, .bias:
                break
            }
            return t
        }
    }

    /// Serializes as a Hugging Face model.safetensors (canonical names; a tied head omitted).
    public func safetensors(dtype: DType = .f32, metadata: [String: String] = ["format": "pt"]) -> Data {
        SafeTensorsWriter.serialize(Dictionary(uniqueKeysWithValues: named), metadata: metadata, dtype: dtype)
    }
}
