import Foundation
@testable import PF2LoRA

/// Runs the real `pf2lora` executable (built next to the test bundle) and talks to it through pipes.
final class ServerProcess {
    /// `PF2LORA_TEST_BINARY` runs the end-to-end tests against another build (for example main's,
    /// to see a new test fail before its fix).
    static var binary: String {
        if let b = ProcessInfo.processInfo.environment["PF2LORA_TEST_BINARY"] { return b }
        return executable("pf2lora")
    }
    /// The test-only publish loop (Tests/TestPublishLoop), built by `swift test` beside `pf2lora`.
    static var publishLoopBinary: String { executable("TestPublishLoop") }

    /// An executable of this package, from the build folder the test bundle runs in.
    static func executable(_ name: String) -> String {
        let me = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        var dir = me.deletingLastPathComponent()
        if dir.pathExtension == "xctest" { dir = dir.deletingLastPathComponent() }
        for _ in 0..<4 {
            let p = dir.appendingPathComponent(name).path
            if FileManager.default.isExecutableFile(atPath: p) { return p }
            dir = dir.deletingLastPathComponent()
        }
        return TestPaths.repoRoot.appendingPathComponent(".build/debug/" + name).path
    }

    let process: SpawnedProcess
    private let stdin = Pipe(), stdout = Pipe(), stderr = Pipe()
    private let cond = NSCondition()
    private var lines: [[String: Any]] = []
    private var rawLines: [String] = []
    private var errText = ""
    private var eof = false

    init(_ args: [String]) throws {
        process = try SpawnedProcess(Self.binary, args, stdin: stdin, stdout: stdout, stderr: stderr)
        let outHandle = stdout.fileHandleForReading
        Thread.detachNewThread { [self] in
            var buf = Data()
            while true {
                let d = outHandle.availableData
                if d.isEmpty { break }
                buf.append(d)
                while let nl = buf.firstIndex(of: 0x0A) {
                    let line = buf[buf.startIndex..<nl]
                    buf = Data(buf[(nl + 1)...])
                    let obj = (try? JSONSerialization.jsonObject(with: line)) as? [String: Any] ?? ["unparsable": String(decoding: line, as: UTF8.self)]
                    cond.lock(); lines.append(obj); rawLines.append(String(decoding: line, as: UTF8.self)); cond.broadcast(); cond.unlock()
                }
            }
            cond.lock(); eof = true; cond.broadcast(); cond.unlock()
        }
        let errHandle = stderr.fileHandleForReading
        Thread.detachNewThread { [self] in
            while true {
                let d = errHandle.availableData
                if d.isEmpty { break }
                cond.lock(); errText += String(decoding: d, as: UTF8.self); cond.unlock()
            }
        }
    }

    func send(_ obj: [String: Any]) {
        var d = try! JSONSerialization.data(withJSONObject: obj)
        d.append(0x0A)
        stdin.fileHandleForWriting.write(d)
    }

    func sendRaw(_ bytes: Data) { stdin.fileHandleForWriting.write(bytes) }

    @discardableResult
    func request(_ id: Int, _ method: String, _ params: [String: Any] = [:]) -> Int {
        send(["jsonrpc": "2.0", "id": id, "method": method, "params": params])
        return id
    }

    /// Waits for the final response (result or error) with `id`.
    func response(_ id: Int, timeout: Double = 60) -> [String: Any]? {
        let deadline = Date().addingTimeInterval(timeout)
        cond.lock(); defer { cond.unlock() }
        while true {
            if let r = lines.first(where: { ($0["id"] as? Int) == id && ($0["result"] != nil || $0["error"] != nil) }) { return r }
            if eof || !cond.wait(until: deadline) { return lines.first(where: { ($0["id"] as? Int) == id }) }
        }
    }

    /// Waits for the final response with `id` for as long as the server is working on something:
    /// it gives up only when neither an output line (stdout or stderr) nor CPU time of the server
    /// process came for `idle` seconds (a hung or dead server), or after `cap` seconds in all. For
    /// requests whose length scales with the machine's load or a sanitizer's slowdown, where a fixed
    /// deadline fails a correct server. Where the process's CPU time cannot be read (no /proc), only
    /// output lines count.
    func response(_ id: Int, idle: Double, cap: Double = 1800) -> [String: Any]? {
        let start = Date()
        var lastMark = progressMark(), lastProgress = Date()
        cond.lock(); defer { cond.unlock() }
        while true {
            if let r = lines.first(where: { ($0["id"] as? Int) == id && ($0["result"] != nil || $0["error"] != nil) }) { return r }
            if eof { return lines.first(where: { ($0["id"] as? Int) == id }) }
            _ = cond.wait(until: Date().addingTimeInterval(0.5))
            cond.unlock(); let mark = progressMark(); cond.lock()
            if mark != lastMark { lastMark = mark; lastProgress = Date() }
            if Date().timeIntervalSince(lastProgress) > idle || Date().timeIntervalSince(start) > cap {
                return lines.first(where: { ($0["id"] as? Int) == id })
            }
        }
    }

    /// What changes while the server works: its output so far and its CPU time in clock ticks
    /// (utime + stime of /proc/<pid>/stat; 0 where that cannot be read).
    private func progressMark() -> [Int] {
        var ticks = 0
        if let stat = try? String(contentsOfFile: "/proc/\(process.processIdentifier)/stat", encoding: .utf8),
           let close = stat.lastIndex(of: ")") {
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            // Fields after the command: state is [0], utime [11], stime [12] (proc(5) numbers 14 and 15).
            if fields.count > 12 { ticks = (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0) }
        }
        return [allLines.count, stderrText.utf8.count, ticks]
    }

    /// Waits until `n` lines satisfy `pred`.
    func waitFor(count n: Int = 1, timeout: Double = 60, _ pred: ([String: Any]) -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        cond.lock(); defer { cond.unlock() }
        while lines.filter(pred).count < n {
            if eof || !cond.wait(until: deadline) { return false }
        }
        return true
    }

    var allLines: [[String: Any]] { cond.lock(); defer { cond.unlock() }; return lines }
    var stderrText: String { cond.lock(); defer { cond.unlock() }; return errText }

    /// Closes stdin (the server sees EOF).
    func closeInput() { try? stdin.fileHandleForWriting.close() }

    /// Waits for the process to end by itself; false on timeout. `timeout` counts from the server's
    /// last output line (stdout or stderr), up to 10 x `timeout` in all: a drain that is still
    /// answering (progress notifications, tokens) on a loaded CI machine is not a hung server.
    func waitExit(timeout: Double = 60) -> Bool {
        waitWhileProgressing(idle: timeout, cap: timeout * 10)
        return !process.isRunning
    }

    private func waitWhileProgressing(idle: Double, cap: Double) {
        let start = Date()
        var lastCount = -1, lastProgress = Date()
        while process.isRunning {
            let n = allLines.count + stderrText.utf8.count
            if n != lastCount { lastCount = n; lastProgress = Date() }
            if Date().timeIntervalSince(lastProgress) > idle || Date().timeIntervalSince(start) > cap { break }
            usleep(10_000)
        }
    }

    /// Lines that are notifications of `method` for request `id`.
    func notifications(_ method: String, id: Int) -> [[String: Any]] {
        allLines.filter { $0["method"] as? String == method && (($0["params"] as? [String: Any])?["id"] as? Int) == id }
            .map { $0["params"] as? [String: Any] ?? [:] }
    }

    /// Closes stdin and waits for exit; returns the exit code (-1: terminated by the test). As for
    /// `waitExit`, `timeout` counts from the last output line, up to 10 x `timeout` in all.
    func finish(timeout: Double = 60) -> Int32 { finish(idle: timeout, cap: timeout * 10) }

    /// Closes stdin and waits for exit while the server keeps making progress: it is terminated only
    /// when no output line arrived for `idle` seconds (a hung server), or after `cap` seconds in all.
    /// For drains whose length scales with the machine's load (hundreds of generates in flight on a
    /// loaded 2-core CI machine), where a fixed deadline fails a correct server.
    func finish(idle: Double, cap: Double) -> Int32 {
        try? stdin.fileHandleForWriting.close()
        waitWhileProgressing(idle: idle, cap: cap)
        if process.isRunning { process.terminate(); return -1 }
        return process.terminationStatus
    }

    static func errorCode(_ r: [String: Any]?) -> Int? { (r?["error"] as? [String: Any])?["code"] as? Int }
    /// The error message of an answer ("" when it has none).
    static func errorMessage(_ r: [String: Any]?) -> String { ((r?["error"] as? [String: Any])?["message"] as? String) ?? "" }
    static func result(_ r: [String: Any]?) -> [String: Any]? { r?["result"] as? [String: Any] }
}

/// A small model with the fixture tokenizer and a longer context, plus a store with a shared pair and
/// a few clients whose pairs are random but large enough to change the text.
struct ServerFixture {
    let model: String
    let store: String
    let root: String
    let gpt2: LanguageModel
    let storeHandle: AdapterStore

    /// `nEmbd` widens the GPT-2 base (a larger fold, for tests that need a reload to take a while).
    /// `family` "llama" makes the base a tiny Llama-architecture model (RMSNorm, RoPE, SwiGLU, GQA 4/2)
    /// instead of GPT-2, with the same tokenizer and store layout.
    init(clients: [String] = ["alice", "bob", "carol"], seed: UInt64 = 11, nPositions: Int = 256, family: String = "gpt2", nEmbd: Int = 64) throws {
        root = TestPaths.tempDir("serve")
        model = root + "/model"
        store = root + "/store"
        var cfg = GPT2Config(vocabSize: 400, nPositions: nPositions, nEmbd: nEmbd, nLayer: 2, nHead: 4, eosTokenId: nil)
        cfg.bosTokenId = nil
        var arch = cfg.architecture
        if family == "llama" {
            var l = LlamaConfig.preset("tiny-llama", vocabSize: 400)!
            l.maxPositionEmbeddings = nPositions
            arch = try l.architecture(file: "tiny-llama")
        }
        let weights = ModelWeights.random(architecture: arch, seed: seed)
        if family == "llama" {
            // Llama's init (N(0, 0.02), no residual scaling) leaves a 2-layer model's logits nearly
            // uniform; wider embeddings make the greedy text depend on the adapters, as with GPT-2.
            for i in 0..<weights.embed.count { weights.embed.data[i] *= 20 }
        }
        try LanguageModel(folder: model, weights: weights, checkpoint: nil).save(to: model)
        for f in ["tokenizer.json", "vocab.json", "merges.txt"] {
            try FileManager.default.copyItem(atPath: TestPaths.fixture("tiny-gpt2/" + f), toPath: model + "/" + f)
        }
        gpt2 = try LanguageModel.load(folder: model)
        let base = try BaseModelInfo.load(folder: model)
        storeHandle = try AdapterStore.open(root: store, base: base)
        try storeHandle.publishShared(Self.randomAdapter(base: base, level: .shared, rank: 8, seed: seed + 1))
        for (i, c) in clients.enumerated() {
            try storeHandle.publishClient(id: c, Self.randomAdapter(base: base, level: .client, rank: 2, seed: seed + 100 + UInt64(i), clientID: c))
        }
    }

    static func randomAdapter(base: BaseModelInfo, level: AdapterLevel, rank: Int, seed: UInt64, clientID: String? = nil, std: Float = 0.3) -> LoRAAdapter {
        var rng = RNG(seed: seed)
        var modules: [String: LoRAPair] = [:]
        for path in base.linears.keys.sorted() {
            let (din, dout) = base.linears[path]!
            let a = Tensor(zeros: [rank, din]), b = Tensor(zeros: [dout, rank])
            for i in 0..<a.count { a.data[i] = std * rng.normal() }
            for i in 0..<b.count { b.data[i] = std * rng.normal() }
            modules[path] = LoRAPair(a: a, b: b)
        }
        let meta = AdapterMetadata(baseName: base.name, baseFingerprint: base.fingerprint, clientID: clientID)
        return LoRAAdapter(level: level, rank: rank, alpha: Float(rank), modules: modules, metadata: meta)
    }

    func serve(_ extra: [String] = []) throws -> ServerProcess {
        try ServerProcess(["serve", "--model", model, "--store", store, "--threads", "1"] + extra)
    }

    func cleanup() { try? FileManager.default.removeItem(atPath: root) }
}

/// A child process started as a shell would start it: SIGPIPE, SIGTERM and SIGINT at their default
/// action and no signal blocked. Foundation's `Process` passes on the spawning thread's signal mask
/// (a test runs on a pool thread that blocks signals) and the test process's ignored signals, so a
/// server started with it could not show how it behaves under SIGTERM or a closed pipe.
final class SpawnedProcess: @unchecked Sendable {
    let processIdentifier: Int32
    private let lock = NSCondition()
    private var status: Int32?

    init(_ path: String, _ args: [String], stdin: Pipe, stdout: Pipe, stderr: Pipe) throws {
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for sig in [SIGPIPE, SIGTERM, SIGINT, SIGHUP] { sigaddset(&defaults, sig) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        var mask = sigset_t()
        sigemptyset(&mask)
        posix_spawnattr_setsigmask(&attr, &mask)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        let childEnds = [stdin.fileHandleForReading, stdout.fileHandleForWriting, stderr.fileHandleForWriting]
        for (fd, h) in childEnds.enumerated() { posix_spawn_file_actions_adddup2(&actions, h.fileDescriptor, Int32(fd)) }
        // Close-on-exec everywhere (dup2 clears it on 0, 1, 2): no other child started meanwhile keeps
        // an end of these pipes open, which would hide EOF and EPIPE.
        for h in childEnds + [stdin.fileHandleForWriting, stdout.fileHandleForReading, stderr.fileHandleForReading] {
            _ = fcntl(h.fileDescriptor, F_SETFD, FD_CLOEXEC)
        }
        let argv: [UnsafeMutablePointer<CChar>?] = ([path] + args).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, &attr, argv, environ)
        guard rc == 0 else { throw NSError(domain: NSPOSIXErrorDomain, code: Int(rc), userInfo: [NSLocalizedDescriptionKey: "posix_spawn \(path): \(rc)"]) }
        processIdentifier = pid
        for h in childEnds { try? h.close() }
        Thread.detachNewThread { [self, pid] in
            var st: Int32 = 0
            while waitpid(pid, &st, 0) < 0 && errno == EINTR {}
            lock.lock(); status = st; lock.broadcast(); lock.unlock()
        }
    }

    var isRunning: Bool { lock.lock(); defer { lock.unlock() }; return status == nil }
    func waitUntilExit() { lock.lock(); while status == nil { lock.wait() }; lock.unlock() }
    func terminate() { kill(processIdentifier, SIGTERM) }

    private var raw: Int32 { waitUntilExit(); lock.lock(); defer { lock.unlock() }; return status! }
    /// The exit code, or the signal that ended it.
    var terminationStatus: Int32 { let st = raw; return st & 0x7F == 0 ? (st >> 8) & 0xFF : st & 0x7F }
    var terminationReason: Process.TerminationReason { raw & 0x7F == 0 ? .exit : .uncaughtSignal }
}

/// Whether the machine is too loaded for an absolute wall-clock bound to mean anything: the 1-minute
/// load average above twice the online cores (Linux /proc/loadavg; false where it cannot be read).
enum MachineLoad {
    static var overloaded: Bool {
        guard let text = try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8),
              let first = text.split(separator: " ").first, let load = Double(first) else { return false }
        return load > 2 * Double(ProcessInfo.processInfo.activeProcessorCount)
    }
}
