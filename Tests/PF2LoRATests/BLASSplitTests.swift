import Foundation
import Testing
@testable import PF2LoRA

/// `BLAS.gemm` / `BLAS.gemv` split over a worker pool: every transpose, leading dimension, alpha and
/// beta, split by columns and by rows, against a float64 triple loop (tolerance: 1e-5 relative to
/// the sum of |terms|, far above f32 rounding of a k <= 700 sum, far below any indexing error); and
/// OpenBLAS kept at one thread whatever `setThreads` asks (its own threads spun for ~0.1 s after
/// each call, beside the decode pool's: issue 14, session 13).
@Suite struct BLASSplitTests {
    static func reference(_ a: [Float], _ b: [Float], _ c0: [Float], m: Int, n: Int, k: Int, transA: Bool, transB: Bool,
                          lda: Int, ldb: Int, ldc: Int, alpha: Float, beta: Float) -> (value: [Double], scale: [Double]) {
        var out = [Double](repeating: 0, count: m * ldc), mag = out
        for i in 0..<m {
            for j in 0..<n {
                var s = 0.0, t = 0.0
                for p in 0..<k {
                    let x = Double(transA ? a[p * lda + i] : a[i * lda + p]), y = Double(transB ? b[j * ldb + p] : b[p * ldb + j])
                    s += x * y; t += abs(x * y)
                }
                out[i * ldc + j] = Double(alpha) * s + Double(beta) * Double(c0[i * ldc + j])
                mag[i * ldc + j] = abs(Double(alpha)) * t + abs(Double(beta) * Double(c0[i * ldc + j]))
            }
        }
        return (out, mag)
    }

    @Test(arguments: [(m: 200, n: 130, k: 70), (m: 33, n: 400, k: 90), (m: 512, n: 24, k: 96), (m: 7, n: 700, k: 300)])
    func gemmSplitMatchesTheDefinition(shape: (m: Int, n: Int, k: Int)) {
        let pool = WorkerPool(threads: 3)
        pool.adaptive = false
        let (m, n, k) = shape
        #expect(m * n * k >= BLAS.splitWork, "the shape must be split")
        var rng = SplitMix64(seed: UInt64(m * 1000 + n))
        func rand(_ c: Int) -> [Float] { (0..<c).map { _ in Float(Double.random(in: -1..<1, using: &rng)) } }
        for transA in [false, true] {
            for transB in [false, true] {
                for (alpha, beta) in [(Float(1), Float(0)), (Float(0.5), Float(1)), (Float(-2), Float(0.25))] {
                    let lda = (transA ? m : k) + 3, ldb = (transB ? k : n) + 5, ldc = n + 2
                    let a = rand((transA ? k : m) * lda), b = rand((transB ? n : k) * ldb), c0 = rand(m * ldc)
                    var c = c0
                    a.withUnsafeBufferPointer { ap in
                        b.withUnsafeBufferPointer { bp in
                            c.withUnsafeMutableBufferPointer { cp in
                                BLAS.gemm(ap.baseAddress!, bp.baseAddress!, cp.baseAddress!, m: m, n: n, k: k, transA: transA, transB: transB,
                                          lda: lda, ldb: ldb, ldc: ldc, alpha: alpha, beta: beta, pool: pool)
                            }
                        }
                    }
                    let (want, mag) = Self.reference(a, b, c0, m: m, n: n, k: k, transA: transA, transB: transB, lda: lda, ldb: ldb, ldc: ldc,
                                                     alpha: alpha, beta: beta)
                    var worst = 0.0, padding = true
                    for i in 0..<m {
                        for j in 0..<ldc {
                            let x = i * ldc + j
                            if j >= n { padding = padding && c[x] == c0[x]; continue }   // outside C: untouched
                            worst = max(worst, abs(Double(c[x]) - want[x]) / max(mag[x], 1e-30))
                        }
                    }
                    #expect(worst < 1e-5, "gemm \(shape) transA \(transA) transB \(transB) alpha \(alpha) beta \(beta): relative error \(worst)")
                    #expect(padding, "gemm \(shape): wrote outside C's columns")
                }
            }
        }
    }

    @Test func gemvSplitMatchesTheDefinition() {
        let pool = WorkerPool(threads: 2)
        pool.adaptive = false
        var rng = SplitMix64(seed: 7)
        let m = 1500, n = 900, lda = 905
        #expect(m * n >= BLAS.splitWork)
        let a = (0..<(m * lda)).map { _ in Float(Double.random(in: -1..<1, using: &rng)) }
        for trans in [false, true] {
            let xs = (0..<(trans ? m : n)).map { _ in Float(Double.random(in: -1..<1, using: &rng)) }
            let y0 = (0..<(trans ? n : m)).map { _ in Float(Double.random(in: -1..<1, using: &rng)) }
            var y = y0
            a.withUnsafeBufferPointer { ap in
                xs.withUnsafeBufferPointer { xp in
                    y.withUnsafeMutableBufferPointer { yp in
                        BLAS.gemv(ap.baseAddress!, xp.baseAddress!, yp.baseAddress!, m: m, n: n, trans: trans, lda: lda, alpha: 1.5, beta: -0.5, pool: pool)
                    }
                }
            }
            var worst = 0.0
            for i in 0..<y.count {
                var s = 0.0, t = 0.0
                for p in 0..<xs.count {
                    let w = Double(trans ? a[p * lda + i] : a[i * lda + p]) * Double(xs[p])
                    s += w; t += abs(w)
                }
                let want = 1.5 * s - 0.5 * Double(y0[i])
                worst = max(worst, abs(Double(y[i]) - want) / (1.5 * t + 0.5 * abs(Double(y0[i]))))
            }
            #expect(worst < 1e-5, "gemv trans \(trans): relative error \(worst)")
        }
    }

    /// OpenBLAS runs one thread: its own threads would spin beside the pool's after every product.
    @Test func openBLASStaysSingleThreaded() {
        BLAS.setThreads(2)
        #expect(BLAS.openBLASThreads == 1)
        let a = [Float](repeating: 1, count: 128 * 128)
        var c = [Float](repeating: 0, count: 128 * 128)
        c.withUnsafeMutableBufferPointer { cp in BLAS.gemm(a, a, cp.baseAddress!, m: 128, n: 128, k: 128) }
        #expect(c[0] == 128 && c[128 * 128 - 1] == 128)
        #expect(BLAS.openBLASThreads == 1)
    }
}
