import Foundation

/// A value inside a Jinja template, with Python's semantics (what jinja2 sees when transformers
/// renders a chat template): JSON-like data plus undefined, tuples, namespaces and callables.
public indirect enum JinjaValue: Sendable {
    /// A name or attribute that does not exist (jinja2's `Undefined`): prints as "", is false,
    /// iterates as empty; arithmetic or attribute access on it is an error naming it.
    case undefined(String)
    case none
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([JinjaValue])
    case tuple([JinjaValue])
    /// A dict with string keys in insertion order.
    case object(JinjaObject)
    case namespace(JinjaNamespace)
    case callable(JinjaCallable)

    /// An object from (key, value) pairs in order.
    public static func dict(_ pairs: [(String, JinjaValue)]) -> JinjaValue { .object(JinjaObject(pairs)) }

    /// A value from JSON text (objects keep their key order).
    public static func parseJSON(_ text: String) throws -> JinjaValue {
        do { return JinjaValue(json: try JSONValue.parse(Array(text.utf8))) } catch let e as JSONParseError {
            throw ChatTemplateError.badInput("not valid JSON: \(e)")
        }
    }

    init(json: JSONValue) {
        switch json {
        case .null: self = .none
        case .bool(let b): self = .bool(b)
        case .number(let d): self = Int(exactly: d).map { .int($0) } ?? .double(d)
        case .float(let d): self = .double(d)
        case .string(let s): self = .string(s)
        case .array(let a): self = .array(a.map { JinjaValue(json: $0) })
        case .object(let members): self = .object(JinjaObject(members.map { ($0.0, JinjaValue(json: $0.1)) }))
        }
    }

    /// Python truthiness.
    var truthy: Bool {
        switch self {
        case .undefined, .none: return false
        case .bool(let b): return b
        case .int(let i): return i != 0
        case .double(let d): return d != 0
        case .string(let s): return !s.isEmpty
        case .array(let a), .tuple(let a): return !a.isEmpty
        case .object(let o): return !o.keys.isEmpty
        case .namespace, .callable: return true
        }
    }

    var isUndefined: Bool { if case .undefined = self { return true }; return false }

    /// Python's type name, for error messages.
    var typeName: String {
        switch self {
        case .undefined: return "Undefined"
        case .none: return "NoneType"
        case .bool: return "bool"
        case .int: return "int"
        case .double: return "float"
        case .string: return "str"
        case .array: return "list"
        case .tuple: return "tuple"
        case .object: return "dict"
        case .namespace: return "Namespace"
        case .callable: return "function"
        }
    }

    // MARK: Python str() and repr()

    /// `str(value)` as Python prints it, which is what `{{ value }}` writes ("" for undefined).
    var pythonStr: String {
        switch self {
        case .undefined: return ""
        case .string(let s): return s
        default: return pythonRepr
        }
    }

    var pythonRepr: String {
        switch self {
        case .undefined: return "Undefined"
        case .none: return "None"
        case .bool(let b): return b ? "True" : "False"
        case .int(let i): return String(i)
        case .double(let d): return PythonFormat.floatRepr(d)
        case .string(let s): return PythonFormat.stringRepr(s)
        case .array(let a): return "[" + a.map { $0.pythonRepr }.joined(separator: ", ") + "]"
        case .tuple(let a): return "(" + a.map { $0.pythonRepr }.joined(separator: ", ") + (a.count == 1 ? ",)" : ")")
        case .object(let o): return "{" + o.pairs.map { PythonFormat.stringRepr($0.0) + ": " + $0.1.pythonRepr }.joined(separator: ", ") + "}"
        case .namespace(let n): return "<Namespace " + JinjaValue.object(n.attributes).pythonRepr + ">"
        case .callable(let c): return "<function \(c.name)>"
        }
    }

    // MARK: Python equality and ordering

    static func pyEqual(_ a: JinjaValue, _ b: JinjaValue) -> Bool {
        switch (a, b) {
        case (.undefined, .undefined), (.none, .none): return true
        case (.string(let x), .string(let y)): return x.unicodeScalars.elementsEqual(y.unicodeScalars)
        case (.array(let x), .array(let y)), (.tuple(let x), .tuple(let y)):
            return x.count == y.count && zip(x, y).allSatisfy { pyEqual($0, $1) }
        case (.object(let x), .object(let y)):
            return x.keys.count == y.keys.count && x.keys.allSatisfy { k in y.values[k].map { pyEqual(x.values[k]!, $0) } ?? false }
        case (.namespace(let x), .namespace(let y)): return x === y
        default:
            if let x = a.numeric, let y = b.numeric { return x == y }
            return false
        }
    }

    /// The value as a number if it is one (bool counts, as in Python).
    var numeric: Double? {
        switch self {
        case .bool(let b): return b ? 1 : 0
        case .int(let i): return Double(i)
        case .double(let d): return d
        default: return nil
        }
    }

    var intValue: Int? {
        switch self {
        case .bool(let b): return b ? 1 : 0
        case .int(let i): return i
        default: return nil
        }
    }
}

/// A Python dict with string keys, in insertion order.
public struct JinjaObject: Sendable {
    public private(set) var keys: [String] = []
    public private(set) var values: [String: JinjaValue] = [:]

    public init() {}
    public init(_ pairs: [(String, JinjaValue)]) { for (k, v) in pairs { self[k] = v } }

    public subscript(key: String) -> JinjaValue? {
        get { values[key] }
        set {
            if let newValue {
                if values.updateValue(newValue, forKey: key) == nil { keys.append(key) }
            } else if values.removeValue(forKey: key) != nil {
                keys.removeAll { $0 == key }
            }
        }
    }

    public var pairs: [(String, JinjaValue)] { keys.map { ($0, values[$0]!) } }
}

/// jinja2's `namespace()`: the one mutable object templates have (`{% set ns.x = ... %}`).
public final class JinjaNamespace: @unchecked Sendable {
    var attributes: JinjaObject
    init(_ attributes: JinjaObject) { self.attributes = attributes }
}

/// A function a template can call: a macro, a global such as `range`, or a bound method.
public struct JinjaCallable: @unchecked Sendable {
    let name: String
    let call: ([JinjaValue], [(String, JinjaValue)]) throws -> JinjaValue
}

/// Python's formatting of floats, strings and JSON, byte for byte.
enum PythonFormat {
    /// `repr(float)`: the shortest digits that round-trip, fixed notation for exponents -4 ..< 16,
    /// otherwise scientific with at least two exponent digits ("1e-05", "1e+16"), ".0" on integers.
    static func floatRepr(_ d: Double) -> String {
        if d.isNaN { return "nan" }
        if d.isInfinite { return d < 0 ? "-inf" : "inf" }
        if d == 0 { return d.sign == .minus ? "-0.0" : "0.0" }
        // Swift's description is also shortest round-trip; take its digits and exponent.
        var s = "\(abs(d))"
        var exp = 0
        if let e = s.firstIndex(where: { $0 == "e" || $0 == "E" }) {
            exp = Int(s[s.index(after: e)...])!
            s = String(s[..<e])
        }
        var intPart = s, frac = ""
        if let dot = s.firstIndex(of: ".") {
            intPart = String(s[..<dot])
            frac = String(s[s.index(after: dot)...])
        }
        var digits = intPart + frac
        var decpt = intPart.count + exp           // value = 0.digits * 10^decpt
        while digits.hasPrefix("0") && digits.count > 1 { digits.removeFirst(); decpt -= 1 }
        while digits.hasSuffix("0") && digits.count > 1 { digits.removeLast() }
        let sign = d < 0 ? "-" : ""
        if decpt > -4 && decpt <= 16 {
            if decpt <= 0 { return sign + "0." + String(repeating: "0", count: -decpt) + digits }
            if decpt >= digits.count { return sign + digits + String(repeating: "0", count: decpt - digits.count) + ".0" }
            let i = digits.index(digits.startIndex, offsetBy: decpt)
            return sign + digits[..<i] + "." + digits[i...]
        }
        let e = decpt - 1
        let mantissa = digits.count > 1 ? String(digits.first!) + "." + digits.dropFirst() : digits
        let expText = String(abs(e))
        return sign + mantissa + "e" + (e < 0 ? "-" : "+") + (expText.count < 2 ? "0" + expText : expText)
    }

    /// `repr(str)`: single quotes unless the text has a single quote and no double quote.
    static func stringRepr(_ s: String) -> String {
        let quote: Unicode.Scalar = s.unicodeScalars.contains("'") && !s.unicodeScalars.contains("\"") ? "\"" : "'"
        var out = String(quote)
        for c in s.unicodeScalars {
            switch c {
            case quote, "\\": out += "\\" + String(c)
            case "\t": out += "\\t"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            default:
                if c.value < 0x20 || c.value == 0x7F {
                    out += String(format: "\\x%02x", c.value)
                } else if c.value < 0x7F || isPrintable(c) {
                    out.unicodeScalars.append(c)
                } else if c.value <= 0xFF {
                    out += String(format: "\\x%02x", c.value)
                } else if c.value <= 0xFFFF {
                    out += String(format: "\\u%04x", c.value)
                } else {
                    out += String(format: "\\U%08x", c.value)
                }
            }
        }
        out.unicodeScalars.append(quote)
        return out
    }

    /// Python's `str.isprintable` for one character: not a control, format, surrogate, private-use,
    /// unassigned, line/paragraph separator or space separator other than the ASCII space.
    static func isPrintable(_ c: Unicode.Scalar) -> Bool {
        if c == " " { return true }
        switch c.properties.generalCategory {
        case .control, .format, .surrogate, .privateUse, .unassigned, .lineSeparator, .paragraphSeparator, .spaceSeparator:
            return false
        default:
            return true
        }
    }

    /// `json.dumps(value, ensure_ascii=, indent=, separators=, sort_keys=)` as Python writes it.
    static func json(_ v: JinjaValue, ensureASCII: Bool, indent: Int?, separators: (String, String)?, sortKeys: Bool) throws -> String {
        let (itemSep, keySep) = separators ?? (indent == nil ? (", ", ": ") : (",", ": "))
        var out = ""
        func write(_ v: JinjaValue, _ level: Int) throws {
            switch v {
            case .none: out += "null"
            case .bool(let b): out += b ? "true" : "false"
            case .int(let i): out += String(i)
            case .double(let d):
                if d.isNaN { out += "NaN" } else if d.isInfinite { out += d < 0 ? "-Infinity" : "Infinity" } else { out += floatRepr(d) }
            case .string(let s): out += jsonString(s, ensureASCII: ensureASCII)
            case .array(let a), .tuple(let a):
                if a.isEmpty { out += "[]"; return }
                out += "["
                for (k, x) in a.enumerated() {
                    if k > 0 { out += itemSep }
                    if let indent { out += "\n" + String(repeating: " ", count: indent * (level + 1)) }
                    try write(x, level + 1)
                }
                if let indent { out += "\n" + String(repeating: " ", count: indent * level) }
                out += "]"
            case .object(let o):
                if o.keys.isEmpty { out += "{}"; return }
                out += "{"
                let keys = sortKeys ? o.keys.sorted { $0.unicodeScalars.lexicographicallyPrecedes($1.unicodeScalars) } : o.keys
                for (k, key) in keys.enumerated() {
                    if k > 0 { out += itemSep }
                    if let indent { out += "\n" + String(repeating: " ", count: indent * (level + 1)) }
                    out += jsonString(key, ensureASCII: ensureASCII) + keySep
                    try write(o.values[key]!, level + 1)
                }
                if let indent { out += "\n" + String(repeating: " ", count: indent * level) }
                out += "}"
            case .namespace, .callable, .undefined:
                throw ChatTemplateError.render("tojson: Object of type \(v.typeName) is not JSON serializable")
            }
        }
        try write(v, 0)
        return out
    }

    static func jsonString(_ s: String, ensureASCII: Bool) -> String {
        var out = "\""
        for c in s.unicodeScalars {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            default:
                if c.value < 0x20 {
                    out += String(format: "\\u%04x", c.value)
                } else if ensureASCII && c.value > 0x7F {
                    if c.value > 0xFFFF {
                        let v = c.value - 0x10000
                        out += String(format: "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF))
                    } else {
                        out += String(format: "\\u%04x", c.value)
                    }
                } else {
                    out.unicodeScalars.append(c)
                }
            }
        }
        return out + "\""
    }
}
