/// Expressions of the template language, as jinja2's parser builds them.
indirect enum JinjaExpr {
    case literal(JinjaValue)
    case name(String)
    case list([JinjaExpr])
    case tuple([JinjaExpr])
    case dict([(JinjaExpr, JinjaExpr)])
    case attribute(JinjaExpr, String)
    case item(JinjaExpr, JinjaExpr)
    case slice(JinjaExpr, JinjaExpr?, JinjaExpr?, JinjaExpr?)
    case call(JinjaExpr, [JinjaExpr], [(String, JinjaExpr)])
    case filter(JinjaExpr, String, [JinjaExpr], [(String, JinjaExpr)])
    case test(JinjaExpr, String, [JinjaExpr], negated: Bool)
    case unary(String, JinjaExpr)                 // "-", "+", "not"
    case binary(String, JinjaExpr, JinjaExpr)     // + - * / // % ** ~ and or
    case compare(JinjaExpr, [(String, JinjaExpr)]) // == != < <= > >= in notin, chained
    case conditional(JinjaExpr, then: JinjaExpr, otherwise: JinjaExpr?)
}

/// Assignment targets: `x`, `a, b`, `ns.attr`.
indirect enum JinjaTarget {
    case name(String)
    case tuple([JinjaTarget])
    case attribute(String, String)
}

/// Template statements.
indirect enum JinjaNode {
    case text(String)
    case output(JinjaExpr, line: Int)
    case ifChain([(JinjaExpr, [JinjaNode])], otherwise: [JinjaNode], line: Int)
    case forLoop(JinjaTarget, JinjaExpr, filter: JinjaExpr?, body: [JinjaNode], otherwise: [JinjaNode], line: Int)
    case set(JinjaTarget, JinjaExpr, line: Int)
    case setBlock(String, [JinjaNode], filters: [(String, [JinjaExpr], [(String, JinjaExpr)])], line: Int)
    case macro(String, [(String, JinjaExpr?)], [JinjaNode], line: Int)
    case filterBlock([(String, [JinjaExpr], [(String, JinjaExpr)])], [JinjaNode], line: Int)
    case with([(JinjaTarget, JinjaExpr)], [JinjaNode], line: Int)
    case breakLoop(line: Int)
    case continueLoop(line: Int)
    case generation([JinjaNode])
}

/// jinja2's recursive-descent parser over the lexer's tokens (the subset of statements chat
/// templates use; `include`, `extends`, `import`, `block`, `call` are refused by name).
struct JinjaParser {
    private let tokens: [JinjaToken]
    private var p = 0

    init(_ tokens: [JinjaToken]) { self.tokens = tokens }

    static func parse(_ source: String) throws -> [JinjaNode] {
        var parser = JinjaParser(try JinjaLexer.tokenize(source))
        let (nodes, end) = try parser.parseBody(until: [])
        if let end { throw ChatTemplateError.syntax("unexpected '\(end)'", line: parser.line) }
        return nodes
    }

    private var line: Int { p < tokens.count ? tokens[p].line : (tokens.last?.line ?? 1) }
    private var current: JinjaToken.Kind? { p < tokens.count ? tokens[p].kind : nil }

    private func error(_ message: String) -> ChatTemplateError { .syntax(message, line: line) }

    private mutating func advance() -> JinjaToken.Kind? {
        defer { p += 1 }
        return current
    }

    private func isName(_ n: String) -> Bool { if case .name(n)? = current { return true }; return false }
    private func isOp(_ o: String) -> Bool { if case .op(o)? = current { return true }; return false }

    private mutating func expectOp(_ o: String) throws {
        guard isOp(o) else { throw error("expected '\(o)', got \(describe(current))") }
        p += 1
    }

    private mutating func expectName() throws -> String {
        guard case .name(let n)? = current else { throw error("expected a name, got \(describe(current))") }
        p += 1
        return n
    }

    private mutating func expectBlockEnd() throws {
        guard current == .blockEnd else { throw error("expected end of statement '%}', got \(describe(current))") }
        p += 1
    }

    private func describe(_ k: JinjaToken.Kind?) -> String {
        switch k {
        case nil: return "end of template"
        case .data?: return "text"
        case .variableBegin?: return "'{{'"
        case .variableEnd?: return "'}}'"
        case .blockBegin?: return "'{%'"
        case .blockEnd?: return "'%}'"
        case .name(let n)?: return FileText.key(n)
        // A literal's text is the template's content: described, not quoted.
        case .string(let s)?: return "a string literal of \(s.utf8.count) bytes"
        case .int(let i)?: return String(i)
        case .float(let d)?: return PythonFormat.floatRepr(d)
        case .op(let o)?: return "'\(o)'"
        }
    }

    // MARK: Statements

    /// Parses nodes until a block whose first name is in `until`; returns that name (the tag is
    /// consumed up to the name) or nil at the end of the template.
    private mutating func parseBody(until: Set<String>) throws -> ([JinjaNode], String?) {
        var nodes: [JinjaNode] = []
        while let tok = current {
            switch tok {
            case .data(let text):
                p += 1
                nodes.append(.text(text))
            case .variableBegin:
                let l = line
                p += 1
                let e = try parseTuple(allowEmpty: false)
                guard current == .variableEnd else { throw error("expected end of print statement '}}', got \(describe(current))") }
                p += 1
                nodes.append(.output(e, line: l))
            case .blockBegin:
                p += 1
                guard case .name(let keyword)? = current else { throw error("expected a statement name after '{%', got \(describe(current))") }
                if until.contains(keyword) {
                    p += 1
                    return (nodes, keyword)
                }
                nodes.append(try parseStatement(keyword))
            default:
                throw error("unexpected \(describe(tok))")
            }
        }
        if !until.isEmpty { throw error("unexpected end of template, expected one of \(until.sorted().map { "'\($0)'" }.joined(separator: ", "))") }
        return (nodes, nil)
    }

    private mutating func parseStatement(_ keyword: String) throws -> JinjaNode {
        let l = line
        p += 1
        switch keyword {
        case "if":
            var branches: [(JinjaExpr, [JinjaNode])] = []
            var condition = try parseTuple(allowEmpty: false, withCondition: false)
            while true {
                try expectBlockEnd()
                let (body, end) = try parseBody(until: ["elif", "else", "endif"])
                branches.append((condition, body))
                switch end {
                case "elif":
                    condition = try parseTuple(allowEmpty: false, withCondition: false)
                case "else":
                    try expectBlockEnd()
                    let (otherwise, _) = try parseBody(until: ["endif"])
                    try expectBlockEnd()
                    return .ifChain(branches, otherwise: otherwise, line: l)
                default:
                    try expectBlockEnd()
                    return .ifChain(branches, otherwise: [], line: l)
                }
            }
        case "for":
            let target = try parseAssignTarget(allowAttribute: false)
            guard isName("in") else { throw error("expected 'in' in a for loop, got \(describe(current))") }
            p += 1
            let iter = try parseTuple(allowEmpty: false, withCondition: false)
            var filter: JinjaExpr? = nil
            if isName("if") {
                p += 1
                filter = try parseExpression()
            }
            if isName("recursive") { throw error("recursive for loops are not supported") }
            try expectBlockEnd()
            let (body, end) = try parseBody(until: ["endfor", "else"])
            var otherwise: [JinjaNode] = []
            if end == "else" {
                try expectBlockEnd()
                (otherwise, _) = try parseBody(until: ["endfor"])
            }
            try expectBlockEnd()
            return .forLoop(target, iter, filter: filter, body: body, otherwise: otherwise, line: l)
        case "set":
            let target = try parseAssignTarget(allowAttribute: true)
            if isOp("=") {
                p += 1
                let value = try parseTuple(allowEmpty: false)
                try expectBlockEnd()
                return .set(target, value, line: l)
            }
            guard case .name(let name) = target else { throw error("a block set needs a plain name") }
            var filters: [(String, [JinjaExpr], [(String, JinjaExpr)])] = []
            while isOp("|") {
                p += 1
                filters.append(try parseFilterCall())
            }
            try expectBlockEnd()
            let (body, _) = try parseBody(until: ["endset"])
            try expectBlockEnd()
            return .setBlock(name, body, filters: filters, line: l)
        case "macro":
            let name = try expectName()
            try expectOp("(")
            var params: [(String, JinjaExpr?)] = []
            while !isOp(")") {
                if !params.isEmpty { try expectOp(",") }
                if isOp(")") { break }
                let param = try expectName()
                var defaultValue: JinjaExpr? = nil
                if isOp("=") {
                    p += 1
                    defaultValue = try parseExpression()
                }
                params.append((param, defaultValue))
            }
            p += 1
            try expectBlockEnd()
            let (body, _) = try parseBody(until: ["endmacro"])
            if case .name? = current { p += 1 }   // {% endmacro name %}
            try expectBlockEnd()
            return .macro(name, params, body, line: l)
        case "filter":
            var filters = [try parseFilterCall()]
            while isOp("|") {
                p += 1
                filters.append(try parseFilterCall())
            }
            try expectBlockEnd()
            let (body, _) = try parseBody(until: ["endfilter"])
            try expectBlockEnd()
            return .filterBlock(filters, body, line: l)
        case "with":
            var assignments: [(JinjaTarget, JinjaExpr)] = []
            while current != .blockEnd {
                if !assignments.isEmpty { try expectOp(",") }
                let target = try parseAssignTarget(allowAttribute: false)
                try expectOp("=")
                assignments.append((target, try parseExpression()))
            }
            try expectBlockEnd()
            let (body, _) = try parseBody(until: ["endwith"])
            try expectBlockEnd()
            return .with(assignments, body, line: l)
        case "break", "continue":
            try expectBlockEnd()
            return keyword == "break" ? .breakLoop(line: l) : .continueLoop(line: l)
        case "generation":
            try expectBlockEnd()
            let (body, _) = try parseBody(until: ["endgeneration"])
            try expectBlockEnd()
            return .generation(body)
        default:
            throw ChatTemplateError.unsupported("statement '{% \(keyword) %}'", line: l)
        }
    }

    private mutating func parseAssignTarget(allowAttribute: Bool) throws -> JinjaTarget {
        var targets: [JinjaTarget] = []
        var sawComma = false
        repeat {
            if isOp("(") {
                p += 1
                targets.append(try parseAssignTarget(allowAttribute: false))
                try expectOp(")")
            } else {
                let name = try expectName()
                if allowAttribute && isOp(".") {
                    p += 1
                    targets.append(.attribute(name, try expectName()))
                } else {
                    targets.append(.name(name))
                }
            }
            if isOp(",") { p += 1; sawComma = true } else { break }
        } while !isName("in") && !isOp("=") && current != .blockEnd
        return targets.count == 1 && !sawComma ? targets[0] : .tuple(targets)
    }

    private mutating func parseFilterCall() throws -> (String, [JinjaExpr], [(String, JinjaExpr)]) {
        var name = try expectName()
        while isOp(".") { p += 1; name += "." + (try expectName()) }
        var args: [JinjaExpr] = [], kwargs: [(String, JinjaExpr)] = []
        if isOp("(") { (args, kwargs) = try parseCallArgs() }
        return (name, args, kwargs)
    }

    // MARK: Expressions

    /// A comma-separated list makes a tuple (as in `{{ a, b }}` or `for x in a, b`).
    private mutating func parseTuple(allowEmpty: Bool, withCondition: Bool = true) throws -> JinjaExpr {
        var items: [JinjaExpr] = []
        var sawComma = false
        while true {
            if !items.isEmpty {
                guard isOp(",") else { break }
                p += 1
                sawComma = true
            }
            if current == .blockEnd || current == .variableEnd || isOp(")") { break }
            items.append(withCondition ? try parseExpression() : try parseOr())
        }
        if items.isEmpty && !allowEmpty { throw error("expected an expression, got \(describe(current))") }
        return items.count == 1 && !sawComma ? items[0] : .tuple(items)
    }

    mutating func parseExpression() throws -> JinjaExpr {
        let expr = try parseOr()
        if isName("if") {
            p += 1
            let condition = try parseOr()
            var otherwise: JinjaExpr? = nil
            if isName("else") {
                p += 1
                otherwise = try parseExpression()
            }
            return .conditional(condition, then: expr, otherwise: otherwise)
        }
        return expr
    }

    private mutating func parseOr() throws -> JinjaExpr {
        var left = try parseAnd()
        while isName("or") { p += 1; left = .binary("or", left, try parseAnd()) }
        return left
    }

    private mutating func parseAnd() throws -> JinjaExpr {
        var left = try parseNot()
        while isName("and") { p += 1; left = .binary("and", left, try parseNot()) }
        return left
    }

    private mutating func parseNot() throws -> JinjaExpr {
        if isName("not") {
            p += 1
            return .unary("not", try parseNot())
        }
        return try parseCompare()
    }

    private mutating func parseCompare() throws -> JinjaExpr {
        let left = try parseMath1()
        var ops: [(String, JinjaExpr)] = []
        while true {
            if case .op(let o)? = current, ["==", "!=", "<", "<=", ">", ">="].contains(o) {
                p += 1
                ops.append((o, try parseMath1()))
            } else if isName("in") {
                p += 1
                ops.append(("in", try parseMath1()))
            } else if isName("not"), p + 1 < tokens.count, tokens[p + 1].kind == .name("in") {
                p += 2
                ops.append(("notin", try parseMath1()))
            } else {
                break
            }
        }
        return ops.isEmpty ? left : .compare(left, ops)
    }

    private mutating func parseMath1() throws -> JinjaExpr {
        var left = try parseConcat()
        while case .op(let o)? = current, o == "+" || o == "-" {
            p += 1
            left = .binary(o, left, try parseConcat())
        }
        return left
    }

    private mutating func parseConcat() throws -> JinjaExpr {
        var left = try parseMath2()
        while isOp("~") { p += 1; left = .binary("~", left, try parseMath2()) }
        return left
    }

    private mutating func parseMath2() throws -> JinjaExpr {
        var left = try parsePow()
        while case .op(let o)? = current, ["*", "/", "//", "%"].contains(o) {
            p += 1
            left = .binary(o, left, try parsePow())
        }
        return left
    }

    private mutating func parsePow() throws -> JinjaExpr {
        var left = try parseUnary(withFilter: true)
        while isOp("**") { p += 1; left = .binary("**", left, try parseUnary(withFilter: true)) }
        return left
    }

    private mutating func parseUnary(withFilter: Bool) throws -> JinjaExpr {
        var node: JinjaExpr
        if isOp("-") {
            p += 1
            node = .unary("-", try parseUnary(withFilter: false))
        } else if isOp("+") {
            p += 1
            node = .unary("+", try parseUnary(withFilter: false))
        } else {
            node = try parsePrimary()
        }
        node = try parsePostfix(node)
        if withFilter { node = try parseFilterExpr(node) }
        return node
    }

    private mutating func parsePrimary() throws -> JinjaExpr {
        guard let tok = current else { throw error("unexpected end of template") }
        switch tok {
        case .name(let n):
            p += 1
            switch n {
            case "true", "True": return .literal(.bool(true))
            case "false", "False": return .literal(.bool(false))
            case "none", "None": return .literal(.none)
            default: return .name(n)
            }
        case .string(let s):
            p += 1
            var text = s
            while case .string(let more)? = current { text += more; p += 1 }   // adjacent literals concatenate
            return .literal(.string(text))
        case .int(let i):
            p += 1
            return .literal(.int(i))
        case .float(let d):
            p += 1
            return .literal(.double(d))
        case .op("("):
            p += 1
            let e = try parseTuple(allowEmpty: true)
            try expectOp(")")
            return e
        case .op("["):
            p += 1
            var items: [JinjaExpr] = []
            while !isOp("]") {
                if !items.isEmpty { try expectOp(",") }
                if isOp("]") { break }
                items.append(try parseExpression())
            }
            p += 1
            return .list(items)
        case .op("{"):
            p += 1
            var items: [(JinjaExpr, JinjaExpr)] = []
            while !isOp("}") {
                if !items.isEmpty { try expectOp(",") }
                if isOp("}") { break }
                let key = try parseExpression()
                try expectOp(":")
                items.append((key, try parseExpression()))
            }
            p += 1
            return .dict(items)
        default:
            throw error("unexpected \(describe(tok))")
        }
    }

    private mutating func parsePostfix(_ node: JinjaExpr) throws -> JinjaExpr {
        var node = node
        while true {
            if isOp(".") {
                p += 1
                switch current {
                case .name(let n)?: p += 1; node = .attribute(node, n)
                case .int(let i)?: p += 1; node = .item(node, .literal(.int(i)))
                default: throw error("expected an attribute name after '.', got \(describe(current))")
                }
            } else if isOp("[") {
                p += 1
                node = try parseSubscript(node)
            } else if isOp("(") {
                let (args, kwargs) = try parseCallArgs()
                node = .call(node, args, kwargs)
            } else {
                return node
            }
        }
    }

    private mutating func parseSubscript(_ node: JinjaExpr) throws -> JinjaExpr {
        // [expr] or a slice [a:b:c]
        var parts: [JinjaExpr?] = []
        var current: JinjaExpr? = nil
        var isSlice = false
        while !isOp("]") {
            if isOp(":") {
                p += 1
                parts.append(current)
                current = nil
                isSlice = true
            } else {
                current = try parseExpression()
            }
        }
        p += 1
        parts.append(current)
        if !isSlice {
            guard let index = parts[0] else { throw error("expected an index inside '[]'") }
            return .item(node, index)
        }
        while parts.count < 3 { parts.append(nil) }
        guard parts.count == 3 else { throw error("a slice has at most three parts") }
        return .slice(node, parts[0], parts[1], parts[2])
    }

    private mutating func parseCallArgs() throws -> ([JinjaExpr], [(String, JinjaExpr)]) {
        try expectOp("(")
        var args: [JinjaExpr] = [], kwargs: [(String, JinjaExpr)] = []
        while !isOp(")") {
            if !args.isEmpty || !kwargs.isEmpty { try expectOp(",") }
            if isOp(")") { break }
            if isOp("*") || isOp("**") { throw ChatTemplateError.unsupported("'*args' / '**kwargs' in a call", line: line) }
            if case .name(let n)? = current, p + 1 < tokens.count, tokens[p + 1].kind == .op("=") {
                p += 2
                kwargs.append((n, try parseExpression()))
            } else {
                guard kwargs.isEmpty else { throw error("a positional argument after a keyword argument") }
                args.append(try parseExpression())
            }
        }
        p += 1
        return (args, kwargs)
    }

    private mutating func parseFilterExpr(_ node: JinjaExpr) throws -> JinjaExpr {
        var node = node
        while true {
            if isOp("|") {
                p += 1
                let (name, args, kwargs) = try parseFilterCall()
                node = .filter(node, name, args, kwargs)
            } else if isName("is") {
                p += 1
                var negated = false
                if isName("not") { p += 1; negated = true }
                var name = try expectName()
                while isOp(".") { p += 1; name += "." + (try expectName()) }
                var args: [JinjaExpr] = []
                if isOp("(") {
                    let (a, kw) = try parseCallArgs()
                    guard kw.isEmpty else { throw ChatTemplateError.unsupported("keyword arguments to a test", line: line) }
                    args = a
                } else if let tok = current, !(isName("else") || isName("or") || isName("and")) {
                    var startsArgument = false
                    switch tok {
                    case .name, .string, .int, .float, .op("("), .op("["), .op("{"): startsArgument = true
                    default: break
                    }
                    if startsArgument {
                        if isName("is") { throw error("You cannot chain multiple tests with is") }
                        args = [try parsePostfix(try parsePrimary())]
                    }
                }
                node = .test(node, name, args, negated: negated)
            } else if isOp("(") {
                let (args, kwargs) = try parseCallArgs()
                node = .call(node, args, kwargs)
            } else {
                return node
            }
        }
    }
}
