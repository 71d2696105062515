import Foundation

/// Which part of a client's data to evaluate on.
public enum Split: String, Sendable, Codable { case train, valid, test }

/// A learning problem split over clients, seen by the federated algorithms only through LoRA
/// adapters on a frozen base. Two implementations: the synthetic linear model (`LinearLoRATask`)
/// and the GPT-2 causal LM.
///
/// Contract:
/// - The task owns its data, its minibatch size and its loss; the algorithms own the parameters.
/// - `lossAndGradients` draws one minibatch of `client`'s training split with `rng` (the only source of
///   randomness, so runs are reproducible) and returns its mean loss. It **overwrites** the gradient
///   sets it is given and computes only those: pass `nil` for a level whose gradient is not wanted
///   (its backward work is skipped). A gradient set has the layout of the matching adapter level.
/// - Ranks are read from the adapter's tensor shapes; the scales come with the adapter.
/// - Calls for different clients may not run concurrently on one task instance (tasks keep scratch buffers).
public protocol FederatedTask: AnyObject {
    /// Number of clients, indexed 0..<clientCount.
    var clientCount: Int { get }
    /// The adapted layers, in a fixed order.
    var modules: [LoRAModule] { get }
    /// Number of training examples of `client` (n_k, the FedAvg weight numerator).
    func exampleCount(client: Int) -> Int
    /// Mean loss on one minibatch of `client`'s training data and, into the given sets, its gradients
    /// with respect to the shared level (A, B) and the client level (C, D).
    func lossAndGradients(client: Int, adapter: TwoLevelAdapter, sharedGrad: ParameterSet?,
                          localGrad: ParameterSet?, rng: inout RNG) -> Float
    /// Mean loss over the whole `split` of `client` (no gradients).
    func evaluate(client: Int, adapter: TwoLevelAdapter, split: Split) -> Float
}

extension FederatedTask {
    /// Example shares p_k = n_k / sum_j n_j over `clients`.
    public func exampleShares(_ clients: [Int]) -> [Float] {
        let n = clients.map { Float(exampleCount(client: $0)) }
        let total = n.reduce(0, +)
        return n.map { $0 / total }
    }
}
