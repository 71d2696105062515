#!/usr/bin/env python3
"""docs/RESULTS.md for the embedded default (issue 16): the Llama-family base pretrained on Debian package
descriptions (models/debian-llama) and its PF2LoRA federation of archive-section clients (adapters/).

    python3 scripts/default_results.py --pretrain RUN/pretrain --federate RUN/federate/metrics.json \\
        --corpus data/debian --model models/debian-llama --store adapters --runs RUN [--out docs/RESULTS.md]

Reads the pretraining checkpoint's trainer_state.json and the federation's metrics.json (per client:
test loss with the client's pair, with the shared pair alone, with the base alone), then decodes through
`pf2lora serve` (each stage cached in RUN, so a rerun resumes):
- BLEU / ROUGE-L / METEOR (scripts/nlg_eval.py: greedy, the first --nlg-limit test inputs per client) with
  the client's pair, with the shared pair alone (a store without client pairs) and with the base alone
  (an empty store);
- --samples test inputs per client chosen by `random.Random(--seed)` (not by hand), each written by the
  client's pair (temperature 0.7, top-p 0.9, seed 0), shown beside the reference.
The fortune default's figures on the same clients are read from docs/RESULTS-data-to-text.md (per token
of its own 4,096-token vocabulary); both are also given per character, the unit that does not depend on
the tokenizer (nats per token x test tokens per character of the client's test split).
"""
import argparse
import json
import math
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_jsonl(p):
    with open(p, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def tokens_per_char(tokenizer_json, texts):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_json))
    n = sum(len(e.ids) for e in tok.encode_batch(texts))
    return n / max(1, sum(map(len, texts)))


def run_nlg(a, store, out, clients):
    if os.path.exists(out):
        return json.load(open(out))
    cmd = [sys.executable, str(ROOT / "scripts/nlg_eval.py"), "--binary", a.binary, "--model", a.model, "--store", store,
           "--data", os.path.join(a.corpus, "clients"), "--clients", ",".join(clients), "--out", out,
           "--limit", str(a.nlg_limit), "--max-tokens", str(a.nlg_tokens), "--nice", str(a.nice)]
    print("default_results: " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return json.load(open(out))


def run_samples(a, clients, out):
    if os.path.exists(out):
        return json.load(open(out))
    picks = []
    for c in clients:
        rows = load_jsonl(os.path.join(a.corpus, "clients", c, "test.jsonl"))
        for r in random.Random(f"{a.seed}:{c}").sample(rows, min(a.samples, len(rows))):
            picks.append((c, r))
    # A client without a pair in this store (the shared-only and empty stores of default_results.py)
    # is evaluated with the shared pair alone, as DESIGN §5 serves it: serve refuses it by default.
    proc = subprocess.Popen(["nice", "-n", str(a.nice), a.binary, "serve", "--model", a.model, "--store", a.store,
                             "--threads", "1", "--max-batch", "16", "--unknown-clients-get-shared"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
    for i, (c, r) in enumerate(picks):
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": i, "method": "generate", "params": {
            "prompt": r["input"], "client": c, "max_tokens": a.nlg_tokens + 32, "temperature": 0.7, "top_p": 0.9,
            "seed": 0, "stop": ["\nPackage:"]}}) + "\n")
    proc.stdin.close()
    got = {}
    for line in proc.stdout:
        m = json.loads(line)
        if "id" in m and not m.get("method"):
            if "error" in m:
                sys.exit(f"default_results: sample {m['id']} failed: {m['error']}")
            got[m["id"]] = m["result"]["text"].strip()
    proc.wait()
    if len(got) != len(picks):
        sys.exit(f"default_results: {len(got)} of {len(picks)} samples came back")
    res = [{"client": c, "package": r["package"], "input": r["input"], "reference": r["target"].strip(), "output": got[i]}
           for i, (c, r) in enumerate(picks)]
    tmp = out + ".tmp"
    json.dump(res, open(tmp, "w"), indent=1)
    os.replace(tmp, out)
    return res


def fortune_figures(path):
    """Per-client Base and PF2LoRA test loss of the fortune default on the same clients (its own tokens)."""
    out = {}
    if not os.path.exists(path):
        return out
    for line in open(path, encoding="utf-8"):
        m = re.match(r"\| (\w+) \| ([\d.]+) \| ([\d.]+) ± ", line)
        if m:
            out[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return out


def f(x, d=4):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrain", required=True, help="the pretraining checkpoint folder (trainer_state.json)")
    ap.add_argument("--pretrain-eval", help="JSON line of `pretrain --resume --eval-batches N` on the final checkpoint")
    ap.add_argument("--federate", required=True, help="metrics.json of the shipped federation")
    ap.add_argument("--corpus", default="data/debian")
    ap.add_argument("--model", default="models/debian-llama")
    ap.add_argument("--store", default="adapters")
    ap.add_argument("--binary", default=".build/release/pf2lora")
    ap.add_argument("--runs", default="runs/default")
    ap.add_argument("--fortune", default=str(ROOT / "docs/RESULTS-data-to-text.md"))
    ap.add_argument("--fortune-tokenizer", default=str(ROOT / "models/fortune-gpt2/tokenizer.json"))
    ap.add_argument("--nlg-limit", type=int, default=30)
    ap.add_argument("--nlg-tokens", type=int, default=96)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--command", default="", help="the command that made the run, for the document")
    ap.add_argument("--appendix", default=str(ROOT / "docs/results-default-notes.md"), help="Markdown appended at the end (run notes)")
    ap.add_argument("--out", default=str(ROOT / "docs/RESULTS.md"))
    a = ap.parse_args()
    os.makedirs(a.runs, exist_ok=True)
    t0 = time.time()

    state = json.load(open(os.path.join(a.pretrain, "trainer_state.json")))
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    fed = json.load(open(a.federate))
    clients = [c["client"] for c in fed["clients"]]

    # Stores for the shared pair alone and the base alone.
    model_name = os.path.basename(os.path.normpath(a.model))
    shared_store = os.path.join(a.runs, "store-shared-only")
    if not os.path.isdir(shared_store):
        shutil.copytree(a.store, shared_store)
        shutil.rmtree(os.path.join(shared_store, model_name, "clients"), ignore_errors=True)
        man = os.path.join(shared_store, model_name, "manifest.json")
        if os.path.exists(man):
            m = json.load(open(man))
            m["clients"] = {}
            json.dump(m, open(man, "w"), indent=1)
    base_store = os.path.join(a.runs, "store-empty")
    os.makedirs(base_store, exist_ok=True)

    nlg = {"client": run_nlg(a, a.store, os.path.join(a.runs, "nlg-client.json"), clients),
           "shared": run_nlg(a, shared_store, os.path.join(a.runs, "nlg-shared.json"), clients),
           "base": run_nlg(a, base_store, os.path.join(a.runs, "nlg-base.json"), clients)}
    samples = run_samples(a, clients, os.path.join(a.runs, "samples.json"))

    # Tokens per character of each client's test split, for both tokenizers.
    tpc, tpc_f = {}, {}
    for c in clients:
        texts = [r["text"] for r in load_jsonl(os.path.join(a.corpus, "clients", c, "test.jsonl"))]
        tpc[c] = tokens_per_char(os.path.join(a.model, "tokenizer.json"), texts)
        if os.path.exists(a.fortune_tokenizer):
            tpc_f[c] = tokens_per_char(a.fortune_tokenizer, texts)
    fort = fortune_figures(a.fortune)

    L = []
    L += ["# The embedded default: a Llama-family base on Debian package descriptions, and its PF2LoRA federation", ""]
    L += [f"Generated by `scripts/default_results.py` ({time.strftime('%Y-%m-%d', time.gmtime())}); the whole pipeline is "
          "`make reproduce` (scripts/reproduce.sh). The first-generation default (a GPT-2 on fortunes) and its results: "
          "[RESULTS-fortunes.md](RESULTS-fortunes.md), `make reproduce-fortunes`.", ""]
    # Base.
    vlog = state.get("valid_log", [])
    o = state.get("options", {})
    n_params = None
    L += ["## The base: `models/debian-llama`", ""]
    L += [f"Llama architecture (RMSNorm, RoPE θ={cfg.get('rope_theta')}, SwiGLU, grouped-query attention): "
          f"{cfg['num_hidden_layers']} layers, {cfg['hidden_size']} wide, {cfg['num_attention_heads']} heads "
          f"({cfg['num_key_value_heads']} key/value heads), SwiGLU {cfg['intermediate_size']}, {cfg['max_position_embeddings']} positions, "
          f"tied embeddings, byte-level BPE of {cfg['vocab_size']} tokens trained here (`scripts/train_tokenizer.py`). "
          f"Stored in {cfg.get('torch_dtype', 'f16')}.", ""]
    L += ["**What the base saw**: the train split of the Debian sections that are *not* clients (`data/debian/pretrain/`, "
          "28,025 package descriptions of sections such as utils, libs, devel, misc, x11, tex, ...; no text of any "
          "client split). A base that has seen the clients' text leaves the shared level nothing to learn (issue 13); this "
          "one knows the format and the language of package descriptions but not the sections' own vocabularies and styles. "
          "The fortunes were not added: they are another domain, and every pass over them is a pass less over descriptions "
          "in a fixed time budget.", ""]
    if vlog:
        L += [f"Pretraining: {state.get('step')} steps of {o.get('batch')} x {o.get('seq')} tokens "
              f"({state.get('tokens_seen', 0):,} tokens), AdamW lr {o.get('lr')} (warm-up {o.get('warmup')}, cosine to "
              f"{o.get('min_lr_ratio')} x), weight decay {o.get('weight_decay')}, {state.get('elapsed_s', 0) / 60:.0f} min of wall time "
              "on the 2-core machine shared with other sessions (the run notes at the end say how the schedule was "
              "set on each resume).", ""]
        L += ["| step | validation loss (nats/token) | perplexity |", "|---:|---:|---:|"]
        shown = vlog[:: max(1, len(vlog) // 12)]
        if shown[-1] is not vlog[-1]:
            shown.append(vlog[-1])
        for v in shown:
            L.append(f"| {v['step']} | {v['loss']:.4f} | {math.exp(v['loss']):.2f} |")
        L.append("")
    final_ppl = float("nan")
    n_params_m = state.get("parameters", 0) / 1e6
    if a.pretrain_eval and os.path.exists(a.pretrain_eval):
        pe = json.loads(open(a.pretrain_eval).read().strip().splitlines()[-1])
        final_ppl = pe["valid_perplexity"]
        L += [f"**Final validation perplexity: {pe['valid_perplexity']:.2f}** (loss {pe['valid_loss']:.4f} nats/token over the whole "
              "`pretrain/valid.jsonl`, 3,480 descriptions of the non-client sections, in consecutive windows of "
              f"{o.get('seq')} tokens; the issue's target is <= 15). The validation losses logged during training (table above) "
              "cover only the first 16,384 tokens of that file (packages 0-a...), which are harder than the average: "
              "compare the table's last row with this figure, made by the same checkpoint.", ""]

    # Federation.
    L += ["## The federation: `adapters/debian-llama`", ""]
    L += [f"PF2LoRA on {len(clients)} section clients (`data/debian/clients/<section>`, train/valid/test by a hash of the "
          f"source package), budget **{fed.get('budget')}**: {fed['rounds']} rounds x {fed['local_iterations']} local iterations "
          f"({fed['gradient_evaluations_per_round']} gradient evaluations of {fed['batch']} x {fed['seq']} tokens per client per round, "
          f"{fed['tokens']:,} tokens in all), shared rank r = {fed['rank']}, client rank r2 = {fed['rank2']}, upper lr {fed['lr']:.3g}, "
          f"lower lr {fed['lr2']:.3g}, seed {fed['seed']}; {fed['training_seconds'] / 60:.0f} min of training.", ""]
    if a.command:
        L += ["    " + a.command, ""]
    L += ["### Test loss per client (nats per token of the 8k vocabulary; lower is better)", "",
          "Each client's test split (the first windows, as `federate --eval-windows` says), three ways: the base alone, "
          "the shared pair alone (what a client without a pair of its own is served with) and the shared pair plus the "
          "client's pair (what the client is served with).", ""]
    L += ["| client | train texts | base alone | shared pair alone | shared + client | client pair gains (vs shared) | ppl with client | below base and shared? |",
          "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    ok = 0
    sums = [0.0, 0.0, 0.0]
    for c in fed["clients"]:
        b, s, t = c.get("base_test_loss"), c.get("shared_only_test_loss"), c.get("test_loss")
        good = t is not None and b is not None and s is not None and t < b and t < s
        ok += good
        for i, x in enumerate((b, s, t)):
            sums[i] += x or 0
        L.append(f"| {c['client']} | {c['train_texts']} | {f(b)} | {f(s)} | **{f(t)}** | {f(s - t if s and t else None)} | "
                 f"{math.exp(t):.2f} | {'yes' if good else '**no**'} |")
    n = len(fed["clients"])
    L.append(f"| **mean** | | {sums[0] / n:.4f} | {sums[1] / n:.4f} | **{sums[2] / n:.4f}** | {(sums[1] - sums[2]) / n:.4f} | "
             f"{math.exp(sums[2] / n):.2f} | {ok} of {n} |")
    L.append("")

    # Against the fortune default.
    if fort:
        L += ["### Against the fortune default on the same clients", "",
              "The fortune default (4.3M-parameter GPT-2 pretrained on fortunes, 4,096-token vocabulary) with PF2LoRA on the same "
              "13 clients at its data-to-text run's small compute budget (docs/RESULTS-data-to-text.md, seed 0). Per-token losses "
              "of different tokenizers do not compare, so both are also given in **nats per character** (loss x test tokens per "
              "character of the client's test split under each tokenizer). The budgets differ: that run trained 9,216 tokens per client "
              f"(windows of 64 tokens, evaluated on 64 such windows), this one {fed['tokens'] // max(1, len(clients)):,} per client "
              f"(windows of {fed['seq']}); most of the gap is the base (compare the base-alone columns), not the federation.", ""]
        L += ["| client | fortune base alone | fortune + PF2LoRA | this base alone | this default (shared + client) | nats/char: fortune + PF2LoRA | nats/char: this default |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        fs, ts = [], []
        for c in fed["clients"]:
            k = c["client"]
            if k not in fort:
                continue
            fb, fp = fort[k]
            fc = fp * tpc_f.get(k, float("nan"))
            tc = c["test_loss"] * tpc[k]
            fs.append(fc)
            ts.append(tc)
            L.append(f"| {k} | {fb:.4f} | {fp:.4f} | {f(c.get('base_test_loss'))} | {f(c['test_loss'])} | {fc:.3f} | **{tc:.3f}** |")
        if fs:
            L.append(f"| **mean** | | | | | {sum(fs) / len(fs):.3f} | **{sum(ts) / len(ts):.3f}** |")
        L.append("")

    # NLG.
    L += ["### BLEU / ROUGE-L / METEOR per client", "",
          f"Greedy decoding of the long description from the structured fields (the text up to `Description:`), the first "
          f"{a.nlg_limit} test packages of each client (file order), at most {a.nlg_tokens} new tokens; sacrebleu BLEU, "
          "rouge-score ROUGE-L F1 (stemmed), nltk METEOR without WordNet synonyms (offline). The fortune default's data-to-text "
          "run did not reach its decoding stage (docs/RESULTS-fair.md), so there are no fortune figures to set beside these.", ""]
    L += ["| client | BLEU base | BLEU shared | BLEU client | ROUGE-L base | ROUGE-L shared | ROUGE-L client | METEOR client |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    acc = {k: [] for k in ("bb", "bs", "bc", "rb", "rs", "rc", "mc")}
    for c in clients:
        B, S, C = (nlg[x]["clients"][c] for x in ("base", "shared", "client"))
        vals = (B["bleu"], S["bleu"], C["bleu"], B["rougeL"], S["rougeL"], C["rougeL"], C["meteor"])
        for k, v in zip(acc, vals):
            acc[k].append(v)
        L.append(f"| {c} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    L.append("| **mean** | " + " | ".join(f"**{sum(v) / len(v):.2f}**" for v in acc.values()) + " |")
    L.append("")

    # Samples.
    L += [f"## Samples: {a.samples} per client, chosen by seed", "",
          f"Test packages drawn with `random.Random(\"{a.seed}:<client>\").sample(test split, {a.samples})` (not chosen by hand), "
          "each written by the client's two-level adapter (temperature 0.7, top-p 0.9, request seed 0) from its name, section, "
          "summary and dependencies; the reference is Debian's description. Reading them: most sentences are well-formed "
          "English in the register of package descriptions (\"This package contains the shared library.\", bullet lists, "
          "a closing paragraph per package kind), but what they say about the package is often wrong or made of invented "
          f"names: a {n_params_m:.1f}M-parameter base at validation perplexity {final_ppl:.0f} writes the form better than the facts.", ""]
    for c in clients:
        L += [f"### {c}", ""]
        for i, s in enumerate(x for x in samples if x["client"] == c):
            summ = next((l[len("Summary: "):] for l in s["input"].splitlines() if l.startswith("Summary: ")), "")
            L += [f"**{i + 1}. {s['package']}** — {summ}", "", "<details><summary>reference</summary>", "", "```",
                  s["reference"], "```", "</details>", "", "```", s["output"] or "(empty)", "```", ""]

    if a.appendix and os.path.exists(a.appendix):
        L += [open(a.appendix, encoding="utf-8").read().rstrip(), ""]
    L += [f"_Decoding and tables: {time.time() - t0:.0f} s._", ""]
    tmp = a.out + ".tmp"
    open(tmp, "w", encoding="utf-8").write("\n".join(L))
    os.replace(tmp, a.out)
    print(f"default_results: wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
