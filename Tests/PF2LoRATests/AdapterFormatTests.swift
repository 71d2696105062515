import Foundation
import Testing
@testable import PF2LoRA

@Suite struct AdapterFormatTests {
    let base = AdapterFixtures.base()

    func decode(_ d: Data, base b: BaseModelInfo? = nil, level: AdapterLevel? = nil, limit: Int = LoRAAdapter.defaultSizeLimit) throws -> LoRAAdapter {
        try LoRAAdapter.decode(from: d, name: "f", base: b ?? base, expectedLevel: level, sizeLimit: limit)
    }

    /// The error decoding `d` throws, or nil if it decodes.
    func failure(_ d: Data, base b: BaseModelInfo? = nil, level: AdapterLevel? = nil, limit: Int = LoRAAdapter.defaultSizeLimit) -> AdapterError? {
        do { _ = try decode(d, base: b, level: level, limit: limit); return nil } catch let e as AdapterError { return e } catch {
            Issue.record("unexpected error type: \(error)")
            return nil
        }
    }

    @Test func roundTripSharedAndClient() throws {
        let s = AdapterFixtures.adapter(base, level: .shared, rank: 4, alpha: 8)
        let back = try decode(s.encode(), level: .shared)
        #expect(AdapterFixtures.assertSame(s, back))
        #expect(back.scale == 2)
        #expect(back.metadata.baseFingerprint == base.fingerprint)
        #expect(back.targetModules == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
        var c = AdapterFixtures.adapter(base, level: .client, rank: 2, alpha: 4, seed: 9, clientID: "bob", rslora: true)
        c.metadata.sharedVersion = 12
        let cb = try decode(c.encode(), level: .client)
        #expect(AdapterFixtures.assertSame(c, cb))
        #expect(cb.metadata.clientID == "bob")
        #expect(cb.metadata.sharedVersion == 12)
        #expect(abs(cb.scale - 4 / Float(2).squareRoot()) < 1e-6)
        let raw = c.safetensors()
        let f = try raw.withUnsafeBytes { try SafeTensorsFile(bytes: $0, owner: raw as NSData, name: "raw") }
        #expect(f.tensors["base_model.model.transformer.h.0.attn.c_attn.lora_C.weight"]?.shape == [2, 8])
        #expect(f.tensors["base_model.model.transformer.h.0.attn.c_attn.lora_D.weight"]?.shape == [24, 2])
        #expect(f.metadata["level"] == "client" && f.metadata["use_rslora"] == "true" && f.metadata["shared_version"] == "12")
    }

    @Test func roundTripF16Storage() throws {
        let s = AdapterFixtures.adapter(base, level: .shared, rank: 4, storage: .f16)
        let back = try decode(s.encode())
        #expect(back.metadata.storage == .f16)
        #expect(AdapterFixtures.assertSame(s, back, tol: 1e-3))
        #expect(try s.encode().count < AdapterFixtures.adapter(base, level: .shared, rank: 4).encode().count)
    }

    @Test func check1NotZstdTruncatedBitFlips() throws {
        let s = AdapterFixtures.adapter(base, level: .shared, rank: 4)
        let good = try s.encode()
        #expect(failure(s.safetensors()) == .notZstdFrame(file: "f"))
        #expect(failure(Data()) == .notZstdFrame(file: "f"))
        for len in [2, 4, 7, 12, 20, good.count / 3, good.count / 2, good.count - 9, good.count - 1] {
            #expect(failure(good.prefix(len)) == .truncatedFrame(file: "f", size: len), "cut at \(len)")
        }
        var flips = 0
        for pos in stride(from: 0, to: good.count, by: max(1, good.count / 60)) {
            var bad = good
            bad[pos] ^= 0x10
            let e = failure(bad)
            if e == nil {
                // A flip of a bit zstd ignores (an unused header bit, padding in a bitstream) may
                // decode, but then, as the content checksum guarantees, to the very same bytes.
                #expect(AdapterFixtures.assertSame(try decode(bad), s))
            }
            if let c = e?.check { #expect(c <= 2, "flip at \(pos) got past the frame: \(e!)") }
            flips += 1
        }
        #expect(flips > 50)
    }

    @Test func check2SizeBound() throws {
        let good = try AdapterFixtures.adapter(base, level: .shared, rank: 4).encode()
        guard case .tooLarge(_, _, 1000)? = failure(good, limit: 1000) else { Issue.record("no size bound error"); return }
    }

    @Test func check3SafetensorsHeader() throws {
        var junk = Data(count: 16)
        junk[0] = 0xff; junk[1] = 0xff   // header length far past the end
        #expect(failure(try Zstd.compress(junk))?.check == 3)
        #expect(failure(try Zstd.compress(Data([1, 2, 3])))?.check == 3)
        // A header length with the top bit set must not be read as a small one.
        var good = AdapterFixtures.adapter(base, level: .shared, rank: 4).safetensors()
        good[7] |= 0x80
        #expect(failure(try Zstd.compress(good))?.check == 3)
        let s = AdapterFixtures.adapter(base, level: .shared, rank: 4)
        let cut = s.safetensors().dropLast(100)   // data section shorter than the header says
        #expect(failure(try Zstd.compress(cut))?.check == 3)
    }

    @Test func check4DType() throws {
        let s = AdapterFixtures.adapter(base, level: .shared, rank: 4)
        let bf = try AdapterFixtures.crafted(s, dtype: .bf16)
        guard case .badDType(_, _, "BF16")? = failure(bf) else { Issue.record("bf16 accepted"); return }
        // f16 tensors under a metadata that says f32
        let mixed = try AdapterFixtures.crafted(s, dtype: .f16)
        #expect(failure(mixed) == .badMetadata(file: "f", key: "dtype", value: "f32", why: "disagrees with the tensors, which are F16"))
    }

    @Test func check5Metadata() throws {
        let s = AdapterFixtures.adapter(base, level: .shared, rank: 4)
        #expect(failure(try AdapterFixtures.crafted(s, editMeta: { $0["rank"] = nil })) == .missingMetadata(file: "f", key: "rank"))
        #expect(failure(try AdapterFixtures.crafted(s, editMeta: { $0 = [:] })) == .missingMetadata(file: "f", key: "format_version"))
        #expect(failure(try AdapterFixtures.crafted(s, editMeta: { $0["alpha"] = "lots" }))?.check == 5)
        #expect(failure(try AdapterFixtures.crafted(s, editMeta: { $0["format_version"] = "2" }))?.check == 5)
        #expect(failure(try AdapterFixtures.crafted(s, editMeta: { $0["level"] = "both" }))?.check == 5)
        let c = AdapterFixtures.adapter(base, level: .client, rank: 2)
        #expect(failure(try AdapterFixtures.crafted(c, editMeta: { $0["client_id"] = "../x" }))?.check == 5)
    }

    @Test func check6Level() throws {
        let s = try AdapterFixtures.adapter(base, level: .shared, rank: 4).encode()
        #expect(failure(s, level: .client) == .levelMismatch(file: "f", found: "shared", expected: "client"))
        #expect(failure(s, level: .shared) == nil)
    }

    @Test func check7TensorNames() throws {
        let s = AdapterFixtures.adapter(base, level: .shared, rank: 4)
        let extra = try AdapterFixtures.crafted(s, editTensors: { $0["base_model.model.transformer.h.7.attn.c_attn.lora_A.weight"] = Tensor(zeros: [4, 8]) })
        #expect(failure(extra)?.check == 7)
        let wrongHalf = try AdapterFixtures.crafted(s, editTensors: { $0["base_model.model.transformer.h.0.attn.c_attn.lora_C.weight"] = Tensor(zeros: [4, 8]) })
        #expect(failure(wrongHalf)?.check == 7)
        let stray = try AdapterFixtures.crafted(s, editTensors: { $0["lm_head.weight"] = Tensor(zeros: [1]) })
        #expect(failure(stray)?.check == 7)
        let none = try AdapterFixtures.crafted(s, editTensors: { $0 = [:] })
        #expect(failure(none) == .empty(file: "f"))
    }

    @Test func check8Pairs() throws {
        let s = AdapterFixtures.adapter(base, level: .shared, rank: 4)
        let half = try AdapterFixtures.crafted(s, editTensors: { $0["base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"] = nil })
        #expect(failure(half) == .incompletePair(file: "f", module: "transformer.h.1.mlp.c_fc", missing: "lora_B"))
    }

    @Test func check9Shapes() throws {
        let s = AdapterFixtures.adapter(base, level: .shared, rank: 4)
        // metadata rank disagrees with the tensors
        guard case .shapeMismatch(_, _, [4, 8], [3, 8], _)? = failure(try AdapterFixtures.crafted(s, editMeta: { $0["rank"] = "3" })) else {
            Issue.record("rank mismatch not caught"); return
        }
        // made for a wider model, same fingerprint
        let wide = AdapterFixtures.base(c: 16)
        #expect(failure(try AdapterFixtures.adapter(wide, level: .shared, rank: 4).encode())?.check == 9)
        // a transposed B
        let t = try AdapterFixtures.crafted(s, editTensors: { $0["base_model.model.transformer.h.0.attn.c_proj.lora_B.weight"] = Tensor(zeros: [4, 8]) })
        #expect(failure(t)?.check == 9)
    }

    @Test func check10Fingerprint() throws {
        let other = AdapterFixtures.base(name: "other", fingerprint: "fedcba9876543210")
        let a = try AdapterFixtures.adapter(other, level: .shared, rank: 4).encode()
        #expect(failure(a) == .fingerprintMismatch(file: "f", adapterBase: "other", adapterFingerprint: "fedcba9876543210",
                                                   base: "tiny", baseFingerprint: "0123456789abcdef"))
    }

    @Test func check11NonFinite() throws {
        for bad in [Float.nan, .infinity, -.infinity] {
            let s = AdapterFixtures.adapter(base, level: .shared, rank: 4)
            s.modules["transformer.h.1.mlp.c_proj"]!.b.data[5] = bad
            #expect(failure(try s.encode()) == .nonFinite(file: "f", tensor: "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight", index: 5))
        }
    }

    @Test func errorMessagesNameTheCheck() {
        #expect(AdapterError.fingerprintMismatch(file: "a", adapterBase: "x", adapterFingerprint: "1", base: "y", baseFingerprint: "2")
            .description.contains("check 10 (base fingerprint)"))
        #expect(AdapterError.truncatedFrame(file: "a", size: 3).description.contains("truncated"))
    }

    @Test func fingerprintOfSafetensorsIsStableAndSensitive() throws {
        let dir = TestPaths.tempDir("fp")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let t = Tensor([1, 2, 3, 4], shape: [2, 2])
        try SafeTensorsWriter.serialize(["w": t]).write(to: URL(fileURLWithPath: dir + "/a.safetensors"))
        try SafeTensorsWriter.serialize(["w": Tensor([9, 9, 9, 9], shape: [2, 2])]).write(to: URL(fileURLWithPath: dir + "/b.safetensors"))
        try SafeTensorsWriter.serialize(["w": Tensor([1, 2, 3, 4], shape: [4, 1])]).write(to: URL(fileURLWithPath: dir + "/c.safetensors"))
        let a = try baseFingerprint(ofSafetensorsAt: dir + "/a.safetensors")
        #expect(a.count == 16 && a.allSatisfy(\.isHexDigit))
        #expect(try baseFingerprint(ofSafetensorsAt: dir + "/a.safetensors") == a)
        // Same header and size, other values: the same fingerprint (documented: not a content hash).
        #expect(try baseFingerprint(ofSafetensorsAt: dir + "/b.safetensors") == a)
        #expect(try baseFingerprint(ofSafetensorsAt: dir + "/c.safetensors") != a)
    }

    @Test func gpt2BaseInfoFromFolder() throws {
        let dir = TestPaths.tempDir("gpt2")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data(#"{"vocab_size": 10, "n_positions": 16, "n_embd": 8, "n_layer": 2, "n_head": 2, "n_inner": null, "model_type": "gpt2"}"#.utf8).write(to: URL(fileURLWithPath: dir + "/config.json"))
        try SafeTensorsWriter.serialize(["wte.weight": Tensor(zeros: [10, 8])]).write(to: URL(fileURLWithPath: dir + "/model.safetensors"))
        let b = try BaseModelInfo.load(folder: dir)
        #expect(b.linears.count == 8)
        #expect(b.linears["transformer.h.1.attn.c_attn"]! == (8, 24))
        #expect(b.linears["transformer.h.0.mlp.c_proj"]! == (32, 8))
        #expect(b.fingerprint == (try baseFingerprint(ofSafetensorsAt: dir + "/model.safetensors")))
    }
}
