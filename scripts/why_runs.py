#!/usr/bin/env python3
"""The runs of docs/RESULTS-data-to-text-why.md (issue 13: which part of the client level's training separates PF2LoRA from
its joint ablation), every stage resumable (scripts/experiment.py's run folders; a finished run is reused only if its
command is this one's):

    python3 scripts/why_runs.py --root /work/data/results-20261204/why --binary BIN [--stage ref|variants|rates|all]
        [--ref-binary BIN] [--variants LIST] [--mults LIST]

- ref: the two reference points (PF2LoRA at its selected 3 x (1 + 1), lr 1e-2, lr2 0.5; the joint variant at lr 1e-2) at
  seeds 0-2, the 8-round protocol of RESULTS-data-to-text-compute8.md (ROOT/ref);
- variants: the four ablations at seeds 0-2 (ROOT/variants): B PF2LoRA with an AdamW client level, F the same at the split
  2 x (2 + 1), C the joint variant with PF2LoRA's SGD client level, E the joint variant at half the steps (3 of 8 x 64);
- selected: seeds 1-2 at every variant's client-rate selection that moved off x 1 (in its rate root);
- rates: the equal grid of the client level's rate at seed 0 (ROOT/rates/<variant>-x<mult>: every variant at its client
  rate x 0.5, x 2, x 4; the references' rates are x 1), valid split for selection (the runs read test once at their end
  as seed-0 runs do; only valid is used).
Settings (all stages): models/fortune-gpt2, data/debian/clients, compute budget, 8 rounds, 2 x (2 + 1) evaluations of
4 x 64 tokens per client and round, r 8, r2 2, valid every 2 rounds on 32 windows, one run at a time at nice 19.
Run from the repository root with data/debian linked (scripts/make_debian_corpus.py).
"""
import argparse
import json
import pathlib
import subprocess
import sys

# Variant -> (its point at the reference client rate, the client rate's flag value there, whether the client rate is
# AdamW's (True) or SGD's). The joint variant's client rate is lr itself; its rate grid sets the AdamW option explicitly
# (identical to the default at lr2 = lr with the schedule on: LowerOptimizerTests.jointDefaultIsAdamWAtTheUpperRate).
POINTS = {
    "pf2lora": {"local-steps": "3", "lower-steps": "1", "lr": "1e-2", "lr2": "0.5"},
    "pf2lora-joint": {"lr": "1e-2", "lr2": "0.5"},
    "pf2lora-adamw": {"local-steps": "3", "lower-steps": "1", "lr": "1e-2", "lr2": "1e-2"},
    "pf2lora-joint-sgd": {"lr": "1e-2", "lr2": "0.5"},
    "pf2lora-joint-half": {"batch": "8", "local-steps": "3", "lower-steps": "0", "lr": "1e-2", "lr2": "0.5"},
    "pf2lora-adamw-2x3": {"local-steps": "2", "lower-steps": "2", "lr": "1e-2", "lr2": "1e-2"},
}
ADAMW_CLIENT = {"pf2lora-joint", "pf2lora-adamw", "pf2lora-joint-half", "pf2lora-adamw-2x3"}
CLIENT_RATE = {m: (0.01 if m in ADAMW_CLIENT else 0.5) for m in POINTS}
RATE_ORDER = ["pf2lora", "pf2lora-adamw", "pf2lora-joint-sgd", "pf2lora-joint", "pf2lora-joint-half", "pf2lora-adamw-2x3"]
ABOUT = ("Points of docs/RESULTS-data-to-text-why.md (scripts/why_runs.py): the references' were selected on seed 0's valid "
         "split from 4-point grids in sessions 9 and 10 (RESULTS-data-to-text-compute8.md, -compute8-joint.md); the variants' "
         "are not tuned beyond the client-rate grid of the rates stage.")


def rate_point(m, mult):
    p = dict(POINTS[m])
    p["lr2"] = f"{CLIENT_RATE[m] * mult:g}"
    if m in ("pf2lora-joint", "pf2lora-joint-half"):
        p.update({"lower-optimizer": "adamw", "schedule-lower-lr": "true"})
    return p


ROUNDS, EVAL_EVERY = "8", "2"


def experiment(root, name, methods, points, seeds, binary, select_seed=100, check=True):
    root.mkdir(parents=True, exist_ok=True)
    sel = root.parent / f"{root.name}_selection.json"
    sel.write_text(json.dumps(dict({"_about": ABOUT}, **{m: {"selected": points[m], "grid": []} for m in methods}), indent=1) + "\n")
    cmd = [sys.executable, "scripts/experiment.py", "--name", name, "--root", str(root), "--model", "models/fortune-gpt2",
           "--data", "data/debian/clients", "--binary", binary, "--budget", "compute", "--rounds", ROUNDS, "--local-steps", "2",
           "--lower-steps", "2", "--batch", "4", "--seq", "64", "--eval-every", EVAL_EVERY, "--eval-windows", "32",
           "--seeds", ",".join(map(str, seeds)), "--select-seed", str(select_seed), "--methods", ",".join(methods),
           "--prior-selection", str(sel), "--stage", "seeds", "--jobs", "1", "--nice", "19", "--out", str(root / "RESULTS.md")]
    print(" ".join(cmd), flush=True)
    r = subprocess.run(cmd)
    if r.returncode != 0:
        # A grid point whose training diverges fails its run (experiment.py's seeds stage): the grid goes on, the page
        # shows the point as missing (its stderr is in the .partial folder).
        if check:
            sys.exit(f"why_runs: {name} failed")
        print(f"why_runs: {name} failed (exit {r.returncode}); going on", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True)
    ap.add_argument("--binary", required=True, help="a release build with federate --lower-optimizer")
    ap.add_argument("--ref-binary", default="", help="binary of the reference runs (default --binary)")
    ap.add_argument("--stage", choices=["ref", "variants", "rates", "selected", "all"], default="all")
    ap.add_argument("--variants", default=",".join(RATE_ORDER), help="rates stage: these variants, in this order")
    ap.add_argument("--mults", default="0.5,2,4", help="rates stage: client-rate multipliers")
    ap.add_argument("--ablations", default="pf2lora-adamw,pf2lora-joint-sgd,pf2lora-joint-half,pf2lora-adamw-2x3",
                    help="variants stage: these ablations")
    ap.add_argument("--rounds", default="8", help="rounds (8: the page's protocol; 16 with --eval-every 4: the compute16 pages')")
    ap.add_argument("--eval-every", default="2")
    a = ap.parse_args()
    global ROUNDS, EVAL_EVERY
    ROUNDS, EVAL_EVERY = a.rounds, a.eval_every
    root = pathlib.Path(a.root)
    if a.stage in ("ref", "all"):
        experiment(root / "ref", "why-ref", ["pf2lora", "pf2lora-joint"], POINTS, [0, 1, 2], a.ref_binary or a.binary)
    if a.stage in ("variants", "all"):
        experiment(root / "variants", "why-variants", a.ablations.split(","), POINTS, [0, 1, 2], a.binary)
    if a.stage in ("rates", "all"):
        for m in a.variants.split(","):
            for x in a.mults.split(","):
                experiment(root / "rates" / f"{m}-x{x}", f"why-rate-{m}-x{x}", [m], {m: rate_point(m, float(x))}, [0], a.binary,
                           check=False)

    if a.stage in ("selected", "all"):
        # Seeds 1-2 at every variant's client-rate selection that moved off x 1 (seed 0's valid split, the rates stage's grid
        # complete): in the rate root itself (its seed-0 run is the grid run), so every variant is compared at its selection.
        for m in a.variants.split(","):
            home = root / ("ref" if m in ("pf2lora", "pf2lora-joint") else "variants") / "seeds" / m / "seed0" / "metrics.json"
            cells = {"1": home}
            cells.update({x: root / "rates" / f"{m}-x{x}" / "seeds" / m / "seed0" / "metrics.json" for x in a.mults.split(",")})
            if not all(f.exists() for f in cells.values()):
                print(f"why_runs: the client-rate grid of {m} is not complete; no selection", flush=True)
                continue
            best = min(cells, key=lambda x: json.loads(cells[x].read_text())["mean_valid_loss"])
            print(f"why_runs: {m} selects its client rate x {best}", flush=True)
            if best != "1":
                experiment(root / "rates" / f"{m}-x{best}", f"why-rate-{m}-x{best}", [m], {m: rate_point(m, float(best))},
                           [0, 1, 2], a.binary)


if __name__ == "__main__":
    main()
