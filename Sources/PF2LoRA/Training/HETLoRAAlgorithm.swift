import Foundation

/// HETLoRA (Cho et al., "Heterogeneous LoRA for federated fine-tuning of on-device foundation models", 2024).
///
/// The server holds one global LoRA of rank r_max. Client k has its own rank r_k in [r_min, r_max]
/// (drawn once from the seed, independent of the data). Each round, for every sampled client:
/// 1. distribution by truncation: the client gets A[:r_k, :] and B[:, :r_k];
/// 2. local training (AdamW, `localSteps`) on f_k + lambda * ||s B_tail A_tail||_F, the tail being the
///    last gamma ranks of its LoRA (the rank self-pruning regularizer);
/// 3. rank self-pruning: if afterwards ||s B_tail A_tail||_F < pruneRatio * ||s B A||_F and r_k - gamma >= r_min,
///    the client drops its tail: r_k <- r_k - gamma (the dropped components are not uploaded);
/// 4. zero-padded aggregation: uploads are padded with zeros to rank r_max and averaged with the paper's
///    sparsity weights ||s B_k A_k||_F / Z (or n_k / n, `hetloraAggregation = .examples`).
/// A client uses the global LoRA truncated to its current rank. One scale s = alpha / r for every rank
/// (a truncation keeps the meaning of the components it keeps).
struct HETLoRAAlgorithm: FederatedAlgorithm {
    let task: FederatedTask
    let config: FederatedConfig
    let rMin: Int, rMax: Int
    var global: ParameterSet
    var ranks: [Int]
    var scale: Float { config.singleScale }

    init(task: FederatedTask, config: FederatedConfig, rng: inout RNG) throws {
        self.task = task; self.config = config
        rMin = config.hetloraMinRank ?? max(1, config.rank - config.rank2)
        rMax = config.hetloraMaxRank ?? (config.rank + config.rank2)
        guard rMin >= 1, rMin <= rMax, config.hetloraGamma >= 1 else {
            throw FederatedError.badConfig("HETLoRA ranks need 1 <= min (\(rMin)) <= max (\(rMax)) and gamma >= 1")
        }
        global = makeLoRAParameters(modules: task.modules, rank: rMax, level: .shared, rng: &rng)
        let lo = rMin, span = rMax - rMin + 1
        ranks = (0..<task.clientCount).map { _ in lo + rng.int(below: span) }
    }

    var trainableParameters: [Int] { ranks.map { loraParameterCount(task.modules, rank: $0) } }
    var uploadedParameters: [Int] { trainableParameters }
    var clientRanks: [Int]? { ranks }

    /// The first `rank` components of every module of a rank-r_max set.
    func truncate(_ p: ParameterSet, to rank: Int) -> ParameterSet {
        let out = ParameterSet()
        for m in task.modules {
            let (a, b) = loraPair(p, level: .shared, module: m.name)
            let full = a.rows
            let at = Tensor(zeros: [rank, m.dIn]), bt = Tensor(zeros: [m.dOut, rank])
            at.data.update(from: a.data, count: rank * m.dIn)
            for i in 0..<m.dOut { (bt.data + i * rank).update(from: b.data + i * full, count: rank) }
            out.insert(LoRANames.a(m.name), at); out.insert(LoRANames.b(m.name), bt)
        }
        return out
    }

    /// A rank-r_max set holding the first `keep` components of `p`, zeros elsewhere.
    func pad(_ p: ParameterSet, keep: Int) -> ParameterSet {
        let out = global.zerosLike()
        for m in task.modules {
            let (a, b) = loraPair(p, level: .shared, module: m.name)
            let (ao, bo) = loraPair(out, level: .shared, module: m.name)
            let r = a.rows
            ao.data.update(from: a.data, count: keep * m.dIn)
            for i in 0..<m.dOut { (bo.data + i * rMax).update(from: b.data + i * r, count: keep) }
        }
        return out
    }

    /// ||s * B[:, lo..<hi] A[lo..<hi, :]||_F over all modules, and (if `grad` is given) adds
    /// `weight` x its gradient into `grad`. Uses the Gram matrices, never forming B A:
    /// N^2 = s^2 tr((B_t^T B_t)(A_t A_t^T)),  dN/dB_t = s^2 B_t (A_t A_t^T) / N,  dN/dA_t = s^2 (B_t^T B_t) A_t / N.
    func blockNorm(_ p: ParameterSet, lo: Int, hi: Int, addGradient grad: ParameterSet? = nil, weight: Float = 0) -> Float {
        var total = 0.0
        var grams: [(String, [Double], [Double])] = []
        let g = hi - lo
        for m in task.modules {
            let (a, b) = loraPair(p, level: .shared, module: m.name)
            let r = a.rows
            var pm = [Double](repeating: 0, count: g * g), qm = [Double](repeating: 0, count: g * g)
            for i in 0..<g { for j in 0..<g {
                var sp = 0.0, sq = 0.0
                for o in 0..<m.dOut { sp += Double(b.data[o * r + lo + i]) * Double(b.data[o * r + lo + j]) }
                for c in 0..<m.dIn { sq += Double(a.data[(lo + i) * m.dIn + c]) * Double(a.data[(lo + j) * m.dIn + c]) }
                pm[i * g + j] = sp; qm[i * g + j] = sq
            } }
            for i in 0..<g { for j in 0..<g { total += pm[i * g + j] * qm[j * g + i] } }
            grams.append((m.name, pm, qm))
        }
        let s2 = Double(scale) * Double(scale)
        let norm = (s2 * max(total, 0)).squareRoot()
        if let grad, norm > 0, weight != 0 {
            let f = Double(weight) * s2 / norm
            for (name, pm, qm) in grams {
                let m = task.modules.first { $0.name == name }!
                let (a, b) = loraPair(p, level: .shared, module: name)
                let (ga, gb) = loraPair(grad, level: .shared, module: name)
                let r = a.rows
                for o in 0..<m.dOut { for i in 0..<g {
                    var s = 0.0
                    for j in 0..<g { s += Double(b.data[o * r + lo + j]) * qm[j * g + i] }
                    gb.data[o * r + lo + i] += Float(f * s)
                } }
                for i in 0..<g { for c in 0..<m.dIn {
                    var s = 0.0
                    for j in 0..<g { s += pm[i * g + j] * Double(a.data[(lo + j) * m.dIn + c]) }
                    ga.data[(lo + i) * m.dIn + c] += Float(f * s)
                } }
            }
        }
        return Float(norm)
    }

    mutating func round(_ t: Int, clients: [Int], lrFactor: Float, rng: (Int) -> RNG) -> [Int: Float] {
        var uploads: [ParameterSet] = [], weights: [Float] = [], losses: [Int: Float] = [:]
        let gamma = config.hetloraGamma
        for k in clients {
            var r = rng(k)
            let rk = ranks[k]
            let x = truncate(global, to: rk), g = x.zerosLike(), opt = makeAdamW(config)
            let tail = max(0, rk - gamma)
            var sum: Float = 0
            for _ in 0..<config.localSteps {
                sum += task.lossAndGradients(client: k, adapter: TwoLevelAdapter(shared: x, sharedScale: scale),
                                             sharedGrad: g, localGrad: nil, rng: &r)
                if config.hetloraLambda > 0 { _ = blockNorm(x, lo: tail, hi: rk, addGradient: g, weight: config.hetloraLambda) }
                maybeClip(g, config)
                opt.step(x, g, lr: config.upperLR * lrFactor)
            }
            losses[k] = sum / Float(config.localSteps)
            // Rank self-pruning.
            let whole = blockNorm(x, lo: 0, hi: rk)
            if rk - gamma >= rMin, blockNorm(x, lo: tail, hi: rk) < config.hetloraPruneRatio * whole {
                ranks[k] = rk - gamma
            }
            uploads.append(pad(x, keep: ranks[k]))
            weights.append(config.hetloraAggregation == .sparsity ? blockNorm(x, lo: 0, hi: ranks[k])
                                                                  : Float(task.exampleCount(client: k)))
        }
        var z = weights.reduce(0, +)
        if !(z > 0) { weights = task.exampleShares(clients); z = 1 }
        global.setWeightedAverage(of: uploads, weights: weights.map { $0 / z })
        return losses
    }

    func evaluationAdapter(client k: Int, rng: inout RNG) -> TwoLevelAdapter {
        TwoLevelAdapter(shared: truncate(global, to: ranks[k]), sharedScale: scale)
    }
}
