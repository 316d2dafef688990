"""The second hostile pass (issue #31), each case reproduced as it was found: nothing lost on resume, a run
directory deleted mid-run, unbounded ranks, export of an edited run, YAML merge keys, a real damaged cache, odd data
paths, deep nesting, the fallback checkpoint kept, symlinks where fedsim writes."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fill_disk, outlived, reaped

from fedsim import checkpoint
from fedsim.config import load_scenario, scenario_from_dict
from fedsim.driver import resume_run, run_scenario
from fedsim.errors import FedsimError, ScenarioError
from fedsim.federation.callbacks import RoundCallback

COMPARED = ("train/loss", "eval/loss", "eval/accuracy", "comm/total_up_params")


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 3-round run to damage copies of (checkpoint of round 3, previous of round 2)."""
    from conftest import TINY

    raw = copy.deepcopy(TINY)
    raw.update(rounds=3)
    raw["clients"]["per_round"] = 2
    raw["training"]["local_steps"] = 2
    path = tmp_path_factory.mktemp("second-pass") / "reference"
    run_scenario(scenario_from_dict(raw), path)
    return raw, path


def _killed_after(finished, tmp_path, last_round):
    """A copy of the run as if killed after ``last_round``'s checkpoint (with the later rows still in the file)."""
    out = tmp_path / "run"
    shutil.copytree(finished[1], out)
    (out / "summary.json").unlink()
    if last_round == 2:  # the checkpoint of round 3 never made it: round 2's is the newest
        shutil.rmtree(out / "checkpoint")
        os.replace(out / ".checkpoint.prev", out / "checkpoint")
    return out


# -- 1. resume keeps every readable row ------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", [b"{\"round\": 1, \"train/lo", b"null", b"\xff\xfe not utf-8",
                                    b"{\"round\": \"2\"}", b"[1, 2]"])
def test_resume_keeps_every_readable_row_and_the_file_as_it_was(finished, tmp_path, damage):
    out = _killed_after(finished, tmp_path, 2)
    path = out / "metrics.jsonl"
    lines = path.read_bytes().splitlines()
    original = b"\n".join(lines[:2] + [damage] + lines[2:]) + b"\n"  # a broken line 3, valid rows after it
    path.write_bytes(original)
    resume_run(out)
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for a, b in zip(_rows(finished[1]), rows):  # totals rebuilt from every row: the same as uninterrupted
        for k in COMPARED:
            assert a.get(k) == b.get(k), (a["round"], k)
    assert (out / "metrics.jsonl.orig").read_bytes() == original  # what was not understood is kept
    summary = json.loads((out / "summary.json").read_text())
    assert any("line 3" in n and "metrics.jsonl.orig" in n for n in summary["notes"])


def test_resume_without_metrics_has_no_made_up_initial_accuracy(finished, tmp_path):
    out = _killed_after(finished, tmp_path, 2)
    (out / "metrics.jsonl").unlink()
    summary = resume_run(out)
    assert summary["initial/eval/accuracy"] is None
    assert [r["round"] for r in _rows(out)] == [3]


def test_resume_with_a_directory_in_place_of_metrics_is_one_line(finished, tmp_path):
    out = _killed_after(finished, tmp_path, 2)
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()
    with pytest.raises(ScenarioError, match="metrics.jsonl is not a file"):
        resume_run(out)


# -- 3. the run directory deleted mid-run ----------------------------------------------------------------------------
class _DeleteRunDir(RoundCallback):
    def __init__(self, run_dir):
        self.run_dir = run_dir

    def on_round_end(self, server_round, row):
        if server_round == 1:
            shutil.rmtree(self.run_dir)


def test_a_run_directory_deleted_mid_run_stops_the_run(tiny_raw, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FedsimError, match="was deleted, moved or replaced"):
        run_scenario(scenario_from_dict(tiny_raw), out, callbacks=[_DeleteRunDir(out)])
    assert not out.exists()  # nothing re-created behind the user's back


# -- 4. ranks of the strategies' own params are bounded by the layers -------------------------------------------------
@pytest.mark.parametrize("strategy, params", [("hetlora", {"max_rank": 100_000}),
                                              ("pf2lora", {"personal_rank": 100_000}),
                                              ("fedqlora", {"qa_rank": 100_000})])
def test_strategy_ranks_beyond_the_layers_are_refused(tiny_raw, strategy, params):
    from fedsim.federation.prepare import prepare

    tiny_raw.update(strategy={"name": strategy, "params": params})
    tiny_raw["eval"]["local_test_fraction"] = 0.2
    key = next(iter(params))
    with pytest.raises(ScenarioError, match=f"strategy.params.{key}: rank 100000 exceeds the smallest adapted"):
        prepare(scenario_from_dict(tiny_raw))


# -- 5. export and resume trust the checkpoint's record, and refuse a checkpoint without one -------------------------
def test_export_refuses_an_edited_scenario_yaml(finished, tmp_path):
    from fedsim.export import export_client

    out = _killed_after(finished, tmp_path, 3)
    text = (out / "scenario.yaml").read_text()
    (out / "scenario.yaml").write_text(text.replace("init_seed: 1234", "init_seed: 99"))
    with pytest.raises(ScenarioError, match="model.tiny.init_seed: 1234 → 99"):
        export_client(out, None, tmp_path / "export")


@pytest.mark.parametrize("remove", ["provenance", "meta_digest"])
def test_a_checkpoint_without_its_record_is_refused(finished, tmp_path, remove):
    out = _killed_after(finished, tmp_path, 2)
    meta_path = out / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.pop(remove)
    if remove == "provenance":  # a consistent digest: the record itself is what is missing
        meta.pop("meta_digest")
        import hashlib

        meta["meta_digest"] = hashlib.sha256(json.dumps(meta, indent=1).encode()).hexdigest()
    meta_path.write_text(json.dumps(meta, indent=1))
    with pytest.raises(ScenarioError, match="no record of the scenario|carries no digest"):
        resume_run(out)


# -- 14. --previous-checkpoint keeps the fallback it used ------------------------------------------------------------
def test_previous_checkpoint_does_not_replace_the_good_fallback(finished, tmp_path):
    out = _killed_after(finished, tmp_path, 3)
    with open(out / "checkpoint" / "state.safetensors", "r+b") as f:
        f.truncate(100)  # the newest (round 3) is damaged; round 2's is intact
    scen = out / "scenario.yaml"
    summary = resume_run(out, previous=True)
    assert summary["final/eval/accuracy"] is not None
    assert checkpoint.last_round(out) == 3 and (out / ".checkpoint.damaged").is_dir()
    assert json.loads((out / ".checkpoint.prev" / "meta.json").read_text())["round"] == 2  # not the damaged one
    assert scen.is_file()


# -- 6. YAML merge keys ------------------------------------------------------------------------------------------------
def test_yaml_merge_keys_are_standard_yaml(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("training: &t {local_steps: 3, batch_size: 4}\n"
                    "eval:\n  batch_size: 8\nclients:\n  lora: &l {rank: 4, alpha: 8}\n"
                    "resources: {backend: local}\n"
                    "rounds: 2\nname: merged\n")
    sc = load_scenario(path)
    path.write_text("base: &b {rank: 4, alpha: 8}\n")  # an unknown top-level key is still refused, merge or not
    with pytest.raises(ScenarioError, match="base: unknown key"):
        load_scenario(path)
    path.write_text("clients:\n  lora:\n    <<: {rank: 4, alpha: 8}\n    alpha: 12\nresources: {backend: local}\n")
    sc = load_scenario(path)
    assert sc.clients.lora.rank == 4 and sc.clients.lora.alpha == 12


# -- 10. a damaged tokenized cache is rebuilt ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_cache_entry_is_rebuilt(tiny_raw, damage):
    from fedsim.data import cache
    from fedsim.data.datasets import cache_entry, load_data

    sc = scenario_from_dict(tiny_raw)
    first = load_data(sc)
    _, tok, path, key = cache_entry(sc)
    if damage == "garbage":
        path.write_bytes(b"not a zip file at all")  # BadZipFile
    else:
        path.write_bytes(path.read_bytes()[:200])  # cut short
    again = load_data(sc)
    assert np.array_equal(first.train.ids, again.train.ids)
    assert np.array_equal(cache.load(path, key, len(tok)).train.ids, first.train.ids)  # the entry was rewritten whole


# -- 13. odd data paths and deep nesting --------------------------------------------------------------------------------
def test_a_fifo_or_a_folder_among_data_files_is_one_line(tiny_raw, tmp_path):
    from fedsim.data.datasets import load_data

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    (folder / "b.jsonl").mkdir()
    tiny_raw["data"] = {"source": str(folder), "task_field": None}
    tiny_raw["partition"] = {"method": "iid"}
    with pytest.raises(ScenarioError, match="b.jsonl' is not a regular file"):
        load_data(scenario_from_dict(tiny_raw), use_cache=False)
    (folder / "b.jsonl").rmdir()
    os.mkfifo(folder / "c.jsonl")  # reading it would block forever
    with pytest.raises(ScenarioError, match="c.jsonl' is not a regular file"):
        load_data(scenario_from_dict(tiny_raw), use_cache=False)


@pytest.mark.parametrize("where", ["file", "override"])
def test_deep_nesting_is_one_line(tmp_path, where):
    deep = "[" * 3000 + "]" * 3000
    with pytest.raises(ScenarioError, match="nested too deeply"):
        if where == "file":
            (tmp_path / "d.yaml").write_text(f"name: {deep}\n")
            load_scenario(tmp_path / "d.yaml")
        else:
            scenario_from_dict({}, [f"name={deep}"])


# -- 15. symlinks where fedsim writes, and an --out holding other files ----------------------------------------------
def test_symlinks_in_the_run_directory_are_refused(tiny_raw, tmp_path, finished):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "scenario.yaml").symlink_to(victim)
    with pytest.raises(ScenarioError, match="scenario.yaml is a symbolic link"):
        run_scenario(scenario_from_dict(tiny_raw), out)
    resumed = _killed_after(finished, tmp_path, 2)
    (resumed / ".lock").unlink()
    (resumed / ".lock").symlink_to(victim)
    with pytest.raises(ScenarioError, match=".lock is a symbolic link"):
        resume_run(resumed)
    assert victim.read_text() == "precious"


def test_an_out_holding_other_files_is_refused(tiny_raw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ScenarioError, match="holds files fedsim did not write"):
        run_scenario(scenario_from_dict(tiny_raw), out)
    quickstart = Path(__file__).resolve().parents[2] / "scenarios" / "quickstart.yaml"
    r = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", str(quickstart), "--out", str(out), "--set",
                        "resources.backend=local"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "holds files fedsim did not write" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# -- 8. a full disk, for real: a size-limited tmpfs (else the library's own exception) --------------------------------
@pytest.mark.parametrize("when", ["checkpoint", "metrics", "adapter"])
def test_a_full_disk_ends_the_run_in_one_line_and_loses_nothing(tiny_raw, tmp_path, small_fs, monkeypatch, when):
    from safetensors import SafetensorError

    tiny_raw.update(rounds=3)
    sc = scenario_from_dict(tiny_raw)
    run_dir = (small_fs or tmp_path) / "run"
    real_save = checkpoint.save
    fill_after = {"checkpoint": 1, "metrics": 1, "adapter": 3}[when]

    def save_then_fill(path, server_round, *a, **k):
        if when == "checkpoint" and server_round == 2:
            if small_fs is None:  # no tmpfs here: the exception safetensors raises on a full disk
                raise_full = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                             'message: "No space left on device" })')
                monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(raise_full))
            else:
                fill_disk(run_dir)
        out = real_save(path, server_round, *a, **k)
        if server_round == fill_after and when != "checkpoint":
            if small_fs is None:
                pytest.skip("no tmpfs to fill on this machine")
            fill_disk(run_dir)
        return out

    monkeypatch.setattr(checkpoint, "save", save_then_fill)
    with pytest.raises(FedsimError) as e:
        run_scenario(sc, run_dir)
    msg = str(e.value)
    assert "No space left on device" in msg and "\n" not in msg, msg
    assert "--resume" in msg
    (run_dir / "filler").unlink(missing_ok=True)
    monkeypatch.setattr(checkpoint, "save", real_save)
    monkeypatch.undo()
    good = {"checkpoint": 1, "metrics": 1, "adapter": 3}[when]
    assert checkpoint.last_round(run_dir) == good
    summary = resume_run(run_dir)  # after the last round's checkpoint: the artifacts only
    reference = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "reference")
    assert summary["final/eval/loss"] == reference["final/eval/loss"]
    assert [r["round"] for r in _rows(run_dir)] == [0, 1, 2, 3]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (run_dir / "summary.json").is_file()


# -- 9. a worker killed during evaluation, a base sync or the statistics: replaced, the call retried -------------------
@pytest.mark.usefixtures("ray_session")
def test_a_worker_killed_outside_training_is_replaced_and_the_call_retried(tiny_raw, tmp_path):
    import ray

    from fedsim.runtime.ray.backend import RayBackend

    class Killing(RayBackend):
        """Kills worker 0 just before the first call of each kind the run makes outside training."""

        killed: list = []

        def _kill_once(self, what):
            if what not in Killing.killed:
                Killing.killed.append(what)
                ray.kill(self.actors[0], no_restart=True)

        def evaluate(self, payload, batches):
            self._kill_once("evaluate")
            return super().evaluate(payload, batches)

        def evaluate_clients(self, payload, items):
            self._kill_once("evaluate_clients")
            return super().evaluate_clients(payload, items)

        def sync_base(self, deltas):
            self._kill_once("sync_base")
            return super().sync_base(deltas)

        def worker_stats(self):
            self._kill_once("worker_stats")
            return super().worker_stats()

    tiny_raw.update(rounds=1, strategy={"name": "flora"})  # merges into the base: a base sync after round 1
    tiny_raw["eval"]["local_test_fraction"] = 0.2  # and each client's own evaluation
    local = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "local")
    killed = run_scenario(scenario_from_dict(tiny_raw, ["resources.backend=ray"]), tmp_path / "ray", Killing())
    assert sorted(Killing.killed) == ["evaluate", "evaluate_clients", "sync_base", "worker_stats"]
    for a, b in zip(_rows(tmp_path / "local"), _rows(tmp_path / "ray")):
        for k in ("train/loss", "eval/loss", "eval/accuracy", "eval/personal/accuracy"):
            assert a.get(k) == b.get(k), (a["round"], k)
    assert killed["final/eval/loss"] == local["final/eval/loss"]


# -- 11. W&B (offline) with an unwritable HOME: one line before round 1 ---------------------------------------------
def test_wandb_with_an_unwritable_home_fails_before_round_1(tiny_raw, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where HOME's directories would go")
    monkeypatch.setenv("HOME", str(blocker / "home"))
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    tiny_raw["logging"]["wandb"] = {"mode": "offline"}
    with pytest.raises(FedsimError, match="Weights & Biases would write to .*not writable.*set WANDB_"):
        run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or _rows(tmp_path / "run") == []


# -- 12. sweeps: every point runs, failures are rows, duplicates refused ------------------------------------------------
@pytest.mark.parametrize("parallel", [1, 2])
def test_a_failing_sweep_point_leaves_the_others_and_their_rows(tiny_raw, tmp_path, parallel):
    import csv

    import yaml

    from fedsim.sweep import run_sweep

    tiny_raw.update(rounds=1)
    tiny_raw["eval"]["at_start"] = False
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    with pytest.raises(FedsimError, match="1 of 2 sweep points failed.*rank-64: ScenarioError: .*exceeds the smallest"):
        run_sweep(path, ["clients.lora.rank=64,4"], out=tmp_path / "sweep", parallel=parallel)
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    by_rank = {r["clients.lora.rank"]: r for r in rows}
    assert set(by_rank) == {"64", "4"}
    assert "exceeds the smallest adapted dimension" in by_rank["64"]["error"]
    assert by_rank["4"]["error"] == "" and float(by_rank["4"]["final_accuracy"]) >= 0


def test_duplicate_sweep_points_are_refused_before_any_runs(tmp_path, tiny_raw):
    import yaml

    from fedsim.sweep import plan

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    with pytest.raises(ScenarioError, match="are the same scenario"):
        plan(path, ["rounds=1,1.0"])


# -- 13. partition --png: a folder, or not a .png ----------------------------------------------------------------------
def test_partition_png_into_a_folder_or_another_format(tmp_path, tiny_raw):
    import yaml

    from fedsim.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    folder = tmp_path / "pics"
    folder.mkdir()
    assert main(["partition", str(path), "--png", str(folder)]) == 0
    assert (folder / "tiny_partition.png").stat().st_size > 1000
    assert main(["partition", str(path), "--png", str(tmp_path / "x.txt")]) == 2
    assert not (tmp_path / "x.txt").exists()


# -- 13. an unreachable resources.address fails in seconds, naming what to check ----------------------------------------
def test_an_unreachable_cluster_is_one_line_in_seconds(tiny_raw, tmp_path):
    import time

    from fedsim.errors import BackendError

    t0 = time.perf_counter()
    with pytest.raises(BackendError, match="cannot reach the Ray cluster at '127.0.0.1:1'.*RAY_AUTH_MODE=token"):
        run_scenario(scenario_from_dict(tiny_raw, ["resources.backend=ray", "resources.address=127.0.0.1:1"]),
                     tmp_path / "run")
    assert time.perf_counter() - t0 < 60


# -- 13. SIGTERM while Ray starts: "interrupted", 130, nothing left -------------------------------------------------
def test_sigterm_while_ray_starts_is_an_interruption(tiny_raw, tmp_path):
    """Ray installs SIGTERM handlers of its own while it starts (``sys.exit(15)``, ``sys.exit(1)``): a scheduler's
    SIGTERM in that window ends the command as Ctrl-C does, after Ray's clean-up of what it had started."""
    import signal
    import tempfile
    import time

    import yaml

    tiny_raw["resources"]["backend"] = "ray"
    tiny_raw["rounds"] = 1_000_000  # the run cannot end by itself before the signal, however late it comes
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(tiny_raw))
    ray_tmp = tempfile.mkdtemp(prefix="fsu-")  # short: Ray's socket paths must stay short
    env = {**os.environ, "FEDSIM_RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", str(scenario), "--out", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with reaped(proc, ray_tmp):
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # Ray's GCS is up: the head is starting
            if subprocess.run(["pgrep", "-f", f"gcs_server.*{ray_tmp}"], capture_output=True).returncode == 0:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-2000:]
        assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
        assert not outlived(ray_tmp), "Ray processes outlived the interrupted start"
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_wandb_failure_at_the_end_never_costs_the_summary(tiny_raw, tmp_path, monkeypatch):
    from fedsim.tracking import Tracker

    def broken(self, tables):
        raise RuntimeError("wandb: could not stage the table (Permission denied)")

    monkeypatch.setattr(Tracker, "tables", broken)
    summary = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["final/eval/accuracy"] == summary["final/eval/accuracy"] is not None
    assert any("W&B could not record" in n for n in written["notes"])
