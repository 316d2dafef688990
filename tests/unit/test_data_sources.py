"""Several sources, one per task (``data.sources``): each read with its own columns, its rows tagged with its name,
its own test rows; tasks as client groups with a natural split of k clients per task; mistakes are one line; and
ScenarioError crosses process boundaries intact."""

from __future__ import annotations

import pickle

import pytest

from fedsim.config import scenario_from_dict
from fedsim.errors import ScenarioError


def _tsv(path, rows):
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    return str(path)


def _sources(tmp_path, test=True):
    """Two tasks whose files order their columns differently (CoLA: sentence, label; MR: label, sentence)."""
    cola = _tsv(tmp_path / "cola.tsv", [(f"sentence {i} is fine", i % 2) for i in range(30)])
    mr = _tsv(tmp_path / "mr.tsv", [(i % 2, f"a film {i} to remember") for i in range(40)])
    out = {"cola": {"source": cola, "columns": ["text", "label"], "max_samples": 24},
           "mr": {"source": mr, "columns": ["label", "text"]}}
    if test:
        out["cola"]["test_source"] = _tsv(tmp_path / "cola_dev.tsv", [("dev sentence", 1), ("dev two", 0)])
        out["mr"]["test_source"] = _tsv(tmp_path / "mr_dev.tsv", [(0, "dev film"), (1, "dev film two"),
                                                                   (1, "three")])
    return out


def _raw(tiny_raw, tmp_path, **data):
    tiny_raw["data"] = {"format": "classification", "max_seq_len": 48, "sources": _sources(tmp_path), **data}
    tiny_raw["partition"] = {"method": "natural", "by": "task"}
    tiny_raw["clients"] = {"num_clients": 4, "per_round": 2}
    return tiny_raw


def test_each_source_is_read_with_its_columns_and_tagged_with_its_task(tiny_raw, tmp_path):
    from fedsim.data.sources import data_files, load_rows

    sc = scenario_from_dict(_raw(tiny_raw, tmp_path))
    train, test = load_rows(sc.data)
    assert [r["task"] for r in train] == ["cola"] * 24 + ["mr"] * 40  # max_samples: cola's first 24 rows
    assert train[0] == {"text": "sentence 0 is fine", "label": 0, "task": "cola"}
    assert train[24] == {"label": 0, "text": "a film 0 to remember", "task": "mr"}
    assert [r["task"] for r in test] == ["cola"] * 2 + ["mr"] * 3
    assert len(data_files(sc.data)) == 4  # every training and test file is digested (cache key, resume check)


def test_tasks_become_client_groups_with_k_clients_each(tiny_raw, tmp_path):
    from fedsim.driver import prepare

    prep = prepare(scenario_from_dict(_raw(tiny_raw, tmp_path)))
    data = prep.data
    tasks = [data.task_names[t] for t in data.train.task]
    assert [sorted({tasks[i] for i in p}) for p in prep.parts] == [["cola"], ["cola"], ["mr"], ["mr"]]
    assert sorted(len(p) for p in prep.parts) == [12, 12, 20, 20]
    assert [data.task_names[t] for t in data.test.task] == ["cola"] * 2 + ["mr"] * 3


def test_without_test_sources_a_fraction_is_held_out(tiny_raw, tmp_path):
    from fedsim.data.sources import load_rows

    raw = _raw(tiny_raw, tmp_path)
    raw["data"]["sources"] = _sources(tmp_path, test=False)
    train, test = load_rows(scenario_from_dict(raw).data)
    assert test is None and len(train) == 64


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(source="x.tsv"), "give data.source or data.sources, not both"),
    (lambda d: d.update(task_field=None), "data.task_field is null"),
    (lambda d: d["sources"]["mr"].pop("test_source"), r"\['cola'\] give their test rows and \['mr'\] do not"),
    (lambda d: d.update(sources={}), "data.sources is empty"),
    (lambda d: d.update(test={"source": "t.tsv"}), "remove data.test.source"),
])
def test_source_mistakes_are_one_line(tiny_raw, tmp_path, change, match):
    raw = _raw(tiny_raw, tmp_path)
    change(raw["data"])
    with pytest.raises(ScenarioError, match=match):
        scenario_from_dict(raw)


def test_source_mistakes_found_when_reading_are_one_line(tiny_raw, tmp_path):
    from fedsim.data.sources import load_rows

    raw = _raw(tiny_raw, tmp_path)
    raw["data"]["sources"]["cola"]["test_split"] = "validation"
    raw["data"]["sources"]["cola"].pop("test_source")
    with pytest.raises(ScenarioError, match="data.sources.cola.test_split: a split name only applies to hub"):
        load_rows(scenario_from_dict(raw).data)
    raw = _raw(tiny_raw, tmp_path)
    raw["data"]["sources"]["mr"]["columns"] = ["task", "text"]  # a column named like the task field
    with pytest.raises(ScenarioError, match="rows of data.sources.mr.source already have a field 'task'"):
        load_rows(scenario_from_dict(raw).data)
    raw = _raw(tiny_raw, tmp_path)
    raw["data"]["sources"]["mr"]["source"] = str(tmp_path / "missing.tsv")
    with pytest.raises(ScenarioError, match="data.sources.mr.source: no data file found"):
        load_rows(scenario_from_dict(raw).data)


def test_the_cache_key_follows_every_sources_contents(tiny_raw, tmp_path):
    from fedsim.data.cache import cache_key
    from fedsim.models.tokenizer import byte_level_tokenizer

    sc = scenario_from_dict(_raw(tiny_raw, tmp_path))
    tok = byte_level_tokenizer()
    before = cache_key(sc, "task", tok, "causal_lm")
    with open(tmp_path / "mr_dev.tsv", "a") as f:
        f.write("0\tone more\n")
    assert cache_key(sc, "task", tok, "causal_lm") != before


def test_scenario_errors_survive_pickling():
    """A worker process's ScenarioError reaches the parent intact (multiprocessing and Ray pickle exceptions; one
    that cannot be rebuilt from its pickle hangs a multiprocessing pool)."""
    e = pickle.loads(pickle.dumps(ScenarioError("data.source", "no rows", "add rows")))
    assert (e.field, e.problem, e.fix, str(e)) == ("data.source", "no rows", "add rows", "data.source: no rows "
                                                                                        "(fix: add rows)")
