#!/usr/bin/env python3
"""Which part of the client level's training makes the difference between PF2LoRA (alternating: SGD on (C_k, D_k), then
AdamW on (A, B)) and its joint ablation (one AdamW on all four from one minibatch) on the data-to-text federation (issue 13,
docs/RESULTS-data-to-text-why.md, docs/RESULTS-fair.md §4).

    python3 scripts/why_compare.py --roots REF_ROOT,VARIANTS_ROOT [--seeds 0,1,2] [--out PAGE] [--preamble MD] [--appendix MD]

Every root is a `scripts/experiment.py` folder run with `--prior-selection` (one point per method, no grid) and `--stage
seeds`: seeds/<method>/seed<s>/ with metrics.json, command.txt and the adapter store. The roots must agree on every setting
but the grids, the name and the prior selection (checked), and each run must have been made at its method's point (checked
against command.txt). Reads the runs only (nothing is run): per variant the mean test loss (mean ± 95 % t-interval over
seeds, experiment.py's), the shared pair alone and the client level's gain (federate's shared_only_test_loss), the norms of
the trained updates (||s1 B A||_F and ||s2 D_k C_k||_F over the adapted modules, from the stores), planned paired contrasts
(Wilcoxon signed-rank over the clients' seed-means, two-sided, Holm over the planned set; joint_compare.py's helpers), per
client test loss, valid curves.
"""
import argparse
import json
import math
import pathlib
import sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from experiment import mean_ci, point_id, write_page  # noqa: E402  (one naming, one t-interval)
from joint_compare import holm, wilcoxon  # noqa: E402  (one Holm, one Wilcoxon)

# The variants in the order of the page, and the planned contrasts: (a, b, what a − b isolates).
ORDER = ["pf2lora", "pf2lora-adamw", "pf2lora-adamw-2x3", "pf2lora-joint-sgd", "pf2lora-joint-half", "pf2lora-joint"]
SHORT = {"pf2lora": "A PF2LoRA", "pf2lora-adamw": "B alternating, AdamW client", "pf2lora-adamw-2x3": "F alternating, AdamW client, 2 x (2 + 1)",
         "pf2lora-joint-sgd": "C joint, SGD client", "pf2lora-joint-half": "E joint, half the steps", "pf2lora-joint": "D joint"}
CONTRASTS = [
    ("pf2lora-adamw", "pf2lora", "B − A: the client level's optimizer (AdamW vs SGD), alternating, 3 + 3 steps a round"),
    ("pf2lora-joint", "pf2lora-joint-sgd", "D − C: the client level's optimizer (AdamW vs SGD), joint, 6 + 6 steps a round"),
    ("pf2lora-joint-sgd", "pf2lora", "C − A: joint vs alternating with the SGD client level (simultaneous, and each minibatch steps both levels: 6 + 6 steps vs 3 + 3)"),
    ("pf2lora-joint", "pf2lora-adamw", "D − B: the same with the AdamW client level"),
    ("pf2lora-joint", "pf2lora-joint-half", "D − E: steps per level at equal tokens (joint, 6 steps of 4 x 64 vs 3 of 8 x 64)"),
    ("pf2lora-joint-half", "pf2lora-adamw", "E − B: simultaneous vs alternating at equal steps per level (3 + 3) and tokens (E's minibatches twice B's)"),
    ("pf2lora-adamw-2x3", "pf2lora-adamw", "F − B: the split of the evaluations, AdamW client level: 4 client + 2 shared steps vs 3 + 3"),
]


def load_root(root):
    st = json.loads((root / "settings.json").read_text())
    pts = st.get("prior_selection", {})
    if not pts:
        sys.exit(f"why_compare: {root} has no prior selection (a --prior-selection experiment is expected)")
    return st, pts


def update_norms(store):
    """(||s1 B A||_F over all modules, {client: ||s2 D C||_F over all modules}) of a run's store (latest versions)."""
    import torch
    from level_ablation import by_module, latest, read_pairs
    top = next(p for p in store.iterdir() if p.is_dir())

    def norm(f, a, b):
        t, meta = read_pairs(f)
        s = float(meta["alpha"]) / float(meta["rank"])
        return math.sqrt(sum(float(torch.linalg.matrix_norm(s * (up @ down)) ** 2) for down, up in by_module(t, a, b).values()))
    shared = norm(latest(top / "shared"), "A", "B")
    clients = {c.name: norm(latest(c), "C", "D") for c in sorted((top / "clients").iterdir()) if latest(c)}
    return shared, clients


def load_runs(d_of, point, methods, seeds):
    """{method: {seed: metrics}} from d_of(method, seed) (a run folder), each checked against its method's point."""
    runs = {}
    for m in methods:
        for s in seeds:
            d = d_of(m, s)
            if not (d / "metrics.json").exists():
                sys.exit(f"why_compare: {d}/metrics.json missing")
            cmd = (d / "command.txt").read_text().split()
            got = {cmd[i][2:]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i][2:] in point[m]}
            if got != {k: str(v) for k, v in point[m].items()}:
                sys.exit(f"why_compare: {d} was not run at {m}'s point {point[m]} ({got})")
            r = json.loads((d / "metrics.json").read_text())
            r["_dir"], r["_cmd"] = d, cmd
            runs.setdefault(m, {})[s] = r
    return runs


def rate_grid(folder, methods, runs, point, settings, seed):
    """The client-rate grid's table: every variant's mean valid loss at seed SEED at its client rate x each multiplier (x 1:
    its run in the main roots). Returns the lines and {method: (multiplier, root, point)} of the complete grids' selections."""
    cells, mults = {}, set()
    for r in sorted(folder.iterdir()):
        if not (r / "settings.json").exists():
            continue
        st, pts = load_root(r)
        if {k: v for k, v in st.items() if k not in ("grids", "name", "prior_selection")} != settings:
            sys.exit(f"why_compare: {r} differs in settings from the main roots")
        (m, p), = pts.items()
        mult = r.name.rsplit("-x", 1)[1]
        f = r / "seeds" / m / f"seed{seed}" / "metrics.json"
        if f.exists():
            cmd = (f.parent / "command.txt").read_text().split()
            got = {cmd[i][2:]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i][2:] in p}
            if got != {k: str(v) for k, v in p.items()}:
                sys.exit(f"why_compare: {f.parent} was not run at {p}")
            cells[(m, mult)] = (json.loads(f.read_text()), p, r)
            mults.add(mult)
    ms = sorted(mults | {"1"}, key=float)
    out = [f"## The client level's rate: an equal grid at seed {seed} (valid split)", "",
           f"Each variant at its client rate times {', '.join(ms)} (x 1: the run above; the same multipliers for every variant), "
           f"everything else at its point. Mean valid loss over the clients at seed {seed}, the split the selection uses (test "
           "read once at the end of each run, as the protocol's seed-0 grid runs do); **bold**: the variant's lowest, its selection. "
           "A variant whose grid is not complete has no selection.", "",
           "| variant | " + " | ".join(f"x {x}" for x in ms) + " | client rate selected |", "|---|" + "---:|" * len(ms) + "---|"]
    sel, moved = {}, []
    for m in methods:
        row = {"1": (runs[m][seed]["mean_valid_loss"], point[m], None)}
        row.update({x: (cells[(m, x)][0]["mean_valid_loss"], cells[(m, x)][1], cells[(m, x)][2]) for x in ms if (m, x) in cells})
        full = len(row) == len(ms)
        best = min(row, key=lambda x: row[x][0]) if full else None
        # The joint variant's default client rate is lr (its one AdamW); the rate grid's points set the AdamW option and lr2.
        rate = lambda x: row[x][1]["lr"] if (m in ("pf2lora-joint", "pf2lora-joint-half") and x == "1") else row[x][1]["lr2"]
        out.append(f"| {SHORT.get(m, m)} | " + " | ".join(
            ("" if x not in row else (f"**{row[x][0]:.4f}**" if x == best else f"{row[x][0]:.4f}")) for x in ms) +
            (f" | x {best} ({rate(best)}) |" if full else " | grid incomplete |"))
        if full:
            sel[m] = (best, row[best][2], row[best][1])
            if best != "1":
                moved.append(f"{SHORT.get(m, m)} (x {best}, {row['1'][0] - row[best][0]:.4f} below x 1)")
    out += ["", ("Selections that move off the variant's point: " + ", ".join(moved) + "." if moved else
                 "No complete grid moves its variant's selection off x 1."), ""]
    return out, sel


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--roots", required=True, help="comma-separated experiment folders")
    ap.add_argument("--rate-roots", default="", help="folder of the client-rate grid: <variant>-x<mult>/ experiment roots, seed "
                    "--select-seed (and seeds 1-2 at a moved selection; scripts/why_runs.py --stage rates, selected)")
    ap.add_argument("--select-seed", type=int, default=0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--title", default="Why PF2LoRA trails its joint ablation on data to text: the client level's training")
    ap.add_argument("--out", default="-")
    ap.add_argument("--preamble", default="")
    ap.add_argument("--appendix", default="")
    a = ap.parse_args()
    roots = [pathlib.Path(r) for r in a.roots.split(",") if r]
    seeds = [int(s) for s in a.seeds.split(",")]
    where, point, settings = {}, {}, None
    for r in roots:
        st, pts = load_root(r)
        common = {k: v for k, v in st.items() if k not in ("grids", "name", "prior_selection")}
        if settings is None:
            settings = common
        elif common != settings:
            sys.exit(f"why_compare: {r} differs in settings " +
                     str({k: (settings.get(k), common.get(k)) for k in set(settings) | set(common) if settings.get(k) != common.get(k)}))
        for m, p in pts.items():
            if m in where:
                sys.exit(f"why_compare: {m} is in two roots")
            where[m], point[m] = r, p
    methods = [m for m in ORDER if m in where] + [m for m in where if m not in ORDER]
    runs = load_runs(lambda m, s: where[m] / "seeds" / m / f"seed{s}", point, methods, seeds)
    clients = [c["client"] for c in runs[methods[0]][seeds[0]]["clients"]]
    base = sum(c["base_test_loss"] for c in runs[methods[0]][seeds[0]]["clients"]) / len(clients)

    def describe(m, runs):
        """What the variant does per client and round, from its run (not from its name)."""
        r = runs[m][seeds[0]]
        cmd = r["_cmd"]
        flag = lambda k, d=None: cmd[cmd.index(f"--{k}") + 1] if f"--{k}" in cmd else d
        joint = r.get("variant") == "joint"
        it = r["local_iterations"]
        opt = r.get("lower_optimizer", "default")
        if opt == "default":
            opt = "adamw" if joint else "sgd"
        sched = flag("schedule-lower-lr", "false") == "true" or (joint and r.get("lower_optimizer", "default") == "default")
        rate = float(flag("lr")) if joint and r.get("lower_optimizer", "default") == "default" else float(flag("lr2"))
        client_steps = it if joint else it * r["lower_steps"]
        return {"schedule": "joint: both levels from each minibatch" if joint else f"alternating {it} x ({r['lower_steps']} + 1)",
                "client": f"{'AdamW' if opt == 'adamw' else 'SGD'} {rate:g}{', cosine' if sched else ''}",
                "client_steps": client_steps, "shared_steps": it, "evals": r["gradient_evaluations_per_round"],
                "minibatch": f"{r['batch']} x {r['seq']}", "tokens": r["clients"][0]["tokens"]}

    def tables(runs, label):
        """Summary and planned contrasts of RUNS (every method, every seed)."""
        L = {m: {s: {c["client"]: c for c in runs[m][s]["clients"]} for s in seeds} for m in methods}
        loss = lambda m, s, c: L[m][s][c]["test_loss"]
        shared_only = lambda m, s, c: L[m][s][c]["shared_only_test_loss"]
        cmean = lambda f, m, c: sum(f(m, s, c) for s in seeds) / len(seeds)
        overall = {m: mean_ci([sum(loss(m, s, c) for c in clients) / len(clients) for s in seeds]) for m in methods}
        so_overall = {m: mean_ci([sum(shared_only(m, s, c) for c in clients) / len(clients) for s in seeds]) for m in methods}
        gain = {m: mean_ci([sum(shared_only(m, s, c) - loss(m, s, c) for c in clients) / len(clients) for s in seeds]) for m in methods}
        norms = {}
        try:
            for m in methods:
                norms[m] = [update_norms(runs[m][s]["_dir"] / "store") for s in seeds]
        except (ImportError, StopIteration, FileNotFoundError) as e:
            print(f"why_compare: update norms not read ({e})", file=sys.stderr)
            norms = {}
        out = [f"## Summary, {label} (mean over the {len(clients)} clients; mean ± 95 % t-interval over seeds)", "",
               "| variant | client rate | test loss | shared pair alone | client level's gain (shared alone − both) | ||s1 B A||_F | mean ||s2 D_k C_k||_F | valid, last round |",
               "|---|---|---:|---:|---:|---:|---:|---:|"]
        for m in methods:
            nb = nc = ""
            if m in norms:
                nb = "{:.2f} ± {:.2f}".format(*mean_ci([n[0] for n in norms[m]]))
                nc = "{:.2f} ± {:.2f}".format(*mean_ci([sum(n[1].values()) / len(n[1]) for n in norms[m]]))
            vl = sum(runs[m][s]["mean_valid_loss"] for s in seeds) / len(seeds)
            out.append(f"| {SHORT.get(m, m)} | {describe(m, runs)['client']} | {overall[m][0]:.4f} ± {overall[m][1]:.4f} | "
                       f"{so_overall[m][0]:.4f} ± {so_overall[m][1]:.4f} | {gain[m][0]:.4f} ± {gain[m][1]:.4f} | {nb} | {nc} | {vl:.4f} |")
        out += ["", f"Base (no adapter): {base:.4f}. The norms are those of the trained updates (sum of squares over the adapted "
                "modules, square root; the trained adapters of the run's store), at the end of the run; the client column is the "
                "mean over the clients.", "",
                f"### Planned contrasts, {label} (test loss, paired over the clients' seed-means)", "",
                f"Differences a − b over the {len(clients)} clients' seed-means (negative: a is lower), mean ± 95 % t-interval over "
                f"clients, Wilcoxon signed-rank (two-sided), Holm over the planned contrasts; and the same difference split into "
                "its two parts: the shared pair alone and the client level's gain (a larger gain lowers the loss).", "",
                "| contrast | a − b (nats) | a lower on | Wilcoxon p | Holm | Δ shared pair alone | Δ client level's gain |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        rows, ps = [], []
        for x, y, what in CONTRASTS:
            if x not in where or y not in where:
                continue
            dc = [cmean(loss, x, c) - cmean(loss, y, c) for c in clients]
            ds = [cmean(shared_only, x, c) - cmean(shared_only, y, c) for c in clients]
            mc, cc = mean_ci(dc)
            p = wilcoxon(dc)
            ps.append(p)
            g = sum(ds) / len(ds) - mc   # Δ gain = Δ shared-alone − Δ both
            rows.append([what, f"{mc:+.4f} ± {cc:.4f}", f"{sum(v < 0 for v in dc)} of {len(dc)}", f"{p:.2g}", None,
                         f"{sum(ds) / len(ds):+.4f}", f"{g:+.4f}"])
        for r, q in zip(rows, holm(ps)):
            r[4] = f"{q:.2g}"
            out.append("| " + " | ".join(r) + " |")
        if all(m in where for m in ("pf2lora", "pf2lora-adamw", "pf2lora-joint-sgd", "pf2lora-joint")):
            inter = [(cmean(loss, "pf2lora-joint", c) - cmean(loss, "pf2lora-joint-sgd", c))
                     - (cmean(loss, "pf2lora-adamw", c) - cmean(loss, "pf2lora", c)) for c in clients]
            mi, ci = mean_ci(inter)
            tot = [cmean(loss, "pf2lora-joint", c) - cmean(loss, "pf2lora", c) for c in clients]
            mt, ct = mean_ci(tot)
            out += ["", f"The 2 x 2 of A, B, C, D (optimizer x schedule): the whole difference D − A is {mt:+.4f} ± {ct:.4f}; the "
                    f"interaction (D − C) − (B − A) is {mi:+.4f} ± {ci:.4f} (Wilcoxon p {wilcoxon(inter):.2g}, not in the Holm "
                    "set): how much the optimizer's effect changes between the alternating and the joint schedule."]
        out.append("")
        return out, L

    out = [f"# {a.title}", ""]
    if a.preamble:
        out += [pathlib.Path(a.preamble).read_text().strip(), ""]
    out += [f"Generated by `python3 scripts/why_compare.py {' '.join(sys.argv[1:])}` from the kept runs (no run is made).", "",
            "## Protocol", "",
            f"- Settings of every run (checked equal across the roots): base `{settings['model']}`, clients `{settings['data']}`, budget "
            f"**{settings['budget']}**, {settings['rounds']} rounds, r = {settings['rank']}, r2 = {settings['rank2']}, valid every "
            f"{settings['eval_every']} rounds on {settings['eval_windows']} windows, test read once at the end, seeds "
            f"{', '.join(map(str, seeds))}; every variant trains on the same tokens per client (table below).",
            "- The variants' points: the rate lr = 1e-2 that both references' 4-point grids selected (PF2LoRA's: "
            "RESULTS-data-to-text-compute8.md; the joint variant's: RESULTS-data-to-text-compute8-joint.md); the client level's rate "
            "is its reference's (SGD: PF2LoRA's 0.5, constant; AdamW: the joint variant's, lr with the round schedule). " +
            (f"Then one equal grid for every variant, the references included: the client level's rate x 0.5, 2, 4, selection on seed "
             f"{a.select_seed}'s valid split; the variants whose selection moves are rerun at seeds 1-2 there. Nothing else is tuned "
             "(the references' other knobs were selected on their own grids earlier, the new variants' were not)." if a.rate_roots else
             "No grid on this page: every variant runs at that point, none is tuned here (the references' points were selected on "
             "their own grids earlier, the new variants' were not)."),
            "- Runs: " + "; ".join(f"`{r}`" for r in roots) + (f"; `{a.rate_roots}`" if a.rate_roots else "") +
            " (outside git; each root's `settings.json` and the `*_selection.json` beside it).", ""]
    out += ["## The variants (per client and round)", "",
            "| variant | schedule | client level's optimizer, rate | client-level steps | shared-level steps | gradient evaluations | minibatch | tokens / client (run) | point |",
            "|---|---|---|---:|---:|---:|---|---:|---|"]
    for m in methods:
        d = describe(m, runs)
        out.append(f"| {SHORT.get(m, m)} | {d['schedule']} | {d['client']} | {d['client_steps']} | {d['shared_steps']} | {d['evals']} | "
                   f"{d['minibatch']} | {d['tokens']:,} | `{point_id(point[m])}` |")
    out += ["", "Each gradient evaluation is one minibatch through the model; under the joint schedule it yields the gradients of both "
            "levels, under the alternating one the gradient of the level being stepped (the other level's is not computed).", ""]

    sel_runs = None
    if a.rate_roots:
        lines, sel = rate_grid(pathlib.Path(a.rate_roots), methods, runs, point, settings, a.select_seed)
        out += lines
        missing = [m for m in methods if m not in sel or (sel[m][0] != "1" and not all(
            (sel[m][1] / "seeds" / m / f"seed{s}" / "metrics.json").exists() for s in seeds))]
        if missing:
            out += ["Not complete at the selected client rates (grid incomplete, or seeds missing at the selection): " +
                    ", ".join(SHORT.get(m, m) for m in missing) + "; the tables at the selections are not written.", ""]
        else:
            spoint = {m: sel[m][2] for m in methods}
            sel_runs = load_runs(lambda m, s: (where[m] if sel[m][0] == "1" else sel[m][1]) / "seeds" / m / f"seed{s}", spoint, methods, seeds)
    if sel_runs:
        lines, L = tables(sel_runs, "every variant at its selected client rate (equal tuning)")
        out += lines
        lines, _ = tables(runs, "every variant at its reference's client rate (x 1)")
        out += lines
    else:
        lines, L = tables(runs, "every variant at its reference's client rate (x 1)")
        out += lines
    final = sel_runs or runs
    cmean = lambda m, c: sum(L[m][s][c]["test_loss"] for s in seeds) / len(seeds)
    out += ["## Test loss per client (seed-means" + (", at the selected client rates)" if sel_runs else ")"), "",
            "| client | base | " + " | ".join(SHORT.get(m, m) for m in methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    for c in clients:
        out.append(f"| {c} | {L[methods[0]][seeds[0]][c]['base_test_loss']:.4f} | " + " | ".join(f"{cmean(m, c):.4f}" for m in methods) + " |")
    out += ["", "## Valid curves (mean valid loss over clients, mean over seeds" + (", at the selected client rates)" if sel_runs else ")"), "",
            "| round | " + " | ".join(SHORT.get(m, m) for m in methods) + " |", "|---|" + "---:|" * len(methods)]
    by = {m: {} for m in methods}
    for m in methods:
        for s in seeds:
            for p in final[m][s].get("mean_valid_loss_by_round", []):
                by[m].setdefault(p["round"], []).append(p["loss"])
    for rd in sorted(by[methods[0]]):
        out.append(f"| {rd} | " + " | ".join(f"{sum(by[m][rd]) / len(by[m][rd]):.4f}" if rd in by[m] else "" for m in methods) + " |")
    out += ["", "## Cost (mean over seeds, the runs at the references' client rates)", "",
            "| variant | training s / round | wall-clock s | binary |", "|---|---:|---:|---|"]
    for m in methods:
        r = list(runs[m].values())
        out.append(f"| {SHORT.get(m, m)} | {sum(x['seconds_per_round'] for x in r) / len(r):.1f} | {sum(x['seconds'] for x in r) / len(r):.0f} | "
                   f"`{r[0]['_cmd'][0]}` |")
    out += ["", "Wall-clock: nice 19 on a shared 2-core machine beside other jobs; compare nothing but orders of magnitude.", ""]
    write_page(out, a.out, a.appendix)


if __name__ == "__main__":
    main()
