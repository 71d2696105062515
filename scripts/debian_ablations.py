#!/usr/bin/env python3
"""Ablations of PF2LoRA on the data-to-text federation (issue 13 item 4, gap (e) of docs/RESULTS-fair.md §5),
at the settings of `scripts/fair_experiments.sh debian6` (6 rounds, compute budget: 6 gradient evaluations of
4 x 64 tokens per client per round) and PF2LoRA's selected point there (lr 1e-2, lr2 0.5), seeds as given.
Each variant is compared with the method's own seed runs of that experiment (same seeds, same test split):

    lower 1 / lower 5     the split of the 6 evaluations: 3 x (1 lower + 1 upper), 1 x (5 lower + 1 upper)
    joint                 both levels, one AdamW, no alternation (6 iterations of 1 evaluation)
    client-only           no shared level (6 SGD steps on (C, D) at lr2 per round)
    r2 = 0                one shared LoRA of rank 8 (HOMLoRA at --baseline-rank 8, lr 1e-2)
    r2 = 1, r2 = 4        the client level's rank (alpha2 = 2 r2, as the method's default)

Resumable (finished runs are kept; a run is written to .partial and renamed), one run at a time, nice 19.
    python3 scripts/debian_ablations.py --root RUNS/debian-fair6 --binary BIN --seeds 0 [--out docs/RESULTS-data-to-text-ablations.md]
"""
import argparse, json, math, os, pathlib, shutil, subprocess, sys, time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from experiment import mean_ci  # noqa: E402  (one t-interval for every results page)

VARIANTS = [
    ("lower-1", "3 x (1 lower + 1 upper)", ["--method", "pf2lora", "--local-steps", "3", "--lower-steps", "1"]),
    ("lower-5", "1 x (5 lower + 1 upper)", ["--method", "pf2lora", "--local-steps", "1", "--lower-steps", "5"]),
    ("joint", "both levels jointly, one AdamW, no alternation", ["--method", "pf2lora", "--variant", "joint"]),
    ("client-only", "client level only (no shared level)", ["--method", "pf2lora", "--variant", "client-only"]),
    ("r2-0", "r2 = 0: one shared LoRA of rank 8 (HOMLoRA, --baseline-rank 8)", ["--method", "homlora", "--baseline-rank", "8"]),
    ("r2-1", "r2 = 1", ["--method", "pf2lora", "--rank2", "1"]),
    ("r2-4", "r2 = 4", ["--method", "pf2lora", "--rank2", "4"]),
]
BASELINES = [("homlora", "HOMLoRA"), ("perfedavg", "Per-FedAvg-LoRA"), ("hetlora", "HETLoRA"), ("local", "Local-only LoRA"),
             ("fedavg-ft", "FedAvg-LoRA + FT")]
COMMON = ["--data", "data/debian/clients", "--model", "models/fortune-gpt2", "--budget", "compute", "--rounds", "6",
          "--local-steps", "2", "--lower-steps", "2", "--batch", "4", "--seq", "64", "--rank", "8", "--rank2", "2",
          "--eval-every", "2", "--eval-windows", "64", "--lr", "1e-2", "--lr2", "0.5", "--threads", "1",
          "--token-cache", "runs/token-cache"]




def test_losses(folder, seeds):
    """{seed: {client: test loss}} of the runs folder/seed<s>/metrics.json that exist."""
    out = {}
    for s in seeds:
        f = folder / f"seed{s}" / "metrics.json"
        if f.exists():
            out[s] = {c["client"]: c["test_loss"] for c in json.loads(f.read_text())["clients"]}
    return out


def seed_mean_gaps(runs, other, both):
    """runs − other per client, averaged over the seeds both have (independent pairs): the gaps, their mean
    ± 95 % t-interval, and the two-sided Wilcoxon p."""
    from scipy import stats
    cm = [sum(runs[s][c] - other[s][c] for s in both) / len(both) for c in runs[both[0]]]
    mc, cc = mean_ci(cm)
    pc = stats.wilcoxon(cm).pvalue if any(x != 0 for x in cm) else 1.0
    return cm, mc, cc, pc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="the debian6 experiment's folder (its seeds/pf2lora runs are the reference)")
    ap.add_argument("--binary", required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    root = pathlib.Path(a.root) / "ablations"
    seeds = [int(s) for s in a.seeds.split(",")]
    if not a.report_only:
        for s in seeds:
            for name, _, flags in VARIANTS:
                d = root / name / f"seed{s}"
                if (d / "metrics.json").exists():
                    continue
                part = d.with_name(d.name + ".partial")
                shutil.rmtree(part, ignore_errors=True); part.mkdir(parents=True)
                # the variant's flags replace COMMON's (--local-steps, --lower-steps, --rank2) or add to them
                opts = dict(zip(COMMON[0::2], COMMON[1::2]))
                opts.update(dict(zip(flags[0::2], flags[1::2])))
                cmd = [a.binary, "federate"] + [x for kv in opts.items() for x in kv] + \
                      ["--seed", str(s), "--store", str(part / "store"), "--out", str(part)]
                (part / "command.txt").write_text(" ".join(cmd) + "\n")
                t0 = time.time()
                with open(part / "stdout.txt", "w") as so, open(part / "stderr.txt", "w") as se:
                    r = subprocess.run(["nice", "-n", "19"] + cmd, stdout=so, stderr=se)
                if r.returncode != 0:
                    sys.exit(f"{name} seed {s} failed: {(part / 'stderr.txt').read_text()[-500:]}")
                shutil.rmtree(part / "store", ignore_errors=True)
                part.rename(d)
                print(f"[{time.strftime('%H:%M:%S')}] {name} seed {s}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    from scipy import stats
    ref = test_losses(pathlib.Path(a.root) / "seeds" / "pf2lora", seeds)
    lines = ["# PF2LoRA ablations on data to text", "",
             "Generated by `scripts/debian_ablations.py` (" + " ".join(sys.argv[1:]) + "). Settings of "
             "`scripts/fair_experiments.sh debian6` (6 rounds, compute budget: 6 gradient evaluations of 4 x 64 tokens per "
             "client per round, 9,216 tokens per client in all), PF2LoRA's selected point there (lr 1e-2, lr2 0.5), no "
             "tuning of the variants (each would need its own grid to be compared fairly with the baselines; here they are "
             "compared with the method at the same point). Test loss, mean over the 13 clients; ± 95 % t-interval over seeds "
             "when there are several. Wilcoxon signed-rank (two-sided) of variant − method over client x seed pairs (not "
             "independent across the seeds of one client: a screen), and over the clients' seed-means (independent pairs) with "
             "the mean difference ± 95 % t-interval over those clients.", "",
             "| variant | seeds | mean test loss | variant − method (nats) | variant lower on (client x seed) | Wilcoxon p (client x seed) "
             "| mean difference ± 95 % CI over clients | variant's seed-mean lower on | Wilcoxon p (client means) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if ref:
        per = [sum(ref[s].values()) / len(ref[s]) for s in ref]
        m, ci = mean_ci(per)
        lines.append(f"| **the method** (2 x (2 lower + 1 upper), r2 = 2) | {len(ref)} | {m:.4f}" + (f" ± {ci:.4f}" if len(ref) > 1 else "") + " | | | | | | |")
    for name, label, _ in VARIANTS:
        runs = test_losses(root / name, seeds)
        if not runs:
            lines.append(f"| {label} | 0 | not run | | | | | | |")
            continue
        per = [sum(r.values()) / len(r) for r in runs.values()]
        m, ci = mean_ci(per)
        both = [s for s in runs if s in ref]
        d = [runs[s][c] - ref[s][c] for s in both for c in runs[s]]
        if d:
            p = stats.wilcoxon(d).pvalue if any(x != 0 for x in d) else 1.0
            cmp = f"{sum(d) / len(d):+.4f} | {sum(1 for x in d if x < 0)} of {len(d)} | {p:.2g}"
            # the clients' seed-means (over the seeds both have): independent pairs
            cm, mc, cc, pc = seed_mean_gaps(runs, ref, both)
            cmp += f" | {mc:+.4f} ± {cc:.4f} | {sum(1 for x in cm if x < 0)} of {len(cm)} | {pc:.2g}"
        else:
            cmp = " | | | | | "
        lines.append(f"| {label} | {len(runs)} | {m:.4f}" + (f" ± {ci:.4f}" if len(runs) > 1 else "") + f" | {cmp} |")
    # Every variant against the baselines of the same experiment (their selected points, same seeds, same test
    # split): variant − baseline over the clients' seed-means; the variants are not tuned, the baselines are.
    base = {}
    for m, label in BASELINES:
        got = test_losses(pathlib.Path(a.root) / "seeds" / m, seeds)
        if got:
            base[m] = (label, got)
    if base:
        lines += ["", "Each variant against the baselines of the same experiment (each at its selected point, same seeds): "
                  "variant − baseline in nats over the 13 clients' seed-means (over the seeds both have), mean ± 95 % "
                  "t-interval over clients, how many clients the variant is lower on, Wilcoxon p over those client means.", "",
                  "| variant | " + " | ".join(label for label, _ in base.values()) + " |", "|---|" + "---:|" * len(base)]
        for name, label, _ in VARIANTS:
            runs = test_losses(root / name, seeds)
            cells = []
            for m, (blabel, got) in base.items():
                both = [s for s in runs if s in got]
                if not both:
                    cells.append("")
                    continue
                cm, mc, cc, pc = seed_mean_gaps(runs, got, both)
                cells.append(f"{mc:+.3f}" + (f" ± {cc:.3f}" if len(cm) > 1 else "") + f", {sum(1 for x in cm if x < 0)}/{len(cm)}, p {pc:.2g}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    text = "\n".join(lines) + "\n"
    if a.out:
        pathlib.Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
