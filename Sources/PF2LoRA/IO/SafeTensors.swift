import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Element types a safetensors file may hold; the runtime computes in f32 and converts on load.
public enum DType: String, Sendable {
    case f32 = "F32", f16 = "F16", bf16 = "BF16"

    public var size: Int { self == .f32 ? 4 : 2 }
}

/// Where one tensor sits in a safetensors file.
public struct TensorInfo: Sendable, Equatable {
    public let dtype: DType
    public let shape: [Int]
    /// Byte range relative to the start of the data section.
    public let begin: Int
    public let end: Int
    public var count: Int { shape.reduce(1, *) }
}

/// What can be wrong with a safetensors file. Each case names the file and says what to do. A message
/// never quotes the file's bytes (a file a caller names may be one they cannot read): tensor names
/// and dtypes read from the file appear only through `FileText` (a recognised name, else its length),
/// and numbers only as sizes the reader measured or dimensions of a parsed entry.
public enum SafeTensorsError: Error, CustomStringConvertible, Equatable {
    case tooSmall(file: String, size: Int)
    case headerOutOfBounds(file: String, headerSize: Int, fileSize: Int)
    case badHeader(file: String, why: String)
    case unknownDType(file: String, tensor: String, dtype: String)
    case badEntry(file: String, tensor: String, why: String)
    case dataOutOfBounds(file: String, tensor: String, end: Int, dataSize: Int)
    case missingTensor(file: String, tensor: String)

    public var description: String {
        switch self {
        case let .tooSmall(f, n):
            return "\(f): \(n) bytes is too small for a safetensors file (it needs an 8-byte header length); the file is truncated or not safetensors"
        case let .headerOutOfBounds(f, _, n):
            return "\(f): the 8-byte header length points past the end of the \(n)-byte file; the file is truncated, corrupt or not safetensors"
        case let .badHeader(f, why):
            return "\(f): the safetensors JSON header is invalid (\(why)); re-export the file"
        case let .unknownDType(f, t, d):
            return "\(f): tensor \(FileText.name(t)) has dtype \(FileText.dtype(d)); supported are F32, F16 and BF16 — convert the checkpoint"
        case let .badEntry(f, t, why):
            return "\(f): tensor \(FileText.name(t)) \(why)"
        case let .dataOutOfBounds(f, t, _, n):
            return "\(f): tensor \(FileText.name(t)) ends past the end of the \(n)-byte data section; the file is truncated or corrupt"
        case let .missingTensor(f, t):
            return "\(f) has no tensor '\(t)'"
        }
    }
}

/// How strings read from a file appear in error messages: never as the file's bytes, unless they
/// are a name the program itself knows (its own vocabulary of tensor names, metadata keys and
/// dtypes); anything else is described by its length. A caller who names a file they cannot read
/// learns from an error which check failed and the sizes involved, never what the file holds.
public enum FileText {
    /// Names this program writes or reads by name: the tensors of GPT-2 style weights and PEFT / pf2lora
    /// adapters (dotted paths of lowercase words and layer numbers from a fixed list), metadata keys.
    static let words: Set<String> = [
        "base_model", "model", "transformer", "h", "layers", "attn", "mlp", "c_attn", "c_proj", "c_fc", "ln_1", "ln_2", "ln_f",
        "wte", "wpe", "lm_head", "weight", "bias", "lora_A", "lora_B", "lora_C", "lora_D", "default", "self_attn", "q_proj", "k_proj",
        "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "norm", "input_layernorm", "post_attention_layernorm",
        "format", "format_version", "level", "rank", "alpha", "use_rslora", "target_modules", "dtype", "base_fingerprint",
        "created_at", "shared_version", "client_id", "__metadata__", "pt",
    ]
    static let dtypes: Set<String> = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]

    /// `'name'` when every dot-separated part is a known word or a layer number (at most 3 digits),
    /// else "(a name of N bytes)".
    public static func name(_ s: String) -> String {
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        let known = s.utf8.count <= 200 && !parts.isEmpty && parts.allSatisfy { p in
            words.contains(String(p)) || (!p.isEmpty && p.count <= 3 && p.allSatisfy { $0.isASCII && $0.isNumber })
        }
        return known ? "'\(s)'" : "(a name of \(s.utf8.count) bytes)"
    }

    /// Type names of the parts of Hugging Face files (tokenizer.json's models, normalizers,
    /// pre-tokenizers, post-processors and decoders, Split behaviors; config.json's model types and
    /// rope scaling types): a program's vocabulary, so an unsupported one can be named.
    static let kinds: Set<String> = [
        "BPE", "WordPiece", "WordLevel", "Unigram", "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents",
        "Replace", "Prepend", "Precompiled", "BertNormalizer", "Sequence", "ByteLevel", "Split", "Digits", "Whitespace",
        "WhitespaceSplit", "Metaspace", "BertPreTokenizer", "Punctuation", "CharDelimiterSplit", "UnicodeScripts",
        "TemplateProcessing", "RobertaProcessing", "BertProcessing", "BPEDecoder", "CTC", "ByteFallback", "Fuse",
        "Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous",
        "gpt2", "llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "phi", "phi3", "falcon",
        "gpt_neox", "gptj", "opt", "bloom", "mpt", "starcoder2", "olmo", "olmo2", "cohere", "deepseek_v2", "deepseek_v3",
        "qwen2_moe", "qwen3_moe", "stablelm", "granite", "t5", "bert", "roberta",
        "default", "linear", "dynamic", "yarn", "longrope", "llama3", "su", "mrope",
    ]

    /// A type name the program knows (`kinds`) as it is (in quotes if `quoted`), else "(a name of N bytes)".
    public static func kind(_ s: String, quoted: Bool = false) -> String {
        kinds.contains(s) ? (quoted ? "'\(s)'" : s) : "(a name of \(s.utf8.count) bytes)"
    }

    /// A file name read from a file (a shard in an index): as it is when it is a plain name of at
    /// most 96 bytes of `[A-Za-z0-9._-]`, else "(a file name of N bytes)".
    public static func fileName(_ s: String) -> String {
        let plain = !s.isEmpty && s.utf8.count <= 96 && s.unicodeScalars.allSatisfy { $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || $0 == "." || $0 == "_" || $0 == "-") }
        return plain ? s : "(a file name of \(s.utf8.count) bytes)"
    }

    /// A value read from a file, described without its content: "(a string of N bytes)".
    public static func value(_ s: String) -> String { "(a string of \(s.utf8.count) bytes)" }

    /// A key or identifier read from a file (a JSON key, a template variable, a regex class name):
    /// escaped (no control characters or quotes pass through) and cut to `limit` characters, with its
    /// length when cut. Keys name things; values never go through here.
    public static func key(_ s: String, limit: Int = 24) -> String {
        var out = ""
        var shown = 0
        for u in s.unicodeScalars {
            if shown == limit { return "'\(out)…' (\(s.utf8.count) bytes)" }
            if u.isASCII, u.value >= 0x20, u.value < 0x7F, u != "'", u != "\\" { out.unicodeScalars.append(u) } else { out += "\\u{\(String(u.value, radix: 16))}" }
            shown += 1
        }
        return "'\(out)'"
    }

    /// A safetensors dtype name when it is one, else "an unknown dtype (N bytes)".
    public static func dtype(_ s: String) -> String {
        dtypes.contains(s) ? s : "an unknown dtype (\(s.utf8.count) bytes)"
    }
}

/// A parsed, validated safetensors file over bytes it keeps alive (a memory map or an owned buffer).
///
/// Reading an aligned f32 tensor from a mapped file costs nothing: the tensor views the mapping.
/// f16 and bf16 tensors (and misaligned f32 ones) are converted into owned f32 memory.
/// Immutable once parsed (the bytes are only read), so it is shared between threads as it is.
public final class SafeTensorsFile: @unchecked Sendable {
    public let name: String
    public let metadata: [String: String]
    public let tensors: [String: TensorInfo]
    /// Tensor names in file order (by offset).
    public let names: [String]
    /// What keeps the bytes alive (views of the file hold it).
    let storage: AnyObject
    private let dataStart: UnsafeRawPointer?
    public let dataSize: Int

    /// Memory-maps and validates the file at `path`.
    public convenience init(path: String) throws {
        guard FileManager.default.fileExists(atPath: path) else {
            throw IOError.missing(path, "Expected a safetensors file there.")
        }
        let map = try MappedFile(path: path)
        try self.init(bytes: map.bytes, owner: map, name: path)
    }

    /// Parses bytes that `owner` keeps alive. `name` is used in error messages.
    public init(bytes: UnsafeRawBufferPointer, owner: AnyObject, name: String) throws {
        self.name = name
        self.storage = owner
        let size = bytes.count
        guard size >= 8, let base = bytes.baseAddress else { throw SafeTensorsError.tooSmall(file: name, size: size) }
        var n: UInt64 = 0
        withUnsafeMutableBytes(of: &n) { $0.copyMemory(from: UnsafeRawBufferPointer(start: base, count: 8)) }
        // Compare as UInt64: masking the top bit off would turn a corrupt huge length into a small one.
        let rawHeaderSize = UInt64(littleEndian: n)
        guard rawHeaderSize <= UInt64(size - 8) else {
            throw SafeTensorsError.headerOutOfBounds(file: name, headerSize: Int(clamping: rawHeaderSize), fileSize: size)
        }
        let headerSize = Int(rawHeaderSize)
        let headerData = Data(bytes: base + 8, count: headerSize)
        let json: Any
        do { json = try JSONSerialization.jsonObject(with: headerData) } catch {
            throw SafeTensorsError.badHeader(file: name, why: "not valid JSON")
        }
        guard let dict = json as? [String: Any] else {
            throw SafeTensorsError.badHeader(file: name, why: "not a JSON object")
        }
        dataStart = UnsafeRawPointer(base + 8 + headerSize)
        dataSize = size - 8 - headerSize
        var meta: [String: String] = [:]
        var infos: [String: TensorInfo] = [:]
        for (key, value) in dict {
            if key == "__metadata__" {
                guard let m = value as? [String: Any] else {
                    throw SafeTensorsError.badHeader(file: name, why: "__metadata__ is not an object")
                }
                for (k, v) in m {
                    guard let s = v as? String else {
                        throw SafeTensorsError.badHeader(file: name, why: "a __metadata__ value (of \(FileText.name(k))) is not a string")
                    }
                    meta[k] = s
                }
                continue
            }
            guard let entry = value as? [String: Any] else {
                throw SafeTensorsError.badEntry(file: name, tensor: key, why: "is not a JSON object")
            }
            guard let ds = entry["dtype"] as? String else {
                throw SafeTensorsError.badEntry(file: name, tensor: key, why: "has no dtype")
            }
            guard let dtype = DType(rawValue: ds) else {
                throw SafeTensorsError.unknownDType(file: name, tensor: key, dtype: ds)
            }
            guard let shapeAny = entry["shape"] as? [Any], let shape = Self.ints(shapeAny), shape.allSatisfy({ $0 >= 0 }) else {
                throw SafeTensorsError.badEntry(file: name, tensor: key, why: "has no valid shape (a list of non-negative integers)")
            }
            guard let offAny = entry["data_offsets"] as? [Any], let off = Self.ints(offAny), off.count == 2,
                  off[0] >= 0, off[1] >= off[0] else {
                throw SafeTensorsError.badEntry(file: name, tensor: key, why: "has invalid data_offsets (need [begin, end] with begin <= end)")
            }
            let (count, overflow) = shape.reduce((1, false)) { acc, d in
                let (p, o) = acc.0.multipliedReportingOverflow(by: d)
                return (p, acc.1 || o)
            }
            guard !overflow, count.multipliedReportingOverflow(by: dtype.size).overflow == false,
                  off[1] - off[0] == count * dtype.size else {
                throw SafeTensorsError.badEntry(file: name, tensor: key,
                    why: "has shape \(shape) of \(dtype.rawValue) but its data_offsets span \(off[1] - off[0]) bytes")
            }
            guard off[1] <= dataSize else {
                throw SafeTensorsError.dataOutOfBounds(file: name, tensor: key, end: off[1], dataSize: dataSize)
            }
            infos[key] = TensorInfo(dtype: dtype, shape: shape, begin: off[0], end: off[1])
        }
        metadata = meta
        tensors = infos
        names = infos.keys.sorted { (infos[$0]!.begin, $0) < (infos[$1]!.begin, $1) }
    }

    private static func ints(_ a: [Any]) -> [Int]? {
        var out: [Int] = []
        for v in a {
            guard let n = v as? NSNumber else { return nil }
            let d = n.doubleValue
            guard d == d.rounded(), abs(d) < 9.0e15 else { return nil }
            out.append(n.intValue)
        }
        return out
    }

    /// The tensor `name` as f32: a view of the file for aligned f32 data, else a converted copy.
    public func tensor(_ name: String) throws -> Tensor {
        guard let info = tensors[name] else { throw SafeTensorsError.missingTensor(file: self.name, tensor: name) }
        return tensor(info)
    }

    /// The first byte of the tensor described by `info`, as the file stores it (nil when empty).
    func rawBytes(_ info: TensorInfo) -> UnsafeRawPointer? {
        guard info.count > 0, let start = dataStart else { return nil }
        return start + info.begin
    }

    /// Drops this process's resident pages of the tensor's bytes (the whole pages inside them) when
    /// the file is memory-mapped: called once a tensor has been copied or converted at load, so the
    /// resident memory is what serving reads, not the checkpoint's size too. A later read of those
    /// bytes maps them in again, so this never changes a value.
    func releasePages(_ info: TensorInfo) {
        guard storage is MappedFile, let p = rawBytes(info) else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let lo = (Int(bitPattern: p) + page - 1) / page * page, hi = (Int(bitPattern: p) + info.end - info.begin) / page * page
        guard hi > lo, let start = UnsafeMutableRawPointer(bitPattern: lo) else { return }
        _ = madvise(start, hi - lo, Int32(MADV_DONTNEED))
    }

    /// The tensor described by `info` (from this file's `tensors`).
    public func tensor(_ info: TensorInfo) -> Tensor {
        let shape = info.shape
        guard info.count > 0, let start = dataStart else { return Tensor(zeros: shape) }
        let src = start + info.begin
        switch info.dtype {
        case .f32:
            if Int(bitPattern: src) % MemoryLayout<Float>.alignment == 0 {
                let p = UnsafeMutablePointer(mutating: src.assumingMemoryBound(to: Float.self))
                return Tensor(viewing: p, shape: shape, owner: storage)
            }
            let t = Tensor(zeros: shape)
            UnsafeMutableRawPointer(t.data).copyMemory(from: src, byteCount: info.count * 4)
            return t
        case .f16:
            let t = Tensor(zeros: shape)
            for i in 0..<info.count {
                let bits = src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)
                t.data[i] = Float(Float16(bitPattern: UInt16(littleEndian: bits)))
            }
            return t
        case .bf16:
            let t = Tensor(zeros: shape)
            for i in 0..<info.count {
                let bits = src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)
                t.data[i] = Float(bitPattern: UInt32(UInt16(littleEndian: bits)) << 16)
            }
            return t
        }
    }
}

/// Writes safetensors files exactly as the reference library lays them out: header keys sorted,
/// header padded with spaces to a multiple of 8 bytes, data in header order.
public enum SafeTensorsWriter {
    /// Serializes `tensors` (name -> tensor) with string `metadata`, storing values as `dtype`.
    public static func serialize(_ tensors: [String: Tensor], metadata: [String: String] = [:],
                                 dtype: DType = .f32) -> Data {
        let names = tensors.keys.sorted()
        var entries: [String] = []
        if !metadata.isEmpty {
            let m = metadata.keys.sorted().map { "\(JSONText.quoted($0)):\(JSONText.quoted(metadata[$0]!))" }
            entries.append("\"__metadata__\":{\(m.joined(separator: ","))}")
        }
        var offset = 0
        for name in names {
            let t = tensors[name]!
            let bytes = t.count * dtype.size
            let shape = t.shape.map(String.init).joined(separator: ",")
            entries.append("\(JSONText.quoted(name)):{\"dtype\":\"\(dtype.rawValue)\",\"shape\":[\(shape)],\"data_offsets\":[\(offset),\(offset + bytes)]}")
            offset += bytes
        }
        var header = Array("{\(entries.joined(separator: ","))}".utf8)
        while (header.count + 8) % 8 != 0 { header.append(0x20) }
        var out = Data(capacity: 8 + header.count + offset)
        var n = UInt64(header.count).littleEndian
        withUnsafeBytes(of: &n) { out.append(contentsOf: $0) }
        out.append(contentsOf: header)
        for name in names {
            let t = tensors[name]!
            switch dtype {
            case .f32:
                out.append(UnsafeBufferPointer(start: t.data, count: t.count))
            case .f16:
                var buf = [UInt16](repeating: 0, count: t.count)
                for i in 0..<t.count { buf[i] = Float16(t.data[i]).bitPattern.littleEndian }
                buf.withUnsafeBytes { out.append(contentsOf: $0) }
            case .bf16:
                var buf = [UInt16](repeating: 0, count: t.count)
                for i in 0..<t.count { buf[i] = bf16Bits(t.data[i]).littleEndian }
                buf.withUnsafeBytes { out.append(contentsOf: $0) }
            }
        }
        return out
    }

    /// Round-to-nearest-even conversion to bfloat16, as PyTorch does it.
    static func bf16Bits(_ x: Float) -> UInt16 {
        let b = x.bitPattern
        if x.isNaN { return 0x7fc0 }
        let rounding = UInt32(0x7fff) + ((b >> 16) & 1)
        return UInt16((b &+ rounding) >> 16)
    }
}
