/// Cache of pre-tokenized word (its bytes) -> token ids, with no allocation per lookup: keys and ids
/// live in two arenas, and an open-addressing table of entry indices finds them by a 64-bit hash.
/// When it holds `maxEntries` words it is emptied and starts again (text rarely needs more).
final class WordCache {
    private struct Entry {
        var hash: UInt64
        var keyStart: Int32
        var keyLength: Int32
        var idStart: Int32
        var idCount: Int32
    }

    let maxEntries: Int
    private let slots: UnsafeMutablePointer<Int32>
    private let mask: Int
    private var entries: [Entry] = []
    private var keyArena: [UInt8] = []
    private var idArena: [Int32] = []

    init(maxEntries: Int = 1 << 17) {
        self.maxEntries = maxEntries
        var size = 16
        while size < maxEntries * 2 { size <<= 1 }
        mask = size - 1
        slots = .allocate(capacity: size)
        slots.initialize(repeating: -1, count: size)
        entries.reserveCapacity(maxEntries)
    }

    deinit { slots.deallocate() }

    var count: Int { entries.count }

    func removeAll() {
        slots.update(repeating: -1, count: mask + 1)
        entries.removeAll(keepingCapacity: true)
        keyArena.removeAll(keepingCapacity: true)
        idArena.removeAll(keepingCapacity: true)
    }

    /// FNV-1a over the bytes, eight at a time, finished with a multiply-xorshift.
    @inline(__always) static func hash(_ p: UnsafePointer<UInt8>, _ n: Int) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325 ^ UInt64(n)
        var i = 0
        while i + 8 <= n {
            h = (h ^ UnsafeRawPointer(p + i).loadUnaligned(as: UInt64.self)) &* 0x0000_0100_0000_01B3
            h ^= h >> 29
            i += 8
        }
        var tail: UInt64 = 0
        var s: UInt64 = 0
        while i < n { tail |= UInt64(p[i]) << s; s += 8; i += 1 }
        h = (h ^ tail) &* 0x0000_0100_0000_01B3
        h ^= h >> 32
        h = h &* 0x9E37_79B9_7F4A_7C15
        return h ^ (h >> 29)
    }

    /// Appends the cached ids of the word to `out` and returns true, or returns false if not cached.
    @inline(__always) func lookup(_ p: UnsafePointer<UInt8>, _ n: Int, hash h: UInt64, into out: inout [Int]) -> Bool {
        var i = Int(truncatingIfNeeded: h) & mask
        while true {
            let e = Int(slots[i])
            if e < 0 { return false }
            let entry = entries[e]
            if entry.hash == h && Int(entry.keyLength) == n {
                let same = keyArena.withUnsafeBufferPointer { memcmpBytes($0.baseAddress! + Int(entry.keyStart), p, n) }
                if same {
                    idArena.withUnsafeBufferPointer { ids in
                        for k in Int(entry.idStart)..<Int(entry.idStart + entry.idCount) { out.append(Int(ids[k])) }
                    }
                    return true
                }
            }
            i = (i + 1) & mask
        }
    }

    func insert(_ p: UnsafePointer<UInt8>, _ n: Int, hash h: UInt64, ids: UnsafeBufferPointer<Int32>) {
        if entries.count >= maxEntries { removeAll() }
        var i = Int(truncatingIfNeeded: h) & mask
        while slots[i] >= 0 { i = (i + 1) & mask }
        slots[i] = Int32(entries.count)
        entries.append(Entry(hash: h, keyStart: Int32(keyArena.count), keyLength: Int32(n),
                             idStart: Int32(idArena.count), idCount: Int32(ids.count)))
        keyArena.append(contentsOf: UnsafeBufferPointer(start: p, count: n))
        idArena.append(contentsOf: ids)
    }
}

@inline(__always) func memcmpBytes(_ a: UnsafePointer<UInt8>, _ b: UnsafePointer<UInt8>, _ n: Int) -> Bool {
    var i = 0
    while i + 8 <= n {
        if UnsafeRawPointer(a + i).loadUnaligned(as: UInt64.self) != UnsafeRawPointer(b + i).loadUnaligned(as: UInt64.self) { return false }
        i += 8
    }
    while i < n {
        if a[i] != b[i] { return false }
        i += 1
    }
    return true
}
