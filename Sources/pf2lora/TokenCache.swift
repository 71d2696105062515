import Foundation
import PF2LoRA

/// A cache of tokenized client folders for `federate --token-cache DIR`: an experiment that runs
/// many federations on the same data tokenizes it once (tokenizing the fortune clients takes about
/// 25 s of one core). The key hashes (FNV-1a 64) the bytes of every split file read and of the
/// model's tokenizer files, so any change to the data or the tokenizer misses the cache. Entries are
/// written atomically (temporary file, then rename); an unreadable entry is ignored and rewritten.
enum TokenCache {
    static func load(folder: String, modelFolder: String, tokenizer: BPETokenizer, clients: [String]?,
                     cacheDir: String) throws -> [ClientTokenData] {
        let key = try cacheKey(folder: folder, modelFolder: modelFolder, clients: clients)
        let path = cacheDir + "/" + String(key, radix: 16) + ".tokens"
        if let data = FileManager.default.contents(atPath: path), let cached = decode(data) { return cached }
        let loaded = try loadClientData(folder: folder, tokenizer: tokenizer, clients: clients)
        try FileManager.default.createDirectory(atPath: cacheDir, withIntermediateDirectories: true)
        let tmp = path + ".tmp\(getpid())"
        try encode(loaded).write(to: URL(fileURLWithPath: tmp))
        if rename(tmp, path) != 0 { try? FileManager.default.removeItem(atPath: tmp) }
        return loaded
    }

    static func cacheKey(folder: String, modelFolder: String, clients: [String]?) throws -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        func mix(_ bytes: Data) { for b in bytes { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 } }
        let fm = FileManager.default
        for f in ["tokenizer.json", "vocab.json", "merges.txt"] {
            if let d = fm.contents(atPath: modelFolder + "/" + f) { mix(Data(f.utf8)); mix(d) }
        }
        let names = ((try? fm.contentsOfDirectory(atPath: folder)) ?? []).filter { !$0.hasPrefix(".") }.sorted()
        mix(Data((clients?.joined(separator: ",") ?? "*").utf8))
        for n in names {
            for s in ["train", "valid", "test"] {
                for ext in ["jsonl", "json", "txt"] {
                    let p = "\(folder)/\(n)/\(s).\(ext)"
                    if let d = fm.contents(atPath: p) { mix(Data(p.utf8)); mix(d) }
                }
            }
        }
        return h
    }

    private static func encode(_ clients: [ClientTokenData]) -> Data {
        var out = Data("PF2TOK1\n".utf8)
        func int(_ v: Int) { var x = Int64(v).littleEndian; withUnsafeBytes(of: &x) { out.append(contentsOf: $0) } }
        int(clients.count)
        for c in clients {
            let id = Data(c.id.utf8)
            int(id.count); out.append(id)
            for s in [c.train, c.valid, c.test] {
                int(s.textCount); int(s.tokens.count)
                s.tokens.withUnsafeBytes { out.append(contentsOf: $0) }
            }
        }
        return out
    }

    private static func decode(_ data: Data) -> [ClientTokenData]? {
        let magic = Data("PF2TOK1\n".utf8)
        guard data.count >= magic.count + 8, data.prefix(magic.count) == magic else { return nil }
        var pos = magic.count
        func int() -> Int? {
            guard pos + 8 <= data.count else { return nil }
            let v = data.subdata(in: pos..<pos + 8).withUnsafeBytes { $0.loadUnaligned(as: Int64.self) }
            pos += 8
            return Int(Int64(littleEndian: v))
        }
        guard let n = int(), n >= 0, n < 1_000_000 else { return nil }
        var out: [ClientTokenData] = []
        for _ in 0..<n {
            guard let len = int(), len >= 0, pos + len <= data.count,
                  let id = String(data: data.subdata(in: pos..<pos + len), encoding: .utf8) else { return nil }
            pos += len
            var streams: [TokenStream] = []
            for _ in 0..<3 {
                guard let texts = int(), let count = int(), count >= 0, pos + 4 * count <= data.count else { return nil }
                let tokens = data.subdata(in: pos..<pos + 4 * count).withUnsafeBytes { Array($0.bindMemory(to: Int32.self)) }
                pos += 4 * count
                streams.append(TokenStream(tokens: tokens, textCount: texts))
            }
            out.append(ClientTokenData(id: id, train: streams[0], valid: streams[1], test: streams[2]))
        }
        return pos == data.count ? out : nil
    }
}
