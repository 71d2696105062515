import Foundation

/// Singular values of a low-rank update and the rank rule that reads a learned rank off them.
///
/// A client's effective update of a module is
///
///     Delta = s1 B A + s2 D C = B' A',   B' = [s1 B | s2 D] (dOut, R),  A' = [A ; C] (R, dIn),  R = r + r2
///
/// Its singular values are those of the small R x R matrix R_B R_A^T, where B' = Q_B R_B and
/// A'^T = Q_A R_A are thin QR factorizations (Delta = Q_B (R_B R_A^T) Q_A^T with orthonormal Q's).
/// Cost O((dIn + dOut) R^2); Delta itself is never formed.
public enum LearnedRank {
    /// The relative threshold of the rank rule: a singular value counts when it exceeds
    /// `defaultTau` x the largest one. One value for every client and module (see docs/METHOD.md).
    public static let defaultTau: Float = 0.1

    /// Number of singular values strictly above tau x the largest (0 for a zero update).
    public static func rank(_ singularValues: [Float], tau: Float = defaultTau) -> Int {
        guard let top = singularValues.max(), top > 0 else { return 0 }
        return singularValues.filter { $0 > tau * top }.count
    }

    /// Singular values, descending, of sum_i scale_i * up_i @ down_i, where up_i is (dOut, r_i) and
    /// down_i is (r_i, dIn). Returns sum_i r_i values (trailing ones are 0 when the rank is lower).
    public static func singularValues(terms: [(up: Tensor, down: Tensor, scale: Float)]) -> [Float] {
        guard let first = terms.first else { return [] }
        let dOut = first.up.rows, dIn = first.down.cols
        let rTotal = terms.reduce(0) { $0 + $1.down.rows }
        guard rTotal > 0 else { return [] }
        // B' (dOut, R) and A'^T (dIn, R), column-major in double for the QR.
        var bp = [Double](repeating: 0, count: dOut * rTotal)
        var apT = [Double](repeating: 0, count: dIn * rTotal)
        var col = 0
        for t in terms {
            precondition(t.up.rows == dOut && t.down.cols == dIn && t.up.cols == t.down.rows, "LearnedRank: shapes differ")
            let r = t.down.rows
            for j in 0..<r {
                for i in 0..<dOut { bp[(col + j) * dOut + i] = Double(t.scale) * Double(t.up.data[i * r + j]) }
                for i in 0..<dIn { apT[(col + j) * dIn + i] = Double(t.down.data[j * dIn + i]) }
            }
            col += r
        }
        let rb = householderR(&bp, rows: dOut, cols: rTotal)   // (R', R) upper, R' = min(dOut, R)
        let ra = householderR(&apT, rows: dIn, cols: rTotal)
        // M = R_B R_A^T: (kb, R) @ (R, ka) -> (kb, ka)
        let kb = min(dOut, rTotal), ka = min(dIn, rTotal)
        var mat = [Double](repeating: 0, count: kb * ka)
        for i in 0..<kb { for j in 0..<ka {
            var s = 0.0
            for l in 0..<rTotal { s += rb[i * rTotal + l] * ra[j * rTotal + l] }
            mat[i * ka + j] = s
        } }
        var sv = jacobiSingularValues(mat, rows: kb, cols: ka).map { Float($0) }
        while sv.count < rTotal { sv.append(0) }
        return sv
    }

    /// Singular values of each module's effective update for one client (either level may be nil).
    public static func spectra(modules: [LoRAModule], adapter: TwoLevelAdapter) -> [String: [Float]] {
        var out: [String: [Float]] = [:]
        for m in modules {
            var terms: [(up: Tensor, down: Tensor, scale: Float)] = []
            if let s = adapter.shared {
                let (a, b) = loraPair(s, level: .shared, module: m.name); terms.append((b, a, adapter.sharedScale))
            }
            if let l = adapter.local {
                let (c, d) = loraPair(l, level: .client, module: m.name); terms.append((d, c, adapter.localScale))
            }
            out[m.name] = singularValues(terms: terms)
        }
        return out
    }

    /// The R factor (min(rows, cols), cols), row-major, of a column-major (rows, cols) matrix,
    /// by Householder reflections (stable also when the columns are dependent).
    static func householderR(_ a: inout [Double], rows: Int, cols: Int) -> [Double] {
        let k = min(rows, cols)
        for j in 0..<k {
            var norm = 0.0
            for i in j..<rows { norm += a[j * rows + i] * a[j * rows + i] }
            norm = norm.squareRoot()
            if norm == 0 { continue }
            let alpha = a[j * rows + j] > 0 ? -norm : norm
            // v = x - alpha e1, stored in place of column j below (and at) the diagonal.
            a[j * rows + j] -= alpha
            var vv = 0.0
            for i in j..<rows { vv += a[j * rows + i] * a[j * rows + i] }
            if vv > 0 {
                for c in (j + 1)..<max(j + 1, cols) {
                    var dot = 0.0
                    for i in j..<rows { dot += a[j * rows + i] * a[c * rows + i] }
                    let f = 2 * dot / vv
                    for i in j..<rows { a[c * rows + i] -= f * a[j * rows + i] }
                }
            }
            a[j * rows + j] = alpha
            for i in (j + 1)..<max(j + 1, rows) { a[j * rows + i] = 0 }
        }
        var r = [Double](repeating: 0, count: k * cols)
        for i in 0..<k { for c in i..<cols { r[i * cols + c] = a[c * rows + i] } }
        return r
    }

    /// Singular values, descending, of a small row-major (rows, cols) matrix by one-sided Jacobi.
    static func jacobiSingularValues(_ m: [Double], rows: Int, cols: Int) -> [Double] {
        // Work on the columns of M^T if M is wide, so that there are at most `rows` columns.
        var n = cols, len = rows
        var u = [Double](repeating: 0, count: rows * cols)   // column-major: column c at c*len
        if cols <= rows {
            for c in 0..<cols { for i in 0..<rows { u[c * rows + i] = m[i * cols + c] } }
        } else {
            n = rows; len = cols
            for c in 0..<rows { for i in 0..<cols { u[c * cols + i] = m[c * cols + i] } }
        }
        for _ in 0..<60 {
            var rotated = false
            for p in 0..<n { for q in (p + 1)..<max(p + 1, n) {
                var alpha = 0.0, beta = 0.0, gamma = 0.0
                for i in 0..<len {
                    let x = u[p * len + i], y = u[q * len + i]
                    alpha += x * x; beta += y * y; gamma += x * y
                }
                if abs(gamma) <= 1e-15 * (alpha * beta).squareRoot() || gamma == 0 { continue }
                rotated = true
                let zeta = (beta - alpha) / (2 * gamma)
                let t = (zeta >= 0 ? 1.0 : -1.0) / (abs(zeta) + (1 + zeta * zeta).squareRoot())
                let cs = 1 / (1 + t * t).squareRoot(), sn = cs * t
                for i in 0..<len {
                    let x = u[p * len + i], y = u[q * len + i]
                    u[p * len + i] = cs * x - sn * y
                    u[q * len + i] = sn * x + cs * y
                }
            } }
            if !rotated { break }
        }
        var sv = (0..<n).map { c -> Double in
            var s = 0.0
            for i in 0..<len { s += u[c * len + i] * u[c * len + i] }
            return s.squareRoot()
        }
        sv.sort(by: >)
        return sv
    }
}
