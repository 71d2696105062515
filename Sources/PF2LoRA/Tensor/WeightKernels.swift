import CMemory
import CQuant

// The decode kernels of every weight precision (WeightStorage.swift): each output row's weights are
// read once and dotted with every input of the pooled decode pass while they sit in L1.
//
// f32, f16 and bf16 run the register-blocked C kernels of Sources/CQuant/Wide.c (four weight rows x
// three inputs per tile; f16 widened by F16C's `vcvtph2ps`, bf16 by a 16-bit shift; one FMA per 8
// weights per input), whose sums do not depend on the batch. q8_0 dots int8 weights with int8
// activations (quantized per block of 32, as llama.cpp does) in the C kernels of CQuant: Swift does
// not emit x86's int8 dot products, and widening the int8 weights to f32 instead measured 1.5x slower
// per byte (Benchmarks/README.md, "Weights at half precision and int8").

typealias F8 = SIMD8<Float>

@inline(__always) func loadF8(_ p: UnsafePointer<Float>) -> F8 { UnsafeRawPointer(p).loadUnaligned(as: F8.self) }
@inline(__always) func storeF8(_ v: F8, _ p: UnsafeMutablePointer<Float>) { UnsafeMutableRawPointer(p).storeBytes(of: v, as: F8.self) }
/// 8 int8 values as floats (`vpmovsxbd` + `vcvtdq2ps`).
@inline(__always) func loadQ8x8(_ p: UnsafeRawPointer) -> F8 { F8(p.loadUnaligned(as: SIMD8<Int8>.self)) }

/// A 16-bit float format widened to f32 exactly.
protocol SixteenBitFloat {
    /// 8 values at p (any alignment, little-endian).
    static func load8(_ p: UnsafeRawPointer) -> F8
    static func value(_ bits: UInt16) -> Float
}

/// IEEE half: `vcvtph2ps`.
enum HalfLoad: SixteenBitFloat {
    @inline(__always) static func load8(_ p: UnsafeRawPointer) -> F8 {
        // Lane by lane for the reason given at `BFloatLoad.load8`: one `vcvtph2ps` from memory.
        let h = p.loadUnaligned(as: SIMD8<Float16>.self)
        return F8(Float(h[0]), Float(h[1]), Float(h[2]), Float(h[3]), Float(h[4]), Float(h[5]), Float(h[6]), Float(h[7]))
    }
    @inline(__always) static func value(_ bits: UInt16) -> Float { Float(Float16(bitPattern: bits)) }
}

/// bfloat16: the top half of an f32, so a zero-extend and a 16-bit shift.
enum BFloatLoad: SixteenBitFloat {
    @inline(__always) static func load8(_ p: UnsafeRawPointer) -> F8 {
        // Widened lane by lane, not with the generic `SIMD8<UInt32>(truncatingIfNeeded:)` (nor
        // f16's `SIMD8<Float>(SIMD8<Float16>)`): in some of the decode loops the optimizer left
        // those as a call per 8 weights (with a vzeroupper), at 0.44 of the read bound; the lane
        // form becomes one `vpmovzxwd` (one `vcvtph2ps`) wherever it is inlined.
        let h = p.loadUnaligned(as: SIMD8<UInt16>.self)
        let w = SIMD8<UInt32>(UInt32(h[0]), UInt32(h[1]), UInt32(h[2]), UInt32(h[3]), UInt32(h[4]), UInt32(h[5]), UInt32(h[6]), UInt32(h[7]))
        return unsafeBitCast(w &<< 16, to: F8.self)
    }
    @inline(__always) static func value(_ bits: UInt16) -> Float { Float(bitPattern: UInt32(bits) << 16) }
}

/// n 16-bit values at src widened to f32 at dst.
@inline(__always)
func halfRowToF32<L: SixteenBitFloat>(_ src: UnsafeRawPointer, _ dst: UnsafeMutablePointer<Float>, _ n: Int, _: L.Type) {
    var i = 0
    while i + 8 <= n { storeF8(L.load8(src + 2 * i), dst + i); i += 8 }
    while i < n { dst[i] = L.value(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))); i += 1 }
}

/// A participant's inputs of one matrix-vector step quantized for q8_0 weights: int8 values and one
/// f32 scale per 32 (`pf2lora_q8_quantize_activations`). Grown, never shrunk.
final class Q8Activations {
    private(set) var q: UnsafeMutablePointer<Int8>
    private(set) var d: UnsafeMutablePointer<Float>
    /// The interleaved kernel's corrections, two per block of 32 (CQuant.h).
    private(set) var c: UnsafeMutablePointer<Int32>
    private var capacity = 0

    init(capacity n: Int = 0) {
        capacity = max((n + 31) / 32 * 32, 32)
        q = .allocate(capacity: capacity); d = .allocate(capacity: capacity / 32); c = .allocate(capacity: capacity / 16)
    }

    deinit { q.deallocate(); d.deallocate(); c.deallocate() }

    /// The buffers as plain pointers (`DecodePlan`).
    var raw: Raw { Raw(q: q, d: d, c: c) }

    /// Quantizes `count` inputs of `cols` values (a multiple of 32) at x, one after the other.
    func quantize(_ x: UnsafePointer<Float>, count: Int, cols: Int) {
        reserve(count * cols)
        raw.quantize(x, count * cols)
    }

    /// Makes room for n values (and n / 32 scales); the buffers move when they grow.
    func reserve(_ n: Int) {
        guard n > capacity else { return }
        q.deallocate(); d.deallocate(); c.deallocate()
        capacity = (n + 31) / 32 * 32
        q = .allocate(capacity: capacity); d = .allocate(capacity: capacity / 32); c = .allocate(capacity: capacity / 16)
    }

    /// Quantized inputs as plain pointers: values, scales, corrections.
    struct Raw {
        let q: UnsafeMutablePointer<Int8>, d: UnsafeMutablePointer<Float>, c: UnsafeMutablePointer<Int32>

        /// n values at x (n a multiple of 32; the buffers must hold them).
        @inline(__always) func quantize(_ x: UnsafePointer<Float>, _ n: Int) { pf2lora_q8_quantize_activations(x, q, d, c, n) }
    }
}

/// One matrix as the decode kernels read it: plain values and its first byte, no reference to
/// keep alive (its `WeightMatrix` does that), so copying it touches no reference count. A pooled
/// decode step hands these to its participants (`DecodePlan`).
struct MatrixKernel {
    let precision: WeightPrecision
    let rows: Int
    let cols: Int
    let base: UnsafeRawPointer
    let interleaved: Bool
}

extension WeightMatrix {
    var kernel: MatrixKernel { MatrixKernel(precision: precision, rows: rows, cols: cols, base: base, interleaved: interleaved) }
}

/// out[v * stride + r] = W[r, :] . x_v for r in `rows` and the `count` inputs x_v = xs + v * W.cols,
/// reading W at its own precision. For q8_0 weights, `quantized` must hold those inputs quantized
/// (`Q8Activations.quantize`) from its input `first` on, and xs is not read. Each input is summed in
/// the same order whatever `count` and `rows` are, so its results do not depend on what it is
/// batched with.
@inline(__always)
func dotRows(_ w: WeightMatrix, _ xs: UnsafePointer<Float>, quantized: Q8Activations?, first: Int = 0, count: Int, rows: Range<Int>,
             _ out: UnsafeMutablePointer<Float>, stride: Int) {
    dotRows(w.kernel, xs, quantized: quantized?.raw, first: first, count: count, rows: rows, out, stride: stride)
}

/// `dotRows` on a `MatrixKernel`, the q8_0 inputs as plain pointers.
@inline(__always)
func dotRows(_ w: MatrixKernel, _ xs: UnsafePointer<Float>, quantized: Q8Activations.Raw?,
             first: Int = 0, count: Int, rows: Range<Int>, _ out: UnsafeMutablePointer<Float>, stride: Int) {
    switch w.precision {
    // The register-blocked C kernels (Sources/CQuant/Wide.c): four weight rows x three inputs per
    // tile, each (row, input) pair summed in one fixed order whatever the tile.
    case .f32:
        pf2lora_wide_f32_dot_rows(w.base.assumingMemoryBound(to: Float.self), w.cols, xs, count, rows.lowerBound, rows.upperBound, out, stride)
    case .f16:
        pf2lora_wide_f16_dot_rows(w.base.assumingMemoryBound(to: UInt16.self), w.cols, xs, count, rows.lowerBound, rows.upperBound, out, stride)
    case .bf16:
        pf2lora_wide_bf16_dot_rows(w.base.assumingMemoryBound(to: UInt16.self), w.cols, xs, count, rows.lowerBound, rows.upperBound, out, stride)
    case .q8_0:
        let a = quantized!, n = w.cols
        if w.interleaved {
            pf2lora_q8_0x4_dot_rows(w.base, w.rows, n, a.q + first * n, a.d + first * n / 32, a.c + first * n / 16, count,
                                    rows.lowerBound, rows.upperBound, out, stride)
        } else {
            pf2lora_q8_0_dot_rows(w.base, n, a.q + first * n, a.d + first * n / 32, count, rows.lowerBound, rows.upperBound, out, stride)
        }
    }
}

/// out (n, W.rows) = x (n, W.cols) @ W^T, or += with `accumulate`: the product of prefill and of
/// large decode batches. f32 weights go to sgemm as they are; other precisions are widened to f32
/// one panel of rows at a time into `panel` (grown to at most `maxPanelFloats`), each panel one
/// sgemm into its columns of out, whose rows are `ldOut` apart (default W.rows).
func gemmRows(_ x: UnsafePointer<Float>, rows n: Int, _ w: WeightMatrix, _ out: UnsafeMutablePointer<Float>, ldOut: Int? = nil,
              panel: inout Tensor, accumulate: Bool = false, maxPanelFloats: Int = 1 << 21, pool: WorkerPool? = nil) {
    let ld = ldOut ?? w.rows, beta: Float = accumulate ? 1 : 0
    if let t = w.f32 {
        // (n,in) @ (out,in)^T -> (n,out)
        BLAS.gemm(x, t.data, out, m: n, n: w.rows, k: w.cols, transB: true, ldc: ld, beta: beta, pool: pool)
        return
    }
    let step = max(1, min(w.rows, maxPanelFloats / max(w.cols, 1)))
    if panel.count < step * w.cols { panel = Tensor(zeros: [step * w.cols]) }
    var r0 = 0
    while r0 < w.rows {
        let r1 = min(w.rows, r0 + step)
        w.rowsToF32(r0..<r1, into: panel.data)
        // (n,in) @ (panel rows,in)^T -> (n, panel rows), columns r0..<r1 of out
        BLAS.gemm(x, panel.data, out + r0, m: n, n: r1 - r0, k: w.cols, transB: true, ldc: ld, beta: beta, pool: pool)
        r0 = r1
    }
}

extension WorkerPool {
    /// One pass of batch-1 matrix-vector products over `matrices` at their own precisions, as a
    /// decode step runs them (64-row chunks from contiguous shares, a barrier after each matrix,
    /// q8_0 inputs quantized by every participant): `pf2lora bench blas` times it against the plain
    /// read of the same bytes. `input` must hold the widest matrix's columns; `output` its rows.
    public func dotAll(_ matrices: [WeightMatrix], input: Tensor, output: Tensor) {
        let scratch = (0..<count).map { _ in Q8Activations(capacity: input.count) }
        run { ctx in
            let q = scratch[ctx.index]
            for (i, m) in matrices.enumerated() {
                if m.precision == .q8_0 { q.quantize(input.data, count: 1, cols: m.cols) }
                ctx.chunks(m.rows, size: 64, phase: i) { rows in
                    dotRows(m, input.data, quantized: q, count: 1, rows: rows, output.data, stride: m.rows)
                }
                ctx.barrier()
            }
        }
    }

    /// The bytes of `matrices` read with wide loads (`pf2lora_read_bytes`; each participant a
    /// contiguous share of every matrix), with or without the decode kernels' software prefetch: the
    /// faster of the two is the memory-read limit for streaming them (which one is faster depends on
    /// the CPU, see CMemory.c; `readBoundSeconds` times both).
    public func sumBytes(_ matrices: [WeightMatrix], prefetch: Bool = true) -> UInt32 {
        let totals = UnsafeMutablePointer<UInt32>.allocate(capacity: count)
        defer { totals.deallocate() }
        run { ctx in
            var t: UInt32 = 0
            for m in matrices {
                let part = ctx.share(m.byteCount, align: 256)
                t &+= pf2lora_read_bytes(m.base + part.lowerBound, part.count, prefetch ? 1 : 0)
            }
            totals[ctx.index] = t
        }
        return (0..<count).reduce(0) { $0 &+ totals[$1] }
    }

    /// `read` with and without the software prefetch, back to back, the order alternating by `round`
    /// so neither always comes first: the faster one's time (the read bound: which form is faster
    /// depends on the CPU, see CMemory.c), and both results, to keep the reads from being optimized away.
    public static func timeBothForms<T>(round: Int, _ read: (_ prefetch: Bool) -> T) -> (seconds: Double, results: [T]) {
        var best = Double.infinity, results: [T] = []
        for k in 0..<2 {
            let t0 = monotonicNanos()
            results.append(read((k + round) % 2 == 0))
            best = min(best, Double(monotonicNanos() &- t0) / 1e9)
        }
        return (best, results)
    }

    /// The faster of `sumBytes`' two forms over `matrices` (`timeBothForms`) and their sums' total.
    public func readBoundSeconds(_ matrices: [WeightMatrix], round: Int) -> (seconds: Double, sum: UInt32) {
        let r = Self.timeBothForms(round: round) { sumBytes(matrices, prefetch: $0) }
        return (r.seconds, r.results.reduce(0, &+))
    }
}
