/// Merge ranks keyed by the pair of token ids: (left, right) -> (rank, merged id). Open addressing
/// with linear probing over a power-of-two table, keys packed as `left << 32 | right`, values as
/// `rank << 32 | merged`, so one probe reads two words and comparing values compares ranks.
final class MergeTable {
    static let none = UInt64.max

    private let keys: UnsafeMutablePointer<UInt64>
    private let values: UnsafeMutablePointer<UInt64>
    private let mask: Int
    private let shift: UInt64

    init(capacityFor count: Int) {
        var bits = 4
        while (1 << bits) < max(16, count * 2) { bits += 1 }
        let size = 1 << bits
        mask = size - 1
        shift = UInt64(64 - bits)
        keys = .allocate(capacity: size)
        keys.initialize(repeating: MergeTable.none, count: size)
        values = .allocate(capacity: size)
        values.initialize(repeating: MergeTable.none, count: size)
    }

    deinit {
        keys.deallocate()
        values.deallocate()
    }

    @inline(__always) private func slot(_ key: UInt64) -> Int {
        Int(truncatingIfNeeded: (key &* 0x9E37_79B9_7F4A_7C15) >> shift)
    }

    /// A later merge of the same pair replaces an earlier one, as a Hugging Face HashMap insert does.
    func insert(left: Int32, right: Int32, rank: Int, merged: Int32) {
        let key = UInt64(UInt32(bitPattern: left)) << 32 | UInt64(UInt32(bitPattern: right))
        var i = slot(key)
        while keys[i] != MergeTable.none && keys[i] != key { i = (i + 1) & mask }
        keys[i] = key
        values[i] = UInt64(rank) << 32 | UInt64(UInt32(bitPattern: merged))
    }

    /// `rank << 32 | merged`, or `MergeTable.none` if the pair does not merge.
    @inline(__always) func lookup(_ left: Int32, _ right: Int32) -> UInt64 {
        let key = UInt64(UInt32(bitPattern: left)) << 32 | UInt64(UInt32(bitPattern: right))
        var i = slot(key)
        while true {
            let k = keys[i]
            if k == key { return values[i] }
            if k == MergeTable.none { return MergeTable.none }
            i = (i + 1) & mask
        }
    }
}
