#!/usr/bin/env python3
"""Peer benchmark: pf2lora vs Hugging Face transformers (PyTorch CPU) vs llama.cpp (llama-cpp-python),
on one random f32 model of a given shape (GPT-2-124M, or SmolLM2-135M: a Llama), plus the OpenBLAS
sgemv / sgemm bounds, all in one run.

    python3 Benchmarks/peer_bench.py --out Benchmarks/peer-results.md
    python3 Benchmarks/peer_bench.py --shape smollm2-135m --out Benchmarks/peer-results-smollm2.md

Protocol (the same for every engine, see Benchmarks/README.md): batch 1, `--threads` threads (2);
prefill `--prompt-tokens` (512) prompt tokens into an empty KV cache (timed: prefill tok/s), then
`--tokens` (64) greedy decode steps continuing that sequence (timed: decode tok/s). Each engine warms
up first, in its own process; then `--repeats` rounds run every engine once, round-robin, and the
median per engine is reported. A missing or crashing engine is reported as "not available" with the
reason and the others still run.
Progress goes to stderr; the Markdown table to stdout and to `--out`.
"""
import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
# ../shared beside the repository (in a git worktree at /work/wt/NAME it is two levels up).
SHARED_TOKENIZER = next((p / "shared" / "gpt2-tokenizer" for p in (ROOT.parent, ROOT.parent.parent)
                         if (p / "shared" / "gpt2-tokenizer").exists()), ROOT.parent / "shared" / "gpt2-tokenizer")
LLAMA_CPP_VERSION = "0.3.36"
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "pf2lora-bench"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def log(*a):
    print("peer_bench:", *a, file=sys.stderr, flush=True)


def thread_env(threads):
    env = dict(os.environ)
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS"):
        env[k] = str(threads)
    return env


def median_of(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def prompt_ids(n, vocab, seed=0):
    """The same pseudo-random prompt for every engine (content does not matter for random weights)."""
    import random
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# The model

# HuggingFaceTB/SmolLM2-135M's config.json (the Hub's, transformers 4.x layout), the shape of --shape smollm2-135m.
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 0, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "max_position_embeddings": 8192,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 49152,
}
SHAPES = {"gpt2-124m": "GPT-2-124M", "smollm2-135m": "SmolLM2-135M"}


def is_llama(cfg):
    return cfg.get("model_type") in ("llama", "qwen2", "qwen3", "mistral")


def model_geometry(model_dir):
    """Sizes for the report: matmul weights read per decoded token (the lm_head included), layer matmul
    weights (the prefill FLOPs), the attention width (heads x head_dim) and the context length."""
    cfg = json.loads((model_dir / "config.json").read_text())
    if is_llama(cfg):
        C, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
        H, KV = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        hd = cfg.get("head_dim") or C // H
        inner = cfg["intermediate_size"]
        layer_mm = C * H * hd + 2 * C * KV * hd + H * hd * C + 3 * C * inner   # q, k, v, o, gate, up, down
        return {"family": cfg["model_type"], "n_embd": C, "n_layer": L, "vocab": V, "n_head": H, "n_kv_head": KV,
                "head_dim": hd, "attn_width": H * hd, "n_positions": cfg["max_position_embeddings"],
                "n_inner": inner, "matmul_params": L * layer_mm + V * C, "layer_matmul_params": L * layer_mm}
    C, L, V = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]
    inner = cfg.get("n_inner") or 4 * C
    layer_mm = C * 3 * C + C * C + C * inner + inner * C          # c_attn, attn.c_proj, c_fc, mlp.c_proj
    return {"family": "gpt2", "n_embd": C, "n_layer": L, "vocab": V, "n_head": cfg["n_head"], "n_kv_head": cfg["n_head"],
            "head_dim": C // cfg["n_head"], "attn_width": C, "n_positions": cfg["n_positions"], "n_inner": inner,
            "matmul_params": L * layer_mm + V * C,                 # + tied lm_head
            "layer_matmul_params": L * layer_mm}


def weight_files(d):
    """The folder's safetensors weights: model.safetensors, or the shards its index names (and the index)."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [index] + [d / s for s in shards]
    return [d / "model.safetensors"]


def write_gpt2_bpe_cut(dest, vocab_size):
    """GPT-2's byte-level BPE (../shared/gpt2-tokenizer) cut to its first `vocab_size` ids: vocab.json,
    merges.txt and tokenizer.json with every token id >= vocab_size and the merges making them dropped.
    A stand-in vocabulary for a random model whose real tokenizer is not on this machine: llama.cpp's
    converter needs a tokenizer it recognises, and GPT-2's first 49,152 ids tokenize the converter's
    check text exactly as GPT-2 does (its largest id there is 48,101), so it is recognised as "gpt-2".
    The benchmark feeds token ids, so the vocabulary does not affect any timing."""
    tj = json.loads((SHARED_TOKENIZER / "tokenizer.json").read_text())
    vocab = {t: i for t, i in tj["model"]["vocab"].items() if i < vocab_size}
    merges = []
    for m in tj["model"]["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a + b in vocab:
            merges.append([a, b])
    tj["model"]["vocab"], tj["model"]["merges"] = vocab, merges
    tj["added_tokens"] = [t for t in tj.get("added_tokens", []) if t["id"] < vocab_size]
    (dest / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # Without it transformers would build a Llama tokenizer around tokenizer.json; this loads the file as it is.
    (dest / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "model_max_length": 8192}) + "\n")


def make_model(args):
    """Returns the model folder: --model if given, else a random model of --shape: GPT-2-124M made by
    `pf2lora model random --config gpt2` (when the binary exists) or by transformers; SmolLM2-135M made
    by transformers from the real config (or by `pf2lora model random --config smollm2-135m` with
    --make-model pf2lora)."""
    if args.model:
        d = pathlib.Path(args.model)
        if not (d / "config.json").exists():
            sys.exit(f"peer_bench: {d} has no config.json; give a Hugging Face GPT-2 or Llama-family folder or omit --model")
        return d, "given"
    prefix = "gpt2" if args.shape == "gpt2-124m" else args.shape
    d = pathlib.Path(args.work) / f"{prefix}-random-seed{args.seed}"
    if all(f.exists() for f in weight_files(d)) and (d / "config.json").exists() and (d / ".made-by").exists():
        return d, (d / ".made-by").read_text().strip()
    d.mkdir(parents=True, exist_ok=True)
    maker = args.make_model
    if maker == "auto":
        maker = "pf2lora" if pathlib.Path(args.pf2lora).exists() and args.shape == "gpt2-124m" else "transformers"
    if maker == "pf2lora":
        config = "gpt2" if args.shape == "gpt2-124m" else args.shape
        log(f"making the model with {args.pf2lora} model random --config {config} --out {d}")
        # GPT-2's own tokenizer (llama.cpp's converter recognises it by hash; without it `model random`
        # generates an untrained byte-level BPE the converter rejects).
        tok = ["--tokenizer", str(SHARED_TOKENIZER)] if config == "gpt2" and SHARED_TOKENIZER.exists() else []
        subprocess.run([args.pf2lora, "model", "random", "--config", config, "--out", str(d), "--seed", str(args.seed), "--force"] + tok,
                       check=True, stdout=sys.stderr)
    elif args.shape == "smollm2-135m":
        log(f"making the model with transformers LlamaForCausalLM(SmolLM2-135M config), float32, in {d}")
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(args.seed)
        cfg = {k: v for k, v in SMOLLM2_135M.items() if k not in ("architectures", "torch_dtype")}
        m = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
        m.save_pretrained(d, safe_serialization=True)
        c = json.loads((d / "config.json").read_text())
        c["n_ctx"] = c["max_position_embeddings"]                       # DESIGN §6: llama.cpp's converter reads it
        (d / "config.json").write_text(json.dumps(c, indent=2) + "\n")
        if SHARED_TOKENIZER.exists():
            write_gpt2_bpe_cut(d, c["vocab_size"])
        del m
    else:
        log(f"making the model with transformers GPT2LMHeadModel(GPT2Config()) in {d}")
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(args.seed)
        m = GPT2LMHeadModel(GPT2Config())
        m.save_pretrained(d, safe_serialization=True)
        cfg = json.loads((d / "config.json").read_text())
        cfg["n_ctx"] = cfg["n_positions"]
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if SHARED_TOKENIZER.exists():
            for f in TOKENIZER_FILES:
                if (SHARED_TOKENIZER / f).exists():
                    shutil.copy(SHARED_TOKENIZER / f, d / f)
        del m
    (d / ".made-by").write_text(maker + "\n")
    return d, maker


# ----------------------------------------------------------------------------------------------------
# Engines. The Python engines run as persistent worker subprocesses (`--worker NAME`): each loads its
# model, warms up, prints one JSON line {"ready": true, "version": ...}, then answers every "run" line
# on stdin with one JSON line of measurements. The main process measures the engines round-robin
# (one run of each per round, the order rotating), so load changes on a shared machine hit them alike.

def setup_transformers(a):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(a.prompt_tokens, model.config.vocab_size)])

    @torch.inference_mode()
    def one(n_decode=a.tokens):
        t0 = time.perf_counter()
        # logits_to_keep=1 as generate() does: only the last position goes through lm_head.
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        for _ in range(n_decode):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True, logits_to_keep=1)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t3 = time.perf_counter()
        return {"prefill_tokens_per_s": a.prompt_tokens / (t1 - t0),
                "decode_tokens_per_s": n_decode / (t3 - t2) if n_decode else None}

    one(4)
    return {"version": f"transformers {transformers.__version__}, torch {torch.__version__}, "
                       f"attn {model.config._attn_implementation}"}, one


def setup_llama_cpp(a):
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama
    n_pos = model_geometry(pathlib.Path(a.model))["n_positions"]
    # KV cache: llama.cpp's default is f16; --kv f32 makes it f32 like pf2lora's and transformers'.
    kv = {} if a.kv == "f16" else {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    llm = Llama(model_path=a.gguf, n_ctx=min(a.prompt_tokens + a.tokens + 8, n_pos), n_batch=a.prompt_tokens,
                n_ubatch=a.prompt_tokens, n_threads=a.threads, n_threads_batch=a.threads, logits_all=False,
                verbose=False, **kv)
    vocab = llm.n_vocab()
    ids = prompt_ids(a.prompt_tokens, vocab)

    def last_argmax():
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    def one(n_decode=a.tokens):
        llm.reset()                                                   # next eval drops the KV cache
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        nxt = last_argmax()
        t2 = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([nxt])
            nxt = last_argmax()
        t3 = time.perf_counter()
        return {"prefill_tokens_per_s": a.prompt_tokens / (t1 - t0),
                "decode_tokens_per_s": n_decode / (t3 - t2) if n_decode else None}

    one(4)
    return {"version": f"llama-cpp-python {llama_cpp.__version__}, GGUF {a.gguf_type}, {a.kv} KV cache",
            "rss_bytes": rss_bytes()}, one


def rss_bytes():
    """This process's resident memory (VmRSS), bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def setup_blas(a):
    """OpenBLAS through numpy: sgemv over the model's matmul weights (the bytes one decode step must
    read) and sgemm on the prefill shapes (T = prompt tokens) of one layer."""
    import numpy as np
    from safetensors.numpy import load_file
    cfg = json.loads((pathlib.Path(a.model) / "config.json").read_text())
    w = {}
    for f in weight_files(pathlib.Path(a.model)):
        if f.suffix == ".safetensors":
            w.update(load_file(str(f)))

    def get(name, prefixes=("", "transformer.")):
        for k in (p + name for p in prefixes):
            if k in w:
                return np.ascontiguousarray(w[k], dtype=np.float32)
        raise KeyError(name)
    mats = []                                                         # every matrix as (in, out)
    if is_llama(cfg):
        for i in range(cfg["num_hidden_layers"]):
            for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                mats.append(np.ascontiguousarray(get(f"model.layers.{i}.{n}.weight").T))   # stored (out, in)
        wte = get("lm_head.weight") if "lm_head.weight" in w else get("model.embed_tokens.weight")
        per_layer = 7
    else:
        for i in range(cfg["n_layer"]):
            for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                mats.append(get(f"h.{i}.{n}.weight"))               # (in, out), Conv1D layout
        wte = get("wte.weight")                                       # (V, C): logits = wte @ h
        per_layer = 4
    del w
    nbytes = sum(m.nbytes for m in mats) + wte.nbytes
    rng = np.random.default_rng(0)
    xs = {m.shape[0]: rng.standard_normal(m.shape[0]).astype(np.float32) for m in mats}
    h = rng.standard_normal(wte.shape[1]).astype(np.float32)
    T = a.prompt_tokens
    shapes = [(T, m.shape[0], m.shape[1]) for m in mats[:per_layer]]
    X = {k: rng.standard_normal((T, k)).astype(np.float32) for k in {s[1] for s in shapes}}
    flops = [2 * M * K * N for (M, K, N) in shapes]

    def gemv_pass():
        t0 = time.perf_counter()
        for m in mats:
            xs[m.shape[0]] @ m                                        # sgemv (transposed)
        wte @ h                                                       # sgemv
        return time.perf_counter() - t0

    def gemm_pass():
        times = []
        for m in mats[:per_layer]:
            t0 = time.perf_counter()
            X[m.shape[0]] @ m                                         # (T,K) @ (K,N) sgemm
            times.append(time.perf_counter() - t0)
        return times

    def one():
        t = statistics.median(gemv_pass() for _ in range(5))
        per = [statistics.median(col) for col in zip(*[gemm_pass() for _ in range(3)])]
        return {"sgemv_gb_per_s": nbytes / t / 1e9, "decode_bound_tokens_per_s": 1.0 / t,
                "sgemm_gflop_per_s": sum(flops) / sum(per) / 1e9,
                "sgemm_gflop_per_s_each": [f / s / 1e9 for f, s in zip(flops, per)]}

    gemv_pass()
    gemm_pass()
    info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return {"version": f"numpy {np.__version__} with {info.get('name')} {info.get('version')} "
                       f"({' '.join(info.get('openblas configuration', '').split())})",
            "weight_bytes_per_token": nbytes, "sgemm_shapes": [list(x) for x in shapes]}, one


SETUPS = {"transformers": setup_transformers, "llama.cpp": setup_llama_cpp, "llama.cpp-f32kv": setup_llama_cpp,
          "blas": setup_blas}


def worker_main(a):
    try:
        info, one = SETUPS[a.worker.split("@")[0]](a)                 # llama.cpp@q8_0: the llama.cpp setup
    except Exception as e:                                              # noqa: BLE001
        traceback.print_exc()
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        try:
            r = one()
        except Exception as e:                                          # noqa: BLE001
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(r), flush=True)


class Worker:
    """A persistent engine subprocess; stderr goes to WORK/<name>.log."""

    def __init__(self, name, args, extra=()):
        self.name, self.timeout = name, args.timeout
        self.log_path = pathlib.Path(args.work) / f"{name}.log"
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", name, "--model", str(args.model_dir),
               "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens), "--tokens", str(args.tokens),
               *extra]
        self.p = subprocess.Popen(cmd, env=thread_env(args.threads), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(self.log_path, "w"), text=True, bufsize=1)
        self.info = self._read()

    def _read(self):
        deadline = time.time() + self.timeout
        while True:
            left = deadline - time.time()
            if left <= 0 or not select.select([self.p.stdout], [], [], left)[0]:
                self.close()
                return {"error": f"no answer within {self.timeout} s (see {self.log_path})"}
            line = self.p.stdout.readline()
            if not line:
                code = self.p.wait()
                tail = " | ".join(self.log_path.read_text().strip().splitlines()[-2:])
                return {"error": f"exited with {code}: {tail[-300:]}"}
            if line.lstrip().startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    pass

    def run(self):
        try:
            self.p.stdin.write("run\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            return {"error": f"worker gone: {e}"}
        return self._read()

    def close(self):
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
                self.p.wait(timeout=30)
            except Exception:                                           # noqa: BLE001
                self.p.kill()
                self.p.wait()


def parse_json_line(stdout, code, stderr):
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    tail = " | ".join(stderr.strip().splitlines()[-3:])
    return {"error": f"exit {code}, no JSON on stdout: {tail[-400:]}"}


# ---- pf2lora (the CLI: one invocation per round)

class Pf2loraDecode:
    """`pf2lora bench decode --model DIR --batch 1 --tokens N --prompt-tokens P --threads T --repeats 1`:
    one JSON object on stdout with prefill_tokens_per_s and decode_tokens_per_s (the CLI loads the
    mapped model and does its own warm-up run each time). If the CLI rejects --threads/--repeats, the
    basic form is used."""

    def __init__(self, args, weights=None, batch=1):
        self.args, self.exe = args, pathlib.Path(args.pf2lora)
        prompt = args.prompt_tokens if batch == 1 or not getattr(args, "batch_prompt_tokens", None) else args.batch_prompt_tokens
        base = [str(self.exe), "bench", "decode", "--model", str(args.model_dir), "--batch", str(batch),
                "--tokens", str(args.tokens), "--prompt-tokens", str(prompt)]
        self.cmd = base + ["--threads", str(args.threads), "--repeats", "1"] + (["--weights", weights] if weights else [])
        if weights and getattr(args, "pf2lora_kv_cache", None):
            self.cmd += ["--kv-cache", args.pf2lora_kv_cache]
        if not self.exe.exists():
            self.info = {"error": f"{self.exe} not found (build it: swift build -c release)"}
            return
        # Precision mode, batch 1: also the read bound measured in the same process, decode steps and a
        # plain read of the same bytes alternating (`--read-bound-rounds`, since session 13): a `bench blas`
        # run seconds away can meet another memory-bandwidth phase of a shared machine.
        if weights and batch == 1:
            first = self._once(self.cmd + ["--read-bound-rounds", "20"])
            if "error" not in first:
                self.cmd += ["--read-bound-rounds", "20"]
                self.info = {"version": "pf2lora", "command": " ".join(self.cmd)}
                return
            log(f"pf2lora: {first['error'][:200]}; without --read-bound-rounds")
        first = self._once(self.cmd)
        if "error" in first:
            log(f"pf2lora: {first['error'][:200]}; retrying without --threads/--repeats")
            self.cmd = base
            first = self._once(self.cmd)
        self.info = first if "error" in first else {"version": "pf2lora", "command": " ".join(self.cmd)}

    def _once(self, cmd):
        a = self.args
        try:
            p = subprocess.run(cmd, env=thread_env(a.threads), capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"no answer within {a.timeout} s"}
        r = parse_json_line(p.stdout, p.returncode, p.stderr)
        if p.returncode != 0 and "error" not in r:
            r = {"error": f"exit {p.returncode}: {p.stderr.strip()[-400:]}"}
        missing = [k for k in ("prefill_tokens_per_s", "decode_tokens_per_s") if k not in r]
        if "error" not in r and missing:
            r = {"error": f"JSON has no {', '.join(missing)}: {json.dumps(r)[:300]}"}
        return r

    def run(self):
        return self._once(self.cmd)

    def close(self):
        pass


class Pf2loraBLAS(Pf2loraDecode):
    """Optional: `pf2lora bench blas --model DIR --prompt-tokens P --threads T`, keys sgemv_gb_per_s,
    decode_bound_tokens_per_s, sgemm_gflop_per_s (the OpenBLAS pf2lora links). Not available if the
    subcommand is missing."""

    def __init__(self, args):
        self.args, self.exe = args, pathlib.Path(args.pf2lora)
        self.cmd = [str(self.exe), "bench", "blas", "--model", str(args.model_dir),
                    "--prompt-tokens", str(args.prompt_tokens), "--threads", str(args.threads)]
        if getattr(args, "precision_list", None):
            self.cmd += ["--precisions", ",".join(args.precision_list)]
        if not self.exe.exists():
            self.info = {"error": f"{self.exe} not found"}
            return
        first = self._once(self.cmd)
        self.info = first if "error" in first else {"version": "pf2lora bench blas", "command": " ".join(self.cmd)}

    def _once(self, cmd):
        a = self.args
        try:
            p = subprocess.run(cmd, env=thread_env(a.threads), capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"no answer within {a.timeout} s"}
        if p.returncode != 0:
            return {"error": f"`bench blas` failed (exit {p.returncode}): {p.stderr.strip()[-200:]}"}
        r = parse_json_line(p.stdout, p.returncode, p.stderr)
        if "error" not in r and "sgemm_gflop_per_s" not in r:
            r = {"error": f"JSON has no sgemm_gflop_per_s: {json.dumps(r)[:200]}"}
        return r


# ---- llama.cpp: conversion to GGUF f32

def find_converter(args):
    """vendor/llama.cpp of llama-cpp-python's source distribution (convert_hf_to_gguf.py, conversion/,
    gguf-py/): --llama-src, else the cache, else `pip download` of the sdist into the cache."""
    cands = [pathlib.Path(args.llama_src)] if args.llama_src else []
    cached = CACHE / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    cands.append(cached)
    for c in cands:
        if (c / "convert_hf_to_gguf.py").exists():
            return c
    log(f"fetching llama-cpp-python=={LLAMA_CPP_VERSION} source distribution for convert_hf_to_gguf.py")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", tmp], check=True, stdout=sys.stderr,
                       timeout=900)
        sdist = next(pathlib.Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        import tarfile
        prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(prefix) and (
                m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith(prefix + "conversion/")
                or m.name.startswith(prefix + "gguf-py/"))]
            tf.extractall(CACHE, members=members, filter="data")
    if not (cached / "convert_hf_to_gguf.py").exists():
        raise FileNotFoundError(f"convert_hf_to_gguf.py not in the llama-cpp-python {LLAMA_CPP_VERSION} sdist")
    return cached


def convert_to_gguf(args, outtype="f32"):
    """GGUF f32 of the model folder, cached by the weights' size and mtime. The converter needs n_ctx
    in config.json and a tokenizer it recognises (gpt2's vocab.json/merges.txt/tokenizer.json); the
    model folder is not modified: a staging folder of symlinks gets a patched config.json."""
    d = args.model_dir
    files = weight_files(d)
    key = hashlib.sha256("".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns};" for f in files)
                         .encode()).hexdigest()[:12]
    out = pathlib.Path(args.work) / f"model-{outtype}-{key}.gguf"
    if out.exists():
        return out
    conv = find_converter(args)
    with tempfile.TemporaryDirectory(dir=args.work) as stage:
        stage = pathlib.Path(stage)
        cfg = json.loads((d / "config.json").read_text())
        cfg.setdefault("n_ctx", cfg.get("n_positions", cfg.get("max_position_embeddings", 1024)))
        cfg.setdefault("architectures", ["LlamaForCausalLM" if is_llama(cfg) else "GPT2LMHeadModel"])
        (stage / "config.json").write_text(json.dumps(cfg))
        for f in files:
            (stage / f.name).symlink_to(f.resolve())
        has_tok = (d / "vocab.json").exists() or (d / "tokenizer.json").exists()
        tok_src = d
        if not has_tok and SHARED_TOKENIZER.exists() and cfg["vocab_size"] == 50257:
            tok_src = SHARED_TOKENIZER                                  # the real GPT-2 tokenizer, same ids
        if not has_tok and SHARED_TOKENIZER.exists() and cfg["vocab_size"] < 50257:
            write_gpt2_bpe_cut(stage, cfg["vocab_size"])                # a stand-in vocabulary (ids are fed directly)
            tok_src = None
        for f in TOKENIZER_FILES if tok_src else ():
            if (tok_src / f).exists():
                (stage / f).symlink_to((tok_src / f).resolve())
        log(f"converting to GGUF {outtype} with {conv / 'convert_hf_to_gguf.py'}")
        tmp_out = out.with_suffix(".part")
        p = subprocess.run([sys.executable, str(conv / "convert_hf_to_gguf.py"), str(stage), "--outtype", outtype,
                            "--outfile", str(tmp_out)], capture_output=True, text=True, timeout=args.timeout)
        if p.returncode != 0:
            missing = re.search(r"No module named '([A-Za-z0-9_.]+)'", p.stderr)
            hint = f" (the converter needs `{missing.group(1)}`: python3 -m pip install {missing.group(1)})" if missing else ""
            raise RuntimeError("convert_hf_to_gguf.py failed" + hint + ": " + " | ".join(p.stderr.strip().splitlines()[-3:]))
        tmp_out.rename(out)
    return out


def start_llama_cpp(args, kv="f16", wtype="f32", name=None):
    try:
        import importlib.metadata as md
        v = md.version("llama-cpp-python")
    except Exception:                                                   # noqa: BLE001
        return None, {"error": f"llama-cpp-python is not installed (pip install llama-cpp-python=={LLAMA_CPP_VERSION})"}
    if v != LLAMA_CPP_VERSION:
        log(f"note: llama-cpp-python {v} installed, DESIGN §6 figures are for {LLAMA_CPP_VERSION}")
    try:
        gguf = convert_to_gguf(args, wtype)
    except Exception as e:                                              # noqa: BLE001
        return None, {"error": f"GGUF conversion: {e}"}
    w = Worker(name or ("llama.cpp" if kv == "f16" else "llama.cpp-f32kv"), args,
               ["--gguf", str(gguf), "--kv", kv, "--gguf-type", wtype])
    return w, w.info


# ----------------------------------------------------------------------------------------------------
# Report

def fmt(x, nd=1):
    return "–" if x is None else f"{x:,.{nd}f}"


def report(args, geo, res, made_by):
    P = args.prompt_tokens
    # FLOPs per prompt token of a prefill: the layer matmuls (2 per weight) plus attention
    # (QK^T and AV over on average (P+1)/2 keys); the lm_head only for the last token.
    attn = geo["n_layer"] * 2 * 2 * ((P + 1) / 2) * geo["attn_width"]
    flop_per_tok = 2 * geo["layer_matmul_params"] + attn
    bytes_per_tok = 4 * geo["matmul_params"]
    mm_flop_per_tok = 2 * geo["layer_matmul_params"]

    def ok(name):
        r = res.get(name, {})
        return "error" not in r and r.get("runs")

    def med(name, key):
        return median_of(res[name]["runs"], key) if ok(name) else None

    def spread(name, key):
        vals = [r[key] for r in res[name]["runs"] if r.get(key) is not None]
        return f"{min(vals):,.1f}–{max(vals):,.1f}" if vals else "–"

    ref = (med("llama.cpp", "prefill_tokens_per_s"), med("llama.cpp", "decode_tokens_per_s"))

    def ratio(x, r):
        return fmt(x / r, 2) + "x" if x and r else "–"

    lines = [f"Peer benchmark, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {platform.node()}, "
             f"{os.cpu_count()} CPUs, {args.threads} threads, batch 1, {args.shape_label} shape f32 random weights "
             f"(model made by {made_by}), prefill {P} tokens, then {args.tokens} decode steps. Engines measured "
             f"round-robin, {args.repeats} rounds, median (min–max in the notes). Load average "
             f"{args.load_start} at start, {'%.2f %.2f %.2f' % os.getloadavg()} at end: above {os.cpu_count()} "
             f"the machine is contended and only same-run ratios mean much.", "",
             "| engine | prefill tok/s | decode tok/s | prefill vs llama.cpp | decode vs llama.cpp | prefill GFLOP/s | decode GB/s | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, label in (("pf2lora", "pf2lora"), ("transformers", "transformers (PyTorch CPU)"),
                        ("llama.cpp", "llama.cpp (llama-cpp-python, GGUF f32, f16 KV: its default)"),
                        ("llama.cpp-f32kv", "llama.cpp (llama-cpp-python, GGUF f32, f32 KV)")):
        if not ok(name):
            lines.append(f"| {label} | not available | not available | – | – | – | – | {res[name].get('error', 'no runs')} |")
            continue
        pre, dec = med(name, "prefill_tokens_per_s"), med(name, "decode_tokens_per_s")
        note = (f"{res[name].get('version', '')}; prefill {spread(name, 'prefill_tokens_per_s')}, "
                f"decode {spread(name, 'decode_tokens_per_s')}")
        lines.append(f"| {label} | {fmt(pre)} | {fmt(dec)} | {ratio(pre, ref[0])} | {ratio(dec, ref[1])} | "
                     f"{fmt(pre * flop_per_tok / 1e9 if pre else None)} | {fmt(dec * bytes_per_tok / 1e9 if dec else None)} | {note} |")
    bounds = {}
    for name, label in (("blas", "OpenBLAS bound (numpy: sgemm / sgemv)"), ("pf2lora_blas", "OpenBLAS bound (pf2lora bench blas)")):
        if not ok(name):
            if name == "blas" or "not found" not in res[name].get("error", "not found"):
                lines.append(f"| {label} | not available | not available | – | – | – | – | {res[name].get('error', 'no runs')} |")
            continue
        gf, dec, gbs = med(name, "sgemm_gflop_per_s"), med(name, "decode_bound_tokens_per_s"), med(name, "sgemv_gb_per_s")
        pre = gf * 1e9 / mm_flop_per_tok
        bounds[name] = (gf, dec)
        note = res[name].get("version", "") + f"; sgemm GFLOP/s {spread(name, 'sgemm_gflop_per_s')}, sgemv GB/s {spread(name, 'sgemv_gb_per_s')}"
        lines.append(f"| {label} | {fmt(pre)} | {fmt(dec)} | {ratio(pre, ref[0])} | {ratio(dec, ref[1])} | "
                     f"{fmt(gf)} | {fmt(gbs)} | {note} |")
    read_bound = None
    if ok("pf2lora_blas") and med("pf2lora_blas", "read_bound_tokens_per_s"):
        read_bound = med("pf2lora_blas", "read_bound_tokens_per_s")
        note = f"pf2lora bench blas, {res['pf2lora_blas']['runs'][0].get('read_threads', '?')} threads; read GB/s {spread('pf2lora_blas', 'read_gb_per_s')}"
        lines.append(f"| memory-read bound (plain read of the same weights) | – | {fmt(read_bound)} | – | {ratio(read_bound, ref[1])} | "
                     f"– | {fmt(med('pf2lora_blas', 'read_gb_per_s'))} | {note} |")
    lines += ["", f"prefill GFLOP/s = prefill tok/s x {flop_per_tok / 1e6:.1f} MFLOP/token (layer matmuls + attention at "
              f"{P} tokens; the lm_head runs for the last token only and is left out); decode GB/s = decode tok/s x "
              f"{bytes_per_tok / 1e6:.1f} MB of f32 matmul weights read per token (tied lm_head included). "
              f"The OpenBLAS rows: sgemm GFLOP/s on the {7 if geo['family'] != 'gpt2' else 4} layer shapes at {P} rows, as tok/s = GFLOP/s / "
              f"{mm_flop_per_tok / 1e6:.1f} MFLOP; one sgemv pass over all those weights, as tok/s = 1 / pass time. "
              f"The memory-read row: the same weight bytes summed by pf2lora's worker pool (the least work per byte), "
              f"as tok/s = 1 / read time: the memory-bandwidth limit of batch-1 decode."]
    src = "pf2lora_blas" if "pf2lora_blas" in bounds else ("blas" if "blas" in bounds else None)
    if ok("pf2lora") and src:
        pre, dec = med("pf2lora", "prefill_tokens_per_s"), med("pf2lora", "decode_tokens_per_s")
        gf, dec_b = bounds[src]
        what = "pf2lora bench blas" if src == "pf2lora_blas" else "numpy"
        lines += ["", "Issue 3 targets, pf2lora:"]
        for peer, what_kv in (("llama.cpp", "f16 KV, llama.cpp's default"), ("llama.cpp-f32kv", "f32 KV, the same precision as pf2lora")):
            if not ok(peer):
                continue
            paired = [a_run["decode_tokens_per_s"] / b_run["decode_tokens_per_s"]
                      for a_run, b_run in zip(res["pf2lora"]["runs"], res[peer]["runs"])
                      if a_run.get("decode_tokens_per_s") and b_run.get("decode_tokens_per_s")]
            pair_note = (f"; per round: median {statistics.median(paired):.2f}x, "
                         f"pf2lora faster in {sum(r > 1 for r in paired)} of {len(paired)} rounds" if paired else "")
            lines.append(f"- decode vs llama.cpp ({what_kv}): {ratio(dec, med(peer, 'decode_tokens_per_s'))} (target >= 1.00x){pair_note}")
        if read_bound:
            lines.append(f"- decode vs the memory-read bound (pf2lora bench blas): {ratio(dec, read_bound)} (target >= 0.67x, i.e. within 1.5x)")
        lines += [f"- decode vs the OpenBLAS sgemv bound ({what}): {ratio(dec, dec_b)} (for reference: sgemv is no longer what decode runs)",
                  f"- prefill GFLOP/s vs sgemm ({what}): {ratio(pre * flop_per_tok / 1e9, gf)} (target >= 0.70x)"]
    if ok("pf2lora") and geo["family"] != "gpt2":
        pre, dec = med("pf2lora", "prefill_tokens_per_s"), med("pf2lora", "decode_tokens_per_s")
        lines += ["", "Issue 12 targets (Llama family), pf2lora:"]
        for peer, what_kv in (("llama.cpp", "f16 KV, llama.cpp's default"), ("llama.cpp-f32kv", "f32 KV")):
            if ok(peer):
                lines.append(f"- vs llama.cpp ({what_kv}): decode {ratio(dec, med(peer, 'decode_tokens_per_s'))} "
                             f"(target >= 1.00x), prefill {ratio(pre, med(peer, 'prefill_tokens_per_s'))} (target >= 1.20x)")
    lines += ["", "Command: `python3 Benchmarks/peer_bench.py " + " ".join(sys.argv[1:]) + "`"]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face GPT-2 or Llama-family folder; default: make a random model of --shape in --work")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-124m",
                    help="the random model's shape when --model is not given: gpt2-124m, or smollm2-135m "
                         "(SmolLM2-135M's config: 30 layers, hidden 576, 9 heads / 3 KV heads, tied)")
    ap.add_argument("--make-model", choices=["auto", "pf2lora", "transformers"], default="auto",
                    help="who makes the random model when --model is not given (auto: pf2lora if the binary exists)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pf2lora", default=str(ROOT / ".build" / "release" / "pf2lora"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="pf2lora,transformers,llama.cpp,llama.cpp-f32kv,blas",
                    help="any of pf2lora, transformers, llama.cpp (its default f16 KV cache), llama.cpp-f32kv "
                         "(f32 KV cache, the precision pf2lora and transformers keep), blas")
    ap.add_argument("--llama-src", help="vendor/llama.cpp folder of the llama-cpp-python sdist (with convert_hf_to_gguf.py)")
    ap.add_argument("--work", default=str(pathlib.Path(tempfile.gettempdir()) / "pf2lora-peer-bench"))
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", help="also write the Markdown table here (and the raw results to OUT.json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--kv", default="f16", choices=["f16", "f32"], help=argparse.SUPPRESS)
    ap.add_argument("--gguf-type", default="f32", help=argparse.SUPPRESS)
    ap.add_argument("--precisions", help="issue 14 mode: compare pf2lora (`bench decode --weights P`) with llama.cpp on "
                                         "the same weights converted to GGUF P (convert_hf_to_gguf.py --outtype P), for "
                                         "each P of this comma-separated list (f32, f16, bf16, q8_0), plus the memory-read "
                                         "bound per precision and resident memory; see Benchmarks/README.md")
    ap.add_argument("--batches", default="1", help="with --precisions: pf2lora decode batch sizes (e.g. 1,4,8); "
                                                   "llama.cpp runs batch 1 only")
    ap.add_argument("--batch-prompt-tokens", type=int,
                    help="with --batches: the prompt length of the batch > 1 runs (default --prompt-tokens); their "
                         "prefill is batch x this many tokens, so 8 x 512 dominates a run on a loaded 2-core machine")
    ap.add_argument("--pf2lora-kv-cache", choices=["auto", "f32", "f16"],
                    help="with --precisions: pf2lora's `--kv-cache` (default: its own, auto = f16 for q8_0 weights, "
                         "f32 otherwise; llama.cpp's cache is f16 at every precision)")
    a = ap.parse_args()

    if a.worker:                                                        # subprocess mode
        worker_main(a)
        return

    pathlib.Path(a.work).mkdir(parents=True, exist_ok=True)
    a.load_start = "%.2f %.2f %.2f" % os.getloadavg()
    a.model_dir, made_by = make_model(a)
    geo = model_geometry(a.model_dir)
    a.shape_label = SHAPES[a.shape] if not a.model else f"{geo['family']} ({a.model_dir.name})"
    if a.prompt_tokens + a.tokens > geo["n_positions"]:
        sys.exit(f"peer_bench: --prompt-tokens + --tokens = {a.prompt_tokens + a.tokens} exceeds n_positions {geo['n_positions']}")
    wanted = {e.strip() for e in a.engines.split(",")}
    if a.precisions:
        a.precision_list = [p.strip() for p in a.precisions.split(",") if p.strip()]
        batches = [int(b) for b in a.batches.split(",")]
        if batches[0] > 1:
            sys.exit("peer_bench: --batches must start with 1 (the batch-1 comparison with llama.cpp)")
        starters = {}
        # Batch 1 first, as one chain of neighbours in time: llama.cpp@f32, pf2lora@f32, pf2lora@q8_0,
        # llama.cpp@q8_0, bench blas, llama.cpp@f16, pf2lora@f16 (for --precisions f32,f16,q8_0): each
        # pf2lora run sits beside llama.cpp at its precision, and pf2lora f32 beside pf2lora q8_0, so
        # each round's ratios compare runs seconds apart. Rounds alternate forward and reversed
        # (`run_rounds`, ordered=True), which keeps every pair adjacent. Larger batches after them.
        chain = sorted(a.precision_list, key=lambda p: {"f32": 0, "q8_0": 1}.get(p, 2))
        for i, p in enumerate(chain):
            pair = []
            if "llama.cpp" in wanted:
                pair.append((f"llama.cpp@{p}", lambda p=p: start_llama_cpp(a, wtype=p, name=f"llama.cpp@{p}")))
            if "pf2lora" in wanted:
                pair.append((f"pf2lora@{p}", lambda p=p: with_info(Pf2loraDecode(a, p, 1))))
            for name, start in (pair if i % 2 == 0 else pair[::-1]):
                starters[name] = start
            if "blas" in wanted and i == min(1, len(chain) - 1):    # after the second pair (or the only one)
                starters["pf2lora_blas"] = lambda: with_info(Pf2loraBLAS(a))
        for p in chain:
            for b in batches:
                if b > 1 and "pf2lora" in wanted:
                    starters[f"pf2lora@{p}/b{b}"] = (lambda p=p, b=b: with_info(Pf2loraDecode(a, p, b)))
        res, live = run_rounds(a, starters, lambda name: True, ordered=True)
        table = report_precisions(a, geo, res, made_by, batches)
        print(table)
        if a.out:
            pathlib.Path(a.out).write_text(table)
            pathlib.Path(a.out).with_suffix(".json").write_text(json.dumps(
                {"geometry": geo, "results": res, "argv": sys.argv[1:]}, indent=1) + "\n")
        return
    starters = {
        "pf2lora": lambda: with_info(Pf2loraDecode(a)),
        "transformers": lambda: with_info(Worker("transformers", a)),
        "llama.cpp": lambda: start_llama_cpp(a),
        "llama.cpp-f32kv": lambda: start_llama_cpp(a, kv="f32"),
        "blas": lambda: with_info(Worker("blas", a)),
        "pf2lora_blas": lambda: with_info(Pf2loraBLAS(a)),
    }
    res, live = run_rounds(a, starters, lambda name: ("blas" if name == "pf2lora_blas" else name) in wanted)
    table = report(a, geo, res, made_by)
    print(table)
    if a.out:
        pathlib.Path(a.out).write_text(table)
        pathlib.Path(a.out).with_suffix(".json").write_text(json.dumps(
            {"geometry": geo, "results": res, "argv": sys.argv[1:]}, indent=1) + "\n")


def with_info(engine):
    """A starter's answer: the engine and what it reported when it started (or its error)."""
    return engine, engine.info


def run_rounds(a, starters, wanted, ordered=False):
    """Starts every engine (warm-up inside), then `--repeats` round-robin rounds; returns (results, live).
    The order rotates by one engine per round, or with `ordered` runs forward in even rounds and
    reversed in odd ones (neighbours stay neighbours). Each run records its round and start time."""
    res, live = {}, {}
    for name, start in starters.items():
        if not wanted(name):
            res[name] = {"error": "not requested (--engines)"}
            continue
        log(f"{name}: starting")
        try:
            eng, info = start()
        except Exception as e:                                          # noqa: BLE001
            eng, info = None, {"error": f"{type(e).__name__}: {e}"}
        if "error" in info:
            log(f"{name}: not available: {info['error'][:300]}")
            res[name] = {"error": info["error"]}
            if eng is not None:
                eng.close()
        else:
            res[name] = {**{k: v for k, v in info.items() if k != "ready"}, "runs": []}
            live[name] = eng
    order = list(live)
    for rnd in range(a.repeats):
        this = (order if rnd % 2 == 0 else order[::-1]) if ordered else order[rnd % max(1, len(order)):] + order[:rnd % max(1, len(order))]
        for name in this:
            if name not in live:
                continue
            t0 = time.time()
            r = live[name].run()
            if "error" in r:
                log(f"{name}: round {rnd + 1} failed: {r['error'][:300]}")
                res[name] = {"error": r["error"]}
                live.pop(name).close()
                continue
            r["round"], r["started"] = rnd + 1, datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
            r["load"] = os.getloadavg()[0]
            res[name]["runs"].append(r)
            brief = {k: round(v, 1) for k, v in r.items() if isinstance(v, float)}
            log(f"round {rnd + 1}/{a.repeats} {name}: {brief} ({time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f})")
    for eng in live.values():
        eng.close()
    return res, live


def report_precisions(a, geo, res, made_by, batches):
    """Issue 14's table: per precision, pf2lora vs llama.cpp (batch 1), pf2lora at larger batches,
    the memory-read bound of that precision's bytes, resident memory; then the targets."""
    def ok(name):
        r = res.get(name, {})
        return "error" not in r and r.get("runs")

    def med(name, key):
        if not ok(name):
            return None
        vals = [r[key] for r in res[name]["runs"] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def ratio(x, r):
        return fmt(x / r, 2) + "x" if x and r else "–"

    def paired(x, y, key):
        if not (ok(x) and ok(y)):
            return None
        rs = [p[key] / q[key] for p, q in zip(res[x]["runs"], res[y]["runs"]) if p.get(key) and q.get(key)]
        return statistics.median(rs) if rs else None

    P = a.prompt_tokens
    lines = [f"Precision benchmark (issue 14), {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {platform.node()}, "
             f"{os.cpu_count()} CPUs, {a.threads} threads, {a.shape_label} shape random weights (model made by {made_by}), "
             f"prefill {P} tokens then {a.tokens} decode steps; engines round-robin, {a.repeats} rounds, medians"
             f"{'; pf2lora --kv-cache ' + a.pf2lora_kv_cache if getattr(a, 'pf2lora_kv_cache', None) else ''}. "
             f"Load average {a.load_start} at start, {'%.2f %.2f %.2f' % os.getloadavg()} at end.", "",
             "| weights | pf2lora prefill tok/s | pf2lora decode tok/s | llama.cpp prefill tok/s | llama.cpp decode tok/s | "
             "decode vs llama.cpp (per-round median) | prefill vs llama.cpp | read bound tok/s (weights + KV) | "
             "decode vs read bound (weights only) | decode vs read bound, in-process (rounds' range) | pf2lora RSS MB | llama.cpp RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    blas = res.get("pf2lora_blas", {})
    for p in a.precision_list:
        me, peer = f"pf2lora@{p}", f"llama.cpp@{p}"
        pre, dec = med(me, "prefill_tokens_per_s"), med(me, "decode_tokens_per_s")
        lpre, ldec = med(peer, "prefill_tokens_per_s"), med(peer, "decode_tokens_per_s")
        rb = med("pf2lora_blas", f"read_bound_tokens_per_s_{p}")
        rbkv = read_bound_with_kv(a, geo, res, p)
        pr = paired(me, peer, "decode_tokens_per_s")
        rss = med(me, "rss_bytes")
        lrss = res.get(peer, {}).get("rss_bytes")
        lines.append(f"| {p} | {fmt(pre)} | {fmt(dec)} | {fmt(lpre) if ok(peer) else 'n/a'} | {fmt(ldec) if ok(peer) else 'n/a'} | "
                     f"{ratio(dec, ldec)} ({fmt(pr, 2) + 'x' if pr else '–'}) | {ratio(pre, lpre)} | {fmt(rbkv)} ({fmt(rb)}) | "
                     f"{ratio(dec, rbkv)} ({ratio(dec, rb)}) | {in_process(res, me)} | "
                     f"{fmt(rss / 1e6 if rss else None, 0)} | {fmt(lrss / 1e6 if lrss else None, 0)} |")
    for name in res:
        if "error" in res[name] and res[name]["error"] != "not requested (--engines)":
            lines.append(f"\n- {name}: not available: {res[name]['error'][:300]}")
    if len(batches) > 1:
        bp = a.batch_prompt_tokens or P
        lines += ["", f"Batch > 1: prompts of {bp} tokens each (decode at context {bp}..{bp + a.tokens}); batch 1: {P}.",
                  "", "| weights | " + " | ".join(f"pf2lora decode tok/s, batch {b}" for b in batches) + " |",
                  "|---|" + "---:|" * len(batches)]
        for p in a.precision_list:
            cells = [fmt(med(f"pf2lora@{p}" + (f"/b{b}" if b > 1 else ""), "decode_tokens_per_s")) for b in batches]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    f32d, f32p = med("pf2lora@f32", "decode_tokens_per_s"), med("pf2lora@f32", "prefill_tokens_per_s")
    lines += ["", "Issue 14 targets, pf2lora:"]
    for p in a.precision_list:
        me, peer = f"pf2lora@{p}", f"llama.cpp@{p}"
        dec = med(me, "decode_tokens_per_s")
        lines.append(f"- {p}: decode vs llama.cpp {ratio(dec, med(peer, 'decode_tokens_per_s'))} (target >= 1.10x); "
                     f"vs the read bound {ratio(dec, read_bound_with_kv(a, geo, res, p))} (target >= 0.80x; "
                     f"{ratio(dec, med('pf2lora_blas', f'read_bound_tokens_per_s_{p}'))} counting the weights only; "
                     f"in the same process {in_process(res, me)})"
                     + (f"; prefill vs own f32 {ratio(med(me, 'prefill_tokens_per_s'), f32p)} (target >= 0.90x)" if p in ("f16", "q8_0") else "")
                     + (f"; decode vs own f32 {ratio(dec, f32d)} (target >= 3x), per round {fmt(paired(me, 'pf2lora@f32', 'decode_tokens_per_s'), 2)}x" if p == "q8_0" else ""))
    lines += per_round_precisions(a, geo, res)
    lines += ["", "Command: `python3 Benchmarks/peer_bench.py " + " ".join(sys.argv[1:]) + "`"]
    return "\n".join(lines) + "\n"


def in_process(res, name):
    """pf2lora's decode vs the read bound measured in its own process (`bench decode
    --read-bound-rounds`: the median of each run's per-round ratios, and the runs' range), or "–"."""
    r = res.get(name, {})
    runs = [x for x in r.get("runs", []) if x.get("decode_vs_read_bound")] if "error" not in r else []
    if not runs:
        return "–"
    vals = sorted(x["decode_vs_read_bound"] for x in runs)
    return f"{statistics.median(vals):.2f}x ({vals[0]:.2f}-{vals[-1]:.2f})"


def read_bound_with_kv(a, geo, res, p):
    """The memory-read bound of a batch-1 decode step at precision p: `bench blas`'s plain-read
    bandwidth (per round, median over rounds) over every byte the step must read: the weights at p
    and pf2lora's KV cache (its precision: f16 for a q8_0 base, f32 otherwise, unless
    --pf2lora-kv-cache) at the mean decode context. Until session 8 the headline bound counted the
    weights only, which overstated it by the KV bytes (4-16 % at context 528)."""
    r = res.get("pf2lora_blas", {})
    if "error" in r:
        return None
    ctx = a.prompt_tokens + a.tokens / 2
    vals = []
    for run in r.get("runs", []):
        gb, wb = run.get(f"read_gb_per_s_{p}"), run.get(f"weight_bytes_per_token_{p}")
        if gb and wb:
            vals.append(gb * 1e9 / (wb + kv_bytes_per_token(geo, ctx, kv_value_bytes(a, p))))
    return statistics.median(vals) if vals else None


def kv_value_bytes(a, p):
    """Bytes per cached key or value element of pf2lora's KV cache at weights p."""
    kvc = getattr(a, "pf2lora_kv_cache", None) or "auto"
    return 2 if kvc == "f16" or (kvc == "auto" and p == "q8_0") else 4


def kv_bytes_per_token(geo, context, bytes_per_value):
    """The KV cache one decode step at `context` positions reads: keys and values of every layer."""
    return 2 * geo["n_layer"] * geo["n_kv_head"] * geo["head_dim"] * context * bytes_per_value


def per_round_precisions(a, geo, res):
    """Each round's ratios (runs of one round are neighbours in time; see main's chain), and the read
    bound counting the KV cache a decode step reads beside the weights (pf2lora's cache: f16 for a
    q8_0 base, f32 otherwise, unless --pf2lora-kv-cache; at the mean decode context prompt + tokens / 2)."""
    def run(name, rnd):
        for r in res.get(name, {}).get("runs", []) if "error" not in res.get(name, {}) else []:
            if r.get("round") == rnd:
                return r
        return None

    def q(x, y):
        return f"{x / y:.2f}x" if x and y else "–"

    ctx = a.prompt_tokens + a.tokens / 2
    ps = a.precision_list
    head = (["round", "UTC", "load"] + [f"{p} vs llama.cpp" for p in ps]
            + (["q8_0 vs own f32"] if "q8_0" in ps and "f32" in ps else [])
            + [f"prefill {p} vs own f32" for p in ps if p != "f32" and "f32" in ps]
            + [f"{p} vs read bound (weights only)" for p in ps]
            + [f"{p} vs read bound, in-process" for p in ps])
    lines = ["", f"Per round (decode at batch 1; read bound: that round's `bench blas` read bandwidth over the "
                 f"bytes a step reads, the weights plus pf2lora's KV cache at context {ctx:.0f}; in brackets over "
                 f"the weights only):", "", "| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * (len(head) - 3)]
    for rnd in range(1, a.repeats + 1):
        first = [r for r in (run(n, rnd) for n in res) if r]
        if not first:
            continue
        cells = [str(rnd), min(r["started"] for r in first), f"{max(r['load'] for r in first):.1f}"]
        me = {p: run(f"pf2lora@{p}", rnd) or {} for p in ps}
        for p in ps:
            cells.append(q(me[p].get("decode_tokens_per_s"), (run(f"llama.cpp@{p}", rnd) or {}).get("decode_tokens_per_s")))
        if "q8_0" in ps and "f32" in ps:
            cells.append(q(me["q8_0"].get("decode_tokens_per_s"), me["f32"].get("decode_tokens_per_s")))
        for p in ps:
            if p != "f32" and "f32" in ps:
                cells.append(q(me[p].get("prefill_tokens_per_s"), me["f32"].get("prefill_tokens_per_s")))
        blas = run("pf2lora_blas", rnd) or {}
        for p in ps:
            gb, wb, dec = blas.get(f"read_gb_per_s_{p}"), blas.get(f"weight_bytes_per_token_{p}"), me[p].get("decode_tokens_per_s")
            if gb and wb and dec:
                kv = kv_bytes_per_token(geo, ctx, kv_value_bytes(a, p))
                cells.append(f"{dec / (gb * 1e9 / (wb + kv)):.2f}x ({dec / (gb * 1e9 / wb):.2f}x)")
            else:
                cells.append("–")
        for p in ps:
            v = me[p].get("decode_vs_read_bound")
            cells.append(f"{v:.2f}x" if v else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
