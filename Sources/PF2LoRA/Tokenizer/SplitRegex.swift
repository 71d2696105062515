/// The regular expressions of tokenizer.json `Split` pre-tokenizers, matched over UTF-8 bytes the
/// way oniguruma (inside Hugging Face tokenizers) matches them: a backtracking matcher, alternatives
/// tried in order (leftmost-first), greedy quantifiers giving back one character at a time.
///
/// The syntax is the part these files use: literals and escapes (`\r \n \t \f \v \x41 \u00e9`, `\.`),
/// `.`, classes `[...]` / `[^...]` with ranges, `\s \S`, `\p{L} \p{N}` and their negations `\P{..}`
/// (also written `\p{Letter}`, `\p{^L}`), groups `(...)`, `(?:...)`, case-insensitive groups
/// `(?i:...)`, lookaheads `(?=...)` / `(?!...)`, and the quantifiers `? * + {n} {n,} {n,m}`, greedy
/// or lazy (`??`, `+?`...). Letter, number and whitespace are oniguruma's own Unicode tables
/// (`scalarClassTable`). Anything else (`\p{Lu}`, `\d`, `\w`, anchors, backreferences, possessive
/// quantifiers, lookbehind...) is refused with an error naming the construct.
///
/// Not thread-safe: the backtracking stack is reused; the tokenizer calls it under its lock.
final class SplitRegex {
    let pattern: String
    private let program: [Inst]
    private let sets: [ScalarSet]
    private var stack: [Frame] = []

    /// One character class: a bit per `scalarClassTable` class (other, letter, number, whitespace)
    /// plus explicit code point ranges, optionally negated. ASCII membership is precomputed.
    struct ScalarSet {
        var classBits: UInt8 = 0
        var ranges: [ClosedRange<UInt32>] = []
        var negated = false
        var asciiLow: UInt64 = 0
        var asciiHigh: UInt64 = 0

        func containsSlow(_ cp: UInt32, _ cls: UInt8) -> Bool {
            var inSet = classBits & (1 << cls) != 0
            if !inSet { for r in ranges where r.contains(cp) { inSet = true; break } }
            return inSet != negated
        }

        mutating func finish() {
            asciiLow = 0; asciiHigh = 0
            for b in 0..<128 where containsSlow(UInt32(b), scalarClassTable[b]) {
                if b < 64 { asciiLow |= 1 << UInt64(b) } else { asciiHigh |= 1 << UInt64(b - 64) }
            }
        }

        @inline(__always) func containsASCII(_ b: UInt8) -> Bool {
            b < 64 ? (asciiLow >> UInt64(b)) & 1 != 0 : (asciiHigh >> UInt64(b - 64)) & 1 != 0
        }
    }

    enum Inst {
        case one(Int)                                    // one scalar in sets[k]
        case run(Int, min: Int, max: Int, greedy: Bool)  // min...max scalars of sets[k] (max -1: no limit)
        case split(Int, Int)                             // go to the first, backtrack to the second
        case jump(Int)
        case notFollowedBy(Int)                          // (?!X) for a one-scalar X: fail if the next scalar is in sets[k]
        case followedBy(Int)                             // (?=X) for a one-scalar X
        case look(Int, negate: Bool)                     // general lookahead: sub-program at k, ending in .match
        case match
    }

    private struct Frame {
        var pc: Int
        var pos: Int
        var lo: Int      // greedy run: the least position it may give back to; lazy run: count so far
        var kind: UInt8  // 0 alternative, 1 greedy run, 2 lazy run
    }

    init(_ pattern: String) throws(RegexError) {
        self.pattern = pattern
        var parser = RegexParser(Array(pattern.unicodeScalars))
        let node = try parser.parseAll()
        var compiler = RegexCompiler()
        compiler.emitTop(node)
        program = compiler.program
        sets = compiler.sets.map { var s = $0; s.finish(); return s }
    }

    // MARK: Matching

    /// The leftmost match starting at or after `from` in `p[..<end]` (the end bounds lookaheads too),
    /// as a byte range; an empty match is not accepted at `notEmptyAt` (where the previous match ended).
    func firstMatch(_ p: UnsafePointer<UInt8>, from: Int, end: Int, notEmptyAt: Int = -1) -> (Int, Int)? {
        var s = from
        while s <= end {
            if let e = run(p, pc: 0, at: s, end: end), !(e == s && s == notEmptyAt) { return (s, e) }
            if s == end { break }
            s += utf8Length(p[s])
        }
        return nil
    }

    /// Every match in `p[..<end]`, in order, as oniguruma's find_iter yields them.
    func matches(_ p: UnsafePointer<UInt8>, _ end: Int) -> [(Int, Int)] {
        var out: [(Int, Int)] = []
        var from = 0
        var lastEnd = -1
        while from <= end, let (s, e) = firstMatch(p, from: from, end: end, notEmptyAt: lastEnd) {
            out.append((s, e))
            lastEnd = e
            from = e
            if e == s {   // step over one character after an empty match
                if e == end { break }
                from = e + utf8Length(p[e])
            }
        }
        return out
    }

    @inline(__always) private func utf8Length(_ b: UInt8) -> Int {
        b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4
    }

    /// Whether the scalar at `pos` (< end) is in set `k`, and its byte length.
    @inline(__always)
    private func test(_ set: UnsafePointer<ScalarSet>, _ p: UnsafePointer<UInt8>, _ pos: Int) -> (Bool, Int) {
        let b0 = p[pos]
        if b0 < 0x80 { return (set.pointee.containsASCII(b0), 1) }
        let cp: UInt32, len: Int
        if b0 < 0xE0 {
            cp = UInt32(b0 & 0x1F) << 6 | UInt32(p[pos + 1] & 0x3F); len = 2
        } else if b0 < 0xF0 {
            cp = UInt32(b0 & 0x0F) << 12 | UInt32(p[pos + 1] & 0x3F) << 6 | UInt32(p[pos + 2] & 0x3F); len = 3
        } else {
            cp = UInt32(b0 & 0x07) << 18 | UInt32(p[pos + 1] & 0x3F) << 12 | UInt32(p[pos + 2] & 0x3F) << 6 | UInt32(p[pos + 3] & 0x3F); len = 4
        }
        return (set.pointee.containsSlow(cp, scalarClassTable[Int(cp)]), len)
    }

    /// Runs the program from `pc` at byte `at`; the end of the first successful path, or nil.
    func run(_ p: UnsafePointer<UInt8>, pc startPC: Int, at: Int, end: Int) -> Int? {
        let base = stack.count
        var pc = startPC
        var pos = at
        return program.withUnsafeBufferPointer { progBuf in
            sets.withUnsafeBufferPointer { setBuf in
                let prog = progBuf.baseAddress!, setp = setBuf.baseAddress!
                while true {
                    var ok = true
                    switch prog[pc] {
                    case .one(let k):
                        if pos < end {
                            let (inSet, len) = test(setp + k, p, pos)
                            if inSet { pos += len; pc += 1 } else { ok = false }
                        } else { ok = false }
                    case let .run(k, minCount, maxCount, greedy):
                        var count = 0
                        while count < minCount, pos < end {
                            let (inSet, len) = test(setp + k, p, pos)
                            if !inSet { break }
                            pos += len; count += 1
                        }
                        if count < minCount { ok = false; break }
                        if greedy {
                            let lo = pos
                            while maxCount < 0 || count < maxCount, pos < end {
                                let (inSet, len) = test(setp + k, p, pos)
                                if !inSet { break }
                                pos += len; count += 1
                            }
                            if pos > lo { stack.append(Frame(pc: pc + 1, pos: pos, lo: lo, kind: 1)) }
                        } else if maxCount < 0 || count < maxCount {
                            stack.append(Frame(pc: pc, pos: pos, lo: count, kind: 2))
                        }
                        pc += 1
                    case let .split(a, b):
                        stack.append(Frame(pc: b, pos: pos, lo: 0, kind: 0))
                        pc = a
                    case .jump(let a):
                        pc = a
                    case .notFollowedBy(let k):
                        if pos < end && test(setp + k, p, pos).0 { ok = false } else { pc += 1 }
                    case .followedBy(let k):
                        if pos < end && test(setp + k, p, pos).0 { pc += 1 } else { ok = false }
                    case let .look(sub, negate):
                        let found = run(p, pc: sub, at: pos, end: end) != nil
                        if found != negate { pc += 1 } else { ok = false }
                    case .match:
                        stack.removeSubrange(base...)
                        return pos
                    }
                    if ok { continue }
                    // Backtrack.
                    while true {
                        if stack.count == base { return nil }
                        let f = stack[stack.count - 1]
                        switch f.kind {
                        case 0:
                            stack.removeLast()
                            pc = f.pc; pos = f.pos
                        case 1:
                            // give back one scalar
                            var q = f.pos - 1
                            while p[q] & 0xC0 == 0x80 { q -= 1 }
                            if q > f.lo { stack[stack.count - 1].pos = q } else { stack.removeLast() }
                            pc = f.pc; pos = q
                        default:
                            // lazy: take one more scalar
                            stack.removeLast()
                            guard case let .run(k, _, maxCount, _) = prog[f.pc], f.pos < end else { continue }
                            let (inSet, len) = test(setp + k, p, f.pos)
                            guard inSet else { continue }
                            let count = f.lo + 1
                            if maxCount < 0 || count < maxCount { stack.append(Frame(pc: f.pc, pos: f.pos + len, lo: count, kind: 2)) }
                            pc = f.pc + 1; pos = f.pos + len
                        }
                        break
                    }
                }
            }
        }
    }
}

/// A pattern the matcher cannot take, with the construct named.
public struct RegexError: Error, CustomStringConvertible, Equatable {
    public let pattern: String
    public let construct: String
    /// The construct (named by the parser, with at most a short escaped name from the pattern) and
    /// the pattern's length: the pattern itself is the file's content and is not quoted.
    public var description: String { "regex construct \(construct) is not supported (in a pattern of \(pattern.utf8.count) bytes)" }
}

// MARK: Parsing

private indirect enum RegexNode {
    case set(SplitRegex.ScalarSet)
    case concat([RegexNode])
    case alt([RegexNode])
    case rep(RegexNode, min: Int, max: Int, greedy: Bool)   // max -1: no limit
    case look(RegexNode, negate: Bool)

    var nullable: Bool {
        switch self {
        case .set: return false
        case .concat(let xs): return xs.allSatisfy { $0.nullable }
        case .alt(let xs): return xs.contains { $0.nullable }
        case let .rep(x, minCount, _, _): return minCount == 0 || x.nullable
        case .look: return true
        }
    }
}

private struct RegexParser {
    let s: [Unicode.Scalar]
    var i = 0
    var caseInsensitive = false

    init(_ s: [Unicode.Scalar]) { self.s = s }

    var pattern: String { String(String.UnicodeScalarView(s)) }

    func fail(_ construct: String) -> RegexError { RegexError(pattern: pattern, construct: construct) }

    mutating func parseAll() throws(RegexError) -> RegexNode {
        let n = try parseAlt()
        if i < s.count { throw fail("unbalanced ')' at offset \(i)") }
        return n
    }

    mutating func parseAlt() throws(RegexError) -> RegexNode {
        var branches = [try parseConcat()]
        while i < s.count, s[i] == "|" {
            i += 1
            branches.append(try parseConcat())
        }
        return branches.count == 1 ? branches[0] : .alt(branches)
    }

    mutating func parseConcat() throws(RegexError) -> RegexNode {
        var items: [RegexNode] = []
        while i < s.count, s[i] != "|", s[i] != ")" {
            var atom = try parseAtom()
            atom = try parseQuantifiers(atom)
            items.append(atom)
        }
        return items.count == 1 ? items[0] : .concat(items)
    }

    mutating func parseQuantifiers(_ atom: RegexNode) throws(RegexError) -> RegexNode {
        var atom = atom
        while i < s.count {
            var minCount = 0, maxCount = -1
            let c = s[i]
            if c == "?" { maxCount = 1; i += 1 }
            else if c == "*" { i += 1 }
            else if c == "+" { minCount = 1; i += 1 }
            else if c == "{", let (lo, hi, len) = braceQuantifier(at: i) { minCount = lo; maxCount = hi; i += len }
            else { break }
            var greedy = true
            if i < s.count, s[i] == "?" { greedy = false; i += 1 }
            else if i < s.count, s[i] == "+" { throw fail("possessive quantifier '\(c)+'") }
            if case .look = atom { throw fail("quantified lookahead") }
            if maxCount != 1, atom.nullable { throw fail("a repeated group that can match the empty string") }
            if maxCount >= 0 && maxCount < minCount { throw fail("quantifier {\(minCount),\(maxCount)}") }
            atom = .rep(atom, min: minCount, max: maxCount, greedy: greedy)
        }
        return atom
    }

    /// `{n}`, `{n,}`, `{n,m}` at `k`: (min, max or -1, length in scalars); nil if it is a literal '{'.
    func braceQuantifier(at k: Int) -> (Int, Int, Int)? {
        var j = k + 1
        func number() -> Int? {
            var v: Int? = nil
            while j < s.count, s[j].value >= 0x30, s[j].value <= 0x39 {
                v = (v ?? 0) * 10 + Int(s[j].value - 0x30); j += 1
                if v! > 100_000 { return nil }
            }
            return v
        }
        guard let lo = number() else { return nil }
        var hi = lo
        if j < s.count, s[j] == "," {
            j += 1
            hi = number() ?? -1
        }
        guard j < s.count, s[j] == "}" else { return nil }
        return (lo, hi, j + 1 - k)
    }

    mutating func parseAtom() throws(RegexError) -> RegexNode {
        let c = s[i]
        switch c {
        case "(":
            i += 1
            if i < s.count, s[i] == "?" {
                i += 1
                guard i < s.count else { throw fail("'(?' at the end") }
                switch s[i] {
                case ":":
                    i += 1
                    return try group()
                case "=", "!":
                    let negate = s[i] == "!"
                    i += 1
                    let body = try group()
                    return .look(body, negate: negate)
                case "i":
                    // (?i:...) or (?i) for the rest of the enclosing group
                    i += 1
                    guard i < s.count else { throw fail("'(?i' at the end") }
                    if s[i] == ":" {
                        i += 1
                        let saved = caseInsensitive
                        caseInsensitive = true
                        let body = try group()
                        caseInsensitive = saved
                        return body
                    }
                    if s[i] == ")" {
                        i += 1
                        caseInsensitive = true
                        return .concat([])
                    }
                    throw fail("inline option group '(?i\(s[i])'")
                case "<":
                    if i + 1 < s.count, s[i + 1] == "=" || s[i + 1] == "!" { throw fail("lookbehind '(?<\(s[i + 1])'") }
                    throw fail("named group '(?<'")
                default:
                    throw fail("group '(?\(s[i])'")
                }
            }
            return try group()
        case ")":
            throw fail("unbalanced ')'")
        case "[":
            return .set(try bracketClass())
        case ".":
            i += 1
            var set = SplitRegex.ScalarSet()
            set.ranges = [0x0A...0x0A]
            set.negated = true
            return .set(set)
        case "^", "$":
            throw fail("anchor '\(c)'")
        case "*", "+", "?", "{":
            if c == "{", braceQuantifier(at: i) == nil { i += 1; return .set(literal(c.value)) }
            throw fail("quantifier '\(c)' with nothing to repeat")
        case "\\":
            i += 1
            return .set(try escape(inClass: false))
        default:
            i += 1
            return .set(literal(c.value))
        }
    }

    mutating func group() throws(RegexError) -> RegexNode {
        let saved = caseInsensitive
        let body = try parseAlt()
        caseInsensitive = saved
        guard i < s.count, s[i] == ")" else { throw fail("unclosed group") }
        i += 1
        return body
    }

    /// A one-scalar set for a literal, with its other cases under (?i).
    func literal(_ cp: UInt32) -> SplitRegex.ScalarSet {
        var set = SplitRegex.ScalarSet()
        for v in caseInsensitive ? caseVariants(cp) : [cp] { set.ranges.append(v...v) }
        return set
    }

    /// The scalars that match `cp` case-insensitively: its simple upper and lower cases, plus the
    /// two non-ASCII scalars that fold to ASCII letters (U+017F long s -> s, U+212A Kelvin -> k).
    func caseVariants(_ cp: UInt32) -> [UInt32] {
        guard let sc = Unicode.Scalar(cp) else { return [cp] }
        var out: Set<UInt32> = [cp]
        for m in [sc.properties.lowercaseMapping, sc.properties.uppercaseMapping, sc.properties.titlecaseMapping] {
            let us = Array(m.unicodeScalars)
            if us.count == 1 { out.insert(us[0].value) }
        }
        let lower = out.compactMap { Unicode.Scalar($0) }.map { $0.properties.lowercaseMapping }
        if lower.contains("s") { out.formUnion([0x73, 0x53, 0x17F]) }
        if lower.contains("k") { out.formUnion([0x6B, 0x4B, 0x212A]) }
        return out.sorted()
    }

    /// After a backslash. Returns the set the escape stands for.
    mutating func escape(inClass: Bool) throws(RegexError) -> SplitRegex.ScalarSet {
        guard i < s.count else { throw fail("trailing backslash") }
        let c = s[i]
        i += 1
        var set = SplitRegex.ScalarSet()
        switch c {
        case "s": set.classBits = 1 << ScalarClass.whitespace.rawValue
        case "S": set.classBits = 0x0F & ~(1 << ScalarClass.whitespace.rawValue)
        case "p", "P":
            guard i < s.count, s[i] == "{" else { throw fail("'\\\(c)' without {name}") }
            var j = i + 1
            var name = ""
            while j < s.count, s[j] != "}" { name.unicodeScalars.append(s[j]); j += 1 }
            guard j < s.count else { throw fail("unclosed '\\\(c){'") }
            i = j + 1
            var negate = c == "P"
            if name.hasPrefix("^") { negate.toggle(); name.removeFirst() }
            let bit: UInt8
            switch name {
            case "L", "Letter": bit = 1 << ScalarClass.letter.rawValue
            case "N", "Number": bit = 1 << ScalarClass.number.rawValue
            default:
                // A Unicode property name is shown when it looks like one (short ASCII letters and '_').
                let shown = name.utf8.count <= 24 && name.unicodeScalars.allSatisfy { ($0.isASCII && $0.properties.isAlphabetic) || $0 == "_" || $0 == "=" }
                throw fail("'\\\(c){\(shown ? name : "…")}'\(shown ? "" : " (a name of \(name.utf8.count) bytes)") (only \\p{L} and \\p{N} are)")
            }
            set.classBits = negate ? 0x0F & ~bit : bit
        case "r": set.ranges = [0x0D...0x0D]
        case "n": set.ranges = [0x0A...0x0A]
        case "t": set.ranges = [0x09...0x09]
        case "f": set.ranges = [0x0C...0x0C]
        case "v": set.ranges = [0x0B...0x0B]
        case "a": set.ranges = [0x07...0x07]
        case "e": set.ranges = [0x1B...0x1B]
        case "x", "u":
            var digits = ""
            if i < s.count, s[i] == "{" {
                i += 1
                while i < s.count, s[i] != "}" { digits.unicodeScalars.append(s[i]); i += 1 }
                i += 1
            } else {
                let n = c == "x" ? 2 : 4
                while digits.count < n, i < s.count, s[i].properties.isASCIIHexDigit { digits.unicodeScalars.append(s[i]); i += 1 }
            }
            guard let v = UInt32(digits, radix: 16), Unicode.Scalar(v) != nil else { throw fail("escape '\\\(c)\(digits)'") }
            return literal(v)
        default:
            if c.properties.isAlphabetic || c.properties.numericType != nil {
                throw fail("escape '\\\(c)'")
            }
            return literal(c.value)   // \. \\ \' \- \[ ...
        }
        return set
    }

    /// `[...]` or `[^...]`: a union of literals, ranges, \s \S \p{..} items.
    mutating func bracketClass() throws(RegexError) -> SplitRegex.ScalarSet {
        i += 1
        var set = SplitRegex.ScalarSet()
        if i < s.count, s[i] == "^" { set.negated = true; i += 1 }
        var first = true
        while true {
            guard i < s.count else { throw fail("unclosed '['") }
            let c = s[i]
            if c == "]" && !first { i += 1; break }
            first = false
            if c == "[" { throw fail("nested class '[' inside '[...]'") }
            if c == "&", i + 1 < s.count, s[i + 1] == "&" { throw fail("class intersection '&&'") }
            var item: SplitRegex.ScalarSet
            var single: UInt32? = nil
            if c == "\\" {
                i += 1
                item = try escape(inClass: true)
                if item.classBits == 0, !item.negated, item.ranges.count == 1, item.ranges[0].count == 1 {
                    single = item.ranges[0].lowerBound
                }
            } else {
                i += 1
                item = literal(c.value)
                single = c.value
            }
            // a range a-b
            if let lo = single, i + 1 < s.count, s[i] == "-", s[i + 1] != "]" {
                i += 1
                var hiScalar: UInt32
                if s[i] == "\\" {
                    i += 1
                    let h = try escape(inClass: true)
                    guard h.classBits == 0, h.ranges.count >= 1 else { throw fail("range ending in a class") }
                    hiScalar = h.ranges[0].lowerBound
                } else {
                    hiScalar = s[i].value
                    i += 1
                }
                guard hiScalar >= lo else { throw fail("empty range in '[...]'") }
                if caseInsensitive { throw fail("a range inside (?i:...)") }
                item = SplitRegex.ScalarSet()
                item.ranges = [lo...hiScalar]
            }
            set.classBits |= item.classBits
            set.ranges += item.ranges
        }
        return set
    }
}

// MARK: Compiling

private struct RegexCompiler {
    var program: [SplitRegex.Inst] = []
    var sets: [SplitRegex.ScalarSet] = []
    private var pendingLooks: [(at: Int, body: RegexNode, negate: Bool)] = []

    mutating func addSet(_ s: SplitRegex.ScalarSet) -> Int {
        sets.append(s)
        return sets.count - 1
    }

    mutating func emitTop(_ node: RegexNode) {
        emit(node)
        program.append(.match)
        // General lookaheads become sub-programs after the main one.
        while !pendingLooks.isEmpty {
            let (at, body, negate) = pendingLooks.removeFirst()
            program[at] = .look(program.count, negate: negate)
            emit(body)
            program.append(.match)
        }
    }

    mutating func emit(_ node: RegexNode) {
        switch node {
        case .set(let s):
            program.append(.one(addSet(s)))
        case .concat(let xs):
            for x in xs { emit(x) }
        case .alt(let xs):
            // split L1, next; L1: x0; jump end; next: split L2, next2 ... last: xn
            var jumps: [Int] = []
            for (k, x) in xs.enumerated() {
                if k < xs.count - 1 {
                    let splitAt = program.count
                    program.append(.jump(0))
                    emit(x)
                    jumps.append(program.count)
                    program.append(.jump(0))
                    program[splitAt] = .split(splitAt + 1, program.count)
                } else {
                    emit(x)
                }
            }
            for j in jumps { program[j] = .jump(program.count) }
        case let .rep(x, minCount, maxCount, greedy):
            if case .set(let s) = x {
                program.append(.run(addSet(s), min: minCount, max: maxCount, greedy: greedy))
                return
            }
            for _ in 0..<minCount { emit(x) }
            if maxCount < 0 {
                // L: split body, out; body; jump L
                let loop = program.count
                program.append(.jump(0))
                emit(x)
                program.append(.jump(loop))
                program[loop] = greedy ? .split(loop + 1, program.count) : .split(program.count, loop + 1)
            } else {
                var splits: [Int] = []
                for _ in minCount..<maxCount {
                    splits.append(program.count)
                    program.append(.jump(0))
                    emit(x)
                }
                for at in splits { program[at] = greedy ? .split(at + 1, program.count) : .split(program.count, at + 1) }
            }
        case let .look(body, negate):
            if case .set(let s) = body {
                program.append(negate ? .notFollowedBy(addSet(s)) : .followedBy(addSet(s)))
            } else {
                pendingLooks.append((program.count, body, negate))
                program.append(.match)   // placeholder, patched in emitTop
            }
        }
    }
}
