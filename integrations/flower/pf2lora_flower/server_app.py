"""The ServerApp: PF2LoRA's server is FedAvg on the shared pair x = (A, B).

Round t (1-based in Flower, 0-based for pf2lora): every node gets x, the round's learning-rate
factor (the cosine schedule `pf2lora federate` uses) and the local-round settings; each returns its
updated copy of x and n_k (its training texts); x becomes their n_k-weighted average. After every
round each node evaluates (shared = new x, its own client pair) on its valid split. At the end the
final x is written to `out-dir/shared.safetensors` (a pf2lora adapter: `pf2lora adapters import`-free,
each node already serves it) with `metrics.json` and `results.md`.
"""
import json
import math
import os
import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from .node import read_adapter, write_adapter

app = ServerApp()


def lr_factor(t: int, rounds: int, min_ratio: float) -> float:
    """`LRSchedule(base: 1, totalSteps: rounds, minRatio:).lr(at: t)` of pf2lora, t 0-based."""
    if rounds <= 1:
        return 1.0
    progress = min(1.0, t / rounds)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class PF2LoRAFedAvg(FedAvg):
    """FedAvg that sends each round its learning-rate factor and keeps every node's metrics."""

    def __init__(self, rounds: int, min_lr_ratio: float, **kw):
        super().__init__(**kw)
        self.rounds, self.min_lr_ratio = rounds, min_lr_ratio
        self.per_client = {"train": {}, "evaluate": {}}

    def configure_train(self, server_round, arrays, config, grid):
        config["lr-factor"] = lr_factor(server_round - 1, self.rounds, self.min_lr_ratio)
        return super().configure_train(server_round, arrays, config, grid)

    def _keep(self, kind, server_round, replies):
        replies = list(replies)
        for m in replies:
            if m.has_content():
                rec = next(iter(m.content.metric_records.values()))
                self.per_client[kind].setdefault(server_round, {})[int(rec["client-index"])] = dict(rec)
        return replies

    def aggregate_train(self, server_round, replies):
        return super().aggregate_train(server_round, self._keep("train", server_round, replies))

    def aggregate_evaluate(self, server_round, replies):
        return super().aggregate_evaluate(server_round, self._keep("evaluate", server_round, replies))


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    init = str(cfg["init-adapter"])
    if not init or not os.path.isfile(init):
        raise ValueError(f"run config init-adapter = {init!r} is not a file; make one with `pf2lora adapters init --model DIR --out FILE`")
    with open(init, "rb") as f:
        arrays, meta = read_adapter(f.read())
    if meta.get("level") != "shared":
        raise ValueError(f"{init} is a {meta.get('level')}-level adapter; the federation needs a shared pair")
    rounds = int(cfg["num-server-rounds"])
    nodes = len(list(grid.get_node_ids())) or 1
    want = int(cfg.get("num-clients", nodes))
    strategy = PF2LoRAFedAvg(rounds=rounds, min_lr_ratio=float(cfg["min-lr-ratio"]), fraction_train=1.0, fraction_evaluate=1.0,
                             min_train_nodes=want, min_evaluate_nodes=want, min_available_nodes=want)
    shared_cfg = {"adapter-metadata": json.dumps(meta), "seq": int(cfg["seq"])}
    train_cfg = ConfigRecord(dict(shared_cfg, **{
        k: cfg[k] for k in ["local-steps", "lower-steps", "lr", "lr2", "rank2", "alpha2", "batch", "clip", "seed"]}))
    eval_cfg = ConfigRecord(dict(shared_cfg, **{"eval-split": str(cfg["eval-split"])}))
    t0 = time.time()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}), num_rounds=rounds,
                            train_config=train_cfg, evaluate_config=eval_cfg)
    seconds = time.time() - t0

    out = str(cfg["out-dir"])
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    final = {k: v.numpy() for k, v in result.arrays.items()}
    meta_out = dict(meta, trained_by="flower federation (pf2lora_flower)", rounds=str(rounds))
    tmp = os.path.join(out, ".shared.safetensors.tmp")
    with open(tmp, "wb") as f:
        f.write(write_adapter(final, meta_out))
    os.replace(tmp, os.path.join(out, "shared.safetensors"))
    last = strategy.per_client["evaluate"].get(rounds, {})
    report = {
        "rounds": rounds, "seconds": seconds, "clients": want,
        "run_config": {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.items()},
        "train": {str(r): {str(k): v for k, v in d.items()} for r, d in strategy.per_client["train"].items()},
        "evaluate": {str(r): {str(k): v for k, v in d.items()} for r, d in strategy.per_client["evaluate"].items()},
        "final_eval_loss": {str(k): v["eval-loss"] for k, v in last.items()},
    }
    with open(os.path.join(out, "metrics.json.tmp"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    os.replace(os.path.join(out, "metrics.json.tmp"), os.path.join(out, "metrics.json"))
