#!/usr/bin/env python3
"""The OpenAI-compatible HTTP endpoint driven by the official `openai` package (docs/HTTP.md).

Starts `pf2lora serve --http 127.0.0.1:0` on the embedded default (models/fortune-gpt2 with a copy of
adapters/), then checks: models, completions and chat completions (streaming and not) per client,
n / logprobs / usage / stream_options, the errors (400, 401, 404, 413, unknown fields, bad JSON),
/health and /metrics, vLLM's load/unload_lora_adapter with PEFT folders, and 64 concurrent clients
with distinct adapters sharing the batch, each getting the greedy text it gets alone.
Exits non-zero on the first failure; prints 'N passed, 0 failed' at the end.
"""
import concurrent.futures
import json
import os
import re
import shutil
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
    srv = Server(store, exchange)
    try:
        run_checks(srv, clients, exchange)
    except BaseException:
        sys.stderr.write("".join(srv.log[-40:]))
        raise
    finally:
        code = srv.stop()
    check(code == 0, f"SIGTERM drains and exits 0 (got {code})")
    run_key_checks(store, exchange)
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

    # The same text as the stdio protocol gives (one method layer).
    out = subprocess.run([BIN, "serve", "--model", MODEL, "--store", os.path.join(os.path.dirname(exchange), "store")],
                         input=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "generate",
                                           "params": {"client": clients[0], "prompt": prompt, "max_tokens": 24, "temperature": 0}}) + "\n",
                         capture_output=True, text=True, timeout=120)
    check(json.loads(out.stdout.splitlines()[0])["result"]["text"] == texts[clients[0]], "HTTP and stdio give the same greedy text")

    # n, seed, stop, logprobs, usage in the stream.
    r = client.completions.create(model=clients[0], prompt=prompt, max_tokens=8, temperature=1.0, seed=3, n=3, logprobs=2)
    check(len(r.choices) == 3 and [c.index for c in r.choices] == [0, 1, 2], "n=3 gives three choices")
    lp = r.choices[0].logprobs
    check(len(lp.tokens) == len(lp.token_logprobs) and all(x <= 0 for x in lp.token_logprobs), "logprobs per token, <= 0")
    check(all(len(t) <= 2 for t in lp.top_logprobs), "top_logprobs has at most 2 entries")
    r2 = client.completions.create(model=clients[0], prompt=prompt, max_tokens=8, temperature=1.0, seed=3, n=3)
    check([c.text for c in r2.choices] == [c.text for c in r.choices], "the same seed gives the same choices")
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
        check("frobnicate" in e.message, "unknown field: 400 naming it")
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

    # A client that disconnects mid-stream cancels its request (the server goes on serving).
    def generated():
        return float(re.search(r"^pf2lora_completion_tokens_total (\S+)", raw(srv, "GET", "/metrics")[1], re.M).group(1))

    # (The context is 256 tokens: uncancelled, the request would generate about 240.)
    g_before = generated()
    s = client.completions.create(model=clients[0], prompt=prompt, max_tokens=2000, temperature=0, stream=True, extra_body={"ignore_eos": True})
    next(iter(s))
    s.response.close()
    time.sleep(2.0)
    g0 = generated()
    time.sleep(0.5)
    check(generated() == g0 and g0 - g_before < 100,
          f"a client that disconnects mid-stream has its request cancelled ({g0 - g_before:.0f} tokens generated of ~240)")
    # The same for a non-streaming request whose client closes the connection while it waits.
    import socket
    g_before = generated()
    body = json.dumps({"model": clients[0], "prompt": prompt, "max_tokens": 2000, "temperature": 0, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    time.sleep(0.01)
    sock.close()
    time.sleep(2.0)
    g1 = generated() - g_before
    check(g1 < 200, f"a non-streaming client that disconnects has its request cancelled ({g1:.0f} tokens generated of ~240)")
    r = client.completions.create(model=clients[0], prompt=prompt, max_tokens=4, temperature=0)
    check(len(r.choices[0].text) > 0, "serving goes on after a client went away")
    st, body = raw(srv, "GET", "/health")
    check(st == 200, "healthy after a disconnect")


def run_key_checks(store, exchange):
    # Without a key a non-loopback bind is refused; with one, requests need it.
    p = subprocess.run([BIN, "serve", "--model", MODEL, "--store", store, "--http", "0.0.0.0:0"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    check(p.returncode != 0 and "API key" in p.stderr, "a non-loopback bind without a key is refused")
    srv = Server(store, exchange, env={"PF2LORA_API_KEY": "sekrit"})
    try:
        try:
            openai.OpenAI(base_url=srv.base + "/v1", api_key="wrong", max_retries=0).models.list()
            check(False, "a wrong key is refused")
        except openai.AuthenticationError as e:
            check(e.status_code == 401, "wrong key: 401")
        ok = openai.OpenAI(base_url=srv.base + "/v1", api_key="sekrit", max_retries=0).models.list()
        check(len(ok.data) >= 2, "the right key is accepted")
        st, _ = raw(srv, "GET", "/health")
        check(st == 200, "/health needs no key")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
