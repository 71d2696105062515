import Foundation

/// What the adapter store needs to know about the frozen base model: its name, its fingerprint and
/// the shape of every linear layer an adapter may target. `load(folder:)` builds it from a model
/// folder through the model registry (config.json of any supported family) and the weights' headers.
public struct BaseModelInfo: Sendable {
    /// A short name, used as the store's folder name when it is a safe name (see `ClientID`).
    public var name: String
    /// `baseFingerprint(ofSafetensorsAt:)` of the weights file.
    public var fingerprint: String
    /// Module path (Hugging Face naming: `transformer.h.0.attn.c_attn`, `model.layers.0.self_attn.q_proj`) -> (d_in, d_out).
    public var linears: [String: (inFeatures: Int, outFeatures: Int)]
    /// The base's architecture, when known (nil for a base described only by its linears).
    public var architecture: ModelArchitecture?

    public init(name: String, fingerprint: String, linears: [String: (inFeatures: Int, outFeatures: Int)]) {
        self.name = name
        self.fingerprint = fingerprint
        self.linears = linears
        self.architecture = nil
    }

    public init(name: String, fingerprint: String, architecture: ModelArchitecture) {
        self.name = name
        self.fingerprint = fingerprint
        self.linears = architecture.linears
        self.architecture = architecture
    }

    /// The base of a model folder: its architecture from config.json (any family the registry
    /// knows), every slot of every layer as an adaptable linear, and the weights' fingerprint.
    public static func load(folder: String) throws -> BaseModelInfo {
        let a = try ModelRegistry.architecture(folder: folder)
        let name = URL(fileURLWithPath: folder).standardizedFileURL.lastPathComponent
        return BaseModelInfo(name: name, fingerprint: try Checkpoint.fingerprint(folder: folder), architecture: a)
    }

    @available(*, deprecated, renamed: "load(folder:)", message: "reads any supported family now")
    public static func gpt2(folder: String) throws -> BaseModelInfo { try load(folder: folder) }

    /// An example module path of this base and how its linears are named, for error messages.
    var namingHint: String {
        guard let a = architecture else { return "" }
        return "; a \(a.modelType) base names its linear layers like \(a.modulePath(layer: 0, slot: 0)) (\(a.slots.map(\.peftName).joined(separator: ", ")))"
    }
}

/// A stable 64-bit fingerprint of a safetensors weights file, as 16 hex digits: FNV-1a over the
/// 8-byte header length, the JSON header (tensor names, dtypes, shapes, offsets, metadata) and the
/// file size. It reads only the header, so it is instant even for large models.
///
/// It tells apart different checkpoints and layouts; it is NOT a cryptographic hash and does not
/// cover the weight values: two files with identical headers and sizes but different values (a
/// retrained model saved the same way) get the same fingerprint. Use it to catch mistakes, not attacks.
public func baseFingerprint(ofSafetensorsAt path: String) throws -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw IOError.cannotOpen(path, String(cString: strerror(errno))) }
    defer { close(fd) }
    var st = stat()
    guard fstat(fd, &st) == 0 else { throw IOError.cannotOpen(path, String(cString: strerror(errno))) }
    let size = Int(st.st_size)
    func readExactly(_ n: Int, at offset: Int) throws -> [UInt8] {
        var buf = [UInt8](repeating: 0, count: n)
        var done = 0
        while done < n {
            let r = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, n - done, off_t(offset + done)) }
            if r < 0 { if errno == EINTR { continue }; throw IOError.cannotOpen(path, String(cString: strerror(errno))) }
            if r == 0 { throw SafeTensorsError.tooSmall(file: path, size: size) }
            done += r
        }
        return buf
    }
    guard size >= 8 else { throw SafeTensorsError.tooSmall(file: path, size: size) }
    let lengthBytes = try readExactly(8, at: 0)
    let headerSize = lengthBytes.withUnsafeBytes { Int(UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) & 0x7fff_ffff_ffff_ffff) }
    guard headerSize <= size - 8, headerSize <= 100 << 20 else {
        throw SafeTensorsError.headerOutOfBounds(file: path, headerSize: headerSize, fileSize: size)
    }
    var h = FNV1a64()
    h.add(lengthBytes)
    h.add(try readExactly(headerSize, at: 8))
    var s = UInt64(size).littleEndian
    withUnsafeBytes(of: &s) { h.add(Array($0)) }
    return h.hex
}

/// 64-bit FNV-1a.
struct FNV1a64 {
    private(set) var value: UInt64 = 0xcbf2_9ce4_8422_2325

    mutating func add(_ bytes: [UInt8]) {
        for b in bytes {
            value ^= UInt64(b)
            value = value &* 0x0000_0100_0000_01b3
        }
    }

    var hex: String {
        let s = String(value, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }
}
