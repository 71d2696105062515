import Foundation

/// What an adapter file says about itself, read without a base model (for `adapters list` and
/// `adapters inspect`): the frame is decompressed and the safetensors header parsed, nothing more.
public struct AdapterFileSummary {
    public var path: String
    public var compressedBytes: Int
    public var rawBytes: Int
    public var metadata: [String: String]
    /// (name, dtype, shape) in file order.
    public var tensors: [(name: String, dtype: String, shape: [Int])]

    public var compressionRatio: Double { compressedBytes == 0 ? 0 : Double(rawBytes) / Double(compressedBytes) }

    /// Reads `path` (refusing symlinks), decompresses it and parses its header.
    public init(path: String, sizeLimit: Int = LoRAAdapter.defaultSizeLimit) throws {
        self.path = path
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ELOOP { throw AdapterStoreError.symlink(path: path, target: "?", outside: true) }
            throw AdapterStoreError.io(path: path, why: String(cString: strerror(errno)))
        }
        let handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { throw AdapterStoreError.notRegularFile(path: path) }
        guard Int(st.st_size) <= sizeLimit else { throw AdapterError.fileTooLarge(file: path, size: Int(st.st_size), limit: sizeLimit) }
        let data = handle.readDataToEndOfFile()
        compressedBytes = data.count
        let raw: Data
        do { raw = try Zstd.decompress(data, limit: sizeLimit, name: path) } catch let e as ZstdError { throw e.asAdapterError(path) }
        rawBytes = raw.count
        let bytes = AlignedBytes(count: raw.count)
        raw.withUnsafeBytes { if let b = $0.baseAddress { bytes.pointer.copyMemory(from: b, byteCount: raw.count) } }
        let file: SafeTensorsFile
        do { file = try SafeTensorsFile(bytes: bytes.readOnly, owner: bytes, name: path) } catch let e as SafeTensorsError {
            throw AdapterError.badSafetensors(file: path, why: e.description)
        }
        metadata = file.metadata
        tensors = file.names.map { ($0, file.tensors[$0]!.dtype.rawValue, file.tensors[$0]!.shape) }
    }
}

/// One version file of a store, as `adapters list` shows it.
public struct StoreEntry {
    public var level: AdapterLevel
    public var client: String?
    public var version: Int
    public var isCurrent: Bool
    /// From the manifest, for client versions.
    public var trainedOn: Int?
    /// nil when the file could not be read; then `error` says why.
    public var summary: AdapterFileSummary?
    public var error: String?
}

extension AdapterStore {
    /// The base folders under a store root (those holding a manifest.json), sorted.
    public static func baseFolders(root: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        return names.filter { FileManager.default.fileExists(atPath: root + "/" + $0 + "/manifest.json") }.sorted()
    }

    /// Every version file the manifest of the store folder `directory` names, read without a base
    /// model: shared first, then clients by id, versions ascending.
    public static func survey(directory: String) throws -> (baseModel: String, fingerprint: String, entries: [StoreEntry]) {
        let path = directory + "/manifest.json"
        guard let data = FileManager.default.contents(atPath: path) else {
            throw AdapterStoreError.io(path: path, why: "no manifest; is this a store folder (adapters/<base>)?")
        }
        let m: Manifest
        do { m = try JSONDecoder().decode(Manifest.self, from: data) } catch {
            throw AdapterStoreError.io(path: path, why: "unreadable manifest (open the store with the model to rebuild it)")
        }
        var out: [StoreEntry] = []
        func add(_ level: AdapterLevel, _ id: String?, _ e: Manifest.Entry) {
            for v in e.versions {
                let rel = level == .shared ? "shared" : "clients/\(id ?? "")"
                let file = directory + "/" + rel + String(format: "/v%06d.safetensors.zst", v)
                var entry = StoreEntry(level: level, client: id, version: v, isCurrent: v == e.current,
                                       trainedOn: e.trainedOn?[String(v)], summary: nil, error: nil)
                do { entry.summary = try AdapterFileSummary(path: file) } catch { entry.error = "\(error)" }
                out.append(entry)
            }
        }
        if let s = m.shared { add(.shared, nil, s) }
        for id in m.clients.keys.sorted() where ClientID.isValid(id) { add(.client, id, m.clients[id]!) }
        return (m.baseModel, m.baseFingerprint, out)
    }
}
