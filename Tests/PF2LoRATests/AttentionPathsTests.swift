import CQuant
import Foundation
import Testing
@testable import PF2LoRA

/// The attention of the three ways a step can run agree on long sequences: one prefill of many rows
/// (causal attention in blocks of `InferenceEngine.attentionBlock` rows, each seeing only the keys up
/// to its last row), the same sequence prefilled in chunks on top of a filled cache, and decoding it
/// token by token (the grouped decode kernel, pooled and as GEMM rows). The fixtures' prompts are
/// shorter than one block; these are not.
@Suite struct AttentionPathsTests {
    /// A random Llama with peaky attention (q and k weights scaled up) and grouped heads.
    static func model(headDim: Int, heads: Int, kvHeads: Int) throws -> LanguageModel {
        let cfg = LlamaConfig(modelType: "llama", vocabSize: 300, hiddenSize: heads * headDim, intermediateSize: 96, numHiddenLayers: 2,
                              numAttentionHeads: heads, numKeyValueHeads: kvHeads, headDim: headDim, maxPositionEmbeddings: 256,
                              rmsNormEps: 1e-5, ropeTheta: 10000, tieWordEmbeddings: true)
        let a = try cfg.architecture(file: "test")
        let w = ModelWeights.random(architecture: a, seed: 11)
        for i in 0..<w.embed.count { w.embed.data[i] *= 20 }
        let qk = (heads + kvHeads) * headDim * a.hiddenSize     // the [q | k] rows of attnIn
        for layer in w.layers { for i in 0..<qk { layer.groupW[GroupSite.attnIn.rawValue].data[i] *= 8 } }
        return LanguageModel(folder: "/nonexistent", weights: w, checkpoint: nil)
    }

    static func maxAbsDiff(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        var m: Float = 0
        for i in 0..<n { m = max(m, abs(a[i] - b[i])) }
        return m
    }

    @Test(arguments: [(64, 4, 1), (64, 4, 4), (16, 4, 2)])
    func longPrefillEqualsChunksAndDecode(_ shape: (Int, Int, Int)) throws {
        let m = try Self.model(headDim: shape.0, heads: shape.1, kvHeads: shape.2)
        let V = m.architecture.vocabSize, n = 200
        var rng = RNG(seed: 5)
        let ids = (0..<n).map { _ in Int(rng.next() % UInt64(V)) }
        #expect(n > 3 * InferenceEngine.attentionBlock)

        // One prefill of all rows.
        let whole = Tensor(zeros: [n, V])
        let w1 = try InferenceEngine(model: m).step([StepInput(cache: KVCache(architecture: m.architecture, capacity: n), tokens: ids,
                                                                 weights: m.baseLinears, allLogits: true)])
        whole.data.update(from: w1.data, count: n * V)
        var scale: Float = 0
        for i in 0..<(n * V) { scale = max(scale, abs(whole.data[i])) }
        #expect(scale > 1, "logits large enough to mean something: \(scale)")
        let tol = 2e-5 * max(scale, 1)

        // Chunks of 70, 3 and 127 rows on top of the cache (blocks start at a non-zero cache length).
        let engine = InferenceEngine(model: m)
        let cache = KVCache(architecture: m.architecture, capacity: n)
        var start = 0
        for len in [70, 3, 127] {
            let lg = try engine.step([StepInput(cache: cache, tokens: Array(ids[start..<(start + len)]), weights: m.baseLinears, allLogits: true)])
            let err = Self.maxAbsDiff(lg.data, whole.data + start * V, len * V)
            #expect(err <= tol, "\(shape) chunk at \(start): \(err)")
            start += len
        }

        // Token by token: pooled (1 and 2 threads) and as GEMM rows.
        for (limit, threads) in [(12, 1), (12, 2), (0, 1)] {
            let e = InferenceEngine(model: m, pool: WorkerPool(threads: threads))
            e.pooledRowLimit = limit
            let c = KVCache(architecture: m.architecture, capacity: n)
            var worst: Float = 0
            for t in 0..<n {
                let lg = try e.step([StepInput(cache: c, tokens: [ids[t]], weights: m.baseLinears)])
                worst = max(worst, Self.maxAbsDiff(lg.data, whole.data + t * V, V))
            }
            #expect(worst <= tol, "\(shape) decode (pooled rows \(limit), \(threads) threads): \(worst)")
        }
    }

    /// The head_dim-64 decode scores (eight keys at a time, C): the same bits on the scalar and the
    /// AVX2 path, for key counts around multiples of eight, and within f32 rounding of the f64 dot.
    @Test func scores64MatchScalarAndF64() {
        defer { _ = pf2lora_quant_set_isa(99) }
        var rng = RNG(seed: 4)
        let g = 3, maxT = 41
        let q = (0..<(g * 64)).map { _ in rng.normal() }, k = (0..<(maxT * 64)).map { _ in rng.normal() }
        for T in [1, 7, 8, 9, 16, 41] {
            var paths: [[Float]] = []
            for isa in [0, 99] {
                _ = pf2lora_quant_set_isa(Int32(isa))
                var sc = [Float](repeating: 0, count: g * T)
                pf2lora_attention_scores64(q, g, k, T, 0.125, &sc)
                paths.append(sc)
            }
            #expect(paths[0].map(\.bitPattern) == paths[1].map(\.bitPattern), "T \(T)")
            for i in 0..<g {
                for j in 0..<T {
                    var ref = 0.0, mag = 0.0
                    for e in 0..<64 { let t = Double(q[i * 64 + e]) * Double(k[j * 64 + e]); ref += t; mag += abs(t) }
                    #expect(abs(Double(paths[1][i * T + j]) - 0.125 * ref) <= 0.125 * mag * 16 * 0x1p-24, "T \(T) head \(i) key \(j)")
                }
            }
        }
    }
}
