"""A real two-node Ray cluster on this machine (#28 points 1–2): a head and a second node started with ``ray start`` as
processes of their own (their own ports, a custom resource each, Ray's token authentication), a scenario run against
it with ``resources.address``, and one submitted as a Ray job with ``fedsim submit``; metrics equal to the in-process
backend's; workers on both nodes; everything stopped through the process groups this test started."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedsim.cli import main
from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario

COMPARED = ("train/loss", "eval/loss", "eval/accuracy", "comm/up_params", "clients/sampled")
RAY = str(Path(sys.executable).with_name("ray"))


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """``ray start --block ...`` in a session of its own: its processes are one group this test can stop."""
    return subprocess.Popen([RAY, "start", "--block", *args], env=env, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _stop(procs: list[subprocess.Popen], marker: str) -> None:
    for p in procs:
        with_group = [signal.SIGTERM, signal.SIGKILL]
        for sig in with_group:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
    # anything of this cluster that left the groups (Ray daemonizes some helpers): by the temp dir only it uses
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    for pid in left:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _wait_for_nodes(address: str, n: int, env: dict, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True, text=True).stdout
        if out.count("node_") >= n:
            return
        time.sleep(2)
    raise AssertionError(f"the cluster did not reach {n} nodes: {out}")


@pytest.mark.usefixtures("ray_session")
def test_a_two_process_cluster_runs_a_scenario_and_a_submitted_job_like_one_process(tiny_raw, tmp_path, monkeypatch):
    single = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "single")
    port, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"fs-cluster-{secrets.token_hex(4)}"  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(32)
    # workers at nice 0 as fedsim's own local heads start them (Ray's default 15 starves them on a busy machine)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_worker_niceness": "0"}
    procs = [_start(["--head", f"--port={port}", "--num-cpus=1", '--resources={"fs_head": 1}',
                     "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                     "--node-ip-address=127.0.0.1", f"--temp-dir={temp}"], env, tmp_path / "head.log")]
    had_mode = "RAY_AUTH_MODE" in os.environ
    try:
        address = f"127.0.0.1:{port}"
        _wait_for_nodes(address, 1, env)
        procs.append(_start([f"--address={address}", "--num-cpus=1", '--resources={"fs_node": 1}',
                             "--node-ip-address=127.0.0.1"], env, tmp_path / "node.log"))
        _wait_for_nodes(address, 2, env)
        # this process has the token but no RAY_AUTH_MODE: fedsim turns token authentication on itself
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        raw = {**tiny_raw, "resources": {**tiny_raw["resources"], "backend": "ray", "num_workers": 2, "num_cpus": 1,
                                         "address": address}}
        multi = run_scenario(scenario_from_dict(raw), tmp_path / "multi")
        import ray

        ray.shutdown()
        assert len({w["node"] for w in multi["workers"]}) == 2, "one worker per node"
        assert all(w["num_clients"] > 0 for w in multi["workers"])  # clients trained on both nodes

        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "tiny.yaml").write_text(yaml.safe_dump({**tiny_raw, "resources": {
            **tiny_raw["resources"], "backend": "ray", "num_workers": 2, "num_cpus": 1}}))
        monkeypatch.chdir(job_dir)
        out = tmp_path / "submitted"
        assert main(["submit", "tiny.yaml", "--address", f"http://127.0.0.1:{dash}", "--out", str(out),
                     "--python", sys.executable]) == 0
    finally:
        _stop(procs, str(temp))
        if not had_mode:
            os.environ.pop("RAY_AUTH_MODE", None)
        monkeypatch.undo()  # the token goes too; then Ray reads its configuration again, for the tests after this one
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    for other in ("multi", "submitted"):  # both equal the in-process backend, round by round
        for a, b in zip(_rows(tmp_path / "single"), _rows(tmp_path / other)):
            for k in COMPARED:
                assert a.get(k) == b.get(k), (other, a["round"], k)
    assert json.loads((out / "summary.json").read_text())["final/eval/loss"] == single["final/eval/loss"]
    assert not subprocess.run(["pgrep", "-f", str(temp)], capture_output=True).stdout  # nothing left running


def test_submit_refuses_what_cannot_travel_or_reach_a_cluster(tiny_raw, tmp_path, monkeypatch, capsys):
    """Before anything reaches a cluster: a scenario outside the working directory, a directory above Ray's package
    limit (naming its largest entries), and a dashboard that does not answer — each one line, status 2."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "tiny.yaml").write_text(yaml.safe_dump(tiny_raw))
    (tmp_path / "outside.yaml").write_text(yaml.safe_dump(tiny_raw))
    monkeypatch.chdir(work)
    assert main(["submit", str(tmp_path / "outside.yaml"), "--address", "http://127.0.0.1:1"]) == 2
    assert "is outside the working directory" in capsys.readouterr().err
    with open(work / "data" / "big.bin", "wb") as f:  # sparse: 600 MiB that take no disk
        f.truncate(600 * 2**20)
    assert main(["submit", "tiny.yaml", "--address", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "above Ray's 500 MiB limit; the largest entries: data (600 MiB)" in err and "\n" not in err.strip()
    (work / "data" / "big.bin").unlink()
    assert main(["submit", "tiny.yaml", "--address", f"http://127.0.0.1:{_free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "cannot submit to the Ray cluster" in err and "token" in err and "Traceback" not in err
