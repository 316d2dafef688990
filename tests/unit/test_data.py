import json

import numpy as np
import pytest

from fedsim.client.batching import collate
from fedsim.config import scenario_from_dict
from fedsim.data import datasets as D
from fedsim.data.synthetic import TASKS, generate
from fedsim.errors import DataError, ScenarioError


def test_synthetic_rows_are_correct_and_seeded():
    rows = generate(list(TASKS), 400, seed=5)
    assert rows == generate(list(TASKS), 400, seed=5)
    assert rows != generate(list(TASKS), 400, seed=6)
    assert {r["task"] for r in rows} == set(TASKS)
    for r in rows:
        words = r["instruction"].split()
        if r["task"] == "add":
            assert int(r["output"]) == int(words[1]) + int(words[2])
        elif r["task"] == "reverse":
            assert r["output"] == words[1][::-1]
        elif r["task"] == "upper":
            assert r["output"] == words[1].upper()
        elif r["task"] == "sort":
            assert r["output"] == "".join(sorted(words[1]))
        elif r["task"] == "count":
            assert int(r["output"]) == words[3].count(words[1])


def test_tokenized_labels_cover_only_the_response(tiny_scenario):
    data = D.load_data(tiny_scenario)
    assert len(data.train) == 240 and len(data.test) == 48
    assert data.task_names == ["add", "count", "upper"]
    batch = collate(data.train, [0, 1, 2], data.pad_id)
    for row, i in enumerate([0, 1, 2]):
        seq = data.train.sample(i)
        p = int(data.train.prompt_len[i])
        labels = batch["labels"][row]
        assert (labels[:p] == -100).all()
        assert labels[p : len(seq)].tolist() == seq[p:].tolist()
        assert seq[-1] == data.eos_id  # the response ends with EOS
        assert (labels[len(seq):] == -100).all()


def test_truncation_keeps_the_answer(tiny_raw):
    tiny_raw["data"]["max_seq_len"] = 10
    data = D.load_data(scenario_from_dict(tiny_raw), use_cache=False)
    lengths = np.diff(data.train.offsets)
    assert lengths.max() <= 10
    assert (data.train.prompt_len < lengths).all()


def test_tokenization_is_cached(tiny_scenario, monkeypatch):
    first = D.load_data(tiny_scenario)

    def boom(*a, **k):
        raise AssertionError("raw data was loaded again")

    monkeypatch.setattr(D, "load_rows", boom)
    again = D.load_data(tiny_scenario)
    assert np.array_equal(first.train.ids, again.train.ids) and again.task_names == first.task_names


def test_local_jsonl_with_test_file(tmp_path, tiny_raw):
    rows = [{"q": f"say {i}", "a": str(i % 3), "cat": f"c{i % 2}"} for i in range(60)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:10]))
    tiny_raw["data"] = {"source": str(tmp_path / "train.jsonl"), "prompt_template": "{q}\n", "response_field": "a",
                        "task_field": "cat", "test": {"source": str(tmp_path / "test.jsonl")}}
    tiny_raw["partition"] = {"method": "natural", "by": "cat"}
    tiny_raw["clients"]["num_clients"] = 2
    tiny_raw["clients"]["per_round"] = 2
    data = D.load_data(scenario_from_dict(tiny_raw), use_cache=False)
    assert len(data.train) == 60 and len(data.test) == 10
    assert data.group_names == ["c0", "c1"] and data.task_names == ["c0", "c1"]


def test_headerless_csv_classification(tmp_path, tiny_raw):
    lines = [f'{1 + i % 2},"title {i}","text number {i}"' for i in range(50)]
    (tmp_path / "news.csv").write_text("\n".join(lines) + "\n")
    tiny_raw["data"] = {"source": str(tmp_path / "news.csv"), "format": "classification",
                        "columns": ["label", "title", "body"], "prompt_template": "{title}: {body}\nTopic: ",
                        "label_names": {1: "World", 2: "Sports"}, "task_field": None, "test": {"fraction": 0.2}}
    tiny_raw["partition"] = {"method": "dirichlet", "alpha": 1.0}
    data = D.load_data(scenario_from_dict(tiny_raw), use_cache=False)
    assert data.label_names == ["Sports", "World"] and len(data.options) == 2
    assert len(data.test) == 10 and len(data.train) == 40
    assert set(data.test.label.tolist()) <= {0, 1} and (data.train.group >= 0).all()


def test_missing_file_and_field_errors(tmp_path, tiny_raw):
    tiny_raw["data"] = {"source": str(tmp_path / "nope.jsonl")}
    with pytest.raises(ScenarioError, match="no data file"):
        D.load_data(scenario_from_dict(tiny_raw), use_cache=False)
    (tmp_path / "t.jsonl").write_text(json.dumps({"instruction": "x", "answer": "y"}) + "\n")
    tiny_raw["data"] = {"source": str(tmp_path / "t.jsonl")}
    with pytest.raises(ScenarioError, match="output"):
        D.load_data(scenario_from_dict(tiny_raw), use_cache=False)
    (tmp_path / "bad.json").write_text("{not json")
    tiny_raw["data"] = {"source": str(tmp_path / "bad.json")}
    with pytest.raises(DataError, match="cannot load"):
        D.load_data(scenario_from_dict(tiny_raw), use_cache=False)
