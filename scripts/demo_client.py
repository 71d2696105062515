#!/usr/bin/env python3
"""The README's main job: start `pf2lora serve` on a model and adapter store, ask three clients for a
continuation of the same prompt, personalize a brand-new client from a handful of texts, ask it
again, and print what came back. Standard library only.

usage: scripts/demo_client.py --binary .build/release/pf2lora --model DIR [--store DIR] [--clients a,b,c]
"""
import argparse
import json
import subprocess
import sys
import textwrap
import threading
import time

NEW_CLIENT_TEXTS = [
    "The compiler is your friend: it tells you what is wrong before the user does.",
    "Always read the error message twice; the answer is usually in the second sentence.",
    "A test that cannot fail is not a test, it is a decoration.",
    "Measure first, then optimize the part that the measurement points at.",
    "Small commits, honest messages, and a green build before you go home.",
    "If the benchmark is not run in the same session as its peer, it is a rumour.",
    "Every error message should say what to do next.",
    "Write the code so that the next engineer can delete it safely.",
]


class Server:
    def __init__(self, argv):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr, text=True, bufsize=1)
        self.lock = threading.Condition()
        self.responses = {}
        self.notes = []
        threading.Thread(target=self._read, daemon=True).start()
        self.next_id = 1

    def _read(self):
        for line in self.p.stdout:
            msg = json.loads(line)
            with self.lock:
                if "id" in msg and ("result" in msg or "error" in msg):
                    self.responses[msg["id"]] = msg
                else:
                    self.notes.append(msg)
                self.lock.notify_all()

    def send(self, method, params=None):
        rid = self.next_id
        self.next_id += 1
        self.p.stdin.write(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}}) + "\n")
        self.p.stdin.flush()
        return rid

    def wait(self, rid, timeout=300):
        end = time.time() + timeout
        with self.lock:
            while rid not in self.responses:
                if not self.lock.wait(timeout=max(0.0, end - time.time())):
                    raise SystemExit(f"demo: no answer to request {rid} within {timeout} s")
            return self.responses[rid]

    def close(self):
        self.p.stdin.close()
        return self.p.wait(timeout=120)


def version_text(v):
    """A store version as the demo prints it: v3, or None (no such adapter) as 'none'."""
    return "none" if v is None else f"v{v}"


def adapter_text(a):
    """The adapter a reply was served with: 'shared v1 + client v2', 'shared v1 alone', 'base model alone'."""
    shared, client = a.get("shared"), a.get("client")
    if shared is None and client is None:
        return "base model alone"
    if client is None:
        return f"shared {version_text(shared)} alone (no client pair yet)"
    return f"shared {version_text(shared)} + client {version_text(client)}"


def show(title, msg):
    print(f"\n── {title}")
    if "error" in msg:
        print(f"   error {msg['error']['code']}: {msg['error']['message']}")
        return
    r = msg["result"]
    text = r.get("text", "")
    print(textwrap.indent(textwrap.fill(text.strip() or "(empty)", 96), "   │ "))
    a, t, u = r.get("adapter", {}), r.get("timing", {}), r.get("usage", {})
    print(f"   adapter: {adapter_text(a)} · {u.get('completion_tokens')} tokens · "
          f"prefill {t.get('prefill_ms')} ms · decode {t.get('decode_ms')} ms · {r.get('finish_reason')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--binary", default=".build/release/pf2lora")
    ap.add_argument("--model", required=True)
    ap.add_argument("--store")
    ap.add_argument("--clients", default="")
    ap.add_argument("--prompt", default="The meaning of life is")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=60, help="personalize steps for the new client")
    args = ap.parse_args()

    argv = [args.binary, "serve", "--model", args.model]
    if args.store:
        argv += ["--store", args.store]
    t0 = time.time()
    srv = Server(argv)
    health = srv.wait(srv.send("health"))
    print(f"pf2lora serve is up ({time.time() - t0:.1f} s): {health['result']}")

    listed = srv.wait(srv.send("adapters.list")).get("result", {})
    known = [c["id"] for c in listed.get("clients", [])]
    clients = [c for c in args.clients.split(",") if c] or known[:3] or ["alice", "bob", "carol"]
    print(f"store: shared {version_text(listed.get('shared', {}).get('version') if listed.get('shared') else None)}, "
          f"{len(known)} clients ({', '.join(known) or 'none'})")

    # Three clients at once: their requests share one batch.
    params = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0.8, "top_p": 0.95, "seed": 7}
    ids = {c: srv.send("generate", dict(params, client=c)) for c in clients}
    for c, rid in ids.items():
        show(f"client {c!r}: {args.prompt!r}", srv.wait(rid))

    # A brand-new client, personalized in place while the server keeps serving.
    new = "demo-newcomer"
    before = srv.send("generate", dict(params, client=new))
    show(f"new client {new!r} before personalization (shared pair alone)", srv.wait(before))
    t1 = time.time()
    pr = srv.wait(srv.send("personalize", {"client": new, "texts": NEW_CLIENT_TEXTS, "steps": args.steps, "seed": 1}), timeout=600)
    if "error" in pr:
        print(f"\n── personalize {new!r}: error {pr['error']['code']}: {pr['error']['message']}")
    else:
        r = pr["result"]
        losses = r.get("loss", [])
        print(f"\n── personalized {new!r} in {time.time() - t1:.1f} s: version {r.get('version')} on shared {version_text(r.get('shared_version'))}, "
              f"loss {losses[0]:.3f} → {losses[-1]:.3f}, learned rank {r.get('rank_range')}" if losses else f"\n── personalized: {r}")
        show(f"new client {new!r} after personalization", srv.wait(srv.send("generate", dict(params, client=new))))
    stats = srv.wait(srv.send("stats"))["result"]
    print(f"\nstats: {stats.get('completed')} requests completed, {stats.get('generated_tokens')} tokens, "
          f"mean batch {stats.get('mean_batch_rows', 0):.1f} rows, resident {stats.get('rss_bytes', 0) / 2**20:.0f} MiB")
    code = srv.close()
    print(f"server exited with {code} ({time.time() - t0:.1f} s in all)")
    return code


if __name__ == "__main__":
    sys.exit(main())
