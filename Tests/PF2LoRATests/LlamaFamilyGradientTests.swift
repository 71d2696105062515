import Foundation
import Testing
@testable import PF2LoRA

/// The backward of the Llama block (RMSNorm, RoPE with its scalings, SwiGLU, grouped-query attention,
/// Qwen3's per-head q/k norms, Qwen2's biases) against PyTorch autograd in float64 (fixtures
/// llama-family/<model>/grads, Tests/FixtureScripts/fixtures/llama_family.py): the two-level LoRA loss and the
/// gradients of A, B, C, D for every model; every weight's gradient for qwen3-qknorm-f16. Tolerance
/// (Fixtures/README.md): per tensor max abs error <= 1e-4 * the reference tensor's max abs value.
@Suite struct LlamaFamilyGradientTests {
    static let root = LlamaFamilyModelTests.root
    static let tolerance = 1e-4

    struct Inputs: Decodable {
        let input_ids: [[Int]]
        let labels: [[Int]]
        let lora_loss_f64: Double
        let full_loss_f64: Double?
    }

    static func load(_ name: String) throws -> (LanguageModel, TrainingBatch, Inputs) {
        let m = try LlamaFamilyModelTests.model(name)
        let inp = try JSONDecoder().decode(Inputs.self, from: Data(contentsOf: root.appendingPathComponent("\(name)/grads/inputs.json")))
        return (m, try TrainingBatch(inputIds: inp.input_ids, labels: inp.labels), inp)
    }

    /// A PEFT folder's pairs keyed by module path, and its scale.
    static func adapter(_ name: String, _ folder: String) throws -> AdapterWeights {
        let dir = root.appendingPathComponent("\(name)/peft/\(folder)")
        let cfg = try LlamaFamilyModelTests.json(dir.appendingPathComponent("adapter_config.json").path)
        let st = try SafeTensorsFile(path: dir.appendingPathComponent("adapter_model.safetensors").path)
        var pairs: [String: (down: Tensor, up: Tensor)] = [:]
        for n in st.names where n.hasSuffix(".lora_A.weight") {
            let module = String(n.dropFirst("base_model.model.".count).dropLast(".lora_A.weight".count))
            pairs[module] = (try st.tensor(n).clone(), try st.tensor(n.replacingOccurrences(of: "lora_A", with: "lora_B")).clone())
        }
        let r = (cfg["r"] as! NSNumber).floatValue, alpha = (cfg["lora_alpha"] as! NSNumber).floatValue
        return AdapterWeights(pairs: pairs, scale: alpha / r)
    }

    static func relErr(_ a: [Float], _ b: [Float]) -> Double {
        let scale = b.map { abs(Double($0)) }.max() ?? 0
        let diff = zip(a, b).map { abs(Double($0) - Double($1)) }.max() ?? 0
        return diff / max(scale, 1e-30)
    }

    @Test(arguments: LlamaFamilyModelTests.names)
    func loraGradientsMatchAutograd(_ name: String) throws {
        let (m, batch, inp) = try Self.load(name)
        let shared = try Self.adapter(name, "two-level/shared"), client = try Self.adapter(name, "two-level/client")
        let trainer = ModelTrainer(weights: m.weights)
        let loss = try trainer.lossAndGradients(batch, shared: shared, client: client)
        #expect(abs(Double(loss) - inp.lora_loss_f64) <= 1e-5, "\(name): loss \(loss) vs \(inp.lora_loss_f64)")
        // Forward-only evaluation gives the same loss.
        #expect(abs(try trainer.loss(batch, shared: shared, client: client) - loss) <= 1e-6)
        let ref = try SafeTensorsFile(path: Self.root.appendingPathComponent("\(name)/grads/lora_grads_f64.safetensors").path)
        var worst = 0.0
        for n in ref.names {
            let module = String(n.dropFirst("base_model.model.".count).dropLast(".lora_X.weight".count))
            let g: Tensor
            switch n.dropLast(".weight".count).suffix(1) {
            case "A": g = try #require(trainer.gradients.shared[module]).down
            case "B": g = try #require(trainer.gradients.shared[module]).up
            case "C": g = try #require(trainer.gradients.client[module]).down
            default: g = try #require(trainer.gradients.client[module]).up
            }
            let e = Self.relErr(g.array, try ref.tensor(n).array)
            worst = max(worst, e)
            #expect(e <= Self.tolerance, "\(name) \(n): relative error \(e)")
        }
        #expect(ref.names.count == 56)
        print("\(name) LoRA gradients vs autograd f64: worst relative error \(worst)")
    }

    /// Every weight's gradient, RMSNorm and the per-head q/k norms included, the head tied to the embeddings.
    @Test func fullGradientsMatchAutograd() throws {
        let name = "qwen3-qknorm-f16"
        let (m, batch, inp) = try Self.load(name)
        let trainer = ModelTrainer(weights: m.weights, fullGradients: true)
        let loss = try trainer.lossAndGradients(batch)
        let want = try #require(inp.full_loss_f64)
        #expect(abs(Double(loss) - want) <= 1e-5, "loss \(loss) vs \(want)")
        let ref = try SafeTensorsFile(path: Self.root.appendingPathComponent("\(name)/grads/full_grads_f64.safetensors").path)
        let mine = Dictionary(uniqueKeysWithValues: trainer.gradients.named)
        #expect(Set(ref.names) == Set(mine.keys))
        var worst = 0.0
        for n in ref.names {
            let e = Self.relErr(try #require(mine[n]).array, try ref.tensor(n).array)
            worst = max(worst, e)
            #expect(e <= Self.tolerance, "\(n): relative error \(e)")
        }
        print("\(name) full gradients vs autograd f64: worst relative error \(worst)")
    }

    /// The run state's size is known before the first call, to the byte (`serve --max-train-mb`).
    @Test(arguments: LlamaFamilyModelTests.names)
    func runBytesMatchTheState(_ name: String) throws {
        let (m, batch, _) = try Self.load(name)
        let shared = try Self.adapter(name, "two-level/shared"), client = try Self.adapter(name, "two-level/client")
        let ranks = Array(repeating: [8, 2], count: shared.pairs.count).flatMap { $0 }
        let eval = ModelTrainer(weights: m.weights)
        _ = try eval.loss(batch, shared: shared, client: client)
        #expect(eval.stateBytes == TrainingState.bytes(B: batch.batchSize, T: batch.seqLen, config: m.architecture, training: false, ranks: ranks))
        let train = ModelTrainer(weights: m.weights)
        _ = try train.lossAndGradients(batch, shared: shared, client: client)
        #expect(train.stateBytes == TrainingState.bytes(B: batch.batchSize, T: batch.seqLen, config: m.architecture, training: true, ranks: ranks))
    }

    /// Central finite differences of the f32 loss on a few entries of every kind of weight (the
    /// attention, MLP and per-head norm weights, RMSNorm weights, the tied embedding, both LoRA
    /// levels) agree with the backward: an independent check of the same code's forward and backward.
    @Test(arguments: ["qwen3-qknorm-f16", "llama32-rope-llama3"])
    func finiteDifferences(_ name: String) throws {
        let (m0, batch, _) = try Self.load(name)
        let w = try ModelWeights.load(m0.checkpoint!, architecture: m0.architecture, writable: true)
        let shared = try Self.adapter(name, "two-level/shared"), client = try Self.adapter(name, "two-level/client")
        let full = ModelTrainer(weights: w, fullGradients: true)
        _ = try full.lossAndGradients(batch)
        let lora = ModelTrainer(weights: w)
        _ = try lora.lossAndGradients(batch, shared: shared, client: client)
        let grads = Dictionary(uniqueKeysWithValues: full.gradients.named)
        var checks: [(String, Tensor, Tensor, Bool)] = []   // name, parameter, gradient, with adapters
        for n in ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                  "model.layers.1.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight", "model.embed_tokens.weight"]
                 + (m0.architecture.qkNorm ? ["model.layers.1.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"] : []) {
            checks.append((n, Dictionary(uniqueKeysWithValues: w.named)[n]!, grads[n]!, false))
        }
        for path in ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"] {
            checks.append((path + " A", shared.pairs[path]!.down, lora.gradients.shared[path]!.down, true))
            checks.append((path + " D", client.pairs[path]!.up, lora.gradients.client[path]!.up, true))
        }
        var rng = RNG(seed: 3)
        var worst = 0.0
        let eval = ModelTrainer(weights: w)
        for (n, param, grad, adapted) in checks {
            let gmax = grad.array.map { abs($0) }.max()!
            // The entries with the largest gradients (so the difference is well above f32 rounding) and one at random.
            let top = Array(grad.array.enumerated().sorted { abs($0.element) > abs($1.element) }.prefix(2).map(\.offset)) + [rng.int(below: grad.count)]
            for i in top {
                let h: Float = 1e-2, x = param.data[i]
                func loss() throws -> Double { Double(adapted ? try eval.loss(batch, shared: shared, client: client) : try eval.loss(batch)) }
                param.data[i] = x + h; let up = try loss()
                param.data[i] = x - h; let down = try loss()
                param.data[i] = x
                let fd = (up - down) / Double(2 * h)
                worst = max(worst, abs(fd - Double(grad.data[i])) / Double(gmax))
                #expect(abs(fd - Double(grad.data[i])) <= 0.01 * Double(gmax), "\(name) \(n)[\(i)]: finite difference \(fd) vs backward \(grad.data[i]) (max |g| \(gmax))")
            }
        }
        print("\(name): finite differences of \(checks.count * 3) entries, worst |fd - g| = \(worst) of the tensor's max |g|")
    }
}
