import Foundation

/// JSON string literals written by hand where `JSONSerialization` is too slow (a server-sent event
/// per token) or would reorder keys (a safetensors header): RFC 8259 escapes, non-ASCII as is.
/// The chat templates' `tojson` escapes as Python's `json.dumps` does instead (`JinjaValue`).
public enum JSONText {
    /// `s` as the inside of a JSON string literal: `"`, `\` and control characters escaped.
    public static func escaped(_ s: String) -> String {
        guard s.utf8.contains(where: { $0 < 0x20 || $0 == 0x22 || $0 == 0x5C }) else { return s }
        var out = ""
        out.reserveCapacity(s.utf8.count + 8)
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where u.value < 0x20: out += String(format: "\\u%04x", u.value)
            default: out.unicodeScalars.append(u)
            }
        }
        return out
    }

    /// `s` as a JSON string literal, quotes included.
    public static func quoted(_ s: String) -> String { "\"" + escaped(s) + "\"" }
}
