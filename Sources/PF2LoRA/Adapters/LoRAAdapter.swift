import Foundation

/// Which half of the two-level model an adapter is: the federation's shared pair (A, B) or one
/// client's own pair (C_k, D_k).
public enum AdapterLevel: String, Sendable, CaseIterable {
    case shared, client

    /// Tensor-name infixes of the down (rank x d_in) and up (d_out x rank) halves.
    public var downName: String { self == .shared ? "lora_A" : "lora_C" }
    public var upName: String { self == .shared ? "lora_B" : "lora_D" }
}

/// One module's low-rank pair: `a` is the down projection (rank, d_in) — A or C_k — and `b` the up
/// projection (d_out, rank) — B or D_k. The update is scale * b @ a, (d_out, d_in).
public struct LoRAPair {
    public let a: Tensor   // (r, d_in)
    public let b: Tensor   // (d_out, r)

    public init(a: Tensor, b: Tensor) {
        self.a = a
        self.b = b
    }
}

/// Everything in an adapter file's `__metadata__` besides level, rank, alpha and rslora.
public struct AdapterMetadata: Equatable, Sendable {
    /// The on-disk element type of the tensors (f32 or f16); compute is always f32.
    public var storage: DType
    public var baseName: String
    public var baseFingerprint: String
    /// For a client adapter: the shared version it was trained against, if known.
    public var sharedVersion: Int?
    /// ISO 8601 UTC time the adapter was made.
    public var createdAt: String
    /// For a client adapter: the client's id.
    public var clientID: String?
    /// Keys this version of pf2lora does not know, kept as they were.
    public var extra: [String: String]

    public init(storage: DType = .f32, baseName: String, baseFingerprint: String, sharedVersion: Int? = nil,
                createdAt: String = AdapterMetadata.now(), clientID: String? = nil, extra: [String: String] = [:]) {
        self.storage = storage
        self.baseName = baseName
        self.baseFingerprint = baseFingerprint
        self.sharedVersion = sharedVersion
        self.createdAt = createdAt
        self.clientID = clientID
        self.extra = extra
    }

    /// The current time as ISO 8601 UTC, to the second.
    public static func now() -> String {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime]
        return f.string(from: Date())
    }
}

/// One level of a two-level LoRA adapter: a map from base module path to its (down, up) pair, with
/// the scale computed once. Tensors are read-only once built: adapters handed out by the store's
/// cache are shared between threads.
public struct LoRAAdapter {
    /// The `format_version` this code writes and the newest it reads.
    public static let formatVersion = 1

    public var level: AdapterLevel
    public var rank: Int
    public var alpha: Float
    public var useRSLoRA: Bool
    /// Module path (`transformer.h.0.attn.c_attn`) -> pair.
    public var modules: [String: LoRAPair]
    public var metadata: AdapterMetadata

    public init(level: AdapterLevel, rank: Int, alpha: Float, useRSLoRA: Bool = false,
                modules: [String: LoRAPair], metadata: AdapterMetadata) {
        self.level = level
        self.rank = rank
        self.alpha = alpha
        self.useRSLoRA = useRSLoRA
        self.modules = modules
        self.metadata = metadata
    }

    /// alpha / r, or alpha / sqrt(r) with rsLoRA.
    public var scale: Float { useRSLoRA ? alpha / Float(rank).squareRoot() : alpha / Float(rank) }

    /// The kinds of module adapted, PEFT-style suffixes without the layer prefix
    /// (`attn.c_attn`, `mlp.c_fc`, ...), sorted. Valid as PEFT `target_modules`.
    public var targetModules: [String] { Array(Set(modules.keys.map(moduleKind))).sorted() }

    /// Bytes of f32 tensor data held in memory (what the cache accounts).
    public var byteCount: Int { modules.values.reduce(0) { $0 + 4 * ($1.a.count + $1.b.count) } }

    /// `base_model.model.<module>.lora_X.weight`
    public static func tensorName(module: String, level: AdapterLevel, up: Bool) -> String {
        "base_model.model.\(module).\(up ? level.upName : level.downName).weight"
    }

    /// The `__metadata__` dictionary written to the file.
    public var metadataStrings: [String: String] {
        var m = metadata.extra
        m["format"] = "pf2lora-adapter"
        m["format_version"] = String(Self.formatVersion)
        m["level"] = level.rawValue
        m["rank"] = String(rank)
        m["alpha"] = "\(alpha)"
        m["use_rslora"] = useRSLoRA ? "true" : "false"
        m["target_modules"] = jsonArray(targetModules)
        m["dtype"] = metadata.storage == .f16 ? "f16" : "f32"
        m["base_model"] = metadata.baseName
        m["base_fingerprint"] = metadata.baseFingerprint
        m["created_at"] = metadata.createdAt
        if let v = metadata.sharedVersion { m["shared_version"] = String(v) }
        if let id = metadata.clientID { m["client_id"] = id }
        return m
    }

    /// The uncompressed safetensors bytes.
    public func safetensors() -> Data {
        var tensors: [String: Tensor] = [:]
        for (module, pair) in modules {
            tensors[Self.tensorName(module: module, level: level, up: false)] = pair.a
            tensors[Self.tensorName(module: module, level: level, up: true)] = pair.b
        }
        return SafeTensorsWriter.serialize(tensors, metadata: metadataStrings, dtype: metadata.storage)
    }

    /// The adapter file's bytes: one zstd frame (with checksum) of the safetensors file.
    public func encode(compressionLevel: Int = 3) throws -> Data {
        try Zstd.compress(safetensors(), level: compressionLevel)
    }

    /// The default bound on an adapter's decompressed size (1 GiB): far above any real adapter, low
    /// enough that a corrupt size field cannot make us allocate without limit.
    public static let defaultSizeLimit = 1 << 30

    /// Decodes and validates an adapter file (see docs/ADAPTER_STORE.md for the checks and their order).
    /// - Parameters:
    ///   - data: the compressed file bytes.
    ///   - name: the file's name for error messages.
    ///   - base: the base model the adapter must fit.
    ///   - expectedLevel: the level the file must be, where it was found (nil: either).
    ///   - sizeLimit: the largest decompressed size accepted.
    public static func decode(from data: Data, name: String, base: BaseModelInfo, expectedLevel: AdapterLevel? = nil,
                              sizeLimit: Int = defaultSizeLimit) throws -> LoRAAdapter {
        try data.withUnsafeBytes { raw in
            try decode(compressed: raw, name: name, base: base, expectedLevel: expectedLevel, sizeLimit: sizeLimit)
        }
    }

    /// Decodes and validates an adapter given as either its file bytes (a zstd frame, as the store
    /// keeps it) or its uncompressed safetensors bytes (as `train_local` exchanges it, and as a Python
    /// peer writes it with the `safetensors` package); the zstd magic number tells which. The same
    /// checks as `decode(from:)` apply, from the safetensors header on.
    public static func decode(compressedOrPlain data: Data, name: String, base: BaseModelInfo, expectedLevel: AdapterLevel? = nil,
                              sizeLimit: Int = defaultSizeLimit) throws -> LoRAAdapter {
        if data.prefix(4).elementsEqual(Zstd.magic) {
            return try decode(from: data, name: name, base: base, expectedLevel: expectedLevel, sizeLimit: sizeLimit)
        }
        guard data.count <= sizeLimit else { throw AdapterError.fileTooLarge(file: name, size: data.count, limit: sizeLimit) }
        let bytes = AlignedBytes(count: data.count)
        data.withUnsafeBytes { src in if let b = src.baseAddress { bytes.pointer.copyMemory(from: b, byteCount: src.count) } }
        return try decodeSafetensors(bytes.readOnly, owner: bytes, name: name, base: base, expectedLevel: expectedLevel)
    }

    /// `decode(from:...)` over raw bytes (no copy of the compressed input).
    public static func decode(compressed raw: UnsafeRawBufferPointer, name: String, base: BaseModelInfo,
                              expectedLevel: AdapterLevel? = nil, sizeLimit: Int = defaultSizeLimit) throws -> LoRAAdapter {
        // 1. the zstd frame, 2. the size bound
        let size: Int
        do { size = try Zstd.frameContentSize(raw, name: name) } catch let e as ZstdError { throw e.asAdapterError(name) }
        guard size <= sizeLimit else { throw AdapterError.tooLarge(file: name, claimed: UInt64(size), limit: sizeLimit) }
        let bytes = AlignedBytes(count: size)
        do { try Zstd.decompress(raw, into: bytes.buffer, name: name) } catch let e as ZstdError { throw e.asAdapterError(name) }
        return try decodeSafetensors(bytes.readOnly, owner: bytes, name: name, base: base, expectedLevel: expectedLevel)
    }

    /// Validates an uncompressed adapter safetensors (checks 3 to 11) over bytes `owner` keeps alive.
    static func decodeSafetensors(_ bytes: UnsafeRawBufferPointer, owner: AnyObject, name: String, base: BaseModelInfo,
                                  expectedLevel: AdapterLevel?) throws -> LoRAAdapter {
        // 3. safetensors header bounds
        let file: SafeTensorsFile
        do { file = try SafeTensorsFile(bytes: bytes, owner: owner, name: name) } catch let e as SafeTensorsError {
            throw AdapterError.badSafetensors(file: name, why: e.description)
        }
        // 4. dtype: F32 or F16, all alike
        var storage: DType?
        for t in file.names {
            let d = file.tensors[t]!.dtype
            guard d == .f32 || d == .f16, storage == nil || storage == d else {
                throw AdapterError.badDType(file: name, tensor: t, dtype: d.rawValue)
            }
            storage = d
        }
        // 5. metadata present and parseable
        let m = file.metadata
        func req(_ k: String) throws -> String {
            guard let v = m[k] else { throw AdapterError.missingMetadata(file: name, key: k) }
            return v
        }
        let fv = try req("format_version")
        guard let fvn = Int(fv), fvn >= 1 else { throw AdapterError.badMetadata(file: name, key: "format_version", value: fv, why: "is not a positive integer") }
        guard fvn <= formatVersion else {
            throw AdapterError.badMetadata(file: name, key: "format_version", value: fv, why: "is newer than this pf2lora reads (\(formatVersion)); upgrade pf2lora")
        }
        let lv = try req("level")
        guard let level = AdapterLevel(rawValue: lv) else { throw AdapterError.badMetadata(file: name, key: "level", value: lv, why: "is not 'shared' or 'client'") }
        let rs = try req("rank")
        guard let rank = Int(rs), rank >= 1, rank <= 65536 else { throw AdapterError.badMetadata(file: name, key: "rank", value: rs, why: "is not an integer in 1...65536") }
        let als = try req("alpha")
        guard let alpha = Float(als), alpha.isFinite else { throw AdapterError.badMetadata(file: name, key: "alpha", value: als, why: "is not a finite number") }
        let rsl = try req("use_rslora")
        guard rsl == "true" || rsl == "false" else { throw AdapterError.badMetadata(file: name, key: "use_rslora", value: rsl, why: "is not 'true' or 'false'") }
        let ds = try req("dtype")
        let metaDType: DType
        switch ds {
        case "f32": metaDType = .f32
        case "f16": metaDType = .f16
        default: throw AdapterError.badMetadata(file: name, key: "dtype", value: ds, why: "is not 'f32' or 'f16'")
        }
        if let s = storage, s != metaDType {
            throw AdapterError.badMetadata(file: name, key: "dtype", value: ds, why: "disagrees with the tensors, which are \(s.rawValue)")
        }
        let fp = try req("base_fingerprint")
        let baseName = m["base_model"] ?? ""
        var sharedVersion: Int?
        if let sv = m["shared_version"] {
            guard let n = Int(sv), n >= 1 else { throw AdapterError.badMetadata(file: name, key: "shared_version", value: sv, why: "is not a positive integer") }
            sharedVersion = n
        }
        var clientID: String?
        if level == .client {
            let id = try req("client_id")
            do { try ClientID.validate(id) } catch {
                throw AdapterError.badMetadata(file: name, key: "client_id", value: id, why: "is not a valid client id")
            }
            clientID = id
        }
        let known: Set<String> = ["format", "format_version", "level", "rank", "alpha", "use_rslora", "target_modules", "dtype",
                                  "base_model", "base_fingerprint", "created_at", "shared_version", "client_id"]
        let extra = m.filter { !known.contains($0.key) }
        // 6. level matches where the file was found
        if let e = expectedLevel, e != level {
            throw AdapterError.levelMismatch(file: name, found: level.rawValue, expected: e.rawValue)
        }
        // 7. every tensor is a known module's lora_A/B (shared) or lora_C/D (client)
        let hint = fp == base.fingerprint ? "" : " (the adapter records another base's fingerprint than this one)"
        var downs: [String: TensorInfo] = [:], ups: [String: TensorInfo] = [:]
        let prefix = "base_model.model."
        for t in file.names {
            guard t.hasPrefix(prefix), t.hasSuffix(".weight") else {
                throw AdapterError.unknownTensor(file: name, tensor: t, why: "is not named base_model.model.<module>.\(level.downName)|\(level.upName).weight")
            }
            let inner = t.dropFirst(prefix.count).dropLast(".weight".count)
            guard let dot = inner.lastIndex(of: ".") else {
                throw AdapterError.unknownTensor(file: name, tensor: t, why: "has no .lora_X part")
            }
            let module = String(inner[..<dot]), part = String(inner[inner.index(after: dot)...])
            guard part == level.downName || part == level.upName else {
                throw AdapterError.unknownTensor(file: name, tensor: t,
                    why: "is a \(FileText.name(part)) tensor but a \(level.rawValue) adapter holds only \(level.downName) and \(level.upName)")
            }
            guard base.linears[module] != nil else {
                throw AdapterError.unknownTensor(file: name, tensor: t, why: "names module \(FileText.name(module)), which is not a linear layer of base '\(base.name)'\(hint)\(base.namingHint)")
            }
            if part == level.downName { downs[module] = file.tensors[t]! } else { ups[module] = file.tensors[t]! }
        }
        guard !file.names.isEmpty else { throw AdapterError.empty(file: name) }
        // 8. pairs complete
        for module in Set(downs.keys).union(ups.keys).sorted() {
            if downs[module] == nil { throw AdapterError.incompletePair(file: name, module: module, missing: level.downName) }
            if ups[module] == nil { throw AdapterError.incompletePair(file: name, module: module, missing: level.upName) }
        }
        // 9. shapes vs the base and the rank
        for module in downs.keys.sorted() {
            let (din, dout) = base.linears[module]!
            let a = downs[module]!, b = ups[module]!
            let an = tensorName(module: module, level: level, up: false), bn = tensorName(module: module, level: level, up: true)
            if a.shape != [rank, din] {
                let why = a.shape.count == 2 && a.shape[1] == din ? "rank is \(rank) in the metadata" : "the base's d_in is \(din)\(hint)"
                throw AdapterError.shapeMismatch(file: name, tensor: an, shape: a.shape, expected: [rank, din], why: why)
            }
            if b.shape != [dout, rank] {
                let why = b.shape.count == 2 && b.shape[0] == dout ? "rank is \(rank) in the metadata" : "the base's d_out is \(dout)\(hint)"
                throw AdapterError.shapeMismatch(file: name, tensor: bn, shape: b.shape, expected: [dout, rank], why: why)
            }
        }
        // 10. fingerprint
        guard fp == base.fingerprint else {
            throw AdapterError.fingerprintMismatch(file: name, adapterBase: baseName, adapterFingerprint: fp, base: base.name, baseFingerprint: base.fingerprint)
        }
        // 11. finite values
        var modules: [String: LoRAPair] = [:]
        for module in downs.keys.sorted() {
            let a = file.tensor(downs[module]!), b = file.tensor(ups[module]!)
            for (t, up) in [(a, false), (b, true)] {
                if let i = firstNonFinite(t) { throw AdapterError.nonFinite(file: name, tensor: tensorName(module: module, level: level, up: up), index: i) }
            }
            modules[module] = LoRAPair(a: a, b: b)
        }
        let meta = AdapterMetadata(storage: metaDType, baseName: baseName, baseFingerprint: fp, sharedVersion: sharedVersion,
                                   createdAt: m["created_at"] ?? "", clientID: clientID, extra: extra)
        return LoRAAdapter(level: level, rank: rank, alpha: alpha, useRSLoRA: rsl == "true", modules: modules, metadata: meta)
    }
}

/// The index of the first NaN or infinity in `t`, or nil. x - x is 0 for finite x and NaN otherwise,
/// so a sum of those is NaN exactly when some element is not finite; only then do we search.
func firstNonFinite(_ t: Tensor) -> Int? {
    let n = t.count, p = t.data
    var acc = SIMD16<Float>(repeating: 0)
    var i = 0
    while i + 16 <= n {
        let v = UnsafeRawPointer(p + i).loadUnaligned(as: SIMD16<Float>.self)
        acc += v - v
        i += 16
    }
    var tail: Float = 0
    while i < n { tail += p[i] - p[i]; i += 1 }
    if acc.sum() == 0, tail == 0 { return nil }
    return (0..<n).first { !p[$0].isFinite }
}

/// A module path's part after its layer number: `transformer.h.3.attn.c_attn` -> `attn.c_attn`,
/// `model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`; paths without a layer number are returned whole.
func moduleKind(_ path: String) -> String {
    let parts = path.split(separator: ".", omittingEmptySubsequences: false)
    if let i = parts.firstIndex(where: { Int($0) != nil }), i > 0, i + 1 < parts.count {
        return parts[(i + 1)...].joined(separator: ".")
    }
    return path
}

func jsonArray(_ items: [String]) -> String {
    "[" + items.map { JSONText.quoted($0) }.joined(separator: ",") + "]"
}

extension ZstdError {
    func asAdapterError(_ file: String) -> AdapterError {
        switch self {
        case .notZstd: return .notZstdFrame(file: file)
        case let .truncated(_, n): return .truncatedFrame(file: file, size: n)
        case let .tooLarge(_, c, l): return .tooLarge(file: file, claimed: c, limit: l)
        case .unknownContentSize: return .corruptFrame(file: file, why: "the frame does not record its decompressed size")
        case let .trailingBytes(_, n): return .corruptFrame(file: file, why: "\(n) bytes follow the frame")
        case let .corrupt(_, why): return .corruptFrame(file: file, why: why)
        case let .compressFailed(why): return .corruptFrame(file: file, why: why)
        }
    }
}
