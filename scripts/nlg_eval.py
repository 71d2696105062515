#!/usr/bin/env python3
"""Data-to-text metrics per client (issue 13 item 6): greedy decoding of each client's test inputs
through `pf2lora serve` with the client's adapter, then BLEU (sacrebleu), ROUGE-L (rouge-score, F1)
and METEOR (nltk) against the long descriptions.

    python3 scripts/nlg_eval.py --model MODEL --store STORE --data data/debian/clients \\
        --out RUN/nlg.json [--limit 40] [--max-tokens 96]

METEOR: nltk's implementation with exact and Porter-stem matching; its WordNet synonym stage needs
the WordNet corpus, which is not on this machine (nltk.download needs the network), so synonyms never
match (a lower METEOR than the official one; the same for every method).

Decoding: temperature 0 (greedy), at most --max-tokens new tokens, stops at <|endoftext|> (the text
separator of training) or at "\\nPackage:" (the start of a next example). The first --limit test
examples of each client (file order: by package name) are decoded; the same examples for every method.
Writes --out atomically; an existing --out is kept (resumable).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time


class NoWordNet:
    """Stands in for WordNet in nltk's METEOR: no synonyms (the corpus is not available offline)."""
    def synsets(self, *a, **k):
        return []


def score(refs, hyps):
    import sacrebleu
    from rouge_score import rouge_scorer
    from nltk.translate.meteor_score import meteor_score
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(sc.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps)) / len(refs)
    wn = NoWordNet()
    met = sum(meteor_score([r.split()], h.split(), wordnet=wn) for r, h in zip(refs, hyps)) / len(refs)
    return {"bleu": bleu, "rougeL": 100 * rouge, "meteor": 100 * met}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=".build/release/pf2lora")
    ap.add_argument("--model", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--clients", default="")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--nice", type=int, default=19)
    a = ap.parse_args()
    if os.path.exists(a.out):
        print(f"nlg_eval: {a.out} exists; kept", file=sys.stderr)
        return
    data = pathlib.Path(a.data)
    clients = [c for c in a.clients.split(",") if c] or sorted(p.name for p in data.iterdir() if p.is_dir())
    examples = []
    for c in clients:
        f = data / c / "test.jsonl"
        if not f.exists():
            sys.exit(f"nlg_eval: {f} is missing; build the corpus with scripts/make_debian_corpus.py")
        rows = [json.loads(l) for l in f.open(encoding="utf-8") if l.strip()][: a.limit]
        for r in rows:
            if "input" not in r or "target" not in r:
                sys.exit(f"nlg_eval: {f} has no input/target fields; it is not a data-to-text corpus")
            examples.append((c, r))
    t0 = time.time()
    # A client without a pair in this store (the shared-only and empty stores of default_results.py)
    # is evaluated with the shared pair alone, as DESIGN §5 serves it: serve refuses it by default.
    proc = subprocess.Popen(["nice", "-n", str(a.nice), a.binary, "serve", "--model", a.model, "--store", a.store,
                             "--threads", "1", "--max-batch", "16", "--unknown-clients-get-shared"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
    for i, (c, r) in enumerate(examples):
        req = {"jsonrpc": "2.0", "id": i, "method": "generate",
               "params": {"prompt": r["input"], "client": c, "max_tokens": a.max_tokens, "temperature": 0,
                          "stop": ["\nPackage:"]}}
        proc.stdin.write(json.dumps(req) + "\n")
    proc.stdin.close()
    outputs = {}
    for line in proc.stdout:
        msg = json.loads(line)
        if "id" not in msg or msg.get("method"):
            continue
        if "error" in msg:
            sys.exit(f"nlg_eval: request {msg['id']} failed: {msg['error']}")
        outputs[msg["id"]] = msg["result"]["text"].strip()
    proc.wait()
    if len(outputs) != len(examples):
        sys.exit(f"nlg_eval: got {len(outputs)} of {len(examples)} generations (serve exit {proc.returncode})")
    per = {}
    for i, (c, r) in enumerate(examples):
        per.setdefault(c, ([], []))
        per[c][0].append(r["target"].strip())
        per[c][1].append(outputs[i])
    res = {"clients": {}, "limit": a.limit, "max_tokens": a.max_tokens, "seconds": time.time() - t0,
           "meteor": "nltk, exact + stem matches, no WordNet synonyms (offline)"}
    for c, (refs, hyps) in per.items():
        res["clients"][c] = score(refs, hyps) | {"n": len(refs), "sample": {"input": examples[[e[0] for e in examples].index(c)][1]["input"],
                                                                           "output": hyps[0], "reference": refs[0]}}
    tmp = a.out + ".tmp"
    pathlib.Path(tmp).write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, a.out)
    print(json.dumps({c: {k: round(v, 2) for k, v in m.items() if isinstance(v, float)} for c, m in res["clients"].items()}))


if __name__ == "__main__":
    main()
