import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Why a store operation was refused. Validation failures of a file are `AdapterError`s.
public enum AdapterStoreError: Error, CustomStringConvertible, Equatable {
    case invalidClientID(id: String, why: String)
    case noAdapter(what: String, store: String)
    case noVersion(what: String, version: Int, available: [Int])
    case symlink(path: String, target: String, outside: Bool)
    case notRegularFile(path: String)
    case io(path: String, why: String)
    case baseMismatch(store: String, storeBase: String, storeFingerprint: String, base: String, baseFingerprint: String)
    case wrongLevel(expected: AdapterLevel, got: AdapterLevel)
    case unknownSharedVersion(client: String, version: Int, latest: Int?)
    case badVersionLimit(Int)
    case conflict(what: String, expected: Int?, current: Int?)
    case noStore(root: String)
    case noBase(root: String, base: String, fingerprint: String, held: [HeldBase])
    case baseElsewhere(root: String, wanted: String, folder: String, fingerprint: String)
    case baseFolderGiven(root: String, held: HeldBase?, suggestion: String, base: String, fingerprint: String)
    case noBaseFolder(root: String, folder: String, held: [HeldBase], sameWeights: String?)
    case readOnly(store: String, why: String)

    public var description: String {
        switch self {
        case let .noStore(root):
            return "no adapter store at \(root) (the folder does not exist); check --store — a mistyped path is not turned into a new empty store. The commands that publish (personalize, federate, adapters import-peft, adapters init --store) create one"
        case let .noBase(root, b, fp, held):
            if held.isEmpty {
                return "store \(root) holds no adapters for base '\(b)' (fingerprint \(fp)) yet; publish some first (personalize, adapters import-peft), or check --store and --model"
            }
            return "store \(root) holds no adapters for base '\(b)' (fingerprint \(fp)); it holds: \(held.map(\.description).joined(separator: "; ")). Pass --base FOLDER to use one of them (its fingerprint must match the model), or give the --model or --store they were made for"
        case let .noBaseFolder(root, folder, held, same):
            let lead = "store \(root) has no base folder '\(folder)' (--base \(folder))"
            if let same {
                return "\(lead), and its folder '\(same)' holds adapters for this model's weights: pass --base \(same) (or omit --base). Nothing was created: a mistyped --base is not turned into a second, empty set of adapters for the same weights (to keep one apart, use another --store)"
            }
            if held.isEmpty { return "\(lead) and holds no base folders yet; omit --base, or run a command that publishes (personalize, adapters import-peft) to create it" }
            return "\(lead); it holds: \(held.map(\.description).joined(separator: "; ")). Pass one of those folders as --base, or give the --store made for this model"
        case let .baseElsewhere(root, wanted, folder, fp):
            return "store \(root) has no folder '\(wanted)' for this model, but its folder '\(folder)' holds adapters for the same weights (fingerprint \(fp)): the model folder's name differs from the one the store was made with. Pass --base \(folder) to use them"
        case let .baseFolderGiven(root, held, suggestion, b, fp):
            let what = held.map { "its manifest is for base '\($0.baseModel)', fingerprint \($0.fingerprint)" } ?? "it has shared/ or clients/ but no manifest"
            let lead = "\(root) is the folder of one base model inside an adapter store (\(what)), not a store: --store names the folder that holds such base folders"
            if let h = held, h.fingerprint != fp {
                return "\(lead); and it holds adapters for other weights than this model's ('\(b)', fingerprint \(fp)): give the --model they were made for, or another --store"
            }
            return "\(lead). Pass \(suggestion)"
        case let .readOnly(store, why):
            return "store \(store) is read-only (\(why)); it is served without writes — personalize, train_local and imports need a writable store"
        case let .invalidClientID(id, why):
            return "invalid client id '\(id)': \(why); \(ClientID.rule)"
        case let .noAdapter(what, store):
            return "store \(store) has no \(what); publish or import one first (`pf2lora adapters list --store …` shows what is there)"
        case let .noVersion(what, v, available):
            return "\(what) has no version \(v) on disk (old versions are pruned after each publish); versions on disk: \(available.isEmpty ? "none" : available.map(String.init).joined(separator: ", "))"
        case let .symlink(path, target, outside):
            return outside
                ? "\(path) is a symlink to \(target), outside the store; the store never follows links out of itself — remove the link"
                : "\(path) is a symlink (to \(target)); the store does not follow symlinks — replace it with the real file or folder"
        case let .notRegularFile(path):
            return "\(path) is not a regular file; remove it from the store"
        case let .io(path, why):
            return "\(path): \(why); check the store folder exists, is writable and the disk has room"
        case let .baseMismatch(store, sb, sf, b, bf):
            return "store \(store) holds adapters for base '\(sb)' (fingerprint \(sf)), not for '\(b)' (fingerprint \(bf)); use another --store or the matching model"
        case let .wrongLevel(expected, got):
            return "a \(got.rawValue) adapter cannot be published as the \(expected.rawValue) level"
        case let .unknownSharedVersion(client, v, latest):
            return "client '\(client)' says it was trained against shared version \(v), but the store's newest shared version is \(latest.map(String.init) ?? "none"); publish the shared adapter first"
        case let .badVersionLimit(n):
            return "keep-versions must be at least 1 (got \(n))"
        case let .conflict(what, expected, current):
            let from = expected.map { "version \($0)" } ?? "no version"
            let now = current.map { "version \($0)" } ?? "no version"
            return "\(what) changed while this run worked: it started from \(from), and another writer has since made \(now) current; nothing was published (a publish never silently replaces a version it did not start from) — retry to start from \(now)"
        }
    }
}

/// A base folder of a store root, as its manifest describes it (for messages about which bases a store holds).
public struct HeldBase: Equatable, Sendable, CustomStringConvertible {
    public let folder: String
    public let baseModel: String
    public let fingerprint: String
    public var description: String { "\(folder)/ (base '\(baseModel)', fingerprint \(fingerprint))" }
}

/// How a store is opened.
public enum StoreAccess: Equatable, Sendable {
    /// Read only: nothing in the store is created, renamed, deleted or written (files that fail
    /// validation are skipped in memory, the manifest is reconciled in memory); publishing throws
    /// `readOnly`. For commands that only read (generate, adapters inspect/export-peft, rank).
    case read
    /// Read and publish. A store that cannot be written (read-only file system, no permission) is
    /// opened read-only instead, `readOnlyReason` says why, and publishing throws `readOnly`.
    case write
}

/// What a publish requires the adapter's current version to be: a compare-and-swap on the version
/// a training run started from, so two writers never silently supersede each other.
public enum ExpectedVersion: Equatable, Sendable {
    /// No check: publish whatever is current.
    case any
    /// The adapter has no current version (a new client, or no shared version yet).
    case absent
    /// The current version is exactly this one.
    case version(Int)

    /// `.version(v)`, or `.absent` for nil: what a run that started from version `v` expects.
    public init(startedFrom v: Int?) { self = v.map { .version($0) } ?? .absent }

    func allows(_ current: Int?) -> Bool {
        switch self {
        case .any: return true
        case .absent: return current == nil
        case let .version(v): return current == v
        }
    }

    var version: Int? { if case let .version(v) = self { return v }; return nil }
}

/// An adapter with the store version it was loaded from.
public struct VersionedAdapter {
    public let version: Int
    public let adapter: LoRAAdapter
}

/// What `reconcile` found and fixed.
public struct ReconcileReport: Equatable, Sendable {
    /// Stray `.tmp-*` files removed (writes a crash interrupted).
    public var removedTempFiles: [String] = []
    /// Version files that failed validation, renamed aside to `.corrupt-<name>`.
    public var quarantined: [String] = []
    /// Version files that failed validation in a store opened read-only: skipped, not renamed.
    public var skipped: [String] = []
    /// Why each quarantined or skipped file failed: the check and what it found (no file content).
    public var reasons: [String: String] = [:]
    /// Adapters whose current version changed: "shared 3 -> 4", "client alice 2 -> none".
    public var repointed: [String] = []
    /// Things skipped because following them would leave the store (symlinks).
    public var ignored: [String] = []
    /// Whether the manifest was rewritten.
    public var manifestRewritten = false
}

/// The manifest: for the shared level and each client, the current version, the versions present,
/// the highest version ever given out (never reused) and, for clients, the shared version each
/// client version was trained against. Written atomically after every publish.
struct Manifest: Codable, Equatable {
    struct Entry: Codable, Equatable {
        var current: Int?
        var last: Int
        var versions: [Int]
        var trainedOn: [String: Int]?

        enum CodingKeys: String, CodingKey { case current, last, versions, trainedOn = "trained_on" }
    }

    var formatVersion = 1
    var baseModel: String
    var baseFingerprint: String
    var shared: Entry?
    var clients: [String: Entry] = [:]
    var updatedAt: String = ""

    enum CodingKeys: String, CodingKey {
        case formatVersion = "format_version", baseModel = "base_model", baseFingerprint = "base_fingerprint"
        case shared, clients, updatedAt = "updated_at"
    }

    func entry(_ level: AdapterLevel, _ id: String?) -> Entry? { level == .shared ? shared : clients[id ?? ""] }

    mutating func setEntry(_ level: AdapterLevel, _ id: String?, _ e: Entry?) {
        if level == .shared { shared = e } else { clients[id ?? ""] = e }
    }

    func encoded() -> Data {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        return (try? enc.encode(self)) ?? Data()
    }
}

/// The versioned, crash-safe store of one base model's adapters (DESIGN §4):
///
///     <root>/<base name>/
///       shared/v000012.safetensors.zst
///       clients/<client id>/v000003.safetensors.zst
///       manifest.json
///       .lock
///
/// Every file is written with `AtomicFile` (temp file, fsync, rename, fsync folder) and then the
/// manifest is rewritten the same way, all under an exclusive `flock` on `.lock`, so two processes
/// publishing to one store never interleave. `open` reconciles the manifest with the files (see
/// docs/ADAPTER_STORE.md). Reads go through an LRU cache of decoded adapters; all methods are
/// thread-safe.
public final class AdapterStore: @unchecked Sendable {
    /// This base's folder (`<root>/<base name>`), resolved with realpath.
    public let directory: String
    public let base: BaseModelInfo
    /// How many versions of each adapter to keep (the current one included).
    public let keepVersions: Int
    /// The largest decompressed adapter accepted.
    public let sizeLimit: Int
    public let cache: AdapterCache
    /// What the reconcile at `open` did.
    public private(set) var lastReconcile = ReconcileReport()
    /// Why the store is read-only (opened `.read`, or a `.write` open found it unwritable); nil when
    /// it can be published to.
    public let readOnlyReason: String?
    /// Folders this handle created (the root or the base folder), for the caller to report.
    public var createdFolders: [String] { state.lock(); defer { state.unlock() }; return created }
    private var created: [String] = []
    /// Whether the base folder exists (a store opened without `create` makes it at its first publish).
    private var baseExists: Bool

    private let state = NSLock()
    private var manifest: Manifest
    private var manifestStamp: [Int] = []

    /// The folder name used for `base` under a store root: its name when that is a safe name,
    /// else `fp-<fingerprint>`.
    public static func folderName(for base: BaseModelInfo) -> String {
        ClientID.isValid(base.name) ? base.name : "fp-" + base.fingerprint.filter { $0.isHexDigit }
    }

    /// Opens the store for `base` under `root` and reconciles it.
    /// - Parameters:
    ///   - folder: the base folder's name (`--base`); default `folderName(for: base)`.
    ///   - access: `.read` creates and changes nothing; `.write` may publish (and repairs what a crash
    ///     left at open, under the store's lock).
    ///   - create: create a missing root and base folder now (commands that publish). Without it a
    ///     missing root is `noStore`, a root that holds only other bases is `noBase`, and an empty
    ///     root gets its base folder at the first publish. A root whose other folder holds the same
    ///     weights under another name is `baseElsewhere` unless `folder` is given.
    ///   - keepVersions: versions kept per adapter after a publish (default 3).
    ///   - cacheBytes: the byte budget of the decoded-adapter cache (default 256 MiB).
    public static func open(root: String, base: BaseModelInfo, folder: String? = nil, access: StoreAccess = .write, create: Bool = true,
                            keepVersions: Int = 3, cacheBytes: Int = 256 << 20,
                            sizeLimit: Int = LoRAAdapter.defaultSizeLimit) throws -> AdapterStore {
        try AdapterStore(root: root, base: base, folder: folder, access: access, create: create, keepVersions: keepVersions,
                         cacheBytes: cacheBytes, sizeLimit: sizeLimit)
    }

    /// The base folders under a store root that hold a readable manifest, sorted by folder.
    public static func heldBases(root: String) -> [HeldBase] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        return names.sorted().compactMap { n in
            guard !n.hasPrefix("."), let d = FileManager.default.contents(atPath: root + "/" + n + "/manifest.json"),
                  let m = try? JSONDecoder().decode(Manifest.self, from: d) else { return nil }
            return HeldBase(folder: n, baseModel: m.baseModel, fingerprint: m.baseFingerprint)
        }
    }

    /// Whether `path` (which need not exist yet) is `root` or lies inside it, links resolved: the
    /// deepest existing ancestor of `path` is resolved and the rest appended. For outputs a command
    /// writes (`adapters export-peft --out`), which must not land among a store's own files.
    public static func isInside(_ path: String, root: String) -> Bool {
        func resolved(_ p: String) -> String? {
            guard let r = realpath(p, nil) else { return nil }
            defer { free(r) }
            return String(cString: r)
        }
        guard let r = resolved(root) else { return false }
        var head = (path as NSString).standardizingPath, tail: [String] = []
        if !head.hasPrefix("/") { head = FileManager.default.currentDirectoryPath + "/" + head }
        while resolved(head) == nil, head != "/" {
            tail.insert((head as NSString).lastPathComponent, at: 0)
            head = (head as NSString).deletingLastPathComponent
        }
        guard let h = resolved(head) else { return false }
        let full = ([h] + tail).joined(separator: "/")
        return full == r || full.hasPrefix(r.hasSuffix("/") ? r : r + "/")
    }

    /// Whether `root` is itself a base folder of some store (nil: it is not). A base folder has a
    /// manifest, or, when the manifest was lost, a `shared/` or `clients/` folder; the inner
    /// `HeldBase` is nil when there is no readable manifest.
    static func baseFolderItself(_ root: String) -> HeldBase?? {
        if let d = FileManager.default.contents(atPath: root + "/manifest.json"),
           let m = try? JSONDecoder().decode(Manifest.self, from: d) {
            return .some(HeldBase(folder: (root as NSString).lastPathComponent, baseModel: m.baseModel, fingerprint: m.baseFingerprint))
        }
        // (A base folder named `shared` or `clients`, from a model folder of that name, has its own manifest.)
        for level in ["shared", "clients"] where isDirectory(root + "/" + level)
            && !FileManager.default.fileExists(atPath: root + "/" + level + "/manifest.json") { return .some(nil) }
        return nil
    }

    private static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    private init(root: String, base: BaseModelInfo, folder: String?, access: StoreAccess, create: Bool, keepVersions: Int,
                 cacheBytes: Int, sizeLimit: Int) throws {
        guard keepVersions >= 1 else { throw AdapterStoreError.badVersionLimit(keepVersions) }
        let name = folder ?? Self.folderName(for: base)
        guard ClientID.isValid(name) || name.hasPrefix("fp-") && !name.contains("/") && name != "fp-" else {
            throw AdapterStoreError.io(path: root + "/" + name, why: "'\(name)' is not a usable base folder name (\(ClientID.rule))")
        }
        var made: [String] = []
        if !Self.isDirectory(root) {
            guard create, access == .write else { throw AdapterStoreError.noStore(root: root) }
            do { try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true) } catch {
                throw AdapterStoreError.io(path: root, why: "cannot create the store folder (\(error.localizedDescription))")
            }
            made.append(root)
        }
        let dir = root + "/" + name
        var exists = Self.isDirectory(dir)
        if !exists, let given = Self.baseFolderItself(root) {
            // `--store adapters/debian-llama` for `--store adapters`: without this check the
            // folder was read as an empty store and the base model was served with no adapters
            // (or, for a publishing command, a base folder was made inside the base folder).
            let r = (root as NSString).standardizingPath
            let parent = (r as NSString).deletingLastPathComponent
            let last = (r as NSString).lastPathComponent
            var suggestion = "--store \(parent.isEmpty ? "." : parent)"
            if last != name && folder == nil { suggestion += " --base \(last)" }
            throw AdapterStoreError.baseFolderGiven(root: root, held: given, suggestion: suggestion, base: base.name, fingerprint: base.fingerprint)
        }
        if !exists {
            let held = Self.heldBases(root: root)
            let same = held.first(where: { $0.fingerprint == base.fingerprint })
            if folder == nil, let same {
                throw AdapterStoreError.baseElsewhere(root: root, wanted: name, folder: same.folder, fingerprint: base.fingerprint)
            }
            // An explicit `--base` that names no folder: a typo unless the store holds nothing for
            // these weights yet. `personalize --base debian-lama` made a second, empty base folder
            // beside debian-llama/ and trained on no shared pair; `generate`/`serve` said the
            // store "holds no adapters for base 'debian-llama'" while listing debian-llama/.
            if folder != nil, same != nil || access == .read || (!create && !held.isEmpty) {
                throw AdapterStoreError.noBaseFolder(root: root, folder: name, held: held, sameWeights: same?.folder)
            }
            if access == .read || (!create && !held.isEmpty) {
                throw AdapterStoreError.noBase(root: root, base: base.name, fingerprint: base.fingerprint, held: held)
            }
            if create {
                if mkdir(dir, 0o755) != 0 && errno != EEXIST {
                    throw AdapterStoreError.io(path: dir, why: "cannot create the store folder (\(String(cString: strerror(errno))))")
                }
                made.append(dir)
                exists = true
            }
        }
        // The base folder itself may be a link the operator made (onto another disk, say): it is
        // resolved once here. Nothing inside it is followed. A base folder that does not exist yet
        // lies in the resolved root.
        let resolved = exists ? dir : root
        guard let real = realpath(resolved, nil) else { throw AdapterStoreError.io(path: resolved, why: String(cString: strerror(errno))) }
        directory = exists ? String(cString: real) : String(cString: real) + "/" + name
        free(real)
        baseExists = exists
        created = made
        self.base = base
        self.keepVersions = keepVersions
        self.sizeLimit = sizeLimit
        cache = AdapterCache(capacityBytes: cacheBytes)
        manifest = Manifest(baseModel: base.name, baseFingerprint: base.fingerprint)
        readOnlyReason = access == .read ? "opened read-only" : Self.unwritable(exists ? directory : String(directory.dropLast(name.count + 1)))
        guard exists else { return }
        func load() throws {
            if let (m, stamp) = try readManifestFromDisk() {
                guard m.baseFingerprint == base.fingerprint else {
                    throw AdapterStoreError.baseMismatch(store: directory, storeBase: m.baseModel, storeFingerprint: m.baseFingerprint,
                                                         base: base.name, baseFingerprint: base.fingerprint)
                }
                manifest = m
                manifestStamp = stamp
            }
        }
        if readOnlyReason == nil {
            try withFileLock {
                try load()
                lastReconcile = try reconcileLocked(write: true)
            }
        } else {
            try load()
            lastReconcile = try reconcileLocked(write: false)
        }
    }

    /// Why a folder of the store cannot be written (nil when it can): a read-only file system or no
    /// permission to create files in it, or an existing lock file that cannot be opened for writing.
    private static func unwritable(_ dir: String) -> String? {
        if access(dir, W_OK) != 0 {
            let e = errno
            return e == EROFS ? "read-only file system" : "no permission to write \(dir) (\(String(cString: strerror(e))))"
        }
        let lock = dir + "/.lock"
        if FileManager.default.fileExists(atPath: lock) {
            let fd = Glibc.open(lock, O_RDWR | O_NOFOLLOW | O_CLOEXEC)
            if fd < 0 {
                let e = errno
                if e == EROFS || e == EACCES || e == EPERM { return "its lock file \(lock) cannot be opened for writing (\(String(cString: strerror(e))))" }
            } else {
                close(fd)
            }
        }
        return nil
    }

    // MARK: Reading

    /// The current version of the shared level, or of client `id`, per the manifest as last read.
    public func currentVersion(level: AdapterLevel, client id: String? = nil) -> Int? {
        state.lock(); defer { state.unlock() }
        return manifest.entry(level, id)?.current
    }

    /// The clients that have a current version, sorted.
    public func clients() -> [String] {
        state.lock(); defer { state.unlock() }
        return manifest.clients.filter { $0.value.current != nil }.keys.sorted()
    }

    /// The versions of an adapter present in the manifest, oldest first.
    public func versions(level: AdapterLevel, client id: String? = nil) -> [Int] {
        state.lock(); defer { state.unlock() }
        return manifest.entry(level, id)?.versions ?? []
    }

    /// The shared version client `id`'s `version` was trained against, if recorded.
    public func trainedOn(client id: String, version: Int) -> Int? {
        state.lock(); defer { state.unlock() }
        return manifest.clients[id]?.trainedOn?[String(version)]
    }

    /// The current shared adapter, or nil if none was published.
    public func latestShared() throws -> VersionedAdapter? {
        try latest(.shared, nil)
    }

    /// Client `id`'s current adapter, or nil if it has none (it is then served with the shared one alone).
    public func latestClient(_ id: String) throws -> VersionedAdapter? {
        try ClientID.validate(id)
        return try latest(.client, id)
    }

    private func latest(_ level: AdapterLevel, _ id: String?) throws -> VersionedAdapter? {
        try loadCurrent(level: level, client: id) { try load(level: level, client: id, version: $0) }
            .map { VersionedAdapter(version: $0.version, adapter: $0.value) }
    }

    /// The current version of `level` (client `id`) and what `load` makes of it, as one consistent
    /// step: if the version the manifest named was pruned by another process's publish before its
    /// file was read (`load` throws `noVersion`), the manifest is read again — forced: its stamp can
    /// repeat when an inode is reused within one timestamp tick — and the new current version is
    /// loaded, up to `attempts` times. nil when the adapter has no current version.
    public func loadCurrent<T>(level: AdapterLevel, client id: String? = nil, attempts: Int = 16,
                               _ load: (Int) throws -> T) throws -> (version: Int, value: T)? {
        let cid = try checkedClient(level, id)
        var tried: [Int] = []
        for attempt in 0..<attempts {
            if attempt > 0 { try refresh(force: true) }
            guard let v = currentVersion(level: level, client: cid) else { return nil }
            do { return (v, try load(v)) } catch AdapterStoreError.noVersion { tried.append(v) }
        }
        throw AdapterStoreError.noVersion(what: what(level, cid), version: tried.last ?? 0, available: (try? listVersions(Array(components(level, cid, 0).dropLast()))) ?? [])
    }

    /// A specific version, from the cache or from disk (read, decompress, validate, then cached).
    public func load(level: AdapterLevel, client id: String? = nil, version: Int) throws -> LoRAAdapter {
        let cid = try checkedClient(level, id)
        let key = AdapterCache.Key(level: level, client: cid, version: version)
        if let a = cache.get(key) { return a }
        let a = try readAndValidate(level: level, client: cid, version: version)
        cache.put(key, a)
        return a
    }

    /// Reads and validates a version file, bypassing the cache (what a cold load costs).
    public func readAndValidate(level: AdapterLevel, client id: String? = nil, version: Int) throws -> LoRAAdapter {
        let cid = try checkedClient(level, id)
        let comps = components(level, cid, version)
        let bytes: AlignedBytes
        do { bytes = try readInStore(comps) } catch let e as AdapterStoreError {
            if case .io(_, let why) = e, why.contains("No such file") {
                // What is on disk now, not what the manifest last said: a message must not name the
                // missing version as available.
                let onDisk = (try? listVersions(Array(comps.dropLast()))) ?? []
                throw AdapterStoreError.noVersion(what: what(level, cid), version: version, available: onDisk)
            }
            throw e
        }
        let name = relative(comps)
        let a = try LoRAAdapter.decode(compressed: bytes.readOnly, name: name, base: base, expectedLevel: level, sizeLimit: sizeLimit)
        if level == .client, a.metadata.clientID != cid {
            throw AdapterError.badMetadata(file: name, key: "client_id", value: a.metadata.clientID ?? "",
                                           why: "but the file sits in client '\(cid ?? "")''s folder; it was copied into the wrong folder")
        }
        return a
    }

    /// The compressed and raw (decompressed) sizes of a version file, read from its frame header.
    public func fileSizes(level: AdapterLevel, client id: String? = nil, version: Int) throws -> (compressed: Int, raw: Int) {
        let cid = try checkedClient(level, id)
        let comps = components(level, cid, version)
        let bytes = try readInStore(comps)
        let raw = try Zstd.frameContentSize(bytes.readOnly, name: relative(comps))
        return (bytes.count, raw)
    }

    /// The path of a version file (it may not exist).
    public func path(level: AdapterLevel, client id: String? = nil, version: Int) throws -> String {
        let cid = try checkedClient(level, id)
        return directory + "/" + relative(components(level, cid, version))
    }

    /// Re-reads the manifest if it changed on disk (inode, size or mtime), as another process's
    /// publish does, or always with `force`. Cheap when nothing changed: one stat. Returns whether it re-read.
    @discardableResult public func refresh(force: Bool = false) throws -> Bool {
        var st = stat()
        guard stat(directory + "/manifest.json", &st) == 0 else { return false }
        let stamp = Self.stamp(st)
        state.lock()
        let same = stamp == manifestStamp
        state.unlock()
        if same && !force { return false }
        guard let (m, s) = try readManifestFromDisk(), m.baseFingerprint == base.fingerprint else { return false }
        state.lock()
        manifest = m
        manifestStamp = s
        state.unlock()
        return true
    }

    // MARK: Publishing

    /// Publishes a new shared version; returns its number. With `expecting`, only if the current
    /// shared version (read under the store's lock) is the one given, else `AdapterStoreError.conflict`
    /// and nothing is written.
    @discardableResult public func publishShared(_ adapter: LoRAAdapter, compressionLevel: Int = 3,
                                                 expecting: ExpectedVersion = .any) throws -> Int {
        guard adapter.level == .shared else { throw AdapterStoreError.wrongLevel(expected: .shared, got: adapter.level) }
        return try publish(adapter, level: .shared, id: nil, compressionLevel: compressionLevel, expecting: expecting)
    }

    /// Publishes a new version of client `id`'s pair; returns its number. The adapter's client id is
    /// set to `id`; a missing `sharedVersion` is taken to be the store's current shared version.
    /// With `expecting` (the version a training run started from), only if the client's current
    /// version is still that one, else `AdapterStoreError.conflict` and nothing is written.
    @discardableResult public func publishClient(id: String, _ adapter: LoRAAdapter, compressionLevel: Int = 3,
                                                 expecting: ExpectedVersion = .any) throws -> Int {
        try ClientID.validate(id)
        guard adapter.level == .client else { throw AdapterStoreError.wrongLevel(expected: .client, got: adapter.level) }
        return try publish(adapter, level: .client, id: id, compressionLevel: compressionLevel, expecting: expecting)
    }

    /// Throws `conflict` unless the current version of `level` (client `id`) on disk is what `expecting`
    /// allows: a cheap early check before a long run's writes (the publish checks again under the lock).
    public func checkExpected(_ expecting: ExpectedVersion, level: AdapterLevel, client id: String? = nil) throws {
        let cid = try checkedClient(level, id)
        try refresh(force: true)
        let cur = currentVersion(level: level, client: cid)
        guard expecting.allows(cur) else { throw AdapterStoreError.conflict(what: what(level, cid), expected: expecting.version, current: cur) }
    }

    private func publish(_ original: LoRAAdapter, level: AdapterLevel, id: String?, compressionLevel: Int,
                         expecting: ExpectedVersion) throws -> Int {
        if let why = readOnlyReason { throw AdapterStoreError.readOnly(store: directory, why: why) }
        try makeBaseFolder()
        return try withFileLock {
            // Another process may have published since we last looked.
            if let (m, s) = try readManifestFromDisk() {
                state.lock(); manifest = m; manifestStamp = s; state.unlock()
            }
            var adapter = original
            var m = snapshot()
            // Compare and swap: under the lock every writer holds, the current version is the one
            // the caller's run started from, or nothing is written.
            let current = m.entry(level, id)?.current
            guard expecting.allows(current) else {
                throw AdapterStoreError.conflict(what: what(level, id), expected: expecting.version, current: current)
            }
            if level == .client {
                adapter.metadata.clientID = id
                let latestShared = m.shared?.last
                if let sv = adapter.metadata.sharedVersion {
                    guard let l = latestShared, sv <= l else {
                        throw AdapterStoreError.unknownSharedVersion(client: id!, version: sv, latest: latestShared)
                    }
                } else {
                    adapter.metadata.sharedVersion = m.shared?.current
                }
            }
            // Encode, then decode exactly as a reader will: nothing invalid is ever published.
            let data = try adapter.encode(compressionLevel: compressionLevel)
            let comps0 = components(level, id, 0)
            let checked = try LoRAAdapter.decode(from: data, name: relative(comps0), base: base, expectedLevel: level, sizeLimit: sizeLimit)

            let dirComps = Array(comps0.dropLast())
            try makeDirectories(dirComps)
            let onDisk = try listVersions(dirComps)
            var entry = m.entry(level, id) ?? Manifest.Entry(current: nil, last: 0, versions: [], trainedOn: level == .client ? [:] : nil)
            let version = max(entry.last, onDisk.max() ?? 0) + 1
            let comps = components(level, id, version)
            try AtomicFile.write(data, to: directory + "/" + relative(comps))
            // From here the new file is whole on disk; a crash now is rolled forward by reconcile.

            var present = Set(onDisk).union(entry.versions).union([version])
            present = present.filter { $0 == version || onDisk.contains($0) }
            var pinned: Set<Int> = [version]
            if level == .shared {
                // Keep the shared versions current clients were trained against.
                for c in m.clients.values { if let cur = c.current, let s = c.trainedOn?[String(cur)] { pinned.insert(s) } }
            }
            let newest = present.sorted(by: >)
            let keep = Set(newest.prefix(keepVersions)).union(pinned.intersection(present))
            let prune = present.subtracting(keep)
            entry.current = version
            entry.last = version
            entry.versions = keep.sorted()
            if level == .client {
                var t = entry.trainedOn ?? [:]
                t[String(version)] = checked.metadata.sharedVersion
                entry.trainedOn = t.filter { keep.contains(Int($0.key) ?? -1) }
            }
            m.setEntry(level, id, entry)
            do { try writeManifest(m) } catch {
                // A publish that failed (disk full, I/O error) changes nothing: without this the new
                // file would become current at the next open, as a crash's publish is rolled forward.
                unlink(directory + "/" + relative(comps))
                throw error
            }
            // The manifest no longer names the pruned versions; deleting them now is safe, and a
            // crash before it only leaves files that the next publish prunes.
            for v in prune.sorted() {
                unlink(directory + "/" + relative(components(level, id, v)))
                cache.remove(AdapterCache.Key(level: level, client: id, version: v))
            }
            if !prune.isEmpty { AtomicFile.syncDirectory(directory + "/" + dirComps.joined(separator: "/")) }
            cache.put(AdapterCache.Key(level: level, client: id, version: version), checked)
            return version
        }
    }

    // MARK: Reconcile

    /// Brings the manifest in line with the files (done at `open`; call again after repairing a
    /// store by hand). Takes the store's lock; a read-only store is reconciled in memory only.
    @discardableResult public func reconcile() throws -> ReconcileReport {
        state.lock(); let exists = baseExists; state.unlock()
        guard exists || Self.isDirectory(directory) else { return ReconcileReport() }
        if readOnlyReason != nil { return try reconcileLocked(write: false) }
        return try withFileLock { try reconcileLocked(write: true) }
    }

    /// Creates the base folder of a store opened before it existed (at its first publish).
    private func makeBaseFolder() throws {
        state.lock(); let exists = baseExists; state.unlock()
        guard !exists else { return }
        if mkdir(directory, 0o755) != 0 && errno != EEXIST {
            throw AdapterStoreError.io(path: directory, why: "cannot create the store folder (\(String(cString: strerror(errno))))")
        }
        state.lock(); baseExists = true; created.append(directory); state.unlock()
    }

    /// The rule: for each adapter, the current version is the newest version file that passes
    /// validation. Files that fail are renamed aside (`.corrupt-<name>`), stray `.tmp-*` files are
    /// deleted (no write is in progress: we hold the lock every writer holds), and the highest
    /// version number ever seen is kept so numbers are never reused.
    private func reconcileLocked(write: Bool) throws -> ReconcileReport {
        var report = ReconcileReport()
        var m = snapshot()
        let before = m
        if write { report.removedTempFiles += removeTempFiles([]) }
        // The shared level.
        if write { report.removedTempFiles += removeTempFiles(["shared"]) }
        m.shared = try reconcileEntry(.shared, nil, m.shared, write: write, &report)
        // Each client folder on disk, and each client the manifest names.
        var ids = Set(m.clients.keys)
        if let names = try? FileManager.default.contentsOfDirectory(atPath: directory + "/clients") {
            for n in names where ClientID.isValid(n) {
                var st = stat()
                if lstat(directory + "/clients/" + n, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR { ids.insert(n) }
            }
        }
        for id in ids.sorted() {
            guard ClientID.isValid(id) else { m.clients[id] = nil; continue }
            if write { report.removedTempFiles += removeTempFiles(["clients", id]) }
            m.clients[id] = try reconcileEntry(.client, id, m.clients[id], write: write, &report)
        }
        if !write {
            // Read-only: the reconciled manifest is kept in memory; nothing on disk changes.
            state.lock(); manifest = m; state.unlock()
        } else if m != before || !FileManager.default.fileExists(atPath: directory + "/manifest.json") {
            try writeManifest(m)
            report.manifestRewritten = true
        }
        return report
    }

    private func reconcileEntry(_ level: AdapterLevel, _ id: String?, _ old: Manifest.Entry?, write: Bool,
                                _ report: inout ReconcileReport) throws -> Manifest.Entry? {
        let dirComps = Array(components(level, id, 0).dropLast())
        let onDisk: [Int]
        do { onDisk = try listVersions(dirComps) } catch let e as AdapterStoreError {
            guard case .symlink = e else { throw e }
            // A linked folder is never followed: the adapter is treated as absent.
            report.ignored.append(e.description)
            if old?.current != nil { report.repointed.append("\(what(level, id)) \(old!.current!) -> none") }
            return old.map { Manifest.Entry(current: nil, last: $0.last, versions: [], trainedOn: $0.trainedOn == nil ? nil : [:]) }
        }
        var entry = old ?? Manifest.Entry(current: nil, last: 0, versions: [], trainedOn: level == .client ? [:] : nil)
        entry.last = max(entry.last, onDisk.max() ?? 0)
        var present = onDisk
        var current: Int?
        var trained: Int?
        for v in onDisk.sorted(by: >) {
            var failure: Error?
            do {
                let a = try readAndValidate(level: level, client: id, version: v)
                current = v
                trained = a.metadata.sharedVersion
                break
            } catch let e as AdapterError {
                failure = e
            } catch let e as AdapterStoreError {
                switch e { case .symlink, .notRegularFile: failure = e; default: throw e }
            }
            if let failure {
                // Which check failed goes with the file (the messages never quote its content).
                let comps = components(level, id, v)
                report.reasons[relative(comps)] = "\(failure)"
                if write {
                    let from = directory + "/" + relative(comps)
                    let to = directory + "/" + (dirComps + [".corrupt-" + comps.last!]).joined(separator: "/")
                    if rename(from, to) == 0 { report.quarantined.append(relative(comps)) } else { report.skipped.append(relative(comps)) }
                } else {
                    report.skipped.append(relative(comps))
                }
                present.removeAll { $0 == v }
            }
        }
        if old?.current != current {
            report.repointed.append("\(what(level, id)) \(old?.current.map(String.init) ?? "none") -> \(current.map(String.init) ?? "none")")
        }
        entry.current = current
        entry.versions = present.sorted()
        if level == .client {
            var t = (entry.trainedOn ?? [:]).filter { present.contains(Int($0.key) ?? -1) }
            if let c = current, t[String(c)] == nil, let s = trained { t[String(c)] = s }
            entry.trainedOn = t
        }
        if old == nil && onDisk.isEmpty { return nil }
        return entry
    }

    // MARK: Files

    private func snapshot() -> Manifest {
        state.lock(); defer { state.unlock() }
        return manifest
    }

    private func writeManifest(_ m: Manifest) throws {
        var m = m
        m.updatedAt = AdapterMetadata.now()
        let path = directory + "/manifest.json"
        do { try AtomicFile.write(m.encoded(), to: path) } catch { throw AdapterStoreError.io(path: path, why: "\(error)") }
        var st = stat()
        let stamp = stat(path, &st) == 0 ? Self.stamp(st) : []
        state.lock(); manifest = m; manifestStamp = stamp; state.unlock()
    }

    private func readManifestFromDisk() throws -> (Manifest, [Int])? {
        guard let bytes = try? readInStore(["manifest.json"]) else { return nil }
        let data = Data(bytes: bytes.pointer, count: bytes.count)
        // A manifest we cannot parse is rebuilt from the files by reconcile.
        guard let m = try? JSONDecoder().decode(Manifest.self, from: data) else { return nil }
        var st = stat()
        let stamp = stat(directory + "/manifest.json", &st) == 0 ? Self.stamp(st) : []
        return (m, stamp)
    }

    private static func stamp(_ st: stat) -> [Int] {
        [Int(st.st_dev), Int(st.st_ino), Int(st.st_size), Int(st.st_mtim.tv_sec), Int(st.st_mtim.tv_nsec)]
    }

    private func checkedClient(_ level: AdapterLevel, _ id: String?) throws -> String? {
        guard level == .client else { return nil }
        guard let id else { throw AdapterStoreError.invalidClientID(id: "", why: "no client id was given") }
        try ClientID.validate(id)
        return id
    }

    private func what(_ level: AdapterLevel, _ id: String?) -> String {
        level == .shared ? "shared adapter" : "client '\(id ?? "")'"
    }

    /// Path components of a version file, relative to `directory`; ids must be validated already.
    private func components(_ level: AdapterLevel, _ id: String?, _ version: Int) -> [String] {
        let file = String(format: "v%06d.safetensors.zst", version)
        return level == .shared ? ["shared", file] : ["clients", id ?? "", file]
    }

    private func relative(_ comps: [String]) -> String { comps.joined(separator: "/") }

    /// Opens `comps` under `directory` one component at a time with O_NOFOLLOW, so no symlink
    /// anywhere inside the store is followed, whatever happens to the folders meanwhile.
    private func openInStore(_ comps: [String], flags: Int32) throws -> Int32 {
        var fd = Glibc.open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw AdapterStoreError.io(path: directory, why: String(cString: strerror(errno))) }
        for (i, c) in comps.enumerated() {
            let last = i == comps.count - 1
            let next = openat(fd, c, (last ? flags : O_RDONLY | O_DIRECTORY) | O_NOFOLLOW | O_CLOEXEC)
            let err = errno
            close(fd)
            guard next >= 0 else {
                let path = directory + "/" + comps[...i].joined(separator: "/")
                if err == ELOOP || (err == ENOTDIR && isSymlink(path)) { throw symlinkError(path) }
                throw AdapterStoreError.io(path: path, why: String(cString: strerror(err)))
            }
            fd = next
        }
        return fd
    }

    private func isSymlink(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFLNK
    }

    private func symlinkError(_ path: String) -> AdapterStoreError {
        guard let r = realpath(path, nil) else {
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = buf.withUnsafeMutableBufferPointer { readlink(path, $0.baseAddress!, $0.count - 1) }
            return .symlink(path: path, target: n > 0 ? String(decoding: buf[..<n], as: UTF8.self) : "?", outside: true)
        }
        let target = String(cString: r)
        free(r)
        return .symlink(path: path, target: target, outside: !(target == directory || target.hasPrefix(directory + "/")))
    }

    /// Reads a whole regular file inside the store.
    private func readInStore(_ comps: [String]) throws -> AlignedBytes {
        let fd = try openInStore(comps, flags: O_RDONLY)
        defer { close(fd) }
        let path = directory + "/" + relative(comps)
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw AdapterStoreError.io(path: path, why: String(cString: strerror(errno))) }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw AdapterStoreError.notRegularFile(path: path) }
        let size = Int(st.st_size)
        guard size <= sizeLimit else { throw AdapterError.fileTooLarge(file: relative(comps), size: size, limit: sizeLimit) }
        let bytes = AlignedBytes(count: size)
        var done = 0
        while done < size {
            let n = read(fd, bytes.pointer + done, size - done)
            if n < 0 { if errno == EINTR { continue }; throw AdapterStoreError.io(path: path, why: String(cString: strerror(errno))) }
            if n == 0 { break }
            done += n
        }
        return done == size ? bytes : {
            let b = AlignedBytes(count: done)
            b.pointer.copyMemory(from: bytes.pointer, byteCount: done)
            return b
        }()
    }

    /// Creates the folders `comps` under `directory` if missing, refusing symlinks on the way.
    private func makeDirectories(_ comps: [String]) throws {
        for i in comps.indices {
            let sub = Array(comps[...i])
            let path = directory + "/" + relative(sub)
            if mkdir(path, 0o755) != 0 && errno != EEXIST {
                throw AdapterStoreError.io(path: path, why: String(cString: strerror(errno)))
            }
            let fd = try openInStore(sub, flags: O_RDONLY | O_DIRECTORY)
            close(fd)
        }
    }

    /// The version numbers of the files `vNNNNNN.safetensors.zst` in folder `comps` (empty if it is missing).
    private func listVersions(_ comps: [String]) throws -> [Int] {
        let fd: Int32
        do { fd = try openInStore(comps, flags: O_RDONLY | O_DIRECTORY) } catch let e as AdapterStoreError {
            if case .io(_, let why) = e, why.contains("No such file") { return [] }
            throw e
        }
        close(fd)
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory + "/" + relative(comps))) ?? []
        return names.compactMap(Self.parseVersion).sorted()
    }

    static func parseVersion(_ name: String) -> Int? {
        guard name.hasPrefix("v"), name.hasSuffix(".safetensors.zst") else { return nil }
        let digits = name.dropFirst().dropLast(".safetensors.zst".count)
        guard digits.count >= 6, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let v = Int(digits), v >= 1 else { return nil }
        return v
    }

    /// Deletes `.tmp-*` files in folder `comps`; returns their store-relative names.
    private func removeTempFiles(_ comps: [String]) -> [String] {
        let dir = comps.isEmpty ? directory : directory + "/" + relative(comps)
        guard !isSymlink(dir), let names = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return [] }
        var removed: [String] = []
        for n in names where n.hasPrefix(".tmp-") {
            if unlink(dir + "/" + n) == 0 { removed.append(relative(comps + [n])) }
        }
        return removed
    }

    /// Runs `body` holding an exclusive flock on `<directory>/.lock` (shared by every process that
    /// writes this store) and, inside this process, a mutex.
    private let writeMutex = NSLock()
    private func withFileLock<T>(_ body: () throws -> T) throws -> T {
        writeMutex.lock(); defer { writeMutex.unlock() }
        let path = directory + "/.lock"
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            if errno == ELOOP { throw symlinkError(path) }
            throw AdapterStoreError.io(path: path, why: "cannot open the lock file: \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        while flock(fd, LOCK_EX) != 0 {
            if errno != EINTR { throw AdapterStoreError.io(path: path, why: "cannot lock: \(String(cString: strerror(errno)))") }
        }
        defer { flock(fd, LOCK_UN) }
        return try body()
    }
}
