#!/usr/bin/env python3
"""A real Flower federation of pf2lora client nodes on this machine, checked against `pf2lora federate`.

    swift build -c release
    python3 scripts/make_corpus.py --out data/corpus           # the fortune clients (or any --data)
    python3 integrations/flower/run_local.py [--clients computers,debian,science] [--rounds 3]

What it starts, all on 127.0.0.1 with Flower's Deployment Runtime (gRPC, no simulation):
  - one `flower-superlink` (the server side; it runs the ServerApp: FedAvg on the shared pair);
  - one `flower-supernode` per client, each with its own node config (client id and index, its data
    folder, its own adapter store, the model, the pf2lora binary): its ClientApp starts that node's
    `pf2lora serve` and drives it through `train_local` / `evaluate_local`;
  - `flwr run integrations/flower <connection> --run-config ...`, which submits the app.
Every client's pair (C_k, D_k) is only ever in its node's store; only x = (A, B) crosses Flower.

Then, unless --no-compare, `pf2lora federate --method pf2lora` runs the same federation in one
process (same data, seed, rounds and settings) and the per-client valid losses are compared: the two
differ only in FedAvg's float rounding (numpy on the server vs Swift), so they must agree to about
1e-3. The table goes to stdout and to --out (Markdown); logs of every process are in --work.
"""
import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def log(*a):
    print("flower:", *a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/fortune-gpt2"))
    ap.add_argument("--data", default=str(ROOT / "data/corpus/clients"), help="one sub-folder per client (train/valid/test .jsonl)")
    ap.add_argument("--clients", default="computers,debian,science", help="comma-separated client folder names")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--lower-steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rank2", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr2", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="pf2lora threads per node (the nodes share this machine)")
    ap.add_argument("--pf2lora", default=str(ROOT / ".build/release/pf2lora"))
    ap.add_argument("--work", default=str(ROOT / "runs/flower"), help="scratch folder (recreated)")
    ap.add_argument("--out", help="also write the Markdown report here")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-compare", action="store_true", help="skip the `pf2lora federate` comparison")
    a = ap.parse_args()

    for tool in ["flower-superlink", "flower-supernode", "flwr"]:
        if not shutil.which(tool):
            sys.exit(f"flower: {tool} not found; pip install flwr==1.42.0 (integrations/flower/pyproject.toml)")
    if not os.access(a.pf2lora, os.X_OK):
        sys.exit(f"flower: {a.pf2lora} not found; run `swift build -c release` first")
    clients = [c.strip() for c in a.clients.split(",") if c.strip()]
    for c in clients:
        if not os.path.isdir(os.path.join(a.data, c)):
            sys.exit(f"flower: {a.data}/{c} is not a folder; make the corpus with `python3 scripts/make_corpus.py --out data/corpus` or pass --data/--clients")
    work = pathlib.Path(a.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    alpha, alpha2 = 2.0 * a.rank, 2.0 * a.rank2

    init = work / "init.safetensors"
    subprocess.run([a.pf2lora, "adapters", "init", "--model", a.model, "--out", str(init), "--rank", str(a.rank),
                    "--alpha", str(alpha), "--seed", str(a.seed)], check=True, stdout=sys.stderr)

    home = work / "flwr-home"
    home.mkdir()
    env = dict(os.environ, FLWR_HOME=str(home), PYTHONUNBUFFERED="1")
    # Flower 1.42's SuperLink serves its Fleet, Control and Runtime APIs on one HTTP port.
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "pf2lora-local"\n\n[superlink.pf2lora-local]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    procs = []

    def start(name, args):
        f = open(work / f"{name}.log", "w")
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append((name, p))
        return p

    try:
        start("superlink", ["flower-superlink", "--insecure", "--isolation", "subprocess", "--database", str(work / "superlink.db"),
                            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(link)])
        if not wait_port(link):
            raise RuntimeError("the SuperLink did not start; see " + str(work / "superlink.log"))
        for k, c in enumerate(clients):
            store = work / "nodes" / c / "store"
            store.mkdir(parents=True)
            cfg = (f"client-id='{c}' client-index={k} data-dir='{os.path.abspath(os.path.join(a.data, c))}' "
                   f"store='{store}' model='{os.path.abspath(a.model)}' pf2lora='{os.path.abspath(a.pf2lora)}' threads={a.threads}")
            start(f"supernode-{c}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--isolation", "subprocess",
                                     "--node-config", cfg, "--host", "127.0.0.1", "--port", str(free_port())])
        log(f"SuperLink on 127.0.0.1:{link}, {len(clients)} SuperNodes: {', '.join(clients)}")

        out_dir = work / "server-out"
        run_cfg = (f"num-server-rounds={a.rounds} num-clients={len(clients)} init-adapter='{init}' out-dir='{out_dir}' "
                   f"local-steps={a.local_steps} lower-steps={a.lower_steps} lr={a.lr} lr2={a.lr2} rank2={a.rank2} alpha2={alpha2} "
                   f"batch={a.batch} seq={a.seq} seed={a.seed}")
        t0 = time.time()
        with open(work / "flwr-run.log", "w") as f:
            subprocess.run(["flwr", "run", str(HERE), "pf2lora-local", "--stream", "--run-config", run_cfg],
                           stdout=f, stderr=subprocess.STDOUT, env=env, timeout=a.timeout, check=False)
        flower_seconds = time.time() - t0
        metrics_file = out_dir / "metrics.json"
        if not metrics_file.exists():
            raise RuntimeError("the Flower run wrote no metrics; see " + str(work / "flwr-run.log") + " and the supernode logs")
        fm = json.loads(metrics_file.read_text())
        log(f"Flower run: {a.rounds} rounds in {flower_seconds:.1f} s")
    finally:
        for name, p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for name, p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    final = {int(k): v for k, v in fm["final_eval_loss"].items()}
    rows = []
    ref = None
    if not a.no_compare:
        t0 = time.time()
        fed_out = work / "federate-out"
        subprocess.run([a.pf2lora, "federate", "--model", a.model, "--data", a.data, "--clients", ",".join(clients),
                        "--store", str(work / "federate-store"), "--method", "pf2lora", "--rounds", str(a.rounds),
                        "--local-steps", str(a.local_steps), "--lower-steps", str(a.lower_steps), "--rank", str(a.rank),
                        "--rank2", str(a.rank2), "--alpha", str(alpha), "--alpha2", str(alpha2), "--lr", str(a.lr), "--lr2", str(a.lr2),
                        "--batch", str(a.batch), "--seq", str(a.seq), "--seed", str(a.seed), "--threads", str(a.threads),
                        "--out", str(fed_out)], check=True, stdout=subprocess.DEVNULL, stderr=open(work / "federate.log", "w"))
        fed_seconds = time.time() - t0
        ref = {c["client"]: c["valid_loss"] for c in json.loads((fed_out / "metrics.json").read_text())["clients"]}
    worst = 0.0
    for k, c in enumerate(clients):
        fl = final.get(k)
        ev = fm["evaluate"][str(a.rounds)][str(k)]
        row = [c, f"{fl:.6f}" if fl is not None else "—", f"{ev['rank-min']}–{ev['rank-max']}", f"v{ev['client-version']}"]
        if ref is not None:
            d = abs(fl - ref[c]) if fl is not None else float("inf")
            worst = max(worst, d)
            row += [f"{ref[c]:.6f}", f"{d:.1e}"]
        rows.append(row)
    head = ["client", "Flower valid loss", "learned rank", "client version"] + (["federate valid loss", "abs. difference"] if ref else [])
    lines = [f"PF2LoRA on Flower {subprocess.run(['flwr', '--version'], capture_output=True, text=True).stdout.strip() or ''}: "
             f"{len(clients)} SuperNodes on loopback, {a.rounds} rounds x {a.local_steps} local steps (lower {a.lower_steps}), "
             f"r={a.rank} r2={a.rank2}, B={a.batch} T={a.seq}, seed {a.seed}; model {os.path.basename(os.path.abspath(a.model))}.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"Flower run {flower_seconds:.1f} s" + (f"; `pf2lora federate` (one process) {fed_seconds:.1f} s; "
                                                         f"largest difference {worst:.1e} (FedAvg in numpy vs Swift: float rounding only)" if ref else "")]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        pathlib.Path(a.out).write_text(text)
    if ref is not None and worst > 1e-2:
        sys.exit(f"flower: the Flower federation differs from `pf2lora federate` by {worst:.3g} in valid loss (expected < 1e-2)")


if __name__ == "__main__":
    main()
