import Foundation

/// The synthetic rank experiment: PF2LoRA and every baseline on one synthetic federation,
/// with PF2LoRA's learned ranks read off its effective updates (docs/SYNTHETIC.md).
public struct SyntheticExperiment {
    public struct ClientRow: Codable {
        public let client: Int
        public let trainCount: Int
        public let trueRank: Int
        public let trueSingularValues: [Float]
        /// PF2LoRA's effective update s1 B A + s2 D_k C_k.
        public let learnedSingularValues: [Float]
        public let learnedRank: Int
        /// ||Delta_k - Delta_k*||_F / ||Delta_k*||_F for PF2LoRA.
        public let relativeError: Float
        /// Test MSE per method (raw value of the method name).
        public let testMSE: [String: Float]
        /// Singular values of every method's effective update for this client (raw method name): the
        /// control for the learned rank (a single-level update read with the same rule).
        public let spectraByMethod: [String: [Float]]
    }
    public struct MethodSummary: Codable {
        public let method: String
        public let name: String
        public let meanTestMSE: Float
        /// Mean valid MSE of the adapters the method ends with (after FedAvg+FT's fine-tuning): what a
        /// selection on the valid split compares.
        public let meanValidMSE: Float
        public let trainableParametersPerClient: Int
        public let uploadedParametersPerRound: Int
        public let seconds: Double
        public let roundsMeanTrainLoss: [Float]
        /// (round, mean valid MSE) at the evaluated rounds.
        public let validCurve: [[Float]]
        public let hetloraFinalRanks: [Int]?
    }
    public struct Report: Codable {
        public let synthetic: SyntheticConfig
        public let federated: FederatedConfig
        public let tau: Float
        public let clients: [ClientRow]
        public let methods: [MethodSummary]
        /// Every tau in (lo, hi) gives every client its true rank; nil when no tau does.
        public let admissibleTau: [Float]?
        public let ranksCorrect: Int
        public let noiseFloor: Float
    }

    public let synthetic: SyntheticConfig
    public let federated: FederatedConfig
    public let methods: [FederatedMethod]
    public let tau: Float

    public init(synthetic: SyntheticConfig, federated: FederatedConfig, methods: [FederatedMethod] = FederatedMethod.allCases,
                tau: Float = LearnedRank.defaultTau) {
        self.synthetic = synthetic; self.federated = federated; self.methods = methods; self.tau = tau
    }

    /// Runs every method and returns the report with the raw results.
    public func run(log: ((String) -> Void)? = nil) throws -> (report: Report, results: [FederatedResult], federation: SyntheticFederation) {
        let fed = SyntheticFederation(synthetic)
        let task = fed.task
        log?("synthetic: \(synthetic.clients) clients, dIn \(synthetic.dIn), dOut \(synthetic.dOut), true ranks \(fed.truths.map(\.rank)), n_k \(fed.truths.map(\.trainCount))")
        var results: [FederatedResult] = []
        for m in methods {
            let res = try runFederated(m, task: task, config: federated, log: log)
            log?(String(format: "%@: mean test MSE %.5f (%.1fs)", m.displayName, res.meanTestLoss, res.seconds))
            results.append(res)
        }
        var rows: [ClientRow] = []
        let pf = results.first { $0.method == .pf2lora }
        var lo: Float = 0, hi: Float = 1
        for k in 0..<task.clientCount {
            var learned: [Float] = [], rank = -1, relErr: Float = .nan
            if let pf {
                learned = LearnedRank.spectra(modules: task.modules, adapter: pf.clientAdapters[k])[task.module.name] ?? []
                rank = LearnedRank.rank(learned, tau: tau)
                relErr = Self.relativeError(pf.clientAdapters[k], module: task.module, truth: fed.deltas[k])
                let top = learned.max() ?? 1, tr = fed.truths[k].rank
                if tr >= 1, tr <= learned.count { hi = min(hi, learned[tr - 1] / top) }
                if tr < learned.count { lo = max(lo, learned[tr] / top) }
            }
            var mse: [String: Float] = [:], spectra: [String: [Float]] = [:]
            for r in results {
                mse[r.method.rawValue] = r.testLoss[k]
                spectra[r.method.rawValue] = LearnedRank.spectra(modules: task.modules, adapter: r.clientAdapters[k])[task.module.name] ?? []
            }
            rows.append(ClientRow(client: k, trainCount: fed.truths[k].trainCount, trueRank: fed.truths[k].rank,
                                  trueSingularValues: fed.truths[k].singularValues, learnedSingularValues: learned,
                                  learnedRank: rank, relativeError: relErr, testMSE: mse, spectraByMethod: spectra))
        }
        let summaries = results.map { r in
            MethodSummary(method: r.method.rawValue, name: r.method.displayName, meanTestMSE: r.meanTestLoss,
                          meanValidMSE: r.validLoss.reduce(0, +) / Float(max(1, r.validLoss.count)),
                          trainableParametersPerClient: r.trainableParameters.max() ?? 0,
                          uploadedParametersPerRound: r.uploadedParameters.max() ?? 0, seconds: r.seconds,
                          roundsMeanTrainLoss: r.rounds.map(\.meanTrainLoss),
                          validCurve: r.rounds.compactMap { rec in rec.meanValidLoss.map { [Float(rec.round), $0] } },
                          hetloraFinalRanks: r.clientRanks)
        }
        let report = Report(synthetic: synthetic, federated: federated, tau: tau, clients: rows, methods: summaries,
                            admissibleTau: (pf != nil && lo < hi) ? [lo, hi] : nil,
                            ranksCorrect: rows.filter { $0.learnedRank == $0.trueRank }.count,
                            noiseFloor: synthetic.noiseStd * synthetic.noiseStd)
        return (report, results, fed)
    }

    /// ||Delta - truth||_F / ||truth||_F with Delta formed densely (small synthetic dims only).
    static func relativeError(_ a: TwoLevelAdapter, module m: LoRAModule, truth: Tensor) -> Float {
        let delta = Tensor(zeros: [m.dOut, m.dIn])
        if let s = a.shared {
            let (aa, b) = loraPair(s, level: .shared, module: m.name)
            b.matmul(aa, into: delta, alpha: a.sharedScale, accumulate: true)     // (dOut,r) @ (r,dIn)
        }
        if let l = a.local {
            let (c, d) = loraPair(l, level: .client, module: m.name)
            d.matmul(c, into: delta, alpha: a.localScale, accumulate: true)
        }
        var num = 0.0, den = 0.0
        for i in 0..<delta.count {
            let e = Double(delta.data[i] - truth.data[i]); num += e * e; den += Double(truth.data[i]) * Double(truth.data[i])
        }
        return Float((num / max(den, 1e-30)).squareRoot())
    }

    // MARK: - Output files

    /// results.md: the per-client table, the mean row, the method summary and the settings.
    public static func markdown(_ r: Report) -> String {
        var head = ["client", "n_k", "true rank", "PF2LoRA rank"]
        var align: [MarkdownTable.Alignment] = [.right, .right, .right, .right]
        for m in r.methods { head.append("\(m.name) MSE"); align.append(.right) }
        var t = MarkdownTable(head, align: align)
        for c in r.clients {
            var row = ["\(c.client)", "\(c.trainCount)", "\(c.trueRank)", c.learnedRank >= 0 ? "\(c.learnedRank)" : "-"]
            for m in r.methods { row.append(String(format: "%.5f", c.testMSE[m.method] ?? .nan)) }
            t.add(row)
        }
        var mean = ["mean", "\(r.clients.map(\.trainCount).reduce(0, +) / max(1, r.clients.count))", "",
                    r.clients.contains { $0.learnedRank >= 0 } ? "\(r.ranksCorrect)/\(r.clients.count) exact" : "-"]
        for m in r.methods { mean.append(String(format: "**%.5f**", m.meanTestMSE)) }
        t.add(mean)

        var s = MarkdownTable(["method", "mean test MSE", "trainable params / client", "uploaded / round", "seconds"],
                              align: [.left, .right, .right, .right, .right])
        for m in r.methods {
            s.add([m.name, String(format: "%.5f", m.meanTestMSE), "\(m.trainableParametersPerClient)",
                   "\(m.uploadedParametersPerRound)", String(format: "%.1f", m.seconds)])
        }
        let f = r.federated, y = r.synthetic
        var out = "# Synthetic rank experiment (seed \(y.seed))\n\n"
        out += t.render() + "\n"
        out += "Test MSE on \(y.testCount) held-out examples per client; the noise floor is \(String(format: "%.4f", r.noiseFloor)) (noise std \(y.noiseStd)). "
        out += "Learned rank = number of singular values of s1 B A + s2 D_k C_k above tau = \(r.tau) x the largest"
        if let a = r.admissibleTau {
            out += String(format: "; every tau in (%.3f, %.3f) gives every client its true rank.\n\n", a[0], a[1])
        } else { out += "; no single tau recovers every client's rank in this run.\n\n" }
        out += s.render() + "\n"
        out += "Settings: \(y.clients) clients, d_in \(y.dIn), d_out \(y.dOut), r \(f.rank) (alpha \(f.alpha)), r2 \(f.rank2) (alpha2 \(f.alpha2)), "
        out += "baseline rank \(f.singleRank), \(f.rounds) rounds, \(f.localSteps) local steps, \(f.lowerSteps) lower steps, "
        out += "upper AdamW lr \(f.upperLR), lower SGD lr \(f.lowerLR), batch \(y.batchSize), seed \(f.seed).\n"
        return out
    }

    /// spectra.svg: per client, learned singular values (PF2LoRA) against the truth, log scale, threshold line.
    public static func spectraSVG(_ r: Report) -> String {
        let panels: [(Double, Double, Double, Double) -> String] = r.clients.map { c in
            var p = LinePlot(title: "client \(c.client): true rank \(c.trueRank), learned \(c.learnedRank)",
                             xLabel: "index", yLabel: "singular value", logY: true)
            p.showLegend = c.client == 0
            let n = max(c.learnedSingularValues.count, c.trueSingularValues.count)
            p.add(.init(name: "learned", x: (1...max(1, c.learnedSingularValues.count)).map(Double.init),
                        y: c.learnedSingularValues.map { Double(max($0, 1e-9)) }, color: SVG.palette[0], markers: true))
            p.add(.init(name: "truth", x: (1...max(1, c.trueSingularValues.count)).map(Double.init),
                        y: c.trueSingularValues.map(Double.init), color: SVG.palette[2], dashed: true, markers: true))
            let top = Double(c.learnedSingularValues.max() ?? 1)
            p.hLines = [(Double(r.tau) * top, "tau x max")]
            _ = n
            return { x, y, w, h in p.render(x: x, y: y, width: w, height: h) }
        }
        return SVG.grid(panels, columns: 4, panelWidth: 330, panelHeight: 260,
                        title: "Singular values of each client's learned update (PF2LoRA) vs truth")
    }

    /// loss.svg: mean train loss per round and mean valid MSE at evaluated rounds, per method.
    public static func lossSVG(_ r: Report) -> String {
        var train = LinePlot(title: "Mean client training loss per round", xLabel: "round", yLabel: "train MSE (minibatch)", logY: true)
        var valid = LinePlot(title: "Mean client validation MSE", xLabel: "round", yLabel: "valid MSE", logY: true)
        for (i, m) in r.methods.enumerated() {
            let color = SVG.palette[i % SVG.palette.count]
            train.add(.init(name: m.name, x: m.roundsMeanTrainLoss.indices.map { Double($0 + 1) },
                            y: m.roundsMeanTrainLoss.map(Double.init), color: color))
            valid.add(.init(name: m.name, x: m.validCurve.map { Double($0[0]) }, y: m.validCurve.map { Double($0[1]) },
                            color: color, markers: true))
        }
        valid.hLines = [(Double(r.noiseFloor), "noise floor")]
        return SVG.grid([{ train.render(x: $0, y: $1, width: $2, height: $3) }, { valid.render(x: $0, y: $1, width: $2, height: $3) }],
                        columns: 2, panelWidth: 620, panelHeight: 420)
    }

    /// Writes results.md, results.json, spectra.svg, loss.svg and mse.svg into `dir`.
    public static func write(_ r: Report, to dir: String) throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        func put(_ name: String, _ s: String) throws {
            try s.write(toFile: (dir as NSString).appendingPathComponent(name), atomically: true, encoding: .utf8)
        }
        try put("results.md", markdown(r))
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        enc.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        try put("results.json", String(decoding: try enc.encode(r), as: UTF8.self))
        try put("spectra.svg", spectraSVG(r))
        try put("loss.svg", lossSVG(r))
        var bars = BarChart(title: "Test MSE per client", yLabel: "test MSE", categories: r.clients.map { "client \($0.client)" }, logY: true)
        for m in r.methods { bars.add(m.name, r.clients.map { Double($0.testMSE[m.method] ?? .nan) }) }
        try put("mse.svg", bars.svg())
    }
}
