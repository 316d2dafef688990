"""Failures of the run directory end in one clear error and never lose results: damaged checkpoints (verified by
digest, with the previous one kept to resume from), a full disk while checkpointing, names that would escape runs/,
--out naming a file, and two runs in one directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import said

from fedsim import checkpoint
from fedsim.config import scenario_from_dict
from fedsim.driver import RunLock, resume_run, run_scenario
from fedsim.errors import FedsimError, ScenarioError

COMPARED = ("train/loss", "eval/loss", "eval/accuracy")


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 2-round run (checkpoints after rounds 1 and 2) to damage copies of."""
    import copy

    from conftest import TINY

    raw = copy.deepcopy(TINY)
    raw["clients"]["per_round"] = 2
    raw["training"]["local_steps"] = 2
    path = tmp_path_factory.mktemp("hardening") / "reference"
    run_scenario(scenario_from_dict(raw), path)
    return raw, path


def _copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[1], out)
    (out / "summary.json").unlink()  # as if killed after the last checkpoint
    return out


def test_a_damaged_checkpoint_is_named_and_the_previous_one_resumes(finished, tmp_path):
    out = _copy(finished, tmp_path)
    with open(out / "checkpoint" / "state.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ScenarioError) as e:
        resume_run(out)
    msg = str(e.value)
    assert "state.safetensors is corrupt or partial" in msg and "previous checkpoint (round 1) is intact" in msg
    assert "--previous-checkpoint" in msg
    r = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", "--resume", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(said(r.stderr)) == 1
    resume_run(out, previous=True)  # round 2 again, from round 1's checkpoint: the same numbers
    a, b = _rows(finished[1]), _rows(out)
    assert [x["round"] for x in b] == [0, 1, 2]
    for ra, rb in zip(a, b):
        for k in COMPARED:
            assert ra.get(k) == rb.get(k), (ra["round"], k)


@pytest.mark.parametrize("damage", ["truncate", "edit_round", "not_json"])
def test_a_damaged_meta_json_is_named(finished, tmp_path, damage):
    out = _copy(finished, tmp_path)
    meta = out / "checkpoint" / "meta.json"
    text = meta.read_text()
    if damage == "truncate":
        meta.write_text(text[: len(text) // 2])
    elif damage == "edit_round":
        meta.write_text(text.replace('"round": 2', '"round": -5'))
    else:
        meta.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ScenarioError, match="meta.json (is corrupt|was changed)") as e:
        resume_run(out)
    assert "previous checkpoint (round 1) is intact" in str(e.value)


def test_a_checkpoint_round_outside_the_run_is_refused(finished, tmp_path):
    out = _copy(finished, tmp_path)
    meta_path = out / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    import hashlib

    meta.pop("meta_digest")
    meta["round"] = 99  # e.g. a checkpoint of another, longer run, with a digest of its own (a digest-less one is
    meta["meta_digest"] = hashlib.sha256(json.dumps(meta, indent=1).encode()).hexdigest()  # refused as edited)
    meta_path.write_text(json.dumps(meta, indent=1))
    with pytest.raises(ScenarioError, match="says round 99, but the run has rounds 1..2"):
        resume_run(out)
    assert len(_rows(out)) == 3  # the metrics were not touched


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(finished, tmp_path, monkeypatch):
    raw = finished[0]
    calls = {"n": 0}
    real = checkpoint.save_file

    def flaky(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device", path)
        return real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", flaky)
    out = tmp_path / "full"
    with pytest.raises(FedsimError) as e:
        run_scenario(scenario_from_dict(raw), out)
    msg = str(e.value)
    assert "No space left on device" in msg and "round 1) is intact" in msg and "--resume" in msg
    assert not (out / ".checkpoint.tmp").exists()
    assert [x["round"] for x in _rows(out)] == [0, 1, 2]  # nothing already measured is lost
    monkeypatch.setattr(checkpoint, "save_file", real)
    resume_run(out)
    for ra, rb in zip(_rows(finished[1]), _rows(out)):
        for k in COMPARED:
            assert ra.get(k) == rb.get(k)


@pytest.mark.parametrize("name", [".", ".."])
def test_names_that_leave_runs_are_refused(tiny_raw, name):
    tiny_raw["name"] = name
    with pytest.raises(ScenarioError, match="outside"):
        scenario_from_dict(tiny_raw)


def test_out_naming_a_file_and_a_second_run_in_one_directory(tiny_raw, tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(ScenarioError, match="is a file"):
        run_scenario(scenario_from_dict(tiny_raw), afile)
    busy = tmp_path / "busy"
    busy.mkdir()
    lock = RunLock(busy)
    try:
        with pytest.raises(ScenarioError, match=f"in use by another fedsim run \\(pid {os.getpid()}\\)"):
            run_scenario(scenario_from_dict(tiny_raw), busy)
    finally:
        lock.release()
    assert not (busy / "metrics.jsonl").exists()


@pytest.mark.parametrize("text", ["rounds: 3\nrounds: 99\n", "clients: {num_clients: 4}\nseed: 1\nclients: {per_round: 2}\n",
                                  "model:\n  name: tiny\n  name: other\n"])
def test_duplicate_keys_in_a_scenario_file_are_an_error(tmp_path, text):
    from fedsim.config import load_scenario

    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match="appears twice in one section"):
        load_scenario(path)


def test_partition_png_into_an_unwritable_place_is_one_line(tiny_raw, tmp_path):
    import yaml

    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(tiny_raw))
    r = subprocess.run([sys.executable, "-m", "fedsim.cli", "partition", str(scenario), "--png",
                        str(tmp_path / "no" / "such" / "dir" / "p.png")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--png: cannot write" in r.stderr and "Traceback" not in r.stderr


def test_console_counts_the_recorded_successes():
    import io

    from fedsim.progress import Progress

    out = io.StringIO()
    p = Progress("plain", 3, stream=out)
    p.start_round(1, 5)
    for _ in range(5):
        p.client_done()  # the workers all returned ...
    p.end_round({"round": 1, "clients/sampled": 5, "clients/succeeded": 0, "time_s": 1.0})  # ... the server took none
    assert "clients 0/5" in out.getvalue()


def _edit_scenario(out, **changes):
    import yaml

    path = out / "scenario.yaml"
    sc = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = sc
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(yaml.safe_dump(sc))


def test_a_resume_with_a_changed_scenario_is_refused(finished, tmp_path):
    out = _copy(finished, tmp_path)
    _edit_scenario(out, clients__num_clients=7, strategy__name="flora")
    with pytest.raises(ScenarioError) as e:
        resume_run(out)
    msg = str(e.value)
    assert "clients.num_clients: 8 → 7" in msg and "strategy.name: 'fedit' → 'flora'" in msg
    assert "start a new run" in msg
    r = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", "--resume", str(out), "--allow-changed",
                        "strategy"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "'strategy' changes what the run computes" in r.stderr and "Traceback" not in r.stderr
    assert len(_rows(out)) == 3 and not (out / "summary.json").exists()  # nothing touched


def test_allow_changed_lets_logging_differ(finished, tmp_path):
    out = _copy(finished, tmp_path)
    _edit_scenario(out, logging__progress="plain", checkpoint__every=2)
    with pytest.raises(ScenarioError, match="pass --allow-changed checkpoint.every logging.progress"):
        resume_run(out)
    summary = resume_run(out, allow_changed=("logging", "checkpoint.every"))
    assert summary["final/eval/accuracy"] == json.loads((finished[1] / "summary.json").read_text())[
        "final/eval/accuracy"]


def test_a_resume_with_a_changed_data_file_is_refused(tiny_raw, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(30)))
    tiny_raw["data"] = {"source": str(data)}
    tiny_raw["partition"] = {"method": "iid"}
    sc = scenario_from_dict(tiny_raw)
    ck = tmp_path / "run" / "checkpoint"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text(json.dumps({"provenance": checkpoint.provenance(sc)}))
    checkpoint.check_resume(ck, sc)  # unchanged: accepted
    data.write_text(data.read_text().replace('"a7"', '"b7"'))
    with pytest.raises(ScenarioError, match=f"data file {data} changed since the checkpoint"):
        checkpoint.check_resume(ck, sc)
