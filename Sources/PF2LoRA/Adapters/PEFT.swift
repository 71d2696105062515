import Foundation

/// The fields of a PEFT `adapter_config.json` that matter for a LoRA adapter.
public struct PEFTConfig: Equatable {
    public var r: Int
    public var loraAlpha: Float
    public var targetModules: [String]
    public var fanInFanOut: Bool
    public var useRSLoRA: Bool
    public var baseModel: String?
}

/// Conversion from and to PEFT LoRA folders (adapter_config.json + adapter_model.safetensors).
///
/// PEFT stores `lora_A.weight` as (r, in_features) and `lora_B.weight` as (out_features, r) for
/// GPT-2's Conv1D layers too (fan_in_fan_out only transposes the base weight), so tensors map over
/// unchanged. A client level is stored under lora_C/lora_D with its own rank and alpha.
public enum PEFT {
    /// Reads and checks `adapter_config.json`.
    public static func readConfig(folder: String) throws -> PEFTConfig {
        let path = folder + "/adapter_config.json"
        guard let data = FileManager.default.contents(atPath: path) else {
            throw AdapterError.badPEFT(folder: folder, why: "has no adapter_config.json; point --peft at the folder PEFT's save_pretrained wrote")
        }
        guard let j = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw AdapterError.badPEFT(folder: folder, why: "adapter_config.json is not a JSON object")
        }
        func fail(_ why: String) -> AdapterError { .badPEFT(folder: folder, why: why) }
        if let t = j["peft_type"] as? String, t.uppercased() != "LORA" { throw fail("peft_type is not LORA; only LORA adapters can be imported") }
        guard let r = (j["r"] as? NSNumber)?.intValue, r >= 1 else { throw fail("adapter_config.json has no positive integer 'r'") }
        guard let alphaN = j["lora_alpha"] as? NSNumber, alphaN.floatValue.isFinite else { throw fail("adapter_config.json has no numeric 'lora_alpha'") }
        var targets: [String] = []
        if let list = j["target_modules"] as? [String] { targets = list.sorted() } else if let s = j["target_modules"] as? String { targets = [s] }
        for key in ["rank_pattern", "alpha_pattern"] {
            if let d = j[key] as? [String: Any], !d.isEmpty {
                throw fail("\(key) is not empty (\(d.count) entries); per-module ranks or alphas are not supported — retrain with one r and lora_alpha")
            }
        }
        if (j["use_dora"] as? Bool) == true { throw fail("use_dora is true; DoRA adapters are not supported") }
        if let b = j["bias"] as? String, b != "none" { throw fail("bias is not 'none'; LoRA bias terms are not supported (use bias='none')") }
        if let m = j["modules_to_save"] as? [Any], !m.isEmpty { throw fail("modules_to_save is not empty; fully trained modules cannot be stored as a LoRA adapter") }
        return PEFTConfig(r: r, loraAlpha: alphaN.floatValue, targetModules: targets,
                          fanInFanOut: (j["fan_in_fan_out"] as? Bool) ?? false,
                          useRSLoRA: (j["use_rslora"] as? Bool) ?? false,
                          baseModel: j["base_model_name_or_path"] as? String)
    }

    /// Reads a PEFT LoRA folder as one level of a two-level adapter for `base`, with every load
    /// check applied (shapes against the base and r, finite values). The base's fingerprint is
    /// recorded: a PEFT folder does not carry one, so the caller vouches that it fits.
    public static func read(folder: String, base: BaseModelInfo, level: AdapterLevel, clientID: String? = nil,
                            storage: DType = .f32, sharedVersion: Int? = nil) throws -> LoRAAdapter {
        let config = try readConfig(folder: folder)
        let path = folder + "/adapter_model.safetensors"
        guard FileManager.default.fileExists(atPath: path) else {
            if FileManager.default.fileExists(atPath: folder + "/adapter_model.bin") {
                throw AdapterError.badPEFT(folder: folder, why: "holds adapter_model.bin (pickle); save it with safe_serialization=True to get adapter_model.safetensors")
            }
            throw AdapterError.badPEFT(folder: folder, why: "has no adapter_model.safetensors")
        }
        let file: SafeTensorsFile
        do { file = try SafeTensorsFile(path: path) } catch let e as SafeTensorsError {
            throw AdapterError.badSafetensors(file: path, why: e.description)
        }
        var tensors: [String: Tensor] = [:]
        for name in file.names {
            // PEFT writes base_model.model.<module>.lora_A.weight; older versions kept the adapter
            // name (.lora_A.default.weight); a bare GPT2Model has no `transformer.` prefix.
            var n = name.replacingOccurrences(of: ".lora_A.default.weight", with: ".lora_A.weight")
                .replacingOccurrences(of: ".lora_B.default.weight", with: ".lora_B.weight")
            n = withOptionalPrefix(n, base: base)
            if level == .client {
                n = n.replacingOccurrences(of: ".lora_A.weight", with: ".lora_C.weight")
                    .replacingOccurrences(of: ".lora_B.weight", with: ".lora_D.weight")
            }
            tensors[n] = try file.tensor(name).clone()
        }
        var meta = AdapterMetadata(storage: storage, baseName: base.name, baseFingerprint: base.fingerprint,
                                   sharedVersion: level == .client ? sharedVersion : nil, clientID: clientID)
        meta.extra["imported_from"] = "peft"
        if let b = config.baseModel { meta.extra["peft_base_model"] = b }
        let stub = LoRAAdapter(level: level, rank: config.r, alpha: config.loraAlpha, useRSLoRA: config.useRSLoRA, modules: [:], metadata: meta)
        var strings = stub.metadataStrings
        strings["target_modules"] = jsonArray(Array(Set(tensors.keys.compactMap { peftModule($0) }.map(moduleKind))).sorted())
        if level == .client, strings["client_id"] == nil { strings["client_id"] = "imported" }
        // Serialize under our names and validate exactly as a load does (checks 3 to 11).
        let data = SafeTensorsWriter.serialize(tensors, metadata: strings, dtype: storage)
        let bytes = AlignedBytes(count: data.count)
        data.withUnsafeBytes { bytes.pointer.copyMemory(from: $0.baseAddress!, byteCount: data.count) }
        var a = try LoRAAdapter.decodeSafetensors(bytes.readOnly, owner: bytes, name: path, base: base, expectedLevel: level)
        if level == .client { a.metadata.clientID = clientID }
        return a
    }

    /// Puts back the prefix a family's bare model leaves out: `base_model.model.h.0...` (PEFT on a
    /// bare `GPT2Model`) -> `base_model.model.transformer.h.0...`. Without a known architecture, GPT-2's.
    static func withOptionalPrefix(_ name: String, base: BaseModelInfo) -> String {
        let p = "base_model.model."
        let layerPrefix = base.architecture?.names.layerPrefix ?? "transformer.h."
        let optional = base.architecture == nil ? "transformer." : base.architecture!.names.optionalPrefix
        guard let opt = optional, layerPrefix.hasPrefix(opt) else { return name }
        if name.hasPrefix(p + layerPrefix.dropFirst(opt.count)) { return p + opt + name.dropFirst(p.count) }
        return name
    }

    /// `base_model.model.<module>.lora_X.weight` -> `<module>`
    static func peftModule(_ name: String) -> String? {
        let p = "base_model.model."
        guard name.hasPrefix(p), name.hasSuffix(".weight") else { return nil }
        let inner = name.dropFirst(p.count).dropLast(".weight".count)
        guard let dot = inner.lastIndex(of: ".") else { return nil }
        return String(inner[..<dot])
    }

    /// Writes one level as a plain PEFT LoRA folder (a client level's C, D become lora_A, lora_B).
    /// `baseModelName` becomes `base_model_name_or_path` (a hub name or a folder PEFT can load);
    /// `fanInFanOut` defaults to the base's layout (true for GPT-2's Conv1D, false for `nn.Linear`).
    public static func write(_ adapter: LoRAAdapter, to folder: String, base: BaseModelInfo, baseModelName: String? = nil,
                             fanInFanOut: Bool? = nil) throws {
        var tensors: [String: Tensor] = [:]
        for (module, pair) in adapter.modules {
            tensors[LoRAAdapter.tensorName(module: module, level: .shared, up: false)] = pair.a
            tensors[LoRAAdapter.tensorName(module: module, level: .shared, up: true)] = pair.b
        }
        try writeFolder(folder, tensors: tensors, rank: adapter.rank, alpha: adapter.alpha, useRSLoRA: adapter.useRSLoRA,
                        targets: targetModules(Array(adapter.modules.keys), base: base), baseModelName: baseModelName ?? base.name,
                        fanInFanOut: fanInFanOut ?? (base.architecture?.slots.first?.layout ?? .conv1D == .conv1D))
    }

    /// A client's whole personalized update as one LoRA of rank r + r2 with scale 1 (DESIGN §2):
    /// B' = [ s1 B | s2 D ] (d_out, r + r2), A' = [ A ; C ] (r + r2, d_in), lora_alpha = r + r2,
    /// no rsLoRA. A module that only one level adapts gets zeros in the other half.
    public static func merge(shared: LoRAAdapter, client: LoRAAdapter) -> LoRAAdapter {
        let r1 = shared.rank, r2 = client.rank, r = r1 + r2
        let s1 = shared.scale, s2 = client.scale
        var modules: [String: LoRAPair] = [:]
        for module in Set(shared.modules.keys).union(client.modules.keys) {
            let p1 = shared.modules[module], p2 = client.modules[module]
            let din = p1?.a.cols ?? p2!.a.cols, dout = p1?.b.rows ?? p2!.b.rows
            let a = Tensor(zeros: [r, din])   // [A ; C]
            let b = Tensor(zeros: [dout, r])  // [s1 B | s2 D]
            if let p1 { a.data.update(from: p1.a.data, count: r1 * din) }
            if let p2 { (a.data + r1 * din).update(from: p2.a.data, count: r2 * din) }
            for i in 0..<dout {
                if let p1 { for j in 0..<r1 { b.data[i * r + j] = s1 * p1.b.data[i * r1 + j] } }
                if let p2 { for j in 0..<r2 { b.data[i * r + r1 + j] = s2 * p2.b.data[i * r2 + j] } }
            }
            modules[module] = LoRAPair(a: a, b: b)
        }
        var meta = client.metadata
        meta.extra["merged_from"] = "shared rank \(r1) + client rank \(r2)"
        return LoRAAdapter(level: .shared, rank: r, alpha: Float(r), useRSLoRA: false, modules: modules, metadata: meta)
    }

    /// `target_modules` for a set of module paths: the module kinds (`attn.c_attn`, ...) when each
    /// kind is adapted in every layer of `base` that has it, else the full paths (PEFT matches both:
    /// a key equal to an entry, or ending in "." + entry).
    static func targetModules(_ paths: [String], base: BaseModelInfo) -> [String] {
        let have = Set(paths)
        let kinds = Set(paths.map(moduleKind))
        let complete = kinds.allSatisfy { k in
            base.linears.keys.filter { moduleKind($0) == k }.allSatisfy(have.contains)
        }
        guard complete, paths.allSatisfy({ moduleKind($0) != $0 }) else { return paths.sorted() }
        // PEFT's own spelling (`q_proj`) where the family's slot table has one.
        return kinds.map { k in base.architecture?.slots.first { $0.path == k }?.peftName ?? k }.sorted()
    }

    static func writeFolder(_ folder: String, tensors: [String: Tensor], rank: Int, alpha: Float, useRSLoRA: Bool,
                            targets: [String], baseModelName: String, fanInFanOut: Bool) throws {
        do { try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true) } catch {
            throw IOError.cannotWrite(folder, "cannot create the folder")
        }
        let config: [String: Any] = [
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": Double(alpha),
            "target_modules": targets, "fan_in_fan_out": fanInFanOut, "use_rslora": useRSLoRA,
            "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": baseModelName,
            "inference_mode": true, "init_lora_weights": true, "modules_to_save": NSNull(),
            "rank_pattern": [String: Any](), "alpha_pattern": [String: Any](), "use_dora": false,
            "layers_to_transform": NSNull(), "layers_pattern": NSNull(), "revision": NSNull(),
        ]
        let json = try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys])
        try AtomicFile.write(SafeTensorsWriter.serialize(tensors, metadata: ["format": "pt"]), to: folder + "/adapter_model.safetensors")
        try AtomicFile.write(json, to: folder + "/adapter_config.json")
    }
}
