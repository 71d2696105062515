import Foundation

/// Why a generation ended, as the protocol reports it.
public enum FinishReason: String, Sendable {
    case length, stop, eos, context, cancelled
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
/// The text is kept as UTF-8 bytes, never as Swift `Character`s (a combining mark joins the character
/// before it, so counting characters loses it). Bytes are released for streaming only when they form
/// complete UTF-8 and cannot be the beginning of a stop string; the released pieces, concatenated,
/// are exactly the final text, byte for byte. A stop string found ends the text just before the
/// earliest occurrence of any of them.
public final class GenerationState {
    public let request: GenerationRequest
    public let cache: KVCache
    private var sampler: Sampler
    private let eos: Set<Int>
    private let decodeToken: (Int) -> [UInt8]
    /// The stop strings as UTF-8 (empty ones dropped).
    private let stops: [[UInt8]]
    public private(set) var tokens: [Int] = []
    /// Bytes of a UTF-8 character not yet complete.
    private var pending: [UInt8] = []
    /// All complete text generated (stop strings not yet cut), as valid UTF-8: an invalid sequence
    /// from the model is replaced by U+FFFD when it is appended.
    private var text: [UInt8] = []
    /// How many bytes of `text` have been released (streamed).
    private var streamed = 0
    public private(set) var finish: FinishReason?
    private var nextTokens: [Int]

    /// `eosTokens`: every id that ends the generation (Llama-3 instruct models have several).
    public init(request: GenerationRequest, cache: KVCache, vocabSize: Int, eosTokens: Set<Int>, decodeToken: @escaping (Int) -> [UInt8]) {
        self.request = request
        self.cache = cache
        self.sampler = Sampler(params: request.sampling, vocabSize: vocabSize)
        self.eos = request.ignoreEOS ? [] : eosTokens
        self.decodeToken = decodeToken
        self.stops = request.stop.map { Array($0.utf8) }.filter { !$0.isEmpty }
        self.nextTokens = request.prompt
        if request.maxTokens <= 0 { finish = .length }
    }

    /// A generation whose text is the tokenizer's decoding of the generated ids with the special
    /// tokens left out, as Hugging Face's `decode(ids, skip_special_tokens=True)` (and vLLM's and TGI's
    /// default output): a Llama-3 `<|eot_id|>` or `<|start_header_id|>` the model emits is never written
    /// into the text; tokens added without `special` (Qwen3's `<think>`) are. `generate` and `serve`
    /// both use this one.
    public convenience init(request: GenerationRequest, cache: KVCache, vocabSize: Int, eosTokens: Set<Int>, tokenizer: BPETokenizer) {
        self.init(request: request, cache: cache, vocabSize: vocabSize, eosTokens: eosTokens,
                  decodeToken: { tokenizer.decodeBytes([$0], skipSpecialTokens: true) })
    }

    /// One end-of-sequence id, or none.
    public convenience init(request: GenerationRequest, cache: KVCache, vocabSize: Int, eos: Int?, decodeToken: @escaping (Int) -> [UInt8]) {
        self.init(request: request, cache: cache, vocabSize: vocabSize, eosTokens: eos.map { [$0] } ?? [], decodeToken: decodeToken)
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
        if eos.contains(tok) {
            finish = .eos
            return (tok, flush())
        }
        pending += decodeToken(tok)
        let (complete, rest) = Self.splitUTF8(pending)
        pending = rest
        let before = text.count
        if !complete.isEmpty { Self.appendRepaired(complete, to: &text) }
        if let cut = earliestStop(newFrom: before) {
            text.removeSubrange(cut...)
            pending = []
            finish = .stop
            return (tok, flush())
        }
        if tokens.count >= request.maxTokens { finish = .length; return (tok, flush()) }
        if cache.length + 1 >= cache.capacity { finish = .context; return (tok, flush()) }
        return (tok, release(upTo: text.count - heldBack()))
    }

    /// Ends the sequence now (a `cancel`): the text is what was already released, so a stream's
    /// pieces still add up to it.
    public func cancel() {
        guard finish == nil else { return }
        text.removeSubrange(streamed...)
        pending = []
        finish = .cancelled
    }

    /// The start of the earliest occurrence of any stop string, looking only at occurrences that end
    /// in the bytes appended from `from` on (older ones were looked for when they arrived).
    private func earliestStop(newFrom from: Int) -> Int? {
        guard !stops.isEmpty, text.count > from else { return nil }
        var best: Int?
        for s in stops where s.count <= text.count {
            // An occurrence ending at or after `from` starts at or after from - (s.count - 1); only one
            // starting before the best found so far matters.
            var i = max(0, from - s.count + 1)
            let last = min(text.count - s.count, (best ?? .max) - 1)
            while i <= last {
                if text[i..<(i + s.count)].elementsEqual(s) { best = i; break }
                i += 1
            }
        }
        return best
    }

    /// Bytes at the end of `text` that could begin a stop string (held back from streaming).
    private func heldBack() -> Int {
        var hold = 0
        for s in stops {
            var k = min(s.count - 1, text.count - streamed)
            while k > hold {
                if text[(text.count - k)...].elementsEqual(s[..<k]) { hold = k; break }
                k -= 1
            }
        }
        return hold
    }

    /// Releases `text[streamed..<end]` (ends at a character boundary: `text` is valid UTF-8 and a
    /// held suffix starts where a stop string starts, on a lead byte).
    private func release(upTo end: Int) -> String {
        guard end > streamed else { return "" }
        let s = String(decoding: text[streamed..<end], as: UTF8.self)
        streamed = end
        return s
    }

    /// Everything not yet streamed (called when the sequence finishes).
    private func flush() -> String {
        if !pending.isEmpty { Self.appendRepaired(pending, to: &text); pending = [] }
        return release(upTo: text.count)
    }

    /// The final text (the continuation only, stop string removed).
    public var outputText: String { String(decoding: text, as: UTF8.self) }
    /// The final text's UTF-8 bytes.
    public var outputBytes: [UInt8] { text }
    public var isFinished: Bool { finish != nil }

    /// Appends `bytes` as valid UTF-8 (each invalid sequence replaced by U+FFFD, as `String(decoding:)` does).
    static func appendRepaired(_ bytes: [UInt8], to text: inout [UInt8]) {
        text += String(decoding: bytes, as: UTF8.self).utf8
    }

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
