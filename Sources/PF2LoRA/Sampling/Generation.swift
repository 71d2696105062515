import Foundation

/// Why a generation ended, as the protocol reports it.
public enum FinishReason: String, Sendable {
    case length, stop, eos, context
}

/// What a generation request asks for.
public struct GenerationRequest: Sendable {
    public var prompt: [Int]
    public var maxTokens: Int
    public var sampling: SamplingParams
    public var stop: [String]
    public var ignoreEOS: Bool

    public init(prompt: [Int], maxTokens: Int = 64, sampling: SamplingParams = SamplingParams(), stop: [String] = [], ignoreEOS: Bool = false) {
        self.prompt = prompt; self.maxTokens = maxTokens; self.sampling = sampling; self.stop = stop; self.ignoreEOS = ignoreEOS
    }
}

/// One sequence being generated: its cache, sampler, and the text produced so far.
///
/// Text is released for streaming only when its bytes form complete UTF-8 and it cannot be the
/// beginning of a stop string; a stop string found ends the text just before it.
public final class GenerationState {
    public let request: GenerationRequest
    public let cache: KVCache
    private var sampler: Sampler
    private let eos: Int?
    private let decodeToken: (Int) -> [UInt8]
    public private(set) var tokens: [Int] = []
    /// Bytes of a UTF-8 character not yet complete.
    private var pending: [UInt8] = []
    /// All complete text generated (stop strings not yet cut).
    private var text = ""
    /// How many characters of `text` have been streamed.
    private var streamed = 0
    public private(set) var finish: FinishReason?
    private var nextTokens: [Int]

    public init(request: GenerationRequest, cache: KVCache, vocabSize: Int, eos: Int?, decodeToken: @escaping (Int) -> [UInt8]) {
        self.request = request
        self.cache = cache
        self.sampler = Sampler(params: request.sampling, vocabSize: vocabSize)
        self.eos = request.ignoreEOS ? nil : eos
        self.decodeToken = decodeToken
        self.nextTokens = request.prompt
        if request.maxTokens <= 0 { finish = .length }
    }

    /// The tokens to feed in the next step (the prompt first, then the last sampled token).
    public var pendingInput: [Int] { nextTokens }
    public var isPrefill: Bool { tokens.isEmpty }

    /// Takes the logits row of this sequence's last position; returns the sampled token and the
    /// text that became safe to stream (possibly empty).
    @discardableResult
    public func accept(logits: UnsafePointer<Float>, vocabSize: Int) -> (token: Int, delta: String) {
        let tok = sampler.sample(logits, count: vocabSize)
        tokens.append(tok)
        nextTokens = [tok]
        if let eos, tok == eos {
            finish = .eos
            return (tok, flush())
        }
        pending += decodeToken(tok)
        let (complete, rest) = Self.splitUTF8(pending)
        pending = rest
        if !complete.isEmpty { text += String(decoding: complete, as: UTF8.self) }
        for s in request.stop where !s.isEmpty {
            if let r = text.range(of: s) {
                text = String(text[..<r.lowerBound])
                finish = .stop
                return (tok, flush())
            }
        }
        if tokens.count >= request.maxTokens { finish = .length; return (tok, flush()) }
        if cache.length + 1 >= cache.capacity { finish = .context; return (tok, flush()) }
        // Hold back a suffix that could begin a stop string.
        var hold = 0
        for s in request.stop where !s.isEmpty {
            var k = min(s.count - 1, text.count)
            while k > 0 { if text.hasSuffix(s.prefix(k)) { break }; k -= 1 }
            hold = max(hold, k)
        }
        let safe = text.count - hold
        guard safe > streamed else { return (tok, "") }
        let start = text.index(text.startIndex, offsetBy: streamed)
        let end = text.index(text.startIndex, offsetBy: safe)
        streamed = safe
        return (tok, String(text[start..<end]))
    }

    /// Everything not yet streamed (called when the sequence finishes).
    private func flush() -> String {
        if !pending.isEmpty { text += String(decoding: pending, as: UTF8.self); pending = [] }
        guard text.count > streamed else { return "" }
        let s = String(text[text.index(text.startIndex, offsetBy: streamed)...])
        streamed = text.count
        return s
    }

    /// The final text (the continuation only, stop string removed).
    public var outputText: String { text }
    public var isFinished: Bool { finish != nil }

    /// Splits bytes into a prefix of complete UTF-8 sequences and an incomplete tail (at most 3 bytes).
    static func splitUTF8(_ b: [UInt8]) -> ([UInt8], [UInt8]) {
        var i = b.count - 1
        var back = 0
        while i >= 0 && back < 4 {
            let c = b[i]
            if c & 0xC0 != 0x80 {
                let need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1
                if need > back + 1 { return (Array(b[..<i]), Array(b[i...])) }
                return (b, [])
            }
            i -= 1; back += 1
        }
        return (b, [])
    }
}
