"""W&B as its users expect, checked by reading the offline run files back (wandb's own protobuf records): a resumed
run is one run (same id, no gap, no step twice), the adapter is a `model` artifact, the partition heatmap an image,
the per-client tables tables, and a sweep's points share a group and carry the swept keys in their config."""

from __future__ import annotations

import json

import pytest
import wandb_files as W

from fedsim import checkpoint
from fedsim.config import scenario_from_dict
from fedsim.driver import resume_run, run_scenario


@pytest.fixture
def offline(tiny_raw, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tiny_raw["logging"]["wandb"] = {"mode": "offline", "project": "fedsim-test"}
    return tiny_raw


def test_a_resumed_run_is_one_wandb_run(offline, tmp_path, monkeypatch):
    offline["eval"]["local_test_fraction"] = 0.25
    offline["eval"].update(metrics=["exact_match"], generate={"every": 1, "max_samples": 4, "log_samples": 3,
                                                              "max_new_tokens": 4, "personal": False})
    offline["strategy"] = {"name": "fedsa"}
    real = checkpoint.save

    def interrupted(run_dir, server_round, *a, **k):
        if server_round == 2:  # round 2 is logged (metrics and W&B), its checkpoint never written
            raise KeyboardInterrupt
        return real(run_dir, server_round, *a, **k)

    monkeypatch.setattr(checkpoint, "save", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # rounds=3 as --set gives it: the W&B names say so
        run_scenario(scenario_from_dict(offline, ["rounds=3"]), out)
    monkeypatch.setattr(checkpoint, "save", real)
    resume_run(out)

    files = W.run_files(out)
    assert len(files) == 2, files  # one offline segment per process
    runs = W.of_type(out, "run")
    assert len({r.run.run_id for r in runs}) == 1  # the same run, resumed
    assert {r.run.display_name for r in runs} == {"tiny-rounds=3"} and set(runs[0].run.tags) >= {"fedsa"}
    steps = [row["_step"] for row in W.history(out)]
    assert steps == [0, 1, 2, 3], steps  # no gap and no step twice (round 2 ran again, but was sent once)
    logged = {row["_step"]: row for row in W.history(out)}
    metrics = {r["round"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    for step, row in logged.items():
        assert row["eval/accuracy"] == pytest.approx(metrics[step]["eval/accuracy"])
    assert logged[0]["partition/_type"] == "image-file"  # the heatmap, with the first row
    # each round's generations: a table with its row, and 3 lines of generations.jsonl (round 2's once: its
    # lines from before the interruption were dropped when the run resumed)
    assert all(logged[r]["eval/generations/_type"] == "table-file" for r in (1, 2, 3))
    kept = [json.loads(x)["round"] for x in (out / "generations.jsonl").read_text().splitlines()]
    assert kept == [1, 1, 1, 2, 2, 2, 3, 3, 3]

    arts = [a for a in W.of_type(out, "artifact") if a.artifact.type == "model"]
    assert [a.artifact.name for a in arts] == ["tiny-rounds-3-adapter"]
    assert {f.path for f in arts[0].artifact.manifest.contents} >= {"adapter_config.json",
                                                                    "adapter_model.safetensors"}
    summary = {item.key: json.loads(item.value_json) for rec in W.of_type(out, "summary")
               for item in rec.summary.update}
    assert summary["clients"]["_type"] == "table-file" and summary["personalized"]["_type"] == "table-file"


def test_sweep_points_share_a_group_and_carry_the_swept_keys(offline, tmp_path):
    import yaml

    from fedsim.sweep import run_sweep

    offline.update(rounds=1)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(offline))
    rows = run_sweep(path, ["clients.num_clients=4,6"], [], tmp_path / "sweep")
    groups, swept = set(), []
    for row in rows:
        run = W.of_type(row["run_dir"], "run")[0].run
        groups.add(run.run_group)
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        clients = config["clients"].get("value", config["clients"])  # as wandb nests it, or not
        swept.append(clients["num_clients"])
        env = config["environment"].get("value", config["environment"])
        assert env["packages"]["transformers"] and env["torch"]["build"]  # the environment in the W&B config
    group = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["group"]
    assert groups == {group} and group.startswith("sweep-") and swept == [4, 6]  # one group of their own


def test_wandb_history_survives_sigkill(offline, tmp_path):
    """kill -9 can leave W&B's offline file without the last rows (even without any: only its header), although
    wandb.log was called for them: the resume sends exactly what the files lack — no gap, no step twice."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    offline.update(rounds=8)  # killed after round 2: six rounds of margin for a test process a busy machine delays
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(offline))
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", str(scenario), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and (checkpoint.last_round(out) or 0) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it was killed"
    r = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", "--resume", str(out)], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    steps = sorted(row["_step"] for row in W.history(out))
    assert steps == list(range(9)), steps
    metrics = {r["round"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    for row in W.history(out):
        assert row["eval/accuracy"] == pytest.approx(metrics[row["_step"]]["eval/accuracy"])


def test_a_run_named_after_a_long_set_keeps_its_wandb_summary_tables_and_adapter(offline, tmp_path):
    """#45 point 14: a run named after a long --set (the documented offline recipe for the paper scenarios) lost its W&B
    summary, tables and adapter — the artifact's name passed W&B's 128 characters and one failure dropped all three —
    while the console said 'done'. The name is cut (with a digest of the whole) and each step stands alone."""
    from fedsim.federation.artifacts import artifact_name

    offline.update(rounds=1)
    long = [f"data.synthetic.num_train={240}", "training.local_steps=2", "eval.batch_size=16", "clients.lora.alpha=8",
            "partition.min_samples=5", "training.lr=0.005", "clients.per_round=3", "training.batch_size=8",
            "data.max_seq_len=24", "partition.alpha=1.0"]
    summary = run_scenario(scenario_from_dict(offline, long), tmp_path / "run")
    notes = [n for n in summary.get("notes", []) if not n.startswith("aggregation: ")]  # the path auto took
    assert not notes, notes
    arts = [a for a in W.of_type(tmp_path / "run", "artifact") if a.artifact.type == "model"]
    import re

    assert len(arts) == 1 and len(arts[0].artifact.name) <= 128
    assert re.search(r"-[0-9a-f]{8}-adapter$", arts[0].artifact.name)  # it was cut: the name is that long
    assert W.of_type(tmp_path / "run", "summary")
    a, b = artifact_name("r" * 300), artifact_name("r" * 299)
    assert len(a) <= 128 and len(b) <= 128 and a != b and artifact_name("short") == "short-adapter"
