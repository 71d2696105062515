import Foundation

/// JSON-RPC 2.0 error codes: the standard ones and the project's own (-32001 ...).
public enum RPCCode: Int, Sendable {
    case parseError = -32700
    case invalidRequest = -32600
    case methodNotFound = -32601
    case invalidParams = -32602
    case internalError = -32603
    case unknownClient = -32001
    case adapterInvalid = -32002
    case baseMismatch = -32003
    case overloaded = -32004
    case trainingFailed = -32005
    case cancelled = -32006
    case conflict = -32007
}

/// An error answered to one request; `message` says what to fix, `data` (JSON) adds detail (a
/// cancelled training run's steps and losses).
public struct RPCError: Error, CustomStringConvertible, @unchecked Sendable {   // data holds JSON values only
    public let code: RPCCode
    public let message: String
    public let data: [String: Any]?
    public init(_ code: RPCCode, _ message: String, data: [String: Any]? = nil) { self.code = code; self.message = message; self.data = data }
    public var description: String { "\(code.rawValue): \(message)" }
}

/// A line that could not be taken as a request: the error and the id, if one could be read.
/// `id` is a JSON value as JSONSerialization made it (NSNumber, NSString or NSNull): immutable.
struct RPCLineError: Error, @unchecked Sendable {
    let id: Any
    let error: RPCError
    /// The line is a notification (valid `jsonrpc` and `method`, no id) whose params are wrong: never answered.
    let notification: Bool
    init(_ id: Any?, _ error: RPCError, notification: Bool = false) { self.id = id ?? NSNull(); self.error = error; self.notification = notification }
}

/// A parsed request. `id` is what the caller sent (number or string), echoed back unchanged;
/// a request without an id is a notification and gets no answer.
struct RPCRequest {
    let id: Any?
    let hasID: Bool
    let method: String
    let params: Params
}

/// Typed access to a request's params with errors that name the field and the expected type.
/// `dict` holds JSON values as JSONSerialization made them (NSNumber, NSString, NSArray,
/// NSDictionary, NSNull), which nothing mutates, so params move between threads as they are.
public struct Params: @unchecked Sendable {
    public let dict: [String: Any]
    public init(_ dict: [String: Any]) { self.dict = dict }

    public static func isBool(_ v: Any) -> Bool {
        guard let n = v as? NSNumber else { return false }
        return String(cString: n.objCType) == "c" || type(of: v) == Bool.self
    }

    public func has(_ key: String) -> Bool { dict[key] != nil && !(dict[key] is NSNull) }

    public func string(_ key: String) throws -> String? {
        guard has(key) else { return nil }
        guard let s = dict[key] as? String else { throw RPCError(.invalidParams, "params.\(key) must be a string") }
        return s
    }

    /// A JSON number as an exact integer, or nil if it is not one. JSONSerialization keeps integers
    /// written without a fraction or exponent exact up to 64 bits (`18446744073709551615` arrives as
    /// UInt64.max); `1e18` or `3.0` arrive as doubles and count when they are whole.
    enum Whole { case exact(negative: Bool, magnitude: UInt64), beyond64Bits, notWhole }
    static func whole(_ n: NSNumber) -> Whole {
        switch String(cString: n.objCType) {
        case "Q", "L", "I", "S", "C": return .exact(negative: false, magnitude: n.uint64Value)
        case "q", "l", "i", "s":
            let v = n.int64Value
            return .exact(negative: v < 0, magnitude: v.magnitude)
        default:
            let d = n.doubleValue
            guard d.isFinite, d == d.rounded() else { return .notWhole }
            guard d.magnitude < 18_446_744_073_709_551_616.0 else { return .beyond64Bits }
            return .exact(negative: d < 0, magnitude: UInt64(d.magnitude))
        }
    }

    public func int(_ key: String, min lo: Int? = nil, max hi: Int? = nil) throws -> Int? {
        guard has(key) else { return nil }
        let v = dict[key]!
        guard !Self.isBool(v), let n = v as? NSNumber else { throw RPCError(.invalidParams, "params.\(key) must be an integer") }
        let range = "\(lo.map { "\($0)" } ?? "\(Int.min)")...\(hi.map { "\($0)" } ?? "\(Int.max)")"
        let i: Int
        switch Self.whole(n) {
        case .notWhole: throw RPCError(.invalidParams, "params.\(key) must be an integer (got \(n))")
        case .beyond64Bits: throw RPCError(.invalidParams, "params.\(key) must be an integer in \(range) (got \(n))")
        case let .exact(negative, magnitude):
            if negative {
                guard magnitude <= UInt64(Int.max) + 1 else { throw RPCError(.invalidParams, "params.\(key) must be an integer in \(range) (got \(n))") }
                i = magnitude == UInt64(Int.max) + 1 ? Int.min : -Int(magnitude)
            } else {
                guard magnitude <= UInt64(Int.max) else { throw RPCError(.invalidParams, "params.\(key) must be an integer in \(range) (got \(n))") }
                i = Int(magnitude)
            }
        }
        if let lo, i < lo { throw RPCError(.invalidParams, "params.\(key) must be >= \(lo) (got \(n))") }
        if let hi, i > hi { throw RPCError(.invalidParams, "params.\(key) must be <= \(hi) (got \(n))") }
        return i
    }

    /// A non-negative integer up to UInt64.max (a seed).
    public func uint64(_ key: String) throws -> UInt64? {
        guard has(key) else { return nil }
        let v = dict[key]!
        let expected = "params.\(key) must be an integer in 0...\(UInt64.max)"
        guard !Self.isBool(v), let n = v as? NSNumber else { throw RPCError(.invalidParams, expected) }
        switch Self.whole(n) {
        case let .exact(negative, magnitude) where !negative || magnitude == 0: return magnitude
        default: throw RPCError(.invalidParams, "\(expected) (got \(n))")
        }
    }

    /// A number as a Float. A magnitude beyond Float's range becomes the largest Float of its sign
    /// (a temperature of 3.5e38 is as flat as one of 3.4e38), so the range check that follows
    /// speaks about the value the caller sent, never about an infinity it did not send.
    public func float(_ key: String) throws -> Float? {
        guard has(key) else { return nil }
        let v = dict[key]!
        guard !Self.isBool(v), let n = v as? NSNumber, n.doubleValue.isFinite else {
            throw RPCError(.invalidParams, "params.\(key) must be a number")
        }
        let limit = Double(Float.greatestFiniteMagnitude)
        return Float(Swift.min(Swift.max(n.doubleValue, -limit), limit))
    }

    public func bool(_ key: String) throws -> Bool? {
        guard has(key) else { return nil }
        guard Self.isBool(dict[key]!), let b = dict[key] as? Bool else { throw RPCError(.invalidParams, "params.\(key) must be true or false") }
        return b
    }

    public func strings(_ key: String, maxCount: Int = 1_000_000) throws -> [String]? {
        guard has(key) else { return nil }
        if let s = dict[key] as? String { return [s] }
        guard let a = dict[key] as? [Any], a.allSatisfy({ $0 is String }) else {
            throw RPCError(.invalidParams, "params.\(key) must be a string or a list of strings")
        }
        guard a.count <= maxCount else { throw RPCError(.invalidParams, "params.\(key) has \(a.count) entries; at most \(maxCount)") }
        return a as? [String]
    }
}

enum RPCParser {
    /// JSON nesting deeper than this is refused before parsing (a flood of brackets must not exhaust the stack).
    static let maxDepth = JSONNesting.maxDepth

    /// Parses one line. On failure returns the error and the id if one could be read.
    static func parse(_ line: [UInt8]) -> Result<RPCRequest, RPCLineError> {
        if let depthError = checkDepth(line) { return .failure(RPCLineError(nil, depthError)) }
        let obj: Any
        do { obj = try JSONSerialization.jsonObject(with: Data(line), options: [.fragmentsAllowed]) } catch {
            return .failure(RPCLineError(NSNull(), RPCError(.parseError, "the line is not valid JSON; send one JSON-RPC 2.0 object per line")))
        }
        if obj is [Any] {
            return .failure(RPCLineError(NSNull(), RPCError(.invalidRequest, "batch requests (JSON arrays) are not supported; send one object per line")))
        }
        guard let dict = obj as? [String: Any] else {
            return .failure(RPCLineError(NSNull(), RPCError(.invalidRequest, "a request must be a JSON object with jsonrpc, id, method and params")))
        }
        var id: Any? = nil
        let hasID = dict["id"] != nil
        if let raw = dict["id"] {
            if raw is NSNull || raw is String || (raw is NSNumber && !Params.isBool(raw)) { id = raw } else {
                return .failure(RPCLineError(NSNull(), RPCError(.invalidRequest, "id must be a string, a number or null")))
            }
        }
        guard dict["jsonrpc"] as? String == "2.0" else {
            return .failure(RPCLineError(id ?? NSNull(), RPCError(.invalidRequest, "\"jsonrpc\" must be \"2.0\"")))
        }
        guard let method = dict["method"] as? String else {
            return .failure(RPCLineError(id ?? NSNull(), RPCError(.invalidRequest, "\"method\" must be a string")))
        }
        var params: [String: Any] = [:]
        if let p = dict["params"], !(p is NSNull) {
            guard let pd = p as? [String: Any] else {
                return .failure(RPCLineError(id ?? NSNull(), RPCError(.invalidParams, "params must be an object (by-name parameters)"), notification: !hasID))
            }
            params = pd
        }
        return .success(RPCRequest(id: id, hasID: hasID, method: method, params: Params(params)))
    }

    /// Refuses nesting deeper than `maxDepth` (brackets outside strings).
    static func checkDepth(_ line: [UInt8]) -> RPCError? {
        guard JSONNesting.exceeds(line, maxDepth) else { return nil }
        return RPCError(.invalidRequest, "JSON nested deeper than \(maxDepth) levels; requests are flat objects")
    }
}

/// The nesting-depth scan both transports run on a request before parsing it (JSONSerialization
/// recurses: a flood of brackets must not exhaust the stack); each maps a refusal to its own error.
public enum JSONNesting {
    /// The deepest nesting a request may have (both transports).
    public static let maxDepth = 64
    /// Whether `bytes` nest arrays and objects (brackets outside strings) deeper than `limit`.
    public static func exceeds(_ bytes: [UInt8], _ limit: Int) -> Bool {
        var depth = 0, inString = false, escaped = false
        for c in bytes {
            if inString {
                if escaped { escaped = false } else if c == 0x5C { escaped = true } else if c == 0x22 { inString = false }
                continue
            }
            switch c {
            case 0x22: inString = true
            case 0x5B, 0x7B:
                depth += 1
                if depth > limit { return true }
            case 0x5D, 0x7D: depth -= 1
            default: break
            }
        }
        return false
    }
}

/// Serialized writes of whole lines to stdout (responses and notifications from several threads).
///
/// A write that fails (the reader closed the pipe: EPIPE, SIGPIPE being ignored) marks the output
/// broken: later lines are dropped and `onBroken` is called once, so the server can drain.
final class LineWriter: @unchecked Sendable {
    private let lock = NSLock()
    private let fd: Int32
    private var isBroken = false                      // guarded by `lock`, as is `brokenHandler`
    private var brokenHandler: (@Sendable () -> Void)?
    /// Called once, on the writing thread, when the output breaks.
    var onBroken: (@Sendable () -> Void)? {
        get { lock.lock(); defer { lock.unlock() }; return brokenHandler }
        set { lock.lock(); brokenHandler = newValue; lock.unlock() }
    }

    init(fd: Int32 = 1) { self.fd = fd }

    var broken: Bool { lock.lock(); defer { lock.unlock() }; return isBroken }

    func send(_ obj: [String: Any]) {
        let opts: JSONSerialization.WritingOptions = [.sortedKeys, .withoutEscapingSlashes]
        guard let data = (try? JSONSerialization.data(withJSONObject: obj, options: opts))
            // An answer that cannot be written as JSON is still answered: an internal error, never silence.
            ?? (try? JSONSerialization.data(withJSONObject: ["jsonrpc": "2.0", "id": (obj["id"].flatMap { JSONSerialization.isValidJSONObject([$0]) ? $0 : nil }) ?? NSNull(),
                                                             "error": ["code": RPCCode.internalError.rawValue, "message": "the answer could not be encoded as JSON"]] as [String: Any], options: opts))
        else { return }
        var bytes = [UInt8](data)
        bytes.append(0x0A)
        lock.lock()
        if isBroken { lock.unlock(); return }
        var off = 0
        var failed = false
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + off, $0.count - off) }
            if n < 0 { if errno == EINTR { continue }; failed = true; isBroken = true; break }
            off += n
        }
        let notify = failed ? brokenHandler : nil
        lock.unlock()
        notify?()
    }

    func result(_ id: Any?, _ result: Any) {
        send(["jsonrpc": "2.0", "id": id ?? NSNull(), "result": result])
    }

    func error(_ id: Any?, _ e: RPCError) {
        var err: [String: Any] = ["code": e.code.rawValue, "message": e.message]
        if let d = e.data { err["data"] = d }
        send(["jsonrpc": "2.0", "id": id ?? NSNull(), "error": err])
    }

    func notify(_ method: String, _ params: [String: Any]) {
        send(["jsonrpc": "2.0", "method": method, "params": params])
    }
}
