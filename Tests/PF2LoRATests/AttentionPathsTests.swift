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
                              numAttentionHeads: heads, numKeyValueHeads: kvHeads, headDim: headDim, maxPositionEmbeddings: 320,
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

    @Test(arguments: [(64, 4, 1), (64, 4, 4), (16, 4, 2)], KVCachePrecision.allCases)
    func longPrefillEqualsChunksAndDecode(_ shape: (Int, Int, Int), _ kv: KVCachePrecision) throws {
        let m = try Self.model(headDim: shape.0, heads: shape.1, kvHeads: shape.2)
        let V = m.architecture.vocabSize, n = 300
        var rng = RNG(seed: 5)
        let ids = (0..<n).map { _ in Int(rng.next() % UInt64(V)) }
        #expect(n > 3 * InferenceEngine.attentionBlock)
        #expect(n > DecodePlan.splitAttentionFrom + 16, "the pooled decode's split attention is reached")

        // One prefill of all rows.
        let whole = Tensor(zeros: [n, V])
        let w1 = try InferenceEngine(model: m).step([StepInput(cache: KVCache(architecture: m.architecture, capacity: n, precision: kv), tokens: ids,
                                                                 weights: m.baseLinears, allLogits: true)])
        whole.data.update(from: w1.data, count: n * V)
        var scale: Float = 0
        for i in 0..<(n * V) { scale = max(scale, abs(whole.data[i])) }
        #expect(scale > 1, "logits large enough to mean something: \(scale)")
        // With a half cache every path reads the same rounded keys and values, except where a key
        // computed by another path (GEMM or pooled rows, f32 rounding apart) rounds to the neighbouring
        // half: one element off by 2^-11 relative, hence the wider bound.
        let tol = (kv == .f32 ? 2e-5 : 2e-4) * max(scale, 1)

        // Chunks of 70, 3 and 127 rows on top of the cache (blocks start at a non-zero cache length).
        let engine = InferenceEngine(model: m)
        let cache = KVCache(architecture: m.architecture, capacity: n, precision: kv)
        var start = 0
        for len in [70, 3, 127] {
            let lg = try engine.step([StepInput(cache: cache, tokens: Array(ids[start..<(start + len)]), weights: m.baseLinears, allLogits: true)])
            let err = Self.maxAbsDiff(lg.data, whole.data + start * V, len * V)
            #expect(err <= tol, "\(shape) \(kv) chunk at \(start): \(err)")
            start += len
        }

        // Token by token: pooled (1 and 2 threads) and as GEMM rows. The pooled paths split attention
        // over 256 positions and more in two parts (head size 64): the same bits at 1 and 2 threads.
        var pooled: [[Float]] = []
        for (limit, threads) in [(12, 1), (12, 2), (0, 1)] {
            let e = InferenceEngine(model: m, pool: WorkerPool(threads: threads))
            e.pooledRowLimit = limit
            let c = KVCache(architecture: m.architecture, capacity: n, precision: kv)
            var worst: Float = 0, all: [Float] = []
            for t in 0..<n {
                let lg = try e.step([StepInput(cache: c, tokens: [ids[t]], weights: m.baseLinears)])
                worst = max(worst, Self.maxAbsDiff(lg.data, whole.data + t * V, V))
                if limit > 0 { all += Array(UnsafeBufferPointer(start: lg.data, count: V)) }
            }
            #expect(worst <= tol, "\(shape) \(kv) decode (pooled rows \(limit), \(threads) threads): \(worst)")
            if limit > 0 { pooled.append(all) }
        }
        #expect(pooled[0] == pooled[1], "\(shape) \(kv): pooled decode differs between 1 and 2 threads")
    }

    /// Pooled decode at long context (split attention) gives each sequence the same bits alone or
    /// batched with shorter and longer ones, at 2 threads, with and without grouped heads.
    @Test(arguments: [(64, 4, 1), (64, 6, 3)], KVCachePrecision.allCases)
    func splitAttentionIsBatchInvariant(_ shape: (Int, Int, Int), _ kv: KVCachePrecision) throws {
        let m = try Self.model(headDim: shape.0, heads: shape.1, kvHeads: shape.2)
        let V = m.architecture.vocabSize
        var rng = RNG(seed: 9)
        let prompts = [270, 40, 300].map { n in (0..<n).map { _ in Int(rng.next() % UInt64(V)) } }
        // Both pools always pooled: the prompts' prefill GEMMs are split over the pool's participants,
        // and OpenBLAS's bits for a part of C may differ from the whole's, so a prefill that the
        // contention policy ran alone (parallel tests load the machine) would fill another cache.
        let pools = [WorkerPool(threads: 2), WorkerPool(threads: 2)]
        for p in pools { p.adaptive = false }
        let batched = InferenceEngine(model: m, pool: pools[0]), alone = InferenceEngine(model: m, pool: pools[1])
        let cb = prompts.map { _ in KVCache(architecture: m.architecture, capacity: 316, precision: kv) }
        let ca = prompts.map { _ in KVCache(architecture: m.architecture, capacity: 316, precision: kv) }
        for (i, ids) in prompts.enumerated() {
            _ = try batched.step([StepInput(cache: cb[i], tokens: ids, weights: m.baseLinears)])
            _ = try alone.step([StepInput(cache: ca[i], tokens: ids, weights: m.baseLinears)])
        }
        for step in 0..<12 {
            let next = prompts.indices.map { (step * 31 + $0 * 7) % V }
            let rows = try batched.step(prompts.indices.map { StepInput(cache: cb[$0], tokens: [next[$0]], weights: m.baseLinears) }).array
            for i in prompts.indices {
                let la = try alone.step([StepInput(cache: ca[i], tokens: [next[i]], weights: m.baseLinears)])
                #expect((0..<V).allSatisfy { la.data[$0] == rows[i * V + $0] }, "\(shape) \(kv) sequence \(i) step \(step): batched differs from alone")
            }
        }
    }

    /// Instruction-set caps the attention kernels are compared at: scalar, AVX2 (three heads x four
    /// keys per score block, one head per value pass) and everything the CPU has (AVX-512F value pass).
    static let attentionCaps: [Int32] = [0, Int32(PF2LORA_ISA_AVX2), 99]

    /// The head_dim-64 decode scores (C, blocks of up to three heads x four keys or one head x eight
    /// keys): the same bits on the scalar, AVX2 and widest path for every head count's block shapes
    /// and key counts around multiples of eight, and within f32 rounding of the f64 dot.
    @Test func scores64MatchScalarAndF64() {
        defer { _ = pf2lora_quant_set_isa(99) }
        var rng = RNG(seed: 4)
        let maxT = 203
        for g in [3, 1, 2, 4, 5, 6, 7] {
            let q = (0..<(g * 64)).map { _ in rng.normal() }, k = (0..<(maxT * 64)).map { _ in rng.normal() }
            for T in [1, 4, 7, 8, 9, 12, 16, 41, 203] {
                var paths: [[Float]] = []
                for isa in Self.attentionCaps {
                    _ = pf2lora_quant_set_isa(isa)
                    var sc = [Float](repeating: 0, count: g * T)
                    pf2lora_attention_scores64(q, g, k, T, 0.125, &sc)
                    paths.append(sc)
                }
                for p in paths.dropFirst() { #expect(paths[0].map(\.bitPattern) == p.map(\.bitPattern), "g \(g) T \(T)") }
                for i in 0..<g {
                    for j in 0..<T {
                        var ref = 0.0, mag = 0.0
                        for e in 0..<64 { let t = Double(q[i * 64 + e]) * Double(k[j * 64 + e]); ref += t; mag += abs(t) }
                        #expect(abs(Double(paths[2][i * T + j]) - 0.125 * ref) <= 0.125 * mag * 16 * 0x1p-24, "g \(g) T \(T) head \(i) key \(j)")
                    }
                }
            }
        }
    }

    /// The head_dim-64 value pass over f32 and half rows (C): the same bits on the scalar, AVX2 and
    /// widest (AVX-512F: up to three heads per value row) path for every head count; the half pass
    /// equals the f32 pass on the widened rows to the bit (one fused multiply-add per term in order
    /// of j on every path); within f32 rounding of the f64 sum.
    @Test func values64MatchScalarAndF64() {
        defer { _ = pf2lora_quant_set_isa(99) }
        var rng = RNG(seed: 6)
        for g in [3, 1, 2, 4, 5, 7] {
            for T in [1, 7, 8, 9, 203] {
                let p = (0..<(g * T)).map { _ in abs(rng.normal()) }, v = (0..<(T * 64)).map { _ in rng.normal() }
                let inv = (0..<g).map { _ in 1 / Float(T) + abs(rng.normal()) * 0.01 }
                let vh = Self.halves(v), vw = Self.widened(vh)
                var f32Paths: [[Float]] = [], halfPaths: [[Float]] = []
                for isa in Self.attentionCaps {
                    _ = pf2lora_quant_set_isa(isa)
                    var o = [Float](repeating: 0, count: g * 64), oh = o
                    pf2lora_attention_values64(p, g, T, v, inv, &o)
                    pf2lora_attention_values64(p, g, T, vw, inv, &oh)
                    var o16 = [Float](repeating: 0, count: g * 64)
                    pf2lora_attention_values64_f16(p, g, T, vh, inv, &o16)
                    #expect(o16.map(\.bitPattern) == oh.map(\.bitPattern), "isa \(isa) g \(g) T \(T): half pass differs from f32 on widened rows")
                    f32Paths.append(o); halfPaths.append(o16)
                }
                for (a, b) in zip(f32Paths.dropFirst(), halfPaths.dropFirst()) {
                    #expect(a.map(\.bitPattern) == f32Paths[0].map(\.bitPattern), "g \(g) T \(T): f32 paths differ")
                    #expect(b.map(\.bitPattern) == halfPaths[0].map(\.bitPattern), "g \(g) T \(T): half paths differ")
                }
                for i in 0..<g {
                    for e in 0..<64 {
                        var ref = 0.0, mag = 0.0
                        for j in 0..<T { let t = Double(p[i * T + j]) * Double(v[j * 64 + e]); ref += t; mag += abs(t) }
                        let got = Double(f32Paths[2][i * 64 + e]), want = ref * Double(inv[i])
                        #expect(abs(got - want) <= mag * Double(inv[i]) * Double(T + 2) * 0x1p-24, "g \(g) T \(T) head \(i) [\(e)]")
                    }
                }
            }
        }
    }

    // MARK: The half-precision KV cache

    /// f32 -> f16 rounds to nearest even as Swift's Float16 (IEEE) does, on the F16C and the scalar
    /// path alike, including ties, subnormal halves, overflow and NaN; f16 -> f32 is exact.
    #if os(Linux) || arch(arm64)   // Swift's Float16 (the reference) is not available on Intel macOS
    @Test func halfConversionMatchesIEEE() {
        defer { _ = pf2lora_quant_set_isa(99) }
        var rng = RNG(seed: 21)
        var xs: [Float] = [0, -0, 1, -1, 65504, 65519.99, 65520, -65520, 1e9, .infinity, -.infinity, .nan, -.nan,
                           0x1p-14, 0x1p-24, 0x1p-25, 0x1.000002p-25, 0x1.8p-24, 0x1.4p-24, 0x1p-26, 0x1.ffcp-15, .leastNonzeroMagnitude,
                           1 + 0x1p-11, 1 + 0x1p-11 + 0x1p-23, 1 + 3 * 0x1p-11, 2049, 2051]
        for _ in 0..<20_000 {
            let e = Float(Int(rng.next() % 50) - 30)
            xs.append(Float(bitPattern: UInt32(truncatingIfNeeded: rng.next())))              // any bits
            xs.append(rng.normal() * Float(pow(2.0, Double(e))))                            // normal and subnormal halves
            let h = Float16(bitPattern: UInt16(truncatingIfNeeded: rng.next() & 0x7bff))
            let tie = Float(h) + Float(h.ulp) / 2                                           // halfway to the next half (exact in f32)
            xs += [tie, tie.nextUp, tie.nextDown, -tie]
        }
        var paths: [[UInt16]] = []
        for isa in [0, 99] {
            _ = pf2lora_quant_set_isa(Int32(isa))
            var h = [UInt16](repeating: 0, count: xs.count)
            pf2lora_f32_to_f16(xs, &h, xs.count)
            paths.append(h)
            var back = [Float](repeating: 0, count: xs.count)
            pf2lora_f16_to_f32(h, &back, xs.count)
            #expect(zip(h, back).allSatisfy { Float(Float16(bitPattern: $0)).bitPattern == $1.bitPattern || ($1.isNaN && Float16(bitPattern: $0).isNaN) },
                    "isa \(isa): f16 -> f32 not exact")
        }
        #expect(paths[0] == paths[1], "scalar and F16C paths differ")
        let mismatches = xs.indices.filter { xs[$0].isNaN ? !Float16(bitPattern: paths[1][$0]).isNaN : Float16(xs[$0]).bitPattern != paths[1][$0] }
        #expect(mismatches.isEmpty, "\(mismatches.prefix(5).map { (xs[$0], paths[1][$0], Float16(xs[$0]).bitPattern) })")
    }
    #endif

    static func halves(_ x: [Float]) -> [UInt16] {
        var h = [UInt16](repeating: 0, count: x.count)
        pf2lora_f32_to_f16(x, &h, x.count)
        return h
    }

    static func widened(_ h: [UInt16]) -> [Float] {
        var x = [Float](repeating: 0, count: h.count)
        pf2lora_f16_to_f32(h, &x, h.count)
        return x
    }

    /// Decode attention over a half cache: the same bits on the scalar and the AVX2 path; for head
    /// size 64 the scores are the f32 kernel's on the widened keys to the bit and the output within
    /// f32 summation of `decodeGroup` on the widened rows; and against the unrounded f32 cache within
    /// the bound f16 rounding gives: keys and values are off by at most u = 2^-11 relative, so each
    /// score by e_j <= u * scale * sum_e |q_e k_je|, each softmax weight by a factor within
    /// exp(+-2 max e_j), and each output by at most max_j |v_j| (exp(2 max e_j) - 1 + u).
    @Test(arguments: [64, 16])
    func halfCacheDecodeGroupWithinRoundingBound(_ hd: Int) {
        defer { _ = pf2lora_quant_set_isa(99) }
        var rng = RNG(seed: 8)
        // g = 1, 3, 4, 5: the score blocks and the AVX-512F value pass take heads three at a time, then one or two.
        for g in [3, 1, 4, 5] {
        for T in [1, 7, 8, 9, 40, 203] {
            let q = (0..<(g * hd)).map { _ in 2 * rng.normal() }
            let k = (0..<(T * hd)).map { _ in rng.normal() }, v = (0..<(T * hd)).map { _ in rng.normal() }
            let kh = Self.halves(k), vh = Self.halves(v), kw = Self.widened(kh), vw = Self.widened(vh)
            let scale = 1 / Float(hd).squareRoot()
            func run(_ body: (UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>) -> Void) -> [Float] {
                var sc = [Float](repeating: 0, count: g * T), o = [Float](repeating: 0, count: g * hd)
                sc.withUnsafeMutableBufferPointer { s in o.withUnsafeMutableBufferPointer { body(s.baseAddress!, $0.baseAddress!) } }
                return o
            }
            var half: [[Float]] = []
            for isa in Self.attentionCaps {
                _ = pf2lora_quant_set_isa(isa)
                half.append(run { decodeGroupHalf(q: q, heads: g, k: kh, v: vh, hd: hd, count: T, scale: scale, scores: $0, out: $1) })
                if hd == 64 {
                    var a = [Float](repeating: 0, count: g * T), b = a
                    pf2lora_attention_scores64_f16(q, g, kh, T, scale, &a)
                    pf2lora_attention_scores64(q, g, kw, T, scale, &b)
                    #expect(a.map(\.bitPattern) == b.map(\.bitPattern), "isa \(isa) T \(T): half scores differ from widened f32")
                }
            }
            for h in half.dropFirst() { #expect(half[0].map(\.bitPattern) == h.map(\.bitPattern), "hd \(hd) g \(g) T \(T): scalar and vector paths differ") }
            let onWidened = run { decodeGroup(q: q, heads: g, k: kw, v: vw, hd: hd, count: T, scale: scale, scores: $0, out: $1) }
            let exact = run { decodeGroup(q: q, heads: g, k: k, v: v, hd: hd, count: T, scale: scale, scores: $0, out: $1) }
            let u: Float = 0x1p-11
            for i in 0..<g {
                var eMax: Float = 0
                for j in 0..<T {
                    var m: Float = 0
                    for e in 0..<hd { m += abs(q[i * hd + e] * k[j * hd + e]) }
                    eMax = max(eMax, u * scale * m)
                }
                for e in 0..<hd {
                    var vMax: Float = 0
                    for j in 0..<T { vMax = max(vMax, abs(v[j * hd + e])) }
                    let got = half[1][i * hd + e]
                    #expect(abs(got - onWidened[i * hd + e]) <= 1e-5 * vMax, "hd \(hd) T \(T) head \(i) [\(e)]: vs f32 kernel on the widened rows")
                    let bound = vMax * (exp(2 * eMax) - 1 + u) + 1e-5 * vMax
                    #expect(abs(got - exact[i * hd + e]) <= bound, "hd \(hd) T \(T) head \(i) [\(e)]: \(abs(got - exact[i * hd + e])) > \(bound)")
                }
            }
        }
        }
    }

    /// A query head's decode attention has the same bits whichever group of heads sharing its KV head
    /// it is computed in (alone, or in groups of 2-5 split any way), on every ISA path and both cache
    /// precisions: so a split of one KV head's query heads over the pool's participants (a lever for
    /// batch-1 balance at 2 threads, STATUS #14) would keep a sequence's bits batch-invariant.
    @Test(arguments: [64, 16])
    func aHeadsAttentionDoesNotDependOnItsGroup(_ hd: Int) {
        defer { _ = pf2lora_quant_set_isa(99) }
        var rng = RNG(seed: 9)
        for g in [2, 3, 4, 5] {
            for T in [1, 7, 9, 40, 203] {
                let q = (0..<(g * hd)).map { _ in 2 * rng.normal() }
                let k = (0..<(T * hd)).map { _ in rng.normal() }, v = (0..<(T * hd)).map { _ in rng.normal() }
                let kh = Self.halves(k), vh = Self.halves(v)
                let scale = 1 / Float(hd).squareRoot()
                for isa in Self.attentionCaps {
                    _ = pf2lora_quant_set_isa(isa)
                    for half in [false, true] {
                        // Heads [h0, h0 + n) as one group: their outputs.
                        func group(_ h0: Int, _ n: Int) -> [Float] {
                            var sc = [Float](repeating: 0, count: n * T), o = [Float](repeating: 0, count: n * hd)
                            let qs = Array(q[(h0 * hd)..<((h0 + n) * hd)])
                            sc.withUnsafeMutableBufferPointer { s in
                                o.withUnsafeMutableBufferPointer { ob in
                                    if half {
                                        decodeGroupHalf(q: qs, heads: n, k: kh, v: vh, hd: hd, count: T, scale: scale, scores: s.baseAddress!, out: ob.baseAddress!)
                                    } else {
                                        decodeGroup(q: qs, heads: n, k: k, v: v, hd: hd, count: T, scale: scale, scores: s.baseAddress!, out: ob.baseAddress!)
                                    }
                                }
                            }
                            return o
                        }
                        let whole = group(0, g)
                        for cut in 1..<g {
                            let split = group(0, cut) + group(cut, g - cut)
                            #expect(whole.map(\.bitPattern) == split.map(\.bitPattern), "hd \(hd) g \(g) split at \(cut) T \(T) isa \(isa) half \(half)")
                        }
                        let alone = (0..<g).flatMap { group($0, 1) }
                        #expect(whole.map(\.bitPattern) == alone.map(\.bitPattern), "hd \(hd) g \(g) heads alone T \(T) isa \(isa) half \(half)")
                    }
                }
            }
        }
    }

    /// `--kv-cache auto`: f16 for a q8_0 base only (f16 and bf16 bases keep f32, to stay within 1e-4
    /// of transformers); a half cache takes half the bytes.
    @Test func automaticCachePrecision() throws {
        let m = try Self.model(headDim: 64, heads: 4, kvHeads: 2)
        #expect(KVCachePrecision.automatic(for: m) == .f32)
        for p in [WeightPrecision.f16, .bf16] { #expect(KVCachePrecision.automatic(for: try LanguageModel(m, servedAt: p)) == .f32) }
        let q8 = try LanguageModel(m, servedAt: .q8_0)
        #expect(KVCachePrecision.automatic(for: q8) == .f16)
        #expect(KVCache(model: q8, capacity: 10).precision == .f16)
        let a = m.architecture
        #expect(KVCache(architecture: a, capacity: 10, precision: .f16).byteCount * 2 == KVCache(architecture: a, capacity: 10).byteCount)
        #expect(KVCache(architecture: a, capacity: 10).byteCount == 2 * a.layerCount * a.kvHeadCount * 10 * a.headDim * 4)
    }
}
