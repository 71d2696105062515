import Foundation

/// Client ids become folder names in the store, so only a small, safe set is accepted:
/// ASCII letters, digits, `_`, `-` and `.`, 1 to 64 characters, not starting with `.` (no hidden
/// names, no `.` or `..`), and none of the reserved names. Nothing is normalised or decoded: `%2e`
/// is just three characters (and `%` is not allowed), Unicode look-alikes are rejected, not folded.
public enum ClientID {
    public static let maxLength = 64
    /// Names the store uses itself, or that mean something to common file systems and tools.
    public static let reserved: Set<String> = ["shared", "clients", "manifest", "manifest.json", "lock",
                                               "con", "prn", "aux", "nul", "tmp"]

    public static let rule = "a client id is 1 to 64 characters from A-Z a-z 0-9 _ - . , must not start with '.', and must not be a reserved name (shared, clients, manifest, lock, con, prn, aux, nul, tmp)"

    /// Throws `AdapterStoreError.invalidClientID` unless `id` follows the rule.
    public static func validate(_ id: String) throws {
        func fail(_ why: String) -> AdapterStoreError { .invalidClientID(id: printable(id), why: why) }
        let bytes = Array(id.utf8)
        guard !bytes.isEmpty else { throw fail("it is empty") }
        guard bytes.count <= maxLength else { throw fail("it is \(bytes.count) bytes long") }
        for b in bytes {
            let ok = (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || (b >= 0x30 && b <= 0x39) || b == 0x5F || b == 0x2D || b == 0x2E
            guard ok else {
                if b >= 0x80 { throw fail("it contains a non-ASCII character") }
                throw fail("it contains the character \(b < 0x20 || b == 0x7f ? String(format: "0x%02x", b) : "'\(Character(UnicodeScalar(b)))'")")
            }
        }
        guard bytes[0] != 0x2E else { throw fail("it starts with '.'") }
        guard !reserved.contains(id.lowercased()) else { throw fail("'\(id)' is reserved") }
    }

    public static func isValid(_ id: String) -> Bool { (try? validate(id)) != nil }

    /// Up to `count` of `ids` closest to `id` by edit distance (at most a third of its length, at
    /// least 2; ties in `ids`' order), for "did you mean" hints. Scans at most 10,000 ids.
    public static func closest(to id: String, among ids: [String], count: Int) -> [String] {
        let a = Array(id.lowercased().utf8)
        let limit = max(2, a.count / 3)
        var scored: [(Int, Int, String)] = []
        for (i, other) in ids.prefix(10_000).enumerated() {
            let b = Array(other.lowercased().utf8)
            guard abs(a.count - b.count) <= limit else { continue }
            let d = editDistance(a, b)
            if d <= limit { scored.append((d, i, other)) }
        }
        return scored.sorted { ($0.0, $0.1) < ($1.0, $1.1) }.prefix(count).map(\.2)
    }

    /// Levenshtein distance of two byte strings.
    static func editDistance(_ a: [UInt8], _ b: [UInt8]) -> Int {
        guard !a.isEmpty else { return b.count }
        guard !b.isEmpty else { return a.count }
        var prev = Array(0...b.count), cur = prev
        for x in 1...a.count {
            cur[0] = x
            for y in 1...b.count { cur[y] = min(prev[y] + 1, cur[y - 1] + 1, prev[y - 1] + (a[x - 1] == b[y - 1] ? 0 : 1)) }
            swap(&prev, &cur)
        }
        return prev[b.count]
    }

    /// `id` with control characters escaped and cut to 80 characters, safe to print in an error.
    static func printable(_ id: String) -> String {
        var out = ""
        for u in id.unicodeScalars.prefix(80) {
            if u.value < 0x20 || u.value == 0x7f { out += String(format: "\\x%02x", u.value) } else { out.unicodeScalars.append(u) }
        }
        return id.unicodeScalars.count > 80 ? out + "…" : out
    }
}
