"""The CLI end to end: a run directory with everything in it, clean errors, validate/partition/strategies."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import said
from tolerances import F32_NETWORK

from fedsim.cli import main
from fedsim.config import scenario_from_dict

SECRET = "fedsim-test-secret-0123456789abcdef0123456789abcdef"  # W&B keys are 40+ characters


def _fedsim(*args, cwd=None, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "fedsim.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.fixture
def tiny_yaml(tmp_path, tiny_raw):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    return path


def test_run_writes_a_complete_run_directory(tiny_yaml, tmp_path):
    out = tmp_path / "run"
    r = _fedsim("run", str(tiny_yaml), "--out", str(out), "--set", "logging.wandb.mode=offline",
                "--set", "logging.console=true",
                env_extra={"WANDB_MODE": None, "WANDB_API_KEY": SECRET})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "round 2/2" in r.stderr  # plain progress lines when not on a terminal
    starting = [line for line in r.stderr.splitlines() if line.startswith("fedsim: ")]
    assert [line.split()[1] for line in starting] == ["preparing", "building", "memory", "evaluating"], starting
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    for key in ("round", "time_s", "train/loss", "eval/loss", "eval/accuracy", "clients/sampled", "clients/failed",
                "comm/up_params", "comm/down_params"):
        assert key in rows[-1], key
    assert rows[-1]["clients/sampled"] == 3 and rows[-1]["clients/failed"] == 0
    # FedIT moves the whole adapter both ways: r·(d_in + d_out) per module (4 attention, 3 MLP), 3 clients
    assert rows[-1]["comm/up_params"] == rows[-1]["comm/down_params"] == 3 * 4 * (4 * (32 + 32) + 3 * (32 + 64))
    per_client = rows[-1]["comm/per_client"]
    assert len(per_client) == 3 and sum(v[0] for v in per_client.values()) == rows[-1]["comm/up_params"]
    assert all(v[1] == 4 * v[0] and v[2] == v[0] for v in per_client.values())  # float32; FedIT: down == up
    resolved = yaml.safe_load((out / "scenario.yaml").read_text())
    assert resolved["logging"]["wandb"]["mode"] == "offline" and resolved["training"]["optimizer"] == "adamw"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final/eval/accuracy"] == rows[-1]["eval/accuracy"]
    env = summary["environment"]  # what the result was computed with
    assert env["packages"]["torch"] and env["torch"]["build"] and env["torch"]["devices"] and env["python"]
    assert (out / "partition.png").stat().st_size > 1000
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline files belong in the run directory"
    assert (out / "adapter" / "adapter_config.json").exists()
    # the W&B key comes from the environment only and is never written anywhere in the run directory
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in r.stdout + r.stderr

    # the adapter loads with PEFT on the same base and reproduces the evaluated model
    from peft import PeftModel

    from fedsim.data.datasets import load_data
    from fedsim.driver import Driver  # noqa: F401  (import check of the public driver)
    from fedsim.models.base import build_base_model

    sc = scenario_from_dict(yaml.safe_load(tiny_yaml.read_text()))
    model = PeftModel.from_pretrained(build_base_model(sc.model), str(out / "adapter"))
    data = load_data(sc)
    from fedsim.eval.metrics import reduce_eval
    from fedsim.eval.scoring import evaluate_batch

    bs = sc.eval.batch_size
    import numpy as np

    parts = [evaluate_batch(model, data, np.arange(s, min(s + bs, len(data.test))), torch.device("cpu"))
             for s in range(0, len(data.test), bs)]
    assert reduce_eval(parts)["eval/accuracy"] == rows[-1]["eval/accuracy"]
    assert abs(reduce_eval(parts)["eval/loss"] - rows[-1]["eval/loss"]) < F32_NETWORK


def test_hub_loading_path_on_a_local_directory(tiny_raw, tmp_path):
    """model.name as a directory goes through from_pretrained (the code users hit with hub ids)."""
    from fedsim.driver import run_scenario
    from fedsim.models.base import build_base_model, load_tokenizer

    sc = scenario_from_dict(tiny_raw)
    build_base_model(sc.model).save_pretrained(tmp_path / "tiny-llama")
    load_tokenizer(sc.model).save_pretrained(tmp_path / "tiny-llama")
    tiny_raw["rounds"] = 1
    a = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "a")
    b = run_scenario(scenario_from_dict(tiny_raw, [f"model.name={tmp_path / 'tiny-llama'}"]), tmp_path / "b")
    assert a["final/eval/loss"] == pytest.approx(b["final/eval/loss"], rel=F32_NETWORK)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("bogus_key=1", "bogus_key: unknown key"),
        ("clients.lora.alpha=0", "clients.lora.alpha"),
        ("rounds=abc", "rounds"),
        ("clients.num_clients=100000", "clients.num_clients"),
        ("data.source=/no/such/file.jsonl", "no data file"),
        ("strategy.name=magic", "unknown strategy 'magic'"),
        ("partition.method=natural", "num_clients"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_yaml, override, expected, capsys):
    """In this process (``main`` is what the console script, ``entry``, calls; an escaping exception would fail the test): the
    command line as a process is checked by the tests around it."""
    assert main(["validate", str(tiny_yaml), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    assert len(err.strip().splitlines()) == 1


def test_validate_partition_and_strategies(tiny_yaml, tmp_path):
    r = _fedsim("validate", str(tiny_yaml))
    assert r.returncode == 0 and r.stdout.startswith("ok:")
    assert "  aggregation: " in r.stdout and "  memory (estimated peak): worker (each of " in r.stdout  # #50 point 3
    png = tmp_path / "split.png"
    r = _fedsim("partition", str(tiny_yaml), "--png", str(png))
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 1000
    lines = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("│")]
    assert len(lines) >= 8  # one row per client
    r = _fedsim("strategies")
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert r.returncode == 0 and names == ["feddpa", "fedex", "fedit", "fedqlora", "fedsa", "ffa", "flexlora", "flora", "hetlora", "local",
                                         "pf2lora"]


def test_missing_scenario_file(tmp_path):
    r = _fedsim("run", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_sweeps_run_every_point_tabulate_and_parallel_ones_give_the_sequential_results(tiny_yaml, tmp_path):
    """A sequential sweep over a 2 × 2 grid; then --parallel 2 over half of it — processes with the local backend,
    Ray tasks (each point's driver) with the Ray backend — gives the same numbers."""
    import csv

    out = tmp_path / "sweep"
    r = _fedsim("sweep", str(tiny_yaml), "--grid", "clients.num_clients=4,8", "--grid", "training.local_steps=1,2",
                "--set", "rounds=1", "--set", "eval.at_start=false", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(x["clients.num_clients"], x["training.local_steps"]) for x in rows] == [
        ("4", "1"), ("4", "2"), ("8", "1"), ("8", "2")]
    for x in rows:
        resolved = yaml.safe_load((tmp_path / "sweep" / x["run_dir"].split("/")[-1] / "scenario.yaml").read_text())
        assert resolved["clients"]["num_clients"] == int(x["clients.num_clients"])
        assert resolved["logging"]["wandb"]["group"].startswith("sweep-") and resolved["rounds"] == 1
        assert float(x["comm_params"]) > 0 and 0.0 <= float(x["final_accuracy"]) <= 1.0
    assert (out / "sweep.png").stat().st_size > 1000
    seq = [x for x in rows if x["training.local_steps"] == "1"]
    for backend in ("local", "ray"):
        r = _fedsim("sweep", str(tiny_yaml), "--grid", "clients.num_clients=4,8", "--set", "rounds=1",
                    "--set", "eval.at_start=false", "--set", "training.local_steps=1", "--parallel", "2",
                    "--set", f"resources.backend={backend}", "--set", "resources.num_workers=1",
                    "--out", str(tmp_path / f"par-{backend}"))
        assert r.returncode == 0, r.stderr
        par = list(csv.DictReader(open(tmp_path / f"par-{backend}" / "sweep.csv")))
        assert [x["clients.num_clients"] for x in par] == ["4", "8"]
        for a, b in zip(seq, par):
            assert a["final_loss"] == b["final_loss"] and a["comm_params"] == b["comm_params"], backend


def test_sweep_validates_every_point_before_running(tiny_yaml, tmp_path):
    r = _fedsim("sweep", str(tiny_yaml), "--grid", "clients.lora.alpha=8,-1", "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "point alpha=-1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()
    r = _fedsim("sweep", str(tiny_yaml), "--grid", "rounds")
    assert r.returncode == 2 and "no '='" in r.stderr


@pytest.mark.parametrize("name", ["quickstart", "hetero_ranks", "personalized", "mixed_precision", "scale", "alpaca",
                                  "chat", "compressed", "async"])
def test_every_shipped_scenario_runs(name, tmp_path, capsys):
    """Each scenario in scenarios/ validates (what `fedsim validate` runs) and runs one short round, in this process
    (the command line itself is tested above: two processes per scenario cost ~10 s each)."""
    import argparse

    import fedsim
    from fedsim.cli import _cmd_validate

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scenarios", f"{name}.yaml")
    assert _cmd_validate(argparse.Namespace(scenario=path, overrides=[])) == 0
    assert capsys.readouterr().out.startswith("ok:")
    fedsim.run(path, overrides=["rounds=1", "training.local_steps=2", "resources.backend=local",
                                "logging.wandb.mode=disabled", "eval.at_start=false"], out=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final/eval/accuracy"] is not None
    assert (tmp_path / "run" / "clients.csv").exists()


def test_output_is_quiet_unless_verbose(tiny_raw, tmp_path):
    """No datasets progress bars, library notices or warnings in validate/run output; --verbose shows them."""
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny_raw["data"] = {"source": str(tmp_path / "d.jsonl")}
    tiny_raw["partition"] = {"method": "iid"}
    tiny_raw["clients"]["quant"] = {"bits": 4, "backend": "bnb"}  # bitsandbytes' CPU path, with its notices
    from fedsim.models.base import build_base_model, load_tokenizer

    sc = scenario_from_dict(tiny_raw)  # a model directory: from_pretrained and its "Loading weights" bar
    build_base_model(sc.model).save_pretrained(tmp_path / "model")
    load_tokenizer(sc.model).save_pretrained(tmp_path / "model")
    tiny_raw["model"] = {"name": str(tmp_path / "model")}
    tiny_raw.update(rounds=1)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    env = {**os.environ, "FEDSIM_CACHE_DIR": str(tmp_path / "cache")}  # a cold cache: data is read
    for cmd in (["validate", str(path)], ["run", str(path), "--out", str(tmp_path / "run")]):
        r = subprocess.run([sys.executable, "-m", "fedsim.cli", *cmd], capture_output=True, text=True, env=env,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        noise = [line for line in r.stderr.splitlines() if line.strip()]
        assert not noise, noise
    env["FEDSIM_CACHE_DIR"] = str(tmp_path / "cache2")
    r = subprocess.run([sys.executable, "-m", "fedsim.cli", "validate", str(path), "--verbose"], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0 and "Generating train split" in r.stderr


_EARLY_PROBE = """
import json, sys
from fedsim.runtime.ray import pool as ray_pool
calls = []
real = ray_pool.launch_pool
def spy(scenario):
    calls.append("torch" in sys.modules)
    return real(scenario)
ray_pool.launch_pool = spy
from fedsim.cli import main
rc = main(sys.argv[1:])
import ray
print(json.dumps({"rc": rc, "torch_at_launch": calls, "ray_up": ray.is_initialized()}))
"""


def test_run_on_ray_starts_the_workers_before_torch_is_imported(tiny_yaml, tmp_path):
    """`fedsim run` on the Ray backend creates the worker actors once, before the driver imports torch (the
    workers import theirs meanwhile); the run adopts them and gives the local backend's numbers."""
    out = tmp_path / "ray"
    code = subprocess.run([sys.executable, "-c", _EARLY_PROBE, "run", str(tiny_yaml), "--out", str(out),
                           "--set", "resources.backend=ray", "--set", "rounds=1", "--set", "logging.console=true"],
                          capture_output=True, text=True, timeout=600)
    assert code.returncode == 0, code.stderr
    probe = json.loads(code.stdout.strip().splitlines()[-1])
    assert probe == {"rc": 0, "torch_at_launch": [False], "ray_up": False}  # one pool, started torch-free
    # the start-up says what it is doing, in order, before round 0 (#45 point 18)
    said_first = [line for line in code.stderr.splitlines() if line.startswith(("fedsim: ", "round 0"))]
    assert [line.split(":")[1].split()[0] if line.startswith("fedsim") else "round" for line in said_first] == \
        ["starting", "loading", "2", "preparing", "waiting", "memory", "evaluating", "round"], said_first
    assert "2 Ray worker(s) (1 CPU each) starting up" in code.stderr
    r = _fedsim("run", str(tiny_yaml), "--out", str(tmp_path / "local"), "--set", "rounds=1")
    assert r.returncode == 0, r.stderr
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    local = [json.loads(x) for x in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["eval/loss"] == local["eval/loss"] and last["train/loss"] == local["train/loss"]


def test_a_strategy_error_after_the_early_start_is_one_line_and_stops_ray(tiny_yaml, tmp_path):
    """The strategy checks come after the workers are started: their error is the usual one line, and the pool and
    the Ray instance it started are shut down."""
    code = subprocess.run([sys.executable, "-c", _EARLY_PROBE, "run", str(tiny_yaml), "--out", str(tmp_path / "r"),
                           "--set", "resources.backend=ray", "--set", "strategy.params.bogus=1"],
                          capture_output=True, text=True, timeout=600)
    assert code.returncode == 0, code.stderr
    probe = json.loads(code.stdout.strip().splitlines()[-1])
    assert probe == {"rc": 2, "torch_at_launch": [False], "ray_up": False}
    lines = said(code.stderr)  # after the start-up lines (starting Ray, loading torch), one line
    assert len(lines) == 1 and lines[0].startswith("error: ") and "strategy.params" in lines[0] and "bogus" in lines[0]
    assert "Traceback" not in code.stderr
    assert not (tmp_path / "r").exists()
