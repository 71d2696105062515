/// GPT-2's byte-level alphabet: every byte gets a printable Unicode character, so a vocabulary of
/// strings can spell any byte sequence. Printable Latin-1 bytes stand for themselves; the other 68
/// bytes (controls, space, soft hyphen ...) map to U+0100 and up, in byte order. Space becomes "Ġ".
enum ByteLevel {
    /// byte -> the scalar that spells it in vocabulary strings.
    static let byteToScalar: [Unicode.Scalar] = {
        var table = [Unicode.Scalar](repeating: "\0", count: 256)
        var next: UInt32 = 256
        for b in 0..<256 {
            let printable = (0x21...0x7E).contains(b) || (0xA1...0xAC).contains(b) || (0xAE...0xFF).contains(b)
            if printable {
                table[b] = Unicode.Scalar(UInt8(b))
            } else {
                table[b] = Unicode.Scalar(next)!
                next += 1
            }
        }
        return table
    }()

    /// scalar value -> byte, or -1 if the scalar is not part of the alphabet. Covers U+0000..U+0143.
    static let scalarToByte: [Int16] = {
        var table = [Int16](repeating: -1, count: 0x144)
        for (b, s) in byteToScalar.enumerated() { table[Int(s.value)] = Int16(b) }
        return table
    }()

    /// The bytes a vocabulary string stands for. As Hugging Face's ByteLevel decoder does, a string
    /// with any character outside the alphabet (an added token such as "<|endoftext|>" is inside it,
    /// but "<unk>" with a non-Latin name might not be) stands for its own UTF-8 bytes.
    static func bytes(ofToken token: String) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(token.utf8.count)
        for s in token.unicodeScalars {
            let v = Int(s.value)
            guard v < scalarToByte.count, scalarToByte[v] >= 0 else { return Array(token.utf8) }
            out.append(UInt8(scalarToByte[v]))
        }
        return out
    }

    /// The bytes a vocabulary string spells if every character is in the byte-level alphabet, else nil.
    static func bytesIfByteLevel(_ token: String) -> [UInt8]? {
        var out: [UInt8] = []
        out.reserveCapacity(token.utf8.count)
        for s in token.unicodeScalars {
            let v = Int(s.value)
            guard v < scalarToByte.count, scalarToByte[v] >= 0 else { return nil }
            out.append(UInt8(scalarToByte[v]))
        }
        return out
    }

    /// The vocabulary spelling of a byte sequence ("Ġhello" for " hello").
    static func token(ofBytes bytes: [UInt8]) -> String {
        var s = String.UnicodeScalarView()
        for b in bytes { s.append(byteToScalar[Int(b)]) }
        return String(s)
    }
}
