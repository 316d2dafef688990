"""Two versions of fedsim on benchmarks/overhead.py's workload, interleaved, so that a refactor can be shown to cost
nothing: on a noisy machine a ratio against a floor measured minutes apart moves by ±15%, while interleaving the two
versions run by run (order A B B A, repeated) spreads the machine's drift over both.

Each side is a checkout with its own ``.venv`` (``git worktree add ../old <commit> && (cd ../old && bash setup.sh)``);
every run is a fresh process that imports that checkout's fedsim and runs the overhead scenario (100 clients × 5
steps a round, 5 rounds, 2 Ray workers): the steady round (median of rounds 2..), the mean client time inside a worker.

Usage: python benchmarks/ab_versions.py --a ../old --b . [--pairs 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, statistics, sys, tempfile
from pathlib import Path
repo = Path(sys.argv[1]); sys.path.insert(0, str(repo / "benchmarks"))
import overhead
with tempfile.TemporaryDirectory() as tmp:
    fit, info = overhead.measure_fedsim(100, 5, Path(tmp))
rows = info["rows"][1:]
print(json.dumps({"steady": statistics.median(fit[1:]),
                  "client": statistics.median(r["train/client_time_s"] for r in rows)}))
"""


def run(repo: Path) -> dict:
    python = repo / ".venv" / "bin" / "python"
    out = subprocess.run([str(python), "-c", CHILD, str(repo)], capture_output=True, text=True, check=True,
                         cwd="/tmp")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="the first checkout (e.g. before a change)")
    ap.add_argument("--b", required=True, help="the second checkout (e.g. after it)")
    ap.add_argument("--pairs", type=int, default=5, help="A B B A blocks (each gives two runs per side)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    repos = {"a": Path(args.a).resolve(), "b": Path(args.b).resolve()}
    commits = {k: subprocess.run(["git", "-C", str(p), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() for k, p in repos.items()}
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for i in range(args.pairs):
        for side in ("a", "b", "b", "a"):
            runs[side].append(run(repos[side]))
            print(f"block {i + 1}/{args.pairs} {side} ({commits[side]}): steady {runs[side][-1]['steady']:.2f} s",
                  flush=True)
    stat = {k: {"steady_median": statistics.median(r["steady"] for r in v),
                "steady_mean": statistics.mean(r["steady"] for r in v),
                "client_median": statistics.median(r["client"] for r in v)} for k, v in runs.items()}
    ratio = stat["b"]["steady_median"] / stat["a"]["steady_median"]
    lines = [
        "# Two fedsim versions on the overhead workload, interleaved (benchmarks/ab_versions.py)", "",
        f"command: python benchmarks/ab_versions.py --a A --b B --pairs {args.pairs}",
        f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}",
        f"A = {commits['a']}, B = {commits['b']}; runs in blocks A B B A", "",
        "| | A | B | B / A |", "|---|---|---|---|",
        f"| steady round, median of runs (s) | {stat['a']['steady_median']:.3f} | {stat['b']['steady_median']:.3f} "
        f"| **{ratio:.3f}** |",
        f"| steady round, mean of runs (s) | {stat['a']['steady_mean']:.3f} | {stat['b']['steady_mean']:.3f} | "
        f"{stat['b']['steady_mean'] / stat['a']['steady_mean']:.3f} |",
        f"| client time inside a worker, median (ms) | {1e3 * stat['a']['client_median']:.1f} | "
        f"{1e3 * stat['b']['client_median']:.1f} | {stat['b']['client_median'] / stat['a']['client_median']:.3f} |",
        "", "steady rounds per run (s): " + "; ".join(
            f"{k} ({commits[k]}) " + ", ".join(f"{r['steady']:.2f}" for r in v) for k, v in runs.items()),
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ab_versions{args.tag}.md").write_text("\n".join(lines) + "\n")
    (out / f"ab_versions{args.tag}.json").write_text(json.dumps({"commits": commits, "runs": runs, "stat": stat}))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
