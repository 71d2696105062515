import ArgumentParser
import Foundation
import PF2LoRA

/// `pf2lora adapters …`: look into and convert the adapter store (docs/ADAPTER_STORE.md).
struct Adapters: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "adapters",
        abstract: "List, inspect, import, export and initialize two-level LoRA adapters in an adapter store.",
        discussion: """
        A store root (--store, default ./adapters) holds one folder per base model:
          <root>/<base>/shared/v000012.safetensors.zst
          <root>/<base>/clients/<client-id>/v000003.safetensors.zst
          <root>/<base>/manifest.json
        Each file is a zstd frame of a safetensors file with PEFT tensor names (lora_A/lora_B for the \
        shared level, lora_C/lora_D for a client level). See docs/ADAPTER_STORE.md.
        """,
        subcommands: [List.self, Inspect.self, ImportPEFT.self, ExportPEFT.self, Init.self, RankCommand.self])

    /// Options shared by the subcommands that find a store folder.
    struct StoreOptions: ParsableArguments {
        @Option(name: .long, help: "The store root, holding one folder per base model (list and inspect also take a base's folder itself).")
        var store: String = "adapters"

        @Option(name: .long, help: "Which base's folder under the store root, when it holds several (default: the only one).")
        var base: String?

        /// The store folder for one base, found without a model.
        func folder() throws -> String {
            if FileManager.default.fileExists(atPath: store + "/manifest.json") { return store }
            if let base { return store + "/" + base }
            let bases = AdapterStore.baseFolders(root: store)
            guard !bases.isEmpty else { throw CLIError("\(store) holds no adapter store (no <base>/manifest.json); pass --store DIR") }
            guard bases.count == 1 else { throw CLIError("\(store) holds stores for several bases (\(bases.joined(separator: ", "))); choose one with --base NAME") }
            return store + "/" + bases[0]
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List the versions in a store: ranks, sizes compressed and raw, compression ratio, the shared version each client was trained on.")

        @OptionGroup var options: StoreOptions

        @Flag(name: .long, help: "Print JSON instead of a table.")
        var json = false

        func run() throws {
            do {
                let dir = try options.folder()
                let (baseName, fp, entries) = try AdapterStore.survey(directory: dir)
                if json {
                    let rows: [[String: Any]] = entries.map { e in
                        var r: [String: Any] = ["level": e.level.rawValue, "version": e.version, "current": e.isCurrent]
                        if let c = e.client { r["client"] = c }
                        if let t = e.trainedOn { r["trained_on_shared"] = t }
                        if let s = e.summary {
                            r["rank"] = Int(s.metadata["rank"] ?? "") ?? 0
                            r["alpha"] = Double(s.metadata["alpha"] ?? "") ?? 0
                            r["dtype"] = s.metadata["dtype"] ?? "?"
                            r["compressed_bytes"] = s.compressedBytes
                            r["raw_bytes"] = s.rawBytes
                        }
                        if let err = e.error { r["error"] = err }
                        return r
                    }
                    let obj: [String: Any] = ["store": dir, "base_model": baseName, "base_fingerprint": fp, "adapters": rows]
                    print(String(decoding: try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys]), as: UTF8.self))
                    return
                }
                print("store \(dir)  base \(baseName)  fingerprint \(fp)")
                if entries.isEmpty { print("(no adapters)"); return }
                print(pad("adapter", 22) + pad("version", 9) + pad("rank", 6) + pad("alpha", 7) + pad("dtype", 6)
                      + pad("compressed", 12) + pad("raw", 12) + pad("ratio", 7) + "trained on")
                for e in entries {
                    let name = e.level == .shared ? "shared" : "client " + (e.client ?? "")
                    let v = "\(e.version)\(e.isCurrent ? "*" : "")"
                    guard let s = e.summary else { print(pad(name, 22) + pad(v, 9) + "unreadable: \(e.error ?? "?")"); continue }
                    let trained = e.level == .shared ? "" : (e.trainedOn.map { "shared v\($0)" } ?? "?")
                    print(pad(name, 22) + pad(v, 9) + pad(s.metadata["rank"] ?? "?", 6) + pad(s.metadata["alpha"] ?? "?", 7)
                          + pad(s.metadata["dtype"] ?? "?", 6) + pad(bytes(s.compressedBytes), 12) + pad(bytes(s.rawBytes), 12)
                          + pad(String(format: "%.2f", s.compressionRatio), 7) + trained)
                }
                print("* current version")
            }
        }
    }

    struct Inspect: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show one adapter file: metadata, tensors and shapes; with --model, also run every load check.",
            discussion: """
            --file inspects any file, inside a store or not, a quarantined .corrupt-* file included: what can             be read of it, and (with --model) which load check it fails. Nothing is created or changed.
            """)

        @OptionGroup var options: StoreOptions

        @Option(name: .long, help: "Any adapter file (for example a store's .corrupt-v000003.safetensors.zst), instead of --shared / --client.")
        var file: String?

        @Flag(name: .long, help: "The shared adapter.")
        var shared = false

        @Option(name: .long, help: "A client's adapter.")
        var client: String?

        @Option(name: .long, help: "The version (default: the current one).")
        var version: Int?

        @Option(name: .long, help: "A model folder (config.json of a supported family, model.safetensors) to validate the adapter against.")
        var model: String?

        func validate() throws {
            if file != nil {
                guard !shared, client == nil, version == nil else { throw ValidationError("--file is instead of --shared / --client / --version") }
                return
            }
            guard shared != (client != nil) else { throw ValidationError("give exactly one of --shared or --client ID, or --file PATH") }
        }

        /// `--file`: what can be read of any file, and which check it fails against `--model`.
        func inspectFile(_ path: String) throws {
            print("file        \(path)")
            var failed: Error?
            do {
                let s = try AdapterFileSummary(path: path)
                print("size        \(bytes(s.compressedBytes)) compressed, \(bytes(s.rawBytes)) raw, ratio \(String(format: "%.2f", s.compressionRatio))")
                print("metadata")
                for k in s.metadata.keys.sorted() { print("  \(pad(k, 18)) \(s.metadata[k]!)") }
                print("tensors (\(s.tensors.count))")
                for t in s.tensors { print("  \(pad(t.name, 64)) \(t.dtype) \(t.shape)") }
            } catch {
                failed = error
                print("unreadable  \(error)")
            }
            guard let model else {
                if let failed { throw failed }
                print("(give --model to run every load check against a base)")
                return
            }
            let base = try BaseModelInfo.load(folder: model)
            let data: Data
            do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch { throw CLIError("cannot read \(path): \(error.localizedDescription)") }
            do {
                let a = try LoRAAdapter.decode(from: data, name: path, base: base, sizeLimit: LoRAAdapter.defaultSizeLimit)
                print("valid       a \(a.level.rawValue) adapter for base \(base.name) (fingerprint \(base.fingerprint)), rank \(a.rank), \(a.modules.count) modules")
            } catch let e as AdapterError {
                print("invalid     check \(e.check.map(String.init) ?? "-") failed")
                throw e
            }
        }

        func run() throws {
            if let file { return try inspectFile(file) }
            do {
                let dir = try options.folder()
                let level: AdapterLevel = shared ? .shared : .client
                if let client { try ClientID.validate(client) }
                let (_, _, entries) = try AdapterStore.survey(directory: dir)
                let mine = entries.filter { $0.level == level && $0.client == client }
                guard !mine.isEmpty else { throw CLIError("\(dir) has no \(shared ? "shared adapter" : "client '\(client!)'")") }
                guard let entry = version.map({ v in mine.first { $0.version == v } }) ?? mine.first(where: \.isCurrent) ?? mine.last else {
                    throw CLIError("no version \(version!); available: \(mine.map { String($0.version) }.joined(separator: ", "))")
                }
                guard let s = entry.summary else { throw CLIError(entry.error ?? "unreadable") }
                print("file        \(s.path)")
                print("version     \(entry.version)\(entry.isCurrent ? " (current)" : "")")
                print("size        \(bytes(s.compressedBytes)) compressed, \(bytes(s.rawBytes)) raw, ratio \(String(format: "%.2f", s.compressionRatio))")
                if let t = entry.trainedOn { print("trained on  shared v\(t)") }
                print("metadata")
                for k in s.metadata.keys.sorted() { print("  \(pad(k, 18)) \(s.metadata[k]!)") }
                print("tensors (\(s.tensors.count))")
                for t in s.tensors { print("  \(pad(t.name, 64)) \(t.dtype) \(t.shape)") }
                if let model {
                    let base = try BaseModelInfo.load(folder: model)
                    let store = try AdapterStore.open(root: URL(fileURLWithPath: dir).deletingLastPathComponent().path, base: base,
                                                      folder: URL(fileURLWithPath: dir).lastPathComponent, access: .read, create: false)
                    _ = try store.readAndValidate(level: level, client: client, version: entry.version)
                    print("valid for base \(base.name) (fingerprint \(base.fingerprint))")
                }
            }
        }
    }

    struct ImportPEFT: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "import-peft",
            abstract: "Import a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) as the shared level or a client level.",
            discussion: """
            The adapter is checked against the base model (module names, shapes, finite values) and published \
            as a new version. A client level is stored under lora_C/lora_D with its own r and lora_alpha \
            (rsLoRA scale alpha/sqrt(r) when use_rslora is set). rank_pattern/alpha_pattern, DoRA, LoRA biases \
            and modules_to_save are refused.
            """)

        @Option(name: .long, help: "The PEFT folder.")
        var peft: String

        @OptionGroup var options: StoreOptions

        @Option(name: .long, help: "The model folder the adapter was trained on (config.json, model.safetensors).")
        var model: String

        @Option(name: .long, help: "shared or client.")
        var level: String

        @Option(name: .long, help: "The client id, for --level client.")
        var client: String?

        @Option(name: .long, help: "For a client: the shared version it was trained against (default: the store's current one).")
        var trainedOn: Int?

        @Option(name: .long, help: "Storage dtype in the store: f32 or f16 (compute is always f32).")
        var dtype: String = "f32"

        @Option(name: .long, help: "Old versions kept per adapter.")
        var keep: Int = 3

        func validate() throws {
            guard let l = AdapterLevel(rawValue: level) else { throw ValidationError("--level must be shared or client") }
            if l == .client && client == nil { throw ValidationError("--level client needs --client ID") }
            if l == .shared && client != nil { throw ValidationError("--client is only for --level client") }
            guard dtype == "f32" || dtype == "f16" else { throw ValidationError("--dtype must be f32 or f16") }
        }

        func run() throws {
            do {
                let lvl = AdapterLevel(rawValue: level)!
                if let client { try ClientID.validate(client) }
                let base = try BaseModelInfo.load(folder: model)
                // The PEFT folder is read and checked before the store is opened: opening it for a
                // publish creates it when missing, which a wrong --peft used to leave behind.
                let adapter = try PEFT.read(folder: peft, base: base, level: lvl, clientID: client,
                                            storage: dtype == "f16" ? .f16 : .f32, sharedVersion: trainedOn)
                let store = try AdapterStore.open(root: options.store, base: base, folder: options.base, keepVersions: keep)
                logStoreOpen(store, command: "import-peft")
                if let why = store.readOnlyReason { throw AdapterStoreError.readOnly(store: store.directory, why: why) }
                // The version this import replaces: its publish is a compare-and-swap on it.
                let from = ExpectedVersion(startedFrom: store.currentVersion(level: lvl, client: client))
                let v = lvl == .shared ? try store.publishShared(adapter, expecting: from) : try store.publishClient(id: client!, adapter, expecting: from)
                let what = lvl == .shared ? "shared" : "client \(client!)"
                print("imported \(peft) as \(what) v\(v) (rank \(adapter.rank), alpha \(adapter.alpha), scale \(adapter.scale), \(adapter.modules.count) modules) into \(store.directory)")
            }
        }
    }

    struct ExportPEFT: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "export-peft",
            abstract: "Export a client's whole personalized update as one plain PEFT LoRA of rank r + r2 (or one level alone).",
            discussion: """
            With --client ID: B' = [ (alpha/r) B | (alpha2/r2) D ], A' = [ A ; C ], lora_alpha = r + r2, so \
            PEFT's scale is 1; the current shared version and the client's current version are used. \
            With --level shared or --level client, that level alone is written as it is.
            """)

        @OptionGroup var options: StoreOptions

        @Option(name: .long, help: "The model folder of the store's base.")
        var model: String

        @Option(name: .long, help: "The client to export.")
        var client: String?

        @Option(name: .long, help: "Export one level alone: shared or client (default: both merged).")
        var level: String?

        @Option(name: .long, help: "The output folder (created).")
        var out: String

        @Option(name: .long, help: "base_model_name_or_path to write (default: the model folder).")
        var baseModelName: String?

        func validate() throws {
            if let level {
                guard let l = AdapterLevel(rawValue: level) else { throw ValidationError("--level must be shared or client") }
                if l == .client && client == nil { throw ValidationError("--level client needs --client ID") }
            } else if client == nil {
                throw ValidationError("give --client ID (merged export) or --level shared")
            }
        }

        func run() throws {
            do {
                let base = try BaseModelInfo.load(folder: model)
                let store = try AdapterStore.open(root: options.store, base: base, folder: options.base, access: .read, create: false)
                var isDir: ObjCBool = false
                if FileManager.default.fileExists(atPath: out, isDirectory: &isDir), !isDir.boolValue {
                    throw CLIError("--out \(out) exists and is not a folder; a PEFT adapter is a folder (adapter_config.json, adapter_model.safetensors): give a new folder's path or an existing folder's")
                }
                guard !AdapterStore.isInside(out, root: options.store) else {
                    throw CLIError("--out \(out) is inside the adapter store \(options.store); export to a folder outside it (a store's folders hold only the store's own files)")
                }
                let name = baseModelName ?? model
                if let client { try ClientID.validate(client) }
                func sharedAdapter() throws -> VersionedAdapter {
                    guard let s = try store.latestShared() else { throw AdapterStoreError.noAdapter(what: "shared adapter", store: store.directory) }
                    return s
                }
                func clientAdapter() throws -> VersionedAdapter {
                    guard let c = try store.latestClient(client!) else { throw AdapterStoreError.noAdapter(what: "adapter for client '\(client!)'", store: store.directory) }
                    return c
                }
                switch level.flatMap(AdapterLevel.init(rawValue:)) {
                case .shared?:
                    let s = try sharedAdapter()
                    try PEFT.write(s.adapter, to: out, base: base, baseModelName: name)
                    print("wrote shared v\(s.version) (rank \(s.adapter.rank)) to \(out)")
                case .client?:
                    let c = try clientAdapter()
                    try PEFT.write(c.adapter, to: out, base: base, baseModelName: name)
                    print("wrote client \(client!) v\(c.version) alone (rank \(c.adapter.rank)) to \(out)")
                case nil:
                    let s = try sharedAdapter(), c = try clientAdapter()
                    if let t = store.trainedOn(client: client!, version: c.version), t != s.version {
                        FileHandle.standardError.write(Data("note: client \(client!) v\(c.version) was trained against shared v\(t); exporting it with the current shared v\(s.version), as the server serves it\n".utf8))
                    }
                    let merged = PEFT.merge(shared: s.adapter, client: c.adapter)
                    try PEFT.write(merged, to: out, base: base, baseModelName: name)
                    print("wrote client \(client!) v\(c.version) + shared v\(s.version) as one LoRA of rank \(merged.rank) (scale 1) to \(out)")
                }
            }
        }
    }

    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "init",
            abstract: "Write the shared pair a PF2LoRA federation starts from (A Kaiming-uniform, B = 0) as an adapter file, for a federation server to send in round 0.",
            discussion: """
            The pair is exactly the one `pf2lora federate --method pf2lora --seed S` starts from with the same \
            --rank, --alpha and --targets, so a federation driven through `train_local` (docs/FLOWER.md) with \
            seed S starts where `federate` does. The file is an uncompressed safetensors adapter (PEFT names \
            lora_A / lora_B, pf2lora metadata), readable by the `safetensors` Python package; with --store it \
            is also published as the store's shared version.
            """)

        @Option(name: .long, help: "The model folder (config.json, model.safetensors).")
        var model: String
        @Option(name: .long, help: "Output file (.safetensors).")
        var out: String
        @Option(help: "Shared rank r.") var rank: Int = 8
        @Option(help: "Shared alpha (default 2 x rank).") var alpha: Float?
        @Option(help: "Adapted linear layers, comma-separated: the model's slots (GPT-2: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; Llama family: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), or all.")
        var targets: String = "all"
        @Option(help: "Random seed (the federation's).") var seed: UInt64 = 0
        @Option(name: .long, help: "Also publish it as the shared version of this store root.") var store: String?

        func validate() throws {
            guard rank >= 1, rank <= 4096 else { throw ValidationError("--rank must be in 1...4096") }
            try validateTargets(targets, modelFolder: model)
        }

        func run() throws {
            do {
                let m = try LanguageModel.load(folder: model)
                let base = try BaseModelInfo.load(folder: model)
                let arch = m.architecture
                let kinds = try parseTargets(targets, arch)
                let paths = (0..<arch.layerCount).flatMap { l in kinds.map { arch.modulePath(layer: l, slot: $0.index) } }
                let a = try initialSharedAdapter(weights: m.weights, base: base, modules: paths, rank: rank, alpha: alpha ?? 2 * Float(rank), seed: seed)
                let bytes = a.safetensors()
                do { try bytes.write(to: URL(fileURLWithPath: out), options: .atomic) } catch {
                    throw CLIError("cannot write \(out): \(error.localizedDescription)")
                }
                var note = ""
                if let store {
                    let st = try AdapterStore.open(root: store, base: base)
                    logStoreOpen(st, command: "adapters init")
                    note = "; published as shared v\(try adoptShared(a, into: st, trainedBy: "pf2lora adapters init")) in \(st.directory)"
                }
                print("wrote \(out): shared pair rank \(rank), alpha \(a.alpha), \(a.modules.count) modules, \(bytes.count) bytes, seed \(seed)\(note)")
            }
        }
    }
}

func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }

func bytes(_ n: Int) -> String {
    if n >= 1 << 20 { return String(format: "%.2f MiB", Double(n) / Double(1 << 20)) }
    if n >= 1 << 10 { return String(format: "%.1f KiB", Double(n) / 1024) }
    return "\(n) B"
}
