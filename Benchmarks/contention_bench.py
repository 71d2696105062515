#!/usr/bin/env python3
"""Decode under CPU contention: the worker pool's contention policy vs always pooled vs one thread.

    swift build -c release
    python3 Benchmarks/contention_bench.py --model DIR [--hogs 0,1,2] [--out FILE]

For each number of hogs H (processes spinning `while True: pass`, started before and stopped after
the runs), it times `pf2lora bench decode --batch 1` three ways, alternating them:
  - pool, adaptive: the default; the pool runs a step on one thread while its waits stall;
  - pool, always:   every step on every pool thread (`--pool-policy always`);
  - one thread:     `PF2LORA_THREADS=1 --threads 1`.
With no hogs the adaptive policy must change nothing (no solo steps, same speed as always); with
hogs it should be at least as fast as the better of the other two. Markdown table on stdout and --out.
"""
import argparse
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "Benchmarks"))
from benchlib import bench_json, emit  # noqa: E402


def run(binary, model, mode, tokens, prompt, threads):
    env = dict(os.environ)
    args = [binary, "bench", "decode", "--model", model, "--batch", "1", "--tokens", str(tokens),
            "--prompt-tokens", str(prompt), "--repeats", "3"]
    if mode == "one thread":
        env["PF2LORA_THREADS"] = "1"
        args += ["--threads", "1"]
    else:
        args += ["--threads", str(threads), "--pool-policy", "always" if mode == "pool, always" else "adaptive"]
    return bench_json(args, env)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--hogs", default="0,1,2", help="numbers of spinning processes to try")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--pf2lora", default=str(ROOT / ".build/release/pf2lora"))
    ap.add_argument("--out")
    a = ap.parse_args()
    modes = ["pool, adaptive", "pool, always", "one thread"]
    rows = []
    for h in [int(x) for x in a.hogs.split(",")]:
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(h)]
        try:
            res = {m: [] for m in modes}
            solo = []
            for r in range(a.rounds):
                for m in modes[r % 3:] + modes[:r % 3]:
                    d = run(a.pf2lora, a.model, m, a.tokens, a.prompt_tokens, a.threads)
                    res[m].append(d["decode_ms_per_step"])
                    if m == "pool, adaptive":
                        solo.append(d.get("pool_solo_steps", 0))
        finally:
            for p in hogs:
                p.kill()
        med = {m: statistics.median(v) for m, v in res.items()}
        print(f"contention_bench: {h} hogs: " + ", ".join(f"{m} {v:.1f} ms" for m, v in med.items()), file=sys.stderr, flush=True)
        rows.append((h, med, statistics.median(solo)))
    lines = [f"Decode step (batch 1, prompt {a.prompt_tokens}, {a.tokens} steps) on {os.cpu_count()} CPUs with H spinning processes; "
             f"model {a.model}; median of {a.rounds} rounds, each the median of 3 runs.", "",
             "| hogs | pool, adaptive ms/step | pool, always ms/step | one thread ms/step | adaptive vs best other | solo steps (adaptive, of 4 runs x tokens) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for h, med, solo in rows:
        best = min(med["pool, always"], med["one thread"])
        lines.append(f"| {h} | {med['pool, adaptive']:.1f} | {med['pool, always']:.1f} | {med['one thread']:.1f} | "
                     f"{best / med['pool, adaptive']:.2f}x | {solo:.0f} |")
    lines += ["", f"Command: `python3 Benchmarks/contention_bench.py --model {a.model} --hogs {a.hogs} --rounds {a.rounds} --tokens {a.tokens} --prompt-tokens {a.prompt_tokens}`"]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
