"""Kill the driver with SIGKILL at a random round, resume, and get exactly the uninterrupted run's metrics."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import outlived, reaped

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario

COMPARED = ("train/loss", "eval/loss", "eval/accuracy", "comm/total_up_params", "comm/total_down_params",
            "clients/sampled", "eval/personal/accuracy", "eval/personal/loss")


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["flora", "fedsa", "pf2lora"])
def test_sigkill_then_resume_equals_uninterrupted(tiny_raw, tmp_path, strategy):
    """FLoRA: merged base versions and per-client extras; FedSA-LoRA: personal B factors in the client state store;
    PF2LoRA: whole personal adapters, in a store under ``clients.state_dir`` shared by both runs."""
    tiny_raw.update(rounds=5, strategy={"name": strategy})
    if strategy == "flora":
        tiny_raw["clients"]["lora"] = {"tiers": [{"fraction": 0.5, "rank": 2}, {"fraction": 0.5, "rank": 4}]}
    else:
        tiny_raw["eval"]["local_test_fraction"] = 0.25
        tiny_raw["clients"]["state_budget_mb"] = 0.01  # spill most personal states to disk
        # checkpoints every 2 rounds and a kill after an odd round: the store's files are then ahead of the
        # checkpoint, so resuming must restore the checkpoint's snapshot of the client state
        tiny_raw["checkpoint"] = {"every": 2}
        if strategy == "pf2lora":
            tiny_raw["clients"]["state_dir"] = str(tmp_path / "state")
    reference = tmp_path / "reference"
    run_scenario(scenario_from_dict(tiny_raw), reference)

    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(tiny_raw))
    out = tmp_path / "killed"
    kill_after = int(np.random.default_rng().integers(1, 5))  # any round must do
    if strategy != "flora":
        kill_after = int(np.random.default_rng().choice([1, 3]))
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", str(scenario), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        path = out / "metrics.jsonl"
        if path.exists() and any(json.loads(x)["round"] >= kill_after for x in path.read_text().splitlines()
                                 if x.strip().endswith("}")):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists(), "the run finished before it was killed"

    r = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", "--resume", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    a, b = _rows(reference), _rows(out)
    assert [x["round"] for x in b] == [0, 1, 2, 3, 4, 5], f"killed after round {kill_after}"
    for ra, rb in zip(a, b):
        for k in COMPARED:
            assert ra.get(k) == rb.get(k), (kill_after, ra["round"], k)
    ref_summary = json.loads((reference / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    assert got["final/eval/loss"] == ref_summary["final/eval/loss"]


def test_resume_errors(tmp_path, tiny_raw):
    r = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", "--resume", str(tmp_path)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "no scenario.yaml" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", "--resume", str(tmp_path), "--set", "rounds=3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "give only the run directory" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_on_ray_stop_cleanly(tiny_raw, tmp_path, sig):
    """A scheduler's SIGTERM ends a Ray-backed run like Ctrl-C: 'interrupted', exit 130, no native stack dump
    (Ray's core worker installs one), and no Ray process of the run left behind. The run cannot end by itself
    before the signal (a million rounds), and the signal goes once it has written a checkpoint: a busy machine only
    makes it come later."""
    tiny_raw.update(rounds=1_000_000)
    tiny_raw["resources"]["backend"] = "ray"
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(tiny_raw))
    import tempfile

    out, ray_tmp = tmp_path / "run", tempfile.mkdtemp(prefix="fsig-")  # short: Ray's socket paths must stay short
    env = {**os.environ, "FEDSIM_RAY_TMPDIR": str(ray_tmp)}
    # Ctrl-C's default action in the child, whatever this process inherited: a test runner started in the
    # background of a non-interactive shell (`pytest ... &`, nohup) ignores SIGINT, and so would the run — which then
    # goes on after the signal (the "exit 0 instead of 130" of #44)
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", str(scenario), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    with reaped(proc, ray_tmp):
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (out / "checkpoint").exists():
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert err.strip().splitlines()[-1] == "interrupted"
        assert "SIGTERM received" not in err and "Traceback" not in err
        assert not outlived(ray_tmp), "Ray processes outlived the run"
    import shutil

    shutil.rmtree(ray_tmp, ignore_errors=True)
