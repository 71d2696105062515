#!/usr/bin/env python3
"""Small decode batches: the worker-pool path vs OpenBLAS GEMM, in the same run.

    swift build -c release
    python3 Benchmarks/decode_batch_sweep.py --model DIR [--batches 1,2,4,8,12,16] [--rounds 2]

For each batch size B it runs `pf2lora bench decode --batch B` twice per round: once with
`--pooled-rows B` (the step runs on pf2lora's worker pool: each weight row is read from memory once
and dotted with all B input rows) and once with `--pooled-rows 0` (the same step as one OpenBLAS
sgemm per linear layer, the path every larger batch takes). Rounds alternate the two so load from
other processes hits both. It reports the median decode ms per step and tokens/s of each path, their
ratio, and which path the engine's default limit (`InferenceEngine.maxPooledRows`) picks; the
Markdown table goes to stdout and to `--out`. The crossover is where GEMM starts to win: the default
limit should sit just below it on the machine that serves.
"""
import argparse
import os
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "Benchmarks"))
from benchlib import bench_json, emit  # noqa: E402


def bench(binary, model, batch, pooled, tokens, prompt, threads):
    cmd = [binary, "bench", "decode", "--model", model, "--batch", str(batch), "--pooled-rows", str(pooled),
           "--tokens", str(tokens), "--prompt-tokens", str(prompt), "--threads", str(threads), "--repeats", "3"]
    return bench_json(cmd)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (e.g. from `pf2lora model random --config gpt2`)")
    ap.add_argument("--batches", default="1,2,3,4,6,8,10,12,14,16", help="comma-separated batch sizes")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per batch size (median reported)")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length before decoding")
    ap.add_argument("--threads", type=int, default=2, help="OpenBLAS threads (the pool uses the cores)")
    ap.add_argument("--pf2lora", default=str(ROOT / ".build/release/pf2lora"), help="the pf2lora binary")
    ap.add_argument("--out", help="also write the Markdown table here")
    a = ap.parse_args()
    if not os.access(a.pf2lora, os.X_OK):
        sys.exit(f"decode_batch_sweep: {a.pf2lora} not found; run `swift build -c release` first")
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    default_limit = None
    for b in batches:
        pool, gemm = [], []
        for r in range(a.rounds):
            order = [("pool", b), ("gemm", 0)] if r % 2 == 0 else [("gemm", 0), ("pool", b)]
            for name, limit in order:
                d = bench(a.pf2lora, a.model, b, limit, a.tokens, a.prompt_tokens, a.threads)
                (pool if name == "pool" else gemm).append(d["decode_ms_per_step"])
                default_limit = d.get("pooled_rows_default")
        mp, mg = statistics.median(pool), statistics.median(gemm)
        rows.append((b, mp, mg))
        print(f"decode_batch_sweep: B={b}: pool {mp:.2f} ms, gemm {mg:.2f} ms", file=sys.stderr, flush=True)
    load = os.getloadavg()
    lines = [f"Decode step, worker pool vs OpenBLAS GEMM, model {a.model}, prompt {a.prompt_tokens} tokens, "
             f"{a.tokens} steps timed, {a.threads} threads, median of {a.rounds} rounds (each the median of 3 runs); "
             f"load average at end {load[0]:.2f}. Default pooled-row limit: {default_limit}.", "",
             "| batch | pool ms/step | GEMM ms/step | pool tok/s | GEMM tok/s | pool vs GEMM | default path |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for b, mp, mg in rows:
        path = "pool" if default_limit is not None and b <= default_limit else "gemm"
        lines.append(f"| {b} | {mp:.2f} | {mg:.2f} | {b * 1000 / mp:.1f} | {b * 1000 / mg:.1f} | {mg / mp:.2f}x | {path} |")
    lines += ["", f"Command: `python3 Benchmarks/decode_batch_sweep.py --model {a.model} --batches {a.batches} --rounds {a.rounds}`"]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
