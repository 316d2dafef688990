"""benchmarks/warm_base.py: the pretrained base loads through the real from_pretrained path, and its tasks are
disjoint from the built-in tasks the benchmarks fine-tune on."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import numpy as np  # noqa: E402
import warm_base  # noqa: E402

from fedsim.data.synthetic import TASKS  # noqa: E402


def test_pretraining_tasks_are_disjoint_and_well_formed():
    assert not set(warm_base.PRETRAIN_TASKS) & set(TASKS)
    rng = np.random.default_rng(0)
    for name, task in warm_base.PRETRAIN_TASKS.items():
        prompt, answer = task(rng)
        assert prompt.startswith(name + " ") and answer


def test_a_warm_base_loads_as_model_name(tmp_path, tiny_raw):
    from fedsim.config import scenario_from_dict
    from fedsim.driver import prepare
    from fedsim.models.base import build_base_model, load_tokenizer

    info = warm_base.pretrain(tmp_path / "warm", steps=2, log=lambda *_: None)
    assert info["params"] > 1e6 and np.isfinite(info["held_out_loss"])
    tiny_raw["model"] = {"name": str(tmp_path / "warm")}
    sc = scenario_from_dict(tiny_raw)
    model = build_base_model(sc.model)
    assert model.config.hidden_size == warm_base.SIZE["hidden_size"]
    assert load_tokenizer(sc.model).eos_token_id == 1
    prep = prepare(sc)  # tokenizes the synthetic data with the saved tokenizer, as a run does
    assert len(prep.data.train) > 0
