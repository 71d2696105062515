import CQuant
import Foundation
import Testing
@testable import PF2LoRA

/// Weight matrices at f16, bf16 and q8_0 and their decode kernels: quantization against the `gguf`
/// package bit for bit, dot products against f64 references with derived tolerances, and every
/// result independent of the batch it is computed in and of the instruction set.
@Suite struct WeightStorageTests {
    /// A seeded (rows, cols) f32 matrix with N(0, scale) values.
    static func randomMatrix(rows: Int, cols: Int, seed: UInt64, scale: Float = 1) -> Tensor {
        var rng = RNG(seed: seed)
        let t = Tensor(zeros: [rows, cols])
        for i in 0..<t.count { t.data[i] = scale * rng.normal() }
        return t
    }

    static func readFloats(_ path: String) throws -> [Float] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        return data.withUnsafeBytes { raw in (0..<(data.count / 4)).map { Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * $0, as: UInt32.self))) } }
    }

    /// The f32 rounding bound of a sum of n products done as `halfDot` / the q8_0 kernel do: four
    /// (or eight-lane) accumulators, so at most about n / 32 + 8 additions in any one chain, each off by at most
    /// 2^-24 relative, times the sum of the products' magnitudes (doubled for margin).
    static func tolerance(n: Int, absSum: Double) -> Double { 2 * Double(n / 32 + 8 + 4) * 0x1p-24 * absSum + 1e-30 }

    /// The bound of `tolerance` for the wide kernels of Sources/CQuant/Wide.c: at most n / 8 fused
    /// additions per lane (four 8-lane accumulators per (row, input) pair: n / 32 + 3 and 2 to add
    /// them), 3 in the lane tree, n % 8 in the tail.
    static func wideTolerance(n: Int, absSum: Double) -> Double { 2 * Double(n / 8 + 3 + n % 8 + 1) * 0x1p-24 * absSum + 1e-30 }

    /// The summation order Sources/CQuant/Wide.c documents, recomputed here with fused multiply-adds:
    /// `accumulators` (1 or 4) 8-lane accumulators, accumulator s fed the 8-column blocks s, s + A,
    /// s + 2A, ... of the whole groups of A blocks, the blocks after them into accumulator 0, then
    /// (a0 + a1) + (a2 + a3) per lane, the lanes as (l0 + l4 + l2 + l6) + (l1 + l5 + l3 + l7) in that
    /// tree, then the cols % 8 tail.
    static func wideOrder(_ w: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ n: Int, accumulators a: Int) -> Float {
        var acc = [[Float]](repeating: [Float](repeating: 0, count: 8), count: 4)
        let ca = n / (8 * a) * (8 * a), c8 = n / 8 * 8
        var k = 0
        while k < ca {
            for s in 0..<a { for j in 0..<8 { acc[s][j] = acc[s][j].addingProduct(w[k + 8 * s + j], x[k + 8 * s + j]) } }
            k += 8 * a
        }
        while k < c8 { for j in 0..<8 { acc[0][j] = acc[0][j].addingProduct(w[k + j], x[k + j]) }; k += 8 }
        var t = acc[0]
        if a == 4 { for j in 0..<8 { let u: Float = acc[0][j] + acc[1][j], v: Float = acc[2][j] + acc[3][j]; t[j] = u + v } }
        var h = [Float](repeating: 0, count: 4)
        for j in 0..<4 { h[j] = t[j] + t[j + 4] }
        let h02: Float = h[0] + h[2], h13: Float = h[1] + h[3]
        var s: Float = h02 + h13
        while k < n { s = s.addingProduct(w[k], x[k]); k += 1 }
        return s
    }

    // MARK: q8_0 quantization

    @Test func q8_0QuantizationEqualsGGUFBitForBit() throws {
        let meta = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("q8_0/cases.json")))) as! [String: Any]
        let rows = meta["rows"] as! Int, cols = meta["cols"] as! Int
        let x = try Self.readFloats(TestPaths.fixture("q8_0/x.bin"))
        let want = try Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("q8_0/q8_0.bin")))
        #expect(want.count == rows * cols / 32 * 34)
        let m = WeightMatrix(Tensor(x, shape: [rows, cols])).converted(to: .q8_0)
        // Kept interleaved four rows at a time (the decode kernel's layout); its rows are GGUF's.
        #expect(m.precision == .q8_0 && m.rows == rows && m.cols == cols && m.interleaved)
        #expect(m.byteCount == (rows + 3) / 4 * 4 * cols / 32 * 34)
        let got = Data(m.ggufQ8_0Bytes())
        #expect(got.count == want.count)
        var firstDiff: Int?
        for i in 0..<want.count where got[i] != want[i] { firstDiff = i; break }
        #expect(firstDiff == nil, "first differing byte \(firstDiff ?? -1) (block \((firstDiff ?? 0) / 34))")

        // Dequantization is exact: d * q in f32, as gguf.dequantize (an inf scale gives inf or nan alike).
        let deq = try Self.readFloats(TestPaths.fixture("q8_0/dequant.bin"))
        let mine = want.withUnsafeBytes { raw in
            WeightMatrix(viewing: raw.baseAddress!, precision: .q8_0, rows: rows, cols: cols, owner: nil).toTensor().array
        }
        var mismatches = 0
        for i in 0..<deq.count where !(mine[i] == deq[i] || (mine[i].isNaN && deq[i].isNaN)) { mismatches += 1 }
        #expect(mismatches == 0)
    }

    @Test func q8_0NeedsWholeBlocks() {
        #expect(WeightPrecision.q8_0.fits(cols: 768) && !WeightPrecision.q8_0.fits(cols: 100))
        #expect(WeightPrecision.f16.fits(cols: 100))
        #expect(WeightPrecision.q8_0.rowBytes(cols: 768) == 24 * 34)
        #expect(WeightPrecision.bf16.rowBytes(cols: 7) == 14)
    }

    // MARK: conversions

    @Test func halfAndBFloatConversionsRoundToNearestEvenAndWidenExactly() {
        let t = Self.randomMatrix(rows: 5, cols: 37, seed: 3)
        t.data[0] = 65520          // rounds up to inf in f16
        t.data[1] = 1e-8            // f16 subnormal range
        let h = WeightMatrix(t).converted(to: .f16), b = WeightMatrix(t).converted(to: .bf16)
        #expect(h.precision == .f16 && h.byteCount == 5 * 37 * 2 && b.precision == .bf16)
        let hf = h.toTensor(), bf = b.toTensor()
        for i in 0..<t.count {
            #expect(hf.data[i] == Float(Float16(t.data[i])))
            #expect(bf.data[i].bitPattern == UInt32(SafeTensorsWriter.bf16Bits(t.data[i])) << 16)
        }
        // Panels of rows, as prefill converts them.
        let panel = UnsafeMutablePointer<Float>.allocate(capacity: 2 * 37)
        defer { panel.deallocate() }
        h.rowsToF32(2..<4, into: panel)
        #expect((0..<(2 * 37)).allSatisfy { panel[$0] == hf.data[2 * 37 + $0] })
    }

    @Test func transposeKeepsPrecisionAndValues() {
        let t = Self.randomMatrix(rows: 45, cols: 70, seed: 4)
        for p in [WeightPrecision.f32, .f16, .bf16] {
            let m = WeightMatrix(t).converted(to: p)
            let tt = m.transposed()
            #expect(tt.precision == p && tt.rows == 70 && tt.cols == 45)
            let a = m.toTensor(), b = tt.toTensor()
            var ok = true
            for i in 0..<45 { for j in 0..<70 where a.data[i * 70 + j] != b.data[j * 45 + i] { ok = false } }
            #expect(ok, "\(p)")
        }
    }

    @Test func checkpointHalfTensorsAreViewsOfTheFile() throws {
        for (folder, p) in [("tiny-gpt2-f16", WeightPrecision.f16), ("tiny-gpt2-bf16", .bf16)] {
            let st = try SafeTensorsFile(path: TestPaths.fixture("\(folder)/model.safetensors"))
            let name = "transformer.h.0.attn.c_attn.weight"
            let m = try st.weightMatrix(name)
            #expect(m.precision == p && m.rows == 64 && m.cols == 192 && m.f32 == nil)
            #expect(m.toTensor().array == (try st.tensor(name)).array)
        }
        let st = try SafeTensorsFile(path: TestPaths.fixture("tiny-gpt2-f16/model.safetensors"))
        #expect(throws: SafeTensorsError.self) { try st.weightMatrix("transformer.h.0.attn.c_attn.bias") }
        #expect(throws: SafeTensorsError.self) { try st.weightMatrix("nope") }
    }

    // MARK: decode kernels

    /// f16 and bf16 rows dotted with 1 to 5 inputs: within the f32 rounding bound of the f64 dot of
    /// the same stored values, and each input's result the same bits whatever it is batched with.
    @Test(arguments: [WeightPrecision.f16, .bf16])
    func halfDotRowsMatchF64AndAreBatchInvariant(_ p: WeightPrecision) {
        for cols in [1, 7, 8, 31, 32, 33, 100, 768] {
            let rows = 70
            let m = WeightMatrix(Self.randomMatrix(rows: rows, cols: cols, seed: UInt64(cols), scale: 0.1)).converted(to: p)
            let w = m.toTensor()   // the stored values, exactly
            let xs = Self.randomMatrix(rows: 5, cols: cols, seed: 99)
            let out = Tensor(zeros: [5, rows]), alone = Tensor(zeros: [1, rows])
            dotRows(m, xs.data, quantized: nil, count: 5, rows: 0..<rows, out.data, stride: rows)
            for v in 0..<5 {
                for r in 0..<rows {
                    var ref = 0.0, abs = 0.0
                    for i in 0..<cols { let t = Double(w.data[r * cols + i]) * Double(xs.data[v * cols + i]); ref += t; abs += Swift.abs(t) }
                    #expect(Swift.abs(Double(out.data[v * rows + r]) - ref) <= Self.wideTolerance(n: cols, absSum: abs), "\(p) cols \(cols) v \(v) r \(r)")
                }
                // Alone, in two row ranges: the same bits.
                dotRows(m, xs.data + v * cols, quantized: nil, count: 1, rows: 0..<33, alone.data, stride: rows)
                dotRows(m, xs.data + v * cols, quantized: nil, count: 1, rows: 33..<rows, alone.data, stride: rows)
                #expect((0..<rows).allSatisfy { alone.data[$0].bitPattern == out.data[v * rows + $0].bitPattern }, "\(p) cols \(cols) v \(v)")
            }
        }
    }

    /// The register-blocked wide kernels (Sources/CQuant/Wide.c: 16-bit tiles of 4 rows x 3 inputs,
    /// f32 one row x groups of up to 3 inputs)
    /// at f32, f16 and bf16: an input's results are the same bits alone and at every position of
    /// batches 1...33 wide (every tile shape and remainder), in any row range (odd row counts, chunk
    /// edges inside a tile), at odd and even column counts (the tail after the last 8), on the scalar
    /// and the AVX2 path; within the kernel's f32 rounding bound of the f64 dot; and the same bits as
    /// the order the kernel documents (`wideOrder`: four accumulators per pair at every precision).
    @Test(arguments: [WeightPrecision.f32, .f16, .bf16])
    func wideDotRowsBitsDoNotDependOnBatchWidthOrPosition(_ p: WeightPrecision) {
        defer { _ = pf2lora_quant_set_isa(99) }
        let maxWidth = 33
        for cols in [5, 8, 13, 45, 64, 100, 120, 771] {
            let rows = 23
            let m = WeightMatrix(Self.randomMatrix(rows: rows, cols: cols, seed: UInt64(cols) + 3, scale: 0.1)).converted(to: p)
            let w = m.toTensor()   // the stored values, exactly
            let xs = Self.randomMatrix(rows: maxWidth, cols: cols, seed: 31)
            var paths: [[UInt32]] = []
            for isa in Set([0, min(Int(pf2lora_cpu_isa()), Int(PF2LORA_ISA_AVX2))]).sorted() {
                _ = pf2lora_quant_set_isa(Int32(isa))
                // Each input alone, all rows at once.
                let alone = Tensor(zeros: [maxWidth, rows])
                for v in 0..<maxWidth { dotRows(m, xs.data + v * cols, quantized: nil, count: 1, rows: 0..<rows, alone.data + v * rows, stride: rows) }
                paths.append(alone.array.map(\.bitPattern))
                var differing = 0
                for width in 1...maxWidth {
                    for first in Set([0, 1, maxWidth - width]).sorted() where first + width <= maxWidth {
                        let out = Tensor(zeros: [width, rows])
                        // Two row ranges, the first ending inside a 4-row tile.
                        dotRows(m, xs.data + first * cols, quantized: nil, count: width, rows: 0..<6, out.data, stride: rows)
                        dotRows(m, xs.data + first * cols, quantized: nil, count: width, rows: 6..<rows, out.data, stride: rows)
                        for v in 0..<width where (0..<rows).contains(where: { out.data[v * rows + $0].bitPattern != alone.data[(first + v) * rows + $0].bitPattern }) {
                            differing += 1
                        }
                    }
                }
                #expect(differing == 0, "\(p) isa \(isa) cols \(cols): \(differing) batched inputs differ from the same input alone")
                for v in [0, maxWidth - 1] {
                    for r in 0..<rows {
                        var ref = 0.0, abs = 0.0
                        for i in 0..<cols { let t = Double(w.data[r * cols + i]) * Double(xs.data[v * cols + i]); ref += t; abs += Swift.abs(t) }
                        #expect(Swift.abs(Double(alone.data[v * rows + r]) - ref) <= Self.wideTolerance(n: cols, absSum: abs), "\(p) cols \(cols) v \(v) r \(r)")
                        let order = Self.wideOrder(w.data + r * cols, xs.data + v * cols, cols, accumulators: 4)
                        #expect(alone.data[v * rows + r].bitPattern == order.bitPattern, "\(p) cols \(cols) v \(v) r \(r): not the documented order")
                    }
                }
            }
            #expect(paths.allSatisfy { $0 == paths[0] }, "\(p) cols \(cols): the scalar and AVX2 paths differ")
        }
    }

    /// The activation quantization, recomputed here: d = max|x| / 127, q = x * (1 / d) to nearest even.
    static func referenceQuantize(_ x: UnsafePointer<Float>, _ n: Int) -> (q: [Int8], d: [Float]) {
        var q = [Int8](repeating: 0, count: n), d = [Float](repeating: 0, count: n / 32)
        for b in 0..<(n / 32) {
            var amax: Float = 0
            for i in 0..<32 { amax = max(amax, abs(x[b * 32 + i])) }
            d[b] = amax / 127
            let id: Float = d[b] != 0 ? 1 / d[b] : 0
            for i in 0..<32 { q[b * 32 + i] = Int8((x[b * 32 + i] * id).rounded(.toNearestOrEven)) }
        }
        return (q, d)
    }

    /// q8_0 rows dotted with quantized inputs, on every instruction set this CPU has: the same bits
    /// on each (scalar, AVX2, AVX-VNNI), within f32 rounding of the f64 dot of the quantized values,
    /// within the activation rounding bound of the f64 dot with the unquantized inputs, and
    /// independent of the batch.
    @Test func q8_0DotRowsMatchReferencesOnEveryInstructionSet() {
        defer { _ = pf2lora_quant_set_isa(99) }
        for cols in [32, 64, 96, 160, 768] {
            let rows = 67
            let m = WeightMatrix(Self.randomMatrix(rows: rows, cols: cols, seed: UInt64(cols) + 7, scale: 0.05)).converted(to: .q8_0)
            let w = m.toTensor()
            let xs = Self.randomMatrix(rows: 5, cols: cols, seed: 12)
            xs.data[3] = 0; for i in 0..<min(32, cols) { xs.data[cols + i] = 0 }   // a zero block in input 1
            let act = Q8Activations()
            act.quantize(xs.data, count: 5, cols: cols)
            let ref = Self.referenceQuantize(xs.data, 5 * cols)
            #expect((0..<(5 * cols)).allSatisfy { act.q[$0] == ref.q[$0] }, "activation values, cols \(cols)")
            #expect((0..<(5 * cols / 32)).allSatisfy { act.d[$0] == ref.d[$0] }, "activation scales, cols \(cols)")

            var results: [[UInt32]] = []
            for isa in 0...Int(pf2lora_cpu_isa()) {
                #expect(Int(pf2lora_quant_set_isa(Int32(isa))) == isa)
                act.quantize(xs.data, count: 5, cols: cols)
                let out = Tensor(zeros: [5, rows])
                dotRows(m, xs.data, quantized: act, count: 5, rows: 0..<rows, out.data, stride: rows)
                results.append(out.array.map(\.bitPattern))
                // Alone and in other row ranges: the same bits.
                let alone = Tensor(zeros: [1, rows])
                let one = Q8Activations()
                for v in 0..<5 {
                    one.quantize(xs.data + v * cols, count: 1, cols: cols)
                    dotRows(m, xs.data, quantized: one, count: 1, rows: 0..<10, alone.data, stride: rows)
                    dotRows(m, xs.data, quantized: one, count: 1, rows: 10..<rows, alone.data, stride: rows)
                    #expect((0..<rows).allSatisfy { alone.data[$0].bitPattern == out.data[v * rows + $0].bitPattern }, "isa \(isa) cols \(cols) v \(v)")
                }
            }
            for (isa, r) in results.enumerated() {
                let differing = zip(r, results[0]).filter { $0 != $1 }.count
                #expect(differing == 0, "isa \(isa): \(differing) results differ from the scalar path's, cols \(cols)")
            }
            // The same rows in GGUF's layout (a view, the standard kernel): equal to f32 rounding.
            let gguf = m.ggufQ8_0Bytes()
            let std = Tensor(zeros: [5, rows])
            gguf.withUnsafeBytes { raw in
                let v = WeightMatrix(viewing: raw.baseAddress!, precision: .q8_0, rows: rows, cols: cols, owner: nil)
                #expect(!v.interleaved && v.byteCount == rows * cols / 32 * 34)
                #expect(v.toTensor().array == w.array)
                dotRows(v, xs.data, quantized: act, count: 5, rows: 0..<rows, std.data, stride: rows)
            }
            let inter = results[0].map { Float(bitPattern: $0) }
            for i in 0..<(5 * rows) {
                #expect(abs(std.data[i] - inter[i]) <= 1e-5 * (abs(inter[i]) + 1), "standard vs interleaved, cols \(cols), \(i)")
            }

            let out = results[0].map { Float(bitPattern: $0) }
            for v in 0..<5 {
                for r in 0..<rows {
                    var quantRef = 0.0, absSum = 0.0, exact = 0.0, bound = 0.0
                    for i in 0..<cols {
                        let wi = Double(w.data[r * cols + i])
                        let xi = Double(ref.d[(v * cols + i) / 32]) * Double(ref.q[v * cols + i])
                        quantRef += wi * xi; absSum += abs(wi * xi)
                        exact += wi * Double(xs.data[v * cols + i])
                        bound += abs(wi) * Double(ref.d[(v * cols + i) / 32]) / 2   // |x - d q| <= d / 2
                    }
                    let got = Double(out[v * rows + r])
                    #expect(abs(got - quantRef) <= Self.tolerance(n: cols, absSum: absSum), "cols \(cols) v \(v) r \(r)")
                    #expect(abs(got - exact) <= bound * 1.001 + Self.tolerance(n: cols, absSum: absSum), "cols \(cols) v \(v) r \(r)")
                }
            }
        }
    }

    /// The batch-1 decode kernels ask for memory ahead of the rows they read (q8_0 and f16/bf16:
    /// prefetch hints, which never fault): a matrix whose last byte ends the last readable page
    /// before an inaccessible one gives the same bits as the same matrix anywhere else, on every
    /// instruction set. f32 (its tiles hint nothing) is checked as well.
    @Test(arguments: [WeightPrecision.q8_0, .f16, .bf16, .f32])
    func decodeKernelsReadNothingPastTheMatrix(_ p: WeightPrecision) throws {
        defer { _ = pf2lora_quant_set_isa(99) }
        let page = Int(sysconf(Int32(_SC_PAGESIZE))), span = 4 * page
        let map = try #require(mmap(nil, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        #expect(map != MAP_FAILED)
        defer { munmap(map, span + page) }
        #expect(mprotect(map + span, page, PROT_NONE) == 0)
        for (rows, cols) in [(12, 64), (7, 96), (5, 576)] {
            let m = WeightMatrix(Self.randomMatrix(rows: rows, cols: cols, seed: UInt64(rows), scale: 0.05)).converted(to: p)
            #expect(m.byteCount <= span)
            let dst = map + span - m.byteCount
            dst.copyMemory(from: m.base, byteCount: m.byteCount)
            let view = WeightMatrix(viewing: dst, precision: p, rows: rows, cols: cols, owner: nil, interleaved: m.interleaved)
            let xs = Self.randomMatrix(rows: 1, cols: cols, seed: 9)
            let act = Q8Activations()
            act.quantize(xs.data, count: 1, cols: cols)
            for isa in 0...Int(pf2lora_cpu_isa()) {
                _ = pf2lora_quant_set_isa(Int32(isa))
                let a = Tensor(zeros: [rows]), b = Tensor(zeros: [rows])
                dotRows(m, xs.data, quantized: act, count: 1, rows: 0..<rows, a.data, stride: rows)
                dotRows(view, xs.data, quantized: act, count: 1, rows: 0..<rows, b.data, stride: rows)
                #expect(a.array.map(\.bitPattern) == b.array.map(\.bitPattern), "\(p) isa \(isa) \(rows) x \(cols)")
            }
        }
    }

    /// The prefill product at every precision: the sgemm of the widened panels equals, to f32
    /// rounding, x W^T computed in f64 from the stored values; panels of a few rows (the head's
    /// case) and an accumulating call included.
    @Test(arguments: WeightPrecision.allCases)
    func gemmRowsWidensPanelsExactly(_ p: WeightPrecision) {
        let rows = 100, cols = 64, n = 7
        let m = WeightMatrix(Self.randomMatrix(rows: rows, cols: cols, seed: 5, scale: 0.1)).converted(to: p)
        let w = m.toTensor()
        let x = Self.randomMatrix(rows: n, cols: cols, seed: 6)
        var panel = Tensor(zeros: [0])
        for maxPanel in [1 << 21, 3 * cols, 1] {
            let out = Tensor(zeros: [n, rows]); out.fill(0.5)
            gemmRows(x.data, rows: n, m, out.data, panel: &panel, accumulate: maxPanel == 1, maxPanelFloats: maxPanel)
            var worst = 0.0
            for i in 0..<n {
                for r in 0..<rows {
                    var ref = maxPanel == 1 ? 0.5 : 0.0, abs = 0.0
                    for k in 0..<cols { let t = Double(x.data[i * cols + k]) * Double(w.data[r * cols + k]); ref += t; abs += Swift.abs(t) }
                    worst = max(worst, Swift.abs(Double(out.data[i * rows + r]) - ref) / (abs + 0.5))
                }
            }
            #expect(worst <= Double(cols) * 0x1p-24, "\(p) panel \(maxPanel): \(worst)")
        }
    }

    /// A build for AVX2 CPUs refuses one without them with a line that says what to do; a CPU
    /// with them, or a generic build, runs.
    @Test func cpuRequirement() throws {
        let refused = try #require(pf2lora_cpu_requirement_error(1, Int32(PF2LORA_ISA_SCALAR)))
        #expect(String(cString: refused).contains("PF2LORA_TARGET_CPU=generic"))
        #expect(pf2lora_cpu_requirement_error(1, Int32(PF2LORA_ISA_AVX2)) == nil)
        #expect(pf2lora_cpu_requirement_error(0, Int32(PF2LORA_ISA_SCALAR)) == nil)
        #if arch(x86_64)
        #expect(pf2lora_cpu_isa() >= Int32(PF2LORA_ISA_AVX2), "the machine the tests run on has AVX2 (the build needs it)")
        #endif
    }
}
