#!/usr/bin/env python3
"""Generate latency of other clients while a personalization runs in the same `pf2lora serve`.

    python3 Benchmarks/personalize_latency.py --bin .build/release/pf2lora --model DIR --store DIR \
        --texts FILE.jsonl [--client bofh-excuses] [--steps 100] [--threads 2]

Phase A: streaming greedy generate requests of one existing client, one after another, for --seconds;
the interval between consecutive `token` notifications of a request is recorded.
Phase B: the same, while a `personalize` of a brand-new client (--texts, --steps) runs in the server.
Prints p50/p95/max token interval of both phases, tokens/s, and how long the personalization took.
"""
import argparse, json, os, subprocess, threading, time, uuid

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default=".build/release/pf2lora")
ap.add_argument("--model", required=True)
ap.add_argument("--store", required=True)
ap.add_argument("--texts", required=True)
ap.add_argument("--client", default=None, help="client whose generate latency is measured (default: the first in the store)")
ap.add_argument("--steps", type=int, default=100)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--seconds", type=float, default=20, help="length of phase A")
ap.add_argument("--max-tokens", type=int, default=96)
a = ap.parse_args()

texts = [json.loads(l)["text"] for l in open(a.texts) if l.strip()]
p = subprocess.Popen([a.bin, "serve", "--model", a.model, "--store", a.store, "--threads", str(a.threads)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
lock = threading.Condition()
tokens = {}     # id -> [arrival times]
results = {}    # id -> response

def reader():
    for line in p.stdout:
        t = time.perf_counter()
        m = json.loads(line)
        with lock:
            if m.get("method") == "token":
                tokens.setdefault(m["params"]["id"], []).append(t)
            elif "id" in m:
                results[m["id"]] = m
            lock.notify_all()
threading.Thread(target=reader, daemon=True).start()
next_id = [0]
def send(method, params):
    next_id[0] += 1
    p.stdin.write(json.dumps({"jsonrpc": "2.0", "id": next_id[0], "method": method, "params": params}) + "\n"); p.stdin.flush()
    return next_id[0]
def wait(i, timeout=600):
    with lock:
        lock.wait_for(lambda: i in results, timeout)
        return results.get(i)

client = a.client
if client is None:
    lst = wait(send("adapters.list", {}))["result"]["clients"]
    client = lst[0]["id"] if lst else "someone"
def generate():
    return send("generate", {"client": client, "prompt": "The", "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True})
def intervals(ids):
    out = []
    for i in ids:
        ts = tokens.get(i, [])
        out += [(y - x) * 1000 for x, y in zip(ts, ts[1:])]
    return sorted(out)
def pct(v, q): return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")

wait(generate())  # warm-up
ids_a, t0 = [], time.perf_counter()
while time.perf_counter() - t0 < a.seconds:
    i = generate(); wait(i); ids_a.append(i)
ta = time.perf_counter() - t0

newbie = "bench-" + uuid.uuid4().hex[:8]
t1 = time.perf_counter()
pid = send("personalize", {"client": newbie, "texts": texts, "steps": a.steps, "seed": 0})
ids_b = []
while True:
    with lock:
        if pid in results: break
    i = generate(); wait(i); ids_b.append(i)
pres = wait(pid)
tp = time.perf_counter() - t1
p.stdin.close(); p.wait(60)

A, B = intervals(ids_a), intervals(ids_b)
r = pres.get("result", {})
print(f"client {client}, {a.max_tokens}-token greedy streams, serve --threads {a.threads}")
print(f"| phase | requests | tokens | token interval p50 (ms) | p95 (ms) | max (ms) | tok/s |")
print(f"|---|---:|---:|---:|---:|---:|---:|")
for name, ids, v, secs in [("serving alone", ids_a, A, ta), ("during personalize", ids_b, B, tp)]:
    n = sum(len(tokens.get(i, [])) for i in ids)
    print(f"| {name} | {len(ids)} | {n} | {pct(v, .5):.1f} | {pct(v, .95):.1f} | {max(v) if v else float('nan'):.1f} | {n / secs:.1f} |")
if "error" in pres:
    print("personalize error:", pres["error"])
else:
    print(f"personalize {newbie}: {r.get('steps')} steps in {r.get('seconds'):.1f} s (server-side), {tp:.1f} s wall, "
          f"loss {r['loss'][0]:.3f} -> {r['loss'][-1]:.3f}, version {r.get('version')}, ranks {r.get('rank_range')}")
