import Foundation

/// Byte-level BPE as Hugging Face `tokenizers` runs it from a tokenizer.json (GPT-2, Llama-3, Qwen2 and
/// the families that share their layout), or from GPT-2's vocab.json + merges.txt:
///
/// 1. added tokens (`<|endoftext|>`, `<|begin_of_text|>`, ...) are cut out of the raw text first, never
///    split, honouring their lstrip / rstrip / single_word / normalized flags (`AddedTokenMatcher`);
/// 2. the rest is normalized (NFC, Qwen2's normalizer) and searched for the added tokens that match
///    normalized text;
/// 3. each remaining stretch goes through the pre-tokenizer steps (`PreTokenizerStep`: Split with
///    the family's regex, Digits, ByteLevel with or without its regex, add_prefix_space);
/// 4. each piece's bytes are merged by rank (`MergeTable`) into vocabulary ids, or are one id when
///    `ignore_merges` is set and the piece is a vocabulary entry (Llama-3), with a cache of piece -> ids;
/// 5. the post-processor's special tokens (Llama-3's BOS) are added around the ids when asked.
///
/// Decoding concatenates the bytes the tokens stand for, optionally without the special tokens, and
/// reads them as UTF-8, replacing invalid sequences with U+FFFD as Rust's `from_utf8_lossy` does.
/// Anything in tokenizer.json this does not implement is refused when loading, naming it.
///
/// Thread-safe: `encode` takes a lock around the shared cache; decoding reads immutable tables.
public final class BPETokenizer: @unchecked Sendable {
    /// Number of ids: one more than the largest id in the vocabulary or the added tokens.
    public let vocabSize: Int
    /// Id of the end-of-text token: tokenizer_config.json's `eos_token` if the folder has one, else
    /// `<|endoftext|>` if the tokenizer has it.
    public let eosTokenId: Int?
    /// Id of tokenizer_config.json's `bos_token`, if the folder names one.
    public let bosTokenId: Int?
    /// tokenizer_config.json's bos_token / eos_token text (what chat templates write), if present.
    public let bosToken: String?
    public let eosToken: String?
    /// Ids `encode` puts before / after the text's ids when `addSpecialTokens` (the post-processor's
    /// template: `[128000]` before for Llama-3, nothing for GPT-2 and Qwen2).
    public let specialPrefixIds: [Int]
    public let specialSuffixIds: [Int]

    // Decoding: the bytes of token `id` are tokenBytes[tokenOffsets[id] ..< tokenOffsets[id + 1]].
    private let tokenOffsets: [Int32]
    private let tokenBytes: [UInt8]
    private let tokenStrings: [String?]
    private let special: [Bool]
    private let idsByToken: [String: Int]

    // Encoding.
    private let byteTokenIds: [Int32]          // 256 entries: id of the single-byte token, or -1
    private let merges: MergeTable
    private let rawAdded: AddedTokenMatcher          // tokens matched in the raw text
    private let normalizedAdded: AddedTokenMatcher   // tokens matched after normalization
    private let nfc: Bool
    /// The text is normalized (NFC) before it is split into tokens, which may change its length.
    var normalizesText: Bool { nfc }
    private let steps: [PreTokenizerStep]
    /// GPT-2's pipeline: no normalizer, no normalized added tokens, only its regex (a direct loop).
    private let gpt2Only: Bool
    /// ignore_merges: piece bytes -> its vocabulary id.
    private let wholeWords: WordCache?
    private let cache = WordCache()
    private let lock = NSLock()
    /// Words longer than this (bytes) are merged every time, not cached.
    private static let maxCachedWordBytes = 256
    /// Words with more symbols than this use the heap-based merge (n log n) instead of rescanning.
    static let heapMergeThreshold = 64

    // Scratch for one word, grown as needed, used under `lock`.
    private var symbols: [Int32] = []
    private var pairs: [UInt64] = []

    /// Loads `tokenizer.json`, or `vocab.json` + `merges.txt`, from a model or tokenizer folder (and
    /// tokenizer_config.json's bos/eos tokens when present).
    public convenience init(folder: String) throws {
        try self.init(files: try TokenizerFiles.load(folder: folder))
    }

    init(files: TokenizerFiles) throws {
        var maxId = -1
        for (_, id) in files.vocab { maxId = max(maxId, id) }
        for t in files.addedTokens { maxId = max(maxId, t.id) }
        vocabSize = maxId + 1

        var strings = [String?](repeating: nil, count: vocabSize)
        for (token, id) in files.vocab { strings[id] = token }
        var isSpecial = [Bool](repeating: false, count: vocabSize)
        // An added token matched in normalized text decodes as its normalized form (as HF does).
        var decodeStrings = strings
        for t in files.addedTokens {
            strings[t.id] = t.content
            decodeStrings[t.id] = t.normalized && files.nfc ? NFC.normalize(t.content) : t.content
        }
        let specialContents = Set(files.addedTokens.filter { $0.special }.map { $0.content })
        for id in 0..<vocabSize { if let s = decodeStrings[id], specialContents.contains(s) { isSpecial[id] = true } }
        tokenStrings = strings
        special = isSpecial

        var offsets = [Int32](repeating: 0, count: vocabSize + 1)
        var bytes: [UInt8] = []
        bytes.reserveCapacity(vocabSize * 7)
        for id in 0..<vocabSize {
            if let s = decodeStrings[id] { bytes.append(contentsOf: ByteLevel.bytes(ofToken: s)) }
            offsets[id + 1] = Int32(bytes.count)
        }
        tokenOffsets = offsets
        tokenBytes = bytes

        var byteIds = [Int32](repeating: -1, count: 256)
        for b in 0..<256 {
            if let id = files.vocab[String(Character(ByteLevel.byteToScalar[b]))] { byteIds[b] = Int32(id) }
        }
        byteTokenIds = byteIds

        let table = MergeTable(capacityFor: files.merges.count)
        for (rank, (a, b)) in files.merges.enumerated() {
            guard let left = files.vocab[a] else { throw TokenizerError.mergeUnknownToken(file: files.mergesFile, line: rank + 1, token: a) }
            guard let right = files.vocab[b] else { throw TokenizerError.mergeUnknownToken(file: files.mergesFile, line: rank + 1, token: b) }
            guard let merged = files.vocab[a + b] else { throw TokenizerError.mergeUnknownToken(file: files.mergesFile, line: rank + 1, token: a + b) }
            table.insert(left: Int32(left), right: Int32(right), rank: rank, merged: Int32(merged))
        }
        merges = table

        if files.ignoreMerges {
            let words = WordCache(maxEntries: files.vocab.count + 1)
            for (token, id) in files.vocab {
                guard var b = ByteLevel.bytesIfByteLevel(token), !b.isEmpty else { continue }
                b.withUnsafeMutableBufferPointer { w in
                    let p = UnsafePointer(w.baseAddress!)
                    var one = Int32(id)
                    withUnsafePointer(to: &one) { words.insert(p, w.count, hash: WordCache.hash(p, w.count), ids: UnsafeBufferPointer(start: $0, count: 1)) }
                }
            }
            wholeWords = words
        } else {
            wholeWords = nil
        }

        rawAdded = AddedTokenMatcher(files.addedTokens.filter { !$0.normalized }, normalize: false)
        normalizedAdded = AddedTokenMatcher(files.addedTokens.filter { $0.normalized }, normalize: files.nfc)
        nfc = files.nfc
        steps = files.preTokenizer
        if files.preTokenizer.count == 1, case .gpt2Regex = files.preTokenizer[0], !files.nfc,
           files.addedTokens.allSatisfy({ !$0.normalized }) {
            gpt2Only = true
        } else {
            gpt2Only = false
        }
        specialPrefixIds = files.prefixIds
        specialSuffixIds = files.suffixIds

        var byToken = files.vocab
        for t in files.addedTokens { byToken[t.content] = t.id }
        idsByToken = byToken
        bosToken = files.bosToken
        eosToken = files.eosToken
        bosTokenId = files.bosToken.flatMap { byToken[$0] }
        eosTokenId = files.eosToken.flatMap { byToken[$0] } ?? byToken["<|endoftext|>"]
    }

    /// The token as the vocabulary spells it (byte-level alphabet, e.g. "Ġhello"), or the added
    /// token's content; nil for an id with no token. For text, use `decode([id])`.
    public func tokenText(_ id: Int) -> String? {
        id >= 0 && id < vocabSize ? tokenStrings[id] : nil
    }

    /// The id of a token as the vocabulary spells it, or of an added token ("<|eot_id|>"); nil if none.
    public func tokenId(_ token: String) -> Int? { idsByToken[token] }

    /// Whether `id` is a special added token (skipped by `decode(_:skipSpecialTokens: true)`).
    public func isSpecialToken(_ id: Int) -> Bool { id >= 0 && id < vocabSize && special[id] }

    /// Empties the word cache (to measure cold-cache speed; never needed for correctness).
    public func clearCache() {
        lock.lock(); defer { lock.unlock() }
        cache.removeAll()
    }

    // MARK: Decoding

    /// The bytes the ids stand for; ids with no token are skipped, and special tokens too when
    /// `skipSpecialTokens`. A streaming caller emits text only once the accumulated bytes end on a
    /// complete UTF-8 character.
    public func decodeBytes(_ ids: [Int], skipSpecialTokens: Bool = false) -> [UInt8] {
        var out: [UInt8] = []
        tokenOffsets.withUnsafeBufferPointer { off in
            tokenBytes.withUnsafeBufferPointer { bytes in
                special.withUnsafeBufferPointer { sp in
                    var n = 0
                    for id in ids where id >= 0 && id < vocabSize { n += Int(off[id + 1] - off[id]) }
                    out.reserveCapacity(n)
                    for id in ids where id >= 0 && id < vocabSize && !(skipSpecialTokens && sp[id]) {
                        out.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[Int(off[id])..<Int(off[id + 1])]))
                    }
                }
            }
        }
        return out
    }

    /// The text of the ids; invalid UTF-8 (a character cut between tokens) becomes U+FFFD. Special
    /// tokens are written out unless `skipSpecialTokens` (Hugging Face's `skip_special_tokens`).
    public func decode(_ ids: [Int], skipSpecialTokens: Bool = false) -> String {
        String(decoding: decodeBytes(ids, skipSpecialTokens: skipSpecialTokens), as: UTF8.self)
    }

    // MARK: Encoding

    /// Token ids of `text`. Added tokens written in the text, such as `<|endoftext|>`, become their ids.
    /// With `addSpecialTokens` (the default, as in Hugging Face), the post-processor's tokens are
    /// added: Llama-3's `<|begin_of_text|>` in front; GPT-2 and Qwen2 add none.
    public func encode(_ text: String, addSpecialTokens: Bool = true) -> [Int] {
        var text = text
        return text.withUTF8 { buf in encode(utf8: buf, addSpecialTokens: addSpecialTokens) }
    }

    /// Token ids of valid UTF-8 bytes (the caller checked them, e.g. `String(validating:)`).
    func encode(utf8 buf: UnsafeBufferPointer<UInt8>, addSpecialTokens: Bool = true) -> [Int] {
        var out: [Int] = []
        out.reserveCapacity(buf.count / 3 + 4)
        if addSpecialTokens && !specialPrefixIds.isEmpty { out += specialPrefixIds }
        if let p = buf.baseAddress, buf.count > 0 {
            lock.lock()
            if gpt2Only {
                rawAdded.split(p, 0, buf.count, into: &out) { q, n, out in scanGPT2(q, n, into: &out) }
            } else if !nfc && normalizedAdded.isEmpty {
                rawAdded.split(p, 0, buf.count, into: &out) { q, n, out in preTokenize(q, n, step: 0, into: &out) }
            } else {
                rawAdded.split(p, 0, buf.count, into: &out) { q, n, out in encodeRaw(q, n, into: &out) }
            }
            lock.unlock()
        }
        if addSpecialTokens && !specialSuffixIds.isEmpty { out += specialSuffixIds }
        return out
    }

    /// A stretch of raw text between added tokens: normalized, then searched for normalized added tokens.
    private func encodeRaw(_ p: UnsafePointer<UInt8>, _ n: Int, into out: inout [Int]) {
        if nfc, let normalized = NFC.normalize(p, n) {
            normalized.withUnsafeBufferPointer { w in
                normalizedAdded.split(w.baseAddress!, 0, w.count, into: &out) { q, m, out in preTokenize(q, m, step: 0, into: &out) }
            }
        } else {
            normalizedAdded.split(p, 0, n, into: &out) { q, m, out in preTokenize(q, m, step: 0, into: &out) }
        }
    }

    /// GPT-2's whole pipeline after the added tokens (no normalizer, only its regex): the scanner and
    /// BPE in one loop.
    private func scanGPT2(_ p: UnsafePointer<UInt8>, _ n: Int, into out: inout [Int]) {
        let table = PreTokenizer.scalarClassPointer
        var i = 0
        while i < n {
            let e = PreTokenizer.pieceEnd(p, i, n, table)
            encodeWord(p + i, e - i, into: &out)
            i = e
        }
    }

    /// Runs pre-tokenizer steps `step...` on one piece, then BPE on each resulting piece.
    private func preTokenize(_ p: UnsafePointer<UInt8>, _ n: Int, step: Int, into out: inout [Int]) {
        guard n > 0 else { return }
        if step == steps.count { encodeWord(p, n, into: &out); return }
        let last = step + 1 == steps.count
        switch steps[step] {
        case .gpt2Regex:
            let table = PreTokenizer.scalarClassPointer
            var i = 0
            while i < n {
                let e = PreTokenizer.pieceEnd(p, i, n, table)
                if last { encodeWord(p + i, e - i, into: &out) } else { preTokenize(p + i, e - i, step: step + 1, into: &out) }
                i = e
            }
        case .llamaRegex(let maxDigits):
            let table = PreTokenizer.scalarClassPointer
            var i = 0
            while i < n {
                let e = LlamaPreTokenizer.pieceEnd(p, i, n, table, maxDigits: maxDigits)
                if last { encodeWord(p + i, e - i, into: &out) } else { preTokenize(p + i, e - i, step: step + 1, into: &out) }
                i = e
            }
        case .prefixSpace:
            if p[0] == 0x20 {
                preTokenize(p, n, step: step + 1, into: &out)
            } else {
                var withSpace = [UInt8](repeating: 0x20, count: n + 1)
                withSpace.withUnsafeMutableBufferPointer { w in
                    (w.baseAddress! + 1).initialize(from: p, count: n)
                    preTokenize(UnsafePointer(w.baseAddress!), n + 1, step: step + 1, into: &out)
                }
            }
        case let .split(regex, behavior, invert):
            BPETokenizer.forEachSplitPiece(regex, behavior, invert: invert, p, n) { s, e in
                preTokenize(p + s, e - s, step: step + 1, into: &out)
            }
        case .digits(let individual):
            let table = PreTokenizer.scalarClassPointer
            let number = ScalarClass.number.rawValue
            var i = 0
            var start = 0
            var runIsNumber = false
            while i < n {
                let (cls, len) = PreTokenizer.scalarClass(p, i, table)
                let isNumber = cls == number
                if i > start && (isNumber != runIsNumber || (isNumber && individual)) {
                    preTokenize(p + start, i - start, step: step + 1, into: &out)
                    start = i
                }
                runIsNumber = isNumber
                i += len
            }
            if n > start { preTokenize(p + start, n - start, step: step + 1, into: &out) }
        }
    }

    /// The pieces a Split step makes of `p[..<n]`, in order, empty ones left out, as byte ranges.
    @inline(__always)
    static func forEachSplitPiece(_ regex: SplitRegex, _ behavior: SplitBehavior, invert: Bool,
                                  _ p: UnsafePointer<UInt8>, _ n: Int, _ body: (Int, Int) -> Void) {
        if behavior == .isolated {
            // Matches and the text between them, each a piece (the invert flag changes nothing).
            var from = 0        // where the search goes on
            var gapStart = 0    // end of the last match
            var lastEnd = -1    // the same, -1 before the first (an empty match is refused there)
            while from < n, let (s, e) = regex.firstMatch(p, from: from, end: n, notEmptyAt: lastEnd) {
                if s > gapStart { body(gapStart, s) }
                if e > s { body(s, e) }
                gapStart = e
                lastEnd = e
                from = e
                if e == s {   // after an empty match the search steps over one character
                    if e == n { break }
                    from = e + (p[e] < 0x80 ? 1 : p[e] < 0xE0 ? 2 : p[e] < 0xF0 ? 3 : 4)
                }
            }
            if gapStart < n { body(gapStart, n) }
            return
        }
        var marked: [(Int, Int, Bool)] = []
        var prev = 0
        for (s, e) in regex.matches(p, n) {
            if s > prev { marked.append((prev, s, invert)) }
            marked.append((s, e, !invert))
            prev = e
        }
        if prev < n { marked.append((prev, n, invert)) }
        for (s, e) in applyBehavior(behavior, marked) where e > s { body(s, e) }
    }

    /// Hugging Face's `NormalizedString::split` behaviors over pieces marked (start, end, isDelimiter)
    /// that cover the text in order; returns the pieces kept.
    static func applyBehavior(_ behavior: SplitBehavior, _ marked: [(Int, Int, Bool)]) -> [(Int, Int)] {
        switch behavior {
        case .isolated:
            return marked.map { ($0.0, $0.1) }
        case .removed:
            return marked.filter { !$0.2 }.map { ($0.0, $0.1) }
        case .contiguous:
            var acc: [(Int, Int)] = []
            var previous = false
            for (s, e, isMatch) in marked {
                if isMatch == previous, !acc.isEmpty { acc[acc.count - 1].1 = e } else { acc.append((s, e)) }
                previous = isMatch
            }
            return acc
        case .mergedWithPrevious:
            var acc: [(Int, Int)] = []
            var previous = false
            for (s, e, isMatch) in marked {
                if isMatch && !previous, !acc.isEmpty { acc[acc.count - 1].1 = e } else { acc.append((s, e)) }
                previous = isMatch
            }
            return acc
        case .mergedWithNext:
            var acc: [(Int, Int)] = []
            var previous = false
            for (s, e, isMatch) in marked.reversed() {
                if isMatch && !previous, !acc.isEmpty { acc[acc.count - 1].0 = s } else { acc.append((s, e)) }
                previous = isMatch
            }
            return acc.reversed()
        }
    }

    @inline(__always)
    private func encodeWord(_ p: UnsafePointer<UInt8>, _ n: Int, into out: inout [Int]) {
        if n == 1 {
            let id = byteTokenIds[Int(p[0])]
            if id >= 0 { out.append(Int(id)) }
            return
        }
        let cacheable = n <= BPETokenizer.maxCachedWordBytes
        var h: UInt64 = 0
        if cacheable {
            h = WordCache.hash(p, n)
            if cache.lookup(p, n, hash: h, into: &out) { return }
        }
        if let wholeWords {
            if !cacheable { h = WordCache.hash(p, n) }
            if wholeWords.lookup(p, n, hash: h, into: &out) {
                if cacheable {
                    withUnsafePointer(to: Int32(out[out.count - 1])) { cache.insert(p, n, hash: h, ids: UnsafeBufferPointer(start: $0, count: 1)) }
                }
                return
            }
        }
        let count = mergeWord(p, n)
        symbols.withUnsafeBufferPointer { s in
            for k in 0..<count { out.append(Int(s[k])) }
            if cacheable { cache.insert(p, n, hash: h, ids: UnsafeBufferPointer(rebasing: s[0..<count])) }
        }
    }

    /// BPE ids of one word's bytes through the rescanning or the heap merge (for tests).
    func mergeIds(_ word: [UInt8], heap: Bool) -> [Int] {
        lock.lock(); defer { lock.unlock() }
        let m = word.withUnsafeBufferPointer { mergeWord($0.baseAddress!, $0.count, forceHeap: heap) }
        return symbols[0..<m].map { Int($0) }
    }

    /// BPE on one word's bytes; leaves the ids in `symbols[0..<result]`.
    func mergeWord(_ p: UnsafePointer<UInt8>, _ n: Int, forceHeap: Bool = false) -> Int {
        if symbols.count < n {
            symbols = [Int32](repeating: 0, count: max(n, 2 * symbols.count))
            pairs = [UInt64](repeating: 0, count: symbols.count)
        }
        var m = 0
        symbols.withUnsafeMutableBufferPointer { s in
            byteTokenIds.withUnsafeBufferPointer { byteIds in
                for k in 0..<n {
                    let id = byteIds[Int(p[k])]
                    if id >= 0 { s[m] = id; m += 1 }   // a byte with no token is dropped, as HF does without unk
                }
            }
        }
        if m < 2 { return m }
        if forceHeap || m > BPETokenizer.heapMergeThreshold { return heapMerge(m) }
        let merges = self.merges
        symbols.withUnsafeMutableBufferPointer { sb in
            pairs.withUnsafeMutableBufferPointer { pb in
                let s = sb.baseAddress!, pr = pb.baseAddress!
                for k in 0..<(m - 1) { pr[k] = merges.lookup(s[k], s[k + 1]) }
                while true {
                    // lowest rank, leftmost on ties (ranks are unique, so ties are the same pair)
                    var best = MergeTable.none
                    var at = -1
                    for k in 0..<(m - 1) where pr[k] < best { best = pr[k]; at = k }
                    if at < 0 { break }
                    s[at] = Int32(truncatingIfNeeded: best & 0xFFFF_FFFF)
                    // drop symbol at+1 and pair at+1 (pair `at` is recomputed below)
                    var k = at + 1
                    while k < m - 1 { s[k] = s[k + 1]; k += 1 }
                    k = at + 1
                    while k < m - 2 { pr[k] = pr[k + 1]; k += 1 }
                    m -= 1
                    if at < m - 1 { pr[at] = merges.lookup(s[at], s[at + 1]) }
                    if at > 0 { pr[at - 1] = merges.lookup(s[at - 1], s[at]) }
                    if m < 2 { break }
                }
            }
        }
        return m
    }

    /// Hugging Face's merge loop for long words: a min-heap of (rank, position) over a linked list of
    /// symbols; a popped entry is stale if its pair no longer yields the same merged id.
    private func heapMerge(_ m: Int) -> Int {
        var ids = Array(symbols[0..<m])
        var next = [Int](0..<m).map { $0 + 1 }
        var prev = [Int](0..<m).map { $0 - 1 }
        var alive = [Bool](repeating: true, count: m)
        next[m - 1] = -1
        struct Item: Comparable {
            let rank: UInt32, pos: Int, merged: Int32
            static func < (a: Item, b: Item) -> Bool { a.rank != b.rank ? a.rank < b.rank : a.pos < b.pos }
        }
        var heap: [Item] = []
        func push(_ x: Item) {
            heap.append(x)
            var i = heap.count - 1
            while i > 0 {
                let parent = (i - 1) / 2
                if heap[i] < heap[parent] { heap.swapAt(i, parent); i = parent } else { break }
            }
        }
        func pop() -> Item? {
            guard let top = heap.first else { return nil }
            let last = heap.removeLast()
            if !heap.isEmpty {
                heap[0] = last
                var i = 0
                while true {
                    let l = 2 * i + 1, r = l + 1
                    var smallest = i
                    if l < heap.count && heap[l] < heap[smallest] { smallest = l }
                    if r < heap.count && heap[r] < heap[smallest] { smallest = r }
                    if smallest == i { break }
                    heap.swapAt(i, smallest)
                    i = smallest
                }
            }
            return top
        }
        func pairItem(_ pos: Int, _ right: Int) -> Item? {
            let v = merges.lookup(ids[pos], ids[right])
            if v == MergeTable.none { return nil }
            return Item(rank: UInt32(v >> 32), pos: pos, merged: Int32(truncatingIfNeeded: v & 0xFFFF_FFFF))
        }
        for k in 0..<(m - 1) { if let it = pairItem(k, k + 1) { push(it) } }
        while let top = pop() {
            let pos = top.pos
            guard alive[pos], next[pos] >= 0 else { continue }
            let right = next[pos]
            let v = merges.lookup(ids[pos], ids[right])
            guard v != MergeTable.none, Int32(truncatingIfNeeded: v & 0xFFFF_FFFF) == top.merged else { continue }
            ids[pos] = top.merged
            alive[right] = false
            next[pos] = next[right]
            if next[pos] >= 0 { prev[next[pos]] = pos }
            if prev[pos] >= 0, let it = pairItem(prev[pos], pos) { push(it) }
            if next[pos] >= 0, let it = pairItem(pos, next[pos]) { push(it) }
        }
        var count = 0
        var k = 0
        while k >= 0 { symbols[count] = ids[k]; count += 1; k = next[k] }
        return count
    }
}

