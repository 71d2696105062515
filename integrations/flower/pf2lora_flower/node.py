"""The pieces both apps share: pf2lora adapter bytes <-> Flower arrays, and a pf2lora node process.

An adapter travels as the tensors of its safetensors file (PEFT names such as
`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`, float32) in a Flower ArrayRecord, plus
its pf2lora metadata (level, rank, alpha, base model fingerprint, ...) as one JSON string in the
ConfigRecord. pf2lora validates whatever comes back against its base model, so a node never trains
on a pair meant for another model.
"""
import base64
import json
import os
import struct
import subprocess
import threading

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save


def read_adapter(data: bytes):
    """(arrays, metadata) of an uncompressed safetensors adapter."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__", {})
    if meta.get("format") != "pf2lora-adapter":
        raise ValueError("not a pf2lora adapter file (make one with `pf2lora adapters init`)")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in st_load(data).items()}, meta


def write_adapter(arrays, metadata) -> bytes:
    """Uncompressed safetensors bytes of `arrays` (float32) with pf2lora `metadata`."""
    meta = dict(metadata)
    meta["dtype"] = "f32"
    return st_save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, metadata=meta)


class NodeError(RuntimeError):
    """An error answer of the pf2lora node (its JSON-RPC code and message)."""

    def __init__(self, method, code, message):
        super().__init__(f"pf2lora {method}: error {code}: {message}")
        self.code = code


class Pf2loraNode:
    """A `pf2lora serve` process of this node, spoken to over its stdin/stdout (one JSON per line).

    The ClientApp starts one per message, with the node's data folder as its exchange folder: the model is memory-mapped, so starting is cheap, and the
    node's adapter store is shared with any long-running `pf2lora serve` that answers generate
    requests on the same node (it picks up the new versions by itself).
    """

    def __init__(self, binary, model, store, exchange_dir, threads=0, max_line_bytes=256 << 20):
        # Every path a request names must lie inside --exchange-dir (pf2lora refuses others): the
        # node's data folder is that folder, and requests name it as "." (docs/PROTOCOL.md).
        args = [binary, "serve", "--model", model, "--store", store, "--exchange-dir", exchange_dir,
                "--max-line-bytes", str(max_line_bytes)]
        if threads:
            args += ["--threads", str(threads)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr = []
        self._err = threading.Thread(target=self._drain, daemon=True)
        self._err.start()
        self.next_id = 1

    def _drain(self):
        for line in self.proc.stderr:
            self.stderr.append(line.decode("utf-8", "replace").rstrip())

    def call(self, method, params):
        rid = self.next_id
        self.next_id += 1
        self.proc.stdin.write((json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}) + "\n").encode())
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"pf2lora serve exited during {method}: " + " | ".join(self.stderr[-5:]))
            msg = json.loads(line)
            if msg.get("id") != rid:
                continue  # notifications
            if "error" in msg:
                raise NodeError(method, msg["error"].get("code"), msg["error"].get("message"))
            return msg["result"]

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def node_settings(node_config):
    """This node's settings from its SuperNode's --node-config, checked."""
    need = ["client-id", "client-index", "data-dir", "store", "model", "pf2lora"]
    missing = [k for k in need if k not in node_config]
    if missing:
        raise ValueError("this SuperNode's --node-config lacks " + ", ".join(missing)
                         + " (see integrations/flower/README.md: client-id, client-index, data-dir, store, model, pf2lora)")
    s = {k: node_config[k] for k in need}
    s["threads"] = int(node_config.get("threads", 0))
    for k in ["data-dir", "model", "pf2lora"]:
        if not os.path.exists(str(s[k])):
            raise ValueError(f"node-config {k} = {s[k]!r} does not exist on this node")
    return s
