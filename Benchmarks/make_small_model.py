#!/usr/bin/env python3
"""Write a random GPT-2 of the embedded default's shape (n_layer 4, n_embd 256, n_head 4, n_positions 256,
vocab 4096) with the fortune tokenizer, for personalization benchmarks before the real base is pretrained.

    python3 Benchmarks/make_small_model.py --out /tmp/small-gpt2 [--seed 0] [--tokenizer models/fortune-gpt2]

Weights as GPT-2 initializes them: N(0, 0.02), residual projections N(0, 0.02/sqrt(2 n_layer)),
zero biases, unit layer norms (the same recipe as ModelWeights.random, with numpy's generator).
"""
import argparse, json, os, shutil
import numpy as np
from safetensors.numpy import save_file

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--tokenizer", default="models/fortune-gpt2")
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--embd", type=int, default=256)
ap.add_argument("--heads", type=int, default=4)
ap.add_argument("--positions", type=int, default=256)
ap.add_argument("--vocab", type=int, default=4096)
a = ap.parse_args()
rng = np.random.default_rng(a.seed)
C, L, V, P = a.embd, a.layers, a.vocab, a.positions
proj = 0.02 / np.sqrt(2 * L)
t = {"transformer.wte.weight": rng.normal(0, 0.02, (V, C)), "transformer.wpe.weight": rng.normal(0, 0.01, (P, C))}
for l in range(L):
    p = f"transformer.h.{l}."
    t[p + "ln_1.weight"] = np.ones(C); t[p + "ln_1.bias"] = np.zeros(C)
    t[p + "ln_2.weight"] = np.ones(C); t[p + "ln_2.bias"] = np.zeros(C)
    for name, (i, o), std in [("attn.c_attn", (C, 3 * C), 0.02), ("attn.c_proj", (C, C), proj),
                              ("mlp.c_fc", (C, 4 * C), 0.02), ("mlp.c_proj", (4 * C, C), proj)]:
        t[p + name + ".weight"] = rng.normal(0, std, (i, o)); t[p + name + ".bias"] = np.zeros(o)
t["transformer.ln_f.weight"] = np.ones(C); t["transformer.ln_f.bias"] = np.zeros(C)
os.makedirs(a.out, exist_ok=True)
save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
cfg = {"model_type": "gpt2", "vocab_size": V, "n_positions": P, "n_ctx": P, "n_embd": C, "n_layer": L, "n_head": a.heads,
       "n_inner": None, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "bos_token_id": V - 1, "eos_token_id": V - 1}
json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=2)
for f in ["tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]:
    if os.path.exists(os.path.join(a.tokenizer, f)):
        shutil.copy(os.path.join(a.tokenizer, f), os.path.join(a.out, f))
print(f"wrote {a.out}: {L} layers, {C} wide, vocab {V}, context {P}")
