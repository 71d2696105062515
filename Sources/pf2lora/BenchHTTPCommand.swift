import ArgumentParser
import Foundation
import PF2LoRA
import PF2LoRAHTTP

struct BenchHTTP: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "http",
        abstract: "The HTTP transport's cost: concurrent streaming clients with distinct adapters over HTTP vs the in-process method layer; added time to first token at idle; idle CPU.",
        discussion: """
        Builds a temporary store with one shared pair and `--clients` distinct random client pairs, starts \
        one ServingCore with the HTTP transport on a loopback port in this process, then alternates, \
        `--repeats` times: `--clients` concurrent streaming requests (one per client, greedy, ignore_eos, \
        `--tokens` tokens) through the method layer directly, and the same over HTTP (one socket per \
        client, POST /v1/completions with stream: true, server-sent events read to [DONE]). Reports \
        tokens/s of each (median) and their ratio; then, at idle, the time to the first token of a \
        one-token request in process and over HTTP (median of `--ttft-repeats`) and their difference; \
        then this process's CPU time over `--idle-seconds` of idle serving.
        """)

    @Option(help: "Model folder.")
    var model: String = "models/fortune-gpt2"
    @Option(help: "Concurrent clients, each with its own adapter.")
    var clients: Int = 32
    @Option(help: "Tokens per request.")
    var tokens: Int = 64
    @Option(help: "Timed repeats of each side (median).")
    var repeats: Int = 3
    @Option(name: .customLong("ttft-repeats"), help: "Idle one-token requests per side.")
    var ttftRepeats: Int = 30
    @Option(name: .customLong("idle-seconds"), help: "Seconds of idle serving whose CPU time is measured.")
    var idleSeconds: Double = 5
    @Option(help: "Threads (0 = PF2LORA_THREADS, else every core).")
    var threads: Int = 0

    func run() throws {
        BLAS.setThreads(threads)
        let m = try LanguageModel.load(folder: model)
        let tok = try BPETokenizer(folder: model)
        let bench = try BenchStore(model: model, name: "http", seed: 5)
        defer { bench.remove() }
        let store = bench.store
        let ids = (0..<clients).map { String(format: "bench%03d", $0) }
        try bench.publish(sharedRank: 8, clientRank: 2, clients: ids)
        var limits = ServerLimits()
        limits.maxBatch = max(32, clients)
        let core = ServingCore(model: m, tokenizer: tok, store: store, limits: limits)
        try core.runtime.prepare()
        core.start()
        var o = HTTPOptions()
        o.port = 0
        let transport = try HTTPTransport(core: core, options: o)
        let portBox = Box<Int>(0)
        let ready = DispatchSemaphore(value: 0)
        Task.detached { try? await transport.run(onListening: { portBox.set($0); ready.signal() }) }
        ready.wait()
        let port = portBox.get()
        let prompt = "Q: Why is the server down?\nA:"
        print("bench http: \(m.folder), \(clients) clients with distinct adapters, \(tokens) tokens each, HTTP on 127.0.0.1:\(port); load \(loadAverage())")

        // Warm both paths (adapters into the cache, connections, code).
        _ = inProcess(core, ids, prompt, 4)
        _ = overHTTP(port, ids, prompt, 4)
        // Throughput, and this process's CPU time per token (server and clients: repeatable under
        // load, where tokens/s swing with the other processes' share of the cores).
        var a: [Double] = [], h: [Double] = [], ca: [Double] = [], ch: [Double] = []
        let n = Double(clients * tokens)
        for r in 0..<repeats {
            let c0 = cpuSeconds()
            let x = inProcess(core, ids, prompt, tokens)
            let c1 = cpuSeconds()
            let y = overHTTP(port, ids, prompt, tokens)
            let c2 = cpuSeconds()
            a.append(x); h.append(y); ca.append((c1 - c0) / n * 1e6); ch.append((c2 - c1) / n * 1e6)
            print(String(format: "  repeat %d: in-process %.0f tok/s (%.0f us CPU/token), HTTP %.0f tok/s (%.0f us CPU/token): %.2fx",
                         r + 1, x, ca.last!, y, ch.last!, y / x))
        }
        let ma = median(a), mh = median(h)
        print(String(format: "throughput: in-process %.0f tok/s, HTTP %.0f tok/s: HTTP/in-process %.2fx (median of %d; target >= 0.9x)", ma, mh, mh / ma, repeats))
        print(String(format: "CPU per token (this process: server and clients): in-process %.0f us, HTTP %.0f us: %.2fx (median)",
                     median(ca), median(ch), median(ch) / median(ca)))

        var t1: [Double] = [], t2: [Double] = []
        for _ in 0..<ttftRepeats {
            t1.append(ttftInProcess(core, ids[0], prompt))
            t2.append(ttftHTTP(port, ids[0], prompt))
        }
        let d1 = median(t1), d2 = median(t2)
        print(String(format: "idle time to first token: in-process %.2f ms, HTTP %.2f ms: added %.2f ms (median of %d; target < 2 ms)", d1 * 1000, d2 * 1000, (d2 - d1) * 1000, ttftRepeats))

        let c0 = cpuSeconds(), w0 = Date()
        Thread.sleep(forTimeInterval: idleSeconds)
        let cpu = cpuSeconds() - c0, wall = Date().timeIntervalSince(w0)
        print(String(format: "idle: %.3f s CPU in %.1f s (%.2f %%); resident %.0f MiB; load %@", cpu, wall, 100 * cpu / wall,
                     Double(Server.residentBytes()) / 1048576, loadAverage()))
    }

    func median(_ x: [Double]) -> Double { let s = x.sorted(); return s[s.count / 2] }

    func loadAverage() -> String {
        (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8)).map { $0.split(separator: " ").prefix(3).joined(separator: " ") } ?? "?"
    }

    func cpuSeconds() -> Double {
        var u = rusage()
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &u)
        return Double(u.ru_utime.tv_sec) + Double(u.ru_utime.tv_usec) / 1e6 + Double(u.ru_stime.tv_sec) + Double(u.ru_stime.tv_usec) / 1e6
    }

    /// Tokens/s of concurrent streaming requests through the method layer.
    func inProcess(_ core: ServingCore, _ ids: [String], _ prompt: String, _ n: Int) -> Double {
        let group = DispatchGroup()
        let t0 = Date()
        let total = Box<Int>(0)
        for id in ids {
            group.enter()
            let s = BenchSink { n in total.add(n); group.leave() }
            _ = try? core.generate(GenerateRequest(prompt: prompt, adapter: .client(id), maxTokens: n, temperature: 0, stream: true, ignoreEOS: true), sink: s)
        }
        group.wait()
        return Double(total.get()) / Date().timeIntervalSince(t0)
    }

    /// Tokens/s of the same requests over HTTP, one socket per client.
    func overHTTP(_ port: Int, _ ids: [String], _ prompt: String, _ n: Int) -> Double {
        let group = DispatchGroup()
        let total = Box<Int>(0)
        let t0 = Date()
        for id in ids {
            group.enter()
            Thread.detachNewThread {
                let r = sse(port: port, model: id, prompt: prompt, maxTokens: n)
                total.add(r.tokens)
                group.leave()
            }
        }
        group.wait()
        return Double(total.get()) / Date().timeIntervalSince(t0)
    }

    func ttftInProcess(_ core: ServingCore, _ id: String, _ prompt: String) -> Double {
        let first = DispatchSemaphore(value: 0), done = DispatchSemaphore(value: 0)
        let t0 = Date()
        let when = Box<Double>(0)
        let s = BenchSink(onToken: { if when.get() == 0 { when.set(Date().timeIntervalSince(t0)); first.signal() } }) { _ in done.signal() }
        _ = try? core.generate(GenerateRequest(prompt: prompt, adapter: .client(id), maxTokens: 1, temperature: 0, stream: true, ignoreEOS: true), sink: s)
        first.wait(); done.wait()
        return when.get()
    }

    func ttftHTTP(_ port: Int, _ id: String, _ prompt: String) -> Double {
        sse(port: port, model: id, prompt: prompt, maxTokens: 1).firstToken
    }
}

final class Box<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var v: T
    init(_ v: T) { self.v = v }
    func get() -> T { lock.lock(); defer { lock.unlock() }; return v }
    func set(_ x: T) { lock.lock(); v = x; lock.unlock() }
}
extension Box where T == Int { func add(_ x: Int) { lock.lock(); v += x; lock.unlock() } }

final class BenchSink: GenerationSink, @unchecked Sendable {
    let onToken: @Sendable () -> Void
    /// Called once with the tokens generated (0 on an error).
    let onDone: @Sendable (Int) -> Void
    init(onToken: @escaping @Sendable () -> Void = {}, _ onDone: @escaping @Sendable (Int) -> Void) { self.onToken = onToken; self.onDone = onDone }
    func token(_ e: TokenEvent) { onToken() }
    func finished(_ r: GenerateResult) { onDone(r.usage.completionTokens) }
    func failed(_ e: RPCError) { log("bench http: \(e.message)"); onDone(0) }
}

/// One streaming completion over a fresh loopback socket: tokens received and seconds to the first.
func sse(port: Int, model: String, prompt: String, maxTokens: Int) -> (tokens: Int, firstToken: Double) {
    let body = try! JSONSerialization.data(withJSONObject: ["model": model, "prompt": prompt, "max_tokens": maxTokens, "temperature": 0,
                                                            "stream": true, "ignore_eos": true,
                                                            "stream_options": ["include_usage": true]] as [String: Any])
    let head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n"
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var one: Int32 = 1
    setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = in_port_t(UInt16(port).bigEndian)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    guard ok == 0 else { return (0, 0) }
    let t0 = Date()
    let request = Array(head.utf8) + Array(body)
    _ = request.withUnsafeBytes { send(fd, $0.baseAddress!, $0.count, 0) }
    var buf = [UInt8](repeating: 0, count: 1 << 16)
    var pending: [UInt8] = []
    var tokens = 0
    var first = 0.0
    while true {
        let n = recv(fd, &buf, buf.count, 0)
        if n <= 0 { break }
        pending.append(contentsOf: buf[..<n])
        // One event per blank line.
        var start = 0
        defer { pending.removeFirst(start) }
        while let r = endOfEvent(pending, from: start) {
            let event = String(decoding: pending[start..<r], as: UTF8.self)
            start = r + 2
            if first == 0, event.contains("\"finish_reason\":null") { first = Date().timeIntervalSince(t0) }
            // The usage chunk counts the tokens (a token whose text is an incomplete UTF-8 character sends no chunk).
            if let u = event.range(of: "\"completion_tokens\":") {
                tokens = Int(event[u.upperBound...].prefix { $0.isNumber }) ?? 0
            }
            if event.hasSuffix("[DONE]") { return (tokens, first) }
        }
    }
    return (tokens, first)
}

/// Where the server-sent event starting at `from` ends (its "\n\n"), if it has arrived.
func endOfEvent(_ b: [UInt8], from: Int) -> Int? {
    var i = from
    while i + 1 < b.count {
        if b[i] == 0x0A && b[i + 1] == 0x0A { return i }
        i += 1
    }
    return nil
}
