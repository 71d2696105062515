import Foundation

/// The globals, operators, attribute and method lookups, filters and tests of jinja2 (3.1) inside
/// transformers' chat-template environment, with Python's semantics.
enum JinjaBuiltins {
    static func fail(_ m: String) -> ChatTemplateError { .render(m) }

    // MARK: Globals

    static let globals: [String: JinjaValue] = [
        "range": .callable(JinjaCallable(name: "range") { args, _ in
            let ints = try args.map { a -> Int in
                guard let i = a.intValue else { throw fail("'\(a.typeName)' object cannot be interpreted as an integer") }
                return i
            }
            var start = 0, stop = 0, step = 1
            switch ints.count {
            case 1: stop = ints[0]
            case 2: start = ints[0]; stop = ints[1]
            case 3: start = ints[0]; stop = ints[1]; step = ints[2]
            default: throw fail("range expected 1 to 3 arguments, got \(ints.count)")
            }
            guard step != 0 else { throw fail("range() arg 3 must not be zero") }
            guard abs((stop - start) / step) <= 100_000 else { throw fail("range too big (more than 100000 items)") }
            return .array(Array(stride(from: start, to: stop, by: step)).map { .int($0) })
        }),
        "dict": .callable(JinjaCallable(name: "dict") { args, kwargs in
            var o = JinjaObject()
            if let first = args.first {
                guard args.count == 1 else { throw fail("dict expected at most 1 argument, got \(args.count)") }
                switch first {
                case .object(let src): o = src
                default:
                    for pair in try iterate(first) {
                        let kv = try iterate(pair)
                        guard kv.count == 2, case .string(let k) = kv[0] else { throw fail("dict() needs (key, value) pairs with string keys") }
                        o[k] = kv[1]
                    }
                }
            }
            for (k, v) in kwargs { o[k] = v }
            return .object(o)
        }),
        "namespace": .callable(JinjaCallable(name: "namespace") { args, kwargs in
            var o = JinjaObject()
            for a in args {
                guard case .object(let src) = a else { throw fail("namespace() takes a dict or keyword arguments") }
                for (k, v) in src.pairs { o[k] = v }
            }
            for (k, v) in kwargs { o[k] = v }
            for k in o.keys where k.hasPrefix("_") {
                throw fail("Chat templates cannot store underscore-prefixed attributes on a namespace, but got \(PythonFormat.stringRepr(k)). Please rename the attribute.")
            }
            return .namespace(JinjaNamespace(o))
        }),
        "raise_exception": .callable(JinjaCallable(name: "raise_exception") { args, _ in
            throw ChatTemplateError.raised(args.first?.pythonStr ?? "")
        }),
        "strftime_now": .callable(JinjaCallable(name: "strftime_now") { args, _ in
            guard case .string(let format)? = args.first else { throw fail("strftime_now() needs a format string") }
            return .string(strftime(format, Date()))
        }),
    ]

    /// C's strftime in the C locale (as Python's datetime.strftime uses it), local time.
    static func strftime(_ format: String, _ date: Date) -> String {
        var t = time_t(date.timeIntervalSince1970)
        var tmValue = tm()
        localtime_r(&t, &tmValue)
        var buffer = [Int8](repeating: 0, count: 512)
        let n = Foundation.strftime(&buffer, buffer.count, format, &tmValue)
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    // MARK: Iteration, attributes, items

    /// Python `iter(value)` as a list: strings by character, dicts by key, undefined as empty.
    static func iterate(_ v: JinjaValue) throws -> [JinjaValue] {
        switch v {
        case .array(let a), .tuple(let a): return a
        case .object(let o): return o.keys.map { .string($0) }
        case .string(let s): return s.unicodeScalars.map { .string(String($0)) }
        case .undefined: return []
        default: throw fail("'\(v.typeName)' object is not iterable")
        }
    }

    static func length(_ v: JinjaValue) throws -> Int {
        switch v {
        case .array(let a), .tuple(let a): return a.count
        case .object(let o): return o.keys.count
        case .string(let s): return s.unicodeScalars.count
        case .undefined: return 0
        case .namespace(let n): return n.attributes.keys.count
        default: throw fail("object of type '\(v.typeName)' has no len()")
        }
    }

    private static let unsafeMethods: Set<String> = ["append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse",
                                                     "update", "setdefault", "popitem", "add", "discard"]

    /// `obj.name`: Python attribute first (methods of str, list, dict), then the item `obj["name"]`.
    static func attribute(_ v: JinjaValue, _ name: String) throws -> JinjaValue {
        switch v {
        case .undefined(let why): throw fail(why)
        case .namespace(let n): return n.attributes[name] ?? .undefined("'\(name)' is undefined in the namespace")
        case .object(let o):
            if let m = method(v, name) { return m }
            return o[name] ?? .undefined("'dict object' has no attribute '\(name)'")
        default:
            if let m = method(v, name) { return m }
            return .undefined("'\(v.typeName) object' has no attribute '\(name)'")
        }
    }

    /// `obj[key]`: the item first, then a method of that name (as jinja2's getitem does).
    static func item(_ v: JinjaValue, _ key: JinjaValue) throws -> JinjaValue {
        switch (v, key) {
        case (.undefined(let why), _): throw fail(why)
        case (.object(let o), .string(let k)):
            if let x = o[k] { return x }
            return method(v, k) ?? .undefined("'dict object' has no attribute '\(k)'")
        case (.namespace(let n), .string(let k)):
            return n.attributes[k] ?? .undefined("'\(k)' is undefined in the namespace")
        case (.array(let a), _), (.tuple(let a), _):
            guard let i = key.intValue else {
                if case .string(let k) = key, let m = method(v, k) { return m }
                return .undefined("list index is not an integer")
            }
            let j = i < 0 ? i + a.count : i
            return j >= 0 && j < a.count ? a[j] : .undefined("list object has no element \(i)")
        case (.string(let s), _):
            guard let i = key.intValue else {
                if case .string(let k) = key, let m = method(v, k) { return m }
                return .undefined("string index is not an integer")
            }
            let scalars = Array(s.unicodeScalars)
            let j = i < 0 ? i + scalars.count : i
            return j >= 0 && j < scalars.count ? .string(String(scalars[j])) : .undefined("string index out of range")
        default:
            if case .string(let k) = key { return try attribute(v, k) }
            return .undefined("'\(v.typeName) object' has no element \(key.pythonRepr)")
        }
    }

    /// Python slicing `a[start:stop:step]` of lists, tuples and strings.
    static func slice(_ v: JinjaValue, _ start: JinjaValue?, _ stop: JinjaValue?, _ step: JinjaValue?) throws -> JinjaValue {
        func bound(_ x: JinjaValue?) throws -> Int? {
            guard let x else { return nil }
            if case .none = x { return nil }
            guard let i = x.intValue else { throw fail("slice indices must be integers or None") }
            return i
        }
        let st = try bound(step) ?? 1
        guard st != 0 else { throw fail("slice step cannot be zero") }
        func indices(_ n: Int) throws -> [Int] {
            var a = try bound(start), b = try bound(stop)
            if st > 0 {
                var lo = a ?? 0, hi = b ?? n
                if lo < 0 { lo = max(0, lo + n) }
                if hi < 0 { hi = max(0, hi + n) }
                lo = min(lo, n); hi = min(hi, n)
                return lo < hi ? Array(stride(from: lo, to: hi, by: st)) : []
            }
            if a == nil { a = n - 1 } else if a! < 0 { a = a! + n }
            if b == nil { b = -1 } else if b! < 0 { b = max(-1, b! + n) }
            var hi = min(a!, n - 1)
            if hi < 0 { hi = -1 }
            let lo = b!
            return hi > lo ? Array(stride(from: hi, to: lo, by: st)) : []
        }
        switch v {
        case .array(let a): return .array(try indices(a.count).map { a[$0] })
        case .tuple(let a): return .tuple(try indices(a.count).map { a[$0] })
        case .string(let s):
            let scalars = Array(s.unicodeScalars)
            var out = String.UnicodeScalarView()
            for i in try indices(scalars.count) { out.append(scalars[i]) }
            return .string(String(out))
        case .undefined(let why): throw fail(why)
        default: throw fail("'\(v.typeName)' object is not subscriptable")
        }
    }

    // MARK: Methods

    private static func bound(_ name: String, _ f: @escaping ([JinjaValue], [(String, JinjaValue)]) throws -> JinjaValue) -> JinjaValue {
        .callable(JinjaCallable(name: name, call: f))
    }

    static func method(_ v: JinjaValue, _ name: String) -> JinjaValue? {
        if unsafeMethods.contains(name) {
            switch v {
            case .array, .object:
                return bound(name) { _, _ in throw fail("access to attribute '\(name)' of '\(v.typeName)' object is unsafe (the sandbox forbids changing values)") }
            default: break
            }
        }
        switch v {
        case .string(let s): return stringMethod(s, name)
        case .object(let o):
            switch name {
            case "items": return bound(name) { _, _ in .array(o.pairs.map { .tuple([.string($0.0), $0.1]) }) }
            case "keys": return bound(name) { _, _ in .array(o.keys.map { .string($0) }) }
            case "values": return bound(name) { _, _ in .array(o.pairs.map { $0.1 }) }
            case "get":
                return bound(name) { args, kwargs in
                    guard let k = args.first else { throw fail("get expected at least 1 argument") }
                    let fallback = args.count > 1 ? args[1] : (kwargs.first?.1 ?? .none)
                    guard case .string(let key) = k else { return fallback }
                    return o[key] ?? fallback
                }
            case "copy": return bound(name) { _, _ in .object(o) }
            default: return nil
            }
        case .array(let a), .tuple(let a):
            switch name {
            case "index":
                return bound(name) { args, _ in
                    guard let x = args.first, let i = a.firstIndex(where: { JinjaValue.pyEqual($0, x) }) else {
                        throw fail("\(args.first?.pythonRepr ?? "value") is not in list")
                    }
                    return .int(i)
                }
            case "count":
                return bound(name) { args, _ in
                    guard let x = args.first else { throw fail("count() takes exactly one argument") }
                    return .int(a.filter { JinjaValue.pyEqual($0, x) }.count)
                }
            default: return nil
            }
        default:
            return nil
        }
    }

    static func isSpace(_ c: Unicode.Scalar) -> Bool { JinjaLexer.isSpace(c) }

    /// Python's str.strip family: whitespace, or any character of `chars`.
    static func strip(_ s: String, _ chars: JinjaValue?, left: Bool, right: Bool) throws -> String {
        var set: Set<Unicode.Scalar>? = nil
        if let chars {
            switch chars {
            case .string(let c): set = Set(c.unicodeScalars)
            case .none: break
            default: throw fail("strip arg must be None or str")
            }
        }
        let strippable: (Unicode.Scalar) -> Bool = { c in set.map { $0.contains(c) } ?? isSpace(c) }
        var scalars = Array(s.unicodeScalars)[...]
        if left { while let f = scalars.first, strippable(f) { scalars.removeFirst() } }
        if right { while let l = scalars.last, strippable(l) { scalars.removeLast() } }
        return String(String.UnicodeScalarView(scalars))
    }

    /// Python's str.split(sep=None, maxsplit=-1).
    static func split(_ s: String, _ sep: JinjaValue?, _ maxsplit: Int) throws -> [String] {
        if let sep, case .string(let sp) = sep {
            guard !sp.isEmpty else { throw fail("empty separator") }
            var parts: [String] = []
            var rest = Substring(s)
            while maxsplit < 0 || parts.count < maxsplit, let r = rest.range(of: sp, options: .literal) {
                parts.append(String(rest[..<r.lowerBound]))
                rest = rest[r.upperBound...]
            }
            parts.append(String(rest))
            return parts
        }
        if let sep, !(sep.isNone) { throw fail("must be str or None, not \(sep.typeName)") }
        var parts: [String] = []
        let scalars = Array(s.unicodeScalars)
        var i = 0
        while i < scalars.count {
            while i < scalars.count, isSpace(scalars[i]) { i += 1 }
            if i == scalars.count { break }
            if maxsplit >= 0 && parts.count == maxsplit {
                var end = scalars.count
                while end > i, isSpace(scalars[end - 1]) { end -= 1 }
                parts.append(String(String.UnicodeScalarView(scalars[i..<end])))
                break
            }
            var j = i
            while j < scalars.count, !isSpace(scalars[j]) { j += 1 }
            parts.append(String(String.UnicodeScalarView(scalars[i..<j])))
            i = j
        }
        return parts
    }

    static func pyUpper(_ s: String) -> String { s.uppercased() }
    static func pyLower(_ s: String) -> String { s.lowercased() }

    /// Python's str.capitalize (3.8+): the first character in title case, the rest lower case.
    static func pyCapitalize(_ s: String) -> String {
        guard let first = s.unicodeScalars.first else { return s }
        return first.properties.titlecaseMapping + String(String.UnicodeScalarView(s.unicodeScalars.dropFirst())).lowercased()
    }

    /// Python's str.title: a cased character after a cased one is lowered, others title-cased.
    static func pyTitle(_ s: String) -> String {
        var out = ""
        var previousCased = false
        for c in s.unicodeScalars {
            let mapped = previousCased ? c.properties.lowercaseMapping : c.properties.titlecaseMapping
            out += mapped
            previousCased = mapped.unicodeScalars.last.map { $0.properties.isCased } ?? false
        }
        return out
    }

    private static func stringMethod(_ s: String, _ name: String) -> JinjaValue? {
        switch name {
        case "strip", "lstrip", "rstrip":
            return bound(name) { args, _ in .string(try strip(s, args.first, left: name != "rstrip", right: name != "lstrip")) }
        case "split", "rsplit":
            return bound(name) { args, kwargs in
                let sep = args.first ?? kwargs.first(where: { $0.0 == "sep" })?.1
                let maxsplit = (args.count > 1 ? args[1] : kwargs.first(where: { $0.0 == "maxsplit" })?.1)?.intValue ?? -1
                if name == "rsplit" && maxsplit >= 0 {
                    // split from the right: reverse, split on the reversed separator, reverse back
                    let rev = String(String.UnicodeScalarView(s.unicodeScalars.reversed()))
                    var revSep = sep
                    if case .string(let sp)? = sep { revSep = .string(String(String.UnicodeScalarView(sp.unicodeScalars.reversed()))) }
                    let parts = try split(rev, revSep, maxsplit).map { String(String.UnicodeScalarView($0.unicodeScalars.reversed())) }
                    return .array(parts.reversed().map { .string($0) })
                }
                return .array(try split(s, sep, maxsplit).map { .string($0) })
            }
        case "splitlines":
            return bound(name) { _, _ in
                var lines: [JinjaValue] = []
                var current = String.UnicodeScalarView()
                var it = Array(s.unicodeScalars)[...]
                while let c = it.popFirst() {
                    if [0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029].contains(c.value) {
                        if c == "\r", it.first == "\n" { it.removeFirst() }
                        lines.append(.string(String(current)))
                        current = String.UnicodeScalarView()
                    } else {
                        current.append(c)
                    }
                }
                if !current.isEmpty { lines.append(.string(String(current))) }
                return .array(lines)
            }
        case "startswith", "endswith":
            return bound(name) { args, _ in
                guard let a = args.first else { throw fail("\(name) takes at least 1 argument") }
                let candidates: [JinjaValue]
                if case .tuple(let t) = a { candidates = t } else { candidates = [a] }
                for c in candidates {
                    guard case .string(let x) = c else { throw fail("\(name) first arg must be str or a tuple of str, not \(c.typeName)") }
                    let hit = name == "startswith" ? s.unicodeScalars.starts(with: x.unicodeScalars)
                                                   : s.unicodeScalars.reversed().starts(with: x.unicodeScalars.reversed())
                    if hit { return .bool(true) }
                }
                return .bool(false)
            }
        case "upper": return bound(name) { _, _ in .string(pyUpper(s)) }
        case "lower": return bound(name) { _, _ in .string(pyLower(s)) }
        case "title": return bound(name) { _, _ in .string(pyTitle(s)) }
        case "capitalize": return bound(name) { _, _ in .string(pyCapitalize(s)) }
        case "casefold": return bound(name) { _, _ in .string(s.lowercased()) }
        case "swapcase":
            return bound(name) { _, _ in
                .string(s.unicodeScalars.map { c in
                    c.properties.isUppercase ? c.properties.lowercaseMapping : c.properties.isLowercase ? c.properties.uppercaseMapping : String(c)
                }.joined())
            }
        case "replace":
            return bound(name) { args, _ in
                guard args.count >= 2, case .string(let old) = args[0], case .string(let new) = args[1] else { throw fail("replace() takes two strings") }
                let count = args.count > 2 ? (args[2].intValue ?? -1) : -1
                return .string(replace(s, old, new, count))
            }
        case "find", "rfind", "index", "rindex", "count":
            return bound(name) { args, _ in
                guard case .string(let sub)? = args.first else { throw fail("\(name)() needs a string argument") }
                let hay = Array(s.unicodeScalars), needle = Array(sub.unicodeScalars)
                var hits: [Int] = []
                if needle.isEmpty {
                    hits = Array(0...hay.count)
                } else if hay.count >= needle.count {
                    var i = 0
                    while i <= hay.count - needle.count {
                        if Array(hay[i..<(i + needle.count)]) == needle {
                            hits.append(i)
                            if name == "count" { i += needle.count; continue }
                        }
                        i += 1
                    }
                }
                switch name {
                case "count": return .int(hits.count)
                case "find": return .int(hits.first ?? -1)
                case "rfind": return .int(hits.last ?? -1)
                default:
                    guard let h = name == "index" ? hits.first : hits.last else { throw fail("substring not found") }
                    return .int(h)
                }
            }
        case "join":
            return bound(name) { args, _ in
                guard let seq = args.first else { throw fail("join() takes exactly one argument") }
                let parts = try iterate(seq).map { x -> String in
                    guard case .string(let t) = x else { throw fail("sequence item: expected str instance, \(x.typeName) found") }
                    return t
                }
                return .string(parts.joined(separator: s))
            }
        case "isdigit", "isnumeric", "isdecimal":
            return bound(name) { _, _ in .bool(!s.isEmpty && s.unicodeScalars.allSatisfy { $0.properties.numericType != nil }) }
        case "isalpha": return bound(name) { _, _ in .bool(!s.isEmpty && s.unicodeScalars.allSatisfy { $0.properties.isAlphabetic }) }
        case "isalnum":
            return bound(name) { _, _ in .bool(!s.isEmpty && s.unicodeScalars.allSatisfy { $0.properties.isAlphabetic || $0.properties.numericType != nil }) }
        case "isspace": return bound(name) { _, _ in .bool(!s.isEmpty && s.unicodeScalars.allSatisfy(isSpace)) }
        case "isupper":
            return bound(name) { _, _ in
                let cased = s.unicodeScalars.filter { $0.properties.isCased }
                return .bool(!cased.isEmpty && cased.allSatisfy { !$0.properties.isLowercase })
            }
        case "islower":
            return bound(name) { _, _ in
                let cased = s.unicodeScalars.filter { $0.properties.isCased }
                return .bool(!cased.isEmpty && cased.allSatisfy { !$0.properties.isUppercase })
            }
        case "removeprefix", "removesuffix":
            return bound(name) { args, _ in
                guard case .string(let x)? = args.first else { throw fail("\(name)() needs a string argument") }
                if name == "removeprefix", s.unicodeScalars.starts(with: x.unicodeScalars) {
                    return .string(String(String.UnicodeScalarView(s.unicodeScalars.dropFirst(x.unicodeScalars.count))))
                }
                if name == "removesuffix", !x.isEmpty, s.unicodeScalars.reversed().starts(with: x.unicodeScalars.reversed()) {
                    return .string(String(String.UnicodeScalarView(s.unicodeScalars.dropLast(x.unicodeScalars.count))))
                }
                return .string(s)
            }
        case "zfill", "center", "ljust", "rjust":
            return bound(name) { args, _ in
                guard let width = args.first?.intValue else { throw fail("\(name)() needs a width") }
                var fill: Unicode.Scalar = name == "zfill" ? "0" : " "
                if args.count > 1, case .string(let f) = args[1], f.unicodeScalars.count == 1 { fill = f.unicodeScalars.first! }
                return .string(pad(s, width, fill, name))
            }
        case "partition", "rpartition":
            return bound(name) { args, _ in
                guard case .string(let sep)? = args.first, !sep.isEmpty else { throw fail("\(name)() needs a non-empty separator") }
                let r = name == "partition" ? s.range(of: sep, options: .literal) : s.range(of: sep, options: [.literal, .backwards])
                guard let r else { return name == "partition" ? .tuple([.string(s), .string(""), .string("")]) : .tuple([.string(""), .string(""), .string(s)]) }
                return .tuple([.string(String(s[..<r.lowerBound])), .string(sep), .string(String(s[r.upperBound...]))])
            }
        case "format":
            return bound(name) { args, kwargs in .string(try strFormat(s, args, kwargs)) }
        default:
            return nil
        }
    }

    static func replace(_ s: String, _ old: String, _ new: String, _ count: Int) -> String {
        if old.isEmpty {
            // Python inserts `new` between characters (and at both ends)
            var out = ""
            var n = 0
            for c in s.unicodeScalars {
                if count < 0 || n < count { out += new; n += 1 }
                out.unicodeScalars.append(c)
            }
            if count < 0 || n < count { out += new }
            return out
        }
        var out = ""
        var rest = Substring(s)
        var n = 0
        while count < 0 || n < count, let r = rest.range(of: old, options: .literal) {
            out += rest[..<r.lowerBound] + new
            rest = rest[r.upperBound...]
            n += 1
        }
        return out + rest
    }

    static func pad(_ s: String, _ width: Int, _ fill: Unicode.Scalar, _ how: String) -> String {
        let n = s.unicodeScalars.count
        guard width > n else { return s }
        let total = width - n
        let f = String(fill)
        switch how {
        case "ljust": return s + String(repeating: f, count: total)
        case "rjust": return String(repeating: f, count: total) + s
        case "zfill":
            if let first = s.unicodeScalars.first, first == "+" || first == "-" {
                return String(first) + String(repeating: "0", count: total) + String(String.UnicodeScalarView(s.unicodeScalars.dropFirst()))
            }
            return String(repeating: "0", count: total) + s
        default:
            // Python's center: left = total / 2 + (total & width & 1)
            let left = total / 2 + (total & width & 1)
            return String(repeating: f, count: left) + s + String(repeating: f, count: total - left)
        }
    }

    /// str.format with `{}`, `{0}`, `{name}` fields and `{{` / `}}` (no format specs or conversions).
    static func strFormat(_ s: String, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> String {
        var out = ""
        var auto = 0
        let cs = Array(s.unicodeScalars)
        var i = 0
        while i < cs.count {
            let c = cs[i]
            if c == "{" {
                if i + 1 < cs.count, cs[i + 1] == "{" { out += "{"; i += 2; continue }
                guard let close = cs[i...].firstIndex(of: "}") else { throw fail("Single '{' encountered in format string") }
                let field = String(String.UnicodeScalarView(cs[(i + 1)..<close]))
                if field.contains(":") || field.contains("!") || field.contains(".") || field.contains("[") {
                    throw ChatTemplateError.unsupported("str.format field '{\(field)}' with a format spec, conversion or lookup", line: 0)
                }
                let v: JinjaValue
                if field.isEmpty {
                    guard auto < args.count else { throw fail("Replacement index \(auto) out of range for positional args tuple") }
                    v = args[auto]; auto += 1
                } else if let k = Int(field) {
                    guard k < args.count else { throw fail("Replacement index \(k) out of range for positional args tuple") }
                    v = args[k]
                } else {
                    guard let kv = kwargs.first(where: { $0.0 == field }) else { throw fail("KeyError: \(PythonFormat.stringRepr(field))") }
                    v = kv.1
                }
                out += v.pythonStr
                i = close + 1
            } else if c == "}" {
                guard i + 1 < cs.count, cs[i + 1] == "}" else { throw fail("Single '}' encountered in format string") }
                out += "}"
                i += 2
            } else {
                out.unicodeScalars.append(c)
                i += 1
            }
        }
        return out
    }

    // MARK: Operators

    static func binary(_ op: String, _ a: JinjaValue, _ b: JinjaValue) throws -> JinjaValue {
        if op == "~" { return .string(a.pythonStr + b.pythonStr) }
        if case .undefined(let why) = a { throw fail(why) }
        if case .undefined(let why) = b { throw fail(why) }
        func typeError() -> ChatTemplateError {
            if op == "+", case .string = a { return fail("can only concatenate str (not \"\(b.typeName)\") to str") }
            if op == "+", case .array = a { return fail("can only concatenate list (not \"\(b.typeName)\") to list") }
            return fail("unsupported operand type(s) for \(op): '\(a.typeName)' and '\(b.typeName)'")
        }
        switch (op, a, b) {
        case ("+", .string(let x), .string(let y)): return .string(x + y)
        case ("+", .array(let x), .array(let y)): return .array(x + y)
        case ("+", .tuple(let x), .tuple(let y)): return .tuple(x + y)
        case ("*", .string(let x), _) where b.intValue != nil: return .string(String(repeating: x, count: max(0, b.intValue!)))
        case ("*", _, .string(let y)) where a.intValue != nil: return .string(String(repeating: y, count: max(0, a.intValue!)))
        case ("*", .array(let x), _) where b.intValue != nil: return .array(Array(repeating: x, count: max(0, b.intValue!)).flatMap { $0 })
        case ("%", .string, _): throw ChatTemplateError.unsupported("printf-style '%' formatting of strings", line: 0)
        default: break
        }
        guard a.numeric != nil, b.numeric != nil else { throw typeError() }
        if let x = a.intValue, let y = b.intValue {
            switch op {
            case "+": let (r, o) = x.addingReportingOverflow(y); if !o { return .int(r) }
            case "-": let (r, o) = x.subtractingReportingOverflow(y); if !o { return .int(r) }
            case "*": let (r, o) = x.multipliedReportingOverflow(by: y); if !o { return .int(r) }
            case "/":
                guard y != 0 else { throw fail("division by zero") }
                return .double(Double(x) / Double(y))
            case "//":
                guard y != 0 else { throw fail("integer division or modulo by zero") }
                var q = x / y
                if (x % y != 0) && ((x < 0) != (y < 0)) { q -= 1 }
                return .int(q)
            case "%":
                guard y != 0 else { throw fail("integer division or modulo by zero") }
                var r = x % y
                if r != 0 && ((r < 0) != (y < 0)) { r += y }
                return .int(r)
            case "**":
                if y >= 0 {
                    var result = 1
                    for _ in 0..<y {
                        let (r, o) = result.multipliedReportingOverflow(by: x)
                        if o { throw fail("integer overflow in **") }
                        result = r
                    }
                    return .int(result)
                }
                return .double(pow(Double(x), Double(y)))
            default: break
            }
            throw fail("integer overflow in \(op)")
        }
        let x = a.numeric!, y = b.numeric!
        switch op {
        case "+": return .double(x + y)
        case "-": return .double(x - y)
        case "*": return .double(x * y)
        case "/":
            guard y != 0 else { throw fail("float division by zero") }
            return .double(x / y)
        case "//":
            guard y != 0 else { throw fail("float floor division by zero") }
            return .double((x / y).rounded(.down))
        case "%":
            guard y != 0 else { throw fail("float modulo") }
            var r = fmod(x, y)
            if r != 0 && ((r < 0) != (y < 0)) { r += y }
            return .double(r)
        case "**": return .double(pow(x, y))
        default: throw typeError()
        }
    }

    static func compare(_ op: String, _ a: JinjaValue, _ b: JinjaValue) throws -> Bool {
        switch op {
        case "==": return JinjaValue.pyEqual(a, b)
        case "!=": return !JinjaValue.pyEqual(a, b)
        case "in": return try contains(b, a)
        case "notin": return !(try contains(b, a))
        default:
            let c = try order(a, b, op)
            switch op {
            case "<": return c < 0
            case "<=": return c <= 0
            case ">": return c > 0
            default: return c >= 0
            }
        }
    }

    /// Python's ordering: numbers, strings (by code point), lists and tuples element by element.
    static func order(_ a: JinjaValue, _ b: JinjaValue, _ op: String) throws -> Int {
        if let x = a.numeric, let y = b.numeric { return x < y ? -1 : x > y ? 1 : 0 }
        switch (a, b) {
        case (.string(let x), .string(let y)):
            return x.unicodeScalars.lexicographicallyPrecedes(y.unicodeScalars, by: { $0.value < $1.value }) ? -1
                : (x.unicodeScalars.elementsEqual(y.unicodeScalars) ? 0 : 1)
        case (.array(let x), .array(let y)), (.tuple(let x), .tuple(let y)):
            for (p, q) in zip(x, y) where !JinjaValue.pyEqual(p, q) { return try order(p, q, op) }
            return x.count < y.count ? -1 : x.count > y.count ? 1 : 0
        case (.undefined(let why), _), (_, .undefined(let why)):
            throw fail(why)
        default:
            throw fail("'\(op)' not supported between instances of '\(a.typeName)' and '\(b.typeName)'")
        }
    }

    static func contains(_ container: JinjaValue, _ x: JinjaValue) throws -> Bool {
        switch container {
        case .string(let s):
            guard case .string(let sub) = x else { throw fail("'in <string>' requires string as left operand, not \(x.typeName)") }
            return sub.isEmpty || s.range(of: sub, options: .literal) != nil
        case .array(let a), .tuple(let a): return a.contains { JinjaValue.pyEqual($0, x) }
        case .object(let o):
            if case .string(let k) = x { return o[k] != nil }
            return false
        case .namespace(let n):
            if case .string(let k) = x { return n.attributes[k] != nil }
            return false
        case .undefined: return false
        default: throw fail("argument of type '\(container.typeName)' is not iterable")
        }
    }

    // MARK: Filters

    /// jinja2's attribute getter for filters: "a.b.0" walks items, integers index lists.
    static func attrGetter(_ path: JinjaValue) -> (JinjaValue) throws -> JinjaValue {
        let parts: [JinjaValue]
        switch path {
        case .string(let s): parts = s.split(separator: ".", omittingEmptySubsequences: false).map { p in Int(p).map { .int($0) } ?? .string(String(p)) }
        default: parts = [path]
        }
        return { v in
            var x = v
            for p in parts { x = try item(x, p) }
            return x
        }
    }

    private static func arg(_ args: [JinjaValue], _ kwargs: [(String, JinjaValue)], _ i: Int, _ name: String) -> JinjaValue? {
        if i < args.count { return args[i] }
        return kwargs.first(where: { $0.0 == name })?.1
    }

    static func stringOf(_ v: JinjaValue) -> String { v.pythonStr }

    static func filter(_ name: String, _ v: JinjaValue, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)],
                       _ interp: JinjaInterpreter) throws -> JinjaValue {
        switch name {
        case "tojson":
            // transformers' tojson: json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)
            let ensureASCII = arg(args, kwargs, 0, "ensure_ascii")?.truthy ?? false
            var indent: Int? = nil
            if let i = arg(args, kwargs, 1, "indent"), !i.isNone {
                guard let n = i.intValue else { throw ChatTemplateError.unsupported("tojson indent that is not an integer", line: 0) }
                indent = n
            }
            var separators: (String, String)? = nil
            if let s = arg(args, kwargs, 2, "separators"), !s.isNone {
                let parts = try iterate(s)
                guard parts.count == 2, case .string(let a) = parts[0], case .string(let b) = parts[1] else { throw fail("tojson separators must be two strings") }
                separators = (a, b)
            }
            let sortKeys = arg(args, kwargs, 3, "sort_keys")?.truthy ?? false
            return .string(try PythonFormat.json(v, ensureASCII: ensureASCII, indent: indent, separators: separators, sortKeys: sortKeys))
        case "trim":
            return .string(try strip(stringOf(v), arg(args, kwargs, 0, "chars"), left: true, right: true))
        case "length", "count":
            return .int(try length(v))
        case "upper": return .string(pyUpper(stringOf(v)))
        case "lower": return .string(pyLower(stringOf(v)))
        case "capitalize": return .string(pyCapitalize(stringOf(v)))
        case "title":
            // jinja2's own title: split on runs of -, whitespace and opening brackets
            var out = ""
            var word = String.UnicodeScalarView()
            func flush() {
                if let f = word.first {
                    out += String(f).uppercased() + String(String.UnicodeScalarView(word.dropFirst())).lowercased()
                }
                word = String.UnicodeScalarView()
            }
            var inSeparator = false
            for c in stringOf(v).unicodeScalars {
                let sep = c == "-" || c == "(" || c == "{" || c == "[" || c == "<" || isSpace(c)
                if sep != inSeparator { flush() }
                if sep { out.unicodeScalars.append(c) } else { word.append(c) }
                inSeparator = sep
            }
            flush()
            return .string(out)
        case "replace":
            guard args.count >= 2 else { throw fail("replace needs old and new strings") }
            let count = args.count > 2 ? (args[2].intValue ?? -1) : (kwargs.first(where: { $0.0 == "count" })?.1.intValue ?? -1)
            return .string(replace(stringOf(v), stringOf(args[0]), stringOf(args[1]), count))
        case "join":
            var items = try iterate(v)
            if let attribute = arg(args, kwargs, 1, "attribute"), !attribute.isNone {
                let get = attrGetter(attribute)
                items = try items.map(get)
            }
            let sep = arg(args, kwargs, 0, "d").map(stringOf) ?? ""
            return .string(items.map(stringOf).joined(separator: sep))
        case "default", "d":
            let fallback = arg(args, kwargs, 0, "default_value") ?? .string("")
            let boolean = arg(args, kwargs, 1, "boolean")?.truthy ?? false
            if v.isUndefined || (boolean && !v.truthy) { return fallback }
            return v
        case "first":
            let items = try iterate(v)
            return items.first ?? .undefined("No first item, sequence was empty.")
        case "last":
            let items = try iterate(v)
            return items.last ?? .undefined("No last item, sequence was empty.")
        case "list":
            if case .undefined = v { return .array([]) }
            return .array(try iterate(v))
        case "string":
            return .string(stringOf(v))
        case "safe", "e", "escape", "forceescape":
            if name == "safe" { return v }
            var out = ""
            for c in stringOf(v).unicodeScalars {
                switch c {
                case "&": out += "&amp;"
                case "<": out += "&lt;"
                case ">": out += "&gt;"
                case "\"": out += "&#34;"
                case "'": out += "&#39;"
                default: out.unicodeScalars.append(c)
                }
            }
            return .string(out)
        case "int":
            let fallback = arg(args, kwargs, 0, "default") ?? .int(0)
            switch v {
            case .int, .bool: return .int(v.intValue!)
            case .double(let d): return d.isFinite ? .int(Int(d)) : fallback
            case .string(let s):
                let t = s.trimmingCharacters(in: .whitespaces).replacingOccurrences(of: "_", with: "")
                if let i = Int(t) { return .int(i) }
                if let d = Double(t), d.isFinite { return .int(Int(d)) }
                return fallback
            default: return fallback
            }
        case "float":
            let fallback = arg(args, kwargs, 0, "default") ?? .double(0)
            switch v {
            case .int, .bool, .double: return .double(v.numeric!)
            case .string(let s): return Double(s.trimmingCharacters(in: .whitespaces)).map { .double($0) } ?? fallback
            default: return fallback
            }
        case "abs":
            switch v {
            case .int(let i): return .int(abs(i))
            case .bool(let b): return .int(b ? 1 : 0)
            case .double(let d): return .double(abs(d))
            default: throw fail("bad operand type for abs(): '\(v.typeName)'")
            }
        case "round":
            guard let x = v.numeric else { throw fail("round needs a number") }
            let precision = arg(args, kwargs, 0, "precision")?.intValue ?? 0
            let method = arg(args, kwargs, 1, "method").map(stringOf) ?? "common"
            let scale = pow(10.0, Double(precision))
            switch method {
            case "common": return .double((x * scale).rounded(.toNearestOrEven) / scale)
            case "ceil": return .double((x * scale).rounded(.up) / scale)
            case "floor": return .double((x * scale).rounded(.down) / scale)
            default: throw fail("method must be common, ceil or floor")
            }
        case "items":
            if case .undefined = v { return .array([]) }
            guard case .object(let o) = v else { throw fail("Can only get item pairs from a mapping.") }
            return .array(o.pairs.map { .tuple([.string($0.0), $0.1]) })
        case "dictsort":
            guard case .object(let o) = v else { throw fail("dictsort needs a dict") }
            let caseSensitive = arg(args, kwargs, 0, "case_sensitive")?.truthy ?? false
            let byValue = arg(args, kwargs, 1, "by").map(stringOf) == "value"
            let reverse = arg(args, kwargs, 2, "reverse")?.truthy ?? false
            var pairs = o.pairs.map { JinjaValue.tuple([.string($0.0), $0.1]) }
            try sortValues(&pairs, key: { p in
                guard case .tuple(let t) = p else { return p }
                let k = byValue ? t[1] : t[0]
                if !caseSensitive, case .string(let s) = k { return .string(s.lowercased()) }
                return k
            }, reverse: reverse)
            return .array(pairs)
        case "sort":
            var items = try iterate(v)
            let reverse = arg(args, kwargs, 0, "reverse")?.truthy ?? false
            let caseSensitive = arg(args, kwargs, 1, "case_sensitive")?.truthy ?? false
            let get = (arg(args, kwargs, 2, "attribute")).map(attrGetter)
            try sortValues(&items, key: { x in
                let k = try get?(x) ?? x
                if !caseSensitive, case .string(let s) = k { return .string(s.lowercased()) }
                return k
            }, reverse: reverse)
            return .array(items)
        case "unique":
            var seen: [JinjaValue] = []
            let caseSensitive = arg(args, kwargs, 0, "case_sensitive")?.truthy ?? false
            let get = arg(args, kwargs, 1, "attribute").map(attrGetter)
            var out: [JinjaValue] = []
            for x in try iterate(v) {
                var k = try get?(x) ?? x
                if !caseSensitive, case .string(let s) = k { k = .string(s.lowercased()) }
                if !seen.contains(where: { JinjaValue.pyEqual($0, k) }) { seen.append(k); out.append(x) }
            }
            return .array(out)
        case "reverse":
            if case .string(let s) = v { return .string(String(String.UnicodeScalarView(s.unicodeScalars.reversed()))) }
            return .array(try iterate(v).reversed())
        case "sum":
            var total = arg(args, kwargs, 1, "start") ?? .int(0)
            let get = arg(args, kwargs, 0, "attribute").flatMap { $0.isNone ? nil : attrGetter($0) }
            for x in try iterate(v) { total = try binary("+", total, try get?(x) ?? x) }
            return total
        case "min", "max":
            let items = try iterate(v)
            let caseSensitive = arg(args, kwargs, 0, "case_sensitive")?.truthy ?? false
            let get = arg(args, kwargs, 1, "attribute").map(attrGetter)
            guard var best = items.first else { return .undefined("No aggregated item, sequence was empty.") }
            func key(_ x: JinjaValue) throws -> JinjaValue {
                let k = try get?(x) ?? x
                if !caseSensitive, case .string(let s) = k { return .string(s.lowercased()) }
                return k
            }
            for x in items.dropFirst() {
                let c = try order(try key(x), try key(best), name == "min" ? "<" : ">")
                if (name == "min" && c < 0) || (name == "max" && c > 0) { best = x }
            }
            return best
        case "map":
            let items = try iterate(v)
            if args.isEmpty, let attribute = kwargs.first(where: { $0.0 == "attribute" })?.1 {
                let fallback = kwargs.first(where: { $0.0 == "default" })?.1
                let get = attrGetter(attribute)
                return .array(try items.map { x in
                    let r = try get(x)
                    if r.isUndefined, let fallback { return fallback }
                    return r
                })
            }
            guard case .string(let f)? = args.first else { throw fail("map requires a filter argument") }
            let rest = Array(args.dropFirst())
            return .array(try items.map { try filter(f, $0, rest, kwargs, interp) })
        case "select", "reject", "selectattr", "rejectattr":
            let items = try iterate(v)
            let byAttr = name.hasSuffix("attr")
            var rest = args
            var get: (JinjaValue) throws -> JinjaValue = { $0 }
            if byAttr {
                guard let a = rest.first else { throw fail("Missing parameter for attribute name") }
                get = attrGetter(a)
                rest.removeFirst()
            }
            let keep = name.hasPrefix("select")
            var out: [JinjaValue] = []
            for x in items {
                let target = try get(x)
                let ok: Bool
                if let t = rest.first {
                    ok = try test(stringOf(t), target, Array(rest.dropFirst()), interp)
                } else {
                    ok = target.truthy
                }
                if ok == keep { out.append(x) }
            }
            return .array(out)
        case "attr":
            guard case .string(let a)? = args.first else { throw fail("attr needs a name") }
            switch v {
            case .object: return method(v, a) ?? .undefined("'dict object' has no attribute '\(a)'")
            default: return try attribute(v, a)
            }
        case "indent":
            var s = stringOf(v)
            var indention = String(repeating: " ", count: 4)
            if let w = arg(args, kwargs, 0, "width") {
                if case .string(let t) = w { indention = t } else if let n = w.intValue { indention = String(repeating: " ", count: n) }
            }
            let first = arg(args, kwargs, 1, "first")?.truthy ?? false
            let blank = arg(args, kwargs, 2, "blank")?.truthy ?? false
            s += "\n"
            guard case .array(let lineValues) = try stringMethod(s, "splitlines")!.asCallable().call([], []) else { return .string(s) }
            let lines = lineValues.map(stringOf)
            var rv: String
            if blank {
                rv = lines.joined(separator: "\n" + indention)
            } else {
                rv = lines.first ?? ""
                if lines.count > 1 { rv += "\n" + lines.dropFirst().map { $0.isEmpty ? $0 : indention + $0 }.joined(separator: "\n") }
            }
            if first { rv = indention + rv }
            return .string(rv)
        case "center":
            let width = arg(args, kwargs, 0, "width")?.intValue ?? 80
            return .string(pad(stringOf(v), width, " ", "center"))
        case "wordcount":
            // _word_re = \w+
            var count = 0, inWord = false
            for c in stringOf(v).unicodeScalars {
                let w = c.properties.isAlphabetic || c.properties.numericType != nil || c == "_"
                if w && !inWord { count += 1 }
                inWord = w
            }
            return .int(count)
        case "batch":
            guard let n = args.first?.intValue, n > 0 else { throw fail("batch needs a positive size") }
            let items = try iterate(v)
            let fill = arg(args, kwargs, 1, "fill_with")
            var out: [JinjaValue] = []
            var k = 0
            while k < items.count {
                var chunk = Array(items[k..<min(k + n, items.count)])
                if let fill, !fill.isNone, chunk.count < n { chunk += Array(repeating: fill, count: n - chunk.count) }
                out.append(.array(chunk))
                k += n
            }
            return .array(out)
        case "format":
            throw ChatTemplateError.unsupported("the 'format' filter (printf-style formatting)", line: 0)
        default:
            throw ChatTemplateError.unsupported("filter '\(name)'", line: 0)
        }
    }

    /// Python's sorted(): stable, by key.
    static func sortValues(_ xs: inout [JinjaValue], key: (JinjaValue) throws -> JinjaValue, reverse: Bool) throws {
        let keyed = try xs.map { (try key($0), $0) }
        var failure: Error? = nil
        let sorted = keyed.enumerated().sorted { l, r in
            do {
                let c = try order(l.element.0, r.element.0, "<")
                if c != 0 { return reverse ? c > 0 : c < 0 }
            } catch { failure = error }
            return l.offset < r.offset
        }
        if let failure { throw failure }
        xs = sorted.map { $0.element.1 }
    }

    // MARK: Tests

    static func test(_ name: String, _ v: JinjaValue, _ args: [JinjaValue], _ interp: JinjaInterpreter) throws -> Bool {
        func other() throws -> JinjaValue {
            guard let a = args.first else { throw fail("test '\(name)' needs an argument") }
            return a
        }
        switch name {
        case "defined": return !v.isUndefined
        case "undefined": return v.isUndefined
        case "none": return v.isNone
        case "boolean": if case .bool = v { return true }; return false
        case "true": if case .bool(true) = v { return true }; return false
        case "false": if case .bool(false) = v { return true }; return false
        case "integer": if case .int = v { return true }; return false
        case "float": if case .double = v { return true }; return false
        case "number": return v.numeric != nil
        case "string": if case .string = v { return true }; return false
        case "mapping": if case .object = v { return true }; return false
        case "iterable", "sequence":
            switch v {
            case .array, .tuple, .object, .string, .undefined: return true
            default: return false
            }
        case "callable": if case .callable = v { return true }; return false
        case "sameas":
            let o = try other()
            switch (v, o) {
            case (.none, .none): return true
            case (.bool(let a), .bool(let b)): return a == b
            case (.namespace(let a), .namespace(let b)): return a === b
            default: return false
            }
        case "escaped": return false
        case "eq", "equalto", "==": return JinjaValue.pyEqual(v, try other())
        case "ne", "!=": return !JinjaValue.pyEqual(v, try other())
        case "lt", "lessthan", "<": return try compare("<", v, try other())
        case "le", "<=": return try compare("<=", v, try other())
        case "gt", "greaterthan", ">": return try compare(">", v, try other())
        case "ge", ">=": return try compare(">=", v, try other())
        case "in": return try contains(try other(), v)
        case "odd", "even":
            guard let i = v.intValue else { throw fail("test '\(name)' needs an integer") }
            return (abs(i) % 2 == 1) == (name == "odd")
        case "divisibleby":
            guard let i = v.intValue, let d = try other().intValue, d != 0 else { throw fail("divisibleby needs integers") }
            return i % d == 0
        case "lower":
            let s = stringOf(v)
            let cased = s.unicodeScalars.filter { $0.properties.isCased }
            return !cased.isEmpty && cased.allSatisfy { !$0.properties.isUppercase }
        case "upper":
            let s = stringOf(v)
            let cased = s.unicodeScalars.filter { $0.properties.isCased }
            return !cased.isEmpty && cased.allSatisfy { !$0.properties.isLowercase }
        case "filter":
            guard case .string(let f) = v else { return false }
            return knownFilters.contains(f)
        case "test":
            guard case .string(let t) = v else { return false }
            return knownTests.contains(t)
        default:
            throw ChatTemplateError.unsupported("test '\(name)'", line: 0)
        }
    }

    static let knownFilters: Set<String> = ["tojson", "trim", "length", "count", "upper", "lower", "capitalize", "title", "replace",
                                            "join", "default", "d", "first", "last", "list", "string", "safe", "e", "escape",
                                            "forceescape", "int", "float", "abs", "round", "items", "dictsort", "sort", "unique",
                                            "reverse", "sum", "min", "max", "map", "select", "reject", "selectattr", "rejectattr",
                                            "attr", "indent", "center", "wordcount", "batch"]
    static let knownTests: Set<String> = ["defined", "undefined", "none", "boolean", "true", "false", "integer", "float", "number",
                                          "string", "mapping", "iterable", "sequence", "callable", "sameas", "escaped", "eq",
                                          "equalto", "==", "ne", "!=", "lt", "lessthan", "<", "le", "<=", "gt", "greaterthan", ">",
                                          "ge", ">=", "in", "odd", "even", "divisibleby", "lower", "upper", "filter", "test"]
}

extension JinjaValue {
    var isNone: Bool { if case .none = self { return true }; return false }

    func asCallable() throws -> JinjaCallable {
        guard case .callable(let c) = self else { throw ChatTemplateError.render("'\(typeName)' object is not callable") }
        return c
    }
}
