import Foundation
import Testing
@testable import PF2LoRA

// The training backward pass checked two ways:
// (a) against central finite differences of an independent, scalar, double-precision GPT-2 + two-level
//     LoRA forward written below (it shares no code with the runtime);
// (b) against PyTorch + PEFT autograd fixtures (Fixtures/grads/, made by Tests/FixtureScripts/fixtures/grads.py).

// MARK: - Double-precision reference forward (loss only)

/// GPT-2 with two LoRA levels, scalar loops in Double. Parameters under their Hugging Face names;
/// adapters per level under their module path as (down (r, in), up (out, r), r).
struct ReferenceGPT2 {
    let c: GPT2Config
    var p: [String: [Double]]
    var adapters: [[String: (down: [Double], up: [Double], r: Int)]]   // [level][path]
    var scales: [Double]

    init(weights: ModelWeights, shared: AdapterWeights?, client: AdapterWeights?) {
        c = GPT2Config(weights.architecture)
        p = Dictionary(uniqueKeysWithValues: weights.named.map { ($0.0, $0.1.array.map(Double.init)) })
        adapters = [shared, client].map { lvl in
            (lvl?.pairs ?? [:]).mapValues { (down: $0.down.array.map(Double.init), up: $0.up.array.map(Double.init), r: $0.down.shape[0]) }
        }
        scales = [Double(shared?.scale ?? 0), Double(client?.scale ?? 0)]
    }

    func layerNorm(_ x: [Double], _ w: [Double], _ b: [Double]) -> [Double] {
        let n = Double(x.count)
        let m = x.reduce(0, +) / n
        let v = x.reduce(0) { $0 + ($1 - m) * ($1 - m) } / n
        let rs = 1 / (v + Double(c.layerNormEpsilon)).squareRoot()
        return x.indices.map { (x[$0] - m) * rs * w[$0] + b[$0] }
    }

    /// Slot 0 attn.c_attn, 1 attn.c_proj, 2 mlp.c_fc, 3 mlp.c_proj (Conv1D weights, (in, out)).
    func linear(_ x: [Double], layer l: Int, slot: Int) -> [Double] {
        let s = c.architecture.slots[slot]
        let (din, dout) = s.dims
        let name = "transformer.h.\(l).\(s.path)"
        let w = p[name + ".weight"]!, b = p[name + ".bias"]!
        var out = b
        for i in 0..<din { for o in 0..<dout { out[o] += x[i] * w[i * dout + o] } }
        for level in 0..<2 {
            guard let a = adapters[level][name] else { continue }
            for j in 0..<a.r {
                var u = 0.0
                for i in 0..<din { u += a.down[j * din + i] * x[i] }
                for o in 0..<dout { out[o] += scales[level] * a.up[o * a.r + j] * u }
            }
        }
        return out
    }

    func gelu(_ x: Double) -> Double { 0.5 * x * (1 + tanh((2 / Double.pi).squareRoot() * (x + 0.044715 * x * x * x))) }

    func loss(_ batch: TrainingBatch) -> Double {
        let C = c.nEmbd, T = batch.seqLen, H = c.nHead, hs = C / H, V = c.vocabSize
        var total = 0.0, n = 0
        let wte = p["transformer.wte.weight"]!, wpe = p["transformer.wpe.weight"]!
        for b in 0..<batch.batchSize {
            var x: [[Double]] = (0..<T).map { t in
                let tok = Int(batch.inputs[b * T + t])
                return (0..<C).map { wte[tok * C + $0] + wpe[t * C + $0] }
            }
            for l in 0..<c.nLayer {
                let pre = "transformer.h.\(l)."
                let qkv = x.map { linear(layerNorm($0, p[pre + "ln_1.weight"]!, p[pre + "ln_1.bias"]!), layer: l, slot: 0) }
                var y = Array(repeating: Array(repeating: 0.0, count: C), count: T)
                for h in 0..<H {
                    for i in 0..<T {
                        var s = (0...i).map { j in (0..<hs).reduce(0.0) { $0 + qkv[i][h * hs + $1] * qkv[j][C + h * hs + $1] } / Double(hs).squareRoot() }
                        let mx = s.max()!
                        s = s.map { Foundation.exp($0 - mx) }
                        let z = s.reduce(0, +)
                        for j in 0...i { for d in 0..<hs { y[i][h * hs + d] += s[j] / z * qkv[j][2 * C + h * hs + d] } }
                    }
                }
                for t in 0..<T {
                    let proj = linear(y[t], layer: l, slot: 1)
                    for i in 0..<C { x[t][i] += proj[i] }
                    let h1 = linear(layerNorm(x[t], p[pre + "ln_2.weight"]!, p[pre + "ln_2.bias"]!), layer: l, slot: 2).map(gelu)
                    let h2 = linear(h1, layer: l, slot: 3)
                    for i in 0..<C { x[t][i] += h2[i] }
                }
            }
            for t in 0..<T {
                let target = Int(batch.targets[b * T + t])
                if target == Int(TrainingBatch.ignoreIndex) { continue }
                let h = layerNorm(x[t], p["transformer.ln_f.weight"]!, p["transformer.ln_f.bias"]!)
                let logits = (0..<V).map { v in (0..<C).reduce(0.0) { $0 + h[$1] * wte[v * C + $1] } }
                let mx = logits.max()!
                let lse = mx + Foundation.log(logits.reduce(0) { $0 + Foundation.exp($1 - mx) })
                total += lse - logits[target]
                n += 1
            }
        }
        return total / Double(n)
    }
}

// MARK: - A small model with non-trivial weights

enum GradientTestModel {
    /// n_embd 24 (16 SIMD lanes + a scalar tail), 3 heads of 8, vocab 37, 2 layers. Weights drawn larger than
    /// GPT-2's init so the loss is far from uniform and every gradient is clearly non-zero.
    static let config = GPT2Config(vocabSize: 37, nPositions: 16, nEmbd: 24, nLayer: 2, nHead: 3, eosTokenId: 0)

    static func weights(seed: UInt64 = 1) -> ModelWeights {
        let w = ModelWeights.random(architecture: config.architecture, seed: seed)
        var rng = RNG(seed: seed &+ 100)
        for (name, t) in w.named {
            let isLN = name.contains("ln_") && name.hasSuffix(".weight")
            for i in 0..<t.count {
                t.data[i] = isLN ? 1 + 0.2 * rng.normal() : (name.hasSuffix(".bias") ? 0.1 : 0.3) * rng.normal()
            }
        }
        return w
    }

    /// Random (down, up) pairs for every linear layer: both non-zero so every factor gets a gradient.
    static func adapter(rank: Int, scale: Float, seed: UInt64) -> AdapterWeights {
        var rng = RNG(seed: seed)
        var pairs: [String: (down: Tensor, up: Tensor)] = [:]
        let arch = config.architecture
        for l in 0..<config.nLayer {
            for s in arch.slots {
                let (din, dout) = s.dims
                let a = Tensor(zeros: [rank, din]), b = Tensor(zeros: [dout, rank])
                for i in 0..<a.count { a.data[i] = 0.3 * rng.normal() }
                for i in 0..<b.count { b.data[i] = 0.2 * rng.normal() }
                pairs[arch.modulePath(layer: l, slot: s.index)] = (a, b)
            }
        }
        return AdapterWeights(pairs: pairs, scale: scale)
    }

    /// Two sequences of 7 positions; the second is right-padded (3 padded positions, label -100).
    static func batch() throws -> TrainingBatch {
        try TrainingBatch(sequences: [[3, 17, 5, 36, 0, 22, 9], [11, 4, 30, 8]], padToken: 0)
    }
}

/// max |a - b| / max |b| over a tensor, and the sampled finite-difference check.
private func relErr(_ a: [Float], _ b: [Float]) -> Double {
    let scale = b.map { abs(Double($0)) }.max() ?? 0
    let diff = zip(a, b).map { abs(Double($0) - Double($1)) }.max() ?? 0
    return diff / max(scale, 1e-30)
}

@Suite struct GradientTests {
    /// Central difference of the double reference at entry i of a parameter, via a setter on a copy.
    static func finiteDifference(_ ref: ReferenceGPT2, _ batch: TrainingBatch, h: Double = 1e-5,
                                 perturb: (inout ReferenceGPT2, Double) -> Void) -> Double {
        var plus = ref, minus = ref
        perturb(&plus, h)
        perturb(&minus, -h)
        return (plus.loss(batch) - minus.loss(batch)) / (2 * h)
    }

    /// Entries to check in a tensor of n elements: the largest analytic gradient plus random ones.
    static func sample(_ g: Tensor, count k: Int, rng: inout RNG) -> [Int] {
        var idx = [(0..<g.count).max { abs(g.data[$0]) < abs(g.data[$1]) }!]
        for _ in 0..<k { idx.append(Int(rng.next() % UInt64(g.count))) }
        return idx
    }

    /// Each checked entry must satisfy |fd - analytic| <= tol * max|analytic over the tensor|.
    static let fdTolerance = 1e-4

    @Test func lossMatchesDoubleReference() throws {
        let w = GradientTestModel.weights()
        let shared = GradientTestModel.adapter(rank: 4, scale: 2, seed: 7)
        let client = GradientTestModel.adapter(rank: 2, scale: 1.5, seed: 8)
        let batch = try GradientTestModel.batch()
        let trainer = ModelTrainer(weights: w)
        for (s, cl) in [(nil, nil), (shared, nil), (nil, client), (shared, client)] as [(AdapterWeights?, AdapterWeights?)] {
            let ref = ReferenceGPT2(weights: w, shared: s, client: cl).loss(batch)
            let f32 = try trainer.loss(batch, shared: s, client: cl)
            let withGrad = try trainer.lossAndGradients(batch, shared: s, client: cl)
            #expect(abs(Double(f32) - ref) / ref < 1e-5, "loss \(f32) vs reference \(ref)")
            #expect(f32 == withGrad)
        }
    }

    @Test func loraGradientsMatchFiniteDifferences() throws {
        let w = GradientTestModel.weights()
        let shared = GradientTestModel.adapter(rank: 4, scale: 2, seed: 7)
        let client = GradientTestModel.adapter(rank: 2, scale: 1.5, seed: 8)
        let batch = try GradientTestModel.batch()
        let trainer = ModelTrainer(weights: w)
        _ = try trainer.lossAndGradients(batch, shared: shared, client: client)
        let ref = ReferenceGPT2(weights: w, shared: shared, client: client)
        var rng = RNG(seed: 3)
        var worst = 0.0, checked = 0
        for level in 0..<2 {
            let grads = level == 0 ? trainer.gradients.shared : trainer.gradients.client
            #expect(grads.count == 8)
            for (path, g) in grads.sorted(by: { $0.key < $1.key }) {
                for (which, gt) in [(0, g.down), (1, g.up)] {
                    let gmax = gt.array.map { abs(Double($0)) }.max()!
                    #expect(gmax > 1e-6, "\(path) gradient \(which) is zero")
                    for i in Self.sample(gt, count: 3, rng: &rng) {
                        let fd = Self.finiteDifference(ref, batch) { m, h in
                            if which == 0 { m.adapters[level][path]!.down[i] += h } else { m.adapters[level][path]!.up[i] += h }
                        }
                        let err = abs(fd - Double(gt.data[i])) / gmax
                        worst = max(worst, err); checked += 1
                        #expect(err < Self.fdTolerance, "level \(level) \(path) \(which == 0 ? "down" : "up")[\(i)]: fd \(fd) vs \(gt.data[i])")
                    }
                }
            }
        }
        #expect(checked == 2 * 8 * 2 * 4)
        print("LoRA finite differences: \(checked) entries, worst error \(worst) of the tensor's max |gradient|")
    }

    @Test func fullGradientsMatchFiniteDifferences() throws {
        let w = GradientTestModel.weights()
        let batch = try GradientTestModel.batch()
        let trainer = ModelTrainer(weights: w, fullGradients: true)
        // With a client adapter present (frozen), as a full fine-tune under an adapter would see it.
        let client = GradientTestModel.adapter(rank: 2, scale: 1.5, seed: 8)
        _ = try trainer.lossAndGradients(batch, client: client, wantClient: false)
        #expect(trainer.gradients.client.isEmpty)
        let ref = ReferenceGPT2(weights: w, shared: nil, client: client)
        var rng = RNG(seed: 4)
        var worst = 0.0, checked = 0
        for (name, gt) in trainer.gradients.named {
            let gmax = gt.array.map { abs(Double($0)) }.max()!
            #expect(gmax > 1e-6, "\(name) gradient is zero")
            for i in Self.sample(gt, count: 3, rng: &rng) {
                let fd = Self.finiteDifference(ref, batch) { m, h in m.p[name]![i] += h }
                let err = abs(fd - Double(gt.data[i])) / gmax
                worst = max(worst, err); checked += 1
                #expect(err < Self.fdTolerance, "\(name)[\(i)]: fd \(fd) vs \(gt.data[i])")
            }
        }
        // wpe rows past T get nothing; wte rows of unused tokens get only the lm_head part.
        let wpe = trainer.gradients.base!.positions!
        #expect((7 * 24..<wpe.count).allSatisfy { wpe.data[$0] == 0 })
        print("full finite differences: \(checked) entries, worst error \(worst) of the tensor's max |gradient|")
    }

    @Test func levelsAreIndependentAndCallsRepeat() throws {
        let w = GradientTestModel.weights()
        let shared = GradientTestModel.adapter(rank: 4, scale: 2, seed: 7)
        let client = GradientTestModel.adapter(rank: 2, scale: 1.5, seed: 8)
        let batch = try GradientTestModel.batch()
        let trainer = ModelTrainer(weights: w)
        let l1 = try trainer.lossAndGradients(batch, shared: shared, client: client)
        let path = "transformer.h.0.attn.c_attn"
        let bothShared = trainer.gradients.shared[path]!.down.array
        let bothClient = trainer.gradients.client[path]!.up.array
        // Only the client level: same client gradients, shared tensors untouched.
        trainer.gradients.shared[path]!.down.fill(42)
        let l2 = try trainer.lossAndGradients(batch, shared: shared, client: client, wantShared: false, wantClient: true)
        #expect(l1 == l2)
        #expect(trainer.gradients.client[path]!.up.array == bothClient)
        #expect(trainer.gradients.shared[path]!.down.array.allSatisfy { $0 == 42 })
        // Only shared: identical to the joint run.
        _ = try trainer.lossAndGradients(batch, shared: shared, client: client, wantShared: true, wantClient: false)
        #expect(trainer.gradients.shared[path]!.down.array == bothShared)
        // A different shape in between, then back: same numbers (the run state is reused, not stale).
        let other = try TrainingBatch(sequences: [[1, 2, 3]], padToken: 0)
        _ = try trainer.lossAndGradients(other, shared: shared, client: client)
        let l3 = try trainer.lossAndGradients(batch, shared: shared, client: client)
        #expect(l3 == l1)
        #expect(trainer.gradients.shared[path]!.down.array == bothShared)
    }

    /// The bridge from the federated code's ParameterSets (PEFT names, modules without `transformer.`).
    @Test func parameterSetBridge() throws {
        let w = GradientTestModel.weights()
        let shared = GradientTestModel.adapter(rank: 4, scale: 2, seed: 7)
        let set = ParameterSet(shared.pairs.sorted { $0.key < $1.key }.flatMap { path, p in
            let m = String(path.dropFirst("transformer.".count))
            return [(LoRANames.a(m), p.down), (LoRANames.b(m), p.up)]
        })
        let bridged = try AdapterWeights(set, level: .shared, scale: 2, architecture: w.architecture)
        #expect(bridged.pairs.count == 8)
        let batch = try GradientTestModel.batch()
        let trainer = ModelTrainer(weights: w)
        let l1 = try trainer.lossAndGradients(batch, shared: bridged)
        let grads = set.zerosLike()
        trainer.gradients.copy(level: .shared, into: grads)
        #expect(grads.tensor("h.1.mlp.c_fc.lora_B.weight").array == trainer.gradients.shared["transformer.h.1.mlp.c_fc"]!.up.array)
        #expect(try trainer.loss(batch, shared: shared) == l1)
    }

    @Test func batchShiftsLabelsAsHuggingFace() throws {
        let b = try TrainingBatch(inputIds: [[5, 6, 7, 0]], labels: [[5, 6, 7, -100]])
        #expect(b.inputs == [5, 6, 7, 0])
        #expect(b.targets == [6, 7, -100, -100])
        #expect(b.targetCount == 2)
        let win = try TrainingBatch(windows: [[1, 2, 3], [4, 5, 6]])
        #expect(win.seqLen == 2 && win.inputs == [1, 2, 4, 5] && win.targets == [2, 3, 5, 6])
        #expect(throws: TrainingError.noTargets) { try ModelTrainer(weights: GradientTestModel.weights()).loss(try TrainingBatch(sequences: [[1]], padToken: 0)) }
    }

    @Test func badAdaptersAreRejected() throws {
        let trainer = ModelTrainer(weights: GradientTestModel.weights())
        let batch = try GradientTestModel.batch()
        var bad = GradientTestModel.adapter(rank: 2, scale: 1, seed: 1)
        bad.pairs["transformer.h.9.attn.c_attn"] = bad.pairs["transformer.h.0.attn.c_attn"]
        #expect(throws: TrainingError.unknownModule("transformer.h.9.attn.c_attn")) { try trainer.loss(batch, shared: bad) }
        var wrong = GradientTestModel.adapter(rank: 2, scale: 1, seed: 1)
        wrong.pairs["transformer.h.0.mlp.c_fc"] = (Tensor(zeros: [2, 24]), Tensor(zeros: [24, 2]))
        #expect(throws: TrainingError.self) { try trainer.loss(batch, client: wrong) }
    }

    /// fastExp (lane-wise, used by softmax, gelu and the cross-entropy) against Foundation.exp.
    @Test func fastExpIsAccurate() {
        var worst = 0.0
        var x: Float = -87
        while x < 88 {
            let lanes = F16((0..<16).map { x + Float($0) * 0.0037 })
            let e = fastExp(lanes)
            for i in 0..<16 { worst = max(worst, abs(Double(e[i]) / Foundation.exp(Double(lanes[i])) - 1)) }
            x += 0.0619
        }
        #expect(worst < 5e-7, "worst relative error \(worst)")
        #expect(fastExp(F16(repeating: -200))[0] >= 0 && fastExp(F16(repeating: -200))[0] < 1e-37)
    }

    /// The shared kernels' backward functions against finite differences of their forwards.
    @Test func kernelBackwardsMatchFiniteDifferences() {
        var rng = RNG(seed: 9)
        let rows = 3, C = 21
        var x = (0..<rows * C).map { _ in rng.normal() }
        let w = (0..<C).map { _ in 1 + 0.3 * rng.normal() }, b = (0..<C).map { _ in 0.1 * rng.normal() }
        let dout = (0..<rows * C).map { _ in rng.normal() }
        // L = sum(dout * layerNorm(x)); dL/dx from the kernel vs central differences in f32 (h 1e-2, smooth).
        func lnLoss(_ x: [Float]) -> Double {
            var out = [Float](repeating: 0, count: rows * C)
            layerNormForward(x, w, b, &out, rows: rows, C: C, eps: 1e-5)
            return zip(out, dout).reduce(0.0) { $0 + Double($1.0 * $1.1) }
        }
        var mean = [Float](repeating: 0, count: rows), rstd = mean
        var o = [Float](repeating: 0, count: rows * C)
        layerNormForward(x, w, b, &o, rows: rows, C: C, eps: 1e-5, mean: &mean, rstd: &rstd)
        var dx = [Float](repeating: 0, count: rows * C), dw = [Float](repeating: 0, count: C), db = dw
        layerNormBackward(dout, x, w, mean, rstd, dx: &dx, dw: &dw, db: &db, rows: rows, C: C)
        for i in [0, 5, 20, 33, 62] {
            let keep = x[i]
            x[i] = keep + 1e-2; let lp = lnLoss(x)
            x[i] = keep - 1e-2; let lm = lnLoss(x)
            x[i] = keep
            #expect(abs((lp - lm) / 2e-2 - Double(dx[i])) < 2e-3 * max(1, abs(Double(dx[i]))))
        }
        // db = column sums of dout.
        var colSum: Float = 0
        for r in 0..<rows { colSum += dout[r * C + 4] }
        #expect(abs(db[4] - colSum) < 1e-5)
        // gelu: both backwards (accumulating and in place) against the derivative of the forward.
        let n = 37
        let gx = (0..<n).map { Float($0 - 18) / 4 }
        let gd = (0..<n).map { _ in rng.normal() }
        var acc = [Float](repeating: 1, count: n)
        geluBackward(gx, gd, &acc, count: n)
        var inPlace = gd
        geluBackwardInPlace(gx, &inPlace, count: n)
        for i in 0..<n {
            var p = [gx[i] + 1e-3], m = [gx[i] - 1e-3], op = [Float(0)], om = [Float(0)]
            geluForward(&p, &op, count: 1); geluForward(&m, &om, count: 1)
            let deriv = Double(op[0] - om[0]) / 2e-3
            #expect(abs(Double(inPlace[i]) - deriv * Double(gd[i])) < 2e-3)
            #expect(abs(Double(acc[i] - 1) - deriv * Double(gd[i])) < 2e-3)
        }
    }
}

// MARK: - PyTorch + PEFT autograd fixtures

/// Fixtures/grads (Tests/FixtureScripts/fixtures/grads.py): tiny-gpt2 with the two-level PEFT adapters of
/// peft/two-level (shared r 8 alpha 16, client r 2 alpha 4, both active), the causal-LM loss of a padded
/// batch, and the gradients of A, B, C, D; then every base weight's gradient with no adapter. We compare
/// against the float64 run (stored as f32).
@Suite(.enabled(if: FileManager.default.fileExists(atPath: TestPaths.fixture("grads/inputs.json"))))
struct GradientFixtureTests {
    struct Inputs: Decodable {
        let input_ids: [[Int]]
        let labels: [[Int]]
        let lora_loss_f64: Double
        let full_loss_f64: Double
    }

    static func load() throws -> (ModelWeights, TrainingBatch, Inputs) {
        let model = try LanguageModel.load(folder: TestPaths.fixture("tiny-gpt2"))
        let inp = try JSONDecoder().decode(Inputs.self, from: Data(contentsOf: URL(fileURLWithPath: TestPaths.fixture("grads/inputs.json"))))
        return (model.weights, try TrainingBatch(inputIds: inp.input_ids, labels: inp.labels), inp)
    }

    /// A PEFT adapter folder's pairs keyed by module path.
    static func adapter(_ folder: String, scale: Float) throws -> AdapterWeights {
        let st = try SafeTensorsFile(path: TestPaths.fixture(folder + "/adapter_model.safetensors"))
        var pairs: [String: (down: Tensor, up: Tensor)] = [:]
        for name in st.names where name.hasSuffix(".lora_A.weight") {
            let module = String(name.dropFirst("base_model.model.".count).dropLast(".lora_A.weight".count))
            pairs[module] = (try st.tensor(name).clone(), try st.tensor(name.replacingOccurrences(of: "lora_A", with: "lora_B")).clone())
        }
        return AdapterWeights(pairs: pairs, scale: scale)
    }

    /// Gradients must agree with the float64 autograd run within 2e-5 of each tensor's max |gradient| (PyTorch's own f32 run is 1.9e-6 off).
    static let tolerance = 2e-5

    @Test func loraLossAndGradientsMatchPEFT() throws {
        let (w, batch, inp) = try Self.load()
        let shared = try Self.adapter("peft/two-level/shared", scale: 16.0 / 8)
        let client = try Self.adapter("peft/two-level/client", scale: 4.0 / 2)
        let trainer = ModelTrainer(weights: w)
        let loss = try trainer.lossAndGradients(batch, shared: shared, client: client)
        #expect(abs(Double(loss) - inp.lora_loss_f64) / inp.lora_loss_f64 < 1e-5, "loss \(loss) vs \(inp.lora_loss_f64)")
        let ref = try SafeTensorsFile(path: TestPaths.fixture("grads/lora_grads_f64.safetensors"))
        var worst = 0.0
        for name in ref.names {
            let module = String(name.dropFirst("base_model.model.".count).dropLast(".lora_X.weight".count))
            let kind = name.dropLast(".weight".count).suffix(1)
            let g: Tensor
            switch kind {
            case "A": g = trainer.gradients.shared[module]!.down
            case "B": g = trainer.gradients.shared[module]!.up
            case "C": g = trainer.gradients.client[module]!.down
            default: g = trainer.gradients.client[module]!.up
            }
            let e = relErr(g.array, try ref.tensor(name).array)
            worst = max(worst, e)
            #expect(e < Self.tolerance, "\(name): relative error \(e)")
        }
        #expect(ref.names.count == 32)
        print("PEFT LoRA gradients: worst relative error \(worst)")
    }

    @Test func fullLossAndGradientsMatchPyTorch() throws {
        let (w, batch, inp) = try Self.load()
        let trainer = ModelTrainer(weights: w, fullGradients: true)
        let loss = try trainer.lossAndGradients(batch)
        #expect(abs(Double(loss) - inp.full_loss_f64) / inp.full_loss_f64 < 1e-5, "loss \(loss) vs \(inp.full_loss_f64)")
        let ref = try SafeTensorsFile(path: TestPaths.fixture("grads/full_grads_f64.safetensors"))
        let mine = Dictionary(uniqueKeysWithValues: trainer.gradients.named)
        var worst = 0.0
        for name in ref.names {
            let e = relErr(mine[name]!.array, try ref.tensor(name).array)
            worst = max(worst, e)
            #expect(e < Self.tolerance, "\(name): relative error \(e)")
        }
        #expect(Set(ref.names) == Set(mine.keys))
        print("PyTorch full gradients: worst relative error \(worst)")
    }
}
