#!/usr/bin/env python3
"""One two-level-LoRA training step, pf2lora against PyTorch + PEFT, in the same run.

Both sides: GPT-2 from the same folder, a rank-r shared adapter and a rank-r2 client adapter on
c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj of every layer, both active and trainable, the base frozen;
B x T random token ids with labels = input ids (Hugging Face's causal-LM loss); forward + backward, no
optimizer step. One warm-up step, then the median of --repeats steps. PyTorch runs with --threads
intra-op threads; pf2lora with the same number of OpenBLAS threads. The two sides alternate
(pf2lora, torch, pf2lora, torch) so that machine noise hits both.

    swift build -c release
    .build/release/pf2lora model random --config gpt2 --out /tmp/g124 --force
    python3 Benchmarks/train_step_bench.py --model /tmp/g124 --out Benchmarks/results/train_step.md

Writes a Markdown table (stdout, and --out if given).
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time


def pf2lora_step(args) -> dict:
    cmd = [args.binary, "bench", "train", "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
           "--rank", str(args.rank), "--rank2", str(args.rank2), "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def torch_step(args) -> dict:
    import torch
    import transformers
    import peft
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    targets = ["c_attn", "c_proj", "c_fc"]          # c_proj matches attn.c_proj and mlp.c_proj
    shared = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, fan_in_fan_out=True, lora_dropout=0.0)
    client = LoraConfig(r=args.rank2, lora_alpha=2 * args.rank2, target_modules=targets, fan_in_fan_out=True, lora_dropout=0.0)
    pm = get_peft_model(model, shared, adapter_name="shared")
    pm.add_adapter("client", client)
    pm.base_model.set_adapter(["shared", "client"])      # both levels active in the forward
    for n, p in pm.named_parameters():
        p.requires_grad_(".lora_" in n)                 # and both trainable; the base frozen
    # Non-zero B/D as after some training (PEFT initialises them to 0; the cost is the same).
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.01)
    n_train = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    pm.eval()   # no dropout (pf2lora has none); autograd works the same in eval mode
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    times, fwd = [], []
    for rep in range(args.repeats + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            pm(input_ids=ids, labels=ids)
        tf = time.perf_counter() - t0
        pm.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        ts = time.perf_counter() - t0
        print(f"torch: run {rep}: step {ts * 1000:.1f} ms (forward only {tf * 1000:.1f} ms), loss {loss.item():.4f}",
              file=sys.stderr)
        if rep > 0:
            times.append(ts)
            fwd.append(tf)
    return {"step_ms": statistics.median(times) * 1000, "forward_ms": statistics.median(fwd) * 1000,
            "trainable": n_train, "attn": model.config._attn_implementation,
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--binary", default=".build/release/pf2lora")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rank2", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two sides")
    ap.add_argument("--out")
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(pf2lora_step(args))
        print(f"pf2lora: {ours[-1]}", file=sys.stderr)
        theirs.append(torch_step(args))
    s_ours = statistics.median(r["step_ms"] for r in ours)
    f_ours = statistics.median(r["forward_ms"] for r in ours)
    s_torch = statistics.median(r["step_ms"] for r in theirs)
    f_torch = statistics.median(r["forward_ms"] for r in theirs)
    tokens = args.batch * args.seq
    lines = [
        f"Training step, two-level LoRA (shared r={args.rank}, client r={args.rank2}, all 4 linear kinds), "
        f"batch {args.batch} x {args.seq} tokens, forward + backward, no optimizer; {args.threads} threads; "
        f"model {args.model}; {platform.node()}, {time.strftime('%Y-%m-%d %H:%M')}; {theirs[0]['versions']} "
        f"(attention: {theirs[0]['attn']}); medians over {args.rounds} x {args.repeats} steps; "
        f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 cores).",
        "",
        "| implementation | step (ms) | forward only (ms) | tokens/s (step) | step time vs PyTorch |",
        "|---|---:|---:|---:|---:|",
        f"| pf2lora (Swift + OpenBLAS) | {s_ours:.0f} | {f_ours:.0f} | {tokens / s_ours * 1000:.0f} | {s_ours / s_torch:.2f}x |",
        f"| PyTorch + PEFT (CPU) | {s_torch:.0f} | {f_torch:.0f} | {tokens / s_torch * 1000:.0f} | 1.00x |",
        "",
        f"pf2lora run state: {ours[0]['state_mb']:.0f} MB. Target: step time at most 2x PyTorch's.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
