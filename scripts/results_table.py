#!/usr/bin/env python3
"""Combines the per-method metrics of `pf2lora federate` into docs/RESULTS.md: one table of test
perplexity per client (base, every baseline, PF2LoRA) with PF2LoRA's learned rank range, the mean,
the count of clients where PF2LoRA beats HOMLoRA, an SVG chart of the same, and sample generations.
Standard library only.

usage: scripts/results_table.py --runs runs/federate --out docs/RESULTS.md [--svg docs/results.svg]
       [--binary .build/release/pf2lora --model models/fortune-gpt2 --store adapters --prompt "..."]
"""
import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

ORDER = [("homlora", "HOMLoRA"), ("perfedavg", "Per-FedAvg-LoRA"), ("hetlora", "HETLoRA"),
         ("local", "Local-only LoRA"), ("fedavg-ft", "FedAvg-LoRA + FT"), ("pf2lora", "PF2LoRA")]


def load(runs):
    out = {}
    for key, _ in ORDER:
        p = pathlib.Path(runs) / key / "metrics.json"
        if p.exists():
            out[key] = json.loads(p.read_text())
    if "pf2lora" not in out:
        sys.exit(f"results_table: {runs}/pf2lora/metrics.json is missing; run scripts/reproduce.sh first")
    return out


def budget_note(runs):
    """What the comparison held equal (docs/METHOD.md "Budgets"); runs made before budgets existed are `steps`."""
    pf = runs["pf2lora"]
    budget = pf.get("budget", "steps")
    if budget == "compute":
        return (f"**Budget: compute.** Every method made {pf.get('gradient_evaluations_per_round', '?')} gradient evaluations "
                "per client per round (docs/METHOD.md, \"Budgets\").")
    lower = pf.get("lower_steps", 0)
    return (f"**Budget: steps, not a fair comparison.** Every method ran {pf.get('local_steps')} local iterations per round; "
            f"a PF2LoRA iteration makes {lower + 1} gradient evaluations ({lower} lower + 1 upper), a baseline's 1 "
            f"(Per-FedAvg's 2), so PF2LoRA trained on {lower + 1}x the tokens of HOMLoRA, Local-only, HETLoRA and FedAvg+FT. "
            "Only PF2LoRA's lower-level rate and steps were tuned (on validation), one seed. The comparison under matched "
            "compute, equal tuning and several seeds is docs/RESULTS-fair.md.")


UNMATCHED_BANNER = (
    "> **Protocol of this page: unmatched compute, PF2LoRA alone tuned, one seed.** PF2LoRA trained on 6 x the tokens of "
    "HOMLoRA, Local-only, HETLoRA and FedAvg+FT (3 x Per-FedAvg's), only its lower-level rate and steps were chosen on "
    "validation, and every figure is one seed with no interval. The differences below are not evidence for or against "
    "the paper's claims; the comparisons made under matched compute, equal grids and several seeds are "
    "[RESULTS-fair.md](RESULTS-fair.md) (synthetic federation, data to text). The fortune federation under that "
    "protocol (`scripts/fair_experiments.sh fortune`, docs/RESULTS-fortune-fair.md) has not been run yet.")


def svg_chart(clients, series, path):
    """Grouped bars of test perplexity per client, one colour per method."""
    colors = ["#9e9e9e", "#8c6bb1", "#e6550d", "#fdae6b", "#31a354", "#3182bd", "#08519c"]
    W, H, left, top, bottom = 1100, 420, 60, 40, 110
    n, m = len(clients), len(series)
    gw = (W - left - 20) / n
    bw = gw * 0.8 / m
    vals_all = [v for _, vals in series for v in vals if v == v and v > 0]
    ymax = max(vals_all) * 1.1
    # Perplexities that span more than 30x (a language the base never saw beside one it knows) go on
    # a log axis, or the small ones would be invisible.
    log_axis = max(vals_all) / min(vals_all) > 30
    ymin = 10 ** math.floor(math.log10(min(vals_all))) if log_axis else 0
    def y(v):
        if log_axis:
            f = (math.log10(max(v, ymin)) - math.log10(ymin)) / (math.log10(ymax) - math.log10(ymin))
        else:
            f = v / ymax
        return top + (H - top - bottom) * (1 - f)
    title = "Test perplexity per client (lower is better" + ("; log scale)" if log_axis else ")")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
             f'<text x="{W/2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    if log_axis:
        ticks = [m * 10 ** e for e in range(int(math.log10(ymin)), int(math.log10(ymax)) + 1) for m in (1, 2, 5) if ymin <= m * 10 ** e <= ymax]
    else:
        ticks = [ymax * t / 5 for t in range(6)]
    for v in ticks:
        parts.append(f'<line x1="{left}" x2="{W-20}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
                     f'<text x="{left-5}" y="{y(v)+4:.1f}" text-anchor="end">{v:.0f}</text>')
    for i, c in enumerate(clients):
        x0 = left + i * gw + gw * 0.1
        for j, (name, vals) in enumerate(series):
            v = vals[i]
            if v != v:
                continue
            parts.append(f'<rect x="{x0 + j*bw:.1f}" y="{y(v):.1f}" width="{bw*0.95:.1f}" height="{y(ymin)-y(v):.1f}" fill="{colors[j % len(colors)]}"><title>{name} {c}: {v:.2f}</title></rect>')
        parts.append(f'<text transform="translate({x0 + gw*0.4:.1f},{H-bottom+14}) rotate(30)">{c}</text>')
    for j, (name, _) in enumerate(series):
        lx = left + j * 150
        parts.append(f'<rect x="{lx}" y="{H-30}" width="12" height="12" fill="{colors[j % len(colors)]}"/><text x="{lx+16}" y="{H-20}">{name}</text>')
    parts.append("</svg>")
    pathlib.Path(path).write_text("\n".join(parts) + "\n")


def samples(args, clients):
    rows = []
    for c in clients:
        texts = []
        for seed in (1, 2, 3):
            r = subprocess.run([args.binary, "generate", "--model", args.model, "--store", args.store, "--client", c,
                                "--prompt", args.prompt, "--max-tokens", "40", "--temperature", "0.8", "--top-p", "0.95",
                                "--seed", str(seed)], capture_output=True, text=True)
            texts.append((r.stdout if r.returncode == 0 else "error: " + r.stderr).strip())
        rows.append((c, texts))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", default="runs/federate")
    ap.add_argument("--out", default="docs/RESULTS.md")
    ap.add_argument("--svg", default="docs/results.svg")
    ap.add_argument("--binary", default=".build/release/pf2lora")
    ap.add_argument("--model", default="models/fortune-gpt2")
    ap.add_argument("--store", default="adapters")
    ap.add_argument("--prompt", default="The")
    ap.add_argument("--no-samples", action="store_true")
    ap.add_argument("--preamble", default="", help="Markdown placed before the table (setup and commands)")
    ap.add_argument("--appendix", default="", help="a Markdown file placed after the table (analysis)")
    ap.add_argument("--title", default="Results: per-client text generation on the fortune federation")
    args = ap.parse_args()

    runs = load(args.runs)
    pf = runs["pf2lora"]
    clients = [c["client"] for c in pf["clients"]]
    def per_client(key):
        by = {c["client"]: c for c in runs[key]["clients"]}
        return [math.exp(by[c]["test_loss"]) if c in by else float("nan") for c in clients]
    base = [math.exp(c["base_test_loss"]) for c in pf["clients"]]
    cols = [("Base", base)] + [(name, per_client(key)) for key, name in ORDER if key in runs]
    ranks = [f'{c["rank_min"]}–{c["rank_max"]}' for c in pf["clients"]]

    header = "| client | " + " | ".join(n for n, _ in cols) + " | PF2LoRA rank (min–max over modules) |"
    lines = [header, "|---|" + "---:|" * len(cols) + ":---:|"]
    for i, c in enumerate(clients):
        vals = [v[i] for _, v in cols]
        best = min(x for x in vals[1:] if x == x)
        cells = [(f"**{x:.2f}**" if x == best else f"{x:.2f}") for x in vals]
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {ranks[i]} |")
    means = [sum(v) / len(v) for _, v in cols]
    mean_loss = [None] + [runs[k]["mean_test_loss"] for k, _ in ORDER if k in runs]
    lines.append("| **mean perplexity** | " + " | ".join(f"{m:.2f}" for m in means) + " | |")
    lines.append("| mean test loss (ppl) | " + " | ".join(
        (f"{sum(math.log(b) for b in base)/len(base):.4f}" if l is None else f"{l:.4f}") for l in mean_loss) + " | |")
    hom = per_client("homlora") if "homlora" in runs else None
    pfv = per_client("pf2lora")
    verdict = []
    if hom:
        wins = sum(1 for a, b in zip(pfv, hom) if a < b)
        verdict.append(f"PF2LoRA's test perplexity is lower than HOMLoRA's on **{wins} of {len(clients)}** clients.")
    order = sorted(((m, n) for (n, _), m in zip(cols[1:], means[1:])), key=lambda t: t[0])
    verdict.append("Mean test perplexity, best first: " + ", ".join(f"{n} {m:.2f}" for m, n in order) + ".")

    svg_chart(clients, cols, args.svg)
    steps = runs["pf2lora"].get("budget", "steps") != "compute"
    title = args.title + (" (unmatched compute: not a fair comparison)" if steps else "")
    banner = [UNMATCHED_BANNER, ""] if steps else []
    md = [f"# {title}", ""] + banner + [args.preamble, "",
          "Test perplexity (exp of the mean token cross-entropy on each client's test split; lower is better;",
          "bold = best adapted model for that client). Every method trains the same base on the same",
          f"clients with the same rounds and data; settings are in `{args.runs}/<method>/metrics.json`.", "",
          budget_note(runs), "",
          "\n".join(lines), "", " ".join(verdict), "",
          f"![test perplexity per client]({os.path.relpath(args.svg, os.path.dirname(args.out) or '.')})", "",
          f"Learned rank: singular values of each module's update s1·BA + s2·D_kC_k above {pf['rank_rule'].split('>')[1].strip()} (docs/METHOD.md).", ""]
    if args.appendix and os.path.exists(args.appendix):
        md += [pathlib.Path(args.appendix).read_text(), ""]
    if not args.no_samples:
        md += ["## Sample generations", "", f"Three samples per client (temperature 0.8, top-p 0.95, seeds 1–3) from the prompt `{args.prompt}`,",
               f"served by `pf2lora generate --model {args.model} --store {args.store} --client ID` with PF2LoRA's adapters.", ""]
        for c, texts in samples(args, clients):
            md.append(f"**{c}**")
            md.append("")
            for t in texts:
                md.append("> " + t.replace("\n", " ⏎ ")[:400])
                md.append(">")
            md.append("")
    pathlib.Path(args.out).write_text("\n".join(md) + "\n")
    print("\n".join(lines))
    print(" ".join(verdict))


if __name__ == "__main__":
    main()
