"""What a run leaves behind is the whole model: RUN_DIR/adapter, loaded with PEFT on the untouched base, is the
simulator's global model at the end of the run — also for strategies that merge every round into the base (FLoRA's
stacked factors, FedEx-LoRA's residuals), whose own final adapter holds almost nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import GPT2
from tolerances import DIFFERENT, F32_ALGEBRA, F32_NETWORK

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


@pytest.mark.parametrize("strategy,lora,family", [("flora", MIXED, None), ("fedex", {"rank": 4, "alpha": 8}, None),
                                                 ("flexlora", MIXED, None), ("fedit", {"rank": 4, "alpha": 8}, None),
                                                 ("flora", MIXED, GPT2), ("fedex", {"rank": 4, "alpha": 8}, GPT2)])
def test_the_exported_adapter_is_the_global_model(tiny_raw, tmp_path, strategy, lora, family):
    """Also on GPT-2 (a stand-in from its config): Conv1D layers store W as (d_in, d_out), so every merge into the
    base goes through the transposed view, and the adapter's config says fan_in_fan_out."""
    from peft import PeftModel

    from fedsim.data.datasets import load_data
    from fedsim.eval.metrics import reduce_eval
    from fedsim.eval.scoring import evaluate_batch
    from fedsim.models.base import build_base_model

    tiny_raw.update(rounds=3, strategy={"name": strategy})
    tiny_raw["clients"].update(per_round=4, lora=lora)
    if family:
        tiny_raw["model"] = family
    tiny_raw["training"]["local_steps"] = 2
    sc = scenario_from_dict(tiny_raw)
    out = tmp_path / "run"
    run_scenario(sc, out)
    model = PeftModel.from_pretrained(build_base_model(sc.model), str(out / "adapter"))
    ids = torch.as_tensor(np.random.default_rng(0).integers(2, 300, size=(3, 20)))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = _reference_logits(sc, out, ids)
    assert float((got - want).abs().max()) <= F32_ALGEBRA * max(1.0, float(want.abs().max()))
    if strategy in ("flora", "fedex"):  # the base moved: the base alone is not the model
        with torch.no_grad():
            bare = build_base_model(sc.model)(input_ids=ids).logits
        assert float((bare - want).abs().max()) > 1e-3
    data = load_data(sc)
    parts = [evaluate_batch(model, data, np.arange(s, min(s + 16, len(data.test))), torch.device("cpu"))
             for s in range(0, len(data.test), 16)]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert reduce_eval(parts)["eval/accuracy"] == last["eval/accuracy"]
    assert abs(reduce_eval(parts)["eval/loss"] - last["eval/loss"]) < F32_NETWORK
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert not config["use_rslora"] or strategy == "fedit"
    assert config.get("fan_in_fan_out", False) == (family is not None)


def _personal_rows(out):
    import csv

    with open(out / "personalized.csv") as f:
        return {int(r["client_id"]): r for r in csv.DictReader(f)}


def _local_eval(model, sc, client):
    from fedsim.driver import prepare
    from fedsim.eval.scoring import evaluate_batch

    prep = prepare(sc)
    r = evaluate_batch(model, prep.data, prep.local_test[client], torch.device("cpu"), split=prep.data.train)
    return r["loss_sum"] / r["tokens"], r["correct"] / r["count"]


Q4 = {"tiers": [{"fraction": 0.5, "bits": 4}, {"fraction": 0.5, "bits": 32}]}


@pytest.mark.parametrize("strategy,quant,family", [("fedsa", None, None), ("feddpa", None, None),
                                                  ("pf2lora", None, None), ("fedqlora", Q4, None),
                                                  ("fedqlora", Q4, GPT2)])
def test_a_client_export_is_that_clients_personalized_model(tiny_raw, tmp_path, strategy, quant, family):
    """`fedsim export RUN_DIR --client K` (and --merged): the model client K evaluates at the end of the run — its
    personal tensors on the global model, on its own base — loaded back with PEFT / transformers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedsim.export import export_client
    from fedsim.models.base import build_base_model

    tiny_raw.update(rounds=2, strategy={"name": strategy})
    tiny_raw["clients"]["per_round"] = 8
    tiny_raw["eval"]["local_test_fraction"] = 0.25
    tiny_raw["training"]["local_steps"] = 2
    if quant:
        tiny_raw["clients"]["quant"] = {**quant, "backend": "hqq", "group_size": 32}
    if family:  # GPT-2's Conv1D layers quantized as linear layers, their residuals and merges transposed
        tiny_raw["model"] = family
    sc = scenario_from_dict(tiny_raw)
    out = tmp_path / "run"
    run_scenario(sc, out)
    table = _personal_rows(out)
    from fedsim.driver import prepare

    clients = prepare(sc).clients
    k = next(c.client_id for c in clients if c.quant.bits < 16) if quant else 3
    want = float(table[k]["personal_loss"]), float(table[k]["personal_accuracy"])
    if not quant:  # an adapter on the client's own (here: the original) base
        info = export_client(out, k, tmp_path / "adapter")
        assert info["personal"] and json.loads((tmp_path / "adapter" / "fedsim_export.json").read_text())["client_id"] == k
        model = PeftModel.from_pretrained(build_base_model(sc.model), str(tmp_path / "adapter"))
        loss, acc = _local_eval(model, sc, k)
        assert loss == pytest.approx(want[0], rel=F32_NETWORK) and acc == want[1]
        global_loss, _ = _local_eval(PeftModel.from_pretrained(build_base_model(sc.model), str(out / "adapter")), sc, k)
        assert global_loss != pytest.approx(want[0], rel=DIFFERENT)  # the personal part matters
    export_client(out, k, tmp_path / "merged", merged=True)  # a quantized client: its dequantized base, merged
    loss, acc = _local_eval(AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")), sc, k)
    assert loss == pytest.approx(want[0], rel=F32_NETWORK) and acc == want[1]


def test_export_errors_are_one_line(tiny_raw, tmp_path, capsys):
    """``fedsim export``'s errors, in this process (``main`` is what the console script calls; an escaping exception
    would fail the test)."""
    from fedsim.cli import main

    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    for args, match in ((["--client", "99"], "client 99 is not in the run"), (["--out", str(tmp_path / "run")],
                                                                                "not an empty directory")):
        assert main(["export", str(tmp_path / "run"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(tmp_path / "run"), "--merged"]) == 0
    assert (tmp_path / "run" / "export" / "global-merged" / "config.json").is_file()


def test_merged_export_of_a_hub_style_model_directory(tiny_raw, tmp_path):
    """model.name as a save_pretrained directory (the from_pretrained path hub ids take): --merged writes a model
    that from_pretrained loads, with the tokenizer, reproducing the run's final evaluation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedsim.data.datasets import load_data
    from fedsim.eval.metrics import reduce_eval
    from fedsim.eval.scoring import evaluate_batch
    from fedsim.export import export_client
    from fedsim.models.base import build_base_model, load_tokenizer

    sc = scenario_from_dict(tiny_raw)
    build_base_model(sc.model).save_pretrained(tmp_path / "tiny-llama")
    load_tokenizer(sc.model).save_pretrained(tmp_path / "tiny-llama")
    tiny_raw["model"] = {"name": str(tmp_path / "tiny-llama")}
    tiny_raw.update(strategy={"name": "flora"})
    sc = scenario_from_dict(tiny_raw)
    run_scenario(sc, tmp_path / "run")
    export_client(tmp_path / "run", None, tmp_path / "merged", merged=True)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    data = load_data(sc)
    parts = [evaluate_batch(model, data, np.arange(s, min(s + 16, len(data.test))), torch.device("cpu"))
             for s in range(0, len(data.test), 16)]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(reduce_eval(parts)["eval/loss"] - last["eval/loss"]) < F32_NETWORK
