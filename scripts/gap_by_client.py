#!/usr/bin/env python3
"""Where PF2LoRA's gap to Local-only LoRA sits, from the pages' own tables (docs/RESULTS-fair.md §4, "Why PF2LoRA
trails Local-only"): for each fair-protocol page, the per-client seed-means of its "Test loss per client" table,
PF2LoRA - Local-only per client (mean, on how many clients Local-only is lower, the two largest clients and their
share of the summed gap), HOMLoRA - Local-only (what a single shared LoRA costs), and, where the page has the joint
ablation, joint - Local-only with a two-sided Wilcoxon signed-rank over the clients' seed-means.

    python3 scripts/gap_by_client.py [PAGE ...]       # default: the six pages below

Reads only committed Markdown (no runs needed). Transcribed numbers: 4 decimals as the pages print them.
"""
import re
import sys

PAGES = ["docs/RESULTS-data-to-text-fair.md", "docs/RESULTS-data-to-text-compute8.md", "docs/RESULTS-data-to-text-long.md",
         "docs/RESULTS-data-to-text-default-base-knobs.md", "docs/RESULTS-data-to-text-default-base-long.md",
         "docs/RESULTS-fortune-fair-reduced.md"]


def table(path):
    lines = open(path, encoding="utf-8").read().split("\n")
    i = next((k for k, l in enumerate(lines) if l.startswith("## Test loss per client")), None)
    if i is None:
        sys.exit(f"gap_by_client: {path} has no '## Test loss per client' table")
    hdr = [c.strip() for c in lines[i + 2].strip("|").split("|")]
    rows = {}
    for l in lines[i + 4:]:
        if not l.startswith("|") or "mean over" in l:
            break
        c = [x.strip() for x in l.strip("|").split("|")]
        rows[c[0]] = {h: float(re.sub(r"[*]", "", v).split("±")[0]) for h, v in zip(hdr[1:], c[1:])}
    return hdr, rows


def main():
    from scipy.stats import wilcoxon
    for path in sys.argv[1:] or PAGES:
        hdr, rows = table(path)
        col = lambda h: [rows[k][h] for k in rows]
        lo = col("Local-only LoRA")
        d = [a - b for a, b in zip(col("PF2LoRA"), lo)]
        top = sorted(zip(d, rows), reverse=True)[:2]
        n = len(d)
        print(f"{path}: {n} clients; PF2LoRA - Local-only {sum(d) / n:+.3f} (Local-only lower on {sum(x > 0 for x in d)} of {n}); "
              f"largest {', '.join(f'{c} {x:+.3f}' for x, c in top)} = {sum(x for x, _ in top) / sum(d):.0%} of the summed gap; "
              f"the other {n - 2} clients {(sum(d) - sum(x for x, _ in top)) / (n - 2):+.3f}")
        dh = [a - b for a, b in zip(col("HOMLoRA"), lo)]
        print(f"  HOMLoRA - Local-only {sum(dh) / n:+.3f} (Local-only lower on {sum(x > 0 for x in dh)} of {n})")
        if "PF2LoRA, joint (ablation)" in hdr:
            dj = [a - b for a, b in zip(col("PF2LoRA, joint (ablation)"), lo)]
            print(f"  joint - Local-only {sum(dj) / n:+.3f} (joint lower on {sum(x < 0 for x in dj)} of {n}; "
                  f"Wilcoxon p {wilcoxon(dj).pvalue:.2g})")


if __name__ == "__main__":
    main()
