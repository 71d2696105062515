/// The Llama-3 / Qwen2 pre-tokenizer regex (tiktoken's cl100k pattern), written out as a scanner over
/// UTF-8 bytes like GPT-2's (`PreTokenizer`):
///
///     (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
///
/// with `\p{N}{1,3}` (Llama-3) or `\p{N}` (Qwen2). `SplitRegex` matches the same pattern in general;
/// this is the same result, several times faster, and the tests hold the two to each other and to
/// Hugging Face. Alternatives in order (leftmost-first), at each position:
/// 1. an apostrophe and a contraction in any case (`(?i)` folds U+017F "ſ" to s, as oniguruma does);
/// 2. letters, with one character before them that is not a newline, letter or number (" word", "'tis");
/// 3. one to `maxDigits` numbers;
/// 4. an optional space, a run of other characters, and any newlines right after them;
/// 5. whitespace up to and including its last newline;
/// 6. whitespace not followed by a non-space: a run before a word gives up its last character;
/// 7. any other whitespace.
enum LlamaPreTokenizer {
    static let llama3Pattern = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
    static let qwen2Pattern = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    /// The digit limit of a pattern this scanner implements, or nil.
    static func maxDigits(ofPattern pattern: String) -> Int? {
        pattern == llama3Pattern ? 3 : pattern == qwen2Pattern ? 1 : nil
    }

    private static let other = ScalarClass.other.rawValue, letter = ScalarClass.letter.rawValue
    private static let number = ScalarClass.number.rawValue, space = ScalarClass.whitespace.rawValue

    @inline(__always) private static func lower(_ b: UInt8) -> UInt8 { b | 0x20 }

    /// End (exclusive) of the piece that starts at `i`, for text `p[..<end]`; `i < end`.
    @inline(__always)
    static func pieceEnd(_ p: UnsafePointer<UInt8>, _ i: Int, _ end: Int, _ table: UnsafePointer<UInt8>, maxDigits: Int) -> Int {
        let b = p[i]
        // 1. (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if b == 0x27 && i + 1 < end {
            let c = lower(p[i + 1])
            if c == 0x73 || c == 0x74 || c == 0x6D || c == 0x64 { return i + 2 }           // s t m d
            if p[i + 1] == 0xC5 && i + 2 < end && p[i + 2] == 0xBF { return i + 3 }       // ſ (U+017F)
            if i + 2 < end {
                let d = lower(p[i + 2])
                if (c == 0x72 && d == 0x65) || (c == 0x76 && d == 0x65) || (c == 0x6C && d == 0x6C) { return i + 3 }  // re ve ll
            }
        }
        let (cls, len) = PreTokenizer.scalarClass(p, i, table)
        // 2. [^\r\n\p{L}\p{N}]?\p{L}+
        var j = -1
        if cls == letter {
            j = i
        } else if cls != number && b != 0x0D && b != 0x0A && i + len < end && PreTokenizer.scalarClass(p, i + len, table).0 == letter {
            j = i + len
        }
        if j >= 0 {
            var k = j
            while k < end {
                let (c, l) = PreTokenizer.scalarClass(p, k, table)
                if c != letter { break }
                k += l
            }
            return k
        }
        // 3. \p{N}{1,maxDigits}
        if cls == number {
            var k = i + len, n = 1
            while n < maxDigits && k < end {
                let (c, l) = PreTokenizer.scalarClass(p, k, table)
                if c != number { break }
                k += l
                n += 1
            }
            return k
        }
        // 4. ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        var start = -1
        if cls == other {
            start = i
        } else if b == 0x20 && i + 1 < end && PreTokenizer.scalarClass(p, i + 1, table).0 == other {
            start = i + 1
        }
        if start >= 0 {
            var k = start
            while k < end {
                let (c, l) = PreTokenizer.scalarClass(p, k, table)
                if c != other { break }
                k += l
            }
            while k < end && (p[k] == 0x0D || p[k] == 0x0A) { k += 1 }
            return k
        }
        // Whitespace from here on: its run is [i, w), lastNewline the end of its last \r or \n.
        var w = i, lastNewline = -1, previous = i
        while w < end {
            let (c, l) = PreTokenizer.scalarClass(p, w, table)
            if c != space { break }
            if p[w] == 0x0D || p[w] == 0x0A { lastNewline = w + 1 }
            previous = w
            w += l
        }
        // 5. \s*[\r\n]+
        if lastNewline > 0 { return lastNewline }
        // 6. \s+(?!\S)
        if w == end { return end }
        if previous > i { return previous }
        // 7. \s+
        return w
    }

    /// The pieces of `text` as strings (for tests and debugging; encoding scans in place).
    static func split(_ text: String, maxDigits: Int) -> [String] {
        var bytes = Array(text.utf8)
        var out: [String] = []
        bytes.withUnsafeMutableBufferPointer { buf in
            guard let p = buf.baseAddress else { return }
            var i = 0
            while i < buf.count {
                let e = pieceEnd(UnsafePointer(p), i, buf.count, PreTokenizer.scalarClassPointer, maxDigits: maxDigits)
                out.append(String(decoding: UnsafeBufferPointer(start: p + i, count: e - i), as: UTF8.self))
                i = e
            }
        }
        return out
    }
}
