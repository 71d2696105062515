"""The ClientApp: one PF2LoRA client node.

Each train message carries the global shared pair x (arrays + metadata); the node's pf2lora process
runs PF2LoRA's local round on the node's own data with its own pair (C_k, D_k) from its store
(`train_local`), publishes the new (C_k, D_k) there, and the updated copy of x goes back for FedAvg.
(C_k, D_k) never leaves the node. Each evaluate message carries the aggregated x: the node adopts it
as its store's shared version (so its server serves the newest global pair) and reports its loss on
its own valid split (`evaluate_local`).
"""
import base64
import json

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .node import Pf2loraNode, b64, node_settings, read_adapter, write_adapter

app = ClientApp()


def _shared_bytes(msg: Message) -> bytes:
    arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    meta = json.loads(msg.content["config"]["adapter-metadata"])
    return write_adapter(arrays, meta)


@app.train()
def train(msg: Message, context: Context) -> Message:
    s = node_settings(context.node_config)
    cfg = msg.content["config"]
    params = {
        "client": s["client-id"], "data": ".",
        "shared": {"safetensors": b64(_shared_bytes(msg))},
        "round": int(cfg["server-round"]) - 1, "client_index": int(s["client-index"]), "seed": int(cfg["seed"]),
        "local_steps": int(cfg["local-steps"]), "lower_steps": int(cfg["lower-steps"]),
        "lr": float(cfg["lr"]), "lr2": float(cfg["lr2"]), "lr_factor": float(cfg["lr-factor"]),
        "rank2": int(cfg["rank2"]), "alpha2": float(cfg["alpha2"]),
        "batch": int(cfg["batch"]), "seq": int(cfg["seq"]), "clip": float(cfg["clip"]),
    }
    with Pf2loraNode(s["pf2lora"], s["model"], s["store"], s["data-dir"], s["threads"]) as node:
        r = node.call("train_local", params)
    arrays, _ = read_adapter(base64.b64decode(r["shared"]["safetensors"]))
    metrics = MetricRecord({
        "num-examples": int(r["num_examples"]), "train-loss": float(r["train_loss"]),
        "client-index": int(s["client-index"]), "client-version": int(r["client_version"]),
        "rank-min": int(r["rank_range"][0]), "rank-max": int(r["rank_range"][1]),
    })
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    s = node_settings(context.node_config)
    cfg = msg.content["config"]
    params = {
        "client": s["client-id"], "data": ".", "shared": {"safetensors": b64(_shared_bytes(msg))},
        "split": str(cfg.get("eval-split", "valid")), "seq": int(cfg["seq"]),
    }
    with Pf2loraNode(s["pf2lora"], s["model"], s["store"], s["data-dir"], s["threads"]) as node:
        r = node.call("evaluate_local", params)
    metrics = MetricRecord({
        "num-examples": int(r["tokens"]), "eval-loss": float(r["loss"]), "client-index": int(s["client-index"]),
        "shared-version": int(r["shared_version"] or 0), "client-version": int(r["client_version"] or 0),
        "rank-min": int(r["rank_range"][0]), "rank-max": int(r["rank_range"][1]),
    })
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
