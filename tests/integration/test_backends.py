"""Local and Ray backends: same scenario and seed → identical metrics; workers cache their model."""

import csv
import json
import os

import pytest
from tolerances import F32_NETWORK

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario
from fedsim.runtime.ray.backend import RayBackend

COMPARED = ("train/loss", "eval/loss", "eval/accuracy", "comm/up_params", "comm/down_params", "clients/sampled")


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


class _Recording(RayBackend):
    """Records where the server went and when the backend was launched and started, relative to the data."""

    events: list = []

    def launch(self, scenario):
        if not self.actors:  # start() calls it too; it starts the workers only once
            _Recording.events.append("launch")
        super().launch(scenario)

    def start(self, scenario, data, spec, components):
        _Recording.events.append("start")
        handle = super().start(scenario, data, spec, components)
        _Recording.events.append(type(handle).__name__)
        return handle


@pytest.mark.usefixtures("shared_ray")
def test_local_and_ray_give_identical_metrics(tiny_raw, tmp_path, monkeypatch):
    import fedsim.driver

    local = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "local")
    real_prepare = fedsim.driver.prepare
    monkeypatch.setattr(fedsim.driver, "prepare",
                        lambda sc, *more: _Recording.events.append("prepare") or real_prepare(sc, *more))
    _Recording.events = []
    ray_sum = run_scenario(scenario_from_dict(tiny_raw, ["resources.backend=ray"]), tmp_path / "ray", _Recording())
    # the workers start before the data is prepared; the server (asking no resources) lives in the driver
    assert _Recording.events == ["launch", "prepare", "start", "DriverServerHandle"]
    _Recording.events = []
    # the server in an actor of its own, and one worker folding its clients' updates into partials, two clients
    # a call and then one (resources.clients_per_call)
    actor = run_scenario(scenario_from_dict(tiny_raw, ["resources.backend=ray", "resources.server.num_cpus=0.5",
                                                       "resources.worker_partials=true", "resources.num_workers=1",
                                                       "resources.clients_per_call=3"]),
                         tmp_path / "actor", _Recording())
    assert _Recording.events[-1] == "RayServerHandle"
    a, b, c = _rows(tmp_path / "local"), _rows(tmp_path / "ray"), _rows(tmp_path / "actor")
    assert len(a) == len(b) == len(c) == 3  # round 0 (initial eval) + 2 rounds
    for ra, rb, rc in zip(a, b, c):
        for k in COMPARED:
            assert ra.get(k) == rb.get(k) == rc.get(k), (ra["round"], k)
        assert {k for k in ra if k.startswith("eval/task/")} == {k for k in rb if k.startswith("eval/task/")}
        if ra["round"]:  # worker_partials auto: the local backend's one worker folds its 3 clients into a partial;
            # on Ray (1.5 clients per worker) every update reaches the server; from partials, one object per worker
            assert ra["engine/server_in_objects"] == 1 and rb["engine/server_in_objects"] == 3 >= rc["engine/server_in_objects"]
            assert rb["engine/clients_per_call"] == 1.0  # auto, with 3 clients for 2 workers: one each
            assert rc["engine/clients_per_call"] == pytest.approx(5 / 3)  # calls of 2 and 1
    assert local["final/eval/loss"] == ray_sum["final/eval/loss"] == actor["final/eval/loss"]
    # two long-lived actors, each built its model once and wrapped it with PEFT once, whatever it trained
    workers = ray_sum["workers"]
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
    assert all(w["num_builds"] == 1 and w["num_wraps"] == 1 for w in workers)
    assert sum(w["num_clients"] for w in workers) == sum(w["num_calls"] for w in workers) == 6  # 3 clients × 2 rounds
    assert [(w["num_clients"], w["num_calls"]) for w in actor["workers"]] == [(6, 4)]


@pytest.mark.usefixtures("shared_ray")
def test_base_merges_on_both_backends_with_mixed_ranks(tiny_raw, tmp_path):
    """FLoRA merges into the cached base every round: the same metrics on both backends (to float32 rounding with
    the workers folding partials: their dense sums group clients by worker), base built once per worker."""
    tiny_raw["strategy"] = {"name": "flora"}
    tiny_raw["clients"]["lora"] = {"tiers": [{"fraction": 0.5, "rank": 2}, {"fraction": 0.5, "rank": 6, "alpha": 3}]}
    local = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "local")
    ray_sum = run_scenario(scenario_from_dict(tiny_raw, ["resources.backend=ray", "resources.worker_partials=true"]),
                           tmp_path / "ray")
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    for ra, rb in zip(a, b):
        for k in COMPARED:
            assert ra.get(k) == rb.get(k) or ra.get(k) == pytest.approx(rb.get(k), rel=F32_NETWORK), (ra["round"], k)
    assert a[-1]["eval/loss"] < a[0]["eval/loss"]
    assert local["final/eval/loss"] == pytest.approx(ray_sum["final/eval/loss"], rel=F32_NETWORK)
    assert all(w["num_builds"] == 1 and w["num_wraps"] == 1 for w in ray_sum["workers"])


@pytest.mark.usefixtures("shared_ray")
@pytest.mark.parametrize("strategy", ["fedqlora", "flora"])
def test_mixed_bit_clients_on_both_backends(tiny_raw, tmp_path, strategy):
    """A {2, 4, 8, 16}-bit mix (HQQ 2- and 8-bit, bitsandbytes NF4, bf16): same metrics on both backends; every
    worker quantizes each bit width once per base version (FLoRA bumps it every round), never per client."""
    tiny_raw["strategy"] = {"name": strategy, "params": {"qa_init": "loftq"} if strategy == "fedqlora" else {}}
    tiny_raw["clients"].update(per_round=4, quant={"tiers": [{"fraction": 0.25, "bits": b} for b in (2, 4, 8, 16)],
                                                   "group_size": 32})
    tiny_raw["eval"]["local_test_fraction"] = 0.25
    local = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "local")
    ray_sum = run_scenario(scenario_from_dict(tiny_raw, ["resources.backend=ray"]), tmp_path / "ray")
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    for ra, rb in zip(a, b):
        for k in COMPARED + ("eval/personal/accuracy", "eval/qa/rel_error"):
            assert ra.get(k) == rb.get(k), (ra["round"], k)
    assert local["final/eval/loss"] == ray_sum["final/eval/loss"]
    labels = {"2bit-hqq", "4bit-bnb-nf4", "8bit-hqq", "16bit"}
    for w in ray_sum["workers"]:
        assert w["num_builds"] == 1 and set(w["quantizations"].values()) == {1}
        versions = {k.split("/")[0] for k in w["quantizations"]}
        assert versions == ({"v0"} if strategy == "fedqlora" else {f"v{v}" for v in range(3)})
    assert labels <= {k.removeprefix("memory/base_mb/") for k in ray_sum if k.startswith("memory/base_mb/")}
    assert ray_sum["memory/base_mb/2bit-hqq"] < ray_sum["memory/base_mb/8bit-hqq"] < ray_sum["memory/base_mb/32bit"]
    if strategy == "fedqlora":
        assert 0 < ray_sum["final/eval/qa/rel_error"] and "final/eval/qa/corr/2bit-hqq" in ray_sum
    with open(tmp_path / "ray" / "clients.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and {r["base"] for r in table} == labels  # every client's base, with its packed size
    assert all(float(r["base_mb"]) == ray_sum[f"memory/base_mb/{r['base']}"] for r in table)


@pytest.mark.usefixtures("ray_session")
def test_worker_pools_by_bits(tiny_raw, tmp_path):
    """2-bit clients go to a pool of their own (its own worker size), the others to the main pool; same numbers as
    the in-process backend, which has no pools."""
    tiny_raw["clients"].update(per_round=6, quant={"tiers": [{"fraction": 0.5, "bits": 2}, {"fraction": 0.5,
                                                                                            "bits": 32}],
                                                   "group_size": 32})
    local = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "local")
    tiny_raw["resources"].update(backend="ray", num_workers=1,
                                 pools=[{"bits": [2], "num_workers": 2, "num_cpus": 0.5, "num_gpus": 0.25}])
    pooled = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "ray")
    from fedsim.driver import prepare

    bits = {c.client_id: c.quant.bits for c in prepare(scenario_from_dict(tiny_raw)).clients}
    rows = _rows(tmp_path / "ray")[1:]
    for row in rows:
        for cid, worker in row["clients/worker"].items():
            assert worker.endswith("-pool0") == (bits[int(cid)] == 2), (cid, worker)
    assert {w["name"] for w in pooled["workers"]} == {"worker-0", "worker-1-pool0", "worker-2-pool0"}
    assert local["final/eval/loss"] == pooled["final/eval/loss"]


@pytest.mark.usefixtures("ray_session")
def test_fractional_gpu_placement_on_cpu(tiny_raw, tmp_path):
    """Logical GPUs: 2 workers at 0.5 GPU each share one (logical) GPU; training falls back to CPU."""
    tiny_raw["rounds"] = 1
    sc = scenario_from_dict(tiny_raw, ["resources.backend=ray", "resources.num_workers=2", "resources.num_gpus=0.5",
                                       "resources.num_cpus=0.5", "eval.at_start=false"])
    summary = run_scenario(sc, tmp_path / "gpu")
    assert len(summary["workers"]) == 2 and all(w["device"] == "cpu" for w in summary["workers"])
    assert summary["final/eval/accuracy"] is not None


@pytest.mark.usefixtures("ray_session")
def test_unplaceable_workers_fail_early_with_a_clear_error(tiny_raw, tmp_path):
    import time

    import ray

    from fedsim.errors import BackendError

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False)  # a "cluster" the scenario joins as it is
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match="cannot place.*GPUs"):
        run_scenario(scenario_from_dict(tiny_raw, ["resources.backend=ray", "resources.num_gpus=1"]), tmp_path / "a")
    with pytest.raises(BackendError, match="no node has 4 CPUs"):
        run_scenario(scenario_from_dict(tiny_raw, ["resources.backend=ray", "resources.num_cpus=4"]), tmp_path / "b")
    tiny_raw["resources"]["pools"] = [{"bits": [2], "num_workers": 1, "num_gpus": 0.5}]  # a GPU pool, no GPU
    with pytest.raises(BackendError, match="cannot place.*GPUs.*resources.pools"):
        run_scenario(scenario_from_dict(tiny_raw, ["resources.backend=ray"]), tmp_path / "c")
    assert time.perf_counter() - t0 < 60


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("verbose", [False, True])
def test_a_local_head_starts_without_the_processes_a_run_does_not_use(tiny_raw, tmp_path, monkeypatch, verbose):
    """Quiet (the command line's default): no autoscaler monitor, no API server, no log monitor (~80 MB each);
    --verbose keeps the log monitor, so that the workers' output reaches the console. pyarrow (which Ray's
    serialization imports for Ray Data, ~36 MB a process) stays out of the workers and out of the driver's start,
    and the driver can still import it (datasets needs it). A run on that head works."""
    import sys

    import ray
    from ray._private import ray_constants
    from ray._private import worker as ray_worker

    from fedsim.runtime.ray import pool as ray_pool

    monkeypatch.setenv("FEDSIM_QUIET", "1")
    monkeypatch.setenv("FEDSIM_VERBOSE", "1" if verbose else "0")
    had_pyarrow = "pyarrow" in sys.modules
    tiny_raw["rounds"] = 1
    scenario = scenario_from_dict(tiny_raw, ["resources.backend=ray"])
    assert ray_pool.init_ray(scenario)

    def alive(ptype):
        procs = ray_worker._global_node.all_processes.get(ptype, [])
        return any(p.process.poll() is None for p in procs)

    assert not alive(ray_constants.PROCESS_TYPE_MONITOR)
    assert not alive(ray_constants.PROCESS_TYPE_DASHBOARD)
    assert alive(ray_constants.PROCESS_TYPE_LOG_MONITOR) == verbose
    assert alive(ray_constants.PROCESS_TYPE_GCS_SERVER) and alive(ray_constants.PROCESS_TYPE_RAYLET)

    @ray.remote(num_cpus=0)
    def modules():
        return sys.modules.get("pyarrow", "absent") is None, "fedsim.boot" in sys.modules, os.nice(0)

    # preloaded, pyarrow marked absent before anything ran, and the driver's priority (Ray's default nice 15 starved
    # the training beside two busy processes)
    assert ray.get(modules.remote()) == (True, True, 0)
    if not had_pyarrow:
        assert "pyarrow" not in sys.modules  # the mark was lifted in the driver, pyarrow not imported
    import pyarrow  # noqa: F401  # datasets can still use it here

    summary = run_scenario(scenario, tmp_path / "run")  # on this head (not started by the run: it stays up)
    assert summary["final/eval/loss"] is not None and ray.is_initialized()


@pytest.mark.usefixtures("ray_session")
def test_lean_start_falls_back_to_stopping_what_ray_started(tiny_raw, monkeypatch):
    """A Ray without the start-up hooks starts in full; the unused processes are then stopped once it is up."""
    from ray._private import ray_constants
    from ray._private import worker as ray_worker

    from fedsim.runtime.ray import pool as ray_pool

    monkeypatch.setenv("FEDSIM_QUIET", "1")
    monkeypatch.setenv("FEDSIM_VERBOSE", "0")
    monkeypatch.setattr(ray_pool, "_lean_head", lambda skip: __import__("contextlib").nullcontext())
    assert ray_pool.init_ray(scenario_from_dict(tiny_raw, ["resources.backend=ray"]))
    procs = ray_worker._global_node.all_processes
    for ptype in (ray_constants.PROCESS_TYPE_MONITOR, ray_constants.PROCESS_TYPE_DASHBOARD,
                  ray_constants.PROCESS_TYPE_LOG_MONITOR):
        assert all(p.process.poll() is not None for p in procs.get(ptype, []))


@pytest.mark.usefixtures("shared_ray")
def test_the_server_folds_while_clients_train_within_a_window_and_changes_no_number(tiny_raw, tmp_path, monkeypatch):
    """#50 point 2: where the workers do not fold (FLoRA: auto declines), the server folds each update as soon as it
    and every one before it are done, and no call starts beyond a window of a few calls per worker past the first
    update the server has not taken — the object store holds O(workers × call size) updates, not the round's.
    The numbers are those of the round gathered after training (a deadline no client misses gathers it), bit for
    bit; the server actor's round is fed the same way."""
    from fedsim.runtime.ray import dispatch

    tiny_raw["strategy"] = {"name": "flora"}
    tiny_raw["clients"].update(num_clients=16, per_round=12)
    tiny_raw["resources"].update(backend="ray", clients_per_call=1)
    tiny_raw["partition"]["min_samples"] = 4
    seen = []  # (position started, first position the server had not taken, window) at each call
    real_submit = dispatch.Dispatch._submit

    def submit(self, slot, unit):
        seen.append((min(p for p, _, _ in unit), self.taken, self.window, self.sink is not None))
        return real_submit(self, slot, unit)

    monkeypatch.setattr(dispatch.Dispatch, "_submit", submit)
    fed = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "fed")
    assert seen and all(fed and pos < taken + window for pos, taken, window, fed in seen)
    assert {w for _, _, w, _ in seen} == {(2 + 1) * 2 * 1}  # (queue depth + 1) × workers × clients per call
    assert max(pos - taken for pos, taken, _, _ in seen) >= 4  # the window is used: not one client at a time
    seen.clear()
    gathered = run_scenario(scenario_from_dict(tiny_raw, ["clock.deadline_s=1e9"]), tmp_path / "gathered")
    assert seen and not any(fed for *_, fed in seen)
    actor = run_scenario(scenario_from_dict(tiny_raw, ["resources.server.num_cpus=0.5"]), tmp_path / "actor")
    a, b, c = _rows(tmp_path / "fed"), _rows(tmp_path / "gathered"), _rows(tmp_path / "actor")
    assert len(a) == len(b) == len(c) == 3
    for ra, rb, rc in zip(a, b, c):
        for k in COMPARED + ("engine/server_in_objects", "aggregated"):
            assert ra.get(k) == rb.get(k) == rc.get(k), (ra["round"], k)
    assert fed["final/eval/loss"] == gathered["final/eval/loss"] == actor["final/eval/loss"]
