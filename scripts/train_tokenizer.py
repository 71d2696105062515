#!/usr/bin/env python3
"""Train the GPT-2-style byte-level BPE tokenizer of the embedded default model.

    python3 scripts/train_tokenizer.py [--corpus data/corpus] [--vocab 4096] [--out models/fortune-gpt2]

Trains on <corpus>/pretrain/train.jsonl only (made by scripts/make_corpus.py), exactly as
GPT-2's tokenizer is built: no normaliser, ByteLevel pre-tokenizer (add_prefix_space=False,
GPT-2 regex), BPE model without unk token, ByteLevel decoder and post-processor
(trim_offsets=False), `<|endoftext|>` as the only special token and, as in GPT-2, the
*last* id (vocab - 1). Writes tokenizer.json, vocab.json, merges.txt, tokenizer_config.json
and special_tokens_map.json, then prints tokens per character for every client and split.

Needs the Hugging Face `tokenizers` package (tested with 0.23.3). Deterministic: it is run
with one thread, and the output hash is printed.
"""
import argparse
import hashlib
import json
import os
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")        # determinism and a shared machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tokenizers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

EOT = "<|endoftext|>"


def read_texts(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--vocab", type=int, default=4096, help="total size, special token included")
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--out", default="models/fortune-gpt2")
    args = ap.parse_args()
    t0 = time.time()

    train_path = os.path.join(args.corpus, "pretrain", "train.jsonl")
    if not os.path.isfile(train_path):
        sys.exit(f"error: {train_path} not found; run scripts/make_corpus.py first")
    texts = list(read_texts(train_path))

    tok = Tokenizer(models.BPE())  # no unk: byte-level covers every input
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab - 1,  # the special token is appended last, like GPT-2's 50256
        min_frequency=args.min_frequency,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # each entry is one document; they are joined with <|endoftext|> at training time,
    # so no merge may cross an entry boundary (the pre-tokenizer sees one entry at a time)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.get_vocab_size() != args.vocab - 1:
        sys.exit(f"error: trained {tok.get_vocab_size()} tokens, wanted {args.vocab - 1}")
    tok.add_special_tokens([EOT])
    eot_id = tok.token_to_id(EOT)
    assert eot_id == args.vocab - 1, eot_id

    os.makedirs(args.out, exist_ok=True)
    tok.save(os.path.join(args.out, "tokenizer.json"), pretty=True)
    # vocab.json + merges.txt in GPT-2's files' layout (vocab.json includes <|endoftext|>)
    vocab = tok.get_vocab(with_added_tokens=True)
    with open(os.path.join(args.out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(dict(sorted(vocab.items(), key=lambda kv: kv[1])), f, ensure_ascii=False)
    merges = json.loads(tok.to_str())["model"]["merges"]
    with open(os.path.join(args.out, "merges.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for m in merges:
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    with open(os.path.join(args.out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
        f.write("\n")
    cfg = dict(special, add_prefix_space=False, add_bos_token=False,
               tokenizer_class="GPT2Tokenizer", clean_up_tokenization_spaces=False,
               added_tokens_decoder={str(eot_id): {"content": EOT, "lstrip": False,
                                                   "normalized": True, "rstrip": False,
                                                   "single_word": False, "special": True}})
    with open(os.path.join(args.out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")

    # round trip check on the training data
    for t in texts[:2000]:
        if tok.decode(tok.encode(t).ids, skip_special_tokens=False) != t:
            sys.exit(f"error: round trip failed on {t[:80]!r}")

    h = hashlib.sha256()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        h.update(open(os.path.join(args.out, name), "rb").read())

    print(f"tokenizer: byte-level BPE, vocab {args.vocab} ({len(merges)} merges), "
          f"{EOT} = {eot_id}, trained on {len(texts)} entries "
          f"({sum(map(len, texts)):,} chars), tokenizers {tokenizers.__version__}")
    print()
    print("| client | language | tokens/char (train) | tokens/char (test) | chars/token (test) | test tokens |")
    print("|---|---|---:|---:|---:|---:|")
    stats_path = os.path.join(args.corpus, "stats.json")
    langs = {}
    if os.path.isfile(stats_path):
        langs = {c: v.get("language", "en") for c, v in json.load(open(stats_path))["clients"].items()}
    rows = [(c, os.path.join(args.corpus, "clients", c))
            for c in sorted(os.listdir(os.path.join(args.corpus, "clients")))]
    rows.append(("*pretrain*", os.path.join(args.corpus, "pretrain")))
    for name, d in rows:
        r = {}
        for s in ("train", "test"):
            ts = list(read_texts(os.path.join(d, f"{s}.jsonl")))
            n = sum(len(e) for e in tok.encode_batch(ts))
            r[s] = (n, sum(map(len, ts)))
        n, c = r["test"]
        print(f"| {name} | {langs.get(name, 'mixed')} | {r['train'][0] / r['train'][1]:.3f} "
              f"| {n / c:.3f} | {c / n:.2f} | {n:,} |")
    print()
    print(f"wrote {args.out}/{{tokenizer.json,vocab.json,merges.txt,tokenizer_config.json,"
          f"special_tokens_map.json}}  sha256: {h.hexdigest()}  ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
