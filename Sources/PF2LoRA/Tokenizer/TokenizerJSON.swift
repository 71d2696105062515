/// A small JSON reader for tokenizer files: Foundation's JSONSerialization boxes each of GPT-2's
/// 100,000 vocabulary and merge strings in an NSString, which takes most of the load time on Linux.
/// Objects keep their members in file order as (key, value) pairs.
indirect enum JSONValue: Sendable {
    case object([(String, JSONValue)])
    case array([JSONValue])
    case string(String)
    case number(Double)   // written without a fraction or exponent
    case float(Double)    // written with one (Python's json reads it as a float)
    case bool(Bool)
    case null

    subscript(key: String) -> JSONValue? {
        if case .object(let members) = self { return members.first(where: { $0.0 == key })?.1 }
        return nil
    }
    var string: String? { if case .string(let s) = self { return s }; return nil }
    var array: [JSONValue]? { if case .array(let a) = self { return a }; return nil }
    var bool: Bool? { if case .bool(let b) = self { return b }; return nil }
    var double: Double? {
        switch self {
        case .number(let d), .float(let d): return d
        default: return nil
        }
    }
    /// The value as an integer, if it is a number with no fractional part.
    var int: Int? {
        if let d = double, let i = Int(exactly: d) { return i }
        return nil
    }

    /// Parses a whole document; the error says what was wrong and at which byte.
    static func parse(_ bytes: [UInt8]) throws -> JSONValue {
        try bytes.withUnsafeBufferPointer { (buf) throws -> JSONValue in
            var p = JSONParser(buf)
            p.skipSpace()
            let v = try p.value(depth: 0)
            p.skipSpace()
            guard p.i == buf.count else { throw JSONParseError(message: "unexpected text after the JSON value", offset: p.i) }
            return v
        }
    }
}

struct JSONParseError: Error, CustomStringConvertible {
    let message: String
    let offset: Int
    var description: String { "\(message) at byte \(offset)" }
}

private struct JSONParser {
    let b: UnsafeBufferPointer<UInt8>
    var i = 0
    var scratch: [UInt8] = []

    init(_ b: UnsafeBufferPointer<UInt8>) { self.b = b }

    mutating func skipSpace() {
        while i < b.count, b[i] == 0x20 || b[i] == 0x0A || b[i] == 0x0D || b[i] == 0x09 { i += 1 }
    }

    func error(_ m: String) -> JSONParseError {
        JSONParseError(message: i < b.count ? m : "unexpected end of file (truncated?)", offset: i)
    }

    mutating func expect(_ c: UInt8) throws {
        guard i < b.count, b[i] == c else { throw error("expected '\(Character(Unicode.Scalar(c)))'") }
        i += 1
    }

    mutating func value(depth: Int) throws -> JSONValue {
        guard depth < 512 else { throw error("nesting too deep") }
        guard i < b.count else { throw error("expected a value") }
        switch b[i] {
        case UInt8(ascii: "{"):
            i += 1
            var members: [(String, JSONValue)] = []
            skipSpace()
            if i < b.count, b[i] == UInt8(ascii: "}") { i += 1; return .object(members) }
            while true {
                skipSpace()
                let key = try string()
                skipSpace()
                try expect(UInt8(ascii: ":"))
                skipSpace()
                members.append((key, try value(depth: depth + 1)))
                skipSpace()
                guard i < b.count else { throw error("unclosed object") }
                if b[i] == UInt8(ascii: ",") { i += 1; continue }
                try expect(UInt8(ascii: "}"))
                return .object(members)
            }
        case UInt8(ascii: "["):
            i += 1
            var items: [JSONValue] = []
            skipSpace()
            if i < b.count, b[i] == UInt8(ascii: "]") { i += 1; return .array(items) }
            while true {
                skipSpace()
                items.append(try value(depth: depth + 1))
                skipSpace()
                guard i < b.count else { throw error("unclosed array") }
                if b[i] == UInt8(ascii: ",") { i += 1; continue }
                try expect(UInt8(ascii: "]"))
                return .array(items)
            }
        case UInt8(ascii: "\""):
            return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        default:
            let start = i
            let d = try number()
            let isFloat = (start..<i).contains { b[$0] == UInt8(ascii: ".") || b[$0] == UInt8(ascii: "e") || b[$0] == UInt8(ascii: "E") }
            return isFloat ? .float(d) : .number(d)
        }
    }

    mutating func literal(_ word: StaticString) throws {
        let n = word.utf8CodeUnitCount
        guard i + n <= b.count, memcmpBytes(b.baseAddress! + i, word.utf8Start, n) else { throw error("invalid literal") }
        i += n
    }

    mutating func number() throws -> Double {
        let start = i
        while i < b.count, (b[i] >= 0x30 && b[i] <= 0x39) || b[i] == UInt8(ascii: "-") || b[i] == UInt8(ascii: "+")
                || b[i] == UInt8(ascii: ".") || b[i] == UInt8(ascii: "e") || b[i] == UInt8(ascii: "E") { i += 1 }
        // integers (every id) without going through a String
        var v = 0, k = start, negative = false
        if k < i, b[k] == UInt8(ascii: "-") { negative = true; k += 1 }
        if k < i, i - k <= 15, (k..<i).allSatisfy({ b[$0] >= 0x30 && b[$0] <= 0x39 }) {
            while k < i { v = v * 10 + Int(b[k] - 0x30); k += 1 }
            return Double(negative ? -v : v)
        }
        guard i > start, let d = Double(String(decoding: UnsafeBufferPointer(rebasing: b[start..<i]), as: UTF8.self)) else {
            i = start
            throw error("expected a value")
        }
        return d
    }

    mutating func hex4() throws -> UInt32 {
        guard i + 4 <= b.count else { throw error("truncated \\u escape") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let c = b[i]
            let d: UInt32
            switch c {
            case 0x30...0x39: d = UInt32(c - 0x30)
            case 0x41...0x46: d = UInt32(c - 0x41 + 10)
            case 0x61...0x66: d = UInt32(c - 0x61 + 10)
            default: throw error("bad \\u escape")
            }
            v = v << 4 | d
            i += 1
        }
        return v
    }

    mutating func string() throws -> String {
        try expect(UInt8(ascii: "\""))
        let start = i
        // fast path: no escapes
        while i < b.count, b[i] != UInt8(ascii: "\""), b[i] != UInt8(ascii: "\\") { i += 1 }
        guard i < b.count else { throw error("unclosed string") }
        if b[i] == UInt8(ascii: "\"") {
            i += 1
            return String(decoding: UnsafeBufferPointer(rebasing: b[start..<(i - 1)]), as: UTF8.self)
        }
        scratch.removeAll(keepingCapacity: true)
        scratch.append(contentsOf: UnsafeBufferPointer(rebasing: b[start..<i]))
        while true {
            guard i < b.count else { throw error("unclosed string") }
            let c = b[i]
            i += 1
            if c == UInt8(ascii: "\"") { break }
            if c != UInt8(ascii: "\\") { scratch.append(c); continue }
            guard i < b.count else { throw error("unclosed string") }
            let e = b[i]
            i += 1
            switch e {
            case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): scratch.append(e)
            case UInt8(ascii: "b"): scratch.append(0x08)
            case UInt8(ascii: "f"): scratch.append(0x0C)
            case UInt8(ascii: "n"): scratch.append(0x0A)
            case UInt8(ascii: "r"): scratch.append(0x0D)
            case UInt8(ascii: "t"): scratch.append(0x09)
            case UInt8(ascii: "u"):
                var cp = try hex4()
                if cp >= 0xD800 && cp < 0xDC00, i + 6 <= b.count, b[i] == UInt8(ascii: "\\"), b[i + 1] == UInt8(ascii: "u") {
                    let save = i
                    i += 2
                    let lo = try hex4()
                    if lo >= 0xDC00 && lo < 0xE000 { cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00) } else { i = save }
                }
                let scalar = Unicode.Scalar(cp) ?? "\u{FFFD}"   // a lone surrogate
                scratch.append(contentsOf: Array(String(scalar).utf8))
            default:
                throw error("bad escape after a backslash")
            }
        }
        return String(decoding: scratch, as: UTF8.self)
    }
}
