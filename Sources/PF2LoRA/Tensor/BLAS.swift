import COpenBLAS

/// Matrix products, all on OpenBLAS. Matrices are row-major; shapes are written (rows, cols).
///
/// OpenBLAS runs single-threaded; a large product is split over a `WorkerPool` (the process-wide
/// one unless given), each participant one OpenBLAS call on its contiguous part of the output. Why:
/// OpenBLAS's own threads spin (calling `sched_yield`) for about 0.1 s after every threaded call
/// before they sleep, so every prefill left a third busy thread beside the two decode participants
/// on two cores: 2-thread q8_0 decode right after a 512-token prefill ran at 215-265 tok/s in half the
/// runs against 377-399 with the spinning cut short (`OPENBLAS_THREAD_TIMEOUT=4`; Benchmarks/README.md
/// "Two cores: contiguous shares, one pool, an honest read bound"). With one pool there is no third
/// thread, and a product that finds the pool busy (training beside serving) runs on its caller alone
/// instead of oversubscribing the cores.
public enum BLAS {
    /// OpenBLAS set to one thread, once, before its first product.
    private static let singleThreaded: Void = { openblas_set_num_threads(1) }()

    /// Sets the participants of the process-wide pool (`WorkerPool.shared`: decode steps and the
    /// large products here) if it has not been made yet; 0 keeps its default (`PF2LORA_THREADS`,
    /// else one per active core). OpenBLAS itself always runs one thread.
    public static func setThreads(_ n: Int) {
        _ = singleThreaded
        if n > 0 { WorkerPool.preferredThreads = n }
    }

    /// Threads a product runs on: the process-wide pool's participants.
    public static var threads: Int { WorkerPool.shared.count }

    /// OpenBLAS's own thread count (1 once any product or `setThreads` has run).
    static var openBLASThreads: Int { Int(openblas_get_num_threads()) }

    /// Products of fewer multiply-adds run on the caller alone (a pool job costs a few microseconds).
    static let splitWork = 1 << 20

    /// C = alpha * op(A) @ op(B) + beta * C on raw pointers.
    /// op(A) is (m, k), op(B) is (k, n), C is (m, n), with leading dimensions lda, ldb, ldc.
    /// From m * n * k >= `splitWork` on, C's columns (or its rows, when it has more rows than
    /// columns) are split over `pool`'s participants in contiguous parts.
    @inline(__always)
    public static func gemm(
        _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>,
        m: Int, n: Int, k: Int,
        transA: Bool = false, transB: Bool = false,
        lda: Int? = nil, ldb: Int? = nil, ldc: Int? = nil,
        alpha: Float = 1, beta: Float = 0, pool: WorkerPool? = nil
    ) {
        _ = singleThreaded
        let lda = lda ?? (transA ? m : k)
        let ldb = ldb ?? (transB ? k : n)
        let ldc = ldc ?? n
        let ta = transA ? CblasTrans : CblasNoTrans, tb = transB ? CblasTrans : CblasNoTrans
        let p = pool ?? WorkerPool.shared
        guard p.count > 1, m * n * k >= splitWork else {
            cblas_sgemm(CblasRowMajor, ta, tb, Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
            return
        }
        let byColumns = n >= m
        p.run { ctx in
            if byColumns {   // C[:, part] = op(A) op(B)[:, part]: B's rows (transposed) or columns `part`
                let part = ctx.share(n, align: 16)
                guard !part.isEmpty else { return }
                let bp = transB ? b + part.lowerBound * ldb : b + part.lowerBound
                cblas_sgemm(CblasRowMajor, ta, tb, Int32(m), Int32(part.count), Int32(k), alpha, a, Int32(lda), bp, Int32(ldb),
                            beta, c + part.lowerBound, Int32(ldc))
            } else {         // C[part, :] = op(A)[part, :] op(B)
                let part = ctx.share(m, align: 8)
                guard !part.isEmpty else { return }
                let ap = transA ? a + part.lowerBound : a + part.lowerBound * lda
                cblas_sgemm(CblasRowMajor, ta, tb, Int32(part.count), Int32(n), Int32(k), alpha, ap, Int32(lda), b, Int32(ldb),
                            beta, c + part.lowerBound * ldc, Int32(ldc))
            }
        }
    }

    /// y = alpha * op(A) @ x + beta * y, A is (m, n) row-major; y's elements split over `pool` as
    /// `gemm`'s columns are.
    @inline(__always)
    public static func gemv(
        _ a: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>,
        m: Int, n: Int, trans: Bool = false, lda: Int? = nil, alpha: Float = 1, beta: Float = 0, pool: WorkerPool? = nil
    ) {
        _ = singleThreaded
        let lda = lda ?? n
        let p = pool ?? WorkerPool.shared
        guard p.count > 1, m * n >= splitWork else {
            cblas_sgemv(CblasRowMajor, trans ? CblasTrans : CblasNoTrans, Int32(m), Int32(n), alpha, a, Int32(lda), x, 1, beta, y, 1)
            return
        }
        p.run { ctx in
            if trans {       // y (n) = A^T x: A's columns `part`
                let part = ctx.share(n, align: 16)
                guard !part.isEmpty else { return }
                cblas_sgemv(CblasRowMajor, CblasTrans, Int32(m), Int32(part.count), alpha, a + part.lowerBound, Int32(lda), x, 1,
                            beta, y + part.lowerBound, 1)
            } else {         // y (m) = A x: A's rows `part`
                let part = ctx.share(m, align: 16)
                guard !part.isEmpty else { return }
                cblas_sgemv(CblasRowMajor, CblasNoTrans, Int32(part.count), Int32(n), alpha, a + part.lowerBound * lda, Int32(lda), x, 1,
                            beta, y + part.lowerBound, 1)
            }
        }
    }

    /// y += alpha * x.
    @inline(__always)
    public static func axpy(_ n: Int, _ alpha: Float, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>) {
        cblas_saxpy(Int32(n), alpha, x, 1, y, 1)
    }

    /// Dot product of two length-n vectors.
    @inline(__always)
    public static func dot(_ n: Int, _ x: UnsafePointer<Float>, _ y: UnsafePointer<Float>) -> Float {
        cblas_sdot(Int32(n), x, 1, y, 1)
    }
}

extension Tensor {
    /// out = self @ other (+ out if accumulate), treating both as matrices.
    /// self (m, k) @ other (k, n) -> out (m, n); transpose flags apply to the stored layout.
    public func matmul(_ other: Tensor, into out: Tensor, transA: Bool = false, transB: Bool = false,
                       alpha: Float = 1, accumulate: Bool = false) {
        let m = transA ? cols : rows
        let k = transA ? rows : cols
        let n = transB ? other.rows : other.cols
        precondition((transB ? other.cols : other.rows) == k, "matmul: inner dims \(shape) x \(other.shape)")
        precondition(out.rows == m && out.cols == n, "matmul: out \(out.shape) for (\(m),\(n))")
        BLAS.gemm(data, other.data, out.data, m: m, n: n, k: k, transA: transA, transB: transB,
                  lda: cols, ldb: other.cols, ldc: n, alpha: alpha, beta: accumulate ? 1 : 0)
    }
}
