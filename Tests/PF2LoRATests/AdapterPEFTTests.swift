import Foundation
import Testing
@testable import PF2LoRA

@Suite struct AdapterPEFTTests {
    let base = AdapterFixtures.base()

    /// A PEFT folder as save_pretrained writes it, for a GPT-2 model.
    func writePEFT(_ dir: String, rank: Int, alpha: Float, rslora: Bool = false, seed: UInt64 = 5, names: (String) -> String = { $0 },
                   extra: [String: Any] = [:]) throws -> [String: Tensor] {
        var rng = AdapterFixtures.RNG(s: seed)
        var tensors: [String: Tensor] = [:]
        for m in ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"] {
            let (din, dout) = base.linears[m]!
            tensors[names("base_model.model.\(m).lora_A.weight")] = AdapterFixtures.random([rank, din], &rng)
            tensors[names("base_model.model.\(m).lora_B.weight")] = AdapterFixtures.random([dout, rank], &rng)
        }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try SafeTensorsWriter.serialize(tensors, metadata: ["format": "pt"]).write(to: URL(fileURLWithPath: dir + "/adapter_model.safetensors"))
        var config: [String: Any] = ["peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
                                     "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": true, "use_rslora": rslora,
                                     "rank_pattern": [String: Any](), "alpha_pattern": [String: Any](), "bias": "none"]
        for (k, v) in extra { config[k] = v }
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: dir + "/adapter_config.json"))
        return tensors
    }

    @Test func importSharedAndClient() throws {
        let dir = TestPaths.tempDir("peft")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let t = try writePEFT(dir, rank: 4, alpha: 8)
        let s = try PEFT.read(folder: dir, base: base, level: .shared)
        #expect(s.rank == 4 && s.alpha == 8 && s.scale == 2 && s.modules.count == 4)
        #expect(s.modules["transformer.h.1.mlp.c_fc"]!.b.array == t["base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"]!.array)
        #expect(s.metadata.baseFingerprint == base.fingerprint)
        #expect(s.targetModules == ["attn.c_attn", "mlp.c_fc"])

        let r2 = TestPaths.tempDir("peft2")
        defer { try? FileManager.default.removeItem(atPath: r2) }
        let t2 = try writePEFT(r2, rank: 2, alpha: 6, rslora: true, seed: 8)
        let c = try PEFT.read(folder: r2, base: base, level: .client, clientID: "dave", sharedVersion: 1)
        #expect(c.level == .client && c.rank == 2 && c.metadata.clientID == "dave")
        #expect(abs(c.scale - 6 / Float(2).squareRoot()) < 1e-6)
        #expect(c.modules["transformer.h.0.attn.c_attn"]!.a.array == t2["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]!.array)
        // Stored in a store under lora_C / lora_D, and loads back.
        let root = TestPaths.tempDir("peftstore")
        defer { try? FileManager.default.removeItem(atPath: root) }
        let store = try AdapterStore.open(root: root, base: base)
        try store.publishShared(s)
        try store.publishClient(id: "dave", c)
        let back = try store.readAndValidate(level: .client, client: "dave", version: 1)
        #expect(AdapterFixtures.assertSame(back, c))
        let raw = back.safetensors()
        let f = try raw.withUnsafeBytes { try SafeTensorsFile(bytes: $0, owner: raw as NSData, name: "x") }
        #expect(f.tensors["base_model.model.transformer.h.0.attn.c_attn.lora_C.weight"] != nil)
    }

    @Test func importAcceptsOldAndBareNames() throws {
        let dir = TestPaths.tempDir("peftold")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try writePEFT(dir, rank: 2, alpha: 2, names: {
            $0.replacingOccurrences(of: "transformer.", with: "").replacingOccurrences(of: ".weight", with: ".default.weight")
        })
        #expect(try PEFT.read(folder: dir, base: base, level: .shared).modules.count == 4)
    }

    @Test func importRejectsWhatItCannotRepresent() throws {
        let cases: [([String: Any], String)] = [
            (["rank_pattern": ["c_attn": 8]], "rank_pattern"),
            (["alpha_pattern": ["c_attn": 8]], "alpha_pattern"),
            (["use_dora": true], "DoRA"),
            (["bias": "all"], "bias"),
            (["peft_type": "IA3"], "LORA"),
        ]
        for (extra, word) in cases {
            let dir = TestPaths.tempDir("peftbad")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            _ = try writePEFT(dir, rank: 2, alpha: 2, extra: extra)
            do { _ = try PEFT.read(folder: dir, base: base, level: .shared); Issue.record("accepted \(extra)") } catch let e as AdapterError {
                #expect(e.description.contains(word), "\(e)")
            }
        }
        // Wrong shapes for this base: the load checks apply, naming the PEFT file.
        let dir = TestPaths.tempDir("peftwide")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try writePEFT(dir, rank: 2, alpha: 2)
        #expect(throws: AdapterError.self) { try PEFT.read(folder: dir, base: AdapterFixtures.base(c: 16), level: .shared) }
        #expect(throws: AdapterError.self) { try PEFT.read(folder: dir + "/nothing", base: base, level: .shared) }
    }

    /// (d_out, d_in) update scale * b @ a, computed naively.
    func delta(_ p: LoRAPair, scale: Float) -> [Float] {
        let r = p.a.rows, din = p.a.cols, dout = p.b.rows
        var out = [Float](repeating: 0, count: dout * din)
        for i in 0..<dout { for j in 0..<din { var s: Float = 0; for k in 0..<r { s += p.b.data[i * r + k] * p.a.data[k * din + j] }; out[i * din + j] = scale * s } }
        return out
    }

    @Test func exportMergedEqualsTwoLevelUpdate() throws {
        let s = AdapterFixtures.adapter(base, level: .shared, rank: 4, alpha: 8, seed: 1)
        // The client adapts only attention (c_fc etc. get zero client halves), with rsLoRA.
        let c = AdapterFixtures.adapter(base, level: .client, rank: 2, alpha: 3, seed: 2,
                                        modules: ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"], rslora: true)
        let m = PEFT.merge(shared: s, client: c)
        #expect(m.rank == 6 && m.alpha == 6 && m.scale == 1 && !m.useRSLoRA)
        for module in s.modules.keys {
            let want = zip(delta(s.modules[module]!, scale: s.scale),
                           c.modules[module].map { delta($0, scale: c.scale) } ?? [Float](repeating: 0, count: s.modules[module]!.b.rows * s.modules[module]!.a.cols)).map(+)
            let got = delta(m.modules[module]!, scale: 1)
            #expect(zip(want, got).allSatisfy { abs($0 - $1) < 1e-5 }, "\(module)")
        }
        let dir = TestPaths.tempDir("peftout")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try PEFT.write(m, to: dir, base: base)
        let cfg = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/adapter_config.json"))) as? [String: Any])
        #expect(cfg["peft_type"] as? String == "LORA" && cfg["task_type"] as? String == "CAUSAL_LM")
        #expect(cfg["r"] as? Int == 6 && (cfg["lora_alpha"] as? NSNumber)?.floatValue == 6)
        #expect(cfg["fan_in_fan_out"] as? Bool == true && cfg["use_rslora"] as? Bool == false)
        #expect(cfg["target_modules"] as? [String] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
        #expect(cfg["base_model_name_or_path"] as? String == "tiny")
        let back = try PEFT.read(folder: dir, base: base, level: .shared)
        #expect(AdapterFixtures.assertSame(back, m))
        let f = try SafeTensorsFile(path: dir + "/adapter_model.safetensors")
        #expect(f.tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]?.shape == [6, 8])
        #expect(f.tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]?.shape == [24, 6])
    }

    @Test func exportOneLevelRoundTrips() throws {
        let c = AdapterFixtures.adapter(base, level: .client, rank: 2, alpha: 5, seed: 4, modules: ["transformer.h.1.mlp.c_proj"])
        let dir = TestPaths.tempDir("peftlvl")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try PEFT.write(c, to: dir, base: base)
        let cfg = try PEFT.readConfig(folder: dir)
        #expect(cfg.r == 2 && cfg.loraAlpha == 5 && cfg.targetModules == ["transformer.h.1.mlp.c_proj"])
        let back = try PEFT.read(folder: dir, base: base, level: .client, clientID: "alice")
        #expect(AdapterFixtures.assertSame(back, c))
    }
}
