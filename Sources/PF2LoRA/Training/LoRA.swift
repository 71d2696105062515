import Foundation

/// One adapted linear layer: frozen weight W0 is (dOut, dIn).
public struct LoRAModule: Sendable, Hashable, Codable {
    /// The module path (PEFT spelling without the `base_model.model.` prefix), e.g. `h.0.attn.c_attn`.
    public let name: String
    public let dIn: Int
    public let dOut: Int
    public init(name: String, dIn: Int, dOut: Int) { self.name = name; self.dIn = dIn; self.dOut = dOut }
}

/// Tensor names inside a `ParameterSet`, following PEFT: level 1 holds `<module>.lora_A.weight`
/// (r, dIn) and `<module>.lora_B.weight` (dOut, r); level 2 holds `<module>.lora_C.weight` (r2, dIn)
/// and `<module>.lora_D.weight` (dOut, r2). The adapter store prefixes them with `base_model.model.`.
public enum LoRANames {
    public static func a(_ module: String) -> String { "\(module).lora_A.weight" }
    public static func b(_ module: String) -> String { "\(module).lora_B.weight" }
    public static func c(_ module: String) -> String { "\(module).lora_C.weight" }
    public static func d(_ module: String) -> String { "\(module).lora_D.weight" }
}

/// Which adapter level a parameter set is: it decides the tensor names (A/B or C/D).
public enum LoRALevel: String, Sendable, Codable {
    case shared, client

    func downName(_ m: String) -> String { self == .shared ? LoRANames.a(m) : LoRANames.c(m) }
    func upName(_ m: String) -> String { self == .shared ? LoRANames.b(m) : LoRANames.d(m) }
}

/// The scale of a LoRA term: alpha / r (PEFT default) or alpha / sqrt(r) (rsLoRA).
public func loraScale(alpha: Float, rank: Int, rslora: Bool = false) -> Float {
    rslora ? alpha / Float(rank).squareRoot() : alpha / Float(rank)
}

/// One level's (down, up) pair of `module` in `set`: (A, B) for the shared level, (C, D) for the client level.
public func loraPair(_ set: ParameterSet, level: LoRALevel, module: String) -> (down: Tensor, up: Tensor) {
    (set.tensor(level.downName(module)), set.tensor(level.upName(module)))
}

/// Fresh LoRA parameters for one level, as PEFT initializes them: the down projection (A or C,
/// shape (rank, dIn)) Kaiming-uniform with a = sqrt(5), i.e. uniform in ±1/sqrt(dIn); the up projection
/// (B or D, shape (dOut, rank)) zero, so the adapter starts as the identity update.
public func makeLoRAParameters(modules: [LoRAModule], rank: Int, level: LoRALevel, rng: inout RNG) -> ParameterSet {
    let set = ParameterSet()
    for m in modules {
        let down = Tensor(zeros: [rank, m.dIn])
        rng.fillUniform(down, bound: 1 / Float(m.dIn).squareRoot())
        set.insert(level.downName(m.name), down)
        set.insert(level.upName(m.name), Tensor(zeros: [m.dOut, rank]))
    }
    return set
}

/// The adapter a task evaluates: a level-1 (shared) pair and a level-2 (client) pair per module,
/// either of which may be absent, each with its scale. Ranks are read from the tensors' shapes,
/// so a level may have any rank (HETLoRA truncations, single-level baselines of rank r + r2).
///
///     W_k = W0 + sharedScale * B A + localScale * D C
public struct TwoLevelAdapter {
    public var shared: ParameterSet?
    public var sharedScale: Float
    public var local: ParameterSet?
    public var localScale: Float

    public init(shared: ParameterSet?, sharedScale: Float, local: ParameterSet? = nil, localScale: Float = 0) {
        self.shared = shared; self.sharedScale = sharedScale; self.local = local; self.localScale = localScale
    }

    /// The base model alone.
    public static var none: TwoLevelAdapter { TwoLevelAdapter(shared: nil, sharedScale: 0) }
}
