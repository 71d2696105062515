#!/usr/bin/env python3
"""What a validation perplexity means on a corpus, in bits per byte, beside general-purpose compressors.

A per-token perplexity depends on the tokenizer; bits per byte do not. This script converts validation
losses (nats per token) to bits per byte of the validation text, and measures what xz and zstd need
for the same text when they have already seen the train split (compressed size of train + valid minus
that of train alone): a reference any language model trained on that split should beat.

    python3 scripts/compression_reference.py --data data/debian/pretrain --tokenizer models/debian-llama \
        --loss "shipped base=3.1587" --loss "perplexity 15=ppl:15"

Prints a Markdown table on stdout; progress on stderr. Needs the `tokenizers` package and the xz and
zstd command-line tools.
"""
import argparse
import json
import math
import pathlib
import subprocess
import sys
import tempfile


def texts(path: pathlib.Path):
    with path.open() as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def compressed_size(cmd, path):
    out = subprocess.run(cmd + [str(path)], capture_output=True, check=True)
    return len(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder with train.jsonl and valid.jsonl ({\"text\": ...} per line)")
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    ap.add_argument("--loss", action="append", default=[],
                    help="NAME=NATS_PER_TOKEN or NAME=ppl:PERPLEXITY (repeatable)")
    args = ap.parse_args()
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(pathlib.Path(args.tokenizer) / "tokenizer.json"))
    data = pathlib.Path(args.data)
    train, valid = texts(data / "train.jsonl"), texts(data / "valid.jsonl")
    vbytes = sum(len(t.encode()) for t in valid)
    # + 1 per document: `pf2lora pretrain` ends every document with the end-of-text token and its validation
    # loss is the mean over those tokens too (the compressors get a "\n\n" separator instead)
    vtokens = sum(len(tok.encode(t).ids) + 1 for t in valid)
    print(f"valid: {len(valid)} documents, {vbytes} bytes, {vtokens} tokens, {vbytes / vtokens:.3f} bytes/token",
          file=sys.stderr)
    rows = []
    for spec in args.loss:
        name, _, value = spec.partition("=")
        nats = math.log(float(value[4:])) if value.startswith("ppl:") else float(value)
        rows.append((name, f"{math.exp(nats):.2f}", f"{nats * vtokens / vbytes / math.log(2):.4f}"))
    xz, zstd = ["xz", "-9e", "-T1", "-c"], ["zstd", "-19", "--long=27", "-c"]
    with tempfile.TemporaryDirectory() as d:
        a, b, v = (pathlib.Path(d) / n for n in ("train.txt", "train+valid.txt", "valid.txt"))
        a.write_text("\n\n".join(train))
        b.write_text("\n\n".join(train) + "\n\n" + "\n\n".join(valid))
        v.write_text("\n\n".join(valid))
        for name, cmd, seen_train in (("xz -9e, having seen the train split", xz, True),
                                      ("zstd -19 --long=27, having seen the train split", zstd, True),
                                      ("xz -9e, valid alone", xz, False)):
            print(f"compressing: {name}", file=sys.stderr)
            size = compressed_size(cmd, b) - compressed_size(cmd, a) if seen_train else compressed_size(cmd, v)
            bits = size * 8
            rows.append((name, f"{math.exp(bits / vtokens * math.log(2)):.2f}", f"{bits / vbytes:.4f}"))
    print(f"| model or compressor | perplexity per token ({vbytes / vtokens:.2f} bytes/token) | bits per byte |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
