#!/usr/bin/env python3
"""Two budgets of one federation side by side (issue 13: "train until validation loss flattens"): each method's
mean test loss at the short and the long budget, what the longer training bought, and PF2LoRA's gap to each
method at both budgets (mean difference over the clients' seed-means ± 95 % t-interval, Wilcoxon signed-rank
over those client means, clients where PF2LoRA is lower). Reads two experiment folders of scripts/experiment.py
(ROOT/seeds/<method>/seed<s>/metrics.json); only seeds finished by every listed method at both budgets count.

    python3 scripts/budget_compare.py --short RUNS/debian-fair6 --long RUNS/debian-long16 \\
        --labels "6 rounds,16 rounds" [--methods pf2lora,homlora,...] [--seeds 0,1,2]
"""
import sys
import argparse, json, math, pathlib
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from experiment import mean_ci  # noqa: E402  (one t-interval for every results page)

NAMES = {"pf2lora": "PF2LoRA", "homlora": "HOMLoRA", "perfedavg": "Per-FedAvg-LoRA", "hetlora": "HETLoRA",
         "local": "Local-only LoRA", "fedavg-ft": "FedAvg-LoRA + FT", "pf2lora-joint": "PF2LoRA, joint (ablation)"}




def load(root, methods, seeds, alias={}):
    out = {}
    for m in methods:
        for s in seeds:
            f = pathlib.Path(root) / alias.get(m, f"seeds/{m}") / f"seed{s}" / "metrics.json"
            if f.exists():
                out.setdefault(m, {})[s] = {c["client"]: c["test_loss"] for c in json.loads(f.read_text())["clients"]}
    return out


def main():
    from scipy import stats
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", required=True)
    ap.add_argument("--long", required=True)
    ap.add_argument("--labels", default="short,long")
    ap.add_argument("--methods", default="pf2lora,homlora,perfedavg,hetlora,local,fedavg-ft")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--short-alias", action="append", default=[], metavar="METHOD=DIR",
                    help="a method's short-budget runs in another folder of --short (e.g. pf2lora-joint=ablations/joint, "
                         "scripts/debian_ablations.py's runs): DIR/seed<s>/metrics.json")
    a = ap.parse_args()
    methods = a.methods.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    ls, ll = a.labels.split(",")
    alias = dict(x.split("=", 1) for x in a.short_alias)
    S, L = load(a.short, methods, seeds, alias), load(a.long, methods, seeds)
    # a method without short-budget runs (an ablation run only at the long budget) is shown at the long one only
    # an aliased method (an ablation run apart) may have fewer short-budget seeds: it is shown over those it has
    both = [s for s in seeds if all(s in L.get(m, {}) for m in methods) and all(s in S.get(m, {}) for m in methods if m not in alias)]
    if not both or "pf2lora" not in S:
        raise SystemExit("budget_compare: no seed finished by every method at both budgets")
    clients = sorted(L["pf2lora"][both[0]])
    def have(R, m):
        return [s for s in both if s in R.get(m, {})]
    def overall(R, m):
        return mean_ci([sum(R[m][s].values()) / len(clients) for s in have(R, m)])
    def gap(R, m):
        ss = have(R, m)
        dc = [sum(R["pf2lora"][s][c] - R[m][s][c] for s in ss) / len(ss) for c in clients]
        mu, ci = mean_ci(dc)
        p = stats.wilcoxon(dc).pvalue if any(x != 0 for x in dc) else 1.0
        return mu, ci, p, sum(1 for x in dc if x < 0)
    lines = [f"Seeds {', '.join(map(str, both))} (finished by every method at both budgets); test loss, mean over "
             f"{len(clients)} clients, ± 95 % t-interval over seeds. PF2LoRA − method: mean over the clients' seed-means "
             "± 95 % t-interval over clients, Wilcoxon signed-rank p over those 13 pairs, clients where PF2LoRA is lower "
             "(negative differences favour PF2LoRA).", "",
             f"| method | test loss, {ls} | test loss, {ll} | gain from the longer budget | PF2LoRA − method, {ls} | "
             f"PF2LoRA lower on, {ls} | PF2LoRA − method, {ll} | p, {ll} | PF2LoRA lower on, {ll} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        ol = overall(L, m)
        if have(S, m):
            os_ = overall(S, m)
            few = "" if len(have(S, m)) == len(both) else f" (seed{'s' if len(have(S, m)) > 1 else ''} {', '.join(map(str, have(S, m)))})"
            cells = [f"{os_[0]:.4f} ± {os_[1]:.4f}{few}", f"{ol[0]:.4f} ± {ol[1]:.4f}", f"{os_[0] - mean_ci([sum(L[m][s].values()) / len(clients) for s in have(S, m)])[0]:.4f}{few}"]   # same seeds
        else:
            cells = ["(not run)", f"{ol[0]:.4f} ± {ol[1]:.4f}", ""]
        if m == "pf2lora":
            cells += ["", "", "", "", ""]
        else:
            if have(S, m):
                g = gap(S, m)
                cells += [f"{g[0]:+.4f} ± {g[1]:.4f}", f"{g[3]} of {len(clients)}"]
            else:
                cells += ["", ""]
            g = gap(L, m)
            cells += [f"{g[0]:+.4f} ± {g[1]:.4f}", f"{g[2]:.2g}", f"{g[3]} of {len(clients)}"]
        lines.append(f"| {NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
