import Foundation

/// How a checkpoint stores a linear layer's weight.
public enum WeightLayout: String, Sendable {
    /// GPT-2's `Conv1D`: the weight is (in, out).
    case conv1D
    /// `nn.Linear` (and GGUF, PEFT's B A): the weight is (out, in).
    case linear
}

/// What a linear layer computes inside the block. The block routes activations by role, never by a
/// family's tensor names.
public enum SlotRole: String, Sendable {
    /// q, k and v in one projection (GPT-2's c_attn): output [q | k | v].
    case qkv
    case q, k, v
    /// The attention output projection (o_proj, attn.c_proj).
    case attnOut
    /// The MLP's input projection (c_fc, up_proj) and, for SwiGLU, its gate (gate_proj).
    case up, gate
    /// The MLP's output projection (down_proj, mlp.c_proj).
    case down
}

/// One linear layer of every block: the unit an adapter targets. A family lists its slots once;
/// weights, adapters, PEFT import/export, the store, training and serving all work from this table.
public struct LinearSlot: Equatable, Sendable {
    /// Position in `ModelArchitecture.slots` (and in every per-slot array).
    public let index: Int
    public let role: SlotRole
    /// The module path inside a block, as Hugging Face names it: `attn.c_attn`, `self_attn.q_proj`.
    public let path: String
    /// The name PEFT's `target_modules` uses for it: the shortest unambiguous suffix of `path`
    /// (`q_proj`; GPT-2's `attn.c_proj` and `mlp.c_proj` need their parent).
    public let peftName: String
    public let inFeatures: Int
    public let outFeatures: Int
    public let layout: WeightLayout
    public let hasBias: Bool

    public init(index: Int, role: SlotRole, path: String, peftName: String, inFeatures: Int, outFeatures: Int,
                layout: WeightLayout, hasBias: Bool) {
        self.index = index; self.role = role; self.path = path; self.peftName = peftName
        self.inFeatures = inFeatures; self.outFeatures = outFeatures; self.layout = layout; self.hasBias = hasBias
    }

    /// The weight's shape as the checkpoint stores it.
    public var weightShape: [Int] { layout == .conv1D ? [inFeatures, outFeatures] : [outFeatures, inFeatures] }
    /// (in, out)
    public var dims: (inFeatures: Int, outFeatures: Int) { (inFeatures, outFeatures) }
}

/// The four matrix products of every block, in the order the block runs them.
public enum GroupSite: Int, CaseIterable, Sendable {
    /// q, k and v from the attention norm's output: [q | k | v], (qW + 2 kvW) wide.
    case attnIn = 0
    /// The attention output projection, added to the residual stream.
    case attnOut
    /// The MLP's input: [up] (GELU) or [gate | up] (SwiGLU).
    case mlpIn
    /// The MLP's output projection, added to the residual stream.
    case mlpOut
}

/// Slots that read the same input, computed as one matrix: the output rows of its slots stacked in
/// order (GPT-2: one slot per group; Llama: [q, k, v], [o], [gate, up], [down]). Serving and training
/// run one product per group; an adapter still targets each slot on its own, at its `offsets` entry.
public struct SlotGroup: Equatable, Sendable {
    public let site: GroupSite
    /// Slot indices in output order.
    public let slots: [Int]
    /// The first output feature of each slot in the group's output.
    public let offsets: [Int]
    public let inFeatures: Int
    /// The sum of the slots' outputs.
    public let outFeatures: Int
    public let layout: WeightLayout
}

/// Where each kind of parameter sits in a checkpoint, as the family's Hugging Face model names it.
/// Per-layer names are `layerPrefix + "<layer>." + name`; a norm's bias (LayerNorm) is its name with
/// `.bias` for `.weight`.
public struct TensorNames: Equatable, Sendable {
    /// `transformer.wte.weight`, `model.embed_tokens.weight`: (V, C).
    public var embed: String
    /// Learned positions (`transformer.wpe.weight`): (P, C); nil with rotary positions.
    public var positions: String?
    /// `transformer.ln_f`, `model.norm` (without `.weight`).
    public var finalNorm: String
    /// The output head when it is not tied to `embed`: (V, C).
    public var lmHead: String
    /// `transformer.h.`, `model.layers.`
    public var layerPrefix: String
    /// The norm before attention (`ln_1`, `input_layernorm`) and before the MLP (`ln_2`, `post_attention_layernorm`).
    public var attnNorm: String
    public var mlpNorm: String
    /// Per-head norms of q and k (Qwen3: `self_attn.q_norm`, `self_attn.k_norm`).
    public var qNorm: String
    public var kNorm: String
    /// A prefix some checkpoints of the family leave out (GPT-2 saved from `GPT2Model`: no `transformer.`).
    public var optionalPrefix: String?
    /// Buffers some checkpoints carry that are not parameters (GPT-2's `attn.bias` masks, old Llama `rotary_emb.inv_freq`).
    public var ignoredSuffixes: [String]

    public init(embed: String, positions: String?, finalNorm: String, lmHead: String, layerPrefix: String,
                attnNorm: String, mlpNorm: String, qNorm: String = "self_attn.q_norm", kNorm: String = "self_attn.k_norm",
                optionalPrefix: String? = nil, ignoredSuffixes: [String] = []) {
        self.embed = embed; self.positions = positions; self.finalNorm = finalNorm; self.lmHead = lmHead
        self.layerPrefix = layerPrefix; self.attnNorm = attnNorm; self.mlpNorm = mlpNorm; self.qNorm = qNorm; self.kNorm = kNorm
        self.optionalPrefix = optionalPrefix; self.ignoredSuffixes = ignoredSuffixes
    }
}

/// One description of a decoder-only model, whatever its family: what the block computes and the
/// table of its linear slots. A family's Codable config (GPT2Config, LlamaConfig, ...) decodes
/// config.json into this; everything generic is written against it (DESIGN §8).
public struct ModelArchitecture: Equatable, Sendable {
    public enum Norm: String, Sendable {
        /// (x - mean) / sqrt(var + eps) * w + b
        case layerNorm
        /// x / sqrt(mean(x^2) + eps) * w
        case rmsNorm
    }

    /// How a rotary embedding's frequencies are rescaled for contexts past the pretraining length.
    public enum RoPEScaling: Equatable, Sendable {
        /// Positions divided by `factor` (`rope_type: linear`).
        case linear(factor: Double)
        /// Llama 3.1/3.2: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
        case llama3(factor: Double, lowFreqFactor: Double, highFreqFactor: Double, originalContext: Int)
    }

    public enum Positions: Equatable, Sendable {
        /// A learned (P, C) table added to the embeddings (GPT-2).
        case learned
        /// Rotary embeddings on q and k (rotate-half pairing, as Hugging Face's Llama).
        case rope(theta: Double, scaling: RoPEScaling?)
    }

    public enum MLP: String, Sendable {
        /// down(gelu_tanh(up(x)))
        case gelu
        /// down(silu(gate(x)) * up(x))
        case swiglu
    }

    /// config.json's `model_type`: the registry key (`gpt2`, `llama`, `qwen2`, `qwen3`, `mistral`).
    public var modelType: String
    /// V
    public var vocabSize: Int
    /// C, the residual stream's width.
    public var hiddenSize: Int
    public var layerCount: Int
    /// H query heads, KV key/value heads (KV divides H; KV < H is grouped-query attention).
    public var headCount: Int
    public var kvHeadCount: Int
    /// hd: H * hd need not be C (Qwen3).
    public var headDim: Int
    /// I, the MLP's hidden width.
    public var intermediateSize: Int
    /// The longest sequence the model runs (positions table, or the rotary context).
    public var contextLength: Int
    public var norm: Norm
    public var normEps: Float
    public var positions: Positions
    public var mlp: MLP
    /// Per-head RMSNorm on q and k before the rotary embedding (Qwen3).
    public var qkNorm: Bool
    /// The output head is the embedding matrix (no separate lm_head).
    public var tiedHead: Bool
    public var bosTokenId: Int?
    /// End-of-sequence ids from config.json (generation_config.json may add more; see `LanguageModel`).
    public var eosTokenIds: [Int]
    /// The dtype config.json says the weights are stored in (`torch_dtype` or `dtype`), if it says.
    public var storedDType: String?
    /// Random init: residual projections scaled by 1/sqrt(2 L) (GPT-2) or not (Llama).
    public var scaledResidualInit: Bool
    /// Every block's linear layers, in the order the block runs them.
    public let slots: [LinearSlot]
    /// The slots by the product of the block that computes them (`GroupSite` order).
    public let groups: [SlotGroup]
    /// slot index -> (group index, position in the group)
    let slotGroup: [(group: Int, position: Int)]
    public var names: TensorNames

    public init(modelType: String, vocabSize: Int, hiddenSize: Int, layerCount: Int, headCount: Int, kvHeadCount: Int,
                headDim: Int, intermediateSize: Int, contextLength: Int, norm: Norm, normEps: Float, positions: Positions,
                mlp: MLP, qkNorm: Bool, tiedHead: Bool, bosTokenId: Int?, eosTokenIds: [Int], storedDType: String?,
                scaledResidualInit: Bool, slots: [LinearSlot], names: TensorNames) {
        self.modelType = modelType; self.vocabSize = vocabSize; self.hiddenSize = hiddenSize; self.layerCount = layerCount
        self.headCount = headCount; self.kvHeadCount = kvHeadCount; self.headDim = headDim
        self.intermediateSize = intermediateSize; self.contextLength = contextLength; self.norm = norm; self.normEps = normEps
        self.positions = positions; self.mlp = mlp; self.qkNorm = qkNorm; self.tiedHead = tiedHead
        self.bosTokenId = bosTokenId; self.eosTokenIds = eosTokenIds; self.storedDType = storedDType
        self.scaledResidualInit = scaledResidualInit; self.slots = slots; self.names = names
        var groups: [SlotGroup] = []
        var slotGroup = Array(repeating: (group: -1, position: -1), count: slots.count)
        for site in GroupSite.allCases {
            let members = slots.filter { Self.site(of: $0.role) == site }
            var offsets: [Int] = [], out = 0
            for (i, s) in members.enumerated() {
                offsets.append(out); out += s.outFeatures
                slotGroup[s.index] = (groups.count, i)
            }
            groups.append(SlotGroup(site: site, slots: members.map(\.index), offsets: offsets,
                                    inFeatures: members.first?.inFeatures ?? 0, outFeatures: out,
                                    layout: members.first?.layout ?? .linear))
        }
        self.groups = groups
        self.slotGroup = slotGroup
    }

    static func site(of role: SlotRole) -> GroupSite {
        switch role {
        case .qkv, .q, .k, .v: return .attnIn
        case .attnOut: return .attnOut
        case .up, .gate: return .mlpIn
        case .down: return .mlpOut
        }
    }

    public static func == (a: ModelArchitecture, b: ModelArchitecture) -> Bool {
        a.modelType == b.modelType && a.vocabSize == b.vocabSize && a.hiddenSize == b.hiddenSize && a.layerCount == b.layerCount
            && a.headCount == b.headCount && a.kvHeadCount == b.kvHeadCount && a.headDim == b.headDim
            && a.intermediateSize == b.intermediateSize && a.contextLength == b.contextLength && a.norm == b.norm
            && a.normEps == b.normEps && a.positions == b.positions && a.mlp == b.mlp && a.qkNorm == b.qkNorm
            && a.tiedHead == b.tiedHead && a.bosTokenId == b.bosTokenId && a.eosTokenIds == b.eosTokenIds
            && a.storedDType == b.storedDType && a.scaledResidualInit == b.scaledResidualInit && a.slots == b.slots && a.names == b.names
    }

    // MARK: Derived sizes

    /// The product (`GroupSite`) that computes a slot.
    public func site(ofSlot s: Int) -> GroupSite { GroupSite(rawValue: slotGroup[s].group)! }

    /// The group of a site.
    public func group(_ site: GroupSite) -> SlotGroup { groups[site.rawValue] }

    /// H * hd: the width of q and of the attention output.
    public var qWidth: Int { headCount * headDim }
    /// KV * hd: the width of k and of v.
    public var kvWidth: Int { kvHeadCount * headDim }
    /// The slot of `role`, if the family has one.
    public func slot(_ role: SlotRole) -> LinearSlot? { slots.first { $0.role == role } }

    // MARK: Module paths

    /// A linear layer's module path in the whole model, as Hugging Face and PEFT name it:
    /// `transformer.h.3.attn.c_attn`, `model.layers.3.self_attn.q_proj`.
    public func modulePath(layer: Int, slot: Int) -> String { "\(names.layerPrefix)\(layer).\(slots[slot].path)" }

    /// Parses a module path (also without the family's optional prefix) into (layer, slot index);
    /// nil when it is not a linear layer of this architecture.
    public func parseModulePath(_ path: String) -> (layer: Int, slot: Int)? {
        var p = Substring(path)
        if !p.hasPrefix(names.layerPrefix), let opt = names.optionalPrefix, names.layerPrefix.hasPrefix(opt) {
            p = Substring(opt) + p
        }
        guard p.hasPrefix(names.layerPrefix) else { return nil }
        p = p.dropFirst(names.layerPrefix.count)
        guard let dot = p.firstIndex(of: "."), let layer = Int(p[..<dot]), layer >= 0, layer < layerCount else { return nil }
        let rest = p[p.index(after: dot)...]
        guard let s = slots.firstIndex(where: { $0.path == rest }) else { return nil }
        return (layer, s)
    }

    /// Module path -> (in, out) of every linear layer an adapter may target.
    public var linears: [String: (inFeatures: Int, outFeatures: Int)] {
        var out: [String: (inFeatures: Int, outFeatures: Int)] = [:]
        for l in 0..<layerCount { for s in slots { out[modulePath(layer: l, slot: s.index)] = s.dims } }
        return out
    }

    /// The slots named by `names`, each a slot's `path` (`self_attn.q_proj`), its `peftName` (`q_proj`)
    /// or its role (`q`); an unknown name throws an error listing this family's slots.
    public func slots(named names: [String]) throws -> [LinearSlot] {
        try names.map { n in
            guard let s = slots.first(where: { $0.path == n || $0.peftName == n || $0.role.rawValue == n }) else {
                throw ModelError.unknownSlot(n, modelType: modelType, known: slots.map(\.path))
            }
            return s
        }
    }

    // MARK: Parameters

    /// What a parameter tensor is, independent of the family's name for it.
    public enum TensorRole: Hashable, Sendable {
        case embed, positions, finalNorm, finalNormBias, lmHead
        case attnNorm(Int), attnNormBias(Int), mlpNorm(Int), mlpNormBias(Int), qNorm(Int), kNorm(Int)
        /// (layer, slot)
        case weight(Int, Int), bias(Int, Int)
    }

    /// Every parameter: its checkpoint name, the shape config.json implies, and its role, in a fixed
    /// order (embeddings; per layer the attention norm, q/k norms, the slots, the MLP norm; final norm; head).
    public var tensors: [(name: String, shape: [Int], role: TensorRole)] {
        let C = hiddenSize
        let hasNormBias = norm == .layerNorm
        var out: [(name: String, shape: [Int], role: TensorRole)] = [(names.embed, [vocabSize, C], .embed)]
        if let p = names.positions, positions == .learned { out.append((p, [contextLength, C], .positions)) }
        for l in 0..<layerCount {
            let p = "\(names.layerPrefix)\(l)."
            out.append((p + names.attnNorm + ".weight", [C], .attnNorm(l)))
            if hasNormBias { out.append((p + names.attnNorm + ".bias", [C], .attnNormBias(l))) }
            if qkNorm {
                out.append((p + names.qNorm + ".weight", [headDim], .qNorm(l)))
                out.append((p + names.kNorm + ".weight", [headDim], .kNorm(l)))
            }
            for s in slots {
                out.append((p + s.path + ".weight", s.weightShape, .weight(l, s.index)))
                if s.hasBias { out.append((p + s.path + ".bias", [s.outFeatures], .bias(l, s.index))) }
            }
            out.append((p + names.mlpNorm + ".weight", [C], .mlpNorm(l)))
            if hasNormBias { out.append((p + names.mlpNorm + ".bias", [C], .mlpNormBias(l))) }
        }
        out.append((names.finalNorm + ".weight", [C], .finalNorm))
        if hasNormBias { out.append((names.finalNorm + ".bias", [C], .finalNormBias)) }
        if !tiedHead { out.append((names.lmHead, [vocabSize, C], .lmHead)) }
        return out
    }

    /// Number of parameters (the tied head counted once).
    public var parameterCount: Int { tensors.reduce(0) { $0 + $1.shape.reduce(1, *) } }

    /// The checkpoint's own spelling of a tensor name -> the canonical one of `tensors`; nil for a
    /// buffer the family ignores.
    func canonicalName(_ name: String) -> String? {
        if names.ignoredSuffixes.contains(where: { name.hasSuffix($0) }) { return nil }
        if let opt = names.optionalPrefix, !name.hasPrefix(opt), name != names.lmHead { return opt + name }
        return name
    }

    // MARK: Checks

    /// Checks the sizes make a model this runtime can run; `file` names config.json in the error.
    public func validate(file: String) throws {
        func bad(_ why: String) -> ModelError { .badConfig(file: file, why: why) }
        guard vocabSize > 0, hiddenSize > 0, layerCount > 0, headCount > 0, kvHeadCount > 0, headDim > 0,
              intermediateSize > 0, contextLength > 0 else { throw bad("sizes must be positive") }
        guard headCount % kvHeadCount == 0 else {
            throw bad("num_attention_heads \(headCount) is not a multiple of num_key_value_heads \(kvHeadCount)")
        }
        if case .rope = positions, headDim % 2 != 0 { throw bad("head_dim \(headDim) must be even for rotary embeddings") }
        guard normEps > 0, normEps.isFinite else { throw bad("the norm epsilon must be a positive number") }
        for id in eosTokenIds + (bosTokenId.map { [$0] } ?? []) where id < 0 {
            throw bad("token id \(id) in bos_token_id/eos_token_id is negative")
        }
        // The block's shape: its products read and write what the next one expects.
        let roles = slots.map(\.role)
        let attnIn = group(.attnIn).slots.map { slots[$0].role }, mlpIn = group(.mlpIn).slots.map { slots[$0].role }
        guard attnIn == [.qkv] || attnIn == [.q, .k, .v], group(.attnOut).slots.count == 1, group(.mlpOut).slots.count == 1,
              mlpIn == (mlp == .swiglu ? [.gate, .up] : [.up]), Set(roles).count == roles.count else {
            throw bad("the family's slot table does not make a decoder block (internal error)")
        }
        for g in groups where g.slots.count > 1 {
            guard g.layout == .linear, g.slots.allSatisfy({ slots[$0].layout == .linear && slots[$0].inFeatures == g.inFeatures }) else {
                throw bad("slots of one product must share the nn.Linear layout and the input (internal error)")
            }
        }
        guard group(.attnIn).outFeatures == qWidth + 2 * kvWidth, group(.attnOut).inFeatures == qWidth,
              group(.mlpOut).inFeatures == intermediateSize, group(.attnOut).outFeatures == hiddenSize,
              group(.mlpOut).outFeatures == hiddenSize else {
            throw bad("the slot shapes do not match the heads and widths (internal error)")
        }
    }

    /// config.json for this architecture, in its family's own keys.
    public func configJSON() throws -> Data {
        try ModelRegistry.family(of: self).configJSON(self)
    }
}
