/// Finds added tokens in text as Hugging Face's `AddedVocabulary` does: the leftmost match over all
/// tokens, the longest among those starting there (an Aho-Corasick automaton in HF, a byte trie
/// here), the search going on after each match. Then per token: `single_word` drops a match that
/// has a word character (`\w`) right before or after it; `lstrip` / `rstrip` widen the match over
/// the whitespace (`\s`) on that side, not reaching back into the previous match.
final class AddedTokenMatcher {
    private struct Token { let id: Int; let lstrip: Bool; let rstrip: Bool; let singleWord: Bool }
    private var tokens: [Token] = []
    private var edges: [Int: Int] = [:]      // node << 8 | byte -> child node
    private var terminal: [Int] = [-1]       // node -> index in tokens, or -1
    private var isFirstByte = [Bool](repeating: false, count: 256)

    var isEmpty: Bool { tokens.isEmpty }

    /// `normalize`: the tokens are matched in NFC-normalized text, so their content is normalized too.
    init(_ added: [AddedToken], normalize: Bool) {
        for t in added where !t.content.isEmpty {
            let content = normalize ? NFC.normalize(t.content) : t.content
            var node = 0
            for b in content.utf8 {
                let key = node << 8 | Int(b)
                if let child = edges[key] {
                    node = child
                } else {
                    terminal.append(-1)
                    edges[key] = terminal.count - 1
                    node = terminal.count - 1
                }
            }
            if terminal[node] >= 0 {
                tokens[terminal[node]] = Token(id: t.id, lstrip: t.lstrip, rstrip: t.rstrip, singleWord: t.singleWord)
            } else {
                terminal[node] = tokens.count
                tokens.append(Token(id: t.id, lstrip: t.lstrip, rstrip: t.rstrip, singleWord: t.singleWord))
            }
            isFirstByte[Int(content.utf8.first!)] = true
        }
    }

    /// Walks `p[from..<end]`: appends each added token's id to `out` and hands every stretch between
    /// them (and the text before the first and after the last) to `gap`.
    func split(_ p: UnsafePointer<UInt8>, _ from: Int, _ end: Int, into out: inout [Int],
               _ gap: (UnsafePointer<UInt8>, Int, inout [Int]) -> Void) {
        if tokens.isEmpty {
            if end > from { gap(p + from, end - from, &out) }
            return
        }
        var startOffset = from
        var i = from
        while i < end {
            guard isFirstByte[Int(p[i])] else { i += 1; continue }
            var node = 0, j = i, best = -1, bestEnd = i
            while j < end, let child = edges[node << 8 | Int(p[j])] {
                node = child
                j += 1
                if terminal[node] >= 0 { best = terminal[node]; bestEnd = j }
            }
            guard best >= 0 else { i += 1; continue }
            let token = tokens[best]
            var start = i, stop = bestEnd
            i = bestEnd
            if token.singleWord {
                let startSpace = start == from || !Self.isWordCharacter(Self.scalar(before: start, in: p))
                let stopSpace = stop == end || !Self.isWordCharacter(Self.scalar(at: stop, in: p))
                if !startSpace || !stopSpace { continue }
            }
            if token.lstrip {
                var s = start
                while s > from {
                    let (scalar, len) = Self.scalar(before: s, in: p)
                    guard scalar.properties.isWhitespace else { break }
                    s -= len
                }
                start = max(s, startOffset)
            }
            if token.rstrip {
                while stop < end {
                    let (scalar, len) = Self.scalar(at: stop, in: p)
                    guard scalar.properties.isWhitespace else { break }
                    stop += len
                }
            }
            if startOffset < start { gap(p + startOffset, start - startOffset, &out) }
            out.append(token.id)
            startOffset = stop
        }
        if startOffset < end { gap(p + startOffset, end - startOffset, &out) }
    }

    /// Rust regex's Unicode `\w`: alphabetic, marks, decimal digits, connector punctuation, joiners.
    private static func isWordCharacter(_ s: (Unicode.Scalar, Int)) -> Bool {
        let props = s.0.properties
        if props.isAlphabetic || props.isJoinControl { return true }
        switch props.generalCategory {
        case .nonspacingMark, .spacingMark, .enclosingMark, .decimalNumber, .connectorPunctuation: return true
        default: return false
        }
    }

    private static func scalar(at i: Int, in p: UnsafePointer<UInt8>) -> (Unicode.Scalar, Int) {
        let b0 = UInt32(p[i])
        if b0 < 0x80 { return (Unicode.Scalar(b0)!, 1) }
        if b0 < 0xE0 { return (Unicode.Scalar((b0 & 0x1F) << 6 | UInt32(p[i + 1] & 0x3F)) ?? "\u{FFFD}", 2) }
        if b0 < 0xF0 {
            return (Unicode.Scalar((b0 & 0x0F) << 12 | UInt32(p[i + 1] & 0x3F) << 6 | UInt32(p[i + 2] & 0x3F)) ?? "\u{FFFD}", 3)
        }
        let v = (b0 & 0x07) << 18 | UInt32(p[i + 1] & 0x3F) << 12 | UInt32(p[i + 2] & 0x3F) << 6 | UInt32(p[i + 3] & 0x3F)
        return (Unicode.Scalar(v) ?? "\u{FFFD}", 4)
    }

    private static func scalar(before i: Int, in p: UnsafePointer<UInt8>) -> (Unicode.Scalar, Int) {
        var s = i - 1
        while p[s] & 0xC0 == 0x80 { s -= 1 }
        return (scalar(at: s, in: p).0, i - s)
    }
}
