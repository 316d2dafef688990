"""Relative paths in a scenario file resolve against the file's directory, from any working directory; --set values
against the current one; errors print the resolved path (#45 point 15)."""

import json
from pathlib import Path

import pytest
import yaml

from fedsim.config import dump_scenario, load_scenario
from fedsim.errors import ScenarioError

ROOT = Path(__file__).resolve().parents[2]


def write_scenario(where: Path, **sections) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    path = where / "s.yaml"
    path.write_text(yaml.safe_dump({"rounds": 1, **sections}))
    return path


def rows(path: Path, n: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(n)))
    return path


def test_a_data_file_next_to_the_scenario_is_read_from_any_directory(tmp_path, monkeypatch):
    train = rows(tmp_path / "exp" / "data" / "train.jsonl")
    test = rows(tmp_path / "exp" / "data" / "test.jsonl", 4)
    path = write_scenario(tmp_path / "exp", data={"source": "data/train.jsonl", "task_field": None,
                                                  "test": {"source": "./data/test.jsonl"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    sc = load_scenario(path)
    assert sc.data.source == str(train) and sc.data.test.source == str(test)
    assert str(train) in dump_scenario(sc)  # the run directory's scenario.yaml reads the same file from anywhere
    from fedsim.data.datasets import load_data

    assert len(load_data(sc, use_cache=False).train) == 12
    # a --set value is the user's, typed where they stand: relative to the current directory
    here = rows(elsewhere / "mine.jsonl")
    assert load_scenario(path, ["data.source=mine.jsonl"]).data.source == str(here)
    # data.sources too, and a directory fedsim creates
    sources = write_scenario(tmp_path / "exp2", data={"sources": {"a": {"source": "../exp/data/train.jsonl",
                                                                        "test_source": "../exp/data/test.jsonl"}}},
                             clients={"state_dir": "spill"})
    sc = load_scenario(sources)
    assert sc.data.sources["a"].source == str(train) and sc.data.sources["a"].test_source == str(test)
    assert sc.clients.state_dir == str(tmp_path / "exp2" / "spill")


def test_a_missing_file_is_named_by_its_resolved_path(tmp_path, monkeypatch):
    path = write_scenario(tmp_path / "exp", data={"source": "data/nope.jsonl", "task_field": None})
    monkeypatch.chdir(tmp_path)
    from fedsim.data.datasets import load_data

    with pytest.raises(ScenarioError) as e:
        load_data(load_scenario(path), use_cache=False)
    assert str(tmp_path / "exp" / "data" / "nope.jsonl") in str(e.value)
    assert "relative paths in a scenario file resolve against the file's directory" in str(e.value)


def test_a_relative_model_directory_is_local_and_a_missing_one_is_not_a_hub_id(tmp_path, monkeypatch):
    from transformers import BertConfig

    from fedsim.models.base import hf_config

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               vocab_size=100).save_pretrained(tmp_path / "exp" / "models" / "bert")
    path = write_scenario(tmp_path / "exp", model={"name": "models/bert"})
    monkeypatch.chdir(tmp_path)
    sc = load_scenario(path)
    assert sc.model.name == str(tmp_path / "exp" / "models" / "bert")
    assert hf_config(sc.model, None).model_type == "bert"
    for missing in ("./models/nope", "models/x/nope"):  # not of a hub id's form: a local directory, and none is there
        with pytest.raises(ScenarioError) as e:
            load_scenario(write_scenario(tmp_path / "exp", model={"name": missing}))
        message = str(e.value)
        assert f"the model directory {str(tmp_path / 'exp' / missing.removeprefix('./'))!r} is not there" in message
        assert "resolve against the file's directory" in message and "hub" in message
    # of a hub id's form, and no such directory: a hub id, left as it is
    assert load_scenario(write_scenario(tmp_path / "exp", model={"name": "org/model"})).model.name == "org/model"
    assert load_scenario(write_scenario(tmp_path / "exp", data={"source": "fancyzhx/ag_news"})).data.source == \
        "fancyzhx/ag_news"


def test_a_run_directory_written_before_paths_resolved_reads_them_from_the_current_directory(tmp_path, monkeypatch):
    train = rows(tmp_path / "data" / "train.jsonl")
    run = write_scenario(tmp_path / "run", data={"source": "data/train.jsonl", "task_field": None})
    monkeypatch.chdir(tmp_path)
    assert load_scenario(run, relative_to=Path.cwd()).data.source == str(train)


@pytest.mark.parametrize("name", ["alpaca.yaml", "chat.yaml"])
def test_the_shipped_scenarios_run_from_any_directory(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    sc = load_scenario(ROOT / "scenarios" / name)
    assert Path(sc.data.source).is_file() and Path(sc.data.source).is_relative_to(ROOT / "scenarios")


def test_validate_says_which_files_it_reads(tmp_path, monkeypatch, capsys):
    from fedsim.cli import main

    train = rows(tmp_path / "exp" / "data" / "train.jsonl", 40)
    path = write_scenario(tmp_path / "exp", data={"source": "data/train.jsonl", "task_field": None},
                          partition={"method": "iid"}, clients={"num_clients": 2, "per_round": 2})
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(path)]) == 0
    assert f"reads data {train}" in capsys.readouterr().out
