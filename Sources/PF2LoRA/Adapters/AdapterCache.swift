import Foundation

/// A least-recently-used cache of decompressed, validated adapters, bounded in bytes of f32 tensor
/// data, keyed by (level, client, version). Thread-safe: the server's threads share one.
///
/// Eviction scans for the oldest entry (O(entries)); with the few hundred adapters a server keeps
/// this costs far less than the load it saves. An adapter larger than the whole budget is returned
/// to the caller but not kept.
public final class AdapterCache: @unchecked Sendable {
    public struct Key: Hashable, Sendable, CustomStringConvertible {
        public let level: AdapterLevel
        public let client: String   // "" for the shared level
        public let version: Int

        public init(level: AdapterLevel, client: String?, version: Int) {
            self.level = level
            self.client = client ?? ""
            self.version = version
        }

        public var description: String { level == .shared ? "shared v\(version)" : "client \(client) v\(version)" }
    }

    public struct Stats: Sendable, Equatable {
        public var hits = 0, misses = 0, evictions = 0
        public var entries = 0, bytes = 0, capacityBytes = 0
    }

    private struct Entry {
        let adapter: LoRAAdapter
        let bytes: Int
        var lastUse: UInt64
    }

    private let lock = NSLock()
    private var entries: [Key: Entry] = [:]
    private var tick: UInt64 = 0
    private var stats = Stats()
    /// Clients whose adapters are never evicted (HTTP /v1/load_lora_adapter pins, unload unpins).
    private var pinned: Set<String> = []

    /// Keeps `client`'s adapters cached (they still count in the bytes; eviction skips them).
    public func pin(client: String) { lock.lock(); pinned.insert(client); lock.unlock() }
    public func unpin(client: String) { lock.lock(); pinned.remove(client); lock.unlock() }
    public func isPinned(client: String) -> Bool { lock.lock(); defer { lock.unlock() }; return pinned.contains(client) }

    /// A cache holding at most `capacityBytes` of adapter tensors (0 disables caching).
    public init(capacityBytes: Int) {
        stats.capacityBytes = max(0, capacityBytes)
    }

    /// The adapter under `key`, marking it most recently used; counts a hit or a miss.
    public func get(_ key: Key) -> LoRAAdapter? {
        lock.lock(); defer { lock.unlock() }
        tick += 1
        guard var e = entries[key] else { stats.misses += 1; return nil }
        stats.hits += 1
        e.lastUse = tick
        entries[key] = e
        return e.adapter
    }

    /// Whether `key` is cached, without touching the order or the counts.
    public func contains(_ key: Key) -> Bool {
        lock.lock(); defer { lock.unlock() }
        return entries[key] != nil
    }

    /// Adds (or replaces) `adapter` under `key`, then evicts least recently used entries until the
    /// total fits the capacity.
    public func put(_ key: Key, _ adapter: LoRAAdapter) {
        let bytes = adapter.byteCount
        lock.lock(); defer { lock.unlock() }
        if let old = entries.removeValue(forKey: key) { stats.bytes -= old.bytes }
        guard bytes <= stats.capacityBytes else { stats.entries = entries.count; return }
        tick += 1
        entries[key] = Entry(adapter: adapter, bytes: bytes, lastUse: tick)
        stats.bytes += bytes
        evictToFit()
    }

    /// Drops `key` (an `adapters.evict`); returns whether it was cached.
    @discardableResult public func remove(_ key: Key) -> Bool {
        lock.lock(); defer { lock.unlock() }
        guard let e = entries.removeValue(forKey: key) else { return false }
        stats.bytes -= e.bytes
        stats.entries = entries.count
        return true
    }

    /// Drops every entry for which `predicate` holds; returns how many.
    @discardableResult public func removeAll(where predicate: (Key) -> Bool) -> Int {
        lock.lock(); defer { lock.unlock() }
        let keys = entries.keys.filter(predicate)
        for k in keys { stats.bytes -= entries.removeValue(forKey: k)!.bytes }
        stats.entries = entries.count
        return keys.count
    }

    /// Changes the byte budget, evicting at once if it shrank.
    public func setCapacity(bytes: Int) {
        lock.lock(); defer { lock.unlock() }
        stats.capacityBytes = max(0, bytes)
        evictToFit()
    }

    public var currentStats: Stats {
        lock.lock(); defer { lock.unlock() }
        var s = stats
        s.entries = entries.count
        return s
    }

    /// The cached keys, most recently used first.
    public var keys: [Key] {
        lock.lock(); defer { lock.unlock() }
        return entries.sorted { $0.value.lastUse > $1.value.lastUse }.map(\.key)
    }

    private func evictToFit() {
        while stats.bytes > stats.capacityBytes,
              let victim = entries.filter({ $0.key.level != .client || !pinned.contains($0.key.client) }).min(by: { $0.value.lastUse < $1.value.lastUse }) {
            entries.removeValue(forKey: victim.key)
            stats.bytes -= victim.value.bytes
            stats.evictions += 1
        }
        stats.entries = entries.count
    }
}
