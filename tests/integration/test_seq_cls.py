"""Sequence classification (#25 point 1): encoder and decoder classifiers with a trained head — the head trained by
every client, averaged by the server (sample-weighted) whatever the strategy, sent with each payload and counted in
communication; the exported adapter loads with PEFT's sequence-classification classes and reproduces the
simulator's evaluation; what a head rules out is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DISTILBERT, ROBERTA, classifier_raw
from tolerances import DIFFERENT, F32_ALGEBRA, F32_NETWORK

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario
from fedsim.errors import ScenarioError
from fedsim.strategies import available_strategies

AGGREGATING = sorted(n for n, c in available_strategies().items() if c.aggregates)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _simulator_eval(model, sc):
    from fedsim.data.datasets import load_data
    from fedsim.eval.metrics import reduce_eval
    from fedsim.eval.scoring import evaluate_batch
    from fedsim.models.tasks import task_for

    data, task = load_data(sc), task_for(sc.model)
    parts = [evaluate_batch(model, data, np.arange(s, min(s + 16, len(data.test))), torch.device("cpu"), task=task)
             for s in range(0, len(data.test), 16)]
    return reduce_eval(parts)


def test_an_encoder_classifier_trains_its_head_and_exports_it_for_peft(tiny_raw, tmp_path):
    from peft import PeftModel

    from fedsim.models.tasks import task_for

    sc = scenario_from_dict(classifier_raw(tiny_raw, tmp_path, ROBERTA))
    out = tmp_path / "run"
    run_scenario(sc, out)
    rows = _rows(out)
    assert rows[-1]["eval/loss"] != rows[0]["eval/loss"]
    head_bytes = 4 * (32 * 32 + 32 + 2 * 32 + 2)  # RobertaClassificationHead: dense + out_proj, float32
    lora_bytes = 4 * 2 * (4 * 32 + 32 * 4)  # query and value, rank 4
    assert rows[1]["comm/up_bytes"] == 3 * (lora_bytes + head_bytes)  # three clients per round
    assert rows[2]["comm/down_bytes"] == 3 * (lora_bytes + head_bytes)  # the averaged head goes out from round 2
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    model = PeftModel.from_pretrained(task_for(sc.model).build(sc.model), str(out / "adapter"))
    assert type(model).__name__ == "PeftModelForSequenceClassification"
    got = _simulator_eval(model, sc)
    assert got["eval/loss"] == pytest.approx(rows[-1]["eval/loss"], rel=F32_NETWORK)
    assert got["eval/accuracy"] == rows[-1]["eval/accuracy"]
    bare = _simulator_eval(task_for(sc.model).build(sc.model), sc)
    assert bare["eval/loss"] != pytest.approx(got["eval/loss"], rel=DIFFERENT)  # the trained adapter and head matter


def test_a_hub_style_classifier_directory_loads_with_auto_peft(tiny_raw, tmp_path):
    """A save_pretrained RobertaForSequenceClassification directory (what a hub id resolves to): auto picks seq_cls
    and its num_labels from the config; AutoPeftModelForSequenceClassification loads the export on it."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import ByT5Tokenizer, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(**{k: v for k, v in ROBERTA["config"].items() if k != "model_type"}, vocab_size=384,
                        pad_token_id=0, num_labels=2, architectures=["RobertaForSequenceClassification"])
    RobertaForSequenceClassification(cfg).save_pretrained(tmp_path / "clf")
    ByT5Tokenizer().save_pretrained(tmp_path / "clf")
    raw = classifier_raw(tiny_raw, tmp_path, {"name": str(tmp_path / "clf"), "target_modules": ["query", "value"]})
    raw.update(rounds=1, strategy={"name": "flora"})  # FLoRA merges into the base: the export folds it in
    sc = scenario_from_dict(raw)
    out = tmp_path / "run"
    run_scenario(sc, out)
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(out / "adapter"))
    got = _simulator_eval(model, sc)
    last = _rows(out)[-1]
    assert got["eval/loss"] == pytest.approx(last["eval/loss"], rel=F32_NETWORK)
    assert got["eval/accuracy"] == last["eval/accuracy"]


@pytest.mark.parametrize("strategy", AGGREGATING)
def test_every_strategy_runs_on_an_encoder_classifier(tiny_raw, tmp_path, strategy):
    """DistilBERT (the FedQLoRA paper's model; its pre_classifier trains with the classifier), one round each;
    FedQLoRA with 2-bit and 4-bit clients."""
    raw = classifier_raw(tiny_raw, tmp_path, DISTILBERT)
    raw.update(rounds=1, strategy={"name": strategy})
    raw["eval"]["local_test_fraction"] = 0.2
    if strategy == "fedqlora":
        raw["clients"]["quant"] = {"tiers": [{"fraction": 0.5, "bits": 2}, {"fraction": 0.5, "bits": 4}],
                                   "backend": "hqq", "group_size": 32}
    if strategy in ("flora", "flexlora", "hetlora"):
        raw["clients"]["lora"] = {"tiers": [{"fraction": 0.5, "rank": 2}, {"fraction": 0.5, "rank": 4}]}
    out = tmp_path / "run"
    run_scenario(scenario_from_dict(raw), out)
    rows = _rows(out)
    assert np.isfinite(rows[-1]["eval/loss"]) and rows[-1]["clients/succeeded"] == 3
    from safetensors.torch import load_file

    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {k for k in keys if "classifier" in k} == {f"base_model.model.{m}.{p}" for m in ("pre_classifier",
                                                       "classifier") for p in ("weight", "bias")}


def test_a_decoder_classifier_and_worker_partials(tiny_raw, tmp_path):
    """The tiny Llama as LlamaForSequenceClassification (its score head reads each row's last token): the runs with
    resources.worker_partials (each worker folds its clients' heads too) and with packed clients equal the plain
    one."""
    raw = classifier_raw(tiny_raw, tmp_path, {"name": "tiny", "task": "seq_cls", "num_labels": 2,
                                              "tiny": tiny_raw["model"]["tiny"]})
    plain = scenario_from_dict(raw)
    run_scenario(plain, tmp_path / "plain")
    raw["resources"]["worker_partials"] = True
    run_scenario(scenario_from_dict(raw), tmp_path / "partials")
    raw["resources"]["worker_partials"] = False
    raw["resources"]["clients_per_pass"] = "auto"  # every round's clients in one pass, each with its own head
    run_scenario(scenario_from_dict(raw), tmp_path / "packed")
    a, b, c = _rows(tmp_path / "plain"), _rows(tmp_path / "partials"), _rows(tmp_path / "packed")
    assert a[-1]["eval/loss"] == pytest.approx(b[-1]["eval/loss"], rel=F32_NETWORK)
    assert a[-1]["eval/loss"] == pytest.approx(c[-1]["eval/loss"], rel=F32_NETWORK)
    assert all(r["train/clients_per_pass"] > 1 for r in c[1:])
    assert a[-1]["train/loss"] < a[1]["train/loss"] or a[-1]["eval/loss"] < a[0]["eval/loss"]


def test_the_server_averages_heads_by_sample_counts():
    from fedsim.lora import ops
    from fedsim.server import Folder, FoldSpec, Server
    from fedsim.strategies import StrategySpec
    from fedsim.types import ClientSpec, ClientUpdate, LoraSpec, ModuleShape, RoundContext

    shapes = {"m.q": ModuleShape(d_in=4, d_out=3)}
    server = Server("fedit", spec=StrategySpec(shapes, LoraSpec(2, 4.0), seed=0))
    ctx = RoundContext(1, 2, 0)
    gen = torch.Generator().manual_seed(0)
    updates = [ClientUpdate(c, n, LoraSpec(2, 4.0),
                            {ops.a_key("m.q"): torch.randn(2, 4, generator=gen),
                             ops.b_key("m.q"): torch.randn(3, 2, generator=gen)},
                            head={"head.classifier.weight": torch.randn(2, 3, generator=gen),
                                  "head.classifier.bias": torch.randn(2, generator=gen)})
               for c, n in ((0, 5), (1, 1), (2, 14))]
    want = {k: sum(u.num_examples * u.head[k].double() for u in updates) / 20 for k in updates[0].head}
    result = server.aggregate(ctx, iter(updates))
    assert all(torch.allclose(server.head[k].double(), want[k], atol=F32_ALGEBRA) for k in want)
    assert result["comm/up_params"] == 3 * (8 + 6 + 6 + 2)
    payloads, down = server.configure(RoundContext(2, 2, 0), [ClientSpec(0, 5, LoraSpec(2, 4.0))])
    assert payloads[0].head is server.head and down[0][0] == 8 + 6 + 6 + 2
    assert server.eval_payload().head is server.head
    state, extra = server.get_state()  # the head checkpoints with the server
    again = Server("fedit", spec=StrategySpec(shapes, LoraSpec(2, 4.0), seed=0))
    again.set_state(state, extra)
    assert all(torch.equal(again.head[k], server.head[k]) for k in want)
    folders = [Folder(server.strategy), Folder(server.strategy)]  # worker partials merge to the same mean
    spec = FoldSpec(ctx, server.state, shapes)
    for i, u in enumerate(updates):
        folders[i % 2].fold(spec, u)
    partials = [f.take(1) for f in folders]
    fresh = Server("fedit", spec=StrategySpec(shapes, LoraSpec(2, 4.0), seed=0))
    fresh.state = server.state
    fresh.aggregate_partials(ctx, iter(partials), {u.client_id: ((0, 0), None) for u in updates})
    assert all(torch.allclose(fresh.head[k].double(), want[k], atol=F32_ALGEBRA) for k in want)


def test_classifier_mistakes_are_one_line_errors(tiny_raw, tmp_path):
    from fedsim.driver import prepare

    def refused(raw, match):
        with pytest.raises(ScenarioError, match=match):
            sc = scenario_from_dict(raw)
            from fedsim.components import resolve

            resolve(sc)
            prepare(sc)

    base = classifier_raw(tiny_raw, tmp_path, ROBERTA)
    base["eval"]["local_test_fraction"] = 0.2
    no_labels = json.loads(json.dumps(base))
    no_labels["model"].pop("num_labels")
    refused(no_labels, "model.num_labels: FacebookAI/roberta-base has no classification head to take its number "
                       "of labels from")
    few = json.loads(json.dumps(base))
    few["model"]["num_labels"] = 1
    refused(few, "the data has 2 labels .* but the head has 1 outputs .*num_labels: 2")
    instr = json.loads(json.dumps(base))
    instr["data"] = {"source": "synthetic", "synthetic": {"tasks": ["add"], "num_train": 40, "num_test": 8},
                     "max_seq_len": 24}
    refused(instr, "data.format: model.task seq_cls trains a classifier on labelled rows, but the data has no labels")
    for key, value, match in (("privacy", {"mode": "local", "noise_multiplier": 1.0, "clipping_norm": 1.0},
                               "privacy: the classifier head trains in full"),
                              ("strategy", {"name": "fedit", "robust": {"method": "median"}}, "strategy.robust"),
                              # #45: the head went up and down without a control variate (1.39x FedIT's traffic)
                              ("strategy", {"name": "fedit", "client_objective": {"name": "scaffold"}},
                               "strategy.client_objective: SCAFFOLD corrects the adapter's drift .* without one")):
        raw = json.loads(json.dumps(base))
        raw[key] = value
        refused(raw, match)
    import argparse

    import yaml

    from fedsim.cli import _cmd_validate

    raw = json.loads(json.dumps(base))
    raw["strategy"] = {"name": "fedit", "robust": {"method": "median"}}
    (tmp_path / "robust.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ScenarioError, match="strategy.robust"):  # validate says it too
        _cmd_validate(argparse.Namespace(scenario=str(tmp_path / "robust.yaml"), overrides=[]))
    inside = json.loads(json.dumps(base))
    inside["model"]["target_modules"] = ["dense"]  # also the classifier's own dense layer: never adapted
    from fedsim.models.base import target_shapes
    from fedsim.models.tasks import task_for

    sc = scenario_from_dict(inside)
    task = task_for(sc.model)
    names = target_shapes(sc.model, task.classes[0], task.head_names)
    assert names and not any(n.startswith("classifier") for n in names)


def test_a_client_export_of_a_classifier_holds_the_head(tiny_raw, tmp_path):
    """`fedsim export --client K` (and --merged) of a FedSA-LoRA classifier run: client K's personal B on the global
    A, with the global head, reproduces its personalized evaluation; macro-F1 and Matthews' correlation are
    reported from the head's predictions."""
    import csv

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedsim.driver import prepare
    from fedsim.eval.scoring import evaluate_batch
    from fedsim.export import export_client
    from fedsim.models.tasks import task_for

    raw = classifier_raw(tiny_raw, tmp_path, ROBERTA)
    raw.update(strategy={"name": "fedsa"})
    raw["clients"]["per_round"] = 8
    raw["eval"].update(local_test_fraction=0.25, metrics=["accuracy", "macro_f1", "mcc"])
    sc = scenario_from_dict(raw)
    out = tmp_path / "run"
    run_scenario(sc, out)
    last = _rows(out)[-1]
    assert "eval/macro_f1" in last and "eval/mcc" in last
    with open(out / "personalized.csv") as f:
        table = {int(r["client_id"]): r for r in csv.DictReader(f)}
    k = 3
    prep = prepare(sc)

    def local(model):
        r = evaluate_batch(model, prep.data, prep.local_test[k], torch.device("cpu"), split=prep.data.train,
                           task=task_for(sc.model))
        return r["loss_sum"] / r["tokens"]

    export_client(out, k, tmp_path / "adapter")
    model = PeftModel.from_pretrained(task_for(sc.model).build(sc.model), str(tmp_path / "adapter"))
    assert local(model) == pytest.approx(float(table[k]["personal_loss"]), rel=F32_NETWORK)
    export_client(out, k, tmp_path / "merged", merged=True)
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
    assert local(merged) == pytest.approx(float(table[k]["personal_loss"]), rel=F32_NETWORK)


def test_a_stopped_classifier_run_resumes_to_the_same_numbers(tiny_raw, tmp_path):
    """The head checkpoints with the server: a run stopped after round 1 and resumed equals the uninterrupted one."""
    from fedsim.driver import resume_run
    from fedsim.federation.callbacks import RoundCallback, StopRun

    class Stop(RoundCallback):
        def on_round_end(self, server_round, row):
            if server_round == 1:
                raise StopRun("test")

    raw = classifier_raw(tiny_raw, tmp_path, ROBERTA)
    raw["rounds"] = 3
    run_scenario(scenario_from_dict(raw), tmp_path / "ref")
    run_scenario(scenario_from_dict(raw), tmp_path / "cut", callbacks=[Stop()])
    resume_run(tmp_path / "cut")
    a, b = _rows(tmp_path / "ref"), _rows(tmp_path / "cut")
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    assert [r["eval/loss"] for r in a] == [r["eval/loss"] for r in b]


@pytest.mark.parametrize("model_type,config,targets,head", [
    ("bert", {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
     ["query", "value"], ["classifier"]),
    ("deberta-v2", {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                    "pooler_hidden_size": 32, "max_position_embeddings": 96}, ["query_proj", "value_proj"],
     ["classifier", "pooler"]),
    ("qwen2", {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
               "intermediate_size": 64}, "all-linear", ["score"])])
def test_other_classifier_families_train_their_heads(tiny_raw, tmp_path, model_type, config, targets, head):
    """BERT, DeBERTa-v2 (its ContextPooler trains with the classifier) and a decoder with a score head (Qwen2, with
    all-linear: every linear layer but the head)."""
    from safetensors.torch import load_file

    model = {"name": f"stand-in/{model_type}", "task": "seq_cls", "num_labels": 2, "target_modules": targets,
             "config": {"model_type": model_type, **config}}
    raw = classifier_raw(tiny_raw, tmp_path, model)
    raw["rounds"] = 1
    run_scenario(scenario_from_dict(raw), tmp_path / "run")
    assert np.isfinite(_rows(tmp_path / "run")[-1]["eval/loss"])
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == sorted(head)
    keys = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert not any(k.split(".")[2] in head and "lora_" in k for k in keys)  # nothing adapted inside the head


def test_local_training_keeps_each_clients_head_with_its_adapter(tiny_raw, tmp_path):
    """The local-only baseline with a classifier: each client's head trains with its adapter and stays with it (its
    state, checkpointed like the adapter) — nothing is uploaded, the global head stays the initial one, and each
    client's own model (its adapter and its head) is what personalized evaluation and export read."""
    from fedsim import checkpoint
    from fedsim.client.store import ClientStateStore
    from fedsim.export import export_client
    from fedsim.lora.ops import HEAD_PREFIX

    raw = classifier_raw(tiny_raw, tmp_path, ROBERTA)
    raw["strategy"] = {"name": "local"}
    raw["eval"]["local_test_fraction"] = 0.25
    out = tmp_path / "run"
    summary = run_scenario(scenario_from_dict(raw), out)
    rows = _rows(out)
    assert all(r.get("comm/up_bytes", 0) == 0 for r in rows if r["round"] >= 1)
    assert rows[-1]["eval/loss"] == rows[0]["eval/loss"]  # the global model: the base with its initial head
    assert summary["final/eval/personal/loss"] != summary["final/eval/local_global/loss"]
    checkpoint.restore_client_state(checkpoint.load(out)[3], tmp_path / "state")
    store = ClientStateStore.open(tmp_path / "state")
    trained = [c for c in range(raw["clients"]["num_clients"]) if store.get(c)]
    heads = {c: {k: v for k, v in store.get(c).items() if k.startswith(HEAD_PREFIX)} for c in trained}
    assert trained and all(heads[c] for c in trained)
    a, b = trained[:2]
    assert any(not torch.equal(heads[a][k], heads[b][k]) for k in heads[a])  # each its own head
    export_client(out, a, tmp_path / "export")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))
    key = next(k for k in saved if "classifier" in k and k.endswith("out_proj.weight"))
    assert torch.equal(saved[key], heads[a][HEAD_PREFIX + "classifier.out_proj.weight"])
