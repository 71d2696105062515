import Foundation

/// A Markdown (GitHub) table built row by row.
///
///     var t = MarkdownTable(["client", "MSE"], align: [.left, .right])
///     t.add(["0", "0.0102"])
///     print(t.render())
public struct MarkdownTable {
    public enum Alignment { case left, right, center }
    public let headers: [String]
    public let align: [Alignment]
    public private(set) var rows: [[String]] = []

    public init(_ headers: [String], align: [Alignment]? = nil) {
        self.headers = headers
        self.align = align ?? headers.map { _ in .left }
        precondition(self.align.count == headers.count)
    }

    public mutating func add(_ row: [String]) {
        precondition(row.count == headers.count, "MarkdownTable: \(row.count) cells for \(headers.count) columns")
        rows.append(row)
    }

    /// The table, columns padded for reading as plain text; `|` in cells is escaped.
    public func render() -> String {
        let esc = { (s: String) in s.replacingOccurrences(of: "|", with: "\\|") }
        let all = [headers] + rows
        let widths = headers.indices.map { c in max(3, all.map { esc($0[c]).count }.max() ?? 3) }
        func line(_ cells: [String]) -> String {
            "| " + cells.enumerated().map { c, s in
                let e = esc(s), pad = String(repeating: " ", count: widths[c] - e.count)
                return align[c] == .right ? pad + e : e + pad
            }.joined(separator: " | ") + " |"
        }
        let rule = "|" + align.enumerated().map { c, a in
            let dashes = String(repeating: "-", count: widths[c])
            switch a {
            case .left: return " " + dashes + " "
            case .right: return " " + dashes.dropLast() + ": "
            case .center: return " :" + dashes.dropFirst().dropLast() + ": "
            }
        }.joined(separator: "|") + "|"
        return ([line(headers), rule] + rows.map(line)).joined(separator: "\n") + "\n"
    }
}
