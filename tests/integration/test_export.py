"""What a run leaves behind is the whole model: RUN_DIR/adapter, loaded with PEFT on the untouched base, is the
simulator's global model at the end of the run — also for strategies that merge every round into the base (FLoRA's
stacked factors, FedEx-LoRA's residuals), whose own final adapter holds almost nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedsim import checkpoint
from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario

MIXED = {"tiers": [{"fraction": 0.5, "rank": 2, "alpha": 4}, {"fraction": 0.5, "rank": 4, "alpha": 4}]}


def _reference_logits(sc, run_dir, ids):
    """Logits of the simulator's own global model at the end: a worker with the checkpoint's base updates applied
    and the strategy's evaluation payload loaded."""
    from fedsim.data.datasets import load_data
    from fedsim.models.base import target_shapes
    from fedsim.runtime.worker import Worker
    from fedsim.server import Server
    from fedsim.strategies import StrategySpec

    _, state, strategy_state, _ = checkpoint.load(run_dir)
    server = Server(sc.strategy.name, sc.strategy.params, StrategySpec(target_shapes(sc.model), state.lora, sc.seed))
    server.set_state(state, strategy_state)
    worker = Worker(sc, load_data(sc))
    for version, delta in server.base_deltas(since=0):
        worker.apply_base_delta(version, delta)
    payload = server.eval_payload()
    host = worker.host(payload.base_version)
    host.activate(payload.lora)
    worker._load(host, payload, None, None)
    with torch.no_grad():
        return host.model(input_ids=ids).logits


@pytest.mark.parametrize("strategy,lora", [("flora", MIXED), ("fedex", {"rank": 4, "alpha": 8}),
                                           ("flexlora", MIXED), ("fedit", {"rank": 4, "alpha": 8})])
def test_the_exported_adapter_is_the_global_model(tiny_raw, tmp_path, strategy, lora):
    from peft import PeftModel

    from fedsim.client.evaluate import evaluate_batch, reduce_eval
    from fedsim.data.datasets import load_data
    from fedsim.models.base import build_base_model

    tiny_raw.update(rounds=3, strategy={"name": strategy})
    tiny_raw["clients"].update(per_round=4, lora=lora)
    tiny_raw["training"]["local_steps"] = 2
    sc = scenario_from_dict(tiny_raw)
    out = tmp_path / "run"
    run_scenario(sc, out)
    model = PeftModel.from_pretrained(build_base_model(sc.model), str(out / "adapter"))
    ids = torch.as_tensor(np.random.default_rng(0).integers(2, 300, size=(3, 20)))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = _reference_logits(sc, out, ids)
    assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))
    if strategy in ("flora", "fedex"):  # the base moved: the base alone is not the model
        with torch.no_grad():
            bare = build_base_model(sc.model)(input_ids=ids).logits
        assert float((bare - want).abs().max()) > 1e-3
    data = load_data(sc)
    parts = [evaluate_batch(model, data, np.arange(s, min(s + 16, len(data.test))), torch.device("cpu"))
             for s in range(0, len(data.test), 16)]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert reduce_eval(parts)["eval/accuracy"] == last["eval/accuracy"]
    assert abs(reduce_eval(parts)["eval/loss"] - last["eval/loss"]) < 1e-5
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert not config["use_rslora"] or strategy == "fedit"
