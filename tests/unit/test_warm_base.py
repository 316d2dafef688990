"""benchmarks/warm_base.py: the pretrained base has the tiny model's architecture, loads through the real
from_pretrained path, its tasks are disjoint from the built-in tasks the benchmarks fine-tune on, and a missing text
corpus is one clear error."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import warm_base  # noqa: E402

from fedsim.config import TinyModelConfig  # noqa: E402
from fedsim.data.synthetic import TASKS  # noqa: E402


def test_pretraining_tasks_are_disjoint_and_well_formed():
    assert not set(warm_base.PRETRAIN_TASKS) & set(TASKS)
    rng = np.random.default_rng(0)
    for name, task in warm_base.PRETRAIN_TASKS.items():
        prompt, answer = task(rng)
        assert prompt.startswith(name + " ") and answer


def test_the_warm_base_has_the_tiny_models_architecture():
    t = TinyModelConfig()
    assert warm_base.SIZE == {"hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                              "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads}


def _corpus(path: Path) -> Path:
    path.write_text('"3","Fears for pension","Unions say they are disappointed."\n'
                    '"4","Team sets launch date","A second team of rocketeers announced a date."\n' * 20)
    return path


def test_corpus_rows_are_their_text_columns(tmp_path):
    rows = warm_base.read_corpus(_corpus(tmp_path / "c.csv"))
    assert rows[0] == "Fears for pension. Unions say they are disappointed." and len(rows) == 40
    with pytest.raises(warm_base.CorpusError, match="does not exist: pass --corpus"):
        warm_base.read_corpus(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text('"1"\n"2"\n')
    with pytest.raises(warm_base.CorpusError, match="holds no text rows"):
        warm_base.read_corpus(tmp_path / "empty.csv")


def test_a_warm_base_loads_as_model_name(tmp_path, tiny_raw):
    from fedsim.config import scenario_from_dict
    from fedsim.driver import prepare
    from fedsim.models.base import build_base_model, load_tokenizer

    info = warm_base.pretrain(tmp_path / "warm", steps=2, log=lambda *_: None, corpus=_corpus(tmp_path / "c.csv"))
    assert np.isfinite(info["held_out_loss"]) and np.isfinite(info["held_out_text_loss"])
    tiny_raw["model"] = {"name": str(tmp_path / "warm")}
    sc = scenario_from_dict(tiny_raw)
    model = build_base_model(sc.model)
    assert model.config.hidden_size == warm_base.SIZE["hidden_size"]
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    assert load_tokenizer(sc.model).eos_token_id == 1
    prep = prepare(sc)  # tokenizes the synthetic data with the saved tokenizer, as a run does
    assert len(prep.data.train) > 0


def test_the_strategy_benchmark_refuses_the_warm_base_on_ag_news(monkeypatch, capsys):
    import compare_strategies

    monkeypatch.setattr(sys, "argv", ["compare_strategies.py", "--base", "warm", "--settings", "ag_news"])
    assert compare_strategies.main() == 2
    assert "pretrained on AG News text" in capsys.readouterr().err
