import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import Testing
@testable import PF2LoRA

/// The Markdown table and the SVG charts.
@Suite struct ReportTests {
    @Test func markdownTableAlignsAndEscapes() {
        var t = MarkdownTable(["name", "value"], align: [.left, .right])
        t.add(["a|b", "1.5"])
        t.add(["longer name", "10"])
        let lines = t.render().split(separator: "\n").map(String.init)
        #expect(lines[0] == "| name        | value |")
        #expect(lines[1] == "| ----------- | ----: |")
        #expect(lines[2] == "| a\\|b        |   1.5 |")
        #expect(lines[3] == "| longer name |    10 |")
    }

    /// Parses as XML and holds one polyline per series, legend entries and the reference line.
    @Test func linePlotIsWellFormedSVG() throws {
        var p = LinePlot(title: "loss <test>", xLabel: "round", yLabel: "MSE", logY: true)
        p.add(.init(name: "A", x: [1, 2, 3], y: [1, 0.1, 0.01]))
        p.add(.init(name: "B & C", x: [1, 2, 3], y: [2, 0, 0.5], dashed: true, markers: true))   // 0 is skipped on log scale
        p.hLines = [(0.05, "threshold")]
        let svg = p.svg()
        let parser = XMLParser(data: Data(svg.utf8))
        #expect(parser.parse(), "\(parser.parserError.map { "\($0)" } ?? "")")
        #expect(svg.components(separatedBy: "<polyline").count - 1 == 2)
        #expect(svg.contains("B &amp; C") && svg.contains("threshold") && svg.contains("loss &lt;test&gt;"))
        #expect(svg.contains(">0.01<") && svg.contains(">1<"))   // decade ticks on the log axis
    }

    @Test func barChartAndGrid() {
        var b = BarChart(title: "MSE", yLabel: "MSE", categories: ["c0", "c1"])
        b.add("m1", [1, 2]); b.add("m2", [0.5, 3])
        let svg = b.svg()
        #expect(XMLParser(data: Data(svg.utf8)).parse())
        #expect(svg.components(separatedBy: "<rect").count - 1 == 2 + 4 + 2)   // background, frame, 4 bars, 2 legend keys
        let g = SVG.grid([{ b.render(x: $0, y: $1, width: $2, height: $3) }, { b.render(x: $0, y: $1, width: $2, height: $3) }],
                         columns: 2, panelWidth: 300, panelHeight: 200, title: "two")
        #expect(XMLParser(data: Data(g.utf8)).parse() && g.contains("width=\"600.0\""))
    }

    @Test func ticksAreRound() {
        let t = SVG.linearTicks(0, 1)
        #expect(t.count == 6 && zip(t, [0, 0.2, 0.4, 0.6, 0.8, 1]).allSatisfy { abs($0 - $1) < 1e-12 })
        #expect(SVG.linearTicks(0, 150).allSatisfy { $0.truncatingRemainder(dividingBy: 25) == 0 })
    }
}
