import json

import numpy as np
import pytest
from conftest import news_data

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
    tiny_raw["data"] = news_data(tmp_path, rows=50, test_fraction=0.2)
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


def _local(tiny_raw, path, **data):
    tiny_raw["data"] = {"source": str(path), **data}
    return scenario_from_dict(tiny_raw)


@pytest.mark.parametrize("name,content,match", [
    ("empty.jsonl", b"", "the file is empty"),
    ("blank.jsonl", b"\n  \n", "the file is empty"),
    ("latin1.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n', r"not UTF-8 text \(byte 0xe9 at offset 20\)"),
    ("bin.csv", b"\xff\xfe\x00\x01garbage", r"not a CSV table \(it holds binary data"),
    ("latin1.csv", b"text,label\ncaf\xe9,1\n", r"not UTF-8 text \(byte 0xe9 at offset 14\)"),
    ("nul.csv", b"text,label\nab\x00cd,1\n", "not a CSV table .*NUL byte at offset 13"),
    ("cut.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "c", \n', "line 2 is not JSON"),
    ("list.jsonl", b'[1, 2]\n', "line 1 is a JSON list, not an object"),
    ("fake.parquet", b"hello", "not a Parquet file"),
])
def test_bad_data_files_say_what_is_wrong(tmp_path, tiny_raw, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        D.load_data(_local(tiny_raw, tmp_path / name, format="classification" if "csv" in name else "instruction",
                           prompt_template="{text}\n" if "csv" in name else None), use_cache=False)
    assert "StopIteration" not in str(e.value) and "DatasetGenerationError" not in str(e.value)


def test_every_row_needs_its_fields(tmp_path, tiny_raw):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    del rows[7]["output"]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl row 8 has no value for 'output'"):
        D.load_data(_local(tiny_raw, tmp_path / "t.jsonl"), use_cache=False)
    rows[7]["output"] = None
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match="row 8 has no value for 'output'"):
        D.load_data(_local(tiny_raw, tmp_path / "t.jsonl"), use_cache=False)
    # a CSV whose label cell is empty (NaN to pandas) must not become a class named "None"/"nan"
    (tmp_path / "c.csv").write_text("text,label\n" + "".join(f"t{i},{'' if i == 4 else i % 2}\n" for i in range(20)))
    with pytest.raises(DataError, match="row 5 has no value for 'label'"):
        D.load_data(_local(tiny_raw, tmp_path / "c.csv", format="classification", prompt_template="{text}\n",
                           task_field=None), use_cache=False)


def test_columns_that_do_not_match_the_csv(tmp_path, tiny_raw):
    body = "".join(f'{1 + i % 2},"title {i}","text {i}"\n' for i in range(20))
    kw = dict(format="classification", prompt_template="{title}: {body}\n", task_field=None)
    (tmp_path / "h.csv").write_text('label,title,body\n' + body)
    with pytest.raises(DataError, match="starts with a header row .*remove data.columns"):
        D.load_data(_local(tiny_raw, tmp_path / "h.csv", columns=["label", "title", "body"], **kw), use_cache=False)
    (tmp_path / "h2.csv").write_text('class,headline,description\n' + body)  # another header, same width
    with pytest.raises(DataError, match="starts with a header row"):
        D.load_data(_local(tiny_raw, tmp_path / "h2.csv", columns=["label", "title", "body"], **kw), use_cache=False)
    (tmp_path / "n.csv").write_text(body)
    with pytest.raises(DataError, match="3 column.* but data.columns names 2"):
        D.load_data(_local(tiny_raw, tmp_path / "n.csv", columns=["label", "title"], **kw), use_cache=False)


def test_an_edited_data_file_is_read_again(tmp_path, tiny_raw, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "t.jsonl"
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tiny_raw["partition"] = {"method": "iid"}
    sc = _local(tiny_raw, path)
    first = D.load_data(sc)
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.npz"))) == 1
    st = path.stat()
    path.write_text(path.read_text().replace('"a3"', '"b3"'))  # same size, same mtime: only the contents tell
    import os

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = D.load_data(sc)
    assert np.concatenate([first.train.ids, first.test.ids]).tolist() != np.concatenate(
        [second.train.ids, second.test.ids]).tolist()
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.npz"))) == 2
