#!/usr/bin/env python3
"""Tokenizer encode throughput: pf2lora vs Hugging Face tokenizers (Rust), same 1 MB text, same run.

    python3 Benchmarks/tokenizer_bench.py [--model ../shared/gpt2-tokenizer] [--mb 1] [--out FILE]
    python3 Benchmarks/tokenizer_bench.py --model ../shared/tokenizers/llama3    # Llama-3 (issue 12 target)

Builds a deterministic ~1 MB mixed text (prose, code, digits, Unicode, whitespace runs, <|endoftext|>),
checks that pf2lora's ids equal HF's on it (with the tokenizer's default special tokens, e.g. Llama-3's
BOS), then times:
  - HF tokenizers, one `encode` call on the whole text and `encode_batch` over its lines, with
    RAYON_NUM_THREADS=1 (single thread) and with the default thread count, each in a fresh process;
  - the pf2lora release binary (`pf2lora bench tokenizer`), single thread, one call and line by line.
"cold" is the first encode after loading (empty word cache); "warm" is the best of the repeats after it.
Prints a Markdown table (and writes it to --out) with each row's warm throughput relative to HF.
Needs `swift build -c release` (run here if the binary is missing) and tokenizers (Tests/FixtureScripts/requirements-fixtures.txt).
"""
import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = ROOT / ".build" / "release" / "pf2lora"


def hf_worker(model_dir, text_file, repeat):
    """Runs in a child process so that RAYON_NUM_THREADS applies from the start."""
    from tokenizers import Tokenizer
    text = pathlib.Path(text_file).read_bytes().decode("utf-8")
    lines = [l + "\n" for l in text.split("\n")]
    folder = pathlib.Path(model_dir)
    t = time.perf_counter()
    if (folder / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        from tokenizers import models, pre_tokenizers, decoders
        tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    load = time.perf_counter() - t
    res = {"load_seconds": load}

    def timed(f):
        t = time.perf_counter()
        r = f()
        return time.perf_counter() - t, r

    cold, enc = timed(lambda: tok.encode(text))
    warm = min(timed(lambda: tok.encode(text))[0] for _ in range(repeat))
    res.update(tokens=len(enc.ids), cold_seconds=cold, warm_seconds=warm)
    tok2 = Tokenizer.from_str(tok.to_str())   # fresh cache for the batch run
    bcold, _ = timed(lambda: tok2.encode_batch(lines))
    bwarm = min(timed(lambda: tok2.encode_batch(lines))[0] for _ in range(repeat))
    res.update(lines=len(lines), lines_cold_seconds=bcold, lines_warm_seconds=bwarm)
    res["threads"] = os.environ.get("RAYON_NUM_THREADS", f"default ({os.cpu_count()} cpus)")
    print(json.dumps(res))


def run_hf(model, text_file, repeat, threads):
    env = dict(os.environ)
    env.pop("RAYON_NUM_THREADS", None)
    env.pop("TOKENIZERS_PARALLELISM", None)
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, __file__, "--hf-worker", model, text_file, str(repeat)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "gpt2-tokenizer"))
    ap.add_argument("--mb", type=float, default=1.0, help="size of the generated text in MB")
    ap.add_argument("--file", help="use this UTF-8 text instead of the generated one")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", help="also write the Markdown table here")
    ap.add_argument("--hf-worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_worker:
        hf_worker(args.hf_worker[0], args.hf_worker[1], int(args.hf_worker[2]))
        return

    if not BIN.exists():
        subprocess.run(["swift", "build", "-c", "release", "--product", "pf2lora"], cwd=ROOT, check=True)

    with tempfile.TemporaryDirectory() as tmp:
        if args.file:
            text_file = args.file
        else:
            sys.path.insert(0, str(ROOT / "scripts"))
            from fixtures.tokenizer import large_text
            text = large_text(seed=2024, target=int(args.mb * 1_000_000))
            text_file = os.path.join(tmp, "bench.txt")
            pathlib.Path(text_file).write_bytes(text.encode("utf-8"))
        nbytes = os.path.getsize(text_file)

        # Same ids as the reference, on this very text.
        from tokenizers import Tokenizer
        ref = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json")).encode(
            pathlib.Path(text_file).read_bytes().decode("utf-8")).ids
        with open(text_file, "rb") as f:
            ours = json.loads(subprocess.run([str(BIN), "tokenize", "--model", args.model], stdin=f,
                                             check=True, capture_output=True).stdout)
        same = ours == ref

        hf1 = run_hf(args.model, text_file, args.repeat, 1)
        hfd = run_hf(args.model, text_file, args.repeat, None)
        pf = json.loads(subprocess.run([str(BIN), "bench", "tokenizer", "--model", args.model, "--file", text_file,
                                        "--repeat", str(args.repeat)], check=True, capture_output=True, text=True).stdout)

    mb = nbytes / 1e6
    base = mb / hf1["warm_seconds"]
    rows = [
        ("HF tokenizers, one call", "1", hf1["cold_seconds"], hf1["warm_seconds"]),
        ("HF tokenizers, batch of lines", "1", hf1["lines_cold_seconds"], hf1["lines_warm_seconds"]),
        ("HF tokenizers, one call", hfd["threads"], hfd["cold_seconds"], hfd["warm_seconds"]),
        ("HF tokenizers, batch of lines", hfd["threads"], hfd["lines_cold_seconds"], hfd["lines_warm_seconds"]),
        ("pf2lora, one call", "1", pf["cold_seconds"], pf["warm_seconds"]),
        ("pf2lora, line by line", "1", pf["lines_cold_seconds"], pf["lines_warm_seconds"]),
    ]
    out = []
    out.append(f"Text: {nbytes:,} bytes, {len(ref):,} tokens ({pathlib.Path(args.model).name}); "
               f"pf2lora ids identical to HF: {'yes' if same else 'NO'}. "
               f"Machine: {platform.machine()}, {os.cpu_count()} cpus.")
    out.append("")
    out.append("| encoder | threads | cold MB/s | warm MB/s | warm vs HF one call, 1 thread |")
    out.append("|---|---|---:|---:|---:|")
    for name, thr, cold, warm in rows:
        out.append(f"| {name} | {thr} | {mb / cold:.2f} | {mb / warm:.2f} | {mb / warm / base:.2f}x |")
    out.append("")
    out.append(f"Load: HF {hf1['load_seconds']:.3f} s, pf2lora {pf['load_seconds']:.3f} s. "
               f"pf2lora vs best HF row (warm): {(mb / pf['warm_seconds']) / max(mb / r[3] for r in rows[:4]):.1f}x.")
    table = "\n".join(out)
    print(table)
    if args.out:
        pathlib.Path(args.out).write_text(table + "\n")
    if not same:
        sys.exit("tokenizer_bench: pf2lora's ids differ from HF's on the benchmark text")


if __name__ == "__main__":
    main()
