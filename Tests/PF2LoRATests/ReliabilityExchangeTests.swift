import Foundation
import Testing
@testable import PF2LoRA

/// Issue 11, items 1 and 2: the paths `train_local` / `evaluate_local` carry (`data`, `shared.path`,
/// `shared_out`). Before the fix a caller could read any file the server could (an error quoted its
/// first 8 bytes as a "header length"), block the reader thread on a FIFO or a 2 GB file, and write
/// anywhere, over the store's manifest included. Now every path resolves inside the operator's
/// `--exchange-dir` (no link followed, never into the store), files are size-checked before reading
/// and read on the training thread, outputs are replaced atomically, and errors never quote a file.
@Suite(.serialized) struct ReliabilityExchangeTests {
    /// A secret outside everything the server was given: its bytes must never come back.
    static let secretText = "SECRETPW-0123456789abcdef-hunter2\nroot:$6$salt$hash:19000:0:99999:7:::\n"

    /// Every way the secret could leak into a message: its words, and its first 8 bytes read as a
    /// little-endian length (what the old error printed), in decimal and hex.
    static func leaks(_ message: String, _ secret: Data) -> [String] {
        var found: [String] = []
        for w in ["SECRETPW", "hunter2", "0123456789abcdef", "root:", "salt"] where message.contains(w) { found.append(w) }
        if secret.count >= 8 {
            var n: UInt64 = 0
            withUnsafeMutableBytes(of: &n) { $0.copyBytes(from: secret.prefix(8)) }
            let v = UInt64(littleEndian: n)
            for s in [String(v), String(Int(clamping: v)), String(v, radix: 16)] where message.contains(s) { found.append(s) }
        }
        return found
    }

    static func message(_ r: [String: Any]?) -> String { ((r?["error"] as? [String: Any])?["message"] as? String) ?? "" }

    static func storeState(_ fx: ServerFixture) throws -> [String: Data] {
        let dir = fx.storeHandle.directory
        var out: [String: Data] = [:]
        for p in try FileManager.default.subpathsOfDirectory(atPath: dir).sorted() where p != ".lock" {
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: dir + "/" + p, isDirectory: &isDir), !isDir.boolValue {
                out[p] = try Data(contentsOf: URL(fileURLWithPath: dir + "/" + p))
            }
        }
        return out
    }

    static func roundParams(_ fx: ServerFixture, data: String) throws -> [String: Any] {
        let sharedNow = try #require(try fx.storeHandle.latestShared()).adapter
        let x0 = try initialSharedAdapter(weights: fx.gpt2.weights, base: fx.storeHandle.base, modules: Array(sharedNow.modules.keys),
                                          rank: sharedNow.rank, alpha: sharedNow.alpha, seed: 4)
        return ["client": "dana", "data": data, "shared": ["safetensors": x0.safetensors().base64EncodedString()], "local_steps": 1,
                "lower_steps": 1, "batch": 1, "seq": 8]
    }

    /// A server started as before (no --exchange-dir): every request that names a path is refused,
    /// at once, without reading or writing it. Before the fix: the secret's first 8 bytes came back
    /// in a -32002 message, `shared_out` replaced the store's manifest, and a FIFO blocked the reader
    /// thread (health went unanswered).
    @Test func withoutAnExchangeFolderNoPathIsFollowed() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let outside = fx.root + "/outside"
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        let secret = Data(Self.secretText.utf8)
        try secret.write(to: URL(fileURLWithPath: outside + "/secret.txt"))
        let data = outside + "/dana"
        try FederatedClientTests.writeClientData(data, texts: PersonalizeTests.texts)
        #expect(mkfifo(outside + "/fifo", 0o600) == 0)
        let before = try Self.storeState(fx)
        let manifest = fx.storeHandle.directory + "/manifest.json"

        let s = try fx.serve()
        let round = try Self.roundParams(fx, data: data)
        s.request(1, "train_local", round.merging(["shared": ["path": outside + "/secret.txt"]]) { $1 })
        s.request(2, "train_local", round.merging(["shared_out": manifest]) { $1 })
        s.request(3, "evaluate_local", ["client": "dana", "data": data, "shared": ["path": outside + "/fifo"]])
        s.request(4, "health")
        let t0 = Date()
        let health = s.response(4, timeout: 20)
        #expect(ServerProcess.result(health)?["status"] as? String == "ok", "health unanswered: the reader thread is blocked")
        #expect(Date().timeIntervalSince(t0) < 10)
        for id in 1...3 {
            let r = s.response(id, timeout: 60)
            #expect(ServerProcess.errorCode(r) == -32602, "request \(id): \(r ?? [:])")
            let m = Self.message(r)
            #expect(m.contains("--exchange-dir"), "request \(id): \(m)")
            #expect(Self.leaks(m, secret).isEmpty, "request \(id) leaked \(Self.leaks(m, secret)): \(m)")
        }
        #expect(try Self.storeState(fx) == before, "a refused request changed the store")
        // Unblock a FIFO reader the old server might have left, so the server can exit.
        let w = open(outside + "/fifo", O_WRONLY | O_NONBLOCK)
        if w >= 0 { close(w) }
        #expect(s.finish() == 0)
    }

    /// With `--exchange-dir`: paths inside it work (relative or absolute), everything leading out
    /// of it, through a link, into the store or to a file too large is refused with a clear -32602
    /// that quotes no file; a non-adapter file inside is refused at its check without quoting it;
    /// `shared_out` is written atomically and only as a `.safetensors` file.
    @Test func exchangeFolderConfinesEveryPath() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        let ex = fx.root + "/exchange", outside = fx.root + "/outside"
        for d in [ex + "/dana", ex + "/sub", outside] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        try FederatedClientTests.writeClientData(ex + "/dana", texts: PersonalizeTests.texts)
        let secret = Data(Self.secretText.utf8)
        try secret.write(to: URL(fileURLWithPath: outside + "/secret.txt"))
        try secret.write(to: URL(fileURLWithPath: ex + "/secret-inside.safetensors"))
        // A safetensors-shaped file whose names, dtype and metadata are the secret.
        let hdr = #"{"__metadata__":{"SECRETPW":"hunter2","format_version":"hunter2"},"SECRETPW.0123456789abcdef":{"dtype":"hunter2","shape":[1],"data_offsets":[0,4]}}"#
        var st = Data()
        var n = UInt64(hdr.utf8.count).littleEndian
        withUnsafeBytes(of: &n) { st.append(contentsOf: $0) }
        st.append(Data(hdr.utf8)); st.append(Data(count: 4))
        try st.write(to: URL(fileURLWithPath: ex + "/secret-header.safetensors"))
        try FileManager.default.createSymbolicLink(atPath: ex + "/link.safetensors", withDestinationPath: outside + "/secret.txt")
        try FileManager.default.createSymbolicLink(atPath: ex + "/outlink", withDestinationPath: outside)
        try FileManager.default.createSymbolicLink(atPath: ex + "/storelink", withDestinationPath: fx.storeHandle.directory)
        // 2 GiB + 1, sparse: refused by its size before a byte is read.
        let big = ex + "/big.safetensors"
        let fd = open(big, O_WRONLY | O_CREAT, 0o644)
        #expect(ftruncate(fd, (2 << 30) + 1) == 0)
        close(fd)
        #expect(mkfifo(ex + "/fifo.safetensors", 0o600) == 0)
        let before = try Self.storeState(fx)

        let s = try fx.serve(["--exchange-dir", ex])
        let round = try Self.roundParams(fx, data: "dana")
        // Inside: a round with data given relatively and shared_out absolute; then evaluate reads it back.
        s.request(1, "train_local", round.merging(["shared_out": ex + "/sub/x1.safetensors"]) { $1 })
        let r1 = try #require(ServerProcess.result(s.response(1, timeout: 120)), "\(s.stderrText)")
        #expect((r1["shared"] as? [String: Any])?["path"] as? String == "sub/x1.safetensors")
        let x1 = try Data(contentsOf: URL(fileURLWithPath: ex + "/sub/x1.safetensors"))
        #expect((r1["shared"] as? [String: Any])?["bytes"] as? Int == x1.count)
        #expect(try FileManager.default.contentsOfDirectory(atPath: ex + "/sub") == ["x1.safetensors"], "a temporary file was left")
        s.request(2, "evaluate_local", ["client": "dana", "data": ex + "/dana", "shared": ["path": "sub/x1.safetensors"], "seq": 8])
        #expect(ServerProcess.result(s.response(2, timeout: 120)) != nil, "\(s.stderrText)")
        let after = try Self.storeState(fx)

        let cases: [(String, [String: Any], Int, String)] = [
            ("outside absolute", ["shared": ["path": outside + "/secret.txt"]], -32602, "outside the exchange folder"),
            ("dot-dot", ["shared": ["path": "../outside/secret.txt"]], -32602, "'..'"),
            ("dot-dot deep", ["shared": ["path": "sub/../../outside/secret.txt"]], -32602, "'..'"),
            ("link file", ["shared": ["path": "link.safetensors"]], -32602, "symlink"),
            ("link folder", ["shared": ["path": "outlink/secret.txt"]], -32602, "symlink"),
            ("hidden", ["shared": ["path": ".hidden.safetensors"]], -32602, "hidden"),
            ("missing", ["shared": ["path": "nothing.safetensors"]], -32602, "does not exist"),
            ("too large", ["shared": ["path": "big.safetensors"]], -32602, "2147483649 bytes"),
            ("fifo", ["shared": ["path": "fifo.safetensors"]], -32602, "not a regular file"),
            ("folder as file", ["shared": ["path": "sub"]], -32602, "not a regular file"),
            ("plain secret", ["shared": ["path": "secret-inside.safetensors"]], -32002, "check 3"),
            ("secret header", ["shared": ["path": "secret-header.safetensors"]], -32002, "check"),
            ("data outside", ["data": outside], -32602, "outside the exchange folder"),
            ("data link", ["data": "outlink"], -32602, "symlink"),
            ("data into store", ["data": "storelink"], -32602, "symlink"),
            ("out over manifest", ["shared_out": fx.storeHandle.directory + "/manifest.json"], -32602, "outside the exchange folder"),
            ("out through link", ["shared_out": "storelink/x.safetensors"], -32602, "symlink"),
            ("out dot-dot", ["shared_out": "../store/x.safetensors"], -32602, "'..'"),
            ("out not safetensors", ["shared_out": "dana/train.jsonl"], -32602, ".safetensors"),
            ("out folder", ["shared_out": "sub/"], -32602, ".safetensors"),
            ("out missing folder", ["shared_out": "nowhere/x.safetensors"], -32602, "does not exist"),
        ]
        for (i, c) in cases.enumerated() {
            let id = 100 + i
            s.request(id, "train_local", round.merging(c.1) { $1 })
            s.request(1000 + id, "health")
            #expect(ServerProcess.result(s.response(1000 + id, timeout: 10)) != nil, "\(c.0): health unanswered")
            let r = s.response(id, timeout: 120)
            let m = Self.message(r)
            #expect(ServerProcess.errorCode(r) == c.2, "\(c.0): \(r ?? [:])")
            #expect(m.contains(c.3), "\(c.0): \(m)")
            #expect(Self.leaks(m, secret).isEmpty && !m.contains("hunter2"), "\(c.0) leaked: \(m)")
        }
        // What a refused request may have done: nothing to the store, nothing outside, the data intact.
        let now = try Self.storeState(fx)
        #expect(now.filter { !$0.key.hasPrefix("clients/dana/") && $0.key != "manifest.json" } == after.filter { !$0.key.hasPrefix("clients/dana/") && $0.key != "manifest.json" })
        #expect(now["manifest.json"].map { (try? JSONSerialization.jsonObject(with: $0)) != nil } == true)
        #expect(before.keys.allSatisfy { now[$0] != nil })
        #expect(try Data(contentsOf: URL(fileURLWithPath: outside + "/secret.txt")) == secret)
        #expect(try FileManager.default.contentsOfDirectory(atPath: outside).sorted() == ["secret.txt"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: ex + "/dana").sorted() == ["test.jsonl", "train.jsonl", "valid.jsonl"])
        #expect(s.finish() == 0)
    }

    /// An exchange folder that is the store, inside it or around it is refused at start.
    @Test func exchangeFolderOverlappingTheStoreIsRefused() throws {
        let fx = try ServerFixture(clients: ["alice"])
        defer { fx.cleanup() }
        for dir in [fx.store, fx.storeHandle.directory, fx.storeHandle.directory + "/clients", fx.root] {
            let s = try fx.serve(["--exchange-dir", dir])
            let code = s.finish()
            #expect(code != 0, "serve started with --exchange-dir \(dir)")
            // The stderr reader may lag the exit a little.
            let deadline = Date().addingTimeInterval(10)
            while !s.stderrText.contains("overlaps the adapter store") && Date() < deadline { usleep(20_000) }
            #expect(s.stderrText.contains("overlaps the adapter store"), "\(s.stderrText)")
        }
    }

    /// The confined folder itself: component rules, and a folder swapped for a link between two
    /// opens is not followed.
    @Test func confinedFolderRules() throws {
        let root = TestPaths.tempDir("confined")
        defer { try? FileManager.default.removeItem(atPath: root) }
        try FileManager.default.createDirectory(atPath: root + "/ex/a", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: root + "/elsewhere", withIntermediateDirectories: true)
        try Data("inside".utf8).write(to: URL(fileURLWithPath: root + "/ex/a/f.txt"))
        try Data("outside".utf8).write(to: URL(fileURLWithPath: root + "/elsewhere/f.txt"))
        let c = try ConfinedFolder(root + "/ex", readLimit: 5)
        #expect(try c.components("a/./f.txt", param: "p") == ["a", "f.txt"])
        #expect(try c.components(root + "/ex/a/f.txt", param: "p") == ["a", "f.txt"])
        #expect(try c.components(root + "/ex", param: "p") == [])
        for bad in ["", "../x", "a/../../x", root + "/elsewhere/f.txt", root + "/ex2/f.txt", "/etc/passwd", ".x", "a/.tmp-x", "a\u{0}b"] {
            #expect(throws: ConfinedPathError.self, "\(bad)") { try c.components(bad, param: "p") }
        }
        // Size refused before reading: 6 bytes over a limit of 5.
        #expect(throws: ConfinedPathError.tooLarge(param: "p", path: "a/f.txt", size: 6, limit: 5)) { try c.read(["a", "f.txt"], param: "p", path: "a/f.txt") }
        // The folder is swapped for a link to another: the link is not followed.
        try FileManager.default.moveItem(atPath: root + "/ex/a", toPath: root + "/ex/a-old")
        try FileManager.default.createSymbolicLink(atPath: root + "/ex/a", withDestinationPath: root + "/elsewhere")
        #expect(throws: ConfinedPathError.symlink(param: "p", path: "a/f.txt")) { try c.read(["a", "f.txt"], param: "p", path: "a/f.txt", limit: 100) }
        #expect(throws: ConfinedPathError.symlink(param: "p", path: "a/x.safetensors")) {
            try c.writeAtomically(Data("x".utf8), to: ["a", "x.safetensors"], param: "p", path: "a/x.safetensors")
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: root + "/elsewhere") == ["f.txt"])
        // An atomic write replaces a link named as the destination rather than writing through it.
        try FileManager.default.createSymbolicLink(atPath: root + "/ex/out.safetensors", withDestinationPath: root + "/elsewhere/f.txt")
        try c.writeAtomically(Data("new".utf8), to: ["out.safetensors"], param: "p", path: "out.safetensors")
        #expect(try Data(contentsOf: URL(fileURLWithPath: root + "/elsewhere/f.txt")) == Data("outside".utf8))
        #expect(try Data(contentsOf: URL(fileURLWithPath: root + "/ex/out.safetensors")) == Data("new".utf8))
        // A store inside, around or equal to the folder is refused; one apart is fine.
        #expect(throws: ConfinedPathError.self) { try ConfinedFolder(root + "/ex", readLimit: 5, excluding: [root]) }
        #expect(throws: ConfinedPathError.self) { try ConfinedFolder(root, readLimit: 5, excluding: [root + "/ex"]) }
        _ = try ConfinedFolder(root + "/ex", readLimit: 5, excluding: [root + "/elsewhere"])
    }

    /// Item 2: no error of the adapter, safetensors or zstd readers quotes a file's bytes. Each file
    /// below carries the secret where a reader looks: as the whole file, in the 8-byte length, as
    /// tensor names, dtypes, metadata keys and values, fingerprint and base name, and inside a zstd frame.
    @Test func errorsNeverQuoteFileContents() throws {
        let secret = Data(Self.secretText.utf8)
        let base = BaseModelInfo(name: "tiny", fingerprint: "0011223344556677",
                                 linears: ["transformer.h.0.attn.c_attn": (8, 24)])
        func safetensors(_ header: String, data: Int = 4) -> Data {
            var d = Data()
            var n = UInt64(header.utf8.count).littleEndian
            withUnsafeBytes(of: &n) { d.append(contentsOf: $0) }
            d.append(Data(header.utf8)); d.append(Data(count: data))
            return d
        }
        let meta = #""format":"pf2lora-adapter","format_version":"1","level":"shared","rank":"1","alpha":"1","use_rslora":"false","dtype":"f32""#
        let good = #""base_model.model.transformer.h.0.attn.c_attn.lora_A.weight":{"dtype":"F32","shape":[1,8],"data_offsets":[0,32]},"base_model.model.transformer.h.0.attn.c_attn.lora_B.weight":{"dtype":"F32","shape":[24,1],"data_offsets":[32,128]}"#
        var files: [(String, Data)] = [
            ("plain text", secret),
            ("short", Data("SECRETPW".utf8)),
            ("tensor name", safetensors(#"{"SECRETPW-hunter2":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#)),
            ("tensor dtype", safetensors(#"{"a.weight":{"dtype":"SECRETPW","shape":[1],"data_offsets":[0,4]}}"#)),
            ("tensor offsets", safetensors(#"{"SECRETPW":{"dtype":"F32","shape":[1],"data_offsets":[0,400000]}}"#)),
            ("bad shape", safetensors(#"{"SECRETPW":{"dtype":"F32","shape":"hunter2","data_offsets":[0,4]}}"#)),
            ("metadata key", safetensors(#"{"__metadata__":{"SECRETPW":7}}"#)),
            ("metadata value", safetensors(#"{"__metadata__":{"format_version":"SECRETPW-hunter2"}}"#)),
            ("rank value", safetensors(#"{"__metadata__":{\#(meta.replacingOccurrences(of: #""rank":"1""#, with: #""rank":"SECRETPW""#)),"base_fingerprint":"x"}}"#)),
            ("fingerprint", safetensors(#"{"__metadata__":{\#(meta),"base_model":"SECRETPW","base_fingerprint":"hunter2"},\#(good)}"#, data: 128)),
            ("module name", safetensors(#"{"__metadata__":{\#(meta),"base_fingerprint":"0011223344556677"},"base_model.model.SECRETPW.hunter2.lora_A.weight":{"dtype":"F32","shape":[1,8],"data_offsets":[0,32]}}"#, data: 32)),
            ("part name", safetensors(#"{"__metadata__":{\#(meta),"base_fingerprint":"0011223344556677"},"base_model.model.transformer.h.0.attn.c_attn.hunter2.weight":{"dtype":"F32","shape":[1,8],"data_offsets":[0,32]}}"#, data: 32)),
            ("bf16 tensor", safetensors(#"{"__metadata__":{\#(meta),"base_fingerprint":"x"},"SECRETPW":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#)),
        ]
        files.append(("zstd of text", try Zstd.compress(secret, level: 3)))
        files.append(("zstd of header", try Zstd.compress(files[2].1, level: 3)))
        var checked = 0
        for (what, bytes) in files {
            var messages: [String] = []
            do { _ = try LoRAAdapter.decode(compressedOrPlain: bytes, name: "f", base: base) } catch { messages.append("\(error)") }
            do { _ = try LoRAAdapter.decode(from: bytes, name: "f", base: base) } catch { messages.append("\(error)") }
            let path = TestPaths.tempDir("quote") + "/f.safetensors"
            try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try bytes.write(to: URL(fileURLWithPath: path))
            do { _ = try SafeTensorsFile(path: path) } catch { messages.append("\(error)") }
            do { _ = try Zstd.decompress(bytes, limit: 1 << 20, name: "f") } catch { messages.append("\(error)") }
            #expect(messages.count >= 3, "\(what): a reader accepted it")
            for m in messages {
                #expect(Self.leaks(m, secret).isEmpty, "\(what) leaked: \(m)")
                checked += 1
            }
        }
        #expect(checked >= 40)
    }
}
