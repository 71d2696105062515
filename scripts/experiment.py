#!/usr/bin/env python3
"""A fair comparison of PF2LoRA and its five baselines (issue 13, DESIGN §9): one budget for every
method, one validation grid of the same size for every method, several seeds, statistics.

    python3 scripts/experiment.py --name fortune --model models/fortune-gpt2 --data data/corpus/clients \\
        [--budget compute] [--rounds 8 --local-steps 4 --lower-steps 5] [--seeds 0,1,2] [--jobs 2]
    python3 scripts/experiment.py --name fortune ... --report-only     # tables from what has run

Stages, every run resumable on its own:
1. grid: every method x every point of its grid (GRIDS: the same number of points per method),
   selection seed --select-seed (default SELECT_SEED, `federate --no-test`: the test split is not read; or one
   of --seeds, whose runs the grid runs then are: they read the test split once at their end, only the
   selected point's is reported); select the point with the lowest mean valid loss over clients. A grid
   point whose training diverges is recorded as such (never selected).
2. seeds: every method at its selected point for every seed in --seeds, test split read once at the end.
3. report: per-client mean +- 95 % CI over seeds (t interval), overall mean test loss per seed ->
   mean +- CI, paired Wilcoxon signed-rank (two-sided, scipy) of PF2LoRA vs each baseline over the
   client x seed pairs, wins, tokens, wall-clock, parameters, peak memory, valid-loss curves (SVG).

A run lives in ROOT/<stage>/<method>/<point or seed>/; it is written to a `.partial` folder that is
renamed when `federate` has finished, so a killed experiment restarts the unfinished runs only and a
table never mixes runs: ROOT/settings.json records the experiment's settings, and a rerun with other
settings refuses (name a new --name or delete ROOT).
"""
import argparse
import concurrent.futures as cf
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

METHODS = ["pf2lora", "homlora", "perfedavg", "hetlora", "local", "fedavg-ft"]
NAMES = {"pf2lora": "PF2LoRA", "homlora": "HOMLoRA", "perfedavg": "Per-FedAvg-LoRA", "hetlora": "HETLoRA",
         "local": "Local-only LoRA", "fedavg-ft": "FedAvg-LoRA + FT"}
SELECT_SEED = 100
# Ablation variants that can be run beside the six methods (--methods ...,pf2lora-joint): the federate method and
# the extra flags that make the variant. Not in the default method list.
VARIANTS = {"pf2lora-joint": ("pf2lora", {"variant": "joint"}),
            # Which part of the client level's training matters (docs/RESULTS-data-to-text-why.md, scripts/why_compare.py):
            # the bilevel method with an AdamW of its own on (C_k, D_k) at lr2, scheduled like the shared level's rate ...
            "pf2lora-adamw": ("pf2lora", {"lower-optimizer": "adamw", "schedule-lower-lr": "true"}),
            # ... and the joint variant with the method's SGD on (C_k, D_k) at lr2 (constant, as the method's).
            "pf2lora-joint-sgd": ("pf2lora", {"variant": "joint", "lower-optimizer": "sgd"}),
            # The same flags at other points (their points, e.g. the split or the minibatch, come from the selection JSON).
            "pf2lora-joint-half": ("pf2lora", {"variant": "joint"}),
            "pf2lora-adamw-2x3": ("pf2lora", {"lower-optimizer": "adamw", "schedule-lower-lr": "true"})}
NAMES["pf2lora-joint"] = "PF2LoRA, joint (ablation)"
NAMES["pf2lora-adamw"] = "PF2LoRA, AdamW client level (ablation)"
NAMES["pf2lora-joint-sgd"] = "joint, SGD client level (ablation)"
NAMES["pf2lora-joint-half"] = "joint, half the steps (ablation)"
NAMES["pf2lora-adamw-2x3"] = "PF2LoRA, AdamW client level, 2 x (2 + 1) (ablation)"


LRS = "5e-3,1e-2,2e-2"


# The knobs a method's extra grid points may set (--extra-points), besides the learning rate "lr".
KNOBS = {"pf2lora": {"lr2", "local-steps", "lower-steps"}, "pf2lora-joint": {"lr2", "local-steps", "lower-steps"},
         "perfedavg": {"inner-lr"}, "hetlora": {"hetlora-lambda", "hetlora-prune"}, "homlora": {"alpha"},
         "local": {"alpha"}, "fedavg-ft": {"alpha", "fine-tune-steps"}}


def add_extra_points(grid, extra, methods):
    """Append each method's extra points (--extra-points: method -> list of points, each naming "lr" and any of the
    method's own knobs, KNOBS; unnamed knobs keep the grid's defaults) to GRID in place. Refused: a point without
    "lr", an unknown knob, a point already in the grid or given twice, and extra points that leave the methods'
    grids of unequal size (every method gets the same number of validation points)."""
    for m, pts in extra.items():
        if m.startswith("_"):
            continue
        if m not in grid:
            sys.exit(f"experiment: --extra-points names {m}, which is not in this experiment's grids")
        base = {k: v for k, v in grid[m][0].items() if k != "lr"} if grid[m] else {}
        for p in pts:
            if "lr" not in p:
                sys.exit(f"experiment: extra point {p} of {m} has no \"lr\"")
            bad = set(p) - {"lr"} - KNOBS.get(m, set())
            if bad:
                sys.exit(f"experiment: extra point {p} of {m} sets {', '.join(sorted(bad))}, not a knob of {m} "
                         f"(its knobs: {', '.join(sorted(KNOBS.get(m, set()))) or 'none'})")
            q = dict(base, **{k: str(v) for k, v in p.items()})
            if q in grid[m]:
                sys.exit(f"experiment: extra point {point_id(q)} of {m} is already in its grid")
            grid[m].append(q)
    sizes = {m: len(grid[m]) for m in methods if m in grid}
    if len(set(sizes.values())) > 1:
        sys.exit("experiment: unequal grids after --extra-points (" + ", ".join(f"{m} {n}" for m, n in sizes.items())
                 + "): every method gets the same number of points")
    return grid


def grids(local_steps, lower_steps, lrs=LRS, knob=True):
    """The same number of points for every method: the same learning-rate grid LRS (the AdamW rate of the
    shared level and of every single-level LoRA) with each method's own knobs at their defaults, plus one
    point that changes a knob of the method's own at the middle rate:
    - PF2LoRA: the split of its gradient evaluations (more shared steps, fewer lower steps, same
      local x (lower + 1) evaluations per round); its lower SGD rate lr2 = 0.5 throughout;
    - Per-FedAvg: the inner (adaptation) SGD rate 0.05 instead of 0.5;
    - HETLoRA: penalty 1e-2 and pruning ratio 0.1 instead of 1e-3 and 0.05;
    - HOMLoRA, Local-only, FedAvg+FT (no knob of their own): the LoRA scale alpha doubled (alpha is a knob of
      every LoRA; the others keep the default alpha = 2 r)."""
    with_knob = knob
    lrs = [x for x in lrs.split(",") if x]
    mid = lrs[len(lrs) // 2]
    g = local_steps * (lower_steps + 1)
    # The alternative split: one lower step per local iteration when the experiment uses more, else five.
    alt_lower = 1 if lower_steps > 1 else 5
    alt_local = max(1, g // (alt_lower + 1))
    base = {"pf2lora": {"lr2": "0.5"}, "perfedavg": {"inner-lr": "0.5"},
            "hetlora": {"hetlora-lambda": "1e-3", "hetlora-prune": "0.05"}, "homlora": {}, "local": {}, "fedavg-ft": {},
            "pf2lora-joint": {"lr2": "0.5"}}
    knob = {"pf2lora": {"local-steps": str(alt_local), "lower-steps": str(alt_lower)}, "perfedavg": {"inner-lr": "0.05"},
            "hetlora": {"hetlora-lambda": "1e-2", "hetlora-prune": "0.1"}}
    out = {}
    for m, b in base.items():
        pts = [dict(b, lr=lr) for lr in lrs]
        if with_knob:
            pts.append(dict(b, lr=mid, **knob.get(m, {"alpha": "32"})))
        out[m] = pts
    return out


def point_id(p):
    return "_".join(f"{k}={v}" for k, v in sorted(p.items())) or "default"


def runs_at_a_time(jobs):
    return "one run at a time" if jobs == 1 else f"{jobs} runs at a time"


def log(msg):
    print(f"experiment [{time.strftime('%H:%M:%S')}]: {msg}", file=sys.stderr, flush=True)


class Experiment:
    def __init__(self, a):
        self.a = a
        self.root = pathlib.Path(a.root or f"runs/experiments/{a.name}")
        self.settings = {k: getattr(a, k) for k in ("name", "model", "data", "budget", "rounds", "local_steps", "lower_steps",
                                                    "batch", "seq", "rank", "rank2", "eval_every", "eval_windows", "clients")}
        self.grid = {m: g for m, g in grids(a.local_steps, a.lower_steps, a.lrs, knob=not a.no_knob).items()
                     if m in METHODS or m in a.methods}   # a variant's grid only when it is run
        self.extra_about = ""
        if a.extra_points:
            raw = json.loads(pathlib.Path(a.extra_points).read_text())
            self.extra_about = raw.get("_about", "")
            before = len(self.grid[a.methods[0]])
            add_extra_points(self.grid, raw, a.methods)
            self.n_extra = len(self.grid[a.methods[0]]) - before
        # Methods whose selection was made before (--prior-selection): no grid runs here, the recorded point is used.
        self.prior = {}
        if a.prior_selection:
            raw = json.loads(pathlib.Path(a.prior_selection).read_text())
            self.prior = {m: v for m, v in raw.items() if m in a.methods}
            self.prior_about = raw.get("_about", "")
            for m, v in self.prior.items():
                self.grid[m] = [v["selected"]]
        self.settings["grids"] = self.grid
        self.settings["select_seed"] = a.select_seed
        if self.prior:
            self.settings["prior_selection"] = {m: v["selected"] for m, v in self.prior.items()}

    def check_settings(self):
        self.root.mkdir(parents=True, exist_ok=True)
        f = self.root / "settings.json"
        if f.exists():
            old = json.loads(f.read_text())
            new = json.loads(json.dumps(self.settings))
            if old != new:
                diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
                if self.extends(old, new):
                    # A grid extended equally (every old point kept, new points added): the finished points are reused,
                    # the new ones run; a seed run made at a selection that the extension changes is refused by check_run.
                    added = ", ".join(f"{m} +{len(new['grids'][m]) - len(old['grids'].get(m, []))}" for m in new["grids"])
                    log(f"grid extended ({added} points); finished points reused")
                    hist = self.root / "grid-extensions.json"
                    h = json.loads(hist.read_text()) if hist.exists() else []
                    h.append({"time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "from": old["grids"], "to": new["grids"]})
                    hist.write_text(json.dumps(h, indent=1) + "\n")
                    f.write_text(json.dumps(self.settings, indent=1, sort_keys=True) + "\n")
                    return
                sys.exit(f"experiment: {self.root} holds runs made with other settings {diff}; "
                         f"use another --name or delete {self.root}")
        else:
            f.write_text(json.dumps(self.settings, indent=1, sort_keys=True) + "\n")

    @staticmethod
    def extends(old, new):
        """True when NEW differs from OLD only by grids that keep every old point of every method and add points."""
        if {k: v for k, v in old.items() if k != "grids"} != {k: v for k, v in new.items() if k != "grids"}:
            return False
        og, ng = old.get("grids", {}), new.get("grids", {})
        return set(og) == set(ng) and all(all(p in ng[m] for p in og[m]) for m in og)

    @staticmethod
    def comparable(cmd):
        """A recorded command without what does not change the run: the binary's path (runs reused from another
        binary are named on the page) and the output folders."""
        words = cmd.split()[1:]
        flags, i = {}, 1     # words[0] is the subcommand
        while i < len(words):
            k = words[i]
            v = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
            i += 1 if v is None else 2
            if k not in ("--store", "--out"):
                flags[k] = v
        return [words[0]] + [f"{k} {v}" if v is not None else k for k, v in sorted(flags.items())]

    def check_run(self, d, cmd):
        """A finished run is reused only if it was made with this command (a grid extension can change a
        selection; a run copied from another experiment must have been made at the same point and settings)."""
        f = d / "command.txt"
        if not f.exists():
            return
        have, want = self.comparable(f.read_text()), self.comparable(" ".join(cmd))
        if have != want:
            sys.exit(f"experiment: {d} was made with another command than this experiment's:\n  {' '.join(have)}\n  "
                     f"{' '.join(want)}\nmove it aside (the selection may have changed) and rerun")

    def command(self, method, point, seed, out, no_test):
        a = self.a
        flags = {"rounds": a.rounds, "local-steps": a.local_steps, "lower-steps": a.lower_steps, "batch": a.batch,
                 "seq": a.seq, "rank": a.rank, "rank2": a.rank2, "eval-every": a.eval_every, "budget": a.budget}
        if a.eval_windows:
            flags["eval-windows"] = a.eval_windows
        if a.clients:
            flags["clients"] = a.clients
        # Under the compute budget the baselines' iterations come from the experiment's local/lower steps,
        # not from a PF2LoRA grid point's.
        fed_method, extra = VARIANTS.get(method, (method, {}))
        flags.update(extra)
        flags.update(point)
        cmd = [a.binary, "federate", "--model", a.model, "--data", a.data, "--method", fed_method, "--seed", str(seed),
               "--threads", "1", "--store", str(out / "store"), "--out", str(out), "--token-cache", "runs/token-cache"]
        for k, v in flags.items():
            cmd += [f"--{k}", str(v)]
        if no_test:
            cmd.append("--no-test")
        return cmd

    def run(self, stage, method, key, point, seed, no_test):
        d = self.root / stage / method / key
        if (d / "metrics.json").exists():
            self.check_run(d, self.command(method, point, seed, d, no_test))
            return d
        part = d.with_name(d.name + ".partial")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        cmd = self.command(method, point, seed, part, no_test)
        (part / "command.txt").write_text(" ".join(cmd) + "\n")
        t0 = time.time()
        with open(part / "stdout.txt", "w") as so, open(part / "stderr.txt", "w") as se:
            r = subprocess.run(["nice", "-n", str(self.a.nice)] + cmd, stdout=so, stderr=se)
        if r.returncode != 0 or not (part / "metrics.json").exists():
            tail = (part / "stderr.txt").read_text()[-600:]
            if stage == "grid" and "became non-finite" in tail:
                # A grid point whose training diverged is a result (never selected), not a failed experiment.
                (part / "metrics.json").write_text(json.dumps({"mean_valid_loss": float("inf"), "diverged": tail.strip()[-300:]}) + "\n")
                shutil.rmtree(part / "store", ignore_errors=True)
                shutil.rmtree(d, ignore_errors=True)
                part.rename(d)
                log(f"{stage}/{method}/{key}: diverged (recorded as inf)")
                return d
            raise RuntimeError(f"{stage}/{method}/{key} failed (exit {r.returncode}):\n{tail}")
        shutil.rmtree(part / "store", ignore_errors=True) if stage == "grid" and no_test else None
        shutil.rmtree(d, ignore_errors=True)
        part.rename(d)
        log(f"{stage}/{method}/{key}: {time.time() - t0:.0f}s")
        return d

    def parallel(self, jobs):
        with cf.ThreadPoolExecutor(max_workers=self.a.jobs) as ex:
            futs = [ex.submit(self.run, *j) for j in jobs]
            for f in futs:
                f.result()

    def selected(self):
        out = {}
        for m in self.a.methods:
            if m in self.prior:
                v = self.prior[m]
                out[m] = (v["selected"], [(x if x is not None else float("nan"), pid, src) for x, pid, src in v["grid"]])
                continue
            rows = []
            for p in self.grid[m]:
                f = self.root / "grid" / m / point_id(p) / "metrics.json"
                if f.exists():
                    rows.append((json.loads(f.read_text())["mean_valid_loss"], p))
            if len(rows) == len(self.grid[m]):
                out[m] = (min(rows, key=lambda t: t[0])[1], rows)
        return out

    def stage_grid(self):
        # When the selection seed is one of the seeds, the grid runs are that seed's runs: they read the test
        # split once at their end (never looked at for selection) and keep their stores.
        reuse = self.a.select_seed in self.a.seeds
        jobs = [("grid", m, point_id(p), p, self.a.select_seed, not reuse) for m in self.a.methods if m not in self.prior
                for p in self.grid[m]]
        log(f"grid: {len(jobs)} runs ({sum(1 for j in jobs if not (self.root / 'grid' / j[1] / j[2] / 'metrics.json').exists())} to do)")
        self.parallel(jobs)

    def stage_seeds(self, only=None):
        sel = self.selected()
        if self.a.select_seed in self.a.seeds:
            for m in self.a.methods:
                d = self.root / "seeds" / m / f"seed{self.a.select_seed}"
                if not d.exists():
                    d.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(os.path.relpath(self.root / "grid" / m / point_id(sel[m][0]), d.parent), d)
        # Seed-major: an interrupted experiment has whole seeds (every method) rather than whole methods.
        jobs = [("seeds", m, f"seed{s}", sel[m][0], s, False) for s in (only or self.a.seeds) for m in self.a.methods]
        log(f"seeds: {len(jobs)} runs ({sum(1 for j in jobs if not (self.root / 'seeds' / j[1] / j[2] / 'metrics.json').exists())} to do)")
        self.parallel(jobs)

    def stage_nlg(self, only=None):
        """Greedy decoding of the test inputs with every seed run's adapters (scripts/nlg_eval.py)."""
        jobs = []
        for s in (only or self.a.seeds):
            for m in self.a.methods:
                d = self.root / "seeds" / m / f"seed{s}"
                if (d / "metrics.json").exists() and not (d / "nlg.json").exists():
                    jobs.append(d)
        log(f"nlg: {len(jobs)} runs to decode")
        def one(d):
            cmd = [sys.executable, "scripts/nlg_eval.py", "--binary", self.a.binary, "--model", self.a.model,
                   "--store", str(d / "store"), "--data", self.a.data, "--out", str(d / "nlg.json"),
                   "--limit", str(self.a.nlg_limit), "--max-tokens", str(self.a.nlg_tokens), "--nice", str(self.a.nice)]
            if self.a.clients:
                cmd += ["--clients", self.a.clients]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"nlg_eval {d} failed: {r.stderr[-600:]}")
            log(f"nlg {d}: done")
        with cf.ThreadPoolExecutor(max_workers=self.a.jobs) as ex:
            for f in [ex.submit(one, d) for d in jobs]:
                f.result()


# ----------------------------------------------------------------------------- statistics and report

def t95(n):
    from scipy import stats
    return stats.t.ppf(0.975, n - 1) if n > 1 else float("nan")


def mean_ci(xs):
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, t95(n) * sd / math.sqrt(n)


def write_page(lines, out, appendix=None):
    """A Markdown page: `lines`, then the appendix file's text if given, to `out` ("-" for stdout)."""
    if appendix:
        lines = lines + [pathlib.Path(appendix).read_text().strip(), ""]
    text = "\n".join(lines) + "\n"
    if out == "-":
        sys.stdout.write(text)
    else:
        pathlib.Path(out).write_text(text)


def curves_svg(series, path, title):
    """Mean valid loss by round, one line per method."""
    colors = ["#08519c", "#8c6bb1", "#e6550d", "#fdae6b", "#31a354", "#9e9e9e", "#d62728"]
    W, H, L, T, B, R = 760, 420, 70, 40, 60, 190
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys)]
    if not pts:
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    pad = (y1 - y0) * 0.05 or 0.01
    y0, y1 = y0 - pad, y1 + pad
    X = lambda x: L + (W - L - R) * ((x - x0) / ((x1 - x0) or 1))
    Y = lambda y: T + (H - T - B) * (1 - (y - y0) / ((y1 - y0) or 1))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<text x="{(W - R + L) / 2}" y="20" text-anchor="middle" font-size="13">{title}</text>']
    for i in range(6):
        yv = y0 + (y1 - y0) * i / 5
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{Y(yv):.1f}" y2="{Y(yv):.1f}" stroke="#ddd"/>'
                   f'<text x="{L - 5}" y="{Y(yv) + 4:.1f}" text-anchor="end">{yv:.3f}</text>')
    for xv in sorted({p[0] for p in pts}):
        out.append(f'<text x="{X(xv):.1f}" y="{H - B + 16}" text-anchor="middle">{xv:g}</text>')
    out.append(f'<text x="{(W - R + L) / 2}" y="{H - B + 36}" text-anchor="middle">round</text>')
    out.append(f'<text transform="translate(16,{(H - B + T) / 2}) rotate(-90)" text-anchor="middle">mean valid loss (nats/token)</text>')
    for j, (name, xs, ys) in enumerate(series):
        c = colors[j % len(colors)]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="' +
                   " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(xs, ys)) + '"/>')
        out.append(f'<rect x="{W - R + 15}" y="{T + 18 * j}" width="12" height="12" fill="{c}"/>'
                   f'<text x="{W - R + 32}" y="{T + 18 * j + 10}">{name}</text>')
    out.append("</svg>")
    pathlib.Path(path).write_text("\n".join(out) + "\n")


def report(exp, out_md, svg):
    from scipy import stats
    a, root = exp.a, exp.root
    sel = exp.selected()
    runs = {}
    for m in a.methods:
        for s in a.seeds:
            f = root / "seeds" / m / f"seed{s}" / "metrics.json"
            if f.exists() and m in sel:
                exp.check_run(f.parent, exp.command(m, sel[m][0], s, f.parent, False))
                runs.setdefault(m, {})[s] = json.loads(f.read_text())
    # Report the seeds every method has finished (seed-major runs: an interrupted experiment has whole seeds).
    done_seeds = [sd for sd in a.seeds if all(sd in runs.get(m, {}) for m in a.methods)]
    partial_note = []
    if done_seeds and len(done_seeds) < len(a.seeds):
        import copy
        partial_note = [f"**Partial: {len(done_seeds)} of {len(a.seeds)} seeds finished for every method** (seeds "
                        f"{', '.join(map(str, done_seeds))}); the rest resume with the command above. With one seed there is "
                        "no interval (shown as ± nan); with two the interval is wide (t = 12.7).", ""]
        a = copy.copy(a)
        a.seeds = done_seeds
    complete = [m for m in a.methods if len(a.seeds) and all(sd in runs.get(m, {}) for sd in a.seeds)]
    lines = [f"# {a.title}", ""]
    if a.preamble and os.path.exists(a.preamble):
        lines += [pathlib.Path(a.preamble).read_text().strip(), ""]
    st = exp.settings
    g = a.local_steps * (a.lower_steps + 1)
    lines += ["## Protocol", "",
              f"- Base `{a.model}`, clients `{a.data}`" + (f" ({a.clients})" if a.clients else "") + ".",
              f"- Budget **{a.budget}**: " + (
                  f"every method makes {g} gradient evaluations (minibatches of {a.batch} x {a.seq} tokens) per client "
                  f"per round: PF2LoRA {a.local_steps} local iterations x ({a.lower_steps} lower + 1 upper); HOMLoRA, "
                  f"Local-only, HETLoRA, FedAvg+FT {g} iterations; Per-FedAvg {g // 2} iterations of 2 evaluations. "
                  "FedAvg+FT's fine-tuning is inside the same budget: it reserves one round's worth of evaluations for it and its "
                  "rounds share the rest (rounded down; the remainder goes to fine-tuning), so every method trains on the same "
                  "tokens per client (the cost table's token column; Per-FedAvg's one adaptation step per evaluation is outside training)."
                  if a.budget == "compute" else
                  f"every method runs {a.local_steps} local iterations per round (PF2LoRA's make {a.lower_steps + 1} "
                  f"gradient evaluations each, so it sees more tokens; see the token column)."),
              f"- {a.rounds} rounds, all clients every round, rank r = {a.rank}, r2 = {a.rank2} (single-level "
              f"baselines rank {a.rank + a.rank2}), valid loss every {a.eval_every} rounds.",
              (f"- Tuning: {', '.join(NAMES[m] for m in exp.prior)} at the points selected before on the valid split of seed "
               f"{a.select_seed} (the grid table below gives every point, its valid loss and the session that ran it, and the text above it "
               f"the settings of that selection: the same rates {', '.join(a.lrs.split(','))} for every method plus, where it finished, one "
               "point of a knob of its own); "
               + (", ".join(NAMES[m] for m in a.methods if m not in exp.prior) + f" selected here from the rates {', '.join(a.lrs.split(','))} "
                  f"at seed {a.select_seed} (valid split, test not read); " if any(m not in exp.prior for m in a.methods) else "")
               + f"then seeds {', '.join(map(str, a.seeds))} at the selected points; "
               "the test split is read once, at the end of each."
               if exp.prior else
              f"- Tuning: every method has a grid of {len(exp.grid[a.methods[0]])} points, run at seed {a.select_seed}: the same "
              f"learning rates {', '.join(a.lrs.split(','))} (AdamW, the shared level's and every single-level LoRA's) for every method, "
              "each method's own knobs at their defaults"
              + (" (PF2LoRA's lower rate 0.5, Per-FedAvg's inner rate 0.5, HETLoRA's penalty 1e-3 and pruning ratio 0.05, "
                 "every LoRA's alpha at its default" + ("" if a.extra_points else "; no point of a knob of the method's own")
                 + "). " if a.no_knob else
                 ", plus one point that changes a knob of its own at the middle rate "
                 "(PF2LoRA: the split of its gradient evaluations between the levels; Per-FedAvg: the inner rate; HETLoRA: "
                 "penalty and pruning ratio; HOMLoRA, Local-only, FedAvg+FT, which have none: the LoRA scale alpha doubled). ")
              + (f"{exp.n_extra} of each method's {len(exp.grid[a.methods[0]])} points are extra points of its own knobs or rate "
                 f"({a.extra_points}; the grid table lists every point): {exp.extra_about} " if a.extra_points else "")
              + "The point with the lowest mean valid loss is selected (the test split is never used for selection). "
              + (f"Seed {a.select_seed}'s runs are the grid runs themselves (each reads the test split once, at its end; only the "
                 f"selected point's is reported), then seeds {', '.join(str(x) for x in a.seeds if x != a.select_seed)} at the selected point."
                 if a.select_seed in a.seeds else
                 f"The grid does not read the test split. Then {len(a.seeds)} seeds ({', '.join(map(str, a.seeds))}) at the selected point; "
                 "the test split is read once, at the end of each.")),
              f"- Reproduce: `python3 scripts/experiment.py {' '.join(a.argv)}` (resumable).",
              binaries(root, a), ""]
    lines += ["## Grids and selections (mean valid loss at the selection seed)", ""]
    if exp.prior:
        lines += [f"The selections of {', '.join(NAMES[m] for m in exp.prior)} were made before this run, at the same "
                  f"settings and selection seed ({a.prior_selection}): {exp.prior_about}", ""]
    lines += ["| method | grid point | mean valid loss | selected | run |", "|---|---|---:|:---:|---|"]
    for m in a.methods:
        if m not in sel:
            lines.append(f"| {NAMES[m]} | (grid not finished) | | | |")
            continue
        best, rows = sel[m]
        for row in rows:
            if len(row) == 3:   # a prior selection: (valid loss, point id, where it was run)
                v, pid, src = row
                lines.append(f"| {NAMES[m]} | `{pid}` | {'' if v != v else f'{v:.4f}'} | {'**yes**' if pid == point_id(best) else ''} | {src} |")
            else:
                v, p = row
                lines.append(f"| {NAMES[m]} | `{point_id(p)}` | {v:.4f} | {'**yes**' if p == best else ''} | here |")
    lines.append("")
    lines += selection_stage(a, root, sel, out_md, svg)
    if not complete:
        lines += ["No method has finished every seed yet: the test split has not been read. Finish with the "
                  "command above (it resumes).", ""]
        if a.appendix and os.path.exists(a.appendix):
            lines += [pathlib.Path(a.appendix).read_text().strip(), ""]
        lines += diagnostics(root)
        pathlib.Path(out_md).write_text("\n".join(lines) + "\n")
        return
    lines += partial_note
    clients = [c["client"] for c in runs[complete[0]][a.seeds[0]]["clients"]]
    def loss(m, s, c):
        return {x["client"]: x["test_loss"] for x in runs[m][s]["clients"]}[c]
    lines += ["## Test loss per client (mean ± 95 % CI over seeds; nats per token, lower is better)", ""]
    lines.append("| client | Base | " + " | ".join(NAMES[m] for m in complete) + " |")
    lines.append("|---|---:|" + "---:|" * len(complete))
    base = {c["client"]: c["base_test_loss"] for c in runs[complete[0]][a.seeds[0]]["clients"]}
    for c in clients:
        cells = []
        ms = {m: mean_ci([loss(m, s, c) for s in a.seeds]) for m in complete}
        best = min(v[0] for v in ms.values())
        for m in complete:
            mu, ci = ms[m]
            txt = f"{mu:.4f} ± {ci:.4f}"
            cells.append(f"**{txt}**" if mu == best else txt)
        lines.append(f"| {c} | {base[c]:.4f} | " + " | ".join(cells) + " |")
    overall = {m: mean_ci([sum(loss(m, s, c) for c in clients) / len(clients) for s in a.seeds]) for m in complete}
    lines.append(f"| **mean over clients** | {sum(base.values()) / len(base):.4f} | " +
                 " | ".join(f"**{overall[m][0]:.4f} ± {overall[m][1]:.4f}**" for m in complete) + " |")
    lines.append("")
    ranking = sorted(complete, key=lambda m: overall[m][0])
    lines.append("Mean test loss over clients, best first (mean ± 95 % CI over seeds): " +
                 ", ".join(f"{NAMES[m]} {overall[m][0]:.4f} ± {overall[m][1]:.4f}" for m in ranking) + ".")
    lines.append("")
    summary_at = len(lines)   # the summary table (test loss and the NLG metrics) goes here once the NLG is read
    if "pf2lora" in complete:
        lines += ["## PF2LoRA against each baseline (paired over client x seed)", "",
                  "Wilcoxon signed-rank test, two-sided, on the test-loss differences PF2LoRA − baseline over "
                  f"{len(clients)} clients x {len(a.seeds)} seeds = {len(clients) * len(a.seeds)} pairs "
                  "(pairs are not independent across seeds of one client; the test is a screen, the per-client CIs above are the detail); "
                  f"and the same test over the {len(clients)} clients' seed-means (independent pairs, fewer of them), with the 95 % "
                  "t-interval of the mean difference over those client means. Negative differences favour PF2LoRA.", "",
                  "| baseline | PF2LoRA lower on (client x seed) | mean difference (nats) ± 95 % CI over clients | median difference | Wilcoxon p, client x seed | clients where PF2LoRA's seed-mean is lower | Wilcoxon p, client means |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for m in complete:
            if m == "pf2lora":
                continue
            d = [loss("pf2lora", s, c) - loss(m, s, c) for c in clients for s in a.seeds]
            wins = sum(1 for x in d if x < 0)
            p = stats.wilcoxon(d).pvalue if any(x != 0 for x in d) else 1.0
            dm = sorted(d)[len(d) // 2]
            cw = sum(1 for c in clients if sum(loss("pf2lora", s, c) for s in a.seeds) < sum(loss(m, s, c) for s in a.seeds))
            dc = [sum(loss("pf2lora", s, c) - loss(m, s, c) for s in a.seeds) / len(a.seeds) for c in clients]
            pc = stats.wilcoxon(dc).pvalue if any(x != 0 for x in dc) else 1.0
            mc, cc = mean_ci(dc)
            lines.append(f"| {NAMES[m]} | {wins} of {len(d)} | {mc:+.4f} ± {cc:.4f} | {dm:+.4f} | {p:.2g} | {cw} of {len(clients)} | {pc:.2g} |")
        lines.append("")
    nlg = {}
    for m in complete:
        for sd in a.seeds:
            f = root / "seeds" / m / f"seed{sd}" / "nlg.json"
            if f.exists():
                nlg.setdefault(m, {})[sd] = json.loads(f.read_text())
    nlg_complete = [m for m in complete if len(nlg.get(m, {})) == len(a.seeds)]
    summ = ["## Summary (mean over clients; mean ± 95 % t-interval over seeds)", "",
            "| method | test loss (lower is better) | BLEU | ROUGE-L | METEOR |", "|---|---:|---:|---:|---:|"]
    for m in ranking:
        cells = [f"{overall[m][0]:.4f} ± {overall[m][1]:.4f}"]
        for metric in ("bleu", "rougeL", "meteor"):
            if m in nlg_complete:
                mu, ci = mean_ci([sum(nlg[m][sd]["clients"][c][metric] for c in clients) / len(clients) for sd in a.seeds])
                cells.append(f"{mu:.2f} ± {ci:.2f}")
            else:
                cells.append("not decoded")
        lines_summary_row = f"| {NAMES[m]} | " + " | ".join(cells) + " |"
        summ.append(lines_summary_row)
    summ.append("")
    lines[summary_at:summary_at] = summ
    if nlg_complete:
        first = nlg[nlg_complete[0]][a.seeds[0]]
        lines += ["## Data-to-text metrics (greedy decoding of test inputs)", "",
                  f"First {first['limit']} test examples per client, at most {first['max_tokens']} new tokens; "
                  f"BLEU (sacrebleu, corpus level per client), ROUGE-L F1 (rouge-score, stemmed), METEOR ({first['meteor']}). "
                  "Mean ± 95 % CI over seeds; higher is better.", ""]
        for metric, label in (("bleu", "BLEU"), ("rougeL", "ROUGE-L"), ("meteor", "METEOR")):
            lines += [f"**{label}**", "", "| client | " + " | ".join(NAMES[m] for m in nlg_complete) + " |",
                      "|---|" + "---:|" * len(nlg_complete)]
            def v(m, sd, c):
                return nlg[m][sd]["clients"][c][metric]
            for c in clients:
                ms = {m: mean_ci([v(m, sd, c) for sd in a.seeds]) for m in nlg_complete}
                best = max(x[0] for x in ms.values())
                lines.append(f"| {c} | " + " | ".join((f"**{ms[m][0]:.2f} ± {ms[m][1]:.2f}**" if ms[m][0] == best else f"{ms[m][0]:.2f} ± {ms[m][1]:.2f}") for m in nlg_complete) + " |")
            ov = {m: mean_ci([sum(v(m, sd, c) for c in clients) / len(clients) for sd in a.seeds]) for m in nlg_complete}
            lines.append("| **mean over clients** | " + " | ".join(f"**{ov[m][0]:.2f} ± {ov[m][1]:.2f}**" for m in nlg_complete) + " |")
            lines.append("")
            if "pf2lora" in nlg_complete:
                cmp = []
                for m in nlg_complete:
                    if m == "pf2lora":
                        continue
                    d = [v("pf2lora", sd, c) - v(m, sd, c) for c in clients for sd in a.seeds]
                    p = stats.wilcoxon(d).pvalue if any(x != 0 for x in d) else 1.0
                    cmp.append(f"{NAMES[m]}: PF2LoRA higher on {sum(1 for x in d if x > 0)} of {len(d)}, mean {sum(d) / len(d):+.2f}, p = {p:.2g}")
                lines += [f"PF2LoRA vs each baseline on {label} (Wilcoxon signed-rank over client x seed): " + "; ".join(cmp) + ".", ""]
        smp = nlg["pf2lora" if "pf2lora" in nlg_complete else nlg_complete[0]][a.seeds[0]]["clients"]
        lines += ["Samples (PF2LoRA, seed " + str(a.seeds[0]) + ", first test example of three clients):", ""]
        for c in clients[:3]:
            x = smp[c]["sample"]
            lines += [f"*{c}* — input:", "", "```", x["input"].rstrip(), "```", "output:", "", "```", x["output"][:500], "```",
                      "reference:", "", "```", x["reference"][:500], "```", ""]
    if a.rank_controls and all(m in complete for m in ("pf2lora", "local", "fedavg-ft")):
        lines += rank_controls(a, root, clients)
    lines += ["## Cost per method (measured, mean over seeds)", "",
              "| method | local iterations / round | gradient evaluations / client / round | tokens trained / client (whole run) | trainable params / client | uploaded / client / round | training s / round | peak RSS (MB) | wall-clock s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in complete:
        r = list(runs[m].values())
        c0 = r[0]["clients"][0]
        tok = sum(x["clients"][0]["tokens"] for x in r) / len(r)
        lines.append(f"| {NAMES[m]} | {r[0]['local_iterations']} | {r[0]['gradient_evaluations_per_round']} | {tok:,.0f} | "
                     f"{c0['trainable_parameters']:,} | {c0['uploaded_parameters_per_round']:,} | "
                     f"{sum(x['seconds_per_round'] for x in r) / len(r):.1f} | {max(x['peak_rss_bytes'] for x in r) / 2**20:.0f} | "
                     f"{sum(x['seconds'] for x in r) / len(r):.0f} |")
    lines += ["", "Wall-clock on a 2-core machine shared with other jobs, one BLAS thread per run, "
              f"{runs_at_a_time(a.jobs)}: compare within this table only.", ""]
    series = []
    for m in complete:
        by = {}
        for s in a.seeds:
            for p in runs[m][s].get("mean_valid_loss_by_round", []):
                by.setdefault(p["round"], []).append(p["loss"])
        xs = sorted(k for k, v in by.items() if len(v) == len(a.seeds))
        series.append((NAMES[m], xs, [sum(by[x]) / len(by[x]) for x in xs]))
    curves_svg(series, svg, "Mean valid loss by round (mean over seeds)")
    lines += ["## Validation curves", "", f"![mean valid loss by round]({os.path.relpath(svg, os.path.dirname(out_md) or '.')})", ""]
    flat = []
    for name, xs, ys in series:
        if len(ys) >= 3:
            last, prev = ys[-1], ys[-2]
            flat.append(f"{name} {prev - last:+.4f}")
    if flat:
        lines += ["Valid-loss improvement over the last evaluation interval (positive = still improving): " + ", ".join(flat) + ".", ""]
    rounds = sorted({x for _, xs, _ in series for x in xs})
    if rounds:
        lines += [f"Mean valid loss over the {len(clients)} clients by round (mean ± 95 % CI over seeds; round 0 = the base):", "",
                  "| method | 0 | " + " | ".join(str(r) for r in rounds) + " |", "|---|" + "---:|" * (len(rounds) + 1)]
        for m in complete:
            by = {}
            for s in a.seeds:
                for p in runs[m][s].get("mean_valid_loss_by_round", []):
                    by.setdefault(p["round"], []).append(p["loss"])
            b0 = [runs[m][s]["mean_base_valid_loss"] for s in a.seeds if "mean_base_valid_loss" in runs[m][s]]
            cells = [f"{sum(b0) / len(b0):.3f}" if b0 else ""]
            for r in rounds:
                v = by.get(r, [])
                if len(v) == len(a.seeds):
                    mu, ci = mean_ci(v)
                    cells.append(f"{mu:.3f}" + ("" if ci != ci else f" ± {ci:.3f}"))
                else:
                    cells.append("")
            lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
        lines.append("")
    if a.appendix and os.path.exists(a.appendix):
        lines += [pathlib.Path(a.appendix).read_text().strip(), ""]
    pathlib.Path(out_md).write_text("\n".join(lines) + "\n")
    log(f"wrote {out_md} and {svg}")


def binaries(root, a):
    """Which binary made the runs on the page (runs reused from another experiment may come from another one)."""
    by = {}
    for f in sorted(root.glob("grid/*/*/command.txt")) + sorted(root.glob("seeds/*/seed*/command.txt")):
        if f.parent.name.endswith(".partial"):
            continue
        by.setdefault(f.read_text().split()[0], []).append(str(f.parent.relative_to(root)))
    if not by:
        return ""
    if len(by) == 1:
        return f"- Binary: every run by `{next(iter(by))}`."
    parts = []
    for b, ds in sorted(by.items(), key=lambda t: -len(t[1])):
        parts.append(f"`{b}`: {len(ds)} runs" + ("" if len(ds) > 8 else f" ({', '.join(ds)})"))
    return "- Binaries: " + "; ".join(parts) + "."


def diagnostics(root):
    """Runs outside the grids (ROOT/diagnostic/<name>/metrics.json), never used for selection."""
    rows = []
    for f in sorted((root / "diagnostic").glob("*/metrics.json")):
        m = json.loads(f.read_text())
        rows.append(f"| {f.parent.name} | {NAMES.get(m['method'], m['method'])} | {m['lr']:g} | {m['lr2']:g} | "
                    f"{m['local_iterations']} | {m['gradient_evaluations_per_round']} | {m['mean_valid_loss']:.4f} |")
    if not rows:
        return []
    return ["### Diagnostic runs (outside the grids, selection seed, valid split)", "",
            "| run | method | lr | lr2 | local iterations | gradient evaluations / client / round | mean valid loss |",
            "|---|---|---:|---:|---:|---:|---:|"] + rows + [""]


def selection_stage(a, root, sel, out_md, svg):
    """Per-client valid loss of each method's selected grid point (selection seed): a one-seed comparison
    on the split used for selection (optimistic for every method alike, each having the same number of points)."""
    from scipy import stats
    done = [m for m in a.methods if m in sel and (root / "grid" / m / point_id(sel[m][0]) / "metrics.json").exists()]
    if len(done) < 2:
        return []
    per = {}
    for m in done:
        f = root / "grid" / m / point_id(sel[m][0]) / "metrics.json"
        per[m] = {c["client"]: c["valid_loss"] for c in json.loads(f.read_text())["clients"]}
    clients = list(per[done[0]])
    out = [f"## Selection stage: valid loss of each method's selected point (seed {a.select_seed}, one seed)", "",
           "The split used for selection, so every number is optimistic by the same mechanism (each method picks the "
           "best of the same number of points); no confidence interval (one seed). Lower is better.", "",
           "| client | " + " | ".join(NAMES[m] for m in done) + " |", "|---|" + "---:|" * len(done)]
    for c in clients:
        best = min(per[m][c] for m in done)
        out.append(f"| {c} | " + " | ".join((f"**{per[m][c]:.4f}**" if per[m][c] == best else f"{per[m][c]:.4f}") for m in done) + " |")
    out.append("| **mean** | " + " | ".join(f"**{sum(per[m].values()) / len(clients):.4f}**" for m in done) + " |")
    out.append("")
    series = []
    for m in done:
        r = json.loads((root / "grid" / m / point_id(sel[m][0]) / "metrics.json").read_text())
        pts = [(0, r["mean_base_valid_loss"])] + [(x["round"], x["loss"]) for x in r.get("mean_valid_loss_by_round", [])]
        series.append((NAMES[m], [x for x, _ in pts], [y for _, y in pts]))
    sel_svg = str(pathlib.Path(svg).with_suffix("")) + "-selection.svg"
    curves_svg(series, sel_svg, f"Mean valid loss by round, selected points, seed {a.select_seed} (round 0 = base)")
    out += [f"![valid curves of the selected points]({os.path.relpath(sel_svg, os.path.dirname(out_md) or '.')})", ""]
    last = ", ".join(f"{n} {ys[-2] - ys[-1]:+.4f}" for n, _, ys in series if len(ys) >= 2)
    out += [f"Valid-loss drop over the last evaluation interval (positive = still improving): {last}.", ""]
    out += ["Cost of these runs (measured; one run each, 2-core machine shared with other jobs, one BLAS thread, "
            f"{runs_at_a_time(a.jobs)}: compare within the table only):", "",
            "| method | local iterations / round | gradient evaluations / client / round | tokens trained / client | trainable params / client | uploaded / client / round | training s / round | peak RSS (MB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in done:
        r = json.loads((root / "grid" / m / point_id(sel[m][0]) / "metrics.json").read_text())
        c0 = r["clients"][0]
        out.append(f"| {NAMES[m]} | {r['local_iterations']} | {r['gradient_evaluations_per_round']} | {c0['tokens']:,} | "
                   f"{c0['trainable_parameters']:,} | {c0['uploaded_parameters_per_round']:,} | {r['seconds_per_round']:.1f} | "
                   f"{r['peak_rss_bytes'] / 2**20:.0f} |")
    out.append("")
    if "pf2lora" in done:
        cmp = []
        for m in done:
            if m == "pf2lora":
                continue
            d = [per["pf2lora"][c] - per[m][c] for c in clients]
            p = stats.wilcoxon(d).pvalue if any(x != 0 for x in d) else 1.0
            cmp.append(f"{NAMES[m]}: PF2LoRA lower on {sum(1 for x in d if x < 0)} of {len(d)} clients, "
                       f"mean {sum(d) / len(d):+.4f}, Wilcoxon p = {p:.2g}")
        out += ["PF2LoRA vs each baseline over clients (valid, one seed): " + "; ".join(cmp) + ".", ""]
    return out


def run_identity(d):
    """What makes a seed run the run it is: its recorded command without the binary's path and output folders."""
    f = d / "command.txt"
    return " ".join(Experiment.comparable(f.read_text())) if f.exists() else ""


def drop_stale_ranks(data, root):
    """Drop cached spectra (rank-controls.json: "method/seed/client" -> spectra, "_runs": "method/seed" -> the run's
    identity when they were read) whose seed run has since been replaced, e.g. moved aside when a grid extension changed
    the method's selection, or that were cached before identities were recorded; they are read again from the run."""
    runs = data.get("_runs", {})
    for k in [k for k in data if k != "_runs"]:
        m, sd, _ = k.split("/", 2)
        if runs.get(f"{m}/{sd}") != run_identity(root / "seeds" / m / f"seed{sd}") or not runs.get(f"{m}/{sd}"):
            del data[k]


def rank_controls(a, root, clients):
    """Learned rank with controls: the spectra of PF2LoRA's, Local-only's and FedAvg+FT's effective update
    per client and module (read from each seed run's store with `pf2lora adapters rank --json`), ranked at
    several tau."""
    taus = [0.05, 0.1, 0.2, 0.3]
    cache = root / "rank-controls.json"
    data = json.loads(cache.read_text()) if cache.exists() else {}
    drop_stale_ranks(data, root)
    for m in ("pf2lora", "local", "fedavg-ft"):
        for sd in a.seeds:
            data.setdefault("_runs", {})[f"{m}/{sd}"] = run_identity(root / "seeds" / m / f"seed{sd}")
            for c in clients:
                k = f"{m}/{sd}/{c}"
                if k in data:
                    continue
                r = subprocess.run(["nice", "-n", str(a.nice), a.binary, "adapters", "rank", "--model", a.model,
                                    "--store", str(root / "seeds" / m / f"seed{sd}" / "store"), "--client", c, "--json"],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"adapters rank {k}: {r.stderr.strip()[-300:]}")
                data[k] = {x["module"]: x["singular_values"] for x in json.loads(r.stdout)["modules"]}
        cache.write_text(json.dumps(data))
    def rank(sv, tau):
        top = max(sv) if sv else 0
        return sum(1 for x in sv if top > 0 and x > tau * top)
    lo = a.rank - a.rank2
    out = ["## Learned rank, with controls", "",
           f"Rank of each module's effective update (singular values above tau x the largest), over {len(clients)} clients x "
           f"{len(a.seeds)} seeds x every adapted module. PF2LoRA's update s1 BA + s2 D_kC_k can have any rank in "
           f"[{lo}, {a.rank + a.rank2}] only if both levels are used; Local-only's and FedAvg+FT's rank-{a.rank + a.rank2} "
           "updates are read with the same rule as controls: a rank they show as well is a property of the data and the "
           "training length, not of the two levels.", "",
           "| method | " + " | ".join(f"mean rank τ={t}" for t in taus) + f" | share below {lo} (τ=0.1) | share changed τ 0.1→0.05 | share changed τ 0.1→0.2 |",
           "|---|" + "---:|" * (len(taus) + 3)]
    for m in ("pf2lora", "local", "fedavg-ft"):
        svs = [sv for k, mods in data.items() if k.startswith(m + "/") and int(k.split("/")[1]) in a.seeds for sv in mods.values()]
        if not svs:
            continue
        means = [sum(rank(sv, t) for sv in svs) / len(svs) for t in taus]
        below = sum(1 for sv in svs if rank(sv, 0.1) < lo) / len(svs)
        ch05 = sum(1 for sv in svs if rank(sv, 0.05) != rank(sv, 0.1)) / len(svs)
        ch2 = sum(1 for sv in svs if rank(sv, 0.2) != rank(sv, 0.1)) / len(svs)
        out.append(f"| {NAMES[m]} | " + " | ".join(f"{x:.2f}" for x in means) + f" | {100 * below:.0f} % | {100 * ch05:.0f} % | {100 * ch2:.0f} % |")
    out.append("")
    return out


def self_test():
    """`experiment.py --self-test`: the grid and run-reuse rules, without a binary (Tests/PF2LoRATests/ExperimentScriptTests)."""
    import tempfile
    failures = []
    def check(cond, what):
        if not cond:
            failures.append(what)
    def refused(fn):
        try:
            fn()
        except SystemExit:
            return True
        return False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        common = ["--name", "t", "--model", "m", "--data", "d", "--root", str(tmp / "root"), "--lrs", "5e-3,1e-2",
                  "--no-knob", "--report-only"]
        ok = {"_about": "x", "pf2lora": [{"lr": "1e-2", "lr2": "0.25"}], "homlora": [{"lr": "7e-3"}],
              "perfedavg": [{"lr": "1e-2", "inner-lr": "1.0"}], "hetlora": [{"lr": "1e-2", "hetlora-lambda": "1e-2"}],
              "local": [{"lr": "2.5e-3"}], "fedavg-ft": [{"lr": "2.5e-3"}]}
        def exp_with(extra, extra_args=()):
            f = tmp / "extra.json"
            f.write_text(json.dumps(extra))
            return Experiment(parse_args(common + ["--extra-points", str(f)] + list(extra_args)))
        e = exp_with(ok)
        check(all(len(g) == 3 for g in e.grid.values()), f"every grid 3 points: { {m: len(g) for m, g in e.grid.items()} }")
        check({"lr": "1e-2", "lr2": "0.25"} in e.grid["pf2lora"], "PF2LoRA's extra point keeps its knob names")
        check({"lr": "1e-2", "hetlora-lambda": "1e-2", "hetlora-prune": "0.05"} in e.grid["hetlora"],
              "an unnamed knob keeps the grid's default")
        check(e.n_extra == 1, "one extra point per method")
        check(refused(lambda: exp_with({**ok, "local": []})), "unequal grids refused")
        check(refused(lambda: exp_with({**ok, "homlora": [{"lr": "7e-3", "lr2": "0.1"}]})), "a knob of another method refused")
        check(refused(lambda: exp_with({**ok, "homlora": [{"alpha": "32"}]})), "a point without lr refused")
        check(refused(lambda: exp_with({**ok, "homlora": [{"lr": "1e-2"}]})), "a point already in the grid refused")
        check(not refused(lambda: exp_with({k: v for k, v in ok.items() if k not in ("local", "fedavg-ft")},
                                           ["--methods", "pf2lora,homlora,perfedavg,hetlora"])),
              "equal grids over the methods run")
        # An extended grid in the same root: accepted (old points kept); a shrunk one refused.
        plain = Experiment(parse_args(common))
        plain.check_settings()
        e = exp_with(ok)
        check(not refused(e.check_settings), "an equal extension of the grid accepted")
        check((tmp / "root" / "grid-extensions.json").exists(), "the extension recorded")
        check(refused(Experiment(parse_args(common)).check_settings), "a grid without the extra points refused after")
        # A kept run is reused only with the same command (binary path and output folders aside).
        d = tmp / "root" / "grid" / "pf2lora" / "x"
        d.mkdir(parents=True)
        pt = {"lr": "1e-2", "lr2": "0.25"}
        (d / "command.txt").write_text(" ".join(["/other/bin"] + e.command("pf2lora", pt, 100, tmp / "elsewhere", True)[1:]))
        check(not refused(lambda: e.check_run(d, e.command("pf2lora", pt, 100, d, True))), "same command from another binary kept")
        check(refused(lambda: e.check_run(d, e.command("pf2lora", dict(pt, lr2="1.0"), 100, d, True))),
              "a run made at another knob value refused")
        # Cached spectra of the rank controls are kept only for the run they were read from.
        for lr in ("5e-3", "2.5e-3"):
            d = tmp / "root" / "seeds" / "local" / f"seed0-{lr}"
            d.mkdir(parents=True)
            (d / "command.txt").write_text(" ".join(e.command("local", {"lr": lr}, 0, d, False)))
        run = tmp / "root" / "seeds" / "local" / "seed0"
        run.symlink_to("seed0-5e-3")
        cached = {"_runs": {"local/0": run_identity(run)}, "local/0/a": {"q": [1.0]}, "pf2lora/0/a": {"q": [1.0]}}
        drop_stale_ranks(cached, tmp / "root")
        check("local/0/a" in cached and "pf2lora/0/a" not in cached, "spectra of the same run kept, of a run never identified dropped")
        run.unlink()
        run.symlink_to("seed0-2.5e-3")
        drop_stale_ranks(cached, tmp / "root")
        check("local/0/a" not in cached, "spectra of a replaced run dropped")
    try:
        import scipy  # noqa: F401  (the page's tests and intervals)
    except ImportError:
        print("experiment self-test: the page check skipped (no scipy, which the pages need for their tests and intervals)")
        return finish(failures)
    with tempfile.TemporaryDirectory() as tmp:
        # A page from made-up runs (3 clients, 2 seeds, selections given before, so no grid runs): it reports their
        # numbers and counts the clients it has (it once said "13 clients" whatever the federation).
        tmp = pathlib.Path(tmp)
        prior = {"_about": "made up"}
        for m in METHODS:
            prior[m] = {"selected": {"lr": "1e-2"}, "grid": [[4.0, "lr=1e-2", "made up"]]}
        (tmp / "prior.json").write_text(json.dumps(prior))
        e = Experiment(parse_args(["--name", "t", "--model", "m", "--data", "d", "--root", str(tmp / "root"), "--lrs", "1e-2",
                                   "--no-knob", "--seeds", "0,1", "--prior-selection", str(tmp / "prior.json"),
                                   "--binary", "/made/up/pf2lora", "--report-only", "--out", str(tmp / "page.md")]))
        e.check_settings()
        for i, m in enumerate(METHODS):
            for sd in (0, 1):
                d = tmp / "root" / "seeds" / m / f"seed{sd}"
                d.mkdir(parents=True)
                (d / "command.txt").write_text(" ".join(e.command(m, {"lr": "1e-2"}, sd, d, False)) + "\n")
                loss = [3.0 + 0.1 * i + 0.01 * sd + 0.2 * c for c in range(3)]
                clients = [{"client": f"c{c}", "test_loss": loss[c], "valid_loss": loss[c], "base_test_loss": 4.0,
                            "base_valid_loss": 4.0, "tokens": 1024, "trainable_parameters": 10, "uploaded_parameters_per_round": 10,
                            "valid_loss_by_round": [{"round": 2, "loss": loss[c]}]} for c in range(3)]
                (d / "metrics.json").write_text(json.dumps({
                    "clients": clients, "mean_test_loss": sum(loss) / 3, "mean_valid_loss": sum(loss) / 3,
                    "mean_base_valid_loss": 4.0, "mean_valid_loss_by_round": [{"round": 1, "loss": 3.5}, {"round": 2, "loss": sum(loss) / 3}],
                    "local_iterations": 6, "gradient_evaluations_per_round": 6, "seconds_per_round": 1.0, "seconds": 10.0,
                    "training_seconds": 8.0, "peak_rss_bytes": 2**20, "tokens": 3072}))
        try:
            report(e, str(tmp / "page.md"), str(tmp / "page.svg"))
            page = (tmp / "page.md").read_text()
        except Exception as err:
            page = f"report failed: {err!r}"
        check("Mean valid loss over the 3 clients by round" in page, "the curve table counts the clients it has: " + page[-300:])
        check("| PF2LoRA | 3.2100 ±" in page or "PF2LoRA 3.2050 ±" in page, "PF2LoRA's mean test loss over the made-up seeds")
    return finish(failures)


def finish(failures):
    for f in failures:
        print("FAIL:", f)
    print("experiment self-test:", "ok" if not failures else f"{len(failures)} failures")
    return not failures


def main():
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(0 if self_test() else 1)
    a = parse_args(sys.argv[1:])
    if not a.report_only and not os.access(a.binary, os.X_OK):
        sys.exit(f"experiment: {a.binary} is missing; build it (swift build -c release --product pf2lora) "
                 "and copy it out of .build so rebuilds do not disturb a run")
    run_experiment(a)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--root", help="default runs/experiments/NAME")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--clients", default="", help="only these clients (comma-separated)")
    ap.add_argument("--binary", default=".build/release/pf2lora")
    ap.add_argument("--budget", choices=["steps", "compute"], default="compute")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--lower-steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lrs", default=LRS, help="the learning-rate grid of every method (comma-separated)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rank2", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--select-seed", type=int, default=SELECT_SEED,
                    help="seed of the grid (default 100; one of --seeds: the grid runs are that seed's runs)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--prior-selection", default="", help="JSON of selections made before at the same settings (method -> "
                    "selected point and recorded grid): those methods run no grid here")
    ap.add_argument("--no-knob", action="store_true", help="grids of the learning rates only (no method-specific fourth point)")
    ap.add_argument("--extra-points", default="", help="JSON: method -> extra grid points (each with \"lr\" and any of the "
                    "method's own knobs); every method must end with the same number of points")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--nice", type=int, default=19)
    ap.add_argument("--stage", choices=["all", "grid", "seeds", "nlg", "report"], default="all")
    ap.add_argument("--nlg", action="store_true", help="data-to-text: decode test inputs, BLEU / ROUGE-L / METEOR")
    ap.add_argument("--nlg-limit", type=int, default=30, help="test examples decoded per client")
    ap.add_argument("--nlg-tokens", type=int, default=96)
    ap.add_argument("--rank-controls", action="store_true", help="learned-rank table with Local-only / FedAvg+FT controls")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", help="Markdown report (default ROOT/RESULTS.md)")
    ap.add_argument("--svg", help="curves (default next to --out)")
    ap.add_argument("--title", default="Fair comparison")
    ap.add_argument("--preamble", default="")
    ap.add_argument("--appendix", default="")
    a = ap.parse_args(argv)
    skip = {"--report-only"}
    a.argv = [x if " " not in x else repr(x) for x in argv if x not in skip]
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.methods = [m for m in a.methods.split(",") if m]
    for m in a.methods:
        if m not in METHODS and m not in VARIANTS:
            sys.exit(f"experiment: unknown method {m}; use {', '.join(METHODS + list(VARIANTS))}")
    return a


def run_experiment(a):
    exp = Experiment(a)
    exp.check_settings()
    out = a.out or str(exp.root / "RESULTS.md")
    svg = a.svg or str(pathlib.Path(out).with_suffix("")) + "-curves.svg"
    t0 = time.time()
    if not a.report_only:
        if a.stage in ("all", "grid"):
            exp.stage_grid()
        if a.stage == "all" and a.nlg:
            # Seed by seed, each decoded as soon as its runs are done: an interrupted experiment has whole seeds
            # with their NLG metrics, and a report can be written from them (--report-only).
            for sd in a.seeds:
                exp.stage_seeds(only=[sd])
                exp.stage_nlg(only=[sd])
                report(exp, out, svg)
        else:
            if a.stage in ("all", "seeds"):
                exp.stage_seeds()
            if a.nlg and a.stage in ("all", "nlg"):
                exp.stage_nlg()
    report(exp, out, svg)
    log(f"finished in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
