/// jinja2's lexer with the settings transformers renders chat templates with (`trim_blocks`,
/// `lstrip_blocks`, newlines normalized to "\n", one trailing newline of the template dropped):
/// text, `{{ ... }}`, `{% ... %}`, `{# ... #}` with `-` / `+` whitespace control, `{% raw %}`.
struct JinjaToken {
    enum Kind: Equatable {
        case data(String)
        case variableBegin, variableEnd, blockBegin, blockEnd
        case name(String)
        case string(String)
        case int(Int)
        case float(Double)
        case op(String)
    }
    let kind: Kind
    let line: Int
}

struct JinjaLexer {
    private let s: [Unicode.Scalar]
    private var i = 0
    private var line = 1
    private var tokens: [JinjaToken] = []
    private var lineStarting = true

    init(_ source: String) {
        // Newlines as "\n"; a single trailing newline is not part of the template (keep_trailing_newline=False).
        var scalars: [Unicode.Scalar] = []
        scalars.reserveCapacity(source.unicodeScalars.count)
        var it = source.unicodeScalars.makeIterator()
        var pending = it.next()
        while let c = pending {
            pending = it.next()
            if c == "\r" {
                scalars.append("\n")
                if pending == "\n" { pending = it.next() }
            } else {
                scalars.append(c)
            }
        }
        if scalars.last == "\n" { scalars.removeLast() }
        s = scalars
    }

    static func tokenize(_ source: String) throws -> [JinjaToken] {
        var lexer = JinjaLexer(source)
        try lexer.run()
        return lexer.tokens
    }

    private func error(_ message: String) -> ChatTemplateError { .syntax(message, line: line) }

    private func at(_ k: Int, _ text: String) -> Bool {
        var k = k
        for c in text.unicodeScalars {
            guard k < s.count, s[k] == c else { return false }
            k += 1
        }
        return true
    }

    /// Python's `str.isspace` / regex `\s` for one character.
    static func isSpace(_ c: Unicode.Scalar) -> Bool {
        switch c.value {
        case 0x09...0x0D, 0x1C...0x20, 0x85, 0xA0: return true
        default: return c.value > 0xFF && c.properties.isWhitespace
        }
    }

    private mutating func emit(_ kind: JinjaToken.Kind) { tokens.append(JinjaToken(kind: kind, line: line)) }

    private mutating func emitData(_ text: ArraySlice<Unicode.Scalar>) {
        guard !text.isEmpty else { return }
        emit(.data(String(String.UnicodeScalarView(text))))
        line += text.filter { $0 == "\n" }.count
    }

    private mutating func run() throws {
        while i < s.count {
            // the next tag start
            var k = i
            var kind: Unicode.Scalar = " "
            while k + 1 < s.count {
                if s[k] == "{", s[k + 1] == "{" || s[k + 1] == "%" || s[k + 1] == "#" { kind = s[k + 1]; break }
                k += 1
            }
            guard kind != " " else { emitData(s[i...]); return }
            var text = s[i..<k]
            var j = k + 2
            var sign: Unicode.Scalar? = nil
            if j < s.count, s[j] == "-" || s[j] == "+" { sign = s[j]; j += 1 }
            let raw = kind == "%" ? rawBlockEnd(after: j) : nil
            // Whitespace control of the text before the tag.
            if sign == "-" {
                while let last = text.last, JinjaLexer.isSpace(last) { text.removeLast() }
            } else if sign != "+" && kind != "{" {
                // lstrip_blocks: spaces between the start of the line and a block or comment tag go.
                let lineStart = (text.lastIndex(of: "\n").map { $0 + 1 }) ?? text.startIndex
                if (lineStart > text.startIndex || lineStarting), lineStart < text.endIndex,
                   text[lineStart...].allSatisfy({ JinjaLexer.isSpace($0) }) {
                    text = text[..<lineStart]
                }
            }
            let skippedNewlines = s[i..<k].filter { $0 == "\n" }.count - text.filter { $0 == "\n" }.count
            emitData(text)
            line += skippedNewlines
            i = j
            lineStarting = false
            if let raw {
                try lexRaw(from: raw)
            } else if kind == "#" {
                try lexComment()
            } else {
                emit(kind == "{" ? .variableBegin : .blockBegin)
                try lexTag(block: kind == "%")
            }
        }
    }

    /// If `{% raw %}` starts here (after `{%` and its sign), the index just past its `%}`.
    private func rawBlockEnd(after j: Int) -> Int? {
        var k = j
        while k < s.count, JinjaLexer.isSpace(s[k]) { k += 1 }
        guard at(k, "raw") else { return nil }
        k += 3
        while k < s.count, JinjaLexer.isSpace(s[k]) { k += 1 }
        if at(k, "-%}") {
            k += 3
            while k < s.count, JinjaLexer.isSpace(s[k]) { k += 1 }
            return k
        }
        return at(k, "%}") ? k + 2 : nil
    }

    private mutating func lexRaw(from start: Int) throws {
        // (.*?)({%(-|+|)\s*endraw\s*(+%}|-%}\s*|%}\n?))
        var k = start
        while k < s.count {
            if at(k, "{%") {
                var m = k + 2
                var sign: Unicode.Scalar? = nil
                if m < s.count, s[m] == "-" || s[m] == "+" { sign = s[m]; m += 1 }
                while m < s.count, JinjaLexer.isSpace(s[m]) { m += 1 }
                if at(m, "endraw") {
                    m += 6
                    while m < s.count, JinjaLexer.isSpace(s[m]) { m += 1 }
                    var end: Int? = nil
                    if at(m, "+%}") { end = m + 3 } else if at(m, "-%}") {
                        end = m + 3
                        while end! < s.count, JinjaLexer.isSpace(s[end!]) { end! += 1 }
                    } else if at(m, "%}") {
                        end = m + 2
                        if end! < s.count, s[end!] == "\n" { end! += 1 }
                    }
                    if let end {
                        var text = s[start..<k]
                        if sign == "-" {
                            while let last = text.last, JinjaLexer.isSpace(last) { text.removeLast() }
                        } else if sign != "+" {
                            let lineStart = (text.lastIndex(of: "\n").map { $0 + 1 }) ?? text.startIndex
                            if lineStart > text.startIndex, lineStart < text.endIndex, text[lineStart...].allSatisfy({ JinjaLexer.isSpace($0) }) {
                                text = text[..<lineStart]
                            }
                        }
                        emitData(text)
                        line += s[text.endIndex..<end].filter { $0 == "\n" }.count
                        lineStarting = s[end - 1] == "\n"
                        i = end
                        return
                    }
                }
            }
            k += 1
        }
        throw error("missing end of raw directive")
    }

    private mutating func lexComment() throws {
        var k = i
        while k + 1 < s.count {
            if s[k] == "#", s[k + 1] == "}" {
                var end = k + 2
                if k > i && s[k - 1] == "-" {
                    while end < s.count, JinjaLexer.isSpace(s[end]) { end += 1 }
                } else if !(k > i && s[k - 1] == "+") {
                    if end < s.count, s[end] == "\n" { end += 1 }
                }
                line += s[i..<end].filter { $0 == "\n" }.count
                lineStarting = s[end - 1] == "\n"
                i = end
                return
            }
            k += 1
        }
        throw error("missing end of comment tag")
    }

    private static let operators = ["//", "**", "==", "!=", ">=", "<=", "+", "-", "/", "*", "%", "~", "[", "]", "(", ")",
                                    "{", "}", ">", "<", "=", ".", ":", "|", ",", ";"]

    private mutating func lexTag(block: Bool) throws {
        var balance: [Unicode.Scalar] = []
        while true {
            guard i < s.count else { throw error(block ? "unexpected end of template, expected '%}'" : "unexpected end of template, expected '}}'") }
            if balance.isEmpty {
                let close = block ? "%}" : "}}"
                var end: Int? = nil
                if at(i, "-" + close) {
                    end = i + 3
                    while end! < s.count, JinjaLexer.isSpace(s[end!]) { end! += 1 }
                } else if block && at(i, "+" + close) {
                    end = i + 3
                } else if at(i, close) {
                    end = i + 2
                    if block, end! < s.count, s[end!] == "\n" { end! += 1 }   // trim_blocks
                }
                if let end {
                    emit(block ? .blockEnd : .variableEnd)
                    line += s[i..<end].filter { $0 == "\n" }.count
                    lineStarting = s[end - 1] == "\n"
                    i = end
                    return
                }
            }
            let c = s[i]
            if JinjaLexer.isSpace(c) {
                if c == "\n" { line += 1 }
                i += 1
                continue
            }
            if let (tok, len) = number(at: i) {
                emit(tok)
                i += len
                continue
            }
            if c == "_" || c.properties.isAlphabetic {
                var k = i + 1
                while k < s.count, s[k] == "_" || s[k].properties.isAlphabetic || s[k].properties.numericType == .decimal
                        || s[k].properties.generalCategory == .nonspacingMark || s[k].properties.generalCategory == .spacingMark {
                    k += 1
                }
                emit(.name(String(String.UnicodeScalarView(s[i..<k]))))
                i = k
                continue
            }
            if c == "'" || c == "\"" {
                emit(.string(try string(quote: c)))
                continue
            }
            guard let op = JinjaLexer.operators.first(where: { at(i, $0) }) else {
                throw error("unexpected char \(PythonFormat.stringRepr(String(c))) at \(i)")
            }
            switch op {
            case "{": balance.append("}")
            case "(": balance.append(")")
            case "[": balance.append("]")
            case "}", ")", "]":
                guard let expected = balance.popLast() else { throw error("unexpected '\(op)'") }
                guard String(expected) == op else { throw error("unexpected '\(op)', expected '\(expected)'") }
            default: break
            }
            emit(.op(op))
            i += op.count
        }
    }

    /// float_re, then integer_re, at `k`: the token and its length.
    private func number(at k: Int) -> (JinjaToken.Kind, Int)? {
        func isDigit(_ c: Unicode.Scalar) -> Bool { c.value >= 0x30 && c.value <= 0x39 }
        guard k < s.count, isDigit(s[k]) else { return nil }
        let floatAllowed = k == 0 || s[k - 1] != "."   // float_re's (?<!\.)
        // digits with single underscores between
        func digits(_ from: Int) -> Int? {
            var m = from
            guard m < s.count, isDigit(s[m]) else { return nil }
            while m < s.count {
                if isDigit(s[m]) { m += 1 } else if s[m] == "_", m + 1 < s.count, isDigit(s[m + 1]) { m += 1 } else { break }
            }
            return m
        }
        let intEnd = digits(k)!
        var end = intEnd
        var isFloat = false
        if floatAllowed, end < s.count, s[end] == ".", let f = digits(end + 1) { end = f; isFloat = true }
        if floatAllowed, end < s.count, s[end] == "e" || s[end] == "E" {
            var m = end + 1
            if m < s.count, s[m] == "+" || s[m] == "-" { m += 1 }
            if let e = digits(m) { end = e; isFloat = true }
        }
        let text = String(String.UnicodeScalarView(s[k..<end])).replacingOccurrences(of: "_", with: "")
        if isFloat, let d = Double(text) { return (.float(d), end - k) }
        // integer_re: 0b / 0o / 0x prefixes, decimal, or zeros
        if s[k] == "0", k + 1 < s.count, "bBoOxX".unicodeScalars.contains(s[k + 1]) {
            let radix = "bB".unicodeScalars.contains(s[k + 1]) ? 2 : "oO".unicodeScalars.contains(s[k + 1]) ? 8 : 16
            var m = k + 2
            while m < s.count, s[m] == "_" || Int(String(s[m]), radix: radix) != nil { m += 1 }
            if m > k + 2, let v = Int(String(String.UnicodeScalarView(s[(k + 2)..<m])).replacingOccurrences(of: "_", with: ""), radix: radix) {
                return (.int(v), m - k)
            }
        }
        let intText = String(String.UnicodeScalarView(s[k..<intEnd])).replacingOccurrences(of: "_", with: "")
        if s[k] == "0" {
            // "0(_?0)*": only zeros
            var m = k + 1
            while m < intEnd, s[m] == "0" || s[m] == "_" { m += 1 }
            return (.int(0), m - k)
        }
        guard let v = Int(intText) else { return nil }
        return (.int(v), intEnd - k)
    }

    /// A string literal with Python's unicode-escape decoding of backslash sequences.
    private mutating func string(quote: Unicode.Scalar) throws -> String {
        var k = i + 1
        var out = String.UnicodeScalarView()
        while true {
            guard k < s.count else { throw error("unterminated string") }
            let c = s[k]
            if c == quote { k += 1; break }
            if c == "\n" { line += 1 }
            guard c == "\\" else { out.append(c); k += 1; continue }
            guard k + 1 < s.count else { throw error("unterminated string") }
            let e = s[k + 1]
            k += 2
            switch e {
            case "\n": break
            case "\\": out.append("\\")
            case "'": out.append("'")
            case "\"": out.append("\"")
            case "a": out.append("\u{07}")
            case "b": out.append("\u{08}")
            case "f": out.append("\u{0C}")
            case "n": out.append("\n")
            case "r": out.append("\r")
            case "t": out.append("\t")
            case "v": out.append("\u{0B}")
            case "0"..."7":
                var v = e.value - 0x30
                var n = 1
                while n < 3, k < s.count, s[k].value >= 0x30, s[k].value <= 0x37 { v = v * 8 + s[k].value - 0x30; k += 1; n += 1 }
                out.append(Unicode.Scalar(v)!)
            case "x", "u", "U":
                let n = e == "x" ? 2 : e == "u" ? 4 : 8
                guard k + n <= s.count, let v = UInt32(String(String.UnicodeScalarView(s[k..<(k + n)])), radix: 16),
                      let scalar = Unicode.Scalar(v) else {
                    throw error("truncated \\\(e) escape in a string literal")
                }
                out.append(scalar)
                k += n
            case "N":
                throw error("\\N{...} escapes in string literals are not supported")
            default:
                out.append("\\")
                out.append(e)
            }
        }
        i = k
        return String(out)
    }
}
