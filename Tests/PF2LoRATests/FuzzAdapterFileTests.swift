import Foundation
import Testing
@testable import PF2LoRA

/// Adapter-file fuzzing (issue 7, item 2), beyond AdapterFormatTests' one case per check:
/// seeded multi-bit flips of the compressed file, flips and truncations of the safetensors inside
/// (recompressed, so the zstd checksum does not hide them), truncation at every length of both,
/// hand-made hostile headers and metadata. Every input must either decode or throw an
/// `AdapterError` of the expected check; nothing else (no crash, no other error type). Run under
/// AddressSanitizer by `scripts/sanitize.sh address` to show no out-of-bounds read.
///
/// `PF2LORA_LONG=1` multiplies the random iterations by 50. `PF2LORA_FUZZ_SEEDS=dir` writes the
/// valid files used here as a seed corpus for the libFuzzer target (Fuzz/AdapterFuzzer.swift).
@Suite struct FuzzAdapterFileTests {
    let base = AdapterFixtures.base()
    static let scale = ProcessInfo.processInfo.environment["PF2LORA_LONG"] == "1" ? 50 : 1

    /// Decodes `d`: nil if it decodes, else its AdapterError; any other error is recorded as a failure.
    func outcome(_ d: Data, level: AdapterLevel? = nil) -> AdapterError? {
        do { _ = try LoRAAdapter.decode(from: d, name: "f", base: base, expectedLevel: level, sizeLimit: 1 << 20); return nil } catch let e as AdapterError {
            return e
        } catch {
            Issue.record("not an AdapterError: \(error)")
            return nil
        }
    }

    var samples: [LoRAAdapter] {
        var c = AdapterFixtures.adapter(base, level: .client, rank: 2, seed: 4, clientID: "bob")
        c.metadata.sharedVersion = 3
        return [AdapterFixtures.adapter(base, level: .shared, rank: 4), c,
                AdapterFixtures.adapter(base, level: .shared, rank: 1, seed: 2, modules: ["transformer.h.1.mlp.c_fc"], storage: .f16)]
    }

    @Test func writeSeedCorpus() throws {
        guard let dir = ProcessInfo.processInfo.environment["PF2LORA_FUZZ_SEEDS"] else { return }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for (i, a) in samples.enumerated() {
            try a.encode().write(to: URL(fileURLWithPath: "\(dir)/adapter\(i).safetensors.zst"))
            try a.safetensors().write(to: URL(fileURLWithPath: "\(dir)/adapter\(i).safetensors"))
        }
    }

    /// 1..8 random bit flips anywhere in the compressed file: refused at the frame (check 1 or 2),
    /// or, when zstd ignores the flipped bits, decoded to exactly the original.
    @Test func randomFlipsOfTheCompressedFile() throws {
        var rng = RNG(seed: 21)
        var tried = 0, refused = 0
        for a in samples {
            let good = try a.encode()
            for _ in 0..<(400 * Self.scale) {
                var bad = good
                var flips: [(Int, Int)] = []
                for _ in 0..<Int.random(in: 1...8, using: &rng) {
                    let pos = Int.random(in: 0..<bad.count, using: &rng), bit = Int.random(in: 0..<8, using: &rng)
                    bad[pos] ^= UInt8(1 << bit)
                    flips.append((pos, bit))
                }
                tried += 1
                if let e = outcome(bad) {
                    refused += 1
                    #expect((e.check ?? 99) <= 2, "flips got past the frame: \(e)")
                } else {
                    // Compared with the good file decoded (the f16 sample is not bit-equal to its f32 source).
                    let back = try LoRAAdapter.decode(from: bad, name: "f", base: base)
                    let rawSame = (try? Zstd.decompress(bad, limit: 1 << 20)) == (try? Zstd.decompress(good, limit: 1 << 20))
                    let original = try LoRAAdapter.decode(from: good, name: "f", base: base)
                    #expect(rawSame && AdapterFixtures.assertSame(back, original),
                            "flips \(flips) of \(good.count) bytes decoded to a different adapter")
                }
            }
        }
        #expect(refused > tried * 9 / 10)
        FuzzReport.append("adapter fuzz: \(tried) compressed files with 1-8 bit flips, \(refused) refused at check 1-2, \(tried - refused) decoded identical")
    }

    /// Every prefix of a compressed file (every length class: 0..64 one by one, then a stride) is
    /// refused at check 1, as truncated (or not zstd when the magic itself is cut).
    @Test func everyTruncationOfTheCompressedFile() throws {
        for a in samples {
            let good = try a.encode()
            var lengths = Array(0..<min(65, good.count))
            lengths += stride(from: 65, to: good.count, by: max(1, good.count / (200 * Self.scale)))
            lengths += [good.count - 2, good.count - 1]
            for n in lengths {
                let e = outcome(good.prefix(n))
                #expect(e?.check == 1, "cut at \(n) of \(good.count): \(String(describing: e))")
                if n >= 4, case .notZstdFrame? = e { Issue.record("cut at \(n) reported as not zstd") }
            }
            // And one byte too many, or a second frame after the first.
            #expect(outcome(good + Data([0]))?.check == 1)
            #expect(outcome(good + good)?.check == 1)
        }
    }

    /// Flips and truncations of the safetensors inside, recompressed: the checksum is right, so the
    /// header, dtype, metadata, name, pair, shape and value checks must catch what the flip broke.
    @Test func flipsAndCutsOfTheSafetensorsInside() throws {
        var rng = RNG(seed: 22)
        var tried = 0, decoded = 0
        var checks: [Int: Int] = [:]
        for a in samples {
            let raw = a.safetensors()
            let headerEnd = 8 + Int(raw.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
            for _ in 0..<(300 * Self.scale) {
                var bad = raw
                // Mostly in the length field and the header, where the structure is.
                let hi = Int.random(in: 0..<4, using: &rng) == 0 ? raw.count : headerEnd
                for _ in 0..<Int.random(in: 1...4, using: &rng) { bad[Int.random(in: 0..<hi, using: &rng)] ^= UInt8(1 << Int.random(in: 0..<8, using: &rng)) }
                tried += 1
                if let e = outcome(try Zstd.compress(bad)) { checks[e.check ?? 0, default: 0] += 1; #expect(e.check != nil && e.check! >= 3) } else { decoded += 1 }
            }
            // Every prefix of the header, a stride through the data: check 3 (header or data bounds).
            for n in Array(0..<headerEnd) + Array(stride(from: headerEnd, to: raw.count, by: max(1, raw.count / 100))) {
                let e = outcome(try Zstd.compress(raw.prefix(n)))
                #expect(e?.check == 3, "safetensors cut at \(n) of \(raw.count): \(String(describing: e))")
                tried += 1
            }
        }
        #expect(checks.count >= 3, "flips reached several checks: \(checks)")
        FuzzReport.append("adapter fuzz: \(tried) recompressed safetensors (flips + every header cut); refusals by check \(checks.sorted { $0.key < $1.key }); \(decoded) decoded (flips in data or ignored bytes)")
    }

    /// The safetensors file around hand-written headers.
    static func file(header: String, lengthField: UInt64? = nil, data: Data = Data(count: 64)) -> Data {
        var h = Array(header.utf8)
        while (h.count + 8) % 8 != 0 { h.append(0x20) }
        var n = (lengthField ?? UInt64(h.count)).littleEndian
        var out = Data(bytes: &n, count: 8)
        out.append(contentsOf: h)
        out.append(data)
        return out
    }

    @Test func hostileHeaders() throws {
        let meta = #""__metadata__":{"format_version":"1","level":"shared","rank":"1","alpha":"1","use_rslora":"false","dtype":"f32","base_fingerprint":"0123456789abcdef"}"#
        let t = "base_model.model.transformer.h.0.attn.c_proj"
        func two(_ a: String, _ b: String) -> String { "{\(meta),\"\(t).lora_A.weight\":\(a),\"\(t).lora_B.weight\":\(b)}" }
        let okA = #"{"dtype":"F32","shape":[1,8],"data_offsets":[0,32]}"#, okB = #"{"dtype":"F32","shape":[8,1],"data_offsets":[32,64]}"#
        // The control: this header decodes.
        #expect(outcome(try Zstd.compress(Self.file(header: two(okA, okB)))) == nil)
        let check3: [Data] = [
            Self.file(header: two(okA, okB), lengthField: 0),
            Self.file(header: two(okA, okB), lengthField: 1),
            Self.file(header: two(okA, okB), lengthField: 1 << 63),
            Self.file(header: two(okA, okB), lengthField: UInt64.max),
            Self.file(header: two(okA, okB), lengthField: UInt64(two(okA, okB).utf8.count + 1_000)),
            Self.file(header: "[]"), Self.file(header: "\"x\""), Self.file(header: "{"), Self.file(header: "{\"a\":1e400}"),
            Self.file(header: "{\"__metadata__\":[1]}"), Self.file(header: "{\"__metadata__\":{\"rank\":1}}"),
            Self.file(header: String(repeating: "[", count: 100_000)),
            Self.file(header: two(#"{"dtype":"F64","shape":[1,8],"data_offsets":[0,64]}"#, okB)),
            Self.file(header: two(#"{"dtype":"I8","shape":[1,8],"data_offsets":[0,8]}"#, okB)),
            Self.file(header: two(#"{"dtype":7,"shape":[1,8],"data_offsets":[0,32]}"#, okB)),
            Self.file(header: two(#"{"shape":[1,8],"data_offsets":[0,32]}"#, okB)),
            Self.file(header: two(#"{"dtype":"F32","shape":[-1,8],"data_offsets":[0,32]}"#, okB)),
            Self.file(header: two(#"{"dtype":"F32","shape":[1.5,8],"data_offsets":[0,32]}"#, okB)),
            Self.file(header: two(#"{"dtype":"F32","shape":"1,8","data_offsets":[0,32]}"#, okB)),
            Self.file(header: two(#"{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,32]}"#, okB)),
            Self.file(header: two(#"{"dtype":"F32","shape":[3037000500,3037000500],"data_offsets":[0,32]}"#, okB)),
            Self.file(header: two(#"{"dtype":"F32","shape":[1,8],"data_offsets":[32,0]}"#, okB)),
            Self.file(header: two(#"{"dtype":"F32","shape":[1,8],"data_offsets":[-32,0]}"#, okB)),
            Self.file(header: two(#"{"dtype":"F32","shape":[1,8],"data_offsets":[0,32,64]}"#, okB)),
            Self.file(header: two(#"{"dtype":"F32","shape":[1,8],"data_offsets":[0,31]}"#, okB)),
            Self.file(header: two(#"{"dtype":"F32","shape":[1,8],"data_offsets":[9223372036854775000,9223372036854775032]}"#, okB)),
            Self.file(header: two(#"{"dtype":"F32","shape":[1,8],"data_offsets":[64,96]}"#, okB)),
            Self.file(header: two(#"{"dtype":"F32","shape":[1,8],"data_offsets":[0,32]}"#, #"{"dtype":"F32","shape":[8,1],"data_offsets":[32,64]}"#), data: Data(count: 63)),
            Self.file(header: two(okA, "7")),
        ]
        for (i, d) in check3.enumerated() {
            let e = outcome(try Zstd.compress(d))
            #expect(e?.check == 3, "hostile header \(i): \(String(describing: e))")
        }
        // Overlapping tensors (both views of the same bytes) are not out of bounds: they decode.
        #expect(outcome(try Zstd.compress(Self.file(header: two(#"{"dtype":"F32","shape":[1,8],"data_offsets":[0,32]}"#, #"{"dtype":"F32","shape":[8,1],"data_offsets":[0,32]}"#)))) == nil)
        // Shapes that fit the file but not the base or the rank: check 9. Empty and scalar shapes too.
        for (a, b) in [(#"{"dtype":"F32","shape":[0,8],"data_offsets":[0,0]}"#, okB), (#"{"dtype":"F32","shape":[],"data_offsets":[0,4]}"#, okB),
                       (#"{"dtype":"F32","shape":[8],"data_offsets":[0,32]}"#, okB), (#"{"dtype":"F32","shape":[1,1,8],"data_offsets":[0,32]}"#, okB),
                       (okA, #"{"dtype":"F32","shape":[1,8],"data_offsets":[32,64]}"#)] {
            #expect(outcome(try Zstd.compress(Self.file(header: two(a, b))))?.check == 9, "\(a) \(b)")
        }
        // Metadata values out of range: check 5.
        for (k, v) in [("rank", "0"), ("rank", "-1"), ("rank", "65537"), ("rank", "1e3"), ("rank", " 1"), ("alpha", "nan"), ("alpha", "inf"),
                       ("alpha", ""), ("level", ""), ("level", "SHARED"), ("format_version", "0"), ("format_version", "1.0"),
                       ("dtype", "F32"), ("use_rslora", "1"), ("shared_version", "0"), ("shared_version", "x")] {
            let m = meta.replacingOccurrences(of: "}", with: ",\"\(k)\":\"\(v)\"}")
            // A later duplicate key wins in JSON objects as parsed here; make sure by building it fresh.
            var dict = (try JSONSerialization.jsonObject(with: Data(("{" + m + "}").utf8)) as! [String: Any])["__metadata__"] as! [String: String]
            dict[k] = v
            let mj = String(decoding: try JSONSerialization.data(withJSONObject: dict, options: .sortedKeys), as: UTF8.self)
            let h = "{\"__metadata__\":\(mj),\"\(t).lora_A.weight\":\(okA),\"\(t).lora_B.weight\":\(okB)}"
            #expect(outcome(try Zstd.compress(Self.file(header: h)))?.check == 5, "\(k)=\(v)")
        }
    }

    /// zstd-level oddities: no content size, a frame that claims far more than the limit, a
    /// decompression bomb, skippable frames, a dictionary id the decoder does not have.
    @Test func hostileFrames() throws {
        let good = try samples[0].encode()
        // A frame whose content-size field is all ones: refused at the size bound or as corrupt, never allocated.
        var claim = good
        let fhd = claim[4]
        let single = (fhd & 0x20) != 0
        let off = 5 + (single ? 0 : 1) + [0, 1, 2, 4][Int(fhd & 3)]
        let fcsBytes = [single ? 1 : 0, 2, 4, 8][Int(fhd >> 6)]
        #expect(fcsBytes > 0)
        for i in 0..<fcsBytes { claim[off + i] = 0xFF }
        #expect([1, 2].contains(outcome(claim)?.check ?? 0))
        // A bomb: 8 MiB of zeros compresses to a few hundred bytes; the 1 MiB bound refuses it.
        let bomb = try Zstd.compress(Data(count: 8 << 20))
        #expect(bomb.count < 2_000)
        guard case .tooLarge? = outcome(bomb) else { Issue.record("bomb not refused at the size bound"); return }
        // A skippable frame (magic 0x184D2A5?) is not an adapter frame.
        #expect(outcome(Data([0x50, 0x2A, 0x4D, 0x18, 4, 0, 0, 0, 1, 2, 3, 4]) + good)?.check == 1)
        // The magic alone, and the magic with a random header.
        #expect(outcome(Data([0x28, 0xB5, 0x2F, 0xFD]))?.check == 1)
        var rng = RNG(seed: 23)
        for _ in 0..<(500 * Self.scale) {
            var d = Data([0x28, 0xB5, 0x2F, 0xFD])
            d += Data((0..<Int.random(in: 0..<64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) })
            #expect(outcome(d) != nil)
        }
    }
}
