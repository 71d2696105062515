#!/usr/bin/env python3
"""PF2LoRA's joint ablation (both levels trained jointly by one AdamW, no alternation) with its own grid, against the
six methods of an experiment made at the same settings (issue 13, item 4; docs/RESULTS-fair.md §4).

    python3 scripts/joint_compare.py --root RUNS_OF_THE_SIX --joint-root RUNS_OF_THE_JOINT_VARIANT [--seeds 0,1,2] \
        [--select-seed 0] [--out PAGE] [--preamble MD] [--appendix MD]

Both roots are folders of `scripts/experiment.py` (grid/<method>/<point>/, seeds/<method>/seed<s>/, settings.json): the
six methods' experiment and one made with `--methods pf2lora-joint` at the same settings (checked: settings.json must
agree on everything but the grids, and the joint root's grids must give every method the same learning rates). Reads
metrics.json and nlg.json only (no runs). Writes: the joint variant's grid and selection, mean test loss and
BLEU / ROUGE-L / METEOR of all seven (mean ± 95 % t-interval over seeds), per-client test loss, paired Wilcoxon
signed-rank tests of joint − each method over the clients' seed-means (two-sided, scipy) with Holm's correction,
the same over client x seed pairs (a screen), the same on the seeds the selection never saw, the levels' split (each
client's loss with the shared pair alone, read at the end of each run), cost, and the valid curves.
"""
import argparse
import json
import pathlib
import sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from experiment import METHODS, NAMES, mean_ci, point_id, write_page  # noqa: E402  (one list of methods, one t-interval, one point naming)

J = "pf2lora-joint"


def holm(ps):
    """Holm's step-down adjusted p-values, in the order given."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adj, run = [0.0] * len(ps), 0.0
    for k, i in enumerate(order):
        run = max(run, min(1.0, (len(ps) - k) * ps[i]))
        adj[i] = run
    return adj


def wilcoxon(d):
    from scipy import stats
    return stats.wilcoxon(d).pvalue if any(x != 0 for x in d) else 1.0


def selection(root, method):
    """(selected point, [(valid loss, point)]) of METHOD's grid in ROOT (settings.json's grid, every point finished)."""
    st = json.loads((root / "settings.json").read_text())
    rows = []
    for p in st["grids"][method]:
        f = root / "grid" / method / point_id(p) / "metrics.json"
        if not f.exists():
            sys.exit(f"joint_compare: {f} missing (the grid of {method} is not finished)")
        rows.append((json.loads(f.read_text())["mean_valid_loss"], p))
    return min(rows, key=lambda t: t[0])[1], rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="the six methods' experiment folder")
    ap.add_argument("--joint-root", required=True, help="the joint variant's experiment folder (--methods pf2lora-joint)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--select-seed", type=int, default=0)
    ap.add_argument("--title", default="PF2LoRA's joint ablation with its own grid, 8-round data-to-text protocol")
    ap.add_argument("--out", default="-")
    ap.add_argument("--preamble", default="")
    ap.add_argument("--appendix", default="")
    a = ap.parse_args()
    root, jroot = pathlib.Path(a.root), pathlib.Path(a.joint_root)
    seeds = [int(s) for s in a.seeds.split(",")]
    s6, sj = (json.loads((r / "settings.json").read_text()) for r in (root, jroot))
    same = {k for k in s6 if k not in ("grids", "name")}
    diff = {k: (s6.get(k), sj.get(k)) for k in same | (set(sj) - {"grids", "name"}) if s6.get(k) != sj.get(k)}
    if diff:
        sys.exit(f"joint_compare: the two experiments differ in settings {diff}")
    lrs = lambda g: sorted({p["lr"] for p in g}, key=float)
    if any(lrs(sj["grids"][J]) != lrs(s6["grids"][m]) or len(sj["grids"][J]) != len(s6["grids"][m]) for m in METHODS):
        sys.exit("joint_compare: the joint variant's grid has other rates or another size than the six methods'")
    sel = {m: selection(root, m) for m in METHODS}
    sel[J] = selection(jroot, J)
    methods = METHODS + [J]
    where = {m: (jroot if m == J else root) for m in methods}
    runs, nlg = {}, {}
    for m in methods:
        for s in seeds:
            d = where[m] / "seeds" / m / f"seed{s}"
            if not (d / "metrics.json").exists():
                sys.exit(f"joint_compare: {d}/metrics.json missing")
            r = json.loads((d / "metrics.json").read_text())
            want = {k: str(v) for k, v in sel[m][0].items()}
            cmd = (d / "command.txt").read_text().split()
            got = {cmd[i][2:]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i][2:] in want}
            if got != want:
                sys.exit(f"joint_compare: {d} was not run at {m}'s selected point {want} ({got})")
            runs.setdefault(m, {})[s] = r
            if (d / "nlg.json").exists():
                nlg.setdefault(m, {})[s] = json.loads((d / "nlg.json").read_text())
    clients = [c["client"] for c in runs["pf2lora"][seeds[0]]["clients"]]
    L = {m: {s: {c["client"]: c for c in runs[m][s]["clients"]} for s in seeds} for m in methods}
    loss = lambda m, s, c: L[m][s][c]["test_loss"]
    cmean = lambda m, c, ss=seeds: sum(loss(m, s, c) for s in ss) / len(ss)
    overall = {m: mean_ci([sum(loss(m, s, c) for c in clients) / len(clients) for s in seeds]) for m in methods}
    ranking = sorted(methods, key=lambda m: overall[m][0])
    have_nlg = [m for m in methods if len(nlg.get(m, {})) == len(seeds)]
    metric = lambda m, s, c, k: nlg[m][s]["clients"][c][k]

    out = [f"# {a.title}", ""]
    if a.preamble:
        out += [pathlib.Path(a.preamble).read_text().strip(), ""]
    out += [f"Generated by `python3 scripts/joint_compare.py {' '.join(sys.argv[1:])}` from the kept runs (no run is made).",
            "", "## Protocol", "",
            f"- Settings of both experiments (checked equal): base `{s6['model']}`, clients `{s6['data']}`, budget **{s6['budget']}**, "
            f"{s6['rounds']} rounds, {s6['local_steps']} x ({s6['lower_steps']} + 1) = {s6['local_steps'] * (s6['lower_steps'] + 1)} "
            f"gradient evaluations of {s6['batch']} x {s6['seq']} tokens per client and round, r = {s6['rank']}, r2 = {s6['rank2']}, "
            f"valid every {s6['eval_every']} rounds on {s6['eval_windows']} windows, selection on seed {a.select_seed}'s valid split.",
            f"- The joint variant (`federate --method pf2lora --variant joint`): the same four matrices as PF2LoRA (A, B shared, "
            "C_k, D_k per client; only (A, B) uploaded and averaged), one minibatch per iteration, the gradients of both levels, one "
            "AdamW step on all four at the rate lr; no lower loop, no alternation (lr2 is unused). Under the compute budget it runs "
            f"{runs[J][seeds[0]]['local_iterations']} iterations per round ({runs[J][seeds[0]]['gradient_evaluations_per_round']} "
            f"evaluations), PF2LoRA {runs['pf2lora'][seeds[0]]['local_iterations']} iterations of (lower + 1) evaluations: the same tokens.",
            f"- Its grid: the six methods' rates {', '.join(lrs(sj['grids'][J]))} plus one knob point at the middle rate, the LoRA "
            "scale alpha of the shared level doubled (as HOMLoRA, Local-only and FedAvg+FT, which have no knob of their own): "
            f"{len(sj['grids'][J])} points, as every method. Seed {a.select_seed}'s runs are the grid runs; seeds "
            f"{', '.join(str(s) for s in seeds if s != a.select_seed)} at the selected point.",
            f"- The six methods' runs: `{root}` (not rerun); the joint variant's: `{jroot}`.", ""]
    out += ["## The joint variant's grid (mean valid loss, seed " + str(a.select_seed) + ")", "",
            "| grid point | mean valid loss | selected |", "|---|---:|:---:|"]
    for v, p in sel[J][1]:
        out.append(f"| `{point_id(p)}` | {v:.4f} | {'**yes**' if p == sel[J][0] else ''} |")
    out += ["", "The six methods' selected points at the same seed (their grids: the six methods' page): " +
            ", ".join(f"{NAMES[m]} `{point_id(sel[m][0])}` {min(v for v, _ in sel[m][1]):.4f}" for m in METHODS) + ".", ""]
    out += ["## Summary (mean over the 13 clients; mean ± 95 % t-interval over seeds " + ", ".join(map(str, seeds)) + ")", "",
            "| method | test loss (lower is better) | BLEU | ROUGE-L | METEOR | shared pair alone (test) |",
            "|---|---:|---:|---:|---:|---:|"]
    for m in ranking:
        cells = [f"{overall[m][0]:.4f} ± {overall[m][1]:.4f}"]
        for k in ("bleu", "rougeL", "meteor"):
            if m in have_nlg:
                mu, ci = mean_ci([sum(metric(m, s, c, k) for c in clients) / len(clients) for s in seeds])
                cells.append(f"{mu:.2f} ± {ci:.2f}")
            else:
                cells.append("not decoded")
        so = [L[m][s][c].get("shared_only_test_loss") for s in seeds for c in clients]
        if all(x is not None for x in so):
            mu, ci = mean_ci([sum(L[m][s][c]["shared_only_test_loss"] for c in clients) / len(clients) for s in seeds])
            cells.append(f"{mu:.4f} ± {ci:.4f}")
        else:
            cells.append("")
        name = f"**{NAMES[m]}**" if m == J else NAMES[m]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    base = sum(L["pf2lora"][seeds[0]][c]["base_test_loss"] for c in clients) / len(clients)
    out += ["", f"Base (no adapter): {base:.4f}. \"Shared pair alone\": each client's test loss with its client pair removed "
            "(W0 + BA only), for the two-level methods.", ""]

    def compare(ss, note):
        rows, ps = [], []
        for m in METHODS:
            dc = [cmean(J, c, ss) - cmean(m, c, ss) for c in clients]
            dx = [loss(J, s, c) - loss(m, s, c) for c in clients for s in ss]
            mc, cc = mean_ci(dc)
            p = wilcoxon(dc)
            ps.append(p)
            rows.append([NAMES[m], f"{mc:+.4f} ± {cc:.4f}", f"{sum(x < 0 for x in dc)} of {len(dc)}", f"{p:.2g}", None,
                         f"{sum(x < 0 for x in dx)} of {len(dx)}", f"{wilcoxon(dx):.2g}" if len(ss) > 1 else "–"])
        for r, q in zip(rows, holm(ps)):
            r[4] = f"{q:.2g}"
        return [note, "", "| method | joint − method, mean ± 95 % CI over clients (nats) | joint's seed-mean lower on | "
                "Wilcoxon p, client means | Holm (6 comparisons) | joint lower on (client x seed) | Wilcoxon p, client x seed |",
                "|---|---:|---:|---:|---:|---:|---:|"] + ["| " + " | ".join(r) + " |" for r in rows] + [""]

    out += ["## The joint variant against each method (test loss, paired)", ""]
    out += compare(seeds, f"Over the {len(clients)} clients' seed-means (independent pairs; Holm's step-down correction over the six "
                   "comparisons) and, as a screen, over the client x seed pairs (not independent across one client's seeds). "
                   "Negative differences favour the joint variant.")
    rest = [s for s in seeds if s != a.select_seed]
    if len(rest) >= 1 and len(rest) < len(seeds):
        out += compare(rest, f"**The same on seeds {', '.join(map(str, rest))} only**, which the selection (seed {a.select_seed}'s valid "
                       "split) never saw:")
    if have_nlg and J in have_nlg:
        out += ["## BLEU / ROUGE-L / METEOR: the joint variant against PF2LoRA and Local-only", "",
                "Greedy decoding of the first test inputs of each client (`scripts/nlg_eval.py`, the six methods' settings: "
                f"{nlg[J][seeds[0]]['limit']} examples, at most {nlg[J][seeds[0]]['max_tokens']} new tokens; METEOR "
                f"{nlg[J][seeds[0]]['meteor']}). Wilcoxon over the clients' seed-means, Holm over the six tests of this table "
                "(3 metrics x 2 methods). Positive differences favour the joint variant (higher is better).", "",
                "| metric | method | joint − method, mean ± 95 % CI over clients | joint higher on | Wilcoxon p | Holm |",
                "|---|---|---:|---:|---:|---:|"]
        rows, ps = [], []
        for k, lab in (("bleu", "BLEU"), ("rougeL", "ROUGE-L"), ("meteor", "METEOR")):
            for m in ("pf2lora", "local"):
                dc = [sum(metric(J, s, c, k) - metric(m, s, c, k) for s in seeds) / len(seeds) for c in clients]
                mc, cc = mean_ci(dc)
                p = wilcoxon(dc)
                ps.append(p)
                rows.append([lab, NAMES[m], f"{mc:+.2f} ± {cc:.2f}", f"{sum(x > 0 for x in dc)} of {len(dc)}", f"{p:.2g}"])
        for r, q in zip(rows, holm(ps)):
            out.append("| " + " | ".join(r + [f"{q:.2g}"]) + " |")
        smp = nlg[J][seeds[0]]["clients"]
        out += ["", f"Sample (joint, seed {seeds[0]}, first test example of {clients[0]}): output `" +
                smp[clients[0]]["sample"]["output"][:160].replace("\n", "⏎").replace("`", "'") + "`", ""]
    out += ["## Test loss per client (mean ± 95 % CI over seeds)", "",
            "| client | base | PF2LoRA | joint | Local-only | joint − PF2LoRA | joint − Local-only | joint: shared pair alone |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in clients:
        cell = lambda m: "{:.4f} ± {:.4f}".format(*mean_ci([loss(m, s, c) for s in seeds]))
        so = mean_ci([L[J][s][c]["shared_only_test_loss"] for s in seeds]) if "shared_only_test_loss" in L[J][seeds[0]][c] else None
        out.append(f"| {c} | {L['pf2lora'][seeds[0]][c]['base_test_loss']:.4f} | {cell('pf2lora')} | {cell(J)} | {cell('local')} | "
                   f"{cmean(J, c) - cmean('pf2lora', c):+.4f} | {cmean(J, c) - cmean('local', c):+.4f} | "
                   + (f"{so[0]:.4f} ± {so[1]:.4f}" if so else "") + " |")
    out.append("")
    if all("shared_only_test_loss" in L[m][s][c] for m in ("pf2lora", J) for s in seeds for c in clients):
        out += ["## Which level carries what (test loss, mean over clients and seeds)", "",
                "| | base | shared pair alone | both levels | shared pair's gain over the base | client level's gain over the shared pair alone (clients where > 0) |",
                "|---|---:|---:|---:|---:|---:|"]
        for m in ("pf2lora", J):
            so = sum(L[m][s][c]["shared_only_test_loss"] for s in seeds for c in clients) / (len(seeds) * len(clients))
            bo = sum(loss(m, s, c) for s in seeds for c in clients) / (len(seeds) * len(clients))
            gains = [sum(L[m][s][c]["shared_only_test_loss"] - loss(m, s, c) for s in seeds) / len(seeds) for c in clients]
            out.append(f"| {NAMES[m]} | {base:.4f} | {so:.4f} | {bo:.4f} | {base - so:.4f} | {so - bo:.4f} "
                       f"({sum(g > 0 for g in gains)} of {len(clients)}; Wilcoxon p {wilcoxon(gains):.2g}) |")
        out += ["", f"HOMLoRA (one shared rank-{runs['homlora'][seeds[0]].get('baseline_rank', 10)} LoRA, {runs['homlora'][seeds[0]]['local_iterations']} AdamW "
                f"steps per round): {overall['homlora'][0]:.4f}.", ""]
    out += ["## Cost (mean over seeds)", "", "| method | local iterations / round | gradient evaluations / client / round | tokens / client | "
            "trainable params / client | uploaded / client / round | training s / round | wall-clock s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in ("pf2lora", J, "local"):
        r = list(runs[m].values())
        c0 = r[0]["clients"][0]
        out.append(f"| {NAMES[m]} | {r[0]['local_iterations']} | {r[0]['gradient_evaluations_per_round']} | "
                   f"{sum(x['clients'][0]['tokens'] for x in r) / len(r):,.0f} | {c0['trainable_parameters']:,} | "
                   f"{c0['uploaded_parameters_per_round']:,} | {sum(x['seconds_per_round'] for x in r) / len(r):.1f} | "
                   f"{sum(x['seconds'] for x in r) / len(r):.0f} |")
    out += ["", "Wall-clock: nice 19 on a shared 2-core machine, different sessions for the joint runs and the six; compare nothing "
            "but orders of magnitude.", "", "## Valid curves (mean valid loss over clients, mean over seeds)", "",
            "| round | " + " | ".join(NAMES[m] for m in ranking) + " |", "|---|" + "---:|" * len(ranking)]
    by = {m: {} for m in ranking}
    for m in ranking:
        for s in seeds:
            for p in runs[m][s].get("mean_valid_loss_by_round", []):
                by[m].setdefault(p["round"], []).append(p["loss"])
    for rd in sorted(by[J]):
        out.append(f"| {rd} | " + " | ".join(f"{sum(by[m][rd]) / len(by[m][rd]):.4f}" if rd in by[m] else "" for m in ranking) + " |")
    out.append("")
    write_page(out, a.out, a.appendix)


if __name__ == "__main__":
    main()
