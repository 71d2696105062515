import Foundation

/// An ordered set of named tensors: the trainable parameters of one adapter level, or their
/// gradients, or an optimizer's state. Names are unique; the order is the insertion order and is
/// the order every reduction (norm, dot) runs in, so results are deterministic.
///
/// A reference type, like `Tensor`: arithmetic methods write in place; `clone()` makes a deep copy.
public final class ParameterSet {
    /// Names in order.
    public private(set) var names: [String] = []
    private var byName: [String: Tensor] = [:]

    public init() {}

    /// A set holding `entries` in order (the tensors are not copied).
    public init(_ entries: [(String, Tensor)]) {
        for (n, t) in entries { insert(n, t) }
    }

    /// Adds a tensor under a new name (the tensor is not copied).
    public func insert(_ name: String, _ tensor: Tensor) {
        precondition(byName[name] == nil, "ParameterSet: duplicate name \(name)")
        names.append(name)
        byName[name] = tensor
    }

    public subscript(name: String) -> Tensor? { byName[name] }

    /// The tensor called `name`; traps if there is none (a programming error).
    public func tensor(_ name: String) -> Tensor {
        guard let t = byName[name] else { preconditionFailure("ParameterSet: no tensor \(name); have \(names)") }
        return t
    }

    /// (name, tensor) pairs in order.
    public var entries: [(String, Tensor)] { names.map { ($0, byName[$0]!) } }

    /// Total number of scalars.
    public var scalarCount: Int { names.reduce(0) { $0 + byName[$1]!.count } }

    /// A deep copy.
    public func clone() -> ParameterSet { ParameterSet(entries.map { ($0.0, $0.1.clone()) }) }

    /// A set of zero tensors with the same names and shapes.
    public func zerosLike() -> ParameterSet { ParameterSet(entries.map { ($0.0, Tensor(zeros: $0.1.shape)) }) }

    /// True if `other` has the same names in the same order with the same shapes.
    public func sameLayout(as other: ParameterSet) -> Bool {
        names == other.names && names.allSatisfy { byName[$0]!.shape == other.byName[$0]!.shape }
    }

    private func check(_ other: ParameterSet) {
        precondition(sameLayout(as: other), "ParameterSet: layouts differ: \(names) vs \(other.names)")
    }

    /// Sets every tensor to zero.
    public func zero() { for t in byName.values { t.fill(0) } }

    /// Copies the values of `other` (same layout).
    public func copy(from other: ParameterSet) {
        check(other)
        for n in names { byName[n]!.copy(from: other.byName[n]!) }
    }

    /// self *= a.
    public func scale(_ a: Float) {
        for t in byName.values { for i in 0..<t.count { t.data[i] *= a } }
    }

    /// self += a * x.
    public func axpy(_ a: Float, _ x: ParameterSet) {
        check(x)
        for n in names {
            let t = byName[n]!
            BLAS.axpy(t.count, a, x.byName[n]!.data, t.data)
        }
    }

    /// Sum of squares of every element, accumulated in double precision.
    public func squaredNorm() -> Double {
        var s = 0.0
        for n in names {
            let t = byName[n]!
            let d = Double(BLAS.dot(t.count, t.data, t.data))
            s += d
        }
        return s
    }

    /// The global L2 norm over all tensors (as `torch.nn.utils.clip_grad_norm_` computes it).
    public func globalNorm() -> Float { Float(squaredNorm().squareRoot()) }

    /// sum_n <self_n, other_n>.
    public func dot(_ other: ParameterSet) -> Double {
        check(other)
        var s = 0.0
        for n in names { s += Double(BLAS.dot(byName[n]!.count, byName[n]!.data, other.byName[n]!.data)) }
        return s
    }

    /// Writes sum_i w_i * sets_i into self (FedAvg). Weights are used as given (normalize them first).
    public func setWeightedAverage(of sets: [ParameterSet], weights: [Float]) {
        precondition(sets.count == weights.count && !sets.isEmpty)
        zero()
        for (s, w) in zip(sets, weights) { axpy(w, s) }
    }

    /// True when every element is finite.
    public var allFinite: Bool {
        byName.values.allSatisfy { t in (0..<t.count).allSatisfy { t.data[$0].isFinite } }
    }
}
