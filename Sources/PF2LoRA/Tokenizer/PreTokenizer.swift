/// The GPT-2 pre-tokenizer regex, written out as a scanner over UTF-8 bytes:
///
///     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
///
/// Alternatives are tried in order at each position (leftmost-first, as oniguruma does), so:
/// a lowercase ASCII contraction wins at an apostrophe; one optional U+0020 joins the run of letters,
/// digits or other characters that follows it; a run of whitespace followed by a non-space gives up
/// its last character (`\s+(?!\S)`), which then joins the next word if it is a space or stands alone.
/// Character classes come from `scalarClassPointer`, oniguruma's tables as Hugging Face ships them.
enum PreTokenizer {
    /// The pattern this scanner implements, as tokenizer.json files spell it in a Split.
    static let gpt2Pattern = #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#

    static var scalarClassPointer: UnsafePointer<UInt8> { scalarClassTable }

    /// Class and byte length of the scalar starting at `p[i]`; the bytes must be valid UTF-8.
    @inline(__always)
    static func scalarClass(_ p: UnsafePointer<UInt8>, _ i: Int, _ table: UnsafePointer<UInt8>) -> (UInt8, Int) {
        let b0 = UInt32(p[i])
        if b0 < 0x80 { return (table[Int(b0)], 1) }
        if b0 < 0xE0 {
            let cp = (b0 & 0x1F) << 6 | UInt32(p[i + 1] & 0x3F)
            return (table[Int(cp)], 2)
        }
        if b0 < 0xF0 {
            let cp = (b0 & 0x0F) << 12 | UInt32(p[i + 1] & 0x3F) << 6 | UInt32(p[i + 2] & 0x3F)
            return (table[Int(cp)], 3)
        }
        let cp = (b0 & 0x07) << 18 | UInt32(p[i + 1] & 0x3F) << 12 | UInt32(p[i + 2] & 0x3F) << 6 | UInt32(p[i + 3] & 0x3F)
        return (table[Int(cp)], 4)
    }

    /// End (exclusive) of the piece that starts at `i`, for text `p[..<end]`; `i < end`.
    @inline(__always)
    static func pieceEnd(_ p: UnsafePointer<UInt8>, _ i: Int, _ end: Int, _ table: UnsafePointer<UInt8>) -> Int {
        let b = p[i]
        // 's|'t|'re|'ve|'m|'ll|'d
        if b == 0x27 && i + 1 < end {
            let c = p[i + 1]
            if c == 0x73 || c == 0x74 || c == 0x6D || c == 0x64 { return i + 2 }  // s t m d
            if i + 2 < end {
                let d = p[i + 2]
                if (c == 0x72 && d == 0x65) || (c == 0x76 && d == 0x65) || (c == 0x6C && d == 0x6C) { return i + 3 }  // re ve ll
            }
        }
        var (cls, len) = scalarClass(p, i, table)
        var j = i
        // ' ?' before a letter, number or other run
        if b == 0x20 && i + 1 < end {
            let (c2, l2) = scalarClass(p, i + 1, table)
            if c2 != ScalarClass.whitespace.rawValue { j = i + 1; cls = c2; len = l2 }
        }
        if cls == ScalarClass.whitespace.rawValue {
            var k = i
            var last = i
            while k < end {
                let (c, l) = scalarClass(p, k, table)
                if c != cls { break }
                last = k
                k += l
            }
            if k == end { return end }           // \s+ up to the end of the text
            return last > i ? last : k           // \s+(?!\S) leaves the last one; else a lone \s
        }
        var k = j + len
        while k < end {
            let (c, l) = scalarClass(p, k, table)
            if c != cls { break }
            k += l
        }
        return k
    }

    /// The pieces of `text` as strings (for tests and debugging; encoding scans in place).
    static func split(_ text: String) -> [String] {
        var bytes = Array(text.utf8)
        var out: [String] = []
        bytes.withUnsafeMutableBufferPointer { buf in
            guard let p = buf.baseAddress else { return }
            var i = 0
            while i < buf.count {
                let e = pieceEnd(UnsafePointer(p), i, buf.count, scalarClassPointer)
                out.append(String(decoding: UnsafeBufferPointer(start: p + i, count: e - i), as: UTF8.self))
                i = e
            }
        }
        return out
    }
}
