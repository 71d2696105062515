import COpenBLAS

/// Matrix products, all on OpenBLAS. Matrices are row-major; shapes are written (rows, cols).
public enum BLAS {
    /// Sets OpenBLAS's thread count (0 keeps its default, which reads OPENBLAS_NUM_THREADS), and the
    /// size of the decode pool (`WorkerPool.shared`) if it has not been made yet.
    public static func setThreads(_ n: Int) {
        if n > 0 {
            openblas_set_num_threads(Int32(n))
            WorkerPool.preferredThreads = n
        }
    }

    public static var threads: Int { Int(openblas_get_num_threads()) }

    /// C = alpha * op(A) @ op(B) + beta * C on raw pointers.
    /// op(A) is (m, k), op(B) is (k, n), C is (m, n), with leading dimensions lda, ldb, ldc.
    @inline(__always)
    public static func gemm(
        _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>,
        m: Int, n: Int, k: Int,
        transA: Bool = false, transB: Bool = false,
        lda: Int? = nil, ldb: Int? = nil, ldc: Int? = nil,
        alpha: Float = 1, beta: Float = 0
    ) {
        let lda = lda ?? (transA ? m : k)
        let ldb = ldb ?? (transB ? k : n)
        let ldc = ldc ?? n
        cblas_sgemm(CblasRowMajor,
                    transA ? CblasTrans : CblasNoTrans,
                    transB ? CblasTrans : CblasNoTrans,
                    Int32(m), Int32(n), Int32(k), alpha,
                    a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    /// y = alpha * op(A) @ x + beta * y, A is (m, n) row-major.
    @inline(__always)
    public static func gemv(
        _ a: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>,
        m: Int, n: Int, trans: Bool = false, lda: Int? = nil, alpha: Float = 1, beta: Float = 0
    ) {
        cblas_sgemv(CblasRowMajor, trans ? CblasTrans : CblasNoTrans, Int32(m), Int32(n), alpha,
                    a, Int32(lda ?? n), x, 1, beta, y, 1)
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
