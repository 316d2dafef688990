"""The Flower side of benchmarks/vs_flower.py: the same federated LoRA training as fedsim's run, written as a Flower
user would write it (Message API: a ServerApp with FedAvg, a ClientApp), on Flower's simulation engine.

Runs in the Flower virtual environment that vs_flower.py creates (Flower pins its own Ray), so it imports nothing
from fedsim: the benchmark hands it the tiny model's Llama config, the tokenized samples and the partition (the same
ones fedsim's run uses) in a .npz file, and the settings in a JSON file.

Best case for Flower: each Ray actor builds the base model and the PEFT wrapper once and keeps them (a module-level
cache), and loads the data once; a client call only loads the global LoRA tensors, trains, and sends its own back.

Usage (by vs_flower.py): <flower venv>/bin/python -c "import flower_app; flower_app.launch('SETTINGS.json')", with
benchmarks/ on PYTHONPATH. It must be imported as a module, not run as __main__: Ray pickles functions of __main__ by
value, so every client call would bring a fresh, empty cache with it and rebuild the model (Flower's ``flwr run``
also loads the app by module name).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

SETTINGS: dict = {}  # the run's settings, in the process that runs the ServerApp
_CACHE: dict = {"builds": 0}  # per process (per Ray actor): the PEFT model, its LoRA parameters, the data


def build_model(cfg: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg["init_seed"])
    base = LlamaForCausalLM(LlamaConfig.from_dict(cfg["llama"]))
    lora = LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], target_modules=cfg["target_modules"], lora_dropout=0.0)
    model = get_peft_model(base, lora)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return model, params


def cached(settings: dict) -> tuple:
    if "model" not in _CACHE:
        torch.set_num_threads(1)  # one CPU per actor, as fedsim's workers
        model, params = build_model(settings["model"])
        data = np.load(settings["data"])
        _CACHE["builds"] += 1
        _CACHE.update(model=model, params=params, ids=data["ids"], labels=data["labels"],
                      parts=np.split(data["indices"], data["bounds"]))
    return _CACHE["model"], _CACHE["params"], _CACHE


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    settings = json.loads(cfg["settings"])
    model, params, cache = cached(settings)
    state = msg.content["arrays"].to_torch_state_dict()
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    cid = int(context.node_config["partition-id"])
    shard = cache["parts"][cid]
    rng = np.random.default_rng([settings["seed"], int(cfg["server-round"]), cid])
    opt = torch.optim.AdamW(list(params.values()), lr=settings["lr"], weight_decay=0.0)
    model.train()
    loss_sum = 0.0
    for _ in range(settings["steps"]):
        idx = rng.choice(shard, size=settings["batch"], replace=len(shard) < settings["batch"])
        ids = torch.from_numpy(cache["ids"][idx].astype(np.int64))
        labels = torch.from_numpy(cache["labels"][idx].astype(np.int64))
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), settings["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += float(loss)
    out = ArrayRecord({n: p.detach() for n, p in params.items()})
    metrics = MetricRecord({"train_loss": loss_sum / settings["steps"], "num-examples": len(shard),
                            "builds": cache["builds"]})
    return Message(content=RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round's training starts and when its aggregation ends."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.starts: list[float] = []
        self.ends: list[float] = []

    def configure_train(self, server_round, arrays, config, grid):
        self.starts.append(time.perf_counter())
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        out = super().aggregate_train(server_round, replies)
        self.ends.append(time.perf_counter())
        return out


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    s = SETTINGS
    model, params = build_model(s["model"])
    test = np.load(s["data"])
    test_ids, test_labels = test["test_ids"], test["test_labels"]

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round != s["rounds"]:  # fedsim's run evaluates once, after the last round
            return None
        state = arrays.to_torch_state_dict()
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])
            model.eval()
            total, n = 0.0, 0
            for i in range(0, len(test_ids), s["eval_batch"]):
                ids = torch.from_numpy(test_ids[i:i + s["eval_batch"]].astype(np.int64))
                labels = torch.from_numpy(test_labels[i:i + s["eval_batch"]].astype(np.int64))
                total += float(model(input_ids=ids, labels=labels).loss) * len(ids)
                n += len(ids)
        torch.save(state, Path(s["out"]) / "adapter.pt")
        return MetricRecord({"loss": total / n})

    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=s["clients"],
                           min_available_nodes=s["clients"])
    shared = {k: s[k] for k in ("model", "data", "seed", "lr", "steps", "batch", "max_grad_norm")}
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord({n: p.detach() for n, p in params.items()}),
                            num_rounds=s["rounds"], train_config=ConfigRecord({"settings": json.dumps(shared)}),
                            evaluate_fn=evaluate)
    final = result.evaluate_metrics_serverapp.get(s["rounds"])
    (Path(s["out"]) / "flower_rounds.json").write_text(json.dumps({
        "round_s": [e - b for b, e in zip(strategy.starts, strategy.ends)],
        "train_loss": [float(result.train_metrics_clientapp[r]["train_loss"]) for r in range(1, s["rounds"] + 1)],
        "eval_loss": float(final["loss"]) if final is not None else None,
        # mean over the round's clients of the model builds their actor had made: 1.0 when every actor built once
        "builds": [float(result.train_metrics_clientapp[r]["builds"]) for r in range(1, s["rounds"] + 1)]}))


def launch(settings_file: str) -> None:
    SETTINGS.update(json.loads(Path(settings_file).read_text()))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=SETTINGS["clients"],
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": SETTINGS["workers"], "include_dashboard": False}})
