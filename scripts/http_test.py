#!/usr/bin/env python3
"""The OpenAI-compatible HTTP endpoint driven by the official `openai` package (docs/HTTP.md).

Starts `pf2lora serve --http 127.0.0.1:0` on the embedded default (models/fortune-gpt2 with a copy of
adapters/), then checks: models, completions and chat completions (streaming and not) per client, the
base name and `shared`, token-array prompts, n / logprobs / usage / stream_options, the errors (400,
401, 404, 408, 409, 413, 429, 503, unknown fields named, bad JSON), /health and /metrics, vLLM's
load/unload_lora_adapter with PEFT folders (also concurrent on one name: the store loses nothing), 64
concurrent clients with distinct adapters sharing the batch, each getting the greedy text it gets
alone, clients that disconnect (streaming and not) freeing their batch slot, a slow-loris header
closed by the header timeout, and a SIGTERM drain (503 to new requests, the ones in flight finish).
Exits non-zero on the first failure; prints 'N passed, 0 failed' at the end.
"""
import concurrent.futures
import json
import os
import re
import shutil
import socket as socketlib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import openai
import faulthandler
if os.environ.get("HTTP_TEST_TRACE"):
    faulthandler.dump_traceback_later(int(os.environ["HTTP_TEST_TRACE"]), exit=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("PF2LORA_BIN", os.path.join(ROOT, ".build/release/pf2lora"))
MODEL = os.path.join(ROOT, "models/fortune-gpt2")
passed = 0


def check(cond, what):
    global passed
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    passed += 1


class Server:
    """A `pf2lora serve --http` process on a free loopback port."""

    def __init__(self, store, exchange, extra=(), env=None):
        self.proc = subprocess.Popen(
            [BIN, "serve", "--model", MODEL, "--store", store, "--exchange-dir", exchange, "--http", "127.0.0.1:0", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})})
        self.log = []
        deadline = time.time() + 60
        self.port = None
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        if self.port is None:
            raise SystemExit("server did not start:\n" + "".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.port}"
        self.store = store

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self):
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = -9
        return code


def raw(server, method, path, body=None, headers=None, data=None):
    """One HTTP request without the openai package: (status, parsed JSON or text)."""
    if data is None and body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(server.base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def metrics(server, headers=None):
    """/metrics as {name: value} for the unlabelled samples."""
    st, text = raw(server, "GET", "/metrics", headers=headers)
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z0-9_]+) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    check(st == 200 and "pf2lora_batch_rows" in out, f"/metrics answers ({st}: {[l for l in text.splitlines() if 'batch' in l]})")
    return out


def wait_until(what, cond, timeout=30.0, quiet=False):
    """Polls cond() every 10 ms until it is true; fails the test past the timeout (quiet: returns None, the
    caller reports the failure with what it saw)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.01)
    if not quiet:
        check(False, f"{what} within {timeout} s")


def oversize(server, n):
    """POSTs a body of n bytes from a thread (the server may answer before reading it all); the response's first bytes."""
    import socket
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = b'{"model": "' + b"x" * n + b'"}'
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"

    def send():
        try:
            sock.sendall(head + body)
        except OSError:
            pass

    t = threading.Thread(target=send, daemon=True)
    t.start()
    sock.settimeout(60)
    try:
        data = sock.recv(4096)
    except OSError:
        data = b""
    sock.close()
    return data


def main():
    work = tempfile.mkdtemp(prefix="pf2lora-http-test-")
    store = os.path.join(work, "store")
    exchange = os.path.join(work, "exchange")
    shutil.copytree(os.path.join(ROOT, "adapters"), store)
    os.makedirs(exchange)
    clients = sorted(os.listdir(os.path.join(store, "fortune-gpt2", "clients")))
    check(len(clients) >= 8, f"the store has clients ({clients})")
    # PEFT folders of the store's clients, for load_lora_adapter.
    for c in clients:
        subprocess.run([BIN, "adapters", "export-peft", "--store", store, "--model", MODEL, "--client", c, "--level", "client",
                        "--out", os.path.join(exchange, c)], check=True, stdout=subprocess.DEVNULL)
    srv = Server(store, exchange, extra=["--http-header-timeout", "2", "--http-body-timeout", "2"])
    try:
        run_checks(srv, clients, exchange)
        code = drain_checks(srv, clients)
    except BaseException:
        sys.stderr.write("".join(srv.log[-40:]))
        srv.proc.kill()
        raise
    check(code == 0, f"SIGTERM drains and exits 0 (got {code})")
    run_limit_checks(store, exchange, clients)
    shutil.rmtree(work, ignore_errors=True)
    print(f"http_test: {passed} passed, 0 failed")


def run_checks(srv, clients, exchange):
    client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
    base_name = "fortune-gpt2"

    # Models: the base, shared, and every client with its versions.
    models = client.models.list()
    ids = [m.id for m in models.data]
    check(ids[:2] == [base_name, "shared"], f"models list the base and shared first ({ids[:3]})")
    check(all(c in ids for c in clients), "models list every client")
    m = next(m for m in models.data if m.id == clients[0])
    check(m.owned_by == "pf2lora" and m.model_extra["pf2lora"]["version"] >= 1, "a client model shows its adapter version")

    # Completions, greedy: streaming gives the same text as not streaming; clients differ from the base.
    prompt = "Q: Why is the server down?\nA:"
    texts = {}
    for model in [base_name, "shared", clients[0], clients[1]]:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
        check(r.object == "text_completion" and r.model == model, "completion object and model")
        check(r.usage.completion_tokens == 24 or r.choices[0].finish_reason == "stop", "usage counts the tokens")
        check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "usage total")
        texts[model] = r.choices[0].text
        chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        check(streamed == texts[model], f"streamed text of {model} equals the non-streamed one ({streamed!r} vs {texts[model]!r})")
        check(chunks[-1].choices[0].finish_reason in ("stop", "length"), "the last chunk has the finish reason")
    check(len(set(texts.values())) >= 3, f"base, shared and clients give different texts: {texts}")

    # Token-array prompts (OpenAI takes token ids): the same tokens as text give the same completion.
    ids = json.loads(subprocess.run([BIN, "tokenize", "--model", MODEL], input=prompt, capture_output=True, text=True, check=True).stdout)
    r = client.completions.create(model=clients[0], prompt=ids, max_tokens=24, temperature=0)
    check(r.choices[0].text == texts[clients[0]] and r.usage.prompt_tokens == len(ids),
          f"a token-array prompt gives the text prompt's completion ({r.choices[0].text!r})")
    r = client.completions.create(model=clients[0], prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    check(len(r.choices) == 2 and r.usage.prompt_tokens == len(ids) + 3, "a list of token arrays gives a choice each")
    try:
        client.completions.create(model=clients[0], prompt=[ids[0], 999999], max_tokens=1)
        check(False, "a token id outside the vocabulary is refused")
    except openai.BadRequestError as e:
        check("999999" in e.message, f"a token id outside the vocabulary: 400 naming it ({e.message})")

    # The same text as the stdio protocol gives (one method layer).
    out = subprocess.run([BIN, "serve", "--model", MODEL, "--store", os.path.join(os.path.dirname(exchange), "store")],
                         input=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "generate",
                                           "params": {"client": clients[0], "prompt": prompt, "max_tokens": 24, "temperature": 0}}) + "\n",
                         capture_output=True, text=True, timeout=120)
    check(json.loads(out.stdout.splitlines()[0])["result"]["text"] == texts[clients[0]], "HTTP and stdio give the same greedy text")

    # A port already taken: an error line and status 1 before "ready" (it said "ready", logged the bind
    # failure as a note, drained and exited 0).
    with socketlib.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([BIN, "serve", "--model", MODEL, "--store", os.path.join(os.path.dirname(exchange), "store"),
                              "--http", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    check(out.returncode == 1 and f"error: cannot serve HTTP on 127.0.0.1:{port}" in out.stderr and "; ready" not in out.stderr,
          f"a port in use: an error and status 1 ({out.returncode}: {out.stderr.strip()[-300:]})")

    # n, seed, stop, logprobs, usage in the stream.
    r = client.completions.create(model=clients[0], prompt=prompt, max_tokens=8, temperature=1.0, seed=3, n=3, logprobs=2)
    check(len(r.choices) == 3 and [c.index for c in r.choices] == [0, 1, 2], "n=3 gives three choices")
    lp = r.choices[0].logprobs
    check(len(lp.tokens) == len(lp.token_logprobs) and all(x <= 0 for x in lp.token_logprobs), "logprobs per token, <= 0")
    check(all(len(t) <= 2 for t in lp.top_logprobs), "top_logprobs has at most 2 entries")
    r2 = client.completions.create(model=clients[0], prompt=prompt, max_tokens=8, temperature=1.0, seed=3, n=3)
    check([c.text for c in r2.choices] == [c.text for c in r.choices], "the same seed gives the same choices")
    # Without a seed each request samples afresh (it was seed 0 every time: the same text on every retry).
    unseeded = [client.completions.create(model=clients[0], prompt=prompt, max_tokens=16, temperature=1.0).choices[0].text
                for _ in range(3)]
    check(len(set(unseeded)) > 1, f"requests without a seed sample afresh ({unseeded})")
    r = client.completions.create(model=clients[0], prompt=prompt, max_tokens=40, temperature=0, stop=["\n"])
    check("\n" not in r.choices[0].text, "stop strings cut the text")
    chunks = list(client.completions.create(model=clients[0], prompt=prompt, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == [],
          "stream_options.include_usage: the last chunk carries the usage")
    r = client.completions.create(model=clients[0], prompt=[prompt, "Hello"], max_tokens=4, temperature=0)
    check(len(r.choices) == 2, "a list of prompts gives a choice each")

    # Chat completions: rendered with the model's template (GPT-2: the plain format).
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a fortune."}]
    r = client.chat.completions.create(model=clients[2], messages=msgs, max_tokens=16, temperature=0)
    check(r.object == "chat.completion" and r.choices[0].message.role == "assistant", "chat completion object")
    text = r.choices[0].message.content
    chunks = list(client.chat.completions.create(model=clients[2], messages=msgs, max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    check(chunks[0].choices[0].delta.role == "assistant", "the first chat chunk has the role")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == text, f"streamed chat equals the non-streamed one ({streamed!r} vs {text!r})")
    check(chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens, "chat usage in the stream")
    out = subprocess.run([BIN, "generate", "--model", MODEL, "--store", os.path.join(os.path.dirname(exchange), "store"),
                          "--client", clients[2], "--messages", json.dumps(msgs), "--max-tokens", "16", "--temperature", "0"],
                         capture_output=True, text=True, timeout=120)
    check(out.stdout.rstrip("\n") == text, f"chat over HTTP equals `generate --messages` ({out.stdout!r} vs {text!r})")
    # Content as a list of text parts (the openai clients' other form) reads as the joined text; an image part is refused.
    parted = [msgs[0], {"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a fortune."}]}]
    joined = [msgs[0], {"role": "user", "content": "Tell me\na fortune."}]
    a = client.chat.completions.create(model=clients[2], messages=parted, max_tokens=8, temperature=0)
    b = client.chat.completions.create(model=clients[2], messages=joined, max_tokens=8, temperature=0)
    check(a.choices[0].message.content == b.choices[0].message.content and a.usage.prompt_tokens == b.usage.prompt_tokens,
          f"text parts read as their joined text ({a.usage.prompt_tokens} vs {b.usage.prompt_tokens} prompt tokens)")
    try:
        client.chat.completions.create(model=clients[2], max_tokens=1, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}])
        check(False, "an image part is refused")
    except openai.BadRequestError as e:
        check("image_url" in e.message, f"an image part: 400 naming it ({e.message})")
    r = client.chat.completions.create(model=clients[2], messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    check(len(r.choices[0].logprobs.content) == 4 and len(r.choices[0].logprobs.content[0].top_logprobs) == 3, "chat logprobs")

    # Errors, as OpenAI error objects with the right status.
    try:
        client.completions.create(model="nobody", prompt="x", max_tokens=1)
        check(False, "an unknown model is refused")
    except openai.NotFoundError as e:
        check(e.status_code == 404 and e.body["code"] == "model_not_found", "unknown model: 404 model_not_found")
    try:
        client.completions.create(model=clients[0], prompt="x", max_tokens=1, temperature=-1)
        check(False, "a negative temperature is refused")
    except openai.BadRequestError as e:
        check("temperature" in e.message, "bad temperature: 400 naming it")
    try:
        client.completions.create(model=clients[0], prompt="x", max_tokens=1, extra_body={"frobnicate": 1})
        check(False, "an unknown field is refused")
    except openai.BadRequestError as e:
        check("frobnicate" in e.message and e.body["param"] == "frobnicate", "unknown field: 400 naming it")
    try:
        client.chat.completions.create(model=clients[0], messages=[{"role": "user", "content": "x"}], max_tokens=1, stream=True,
                                       stream_options={"include_usage": True, "include_bogus": True})
        check(False, "an unknown field of stream_options is refused")
    except openai.BadRequestError as e:
        check("include_bogus" in e.message, f"unknown stream_options field: 400 naming it ({e.message})")
    st, body = raw(srv, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": clients[0], "lora_rank": 8})
    check(st == 400 and "lora_rank" in body["error"]["message"], f"unknown load_lora_adapter field: 400 naming it ({st} {body})")
    st, body = raw(srv, "POST", "/v1/completions", data=b'{"model": ' + b"[" * 100 + b"]" * 100 + b"}")
    check(st == 400 and body["error"]["code"] == "invalid_json", f"JSON nested 100 deep: 400 ({st} {body})")
    st, body = raw(srv, "POST", "/v1/completions", {"model": clients[0], "prompt": "x", "max_tokens": "many"})
    check(st == 400 and body["error"]["param"] == "max_tokens" and body["error"]["message"].startswith("max_tokens "),
          f"a wrong type: 400 naming the field as the body does, in message and param ({body})")
    st, body = raw(srv, "POST", "/v1/completions", {"model": clients[0], "prompt": "x", "max_tokens": -5})
    check(st == 400 and body["error"]["param"] == "max_tokens" and "params." not in body["error"]["message"],
          f"max_tokens < 0: 400 naming max_tokens, not JSON-RPC's params.max_tokens ({body})")
    try:
        client.chat.completions.create(model=clients[0], messages=[], max_tokens=1)
        check(False, "empty messages are refused")
    except openai.BadRequestError:
        check(True, "empty messages: 400")
    st, body = raw(srv, "POST", "/v1/completions", data=b"{not json")
    check(st == 400 and body["error"]["code"] == "invalid_json", f"malformed JSON: 400 ({st} {body})")
    check(oversize(srv, 9 << 20).startswith(b"HTTP/1.1 413"), "a body over the limit: 413")
    st, body = raw(srv, "GET", "/v1/nothing")
    check(st == 404 and "error" in body, "unknown route: 404")
    st, body = raw(srv, "GET", "/health")
    check(st == 200 and body["status"] == "ok", "/health")
    st, text = raw(srv, "GET", "/metrics")
    check(st == 200 and "pf2lora_completion_tokens_total" in text and "pf2lora_time_to_first_token_seconds_bucket" in text
          and "pf2lora_adapter_cache_hits_total" in text, "/metrics in Prometheus text")
    st, body = raw(srv, "GET", f"/v1/adapters/{clients[0]}")
    check(st == 200 and body["version"] >= 1 and body["rank"] >= 1, f"/v1/adapters/{{client}} ({body})")

    # load/unload (vLLM bodies): a PEFT folder imported as a new client, pinned; it serves what the
    # client it was exported from serves.
    st, body = raw(srv, "POST", "/v1/load_lora_adapter", {"lora_name": "newbie", "lora_path": clients[0]})
    check(st == 200 and body["version"] == 1 and body["pinned"], f"load_lora_adapter ({st} {body})")
    r = client.completions.create(model="newbie", prompt=prompt, max_tokens=24, temperature=0)
    check(r.choices[0].text == texts[clients[0]], "the loaded adapter serves the exported client's text")
    st, body = raw(srv, "POST", "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": "../../etc"})
    check(st == 400, f"a lora_path outside the exchange folder: 400 ({st})")
    st, body = raw(srv, "POST", "/v1/unload_lora_adapter", {"lora_name": "newbie"})
    check(st == 200, f"unload_lora_adapter ({st} {body})")
    st, body = raw(srv, "POST", "/v1/unload_lora_adapter", {"lora_name": "ghost"})
    check(st == 404, f"unloading an unknown adapter: 404 ({st})")

    # Concurrent load/unload of one name: each load answers 200 (a new version) or 409 (a concurrent
    # publish came first: version_conflict), each unload 200 or 404 (nothing loaded yet); the store
    # holds every version a load announced, in order, and serves the last one.
    announced, conflicts = [], 0
    for _ in range(6):
        with concurrent.futures.ThreadPoolExecutor(12) as ex:
            loads = [ex.submit(raw, srv, "POST", "/v1/load_lora_adapter", {"lora_name": "racer", "lora_path": clients[1]}) for _ in range(8)]
            unloads = [ex.submit(raw, srv, "POST", "/v1/unload_lora_adapter", {"lora_name": "racer"}) for _ in range(4)]
            loads, unloads = [f.result() for f in loads], [f.result() for f in unloads]
        check(all(st == 200 or (st == 409 and b["error"]["code"] == "version_conflict") for st, b in loads),
              f"concurrent loads answer 200 or 409 ({[(st, b if st != 200 else '') for st, b in loads]})")
        check(all(st in (200, 404) for st, _ in unloads), f"concurrent unloads answer 200 or 404 ({unloads})")
        announced += [b["version"] for st, b in loads if st == 200]
        conflicts += sum(st == 409 for st, _ in loads)
        if conflicts:
            break
    check(conflicts > 0, "concurrent loads of one name: a version conflict answers 409")
    st, body = raw(srv, "GET", "/v1/adapters/racer")
    check(sorted(announced) == list(range(1, len(announced) + 1)) and body["version"] == len(announced)
          and body["versions"] == list(range(max(1, len(announced) - 2), len(announced) + 1)),
          f"the store holds every announced version in order, none lost ({sorted(announced)} vs {body})")
    r = client.completions.create(model="racer", prompt=prompt, max_tokens=24, temperature=0)
    check(r.choices[0].text == texts[clients[1]], "the adapter loaded concurrently serves its text")

    # 64 concurrent clients with distinct adapters share the batch; each gets its text from alone.
    names = [f"c{i:02d}" for i in range(64)]
    for i, n in enumerate(names):
        st, body = raw(srv, "POST", "/v1/load_lora_adapter", {"lora_name": n, "lora_path": clients[i % len(clients)]})
        check(st == 200, f"load {n}")
    prompts = [f"Fortune {i}:" for i in range(64)]
    alone = [client.completions.create(model=n, prompt=p, max_tokens=12, temperature=0).choices[0].text for n, p in zip(names, prompts)]

    def one(i):
        c = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
        if i % 2:
            return "".join(ch.choices[0].text for ch in c.completions.create(model=names[i], prompt=prompts[i], max_tokens=12,
                                                                             temperature=0, stream=True) if ch.choices)
        return c.completions.create(model=names[i], prompt=prompts[i], max_tokens=12, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(64) as ex:
        together = list(ex.map(one, range(64)))
    same = sum(a == b for a, b in zip(alone, together))
    check(same == 64, f"64 concurrent clients get their greedy text alone ({same}/64 equal)")
    st, text = raw(srv, "GET", "/metrics")
    rows = float(re.search(r"^pf2lora_mean_batch_rows (\S+)", text, re.M).group(1))
    check(rows > 1.5, f"the concurrent requests shared the batch (mean rows {rows})")

    # A client that disconnects cancels its request: its batch row is freed at the next step.
    # (The context is 256 tokens: uncancelled, each request below would generate about 240.)
    def disconnect(stream):
        m0 = metrics(srv)
        if stream:
            s = client.completions.create(model=clients[0], prompt=prompt, max_tokens=2000, temperature=0, stream=True,
                                          extra_body={"ignore_eos": True})
            next(iter(s))
            s.response.close()
        else:
            import socket
            body = json.dumps({"model": clients[0], "prompt": prompt, "max_tokens": 2000, "temperature": 0, "ignore_eos": True}).encode()
            sock = socket.create_connection(("127.0.0.1", srv.port))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_until("the non-streaming request runs", lambda: metrics(srv)["pf2lora_batch_rows"] == 1)
            sock.close()
        m1 = wait_until("the batch row is freed", lambda: (lambda m: m if m["pf2lora_batch_rows"] == 0 else None)(metrics(srv)))
        made = m1["pf2lora_completion_tokens_total"] - m0["pf2lora_completion_tokens_total"]
        check(m1["pf2lora_generate_cancelled_total"] == m0["pf2lora_generate_cancelled_total"] + 1 and made < 230,
              f"a {'streaming' if stream else 'non-streaming'} client that disconnects has its request cancelled ({made:.0f} tokens of ~240)")

    disconnect(stream=True)
    disconnect(stream=False)
    r = client.completions.create(model=clients[0], prompt=prompt, max_tokens=4, temperature=0)
    check(len(r.choices[0].text) > 0, "serving goes on after a client went away")
    personalize_disconnect(srv, client, clients[-1], prompt)

    # Slow clients (the server runs with --http-header-timeout 2 --http-body-timeout 2, idle timeout
    # 60 s): a header dripped byte by byte is closed after 2 s; a body that stops arriving gets 408.
    import socket
    sock = socket.create_connection(("127.0.0.1", srv.port))
    t0 = time.time()
    closed = None
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.3)
        while time.time() - t0 < 20:
            try:
                sock.sendall(b"X")
                if sock.recv(1) == b"":
                    closed = time.time() - t0
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = time.time() - t0
                break
    finally:
        sock.close()
    check(closed is not None and 1.5 < closed < 6, f"a slow-loris header is closed by the header timeout (after {closed} s; 2 s)")
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
    sock.settimeout(10)
    t0 = time.time()
    try:
        head = sock.recv(4096)
    except OSError:
        head = b""
    sock.close()
    check(head.startswith(b"HTTP/1.1 408") and time.time() - t0 < 6, f"a body that stops arriving: 408 ({head[:40]!r})")
    st, body = raw(srv, "GET", "/health")
    check(st == 200, "healthy after slow and vanished clients")


def store_files(store):
    """{path inside the store: (size, mtime_ns)} for every file."""
    out = {}
    for d, _, files in os.walk(store):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), store)] = (st.st_size, st.st_mtime_ns)
    return out


def personalize_disconnect(srv, client, cid, prompt):
    """A client that disconnects from POST /v1/personalize cancels the training (docs/HTTP.md): it
    stops within seconds, nothing is published, no file of the store changes, the client's text is
    the same, and the training slot is free again (a short personalize then publishes)."""
    import socket
    st, before = raw(srv, "GET", f"/v1/adapters/{cid}")
    check(st == 200 and before["version"] >= 1, f"the client to personalize has an adapter ({st} {before})")
    text0 = client.completions.create(model=cid, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    files0 = store_files(srv.store)
    m0 = metrics(srv)
    texts = [f"Q: What is {i} plus {i}?\nA: It is {2 * i}, as anyone who counts knows." for i in range(16)]
    body = json.dumps({"client": cid, "texts": texts, "steps": 100000, "batch": 2, "seq": 32, "seed": 1}).encode()
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(b"POST /v1/personalize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_until("the personalize runs", lambda: metrics(srv)["pf2lora_training_running"] == 1)
    time.sleep(1.0)   # some steps (100,000 would take hours)
    t0 = time.time()
    sock.close()
    wait_until("the training stops once its client went away", lambda: metrics(srv)["pf2lora_training_running"] == 0, timeout=60)
    stopped = time.time() - t0
    m1 = metrics(srv)
    check(m1["pf2lora_training_jobs_total"] == m0["pf2lora_training_jobs_total"] + 1, "the personalize was started once")
    st, after = raw(srv, "GET", f"/v1/adapters/{cid}")
    check(st == 200 and after["version"] == before["version"], f"a disconnected personalize publishes nothing ({before['version']} -> {after.get('version')})")
    check(store_files(srv.store) == files0, "a disconnected personalize changes no file of the store")
    text1 = client.completions.create(model=cid, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    check(text1 == text0, "the client is served as before the cancelled personalize")
    st, done = raw(srv, "POST", "/v1/personalize", {"client": cid, "texts": texts, "steps": 2, "batch": 2, "seq": 32, "seed": 1})
    check(st == 200 and done.get("version") == before["version"] + 1,
          f"the training slot is free after the disconnect: the next personalize publishes v{before['version'] + 1} ({st} {done})")
    print(f"http_test: personalize cancelled {stopped:.2f} s after its client disconnected")


def drain_checks(srv, clients):
    """SIGTERM with 32 requests in flight: new requests get 503 (draining), /health 503, every request
    in flight finishes with all its tokens, then the server exits 0. Returns the exit code."""
    # The clients are made before any request is sent (making 32 in the request threads took seconds on a
    # loaded machine, long enough for the first streams to end before the last began: the rows never reached 32).
    conns = [openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0) for _ in range(32)]

    def long(i):
        chunks = list(conns[i].completions.create(model=f"c{i:02d}", prompt=f"Fortune {i}:", max_tokens=200, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        return chunks[-1].usage.completion_tokens
    ex = concurrent.futures.ThreadPoolExecutor(32)
    futs = [ex.submit(long, i) for i in range(32)]
    seen = []

    def all_running():
        seen.append(metrics(srv)["pf2lora_batch_rows"])
        return seen[-1] == 32
    if not wait_until("32 requests run", all_running, timeout=120, quiet=True):
        check(False, f"32 requests run at once within 120 s (batch rows seen: at most {max(seen, default=0):.0f}, "
                     f"last {seen[-1] if seen else 'none'}; streams already ended: {sum(f.done() for f in futs)})")
    srv.proc.send_signal(15)
    st, body = wait_until("/health says draining", lambda: (lambda r: r if r[0] == 503 else None)(raw(srv, "GET", "/health")), timeout=10)
    check(body["status"] == "draining", f"/health while draining: 503 ({body})")
    client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0)
    try:
        client.completions.create(model=clients[0], prompt="x", max_tokens=1)
        check(False, "a request while draining is refused")
    except openai.APIStatusError as e:
        check(e.status_code == 503 and e.body["code"] == "draining", f"a request while draining: 503 draining ({e.status_code} {e.body})")
    done = [f.result(timeout=120) for f in futs]
    ex.shutdown()
    check(done == [200] * 32, f"the requests in flight when the drain began finish with all their tokens ({done})")
    try:
        return srv.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        return -9


def run_limit_checks(store, exchange, clients):
    """A server with an API key, one batch row and no queue: 401, 429, and a freed row after a disconnect."""
    # Without a key a non-loopback bind is refused; with one, requests need it.
    p = subprocess.run([BIN, "serve", "--model", MODEL, "--store", store, "--http", "0.0.0.0:0"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    check(p.returncode != 0 and "API key" in p.stderr, "a non-loopback bind without a key is refused")
    srv = Server(store, exchange, extra=["--max-batch", "1", "--max-queue", "0"], env={"PF2LORA_API_KEY": "sekrit"})
    auth = {"Authorization": "Bearer sekrit"}
    try:
        try:
            openai.OpenAI(base_url=srv.base + "/v1", api_key="wrong", max_retries=0).models.list()
            check(False, "a wrong key is refused")
        except openai.AuthenticationError as e:
            check(e.status_code == 401, "wrong key: 401")
        st, body = raw(srv, "GET", "/v1/models")
        check(st == 401 and body["error"]["code"] == "invalid_api_key", "no key: 401")
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="sekrit", max_retries=0)
        ok = client.models.list()
        check(len(ok.data) >= 2, "the right key is accepted")
        st, _ = raw(srv, "GET", "/health")
        check(st == 200, "/health needs no key")

        # The only row taken and no queue: 429 overloaded; the row is free again once its client goes away.
        s = client.completions.create(model=clients[0], prompt="Q: Why?\nA:", max_tokens=2000, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        next(iter(s))
        try:
            client.completions.create(model=clients[1], prompt="x", max_tokens=1)
            check(False, "a request past the batch and the queue is refused")
        except openai.RateLimitError as e:
            check(e.status_code == 429 and e.body["code"] == "overloaded", f"batch full, no queue: 429 overloaded ({e.body})")
        s.response.close()
        wait_until("the row is freed", lambda: metrics(srv, auth).get("pf2lora_batch_rows") == 0)
        check(metrics(srv, auth)["pf2lora_generate_cancelled_total"] == 1, "the disconnected request was cancelled")
        r = client.completions.create(model=clients[1], prompt="x", max_tokens=2, temperature=0)
        check(r.usage.completion_tokens == 2, "after the disconnect the row serves the next request")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
