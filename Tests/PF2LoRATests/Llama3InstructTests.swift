import Foundation
import Testing
@testable import PF2LoRA

/// A Llama-3 instruct model with the real Llama-3 tokenizer (../shared/tokenizers/llama3): every id of
/// generation_config.json's `eos_token_id` list ends a generation, and special tokens the model emits
/// are left out of the text as Hugging Face's `decode(ids, skip_special_tokens=True)` leaves them out,
/// in `generate` and in `serve`.
@Suite struct Llama3InstructTests {
    static let eosList = [128_001, 128_008, 128_009]   // Llama-3.1/3.2 instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>
    static let startHeader = 128_006, endHeader = 128_007

    /// A one-layer Llama of the Llama-3 vocabulary whose greedy next token is always `always`: the block's
    /// linears are zero, so the final hidden state is the (constant) embedding, and only `always`'s row of
    /// the untied head is non-zero (logit 800, every other 0). Tokenizer files from the shared folder;
    /// generation_config.json with the instruct models' EOS list.
    static func riggedModel(always: Int) throws -> String {
        let dir = TestPaths.tempDir("llama3-instruct")
        let C = 16, I = 16, V = 128_256
        var cfg = LlamaConfig(modelType: "llama", vocabSize: V, hiddenSize: C, intermediateSize: I, numHiddenLayers: 1,
                              numAttentionHeads: 2, numKeyValueHeads: 1, maxPositionEmbeddings: 64, rmsNormEps: 1e-5,
                              ropeTheta: 500_000, tieWordEmbeddings: false, attentionBias: false, bosTokenId: 128_000,
                              eosTokenIds: [128_001])
        cfg.torchDType = "float32"
        try cfg.jsonData().write(to: URL(fileURLWithPath: dir + "/config.json"))
        try Data(#"{"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": false}"#.utf8)
            .write(to: URL(fileURLWithPath: dir + "/generation_config.json"))
        func filled(_ shape: [Int], _ v: Float) -> Tensor {
            let t = Tensor(zeros: shape)
            if v != 0 { t.data.update(repeating: v, count: t.count) }
            return t
        }
        let head = Tensor(zeros: [V, C])
        (head.data + always * C).update(repeating: 100, count: C)
        var w: [String: Tensor] = ["model.embed_tokens.weight": filled([V, C], 1), "lm_head.weight": head,
                                   "model.norm.weight": filled([C], 1)]
        let p = "model.layers.0."
        w[p + "input_layernorm.weight"] = filled([C], 1)
        w[p + "post_attention_layernorm.weight"] = filled([C], 1)
        for (name, shape) in [("self_attn.q_proj", [C, C]), ("self_attn.k_proj", [C / 2, C]), ("self_attn.v_proj", [C / 2, C]),
                              ("self_attn.o_proj", [C, C]), ("mlp.gate_proj", [I, C]), ("mlp.up_proj", [I, C]), ("mlp.down_proj", [C, I])] {
            w[p + name + ".weight"] = filled(shape, 0)
        }
        try SafeTensorsWriter.serialize(w).write(to: URL(fileURLWithPath: dir + "/model.safetensors"))
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            try FileManager.default.copyItem(atPath: SharedTokenizers.llama3Dir + "/" + f, toPath: dir + "/" + f)
        }
        return dir
    }

    /// Feeds `ids` to a generation as one-hot logits; returns the streamed deltas and the state.
    static func script(_ ids: [Int], eos: Set<Int>, tokenizer tok: BPETokenizer, ignoreEOS: Bool = false) throws -> (String, GenerationState) {
        let V = tok.vocabSize
        let a = try #require(LlamaConfig.preset("tiny-llama")).architecture(file: "tiny")
        let gen = GenerationState(request: GenerationRequest(prompt: [1], maxTokens: ids.count, sampling: SamplingParams(temperature: 0),
                                                             ignoreEOS: ignoreEOS),
                                  cache: KVCache(architecture: a, capacity: 64), vocabSize: V, eosTokens: eos, tokenizer: tok)
        var logits = [Float](repeating: 0, count: V)
        var streamed = ""
        for id in ids where !gen.isFinished {
            logits[id] = 10
            streamed += gen.accept(logits: logits, vocabSize: V).delta
            logits[id] = 0
        }
        return (streamed, gen)
    }

    @Test(.enabled(if: SharedTokenizers.available, SharedTokenizers.skipMessage))
    func everyEOSIdEndsAndSpecialTokensAreNotText() throws {
        let dir = try Self.riggedModel(always: Self.eosList[0])
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let m = try LanguageModel.load(folder: dir)
        let tok = try BPETokenizer(folder: dir)
        let eos = m.eosTokenIds(tokenizer: tok)
        #expect(eos == Set(Self.eosList))
        #expect(tok.tokenId("<|eot_id|>") == 128_009 && tok.isSpecialToken(128_009) && tok.isSpecialToken(Self.startHeader))

        // An assistant turn as a chat model writes it: header tokens, text, then one of the EOS ids.
        let body = [Self.startHeader] + tok.encode("assistant", addSpecialTokens: false) + [Self.endHeader]
            + tok.encode("\n\nHello, wörld!", addSpecialTokens: false)
        let want = tok.decode(body, skipSpecialTokens: true)    // Hugging Face's skip_special_tokens=True (TokenizerFamilyTests)
        #expect(want == "assistant\n\nHello, wörld!")
        for e in Self.eosList {
            let (streamed, gen) = try Self.script(body + [e, 9906], eos: eos, tokenizer: tok)
            #expect(gen.finish == .eos, "\(e)")
            #expect(gen.tokens == body + [e])
            #expect(gen.outputText == want && streamed == want, "\(e): \(gen.outputText.debugDescription)")
        }
        // Past EOS (ignore_eos), the EOS token adds nothing to the text either; generation goes on.
        let (streamed, gen) = try Self.script(body + [128_009, 9906], eos: eos, tokenizer: tok, ignoreEOS: true)
        #expect(gen.finish == .length)
        #expect(gen.outputText == want + "Hello" && streamed == gen.outputText)
    }

    /// The `generate` command: stops on <|eom_id|> (in generation_config's list, not the tokenizer's EOS)
    /// and never prints a special token.
    @Test(.enabled(if: SharedTokenizers.available, SharedTokenizers.skipMessage))
    func generateCommandStopsAndSkipsSpecialTokens() throws {
        let eom = try Self.riggedModel(always: 128_008)
        defer { try? FileManager.default.removeItem(atPath: eom) }
        let r = try CLITests.run(["generate", "--model", eom, "--prompt", "Hi", "--max-tokens", "5", "--temperature", "0"])
        #expect(r.code == 0, "\(r.err)")
        #expect(r.out == "\n" && r.err.contains("finish: eos"), "\(r.out.debugDescription) \(r.err)")

        let header = try Self.riggedModel(always: Self.startHeader)
        defer { try? FileManager.default.removeItem(atPath: header) }
        let h = try CLITests.run(["generate", "--model", header, "--prompt", "Hi", "--max-tokens", "4", "--temperature", "0"])
        #expect(h.code == 0, "\(h.err)")
        #expect(h.out == "\n" && h.err.contains("4 new tokens") && h.err.contains("finish: length"), "\(h.out.debugDescription) \(h.err)")
    }

    /// `serve`: finish_reason eos on <|eot_id|>; with ignore_eos, streamed token notifications carry the
    /// id and an empty text, and the result's text is empty.
    @Test(.enabled(if: SharedTokenizers.available, SharedTokenizers.skipMessage))
    func serveStopsOnEotAndStreamsNoSpecialText() throws {
        let dir = try Self.riggedModel(always: 128_009)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let s = try ServerProcess(["serve", "--model", dir, "--threads", "1"])
        defer { _ = s.finish() }
        _ = s.request(1, "generate", ["prompt": "Hi", "max_tokens": 5, "temperature": 0])
        let r1 = try #require(ServerProcess.result(s.response(1)))
        #expect(r1["finish_reason"] as? String == "eos" && r1["text"] as? String == "")
        #expect((r1["usage"] as? [String: Any])?["completion_tokens"] as? Int == 1)

        _ = s.request(2, "generate", ["prompt": "Hi", "max_tokens": 3, "temperature": 0, "ignore_eos": true, "stream": true])
        let r2 = try #require(ServerProcess.result(s.response(2)))
        #expect(r2["finish_reason"] as? String == "length" && r2["text"] as? String == "")
        let notes = s.notifications("token", id: 2)
        #expect(notes.count == 3)
        #expect(notes.allSatisfy { $0["token"] as? Int == 128_009 && $0["text"] as? String == "" }, "\(notes)")
    }
}
