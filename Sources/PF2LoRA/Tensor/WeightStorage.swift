import CQuant
import Foundation

/// How a weight matrix keeps its values in memory.
///
/// Batch-1 decode reads every weight once per token, so its speed is the weight bytes over memory
/// bandwidth: f16 and bf16 halve them, q8_0 takes 34 bytes per 32 weights (1.06 bytes each).
public enum WeightPrecision: String, CaseIterable, Sendable, CustomStringConvertible {
    case f32, f16, bf16
    /// GGUF's Q8_0: blocks of 32 values, each an IEEE half scale d and 32 int8 values q (value d q),
    /// 34 bytes, in this order, unaligned. Made at load by ggml's reference rounding (`converted(to:)`).
    case q8_0

    /// Values per q8_0 block, and bytes per block.
    public static let q8BlockSize = 32
    public static let q8BlockBytes = 34

    /// The precision a safetensors dtype is stored in.
    public init(_ dtype: DType) {
        switch dtype {
        case .f32: self = .f32
        case .f16: self = .f16
        case .bf16: self = .bf16
        }
    }

    /// Bytes of one row of `cols` values (for q8_0, `cols` must be a multiple of 32).
    public func rowBytes(cols: Int) -> Int {
        switch self {
        case .f32: return 4 * cols
        case .f16, .bf16: return 2 * cols
        case .q8_0: return cols / Self.q8BlockSize * Self.q8BlockBytes
        }
    }

    /// Whether a row of `cols` values can be stored at this precision (q8_0 needs whole blocks).
    public func fits(cols: Int) -> Bool { self != .q8_0 || cols % Self.q8BlockSize == 0 }

    public var description: String { rawValue }
}

/// A (rows, cols) row-major weight matrix at one precision: in the serving layout (out, in), each
/// row is one output's weights, contiguous, so a decode step streams it once.
///
/// f32 matrices wrap a `Tensor` (a view of the mapped checkpoint or an owned copy). f16 and bf16
/// matrices are views of the checkpoint's bytes as it stores them (`SafeTensorsFile.weightMatrix`):
/// no f32 copy exists. q8_0 matrices are made at load (`converted(to:)`) and own their bytes, in the
/// four-row interleaved layout of the decode kernel (`interleaved`, CQuant.h's q8_0x4); a view of
/// GGUF's standard row layout is read too.
/// Decode reads every precision directly (`dotRows` in WeightKernels.swift); prefill converts
/// row panels to f32 for sgemm (`rowsToF32`).
public final class WeightMatrix: @unchecked Sendable {   // immutable after init, like a mapped Tensor
    public let precision: WeightPrecision
    public let rows: Int
    public let cols: Int
    /// Bytes from one row to the next.
    public let rowBytes: Int
    /// The first byte of row 0.
    public let base: UnsafeRawPointer
    /// The values as an f32 tensor, for f32 matrices only.
    public let f32: Tensor?
    /// q8_0 only: the rows are stored in groups of four interleaved block by block (CQuant.h,
    /// `pf2lora_q8_0x4_*`: one activation load serves four rows), not as GGUF's rows of 34-byte blocks.
    public let interleaved: Bool
    /// The bytes the values take (an interleaved q8_0 matrix pads its last group of rows to four).
    public let byteCount: Int
    private let owner: AnyObject?

    /// An f32 matrix over `t` read as (rows, cols); copies nothing.
    public init(_ t: Tensor) {
        precision = .f32
        rows = t.rows; cols = t.cols; rowBytes = 4 * t.cols
        interleaved = false; byteCount = rows * rowBytes
        base = UnsafeRawPointer(t.data)
        f32 = t
        owner = t
    }

    /// A view of `rows * precision.rowBytes(cols:)` bytes at `base` that `owner` keeps alive
    /// (`interleaved` q8_0: `pf2lora_q8_0x4_bytes(rows, cols)`). f32 data must be 4-byte aligned;
    /// the other precisions may sit at any address.
    public init(viewing base: UnsafeRawPointer, precision: WeightPrecision, rows: Int, cols: Int, owner: AnyObject?, interleaved: Bool = false) {
        precondition(precision.fits(cols: cols), "WeightMatrix: a q8_0 row needs a multiple of 32 values, not \(cols)")
        precondition(!interleaved || precision == .q8_0, "WeightMatrix: only q8_0 has an interleaved layout")
        self.precision = precision
        self.rows = rows; self.cols = cols; rowBytes = precision.rowBytes(cols: cols)
        self.interleaved = interleaved
        byteCount = interleaved ? pf2lora_q8_0x4_bytes(rows, cols) : rows * rowBytes
        self.base = base
        if precision == .f32 {
            precondition(Int(bitPattern: base) % 4 == 0, "WeightMatrix: f32 data must be 4-byte aligned")
            let t = Tensor(viewing: UnsafeMutablePointer(mutating: base.assumingMemoryBound(to: Float.self)), shape: [rows, cols], owner: owner)
            f32 = t
            self.owner = t
        } else {
            f32 = nil
            self.owner = owner
        }
    }

    /// A new zero-filled matrix that owns its bytes, and a pointer to write them (q8_0: interleaved).
    static func allocate(_ precision: WeightPrecision, rows: Int, cols: Int) -> (WeightMatrix, UnsafeMutableRawPointer) {
        if precision == .f32 {
            let t = Tensor(zeros: [rows, cols])
            return (WeightMatrix(t), UnsafeMutableRawPointer(t.data))
        }
        let q8 = precision == .q8_0
        let buffer = RawBuffer(byteCount: q8 ? pf2lora_q8_0x4_bytes(rows, cols) : rows * precision.rowBytes(cols: cols))
        return (WeightMatrix(viewing: buffer.bytes, precision: precision, rows: rows, cols: cols, owner: buffer, interleaved: q8), buffer.bytes)
    }

    /// A q8_0 matrix's rows in GGUF's layout (rows of cols / 32 blocks of 34 bytes: f16 d, 32 int8).
    func ggufQ8_0Bytes() -> [UInt8] {
        precondition(precision == .q8_0, "WeightMatrix: not q8_0")
        guard interleaved else { return Array(UnsafeRawBufferPointer(start: base, count: byteCount)) }
        var out = [UInt8](repeating: 0, count: rows * rowBytes)
        out.withUnsafeMutableBytes { o in
            for r in 0..<rows { pf2lora_q8_0x4_get_row(base, rows, cols, r, o.baseAddress! + r * rowBytes) }
        }
        return out
    }

    /// `parts` (each the same precision and column count) stacked row-wise into one new matrix that
    /// owns its bytes; a single part is returned as it is.
    public static func stacked(_ parts: [WeightMatrix]) -> WeightMatrix {
        if parts.count == 1 { return parts[0] }
        let p = parts[0].precision, cols = parts[0].cols
        precondition(p != .q8_0, "WeightMatrix.stacked: stack before quantizing")
        precondition(parts.allSatisfy { $0.precision == p && $0.cols == cols }, "WeightMatrix.stacked: parts differ in precision or columns")
        let (m, dst) = allocate(p, rows: parts.reduce(0) { $0 + $1.rows }, cols: cols)
        var off = 0
        for part in parts {
            (dst + off).copyMemory(from: part.base, byteCount: part.byteCount)
            off += part.byteCount
        }
        return m
    }

    /// Why this matrix cannot be kept at `target` precision, or nil when it can: a finite value
    /// beyond f16's range (65504) for f16, a non-finite value for q8_0 (whose scale would be lost).
    /// f32 and bf16 hold every value of every precision's range.
    public func unrepresentable(in target: WeightPrecision) -> String? {
        guard target == .f16 || target == .q8_0, target != precision else { return nil }
        if target == .f16 && precision == .q8_0 { return nil }
        let row = UnsafeMutablePointer<Float>.allocate(capacity: max(cols, 1))
        defer { row.deallocate() }
        for r in 0..<rows {
            rowsToF32(r..<(r + 1), into: row)
            for i in 0..<cols {
                let v = row[i]
                if target == .f16, v.isFinite, abs(v) > Float(Float16.greatestFiniteMagnitude) {
                    return "holds \(v) at (\(r), \(i)), beyond f16's largest value 65504"
                }
                if target == .q8_0, !v.isFinite { return "holds \(v) at (\(r), \(i)); a q8_0 block cannot store it" }
            }
        }
        return nil
    }

    /// Rows `range` converted to f32, written row-major (range.count, cols) at `out`. Exact for every
    /// precision (an f16, bf16 or q8_0 value d q is an f32 without rounding).
    public func rowsToF32(_ range: Range<Int>, into out: UnsafeMutablePointer<Float>) {
        let n = cols
        if interleaved {
            for (i, r) in range.enumerated() { pf2lora_q8_0x4_row_to_f32(base, rows, cols, r, out + i * n) }
            return
        }
        for (i, r) in range.enumerated() {
            let src = base + r * rowBytes, dst = out + i * n
            switch precision {
            case .f32: dst.update(from: src.assumingMemoryBound(to: Float.self), count: n)
            case .f16: halfRowToF32(src, dst, n, HalfLoad.self)
            case .bf16: halfRowToF32(src, dst, n, BFloatLoad.self)
            case .q8_0:
                for b in 0..<(n / WeightPrecision.q8BlockSize) {
                    let blk = src + b * WeightPrecision.q8BlockBytes, o = dst + b * 32
                    let d = F8(repeating: Float(Float16(bitPattern: UInt16(littleEndian: blk.loadUnaligned(as: UInt16.self)))))
                    for k in stride(from: 0, to: 32, by: 8) { storeF8(d * loadQ8x8(blk + 2 + k), o + k) }
                }
            }
        }
    }

    /// All values as a new f32 tensor (rows, cols).
    public func toTensor() -> Tensor {
        let t = Tensor(zeros: [rows, cols])
        rowsToF32(0..<rows, into: t.data)
        return t
    }

    /// This matrix at `target` precision: itself when it is already there; otherwise a new matrix
    /// that owns its bytes, converted row by row through f32 with round-to-nearest-even (f16, bf16,
    /// as PyTorch converts) or ggml's q8_0 reference quantization (bit for bit what the `gguf`
    /// package and llama.cpp's converter write).
    public func converted(to target: WeightPrecision) -> WeightMatrix {
        if target == precision { return self }
        precondition(target.fits(cols: cols), "WeightMatrix: a q8_0 row needs a multiple of 32 values, not \(cols)")
        let (m, dst) = WeightMatrix.allocate(target, rows: rows, cols: cols)
        let row = UnsafeMutablePointer<Float>.allocate(capacity: max(cols, 1))
        let blocks = UnsafeMutableRawPointer.allocate(byteCount: max(m.rowBytes, 1), alignment: 64)   // one q8_0 row, GGUF layout
        defer { row.deallocate(); blocks.deallocate() }
        for r in 0..<rows {
            rowsToF32(r..<(r + 1), into: row)
            let out = dst + r * m.rowBytes
            if target == .q8_0 {
                quantizeQ8_0Row(row, cols, blocks)
                pf2lora_q8_0x4_set_row(dst, rows, cols, r, blocks)
                continue
            }
            switch target {
            case .f32: out.copyMemory(from: row, byteCount: 4 * cols)
            case .f16: for i in 0..<cols { out.storeBytes(of: Float16(row[i]).bitPattern.littleEndian, toByteOffset: 2 * i, as: UInt16.self) }
            case .bf16: for i in 0..<cols { out.storeBytes(of: SafeTensorsWriter.bf16Bits(row[i]).littleEndian, toByteOffset: 2 * i, as: UInt16.self) }
            case .q8_0: break
            }
        }
        return m
    }

    /// The (cols, rows) transpose at the same precision, owning its bytes (f32, f16 and bf16; a
    /// checkpoint in GPT-2's Conv1D layout is transposed once to the serving layout).
    public func transposed() -> WeightMatrix {
        precondition(precision != .q8_0, "WeightMatrix: transpose before quantizing")
        if let t = f32 { return WeightMatrix(t.transposed()) }
        let (m, dst) = WeightMatrix.allocate(precision, rows: cols, cols: rows)
        let src = base.assumingMemoryBound(to: UInt16.self)   // 2-byte values; alignment checked below
        let aligned = Int(bitPattern: base) % 2 == 0
        let out = dst.assumingMemoryBound(to: UInt16.self)
        let tile = 32
        for i0 in stride(from: 0, to: rows, by: tile) {
            for j0 in stride(from: 0, to: cols, by: tile) {
                for i in i0..<min(i0 + tile, rows) {
                    for j in j0..<min(j0 + tile, cols) {
                        out[j * rows + i] = aligned ? src[i * cols + j] : base.loadUnaligned(fromByteOffset: 2 * (i * cols + j), as: UInt16.self)
                    }
                }
            }
        }
        return m
    }
}

/// Memory a weight matrix owns (64-byte aligned, zeroed; from 2 MB on in huge pages, `LargeBuffer`).
final class RawBuffer {
    let bytes: UnsafeMutableRawPointer
    let byteCount: Int
    private let mappedBytes: Int

    init(byteCount: Int) {
        self.byteCount = byteCount
        (bytes, mappedBytes) = LargeBuffer.allocateZeroed(byteCount: byteCount)
    }

    deinit { LargeBuffer.free(bytes, mappedBytes: mappedBytes) }
}

/// One row of f32 values (cols a multiple of 32) as q8_0 blocks, exactly as ggml's
/// `quantize_row_q8_0_ref` and the `gguf` package's `Q8_0.quantize_blocks`: d = max|x| / 127 in
/// f32, q = round(x * (1 / d)) half away from zero (0 when d is 0), d stored as f16 (nearest even).
/// A non-finite product (an inf or nan weight) is stored as 0 rather than trapping.
func quantizeQ8_0Row(_ x: UnsafePointer<Float>, _ cols: Int, _ out: UnsafeMutableRawPointer) {
    for b in 0..<(cols / WeightPrecision.q8BlockSize) {
        let xb = x + b * 32, blk = out + b * WeightPrecision.q8BlockBytes
        var amax: Float = 0
        for i in 0..<32 { amax = max(amax, abs(xb[i])) }
        let d = amax / 127
        let id: Float = d != 0 ? 1 / d : 0
        blk.storeBytes(of: Float16(d).bitPattern.littleEndian, as: UInt16.self)
        for i in 0..<32 {
            let v = (xb[i] * id).rounded(.toNearestOrAwayFromZero)
            blk.storeBytes(of: v.isFinite ? Int8(max(-128, min(127, v))) : 0, toByteOffset: 2 + i, as: Int8.self)
        }
    }
}

extension SafeTensorsFile {
    /// The 2-D tensor `name` as a weight matrix at the precision the file stores it: a view of the
    /// file's bytes (f16, bf16, aligned f32), or for f32 data at a misaligned offset a copy.
    public func weightMatrix(_ name: String) throws -> WeightMatrix {
        guard let info = tensors[name] else { throw SafeTensorsError.missingTensor(file: self.name, tensor: name) }
        guard info.shape.count == 2 else {
            throw SafeTensorsError.badEntry(file: self.name, tensor: name, why: "has shape \(info.shape); a weight matrix needs 2 dimensions")
        }
        if info.dtype == .f32 { return WeightMatrix(tensor(info)) }
        guard let p = rawBytes(info) else { return WeightMatrix.allocate(WeightPrecision(info.dtype), rows: info.shape[0], cols: info.shape[1]).0 }
        return WeightMatrix(viewing: p, precision: WeightPrecision(info.dtype), rows: info.shape[0], cols: info.shape[1], owner: storage)
    }
}

/// The memory the serving weights of one base live in: matrices copied into 64 MB chunks of
/// `LargeBuffer` (transparent huge pages), one after the other, 64-byte aligned. A decode step
/// streams every one of them per token; from huge pages that measured 8-14% more bytes per
/// CPU-second than from the checkpoint's 4 KB file pages or the heap (Benchmarks/README.md, "Huge
/// pages"), and most per-layer matrices (below 2 MB at q8_0, or single `nn.Linear` views) would not
/// get huge pages on their own. Filled at load, read-only afterwards.
final class WeightArena: @unchecked Sendable {   // written only while the base is built, on one thread
    private var chunks: [(base: UnsafeMutableRawPointer, mapped: Int)] = []
    private var next: UnsafeMutableRawPointer?
    private var left = 0
    static let chunkBytes = 64 << 20

    /// Bytes placed so far.
    private(set) var byteCount = 0

    /// A copy of `w` (same precision, same bytes) in the arena.
    func place(_ w: WeightMatrix) -> WeightMatrix {
        let n = (w.byteCount + 63) / 64 * 64
        if n > left {
            let size = max(Self.chunkBytes, n)
            let (p, mapped) = LargeBuffer.allocateZeroed(byteCount: size)
            chunks.append((p, mapped))
            next = p; left = size
        }
        let p = next!
        p.copyMemory(from: w.base, byteCount: w.byteCount)
        next = p + n; left -= n; byteCount += w.byteCount
        return WeightMatrix(viewing: UnsafeRawPointer(p), precision: w.precision, rows: w.rows, cols: w.cols, owner: self, interleaved: w.interleaved)
    }

    deinit { for c in chunks { LargeBuffer.free(c.base, mappedBytes: c.mapped) } }
}
