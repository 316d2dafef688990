"""``fedsim sweep --parallel`` on a Ray cluster: a head and a second node started with ``ray start`` on this machine
(one CPU each, token authentication), a 4-point sweep of the tiny scenario with one worker per point, sequential
(``--parallel 1``) and two points at once (``--parallel 2``): wall time, where each point's worker ran, and whether
the numbers agree. Writes ``sweep_cluster.md`` / ``.json`` under benchmarks/results/.

On one 2-core machine the two nodes share the cores, so this measures what ``--parallel`` does (how points are
placed, that they overlap, what it costs), not the speed-up a real multi-node cluster gives.

Usage: python benchmarks/sweep_cluster.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    import test_cluster as T
    from conftest import TINY

    from fedsim.sweep import run_sweep

    port = T._free_port()
    temp = Path("/tmp") / f"fs-bench-{secrets.token_hex(4)}"
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        procs = [T._start(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                           "--node-ip-address=127.0.0.1", f"--temp-dir={temp}"], env, tmp / "head.log")]
        try:
            address = f"127.0.0.1:{port}"
            T._wait_for_nodes(address, 1, env)
            procs.append(T._start([f"--address={address}", "--num-cpus=1", "--node-ip-address=127.0.0.1"], env,
                                  tmp / "node.log"))
            T._wait_for_nodes(address, 2, env)
            os.environ["RAY_AUTH_TOKEN"] = token
            raw = {**TINY, "rounds": args.rounds, "resources": {**TINY["resources"], "backend": "ray",
                                                                 "num_workers": 1, "num_cpus": 1, "address": address}}
            (tmp / "tiny.yaml").write_text(yaml.safe_dump(raw))
            for parallel in (1, 2):
                t0 = time.perf_counter()
                run_sweep(tmp / "tiny.yaml", ["clients.lora.rank=2,4", "training.local_steps=2,4"], [],
                          tmp / f"p{parallel}", parallel=parallel)
                wall = time.perf_counter() - t0
                rows = list(csv.DictReader(open(tmp / f"p{parallel}" / "sweep.csv")))
                nodes = [json.loads((Path(r["run_dir"]) / "summary.json").read_text())["workers"][0]["node"][:8]
                         for r in rows]
                results[parallel] = {"wall_s": wall, "losses": [r["final_loss"] for r in rows], "nodes": nodes,
                                     "run_s": [float(r["time_s"]) for r in rows]}
                print(parallel, results[parallel], flush=True)
        finally:
            T._stop(procs, str(temp))
    same = results[1]["losses"] == results[2]["losses"]
    md = ["# fedsim sweep --parallel on a two-node Ray cluster (benchmarks/sweep_cluster.py)", "",
          f"command: `python {' '.join(sys.argv)}`", f"machine: {platform.machine()}, {os.cpu_count()} cores; both "
          "nodes on it (1 CPU each)", "",
          f"4 points of the tiny scenario ({args.rounds} rounds), one worker (1 CPU) per point.", "",
          "| --parallel | sweep wall time (s) | each run's time (s) | node of each point's worker |", "|---|---|---|---|"]
    for p, r in results.items():
        md.append(f"| {p} | {r['wall_s']:.1f} | {', '.join(f'{x:.1f}' for x in r['run_s'])} | "
                  f"{', '.join(r['nodes'])} |")
    md += ["", f"final losses identical between the two: {same}"]
    dest = Path(args.out)
    (dest / "sweep_cluster.json").write_text(json.dumps({"command": " ".join(sys.argv), **{str(k): v for k, v in
                                                                                          results.items()}}, indent=1))
    (dest / "sweep_cluster.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
