#!/usr/bin/env python3
"""The fair protocol of issue 13 on the synthetic federation (docs/SYNTHETIC.md), where a run costs
seconds: matched compute, one validation grid of the same size per method, 5 seeds, paired tests,
and PF2LoRA's ablations.

    python3 scripts/synthetic_fair.py [--binary runs/bin/pf2lora] [--out docs/SYNTHETIC-fair.md]

1. grid: every method x 4 points (GRIDS) at seed 100 (`pf2lora synthetic --methods M`); selection by the
   mean valid MSE of the final adapters (after FedAvg+FT's fine-tuning; the test split is evaluated by the
   command but not looked at for selection).
2. seeds 0..4 at the selected point; test MSE per client.
3. ablations of PF2LoRA at its selected point, seeds 0..4: lower steps 1 / 2 / 5 at the same gradient
   evaluations per round, joint single optimizer, client-only, r2 = 0 (HOMLoRA of rank r = 8), 1, 2, 4.
4. report: mean test MSE ± 95 % CI over seeds, Wilcoxon signed-rank over client x seed pairs.

Every run is kept in runs/synthetic-fair/<stage>/<method>/<key>/results.json (written to .partial, renamed
when done), so an interrupted script resumes; settings.json refuses a rerun with other settings.
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from experiment import mean_ci  # noqa: E402  (one t-interval for every results page)

METHODS = ["pf2lora", "homlora", "perfedavg", "hetlora", "local", "fedavg-ft"]
NAMES = {"pf2lora": "PF2LoRA", "homlora": "HOMLoRA", "perfedavg": "Per-FedAvg-LoRA", "hetlora": "HETLoRA",
         "local": "Local-only LoRA", "fedavg-ft": "FedAvg-LoRA+FT"}
SELECT_SEED = 100
# local 10 x (lower 5 + 1) = 60 gradient evaluations per client per round for every method.
BASE = {"rounds": "150", "local-steps": "10", "lower-steps": "5", "budget": "compute", "true-rank": "8", "true-rank2": "2"}
# The same learning-rate grid (the AdamW rate of the shared level and of every single-level LoRA) for every
# method, each method's own knobs at their defaults, plus one point that changes a knob of the method's own
# at the middle rate (4 points per method): PF2LoRA the split of its evaluations (20 x (2 + 1) instead of
# 10 x (5 + 1)); Per-FedAvg the inner rate 0.2 instead of 0.05; HETLoRA penalty 1e-2 and pruning 0.1;
# HOMLoRA, Local-only and FedAvg+FT (no knob of their own) the LoRA scale alpha doubled.
LRS = ("0.003", "0.01", "0.03")
_BASE_KNOBS = {"pf2lora": {"lower-lr": "0.05"}, "homlora": {}, "perfedavg": {"inner-lr": "0.05"},
               "hetlora": {"hetlora-lambda": "1e-3", "hetlora-prune": "0.05"}, "local": {}, "fedavg-ft": {}}
_KNOB = {"pf2lora": {"local-steps": "20", "lower-steps": "2"}, "perfedavg": {"inner-lr": "0.2"},
         "hetlora": {"hetlora-lambda": "1e-2", "hetlora-prune": "0.1"}}
GRIDS = {m: [dict(b, **{"upper-lr": lr}) for lr in LRS] + [dict(b, **{"upper-lr": LRS[1]}, **_KNOB.get(m, {"alpha": "32"}))]
         for m, b in _BASE_KNOBS.items()}
# Ablations: (label, method, extra flags on top of PF2LoRA's selected point).
ABLATIONS = [
    ("lower steps 1 (local 30)", "pf2lora", {"local-steps": "30", "lower-steps": "1"}),
    ("lower steps 2 (local 20)", "pf2lora", {"local-steps": "20", "lower-steps": "2"}),
    ("lower steps 5 (local 10)", "pf2lora", {"local-steps": "10", "lower-steps": "5"}),
    ("joint, one optimizer", "pf2lora", {"variant": "joint"}),
    ("client-only (no shared level)", "pf2lora", {"variant": "client-only"}),
    ("r2 = 0 (one shared LoRA of rank 8)", "homlora", {"baseline-rank": "8"}),
    ("r2 = 1", "pf2lora", {"rank2": "1"}),
    ("r2 = 2 (the method)", "pf2lora", {}),
    ("r2 = 4", "pf2lora", {"rank2": "4"}),
]


def key(p):
    return "_".join(f"{k}={v}" for k, v in sorted(p.items())) or "default"


def run(binary, root, stage, method, point, seed):
    d = root / stage / method / f"{key(point)}_seed{seed}"
    f = d / "results.json"
    if f.exists():
        return json.loads(f.read_text())
    part = pathlib.Path(str(d) + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    part.parent.mkdir(parents=True, exist_ok=True)
    opts = dict(BASE)
    opts.update(point)
    cmd = ["nice", "-n", "19", binary, "synthetic", "--seed", str(seed), "--out", str(part), "--methods", method, "--quiet"]
    for k, v in opts.items():
        cmd += [f"--{k}", v]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"synthetic_fair: {' '.join(cmd)} failed:\n{r.stderr[-800:]}")
    shutil.rmtree(d, ignore_errors=True)
    os.rename(part, d)
    return json.loads(f.read_text())



def prepare_root(root, who):
    """Creates root and records the settings its runs are made with; refuses a root made with others."""
    root.mkdir(parents=True, exist_ok=True)
    settings = {"base": BASE, "grids": GRIDS, "ablations": ABLATIONS, "select_seed": SELECT_SEED}
    f = root / "settings.json"
    if f.exists() and json.loads(f.read_text()) != json.loads(json.dumps(settings)):
        sys.exit(f"{who}: {root} holds runs with other settings; delete it or use another --root")
    f.write_text(json.dumps(settings, indent=1) + "\n")


def summary(res, method):
    return next(m for m in res["methods"] if m["method"] == method)


def select(binary, root, methods):
    """Each method's grid at SELECT_SEED: the point of least mean validation MSE (of the final adapters,
    after FedAvg+FT's fine-tuning). Returns ({method: point}, [(method, point, valid MSE, selected)])."""
    selected, grid_rows = {}, []
    for m in methods:
        rows = []
        for p in GRIDS[m]:
            res = run(binary, root, "grid", m, p, SELECT_SEED)
            rows.append((summary(res, m)["meanValidMSE"], p))
            print(f"[{time.strftime('%H:%M:%S')}] grid {m} {key(p)}: {rows[-1][0]:.5f}", file=sys.stderr, flush=True)
        best = min(rows, key=lambda t: t[0])[1]
        selected[m] = best
        grid_rows += [(m, p, v, p == best) for v, p in rows]
        print(f"{m}: selected {key(best)}", file=sys.stderr)
    return selected, grid_rows


def main():
    from scipy import stats
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=".build/release/pf2lora")
    ap.add_argument("--root", default="runs/synthetic-fair")
    ap.add_argument("--out", default="docs/SYNTHETIC-fair.md")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--no-ablations", action="store_true")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    root = pathlib.Path(a.root)
    prepare_root(root, "synthetic_fair")
    t0 = time.time()
    selected, grid_rows = select(a.binary, root, METHODS)

    test = {}
    for m in METHODS:
        for s in seeds:
            res = run(a.binary, root, "seeds", m, selected[m], s)
            test[(m, s)] = [c["testMSE"][m] for c in res["clients"]]
            if m == "pf2lora":
                test[("ranks", s)] = (sum(1 for c in res["clients"] if c["learnedRank"] == c["trueRank"]), len(res["clients"]))
    nclients = len(test[("pf2lora", seeds[0])])
    lines = ["# The synthetic federation under the fair protocol (matched compute, equal tuning, 5 seeds)", "",
             "Generated by `python3 scripts/synthetic_fair.py` (resumable; runs in `runs/synthetic-fair/`). "
             "Federation of docs/SYNTHETIC.md (8 clients, d_in 40, d_out 32, true ranks 6..10, noise 0.1: test-MSE floor 0.0100), "
             "150 rounds, all clients every round. Budget **compute**: every method makes 10 x (5 + 1) = 60 gradient evaluations "
             "(minibatches of 64) per client per round (PF2LoRA 10 iterations of 5 lower + 1 upper; HOMLoRA, Local-only, HETLoRA, "
             "FedAvg+FT 60 iterations; Per-FedAvg 30 iterations of 2). Every method has a grid of 4 points (the same learning rates 0.003, 0.01, 0.03 for all, plus one point of a knob of its own at 0.01), selected at seed "
             f"{SELECT_SEED} on the mean valid MSE of the final adapters; then seeds {', '.join(map(str, seeds))}.", "",
             "## Grids and selections", "", "| method | point | mean valid MSE (seed 100) | selected |", "|---|---|---:|:---:|"]
    for m, p, v, sel in grid_rows:
        lines.append(f"| {NAMES[m]} | `{key(p)}` | {v:.5f} | {'**yes**' if sel else ''} |")
    lines += ["", "## Test MSE (mean ± 95 % CI over seeds)", "",
              "| client | " + " | ".join(NAMES[m] for m in METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
    for k in range(nclients):
        ms = {m: mean_ci([test[(m, s)][k] for s in seeds]) for m in METHODS}
        best = min(v[0] for v in ms.values())
        lines.append(f"| {k} | " + " | ".join((f"**{ms[m][0]:.5f} ± {ms[m][1]:.5f}**" if ms[m][0] == best else f"{ms[m][0]:.5f} ± {ms[m][1]:.5f}") for m in METHODS) + " |")
    ov = {m: mean_ci([sum(test[(m, s)]) / nclients for s in seeds]) for m in METHODS}
    lines.append("| **mean** | " + " | ".join(f"**{ov[m][0]:.5f} ± {ov[m][1]:.5f}**" for m in METHODS) + " |")
    lines += ["", "PF2LoRA against each baseline, Wilcoxon signed-rank (two-sided) over "
              f"{nclients} clients x {len(seeds)} seeds = {nclients * len(seeds)} pairs of test MSE:", "",
              "| baseline | PF2LoRA lower on (client x seed) | mean difference | p (client x seed) | PF2LoRA lower on (seed means) | p (seed means) |",
              "|---|---:|---:|---:|---:|---:|"]
    for m in METHODS[1:]:
        d = [test[("pf2lora", s)][k] - test[(m, s)][k] for s in seeds for k in range(nclients)]
        p = stats.wilcoxon(d).pvalue
        ds = [(sum(test[("pf2lora", s)]) - sum(test[(m, s)])) / nclients for s in seeds]
        ps = stats.wilcoxon(ds).pvalue
        lines.append(f"| {NAMES[m]} | {sum(1 for x in d if x < 0)} of {len(d)} | {sum(d) / len(d):+.5f} | {p:.2g} | "
                     f"{sum(1 for x in ds if x < 0)} of {len(ds)} | {ps:.2g} |")
    lines += ["", "The client x seed pairs are not independent (the 8 clients of one seed share one federation: the seed draws "
              "the data and the training); "
              f"the seed-level test treats each seed's mean over clients as one pair: with {len(seeds)} pairs the smallest "
              f"two-sided p it can give is {2 / 2 ** len(seeds):.4g}."]
    # Did validation flatten? Mean valid MSE over seeds at rounds 100, 125, 150 (evaluated every 5 rounds).
    lines += ["", "Validation curves flattened: mean valid MSE over seeds at rounds 100 / 125 / 150 of the selected points "
              "(the curves are in each run's loss.svg under runs/synthetic-fair/seeds/):", "",
              "| method | round 100 | round 125 | round 150 |", "|---|---:|---:|---:|"]
    for m in METHODS:
        at = {100: [], 125: [], 150: []}
        for s in seeds:
            res = json.loads((root / "seeds" / m / f"{key(selected[m])}_seed{s}" / "results.json").read_text())
            for rnd, v in summary(res, m)["validCurve"]:
                if int(rnd) in at:
                    at[int(rnd)].append(v)
        lines.append(f"| {NAMES[m]} | " + " | ".join(f"{sum(v) / len(v):.5f}" if v else "–" for v in at.values()) + " |")
    lines += ["", "FedAvg+FT's curve is its federated phase (HOMLoRA's), before the fine-tuning that ends it. PF2LoRA's valid "
              "MSE still falls until the cosine schedule ends at round 150, from 4 % above the noise floor (0.0100); the "
              "single-level baselines are flat or rising (HOMLoRA, Per-FedAvg and HETLoRA cannot fit the clients' "
              "differences; Local-only has converged)."]
    lines += ["", "Cost (selected points, mean over seeds; wall-clock on the shared 2-core machine, one run at a time, "
              "compare within the table only):", "",
              "| method | gradient evaluations / client / round | trainable params / client | uploaded / client / round | seconds per run |",
              "|---|---:|---:|---:|---:|"]
    for m in METHODS:
        secs, tp, up = [], 0, 0
        for s in seeds:
            res = json.loads((root / "seeds" / m / f"{key(selected[m])}_seed{s}" / "results.json").read_text())
            sm = summary(res, m)
            secs.append(sm["seconds"]); tp = sm["trainableParametersPerClient"]; up = sm["uploadedParametersPerRound"]
        lines.append(f"| {NAMES[m]} | 60 | {tp:,} | {up:,} | {sum(secs) / len(secs):.1f} |")
    exact = [test[("ranks", s)] for s in seeds]
    lines += ["", f"PF2LoRA's learned ranks (tau = 0.1) equal the true ranks for "
              f"{sum(e[0] for e in exact)} of {sum(e[1] for e in exact)} client-seeds at the selected point.", ""]

    if not a.no_ablations:
        lines += ["## Ablations of PF2LoRA (its selected point, same compute, seeds " + ", ".join(map(str, seeds)) + ")", "",
                  "| variant | mean test MSE ± 95 % CI | vs PF2LoRA: Wilcoxon p (variant lower on) | ranks exact |", "|---|---:|---:|---:|"]
        for label, m, extra in ABLATIONS:
            p = dict(selected["pf2lora"]) if m == "pf2lora" else {"upper-lr": selected["pf2lora"]["upper-lr"]}
            p.update(extra)
            vals, ranks = [], [0, 0]
            for s in seeds:
                res = run(a.binary, root, "ablations", m, p, s)
                vals.append([c["testMSE"][m] for c in res["clients"]])
                if m == "pf2lora":
                    ranks[0] += sum(1 for c in res["clients"] if c["learnedRank"] == c["trueRank"])
                    ranks[1] += len(res["clients"])
            mu, ci = mean_ci([sum(v) / len(v) for v in vals])
            d = [vals[i][k] - test[("pf2lora", s)][k] for i, s in enumerate(seeds) for k in range(nclients)]
            pv = stats.wilcoxon(d).pvalue if any(x != 0 for x in d) else 1.0
            lines.append(f"| {label} | {mu:.5f} ± {ci:.5f} | {pv:.2g} ({sum(1 for x in d if x < 0)} of {len(d)}) | "
                         + (f"{ranks[0]}/{ranks[1]}" if m == "pf2lora" else "–") + " |")
        lines.append("")
    lines += [f"Run time of this invocation: {time.time() - t0:.0f} s (finished runs are reused).", ""]
    pathlib.Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
