import Foundation
import Testing
@testable import PF2LoRA
@testable import PF2LoRAHTTP

/// The transport-independent method layer (`ServingCore`, Serving/Methods.swift) driven in process,
/// as the HTTP transport drives it, and the HTTP error mapping.
@Suite struct MethodLayerTests {
    /// Collects one request's events.
    final class Collect: GenerationSink, @unchecked Sendable {
        let done = DispatchSemaphore(value: 0)
        let lock = NSLock()
        var tokens: [TokenEvent] = []
        var result: GenerateResult?
        var error: RPCError?
        func token(_ e: TokenEvent) { lock.lock(); tokens.append(e); lock.unlock() }
        func finished(_ r: GenerateResult) { lock.lock(); result = r; lock.unlock(); done.signal() }
        func failed(_ e: RPCError) { lock.lock(); error = e; lock.unlock(); done.signal() }
        func wait() { _ = done.wait(timeout: .now() + 60) }
    }

    static func core(_ fx: ServerFixture) throws -> ServingCore {
        let core = ServingCore(model: fx.gpt2, tokenizer: try BPETokenizer(folder: fx.model), store: fx.storeHandle)
        try core.runtime.prepare()
        core.start()
        return core
    }

    @Test func generateThroughTheMethodLayer() throws {
        let fx = try ServerFixture()
        defer { fx.cleanup() }
        let core = try Self.core(fx)
        // Each client alone, then all together plus the base and shared: the same greedy text.
        var alone: [String: String] = [:]
        let choices: [(String, AdapterChoice)] = [("alice", .client("alice")), ("bob", .client("bob")), ("shared", .shared), ("base", .base)]
        for (name, choice) in choices {
            let s = Collect()
            try core.generate(GenerateRequest(prompt: "The cat", adapter: choice, maxTokens: 8, temperature: 0, ignoreEOS: true), sink: s)
            s.wait()
            alone[name] = try #require(s.result?.text)
            #expect(s.result?.usage.completionTokens == 8)
        }
        #expect(Set(alone.values).count == 4, "\(alone)")
        #expect(alone["base"] != nil && alone["base"] != alone["shared"])
        var sinks: [(String, Collect)] = []
        for (name, choice) in choices {
            let s = Collect()
            try core.generate(GenerateRequest(prompt: "The cat", adapter: choice, maxTokens: 8, temperature: 0, stream: true, ignoreEOS: true, logprobs: 2), sink: s)
            sinks.append((name, s))
        }
        for (name, s) in sinks {
            s.wait()
            let r = try #require(s.result, "\(name)")
            #expect(r.text == alone[name], "\(name)")
            // Streamed deltas add up to the text; log-probabilities are <= 0 and the top ones sorted.
            #expect(s.tokens.map(\.text).joined() == r.text)
            let lps = try #require(r.logprobs)
            #expect(lps.count == 8 && lps.allSatisfy { $0.logprob <= 1e-6 && $0.top.count == 2 && $0.top[0].logprob >= $0.top[1].logprob })
            // Greedy: the chosen token is the most likely one.
            #expect(lps.allSatisfy { $0.token == $0.top[0].token })
        }
        #expect(core.stats().completed == 8)
    }

    @Test func logprobsAreALogSoftmax() {
        let x: [Float] = [1, 2, 3, 0.5]
        let lse = x.withUnsafeBufferPointer { Scheduler.logSumExp($0.baseAddress!, 4) }
        let expected = log(x.map { exp(Double($0)) }.reduce(0, +))
        #expect(abs(Double(lse) - expected) < 1e-5)
        let top = x.withUnsafeBufferPointer { Scheduler.topK($0.baseAddress!, 4, 2) }
        #expect(top.map(\.0) == [2, 1])
    }

    @Test func cancelAHandleAndRefusals() throws {
        let fx = try ServerFixture()
        defer { fx.cleanup() }
        let core = try Self.core(fx)
        let s = Collect()
        let h = try core.generate(GenerateRequest(prompt: "The cat", adapter: .client("alice"), maxTokens: 200, temperature: 0, ignoreEOS: true), sink: s)
        h.cancel()
        s.wait()
        #expect(s.result?.finishReason == "cancelled")
        #expect(core.stats().cancelled == 1, "a cancelled request is counted as such")
        #expect(throws: RPCError.self) { try core.generate(GenerateRequest(prompt: "x", temperature: -1), sink: nil) }
        #expect(throws: RPCError.self) { try core.generate(GenerateRequest(prompt: "x", adapter: .client("../etc")), sink: nil) }
        // A template error names the problem; an empty conversation is refused.
        do { try core.generate(GenerateRequest(messagesJSON: "[]"), sink: nil); Issue.record("empty messages accepted") } catch let e as RPCError {
            #expect(e.code == .invalidParams && e.message.contains("chat template"))
        }
        // Chat messages render with the plain format on a model without a template.
        let c = Collect()
        try core.generate(GenerateRequest(messagesJSON: #"[{"role":"user","content":"Hi"}]"#, maxTokens: 2, temperature: 0), sink: c)
        c.wait()
        let prompt = try #require(c.result?.usage.promptTokens)
        #expect(prompt == core.tokenizer.encode("User: Hi\n\nAssistant:", addSpecialTokens: false).count)
        // Method layer replies.
        #expect(try core.adaptersList().clients.map(\.id) == ["alice", "bob", "carol"])
        #expect(try core.adapterInfo(client: "alice")?.rank == 2)
        #expect(try core.adapterInfo(client: "nobody") == nil)
        #expect(core.health().status == "ok")
    }

    /// Issue 11, item 18 (the lead's decision): a generate for a client with no adapter was served
    /// the shared pair alone (adapter.client null). Now it is -32001 on both transports (HTTP: 404
    /// model_not_found with the same text), naming the client, how many clients the store holds, the
    /// closest ids, and how to ask for the shared pair alone; `.sharedPair`
    /// (`serve --unknown-clients-get-shared`) keeps the old behaviour for both transports.
    @Test func unknownClientIsAnErrorUnlessOptedIn() throws {
        let fx = try ServerFixture()
        defer { fx.cleanup() }
        let core = try Self.core(fx)
        func run(_ c: ServingCore, _ a: AdapterChoice) throws -> (result: GenerateResult?, error: RPCError?) {
            let s = Collect()
            do {
                try c.generate(GenerateRequest(prompt: "The cat", adapter: a, maxTokens: 4, temperature: 0, ignoreEOS: true), sink: s)
            } catch let e as RPCError { return (nil, e) }
            s.wait()
            return (s.result, s.error)
        }
        let refused = try run(core, .client("alcie"))
        #expect(refused.result == nil, "served: \(refused.result?.text ?? "")")
        let e = try #require(refused.error)
        #expect(e.code == .unknownClient)
        #expect(e.message.contains("'alcie'") && e.message.contains("3 clients") && e.message.contains("closest: alice"), "\(e.message)")
        #expect(e.message.contains("'shared'") && e.message.contains("--unknown-clients-get-shared"), "\(e.message)")
        #expect(try run(core, .client("alice")).result?.adapter?.client == 1)
        // HTTP: the same rule and text, as 404 model_not_found.
        let http = try HTTPTransport(core: core, options: HTTPOptions())
        do {
            _ = try http.adapterChoice("alcie")
            Issue.record("HTTP served an unknown client")
        } catch let a as APIError {
            #expect(a.status.code == 404 && a.code == "model_not_found" && a.message == e.message, "\(a.message)")
        }
        #expect(try http.adapterChoice("alice") == .client("alice") && http.adapterChoice("shared") == .shared)
        // No store: every client is unknown, and the message says why.
        let bare = ServingCore(model: fx.gpt2, tokenizer: core.tokenizer, store: nil)
        bare.start()
        #expect(try run(bare, .client("alice")).error?.message.contains("no adapter store") == true)
        // Opted in: the shared pair alone, adapter.client null, the text of `.shared`.
        let lax = ServingCore(model: fx.gpt2, tokenizer: core.tokenizer, store: fx.storeHandle, unknownClients: .sharedPair)
        try lax.runtime.prepare()
        lax.start()
        let shared = try #require(try run(lax, .shared).result)
        let zed = try #require(try run(lax, .client("zed")).result)
        #expect(zed.text == shared.text && zed.adapter?.client == nil && zed.adapter?.shared == shared.adapter?.shared)
        #expect(try HTTPTransport(core: lax, options: HTTPOptions()).adapterChoice("zed") == .client("zed"))
    }

    @Test func pinnedAdaptersAreNotEvicted() throws {
        let fx = try ServerFixture()
        defer { fx.cleanup() }
        let a = try fx.storeHandle.load(level: .client, client: "alice", version: 1)
        let cache = AdapterCache(capacityBytes: a.byteCount * 2)
        cache.pin(client: "alice")
        cache.put(.init(level: .client, client: "alice", version: 1), a)
        for (i, c) in ["bob", "carol"].enumerated() {
            cache.put(.init(level: .client, client: c, version: 1), try fx.storeHandle.load(level: .client, client: c, version: 1))
            _ = i
        }
        #expect(cache.contains(.init(level: .client, client: "alice", version: 1)))
        #expect(!cache.contains(.init(level: .client, client: "bob", version: 1)))
        cache.unpin(client: "alice")
        cache.put(.init(level: .client, client: "bob", version: 1), try fx.storeHandle.load(level: .client, client: "bob", version: 1))
        #expect(!cache.contains(.init(level: .client, client: "alice", version: 1)))
    }

    @Test func errorStatuses() {
        func status(_ c: RPCCode, draining: Bool = false) -> Int { APIError.from(RPCError(c, "m"), draining: draining).status.code }
        #expect(status(.invalidParams) == 400 && status(.parseError) == 400 && status(.invalidRequest) == 400)
        #expect(status(.unknownClient) == 404)
        #expect(status(.conflict) == 409)
        #expect(status(.overloaded) == 429 && status(.overloaded, draining: true) == 503)
        #expect(status(.internalError) == 500)
        let body = APIError.from(RPCError(.unknownClient, "no such"), draining: false).body
        let err = body["error"] as? [String: Any]
        #expect(err?["message"] as? String == "no such" && err?["code"] as? String == "model_not_found" && err?["type"] as? String == "not_found_error")
        #expect(HTTPOptions.isLoopback("127.0.0.1") && HTTPOptions.isLoopback("::1") && !HTTPOptions.isLoopback("0.0.0.0"))
        #expect(HTTPTransport.constantTimeEqual("Bearer a", "Bearer a") && !HTTPTransport.constantTimeEqual("Bearer a", "Bearer b")
                && !HTTPTransport.constantTimeEqual("Bearer a", "Bearer ab"))
    }

    /// The one nesting-depth scan of both transports: brackets outside strings (escaped quotes kept in the string).
    @Test func nestingDepth() {
        #expect(JSONNesting.exceeds(Array(String(repeating: "[", count: 65).utf8), 64))
        #expect(!JSONNesting.exceeds(Array((String(repeating: "[", count: 64) + String(repeating: "]", count: 64)).utf8), 64))
        #expect(!JSONNesting.exceeds(Array(#"{"a": "[[[[["}"#.utf8), 4))
        #expect(!JSONNesting.exceeds(Array(#"{"a": "\"[[[[["}"#.utf8), 4))
        #expect(JSONNesting.exceeds(Array(#"{"a": "\\", "b": [[[[[]]]]]}"#.utf8), 4))
        #expect(RPCParser.checkDepth(Array(String(repeating: "{", count: 65).utf8))?.code == .invalidRequest)
    }

    /// The hand-written escaping of streamed token text parses back to the text (JSONSerialization as the reference).
    @Test func streamedTextEscaping() throws {
        for t in ["plain", "a \"quote\" and \\ back", "line\nfeed\r\ttab", "\u{01}\u{1f}ctl", "é 日本 🎉", "", "\u{7f}\u{2028}"] {
            let json = "{\"t\":\"" + JSONText.escaped(t) + "\"}"
            let back = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
            #expect(back?["t"] as? String == t, "\(t.debugDescription)")
        }
    }

    /// /v1/completions prompts as OpenAI takes them: text, a list of texts, token ids, a list of token-id lists.
    @Test func completionPrompts() throws {
        func kinds(_ v: Any) throws -> [String] {
            try HTTPTransport.prompts(v).map { p in
                switch p { case let .text(t): "t:\(t)"; case let .tokens(ids): "i:\(ids)" }
            }
        }
        #expect(try kinds("ab") == ["t:ab"])
        #expect(try kinds(["a", "b"]) == ["t:a", "t:b"])
        #expect(try kinds([1, 2, 3]) == ["i:[1, 2, 3]"])
        #expect(try kinds([[1], [2, 3]]) == ["i:[1]", "i:[2, 3]"])
        for bad: Any in [[Any](), [1, "a"] as [Any], [true, false], [1.5], [[1], "a"] as [Any], [[Int]()], 7] {
            #expect(throws: APIError.self) { try HTTPTransport.prompts(bad) }
        }
    }

    /// A token-array prompt is fed as given: the same ids as a text prompt give the same text; ids
    /// outside the vocabulary and empty arrays are refused before anything is queued.
    @Test func tokenPrompts() throws {
        let fx = try ServerFixture()
        defer { fx.cleanup() }
        let core = try Self.core(fx)
        let ids = core.tokenizer.encode("The cat", addSpecialTokens: true)
        var texts: [String] = []
        for r in [GenerateRequest(prompt: "The cat", adapter: .client("alice"), maxTokens: 8, temperature: 0, ignoreEOS: true),
                  GenerateRequest(promptTokens: ids, adapter: .client("alice"), maxTokens: 8, temperature: 0, ignoreEOS: true)] {
            let s = Collect()
            try core.generate(r, sink: s)
            s.wait()
            texts.append(try #require(s.result?.text))
            #expect(s.result?.usage.promptTokens == ids.count)
        }
        #expect(texts[0] == texts[1])
        for bad in [[Int](), [0, core.model.architecture.vocabSize], [-1]] {
            #expect(throws: RPCError.self) { try core.generate(GenerateRequest(promptTokens: bad), sink: nil) }
        }
        #expect(throws: RPCError.self) { try core.generate(GenerateRequest(prompt: "x", promptTokens: [1]), sink: nil) }
        #expect(core.stats().completed == 2 && core.stats().cancelled == 0)
    }
}
