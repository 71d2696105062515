import CZstd
import Foundation

/// What can be wrong with a zstd frame. Each case names the data and says what to do.
public enum ZstdError: Error, CustomStringConvertible, Equatable {
    /// The bytes do not start with the zstd magic number 28 B5 2F FD.
    case notZstd(name: String)
    /// The frame ends before its header or its last block does.
    case truncated(name: String, size: Int)
    /// The frame header does not record the decompressed size (we only read frames that do).
    case unknownContentSize(name: String)
    /// The frame claims a decompressed size above the caller's limit.
    case tooLarge(name: String, claimed: UInt64, limit: Int)
    /// Bytes follow the one frame we expect.
    case trailingBytes(name: String, count: Int)
    /// zstd refused the data (bad block, checksum mismatch, ...); `why` is zstd's own message.
    case corrupt(name: String, why: String)
    /// Compression itself failed (out of memory, bad level).
    case compressFailed(why: String)

    public var description: String {
        switch self {
        case let .notZstd(n):
            return "\(n): not a zstd frame (the first 4 bytes are not the zstd magic number 28 B5 2F FD); the file is not compressed with zstd or is corrupt"
        case let .truncated(n, size):
            return "\(n): the zstd frame is truncated (only \(size) bytes); the file was cut short — restore it or publish it again"
        case let .unknownContentSize(n):
            return "\(n): the zstd frame does not record its decompressed size; recompress it with a one-shot compressor (zstd CLI or pf2lora)"
        case let .tooLarge(n, _, limit):
            return "\(n): the decompressed size the zstd frame records is over the limit of \(limit) bytes; the file is corrupt or not an adapter (raise the limit only if it is genuinely this large)"
        case let .trailingBytes(n, count):
            return "\(n): \(count) unexpected bytes follow the zstd frame; the file is corrupt"
        case let .corrupt(n, why):
            return "\(n): the zstd data is corrupt (\(why)); restore the file or publish it again"
        case let .compressFailed(why):
            return "zstd compression failed: \(why)"
        }
    }
}

/// One-shot zstd compression of whole buffers, as the adapter store uses it: one frame per file,
/// with the content size and a checksum in the frame so that truncation and bit flips are caught.
public enum Zstd {
    /// Compresses `data` into one frame at `level` (1...19; 3 is zstd's default), with the
    /// decompressed size and an xxhash64 content checksum recorded in the frame.
    public static func compress(_ data: Data, level: Int = 3) throws -> Data {
        guard let cctx = ZSTD_createCCtx() else { throw ZstdError.compressFailed(why: "cannot allocate a context") }
        defer { ZSTD_freeCCtx(cctx) }
        try check(ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, Int32(level)))
        try check(ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1))
        try check(ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1))
        let bound = ZSTD_compressBound(data.count)
        var out = Data(count: bound)
        let n = out.withUnsafeMutableBytes { dst in
            data.withUnsafeBytes { src in
                ZSTD_compress2(cctx, dst.baseAddress, bound, src.baseAddress, src.count)
            }
        }
        try check(n)
        out.count = n
        return out
    }

    private static func check(_ code: Int) throws {
        if ZSTD_isError(code) != 0 { throw ZstdError.compressFailed(why: String(cString: ZSTD_getErrorName(code))) }
    }

    /// The 4 bytes every zstd frame starts with.
    public static let magic: [UInt8] = [0x28, 0xB5, 0x2F, 0xFD]

    /// The decompressed size the frame header claims, after checking the magic number and that the
    /// frame is complete and alone. Throws the matching `ZstdError` otherwise.
    public static func frameContentSize(_ src: UnsafeRawBufferPointer, name: String) throws -> Int {
        guard src.count >= 4, let base = src.baseAddress else {
            if src.count > 0, src.count < 4, Array(src) == Array(magic.prefix(src.count)) {
                throw ZstdError.truncated(name: name, size: src.count)
            }
            throw ZstdError.notZstd(name: name)
        }
        guard src.prefix(4).elementsEqual(magic) else { throw ZstdError.notZstd(name: name) }
        let content = ZSTD_getFrameContentSize(base, src.count)
        if content == UInt64.max - 1 {   // ZSTD_CONTENTSIZE_ERROR: the header is short or invalid
            // A frame header is at most 18 bytes; with the right magic and fewer bytes than that,
            // the file was cut short.
            if src.count < 18 { throw ZstdError.truncated(name: name, size: src.count) }
            throw ZstdError.corrupt(name: name, why: "invalid frame header")
        }
        if content == UInt64.max { throw ZstdError.unknownContentSize(name: name) }   // ZSTD_CONTENTSIZE_UNKNOWN
        let frame = ZSTD_findFrameCompressedSize(base, src.count)
        if ZSTD_isError(frame) != 0 {
            let why = String(cString: ZSTD_getErrorName(frame))
            if why.contains("Src size") || why.contains("srcSize") { throw ZstdError.truncated(name: name, size: src.count) }
            throw ZstdError.corrupt(name: name, why: why)
        }
        if frame < src.count { throw ZstdError.trailingBytes(name: name, count: src.count - frame) }
        guard content <= UInt64(Int.max) else { throw ZstdError.tooLarge(name: name, claimed: content, limit: Int.max) }
        return Int(content)
    }

    /// Decompresses one frame into `dst`, which must hold exactly the frame's content size.
    public static func decompress(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, name: String) throws {
        guard let dctx = ZSTD_createDCtx() else { throw ZstdError.corrupt(name: name, why: "cannot allocate a decompression context") }
        defer { ZSTD_freeDCtx(dctx) }
        let n = ZSTD_decompressDCtx(dctx, dst.baseAddress, dst.count, src.baseAddress, src.count)
        if ZSTD_isError(n) != 0 {
            let why = String(cString: ZSTD_getErrorName(n))
            if why.contains("Src size") || why.contains("srcSize") { throw ZstdError.truncated(name: name, size: src.count) }
            throw ZstdError.corrupt(name: name, why: why)
        }
        guard n == dst.count else {
            throw ZstdError.corrupt(name: name, why: "frame decompressed to \(n) bytes but its header claims \(dst.count)")
        }
    }

    /// Decompresses one whole frame, refusing frames that claim more than `limit` bytes.
    public static func decompress(_ data: Data, limit: Int, name: String = "zstd data") throws -> Data {
        try data.withUnsafeBytes { src in
            let size = try frameContentSize(src, name: name)
            guard size <= limit else { throw ZstdError.tooLarge(name: name, claimed: UInt64(size), limit: limit) }
            var out = Data(count: size)
            try out.withUnsafeMutableBytes { dst in try decompress(src, into: dst, name: name) }
            return out
        }
    }
}

/// Bytes owned by a class, 64-byte aligned, so tensors can view them and keep them alive.
final class AlignedBytes {
    let pointer: UnsafeMutableRawPointer
    let count: Int

    init(count: Int) {
        self.count = count
        pointer = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 64)
    }

    deinit { pointer.deallocate() }

    var buffer: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: pointer, count: count) }
    var readOnly: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: pointer, count: count) }
}
