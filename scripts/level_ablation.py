#!/usr/bin/env python3
"""Which level of a PF2LoRA run carries each client (docs/RESULTS-fair.md §4, "Why PF2LoRA trails Local-only"): every
client's loss on a split with the base alone, the shared pair alone, the client pair alone and both pairs, read from
a finished `pf2lora federate` run's adapter store (RUN/store) and settings (RUN/metrics.json).

    python3 scripts/level_ablation.py RUN [RUN ...] [--split test] [--windows N] [--json OUT]

The evaluation is the one `federate` makes (LMTask.evaluateTotals): each split's texts tokenized with the base's
tokenizer, an end-of-text token before each text, windows of --seq tokens at stride --seq (the first --windows of
them: the run's --eval-windows, read from its command.txt, else all), every next token a target; mean cross-entropy
per target token. A GPT-2 base in Hugging Face format is run with torch (transformers' GPT2LMHeadModel, CPU, one
thread) and the store's pairs added to its Conv1D outputs: y += s1 * B(A x) + s2 * D(C x), s = alpha / rank of each
level (use_rslora false). Check: for "base" and "both" (and "shared" for PF2LoRA) the script prints its numbers next
to the run's metrics.json (base_test_loss, test_loss, shared_only_test_loss): they agree to about 1e-4 when the
evaluation is reproduced (float32 in both; the tokenizer is the same tokenizer.json).
A run whose store has no client pairs (single-level methods) gets base and "shared" (its one LoRA) only.
Needs torch, transformers, safetensors and the zstd command; nothing is written except --json.
"""
import argparse
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile


def read_pairs(path):
    """The tensors of one store file (a zstd frame of a safetensors file) and its metadata."""
    from safetensors import safe_open
    with tempfile.TemporaryDirectory() as td:
        raw = os.path.join(td, "a.safetensors")
        subprocess.run(["zstd", "-q", "-d", "-f", str(path), "-o", raw], check=True)
        with safe_open(raw, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    return tensors, meta


def latest(folder):
    files = sorted(p for p in folder.glob("v*.safetensors.zst"))
    return files[-1] if files else None


def by_module(tensors, a, b):
    """{'transformer.h.0.attn.c_attn': (A or C [r, in], B or D [out, r])} from PEFT names."""
    out = {}
    for k, v in tensors.items():
        for lv in (a, b):
            tag = f".lora_{lv}.weight"
            if k.endswith(tag):
                mod = k[len("base_model.model."):-len(tag)] if k.startswith("base_model.model.") else k[:-len(tag)]
                out.setdefault(mod, {})[lv] = v
    return {m: (d[a], d[b]) for m, d in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--split", default="test", choices=["train", "valid", "test"])
    ap.add_argument("--windows", type=int, default=0, help="windows per client (default: the run's --eval-windows)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import torch
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    results = {}
    cache = {}
    for run in a.runs:
        run = pathlib.Path(run)
        m = json.loads((run / "metrics.json").read_text())
        cmd = shlex.split((run / "command.txt").read_text()) if (run / "command.txt").exists() else []
        flag = lambda k, d=None: cmd[cmd.index(k) + 1] if k in cmd else d
        model_dir, data = m["model"], pathlib.Path(m["data"])
        windows = a.windows or int(flag("--eval-windows", "0"))
        T = int(m["seq"])
        if model_dir not in cache:
            model = GPT2LMHeadModel.from_pretrained(model_dir).float().eval()
            tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
            cache[model_dir] = (model, tok, {n: mod for n, mod in model.named_modules()})
        model, tok, mods = cache[model_dir]
        eos = model.config.eos_token_id
        base = pathlib.Path(m["store"]).name
        store = run / "store" / base
        sh_file = latest(store / "shared")
        sh_t, sh_meta = read_pairs(sh_file) if sh_file else ({}, {})
        shared = by_module(sh_t, "A", "B")
        s1 = float(sh_meta.get("alpha", 0)) / float(sh_meta.get("rank", 1)) if sh_file else 0.0
        state = {"shared": None, "client": None, "s2": 0.0}

        def make_hook(name):
            def hook(module, inp, out):
                x = inp[0]
                for lv, scale in (("shared", s1), ("client", state["s2"])):
                    pairs = state[lv]
                    if pairs and name in pairs:
                        A, B = pairs[name]
                        out = out + scale * (x @ A.t()) @ B.t()
                return out
            return hook
        targets = tuple("." + t for t in m["targets"])
        hooks = [mod.register_forward_hook(make_hook(n)) for n, mod in mods.items() if n.endswith(targets)]
        rows = {}
        for c in m["clients"]:
            cid = c["client"]
            cf = latest(store / "clients" / cid)
            ct, cmeta = read_pairs(cf) if cf else ({}, {})
            client = by_module(ct, "C", "D")
            s2 = float(cmeta.get("alpha", 0)) / float(cmeta.get("rank", 1)) if cf else 0.0
            texts = [json.loads(l)["text"] for l in open(data / cid / f"{a.split}.jsonl", encoding="utf-8") if l.strip()]
            stream = []
            for t in texts:
                ids = tok.encode(t, add_special_tokens=False).ids
                if ids:
                    stream += [eos] + ids
            starts = list(range(0, max(1, len(stream) - 1), T))
            if windows:
                starts = starts[:windows]
            inp, tgt = [], []
            for s0 in starts:
                w = stream[s0:s0 + T + 1]
                inp.append(w[:-1] + [eos] * (T + 1 - len(w)) if len(w) <= T else w[:T])
                tg = w[1:]
                tgt.append(tg + [-100] * (T - len(tg)))
            X, Y = torch.tensor(inp), torch.tensor(tgt)
            out = {}
            conds = [("base", None, None), ("shared", shared, None)]
            if client:
                conds += [("client", None, client), ("both", shared, client)]
            for cname, sp, cp in conds:
                state["shared"], state["client"], state["s2"] = sp, cp, s2
                logits = model(X).logits
                out[cname] = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1),
                                                               ignore_index=-100).item()
            rec = {"base_test_loss": c.get(f"base_{a.split}_loss"), "test_loss": c.get(f"{a.split}_loss"),
                   "shared_only_test_loss": c.get(f"shared_only_{a.split}_loss")}
            out["run_metrics"] = rec
            rows[cid] = out
        for h in hooks:
            h.remove()
        results[str(run)] = {"method": m["method"], "seed": m["seed"], "split": a.split, "windows": windows, "clients": rows}
        names = ["base", "shared", "client", "both"] if any("both" in r for r in rows.values()) else ["base", "shared"]
        print(f"\n{run} ({m['method']}, seed {m['seed']}, {a.split}, {windows or 'all'} windows of {T})")
        print("| client | " + " | ".join(names) + " | run: base / both / shared alone |")
        print("|---|" + "---:|" * len(names) + "---|")
        for cid, r in rows.items():
            rm = r["run_metrics"]
            f = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
            print(f"| {cid} | " + " | ".join(f"{r[n]:.4f}" for n in names) +
                  f" | {f(rm['base_test_loss'])} / {f(rm['test_loss'])} / {f(rm['shared_only_test_loss'])} |")
        n = len(rows)
        print("| **mean** | " + " | ".join(f"**{sum(r[x] for r in rows.values()) / n:.4f}**" for x in names) + " | |")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
