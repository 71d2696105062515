import Foundation

/// Small, dependency-free SVG charts for reports: line plots (several series, optional log-y,
/// reference lines) and grouped bar charts, laid out alone or in a grid of panels.
public enum SVG {
    /// A categorical palette (Tableau 10), cycled.
    public static let palette = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                                 "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]

    static func esc(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }

    static func num(_ v: Double) -> String { String(format: "%.1f", v) }

    /// Tick label text.
    static func label(_ v: Double) -> String {
        if v == 0 { return "0" }
        let a = abs(v)
        if a >= 1e4 || a < 1e-3 { return String(format: "%.0e", v) }
        if a >= 100 { return String(format: "%.0f", v) }
        return String(format: "%g", (v * 1000).rounded() / 1000)
    }

    /// About `count` round tick values covering [lo, hi].
    static func linearTicks(_ lo: Double, _ hi: Double, count: Int = 5) -> [Double] {
        guard hi > lo else { return [lo] }
        let raw = (hi - lo) / Double(count)
        let mag = pow(10, floor(log10(raw)))
        let step = [1.0, 2, 2.5, 5, 10].map { $0 * mag }.first { $0 >= raw } ?? 10 * mag
        var t = ceil(lo / step) * step, out: [Double] = []
        while t <= hi + step * 1e-9 { out.append(abs(t) < step * 1e-9 ? 0 : t); t += step }
        return out
    }

    /// Wraps panels into one document of the given size.
    public static func document(width: Double, height: Double, _ body: String) -> String {
        """
        <svg xmlns="http://www.w3.org/2000/svg" width="\(num(width))" height="\(num(height))" viewBox="0 0 \(num(width)) \(num(height))" font-family="Helvetica, Arial, sans-serif">
        <rect width="100%" height="100%" fill="white"/>
        \(body)</svg>

        """
    }

    /// Panels laid out in a grid of `columns`, each `panelWidth` x `panelHeight`.
    public static func grid(_ panels: [(Double, Double, Double, Double) -> String], columns: Int,
                            panelWidth: Double, panelHeight: Double, title: String? = nil) -> String {
        let rows = (panels.count + columns - 1) / max(1, columns)
        let top: Double = title == nil ? 0 : 30
        var body = ""
        if let title { body += "<text x=\"\(num(panelWidth * Double(columns) / 2))\" y=\"20\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">\(esc(title))</text>\n" }
        for (i, p) in panels.enumerated() {
            body += p(Double(i % columns) * panelWidth, top + Double(i / columns) * panelHeight, panelWidth, panelHeight)
        }
        return document(width: panelWidth * Double(columns), height: top + panelHeight * Double(rows), body)
    }
}

/// A line plot of several series.
public struct LinePlot {
    public struct Series {
        public var name: String
        public var x: [Double]
        public var y: [Double]
        public var color: String?
        public var dashed: Bool
        public var markers: Bool
        public init(name: String, x: [Double], y: [Double], color: String? = nil, dashed: Bool = false, markers: Bool = false) {
            self.name = name; self.x = x; self.y = y; self.color = color; self.dashed = dashed; self.markers = markers
        }
    }
    public var title: String
    public var xLabel: String
    public var yLabel: String
    public var logY: Bool
    public var series: [Series] = []
    /// Horizontal reference lines (value, label).
    public var hLines: [(Double, String)] = []
    public var showLegend = true

    public init(title: String, xLabel: String, yLabel: String, logY: Bool = false) {
        self.title = title; self.xLabel = xLabel; self.yLabel = yLabel; self.logY = logY
    }

    public mutating func add(_ s: Series) { series.append(s) }

    /// A standalone SVG document.
    public func svg(width: Double = 720, height: Double = 440) -> String {
        SVG.document(width: width, height: height, render(x: 0, y: 0, width: width, height: height))
    }

    /// The plot as SVG elements inside the rectangle (x, y, width, height).
    public func render(x ox: Double, y oy: Double, width: Double, height: Double) -> String {
        let left = ox + 62, right = ox + width - (showLegend ? 150 : 16), top = oy + 30, bottom = oy + height - 44
        let floorV = 1e-12
        func ty(_ v: Double) -> Double { logY ? log10(max(v, floorV)) : v }
        let pts = series.flatMap { s in zip(s.x, s.y).filter { $0.1.isFinite && (!logY || $0.1 > 0) } }
        var xs = pts.map(\.0), ys = pts.map { ty($0.1) } + hLines.map { ty($0.0) }
        if xs.isEmpty { xs = [0, 1] }
        if ys.isEmpty { ys = [0, 1] }
        var x0 = xs.min()!, x1 = xs.max()!, y0 = ys.min()!, y1 = ys.max()!
        if x1 == x0 { x0 -= 1; x1 += 1 }
        if y1 == y0 { y0 -= 1; y1 += 1 }
        if logY { y0 = floor(y0); y1 = ceil(y1) } else { let pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad }
        func px(_ v: Double) -> Double { left + (v - x0) / (x1 - x0) * (right - left) }
        func py(_ v: Double) -> Double { bottom - (ty(v) - y0) / (y1 - y0) * (bottom - top) }
        func pyT(_ t: Double) -> Double { bottom - (t - y0) / (y1 - y0) * (bottom - top) }

        var o = "<g>\n"
        o += "<text x=\"\(SVG.num((left + right) / 2))\" y=\"\(SVG.num(oy + 18))\" text-anchor=\"middle\" font-size=\"13\" font-weight=\"bold\">\(SVG.esc(title))</text>\n"
        o += "<rect x=\"\(SVG.num(left))\" y=\"\(SVG.num(top))\" width=\"\(SVG.num(right - left))\" height=\"\(SVG.num(bottom - top))\" fill=\"none\" stroke=\"#333\"/>\n"
        // y ticks
        let yTicks: [Double] = logY ? stride(from: y0, through: y1, by: max(1, ((y1 - y0) / 6).rounded(.up))).map { $0 } : SVG.linearTicks(y0, y1)
        for t in yTicks {
            let yy = pyT(t)
            o += "<line x1=\"\(SVG.num(left))\" x2=\"\(SVG.num(right))\" y1=\"\(SVG.num(yy))\" y2=\"\(SVG.num(yy))\" stroke=\"#e5e5e5\"/>\n"
            let text = logY ? SVG.label(pow(10, t)) : SVG.label(t)
            o += "<text x=\"\(SVG.num(left - 5))\" y=\"\(SVG.num(yy + 4))\" text-anchor=\"end\" font-size=\"10\">\(text)</text>\n"
        }
        for t in SVG.linearTicks(x0, x1) {
            let xx = px(t)
            o += "<line x1=\"\(SVG.num(xx))\" x2=\"\(SVG.num(xx))\" y1=\"\(SVG.num(bottom))\" y2=\"\(SVG.num(bottom + 4))\" stroke=\"#333\"/>\n"
            o += "<text x=\"\(SVG.num(xx))\" y=\"\(SVG.num(bottom + 15))\" text-anchor=\"middle\" font-size=\"10\">\(SVG.label(t))</text>\n"
        }
        o += "<text x=\"\(SVG.num((left + right) / 2))\" y=\"\(SVG.num(bottom + 32))\" text-anchor=\"middle\" font-size=\"11\">\(SVG.esc(xLabel))</text>\n"
        let ymid = (top + bottom) / 2
        o += "<text x=\"\(SVG.num(ox + 14))\" y=\"\(SVG.num(ymid))\" text-anchor=\"middle\" font-size=\"11\" transform=\"rotate(-90 \(SVG.num(ox + 14)) \(SVG.num(ymid)))\">\(SVG.esc(yLabel))</text>\n"
        for (v, name) in hLines {
            let yy = py(v)
            o += "<line x1=\"\(SVG.num(left))\" x2=\"\(SVG.num(right))\" y1=\"\(SVG.num(yy))\" y2=\"\(SVG.num(yy))\" stroke=\"#888\" stroke-dasharray=\"2,3\"/>\n"
            o += "<text x=\"\(SVG.num(right - 3))\" y=\"\(SVG.num(yy - 3))\" text-anchor=\"end\" font-size=\"9\" fill=\"#555\">\(SVG.esc(name))</text>\n"
        }
        for (i, s) in series.enumerated() {
            let color = s.color ?? SVG.palette[i % SVG.palette.count]
            let p = zip(s.x, s.y).filter { $0.1.isFinite && (!logY || $0.1 > 0) }
            guard !p.isEmpty else { continue }
            let d = p.map { "\(SVG.num(px($0.0))),\(SVG.num(py($0.1)))" }.joined(separator: " ")
            o += "<polyline points=\"\(d)\" fill=\"none\" stroke=\"\(color)\" stroke-width=\"1.6\"\(s.dashed ? " stroke-dasharray=\"5,3\"" : "")/>\n"
            if s.markers {
                for q in p { o += "<circle cx=\"\(SVG.num(px(q.0)))\" cy=\"\(SVG.num(py(q.1)))\" r=\"2.5\" fill=\"\(color)\"/>\n" }
            }
        }
        if showLegend {
            for (i, s) in series.enumerated() {
                let color = s.color ?? SVG.palette[i % SVG.palette.count]
                let ly = top + 8 + Double(i) * 16
                o += "<line x1=\"\(SVG.num(right + 10))\" x2=\"\(SVG.num(right + 30))\" y1=\"\(SVG.num(ly))\" y2=\"\(SVG.num(ly))\" stroke=\"\(color)\" stroke-width=\"2\"\(s.dashed ? " stroke-dasharray=\"5,3\"" : "")/>\n"
                o += "<text x=\"\(SVG.num(right + 35))\" y=\"\(SVG.num(ly + 4))\" font-size=\"10\">\(SVG.esc(s.name))</text>\n"
            }
        }
        return o + "</g>\n"
    }
}

/// A grouped bar chart: for each category, one bar per series.
public struct BarChart {
    public var title: String
    public var yLabel: String
    public var categories: [String]
    public var series: [(name: String, values: [Double])] = []
    public var logY = false

    public init(title: String, yLabel: String, categories: [String], logY: Bool = false) {
        self.title = title; self.yLabel = yLabel; self.categories = categories; self.logY = logY
    }

    public mutating func add(_ name: String, _ values: [Double]) {
        precondition(values.count == categories.count, "BarChart: \(values.count) values for \(categories.count) categories")
        series.append((name, values))
    }

    public func svg(width: Double = 760, height: Double = 420) -> String {
        SVG.document(width: width, height: height, render(x: 0, y: 0, width: width, height: height))
    }

    public func render(x ox: Double, y oy: Double, width: Double, height: Double) -> String {
        let left = ox + 62, right = ox + width - 150, top = oy + 30, bottom = oy + height - 40
        func t(_ v: Double) -> Double { logY ? log10(max(v, 1e-12)) : v }
        let vals = series.flatMap(\.values).filter { $0.isFinite && (!logY || $0 > 0) }
        var y0 = logY ? floor(t(vals.min() ?? 1)) : 0
        var y1 = logY ? ceil(t(vals.max() ?? 10)) : (vals.max() ?? 1) * 1.08
        if y1 <= y0 { y1 = y0 + 1 }
        if !logY { y0 = min(0, vals.min() ?? 0) }
        func py(_ v: Double) -> Double { bottom - (t(v) - y0) / (y1 - y0) * (bottom - top) }
        var o = "<g>\n"
        o += "<text x=\"\(SVG.num((left + right) / 2))\" y=\"\(SVG.num(oy + 18))\" text-anchor=\"middle\" font-size=\"13\" font-weight=\"bold\">\(SVG.esc(title))</text>\n"
        let ticks: [Double] = logY ? stride(from: y0, through: y1, by: 1).map { $0 } : SVG.linearTicks(y0, y1)
        for tk in ticks {
            let yy = bottom - (tk - y0) / (y1 - y0) * (bottom - top)
            o += "<line x1=\"\(SVG.num(left))\" x2=\"\(SVG.num(right))\" y1=\"\(SVG.num(yy))\" y2=\"\(SVG.num(yy))\" stroke=\"#e5e5e5\"/>\n"
            o += "<text x=\"\(SVG.num(left - 5))\" y=\"\(SVG.num(yy + 4))\" text-anchor=\"end\" font-size=\"10\">\(SVG.label(logY ? pow(10, tk) : tk))</text>\n"
        }
        let groupW = (right - left) / Double(max(1, categories.count))
        let barW = groupW * 0.8 / Double(max(1, series.count))
        for (c, name) in categories.enumerated() {
            let gx = left + Double(c) * groupW + groupW * 0.1
            for (i, s) in series.enumerated() where s.values[c].isFinite {
                let yv = py(s.values[c]), base = logY ? bottom : py(0)
                o += "<rect x=\"\(SVG.num(gx + Double(i) * barW))\" y=\"\(SVG.num(min(yv, base)))\" width=\"\(SVG.num(barW * 0.95))\" height=\"\(SVG.num(abs(base - yv)))\" fill=\"\(SVG.palette[i % SVG.palette.count])\"/>\n"
            }
            o += "<text x=\"\(SVG.num(gx + groupW * 0.4))\" y=\"\(SVG.num(bottom + 15))\" text-anchor=\"middle\" font-size=\"10\">\(SVG.esc(name))</text>\n"
        }
        o += "<rect x=\"\(SVG.num(left))\" y=\"\(SVG.num(top))\" width=\"\(SVG.num(right - left))\" height=\"\(SVG.num(bottom - top))\" fill=\"none\" stroke=\"#333\"/>\n"
        let ymid = (top + bottom) / 2
        o += "<text x=\"\(SVG.num(ox + 14))\" y=\"\(SVG.num(ymid))\" text-anchor=\"middle\" font-size=\"11\" transform=\"rotate(-90 \(SVG.num(ox + 14)) \(SVG.num(ymid)))\">\(SVG.esc(yLabel))</text>\n"
        for (i, s) in series.enumerated() {
            let ly = top + 8 + Double(i) * 16
            o += "<rect x=\"\(SVG.num(right + 10))\" y=\"\(SVG.num(ly - 6))\" width=\"14\" height=\"10\" fill=\"\(SVG.palette[i % SVG.palette.count])\"/>\n"
            o += "<text x=\"\(SVG.num(right + 30))\" y=\"\(SVG.num(ly + 3))\" font-size=\"10\">\(SVG.esc(s.name))</text>\n"
        }
        return o + "</g>\n"
    }
}
