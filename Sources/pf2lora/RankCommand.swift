import ArgumentParser
import Foundation
import PF2LoRA

/// `pf2lora adapters rank`: the learned rank of a client's effective update, per module.
struct RankCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rank",
        abstract: "Singular values and learned rank of a client's effective update s1 B A + s2 D_k C_k, per module.",
        discussion: """
        Uses the store's current shared and client versions (what `serve` gives the client). The rank \
        of a module is the number of singular values above tau x the largest (docs/METHOD.md: one tau \
        for every client and module). Prints a Markdown table per module and a summary; --json prints \
        JSON instead; --svg writes the spectra plot.
        """)

    @Option(help: "Model folder (for the base fingerprint the store checks).") var model: String = "models/debian-llama"
    @Option(help: "The store root.") var store: String = "adapters"
    @Option(help: "The client id.") var client: String
    @Option(help: "Rank threshold relative to the largest singular value.") var tau: Float = LearnedRank.defaultTau
    @Flag(help: "Print JSON.") var json = false
    @Option(help: "Write the spectra plot (SVG) here.") var svg: String?

    func validate() throws {
        guard tau > 0, tau < 1 else { throw ValidationError("--tau must be in (0, 1)") }
    }

    func run() throws {
        do {
            let base = try BaseModelInfo.load(folder: model)
            let st = try AdapterStore.open(root: store, base: base, access: .read, create: false)
            let sp = try clientSpectra(store: st, client: client)
            let ranks = sp.ranks(tau: tau)
            let values = sp.modules.map { ranks[$0]! }
            let summary: [String: Any] = ["min": values.min() ?? 0, "max": values.max() ?? 0,
                                          "mean": values.isEmpty ? 0 : Double(values.reduce(0, +)) / Double(values.count)]
            if json {
                let mods: [[String: Any]] = sp.modules.map { ["module": $0, "rank": ranks[$0]!, "singular_values": sp.spectra[$0]!.map(Double.init)] }
                let obj: [String: Any] = ["client": client, "shared_version": sp.sharedVersion.map { $0 as Any } ?? NSNull(),
                                          "client_version": sp.clientVersion.map { $0 as Any } ?? NSNull(), "tau": Double(tau),
                                          "rule": "sigma_i > tau * sigma_max", "modules": mods, "summary": summary]
                print(String(decoding: try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys]), as: UTF8.self))
            } else {
                print("client \(client): shared \(sp.sharedVersion.map { "v\($0)" } ?? "none") + client \(sp.clientVersion.map { "v\($0)" } ?? "none (shared pair alone)"); rank rule sigma_i > \(tau) x sigma_max\n")
                for m in sp.modules {
                    print("### \(m): rank \(ranks[m]!)\n")
                    var t = MarkdownTable(["i", "sigma_i", "sigma_i / sigma_max", "counted"], align: [.right, .right, .right, .center])
                    let s = sp.spectra[m]!, top = s.first ?? 0
                    for (i, v) in s.enumerated() {
                        t.add(["\(i + 1)", String(format: "%.4g", v), top > 0 ? String(format: "%.4f", v / top) : "0", top > 0 && v > tau * top ? "yes" : ""])
                    }
                    print(t.render())
                }
                print(String(format: "summary: %d modules, rank min %d, max %d, mean %.2f", values.count, values.min() ?? 0, values.max() ?? 0,
                             summary["mean"] as! Double))
            }
            if let svg {
                var plot = LinePlot(title: "Singular values of client \(client)'s update (tau = \(tau))", xLabel: "index i", yLabel: "sigma_i / sigma_max", logY: true)
                for (k, m) in sp.modules.enumerated() {
                    let s = sp.spectra[m]!, top = max(s.first ?? 1, 1e-30)
                    plot.add(LinePlot.Series(name: m.replacingOccurrences(of: "transformer.", with: ""), x: s.indices.map { Double($0 + 1) },
                                             y: s.map { max(Double($0 / top), 1e-8) }, color: SVG.palette[k % SVG.palette.count], markers: true))
                }
                plot.hLines = [(Double(tau), "tau")]
                plot.showLegend = sp.modules.count <= 16
                try plot.svg().write(toFile: svg, atomically: true, encoding: .utf8)
                log("wrote \(svg)")
            }
        }
    }
}
