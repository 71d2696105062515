import Foundation

/// Byte-level BPE as Hugging Face `tokenizers` does it for GPT-2: added (special) tokens are split out
/// first, each remaining segment is cut into pieces by the GPT-2 regex (`PreTokenizer`), and each
/// piece's bytes are merged by rank (`MergeTable`) into vocabulary ids, with a cache of piece -> ids.
/// Decoding concatenates the bytes the tokens stand for and reads them as UTF-8, replacing invalid
/// sequences with U+FFFD as Rust's `from_utf8_lossy` does.
///
/// Thread-safe: `encode` takes a lock around the shared cache; decoding reads immutable tables.
public final class BPETokenizer: @unchecked Sendable {
    /// Number of ids: one more than the largest id in the vocabulary or the added tokens.
    public let vocabSize: Int
    /// Id of `<|endoftext|>`, if the tokenizer has it.
    public let eosTokenId: Int?

    // Decoding: the bytes of token `id` are tokenBytes[tokenOffsets[id] ..< tokenOffsets[id + 1]].
    private let tokenOffsets: [Int32]
    private let tokenBytes: [UInt8]
    private let tokenStrings: [String?]

    // Encoding.
    private let byteTokenIds: [Int32]          // 256 entries: id of the single-byte token, or -1
    private let merges: MergeTable
    private let added: AddedTokenMatcher
    private let addPrefixSpace: Bool
    private let cache = WordCache()
    private let lock = NSLock()
    /// Words longer than this (bytes) are merged every time, not cached.
    private static let maxCachedWordBytes = 256
    /// Words with more symbols than this use the heap-based merge (n log n) instead of rescanning.
    static let heapMergeThreshold = 64

    // Scratch for one word, grown as needed, used under `lock`.
    private var symbols: [Int32] = []
    private var pairs: [UInt64] = []

    /// Loads `tokenizer.json`, or `vocab.json` + `merges.txt`, from a model or tokenizer folder.
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
        for t in files.addedTokens { strings[t.id] = t.content }
        tokenStrings = strings

        var offsets = [Int32](repeating: 0, count: vocabSize + 1)
        var bytes: [UInt8] = []
        bytes.reserveCapacity(vocabSize * 7)
        for id in 0..<vocabSize {
            if let s = strings[id] { bytes.append(contentsOf: ByteLevel.bytes(ofToken: s)) }
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
        added = AddedTokenMatcher(files.addedTokens)
        addPrefixSpace = files.addPrefixSpace
        eosTokenId = files.addedTokens.first(where: { $0.content == "<|endoftext|>" })?.id ?? files.vocab["<|endoftext|>"]
    }

    /// The token as the vocabulary spells it (byte-level alphabet, e.g. "Ġhello"), or the added
    /// token's content; nil for an id with no token. For text, use `decode([id])`.
    public func tokenText(_ id: Int) -> String? {
        id >= 0 && id < vocabSize ? tokenStrings[id] : nil
    }

    /// Empties the word cache (to measure cold-cache speed; never needed for correctness).
    public func clearCache() {
        lock.lock(); defer { lock.unlock() }
        cache.removeAll()
    }

    // MARK: Decoding

    /// The bytes the ids stand for; ids with no token are skipped. A streaming caller emits text only
    /// once the accumulated bytes end on a complete UTF-8 character.
    public func decodeBytes(_ ids: [Int]) -> [UInt8] {
        var out: [UInt8] = []
        tokenOffsets.withUnsafeBufferPointer { off in
            tokenBytes.withUnsafeBufferPointer { bytes in
                var n = 0
                for id in ids where id >= 0 && id < vocabSize { n += Int(off[id + 1] - off[id]) }
                out.reserveCapacity(n)
                for id in ids where id >= 0 && id < vocabSize {
                    out.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[Int(off[id])..<Int(off[id + 1])]))
                }
            }
        }
        return out
    }

    /// The text of the ids; invalid UTF-8 (a character cut between tokens) becomes U+FFFD.
    public func decode(_ ids: [Int]) -> String {
        String(decoding: decodeBytes(ids), as: UTF8.self)
    }

    // MARK: Encoding

    /// Token ids of `text`. Added tokens such as `<|endoftext|>` in the text become their ids.
    public func encode(_ text: String) -> [Int] {
        var text = text
        return text.withUTF8 { buf in encode(utf8: buf) }
    }

    /// Token ids of valid UTF-8 bytes (the caller checked them, e.g. `String(validating:)`).
    func encode(utf8 buf: UnsafeBufferPointer<UInt8>) -> [Int] {
        guard let p = buf.baseAddress, buf.count > 0 else { return [] }
        var out: [Int] = []
        out.reserveCapacity(buf.count / 3 + 4)
        lock.lock(); defer { lock.unlock() }
        var start = 0
        while start < buf.count {
            guard let m = added.nextMatch(p, from: start, end: buf.count) else {
                encodeSegment(p + start, buf.count - start, into: &out)
                break
            }
            if m.start > start { encodeSegment(p + start, m.start - start, into: &out) }
            out.append(m.id)
            start = m.end
        }
        return out
    }

    /// BPE ids of one word's bytes through the rescanning or the heap merge (for tests).
    func mergeIds(_ word: [UInt8], heap: Bool) -> [Int] {
        lock.lock(); defer { lock.unlock() }
        let m = word.withUnsafeBufferPointer { mergeWord($0.baseAddress!, $0.count, forceHeap: heap) }
        return symbols[0..<m].map { Int($0) }
    }

    /// One stretch of text with no added token in it.
    private func encodeSegment(_ p: UnsafePointer<UInt8>, _ n: Int, into out: inout [Int]) {
        if addPrefixSpace && p[0] != 0x20 {
            var withSpace = [UInt8](repeating: 0x20, count: n + 1)
            withSpace.withUnsafeMutableBufferPointer { w in
                (w.baseAddress! + 1).initialize(from: p, count: n)
                scanSegment(UnsafePointer(w.baseAddress!), n + 1, into: &out)
            }
        } else {
            scanSegment(p, n, into: &out)
        }
    }

    private func scanSegment(_ p: UnsafePointer<UInt8>, _ n: Int, into out: inout [Int]) {
        let table = PreTokenizer.scalarClassPointer
        var i = 0
        while i < n {
            let e = PreTokenizer.pieceEnd(p, i, n, table)
            encodeWord(p + i, e - i, into: &out)
            i = e
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
        let count = mergeWord(p, n)
        symbols.withUnsafeBufferPointer { s in
            for k in 0..<count { out.append(Int(s[k])) }
            if cacheable { cache.insert(p, n, hash: h, ids: UnsafeBufferPointer(rebasing: s[0..<count])) }
        }
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

/// Finds added tokens in raw text, leftmost first and longest among those starting at the same byte
/// (Hugging Face matches them with a leftmost-longest automaton before pre-tokenizing).
struct AddedTokenMatcher {
    private struct Candidate { let bytes: [UInt8]; let id: Int; let lstrip: Bool; let rstrip: Bool }
    private var byFirstByte: [[Candidate]] = Array(repeating: [], count: 256)
    private var isFirstByte = [Bool](repeating: false, count: 256)

    init(_ tokens: [AddedToken]) {
        for t in tokens where !t.content.isEmpty {
            let bytes = Array(t.content.utf8)
            byFirstByte[Int(bytes[0])].append(Candidate(bytes: bytes, id: t.id, lstrip: t.lstrip, rstrip: t.rstrip))
            isFirstByte[Int(bytes[0])] = true
        }
        for b in 0..<256 { byFirstByte[b].sort { $0.bytes.count > $1.bytes.count } }
    }

    /// The next added token at or after `from`: its id and the byte range it covers (with stripped
    /// whitespace around it when the token asks for lstrip/rstrip).
    func nextMatch(_ p: UnsafePointer<UInt8>, from: Int, end: Int) -> (start: Int, end: Int, id: Int)? {
        var i = from
        while i < end {
            if isFirstByte[Int(p[i])] {
                for c in byFirstByte[Int(p[i])] where c.bytes.count <= end - i {
                    let matches = c.bytes.withUnsafeBufferPointer { memcmpBytes($0.baseAddress!, p + i, c.bytes.count) }
                    guard matches else { continue }
                    var s = i, e = i + c.bytes.count
                    if c.lstrip { while s > from, isASCIIWhitespace(p[s - 1]) { s -= 1 } }
                    if c.rstrip { while e < end, isASCIIWhitespace(p[e]) { e += 1 } }
                    return (s, e, c.id)
                }
            }
            i += 1
        }
        return nil
    }

    private func isASCIIWhitespace(_ b: UInt8) -> Bool { b == 0x20 || (b >= 0x09 && b <= 0x0D) }
}
