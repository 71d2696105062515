import Foundation

/// Why a chat template could not be rendered. Each case says where and what to change.
public enum ChatTemplateError: Error, CustomStringConvertible, Equatable {
    /// The template's text does not parse.
    case syntax(String, line: Int)
    /// A Jinja construct this interpreter does not implement (named).
    case unsupported(String, line: Int)
    /// The template called `raise_exception(message)` (it rejects these messages).
    case raised(String)
    /// An error while rendering (an undefined value used, a type mismatch, ...).
    case render(String)
    /// The messages or other input are not usable.
    case badInput(String)
    /// No template could be read (a missing or malformed tokenizer_config.json).
    case noTemplate(String)

    public var description: String {
        switch self {
        case let .syntax(m, line): return "chat template syntax error at line \(line): \(m)"
        case let .unsupported(what, line): return "chat template line \(line) uses \(what), which pf2lora's Jinja interpreter does not support"
        // The template's own message to its caller (as transformers shows it), control characters
        // escaped and cut at 200 characters; the only text of a model file an error repeats.
        case let .raised(m):
            let shown = String(String.UnicodeScalarView(m.unicodeScalars.prefix(200).map { $0.value < 0x20 || $0.value == 0x7F ? " " : $0 }))
            return "the chat template rejected the messages: \(shown)\(m.unicodeScalars.count > 200 ? "…" : "")"
        case let .render(m): return "chat template error: \(m)"
        case let .badInput(m): return "chat template input: \(m)"
        case let .noTemplate(m): return m
        }
    }
}

/// Renders parsed templates with jinja2's semantics (the ImmutableSandboxedEnvironment transformers
/// uses): Python values and operators, default `Undefined`, for-loop scopes (a `set` inside a loop
/// body lasts one iteration; `namespace()` carries values out), `loop.*`, macros, filters and tests.
final class JinjaInterpreter {
    private var scopes: [[String: JinjaValue]]
    private var out = ""
    private var currentLine = 1

    private enum Flow { case normal, breakLoop, continueLoop }

    init(context: [String: JinjaValue]) {
        var root = JinjaBuiltins.globals
        for (k, v) in context { root[k] = v }
        scopes = [root]
    }

    func render(_ nodes: [JinjaNode]) throws -> String {
        out = ""
        _ = try exec(nodes)
        return out
    }

    // MARK: Statements

    private func exec(_ nodes: [JinjaNode]) throws -> Flow {
        for node in nodes {
            let flow = try exec(node)
            if flow != .normal { return flow }
        }
        return .normal
    }

    private func located<T>(_ line: Int, _ body: () throws -> T) throws -> T {
        currentLine = line
        do { return try body() } catch let e as ChatTemplateError {
            if case .render(let m) = e, !m.contains("(line ") { throw ChatTemplateError.render("\(m) (line \(line))") }
            if case .unsupported(let what, 0) = e { throw ChatTemplateError.unsupported(what, line: line) }
            throw e
        }
    }

    private func exec(_ node: JinjaNode) throws -> Flow {
        switch node {
        case .text(let t):
            out += t
        case let .output(e, line):
            let v = try located(line) { try eval(e) }
            out += v.pythonStr
        case let .ifChain(branches, otherwise, line):
            for (condition, body) in branches {
                if try located(line, { try eval(condition).truthy }) { return try exec(body) }
            }
            return try exec(otherwise)
        case let .forLoop(target, iterExpr, filter, body, otherwise, line):
            return try located(line) { try execFor(target, iterExpr, filter, body, otherwise) }
        case let .set(target, e, line):
            try located(line) {
                let v = try eval(e)
                try assign(target, v)
            }
        case let .setBlock(name, body, filters, line):
            let saved = out
            out = ""
            let flow = try exec(body)
            var v = JinjaValue.string(out)
            out = saved
            try located(line) {
                for (f, args, kwargs) in filters {
                    v = try JinjaBuiltins.filter(f, v, try args.map { try eval($0) }, try kwargs.map { ($0.0, try eval($0.1)) }, self)
                }
                scopes[scopes.count - 1][name] = v
            }
            if flow != .normal { return flow }
        case let .macro(name, params, body, _):
            scopes[scopes.count - 1][name] = .callable(makeMacro(name, params, body))
        case let .filterBlock(filters, body, line):
            let saved = out
            out = ""
            let flow = try exec(body)
            var v = JinjaValue.string(out)
            out = saved
            try located(line) {
                for (f, args, kwargs) in filters {
                    v = try JinjaBuiltins.filter(f, v, try args.map { try eval($0) }, try kwargs.map { ($0.0, try eval($0.1)) }, self)
                }
            }
            out += v.pythonStr
            if flow != .normal { return flow }
        case let .with(assignments, body, line):
            var frame: [String: JinjaValue] = [:]
            try located(line) {
                for (target, e) in assignments {
                    guard case .name(let n) = target else { throw ChatTemplateError.unsupported("unpacking in '{% with %}'", line: line) }
                    frame[n] = try eval(e)
                }
            }
            scopes.append(frame)
            defer { scopes.removeLast() }
            return try exec(body)
        case .breakLoop:
            return .breakLoop
        case .continueLoop:
            return .continueLoop
        case .generation(let body):
            return try exec(body)
        }
        return .normal
    }

    private func execFor(_ target: JinjaTarget, _ iterExpr: JinjaExpr, _ filter: JinjaExpr?, _ body: [JinjaNode], _ otherwise: [JinjaNode]) throws -> Flow {
        var items = try JinjaBuiltins.iterate(try eval(iterExpr))
        if let filter {
            var kept: [JinjaValue] = []
            for item in items {
                scopes.append([:])
                defer { scopes.removeLast() }
                try assign(target, item)
                if try eval(filter).truthy { kept.append(item) }
            }
            items = kept
        }
        if items.isEmpty { return try exec(otherwise) }
        let n = items.count
        var cycleIndex = 0
        for (k, item) in items.enumerated() {
            var loop = JinjaObject()
            loop["index"] = .int(k + 1)
            loop["index0"] = .int(k)
            loop["revindex"] = .int(n - k)
            loop["revindex0"] = .int(n - k - 1)
            loop["first"] = .bool(k == 0)
            loop["last"] = .bool(k == n - 1)
            loop["length"] = .int(n)
            loop["depth"] = .int(1)
            loop["depth0"] = .int(0)
            loop["previtem"] = k > 0 ? items[k - 1] : .undefined("there is no previous item")
            loop["nextitem"] = k + 1 < n ? items[k + 1] : .undefined("there is no next item")
            cycleIndex = k
            let index = cycleIndex
            loop["cycle"] = .callable(JinjaCallable(name: "loop.cycle") { args, _ in
                guard !args.isEmpty else { throw ChatTemplateError.render("no items for cycling given") }
                return args[index % args.count]
            })
            scopes.append(["loop": .object(loop)])
            defer { scopes.removeLast() }
            try assign(target, item)
            let flow = try exec(body)
            if flow == .breakLoop { break }
        }
        return .normal
    }

    private func assign(_ target: JinjaTarget, _ value: JinjaValue) throws {
        switch target {
        case .name(let n):
            scopes[scopes.count - 1][n] = value
        case .tuple(let targets):
            let items = try JinjaBuiltins.iterate(value)
            guard items.count == targets.count else {
                throw ChatTemplateError.render(items.count > targets.count ? "too many values to unpack (expected \(targets.count))"
                                                                           : "not enough values to unpack (expected \(targets.count), got \(items.count))")
            }
            for (t, v) in zip(targets, items) { try assign(t, v) }
        case let .attribute(object, attribute):
            guard case .namespace(let ns) = lookup(object) else {
                throw ChatTemplateError.render("cannot assign attribute on non-namespace object '\(object)'")
            }
            ns.attributes[attribute] = value
        }
    }

    private func lookup(_ name: String) -> JinjaValue {
        for frame in scopes.reversed() { if let v = frame[name] { return v } }
        return .undefined("'\(name)' is undefined")
    }

    private func makeMacro(_ name: String, _ params: [(String, JinjaExpr?)], _ body: [JinjaNode]) -> JinjaCallable {
        JinjaCallable(name: name) { [unowned self] args, kwargs in
            guard args.count <= params.count else { throw ChatTemplateError.render("macro '\(name)' takes not more than \(params.count) argument(s)") }
            var frame: [String: JinjaValue] = [:]
            var kw = Dictionary(kwargs, uniquingKeysWith: { a, _ in a })
            for (k, (param, defaultExpr)) in params.enumerated() {
                if k < args.count {
                    frame[param] = args[k]
                } else if let v = kw.removeValue(forKey: param) {
                    frame[param] = v
                } else if let defaultExpr {
                    frame[param] = try self.eval(defaultExpr)
                } else {
                    frame[param] = .undefined("parameter '\(param)' was not provided")
                }
            }
            if let extra = kw.keys.sorted().first { throw ChatTemplateError.render("macro '\(name)' takes no keyword argument '\(extra)'") }
            let savedScopes = self.scopes, savedOut = self.out
            self.scopes = [self.scopes[0], frame]
            self.out = ""
            defer { self.scopes = savedScopes; self.out = savedOut }
            _ = try self.exec(body)
            return .string(self.out)
        }
    }

    // MARK: Expressions

    func eval(_ e: JinjaExpr) throws -> JinjaValue {
        switch e {
        case .literal(let v):
            return v
        case .name(let n):
            return lookup(n)
        case .list(let xs):
            return .array(try xs.map { try eval($0) })
        case .tuple(let xs):
            return .tuple(try xs.map { try eval($0) })
        case .dict(let pairs):
            var o = JinjaObject()
            for (k, v) in pairs {
                guard case .string(let key) = try eval(k) else { throw ChatTemplateError.unsupported("a dict key that is not a string", line: currentLine) }
                o[key] = try eval(v)
            }
            return .object(o)
        case let .attribute(objectExpr, name):
            return try JinjaBuiltins.attribute(try eval(objectExpr), name)
        case let .item(objectExpr, indexExpr):
            return try JinjaBuiltins.item(try eval(objectExpr), try eval(indexExpr))
        case let .slice(objectExpr, a, b, c):
            let object = try eval(objectExpr)
            return try JinjaBuiltins.slice(object, try a.map { try eval($0) }, try b.map { try eval($0) }, try c.map { try eval($0) })
        case let .call(calleeExpr, argExprs, kwargExprs):
            let callee = try eval(calleeExpr)
            let args = try argExprs.map { try eval($0) }
            let kwargs = try kwargExprs.map { ($0.0, try eval($0.1)) }
            switch callee {
            case .callable(let c): return try c.call(args, kwargs)
            case .undefined(let why): throw ChatTemplateError.render(why)
            default: throw ChatTemplateError.render("'\(callee.typeName)' object is not callable")
            }
        case let .filter(valueExpr, name, argExprs, kwargExprs):
            let value = try eval(valueExpr)
            return try JinjaBuiltins.filter(name, value, try argExprs.map { try eval($0) }, try kwargExprs.map { ($0.0, try eval($0.1)) }, self)
        case let .test(valueExpr, name, argExprs, negated):
            let r = try JinjaBuiltins.test(name, try eval(valueExpr), try argExprs.map { try eval($0) }, self)
            return .bool(r != negated)
        case let .unary(op, x):
            let v = try eval(x)
            switch op {
            case "not": return .bool(!v.truthy)
            case "-":
                switch v {
                case .int(let i): return .int(-i)
                case .bool(let b): return .int(b ? -1 : 0)
                case .double(let d): return .double(-d)
                case .undefined(let why): throw ChatTemplateError.render(why)
                default: throw ChatTemplateError.render("bad operand type for unary -: '\(v.typeName)'")
                }
            default:
                guard v.numeric != nil else { throw ChatTemplateError.render("bad operand type for unary +: '\(v.typeName)'") }
                if case .bool(let b) = v { return .int(b ? 1 : 0) }
                return v
            }
        case let .binary(op, l, r):
            if op == "and" {
                let a = try eval(l)
                return a.truthy ? try eval(r) : a
            }
            if op == "or" {
                let a = try eval(l)
                return a.truthy ? a : try eval(r)
            }
            return try JinjaBuiltins.binary(op, try eval(l), try eval(r))
        case let .compare(first, rest):
            var left = try eval(first)
            for (op, rightExpr) in rest {
                let right = try eval(rightExpr)
                if !(try JinjaBuiltins.compare(op, left, right)) { return .bool(false) }
                left = right
            }
            return .bool(true)
        case let .conditional(condition, then, otherwise):
            if try eval(condition).truthy { return try eval(then) }
            if let otherwise { return try eval(otherwise) }
            return .undefined("the inline if expression evaluated to false and no else section was defined")
        }
    }

    /// Calls a filter or test by name from inside another one (`map('upper')`, `select('odd')`).
    func callFilter(_ name: String, _ value: JinjaValue, _ args: [JinjaValue]) throws -> JinjaValue {
        try JinjaBuiltins.filter(name, value, args, [], self)
    }
}
