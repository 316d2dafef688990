"""Scale: 10, 100 and 1,000 registered clients (10% sampled per round) on 2 Ray workers, against the pure-compute floor
of the same steps, with peak memory of the driver and the workers; and the memory a registered client costs.

Workload per sampled client: 5 local steps of batch 8 × 64 tokens, LoRA r = 8 on the seven projections of the tiny
model (the workload of benchmarks/overhead.py). Each fedsim run is its own process so that its peak memory is its
own. The floor (same steps, model built once, 2 plain single-thread processes) is measured in the same run.

Memory per registered client: two more runs over the same data set (80,000 samples) with 100 and with 10,000
registered clients and 10 sampled per round; the difference of the driver's peak memory divided by the 9,900 extra
clients (target ≤ 1 MB). Data and workers are the same in both, so what is left is per-client bookkeeping.

Aggregation at scale (``--aggregation``, or ``--aggregation-only``): one aggregation of 100 / 250 / 500 rank-8
updates over a 10M-parameter Llama's seven projections for every strategy (benchmarks/aggregation.py; target ≤ 2 s at
500 clients), written to ``aggregation.md`` / ``aggregation.json``.

Writes ``scale.md`` / ``scale.json`` / ``scale.png`` under benchmarks/results/.

Usage: python benchmarks/scale.py [--rounds 4] [--clients 10 100 1000] [--aggregation | --aggregation-only]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import in_subprocess  # noqa: E402
from overhead import BATCH, measure_floor, scenario_dict, write_data  # noqa: E402


def _run(args: tuple[str, int, int, int, str], queue: mp.Queue) -> None:

    from fedsim.config import scenario_from_dict
    from fedsim.driver import run_scenario
    from fedsim.runtime.worker import peak_rss_mb

    data, registered, per_round, rounds, out = args
    raw = scenario_dict(data, registered, rounds)
    raw["clients"]["per_round"] = per_round
    raw["partition"]["min_samples"] = 1
    raw["data"]["test"] = {"fraction": 0.01, "max_samples": 200}
    t0 = time.perf_counter()
    summary = run_scenario(scenario_from_dict(raw), Path(out))
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    queue.put({"registered": registered, "per_round": per_round, "total_s": total,
               "fit_s": [r["time/fit_s"] for r in rows if r["round"] >= 1],
               "driver_rss_mb": peak_rss_mb(),
               "worker_rss_mb": [w["max_rss_mb"] for w in summary["workers"]],
               "clients_trained": sum(w["num_clients"] for w in summary["workers"])})


def run_isolated(*args) -> dict:
    return in_subprocess(_run, args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--aggregation", action="store_true", help="also measure aggregation at 100/250/500 clients")
    ap.add_argument("--aggregation-only", action="store_true", help="only measure aggregation")
    args = ap.parse_args()
    if args.aggregation or args.aggregation_only:
        import aggregation

        from fedsim.strategies import available_strategies

        rows = aggregation.measure(sorted(available_strategies()), [100, 250, 500])
        text = aggregation.report(rows, sys.argv)
        print(text)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "aggregation.md").write_text(text + "\n")
        (Path(args.out) / "aggregation.json").write_text(json.dumps(rows, indent=1))
        if args.aggregation_only:
            return 0
    t_all = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            data = Path(tmp) / f"data-{n}.jsonl"
            write_data(data, max(2000, n * BATCH * 2))
            k = max(1, n // 10)
            fed = run_isolated(str(data), n, k, args.rounds, str(Path(tmp) / f"run-{n}"))
            floor = measure_floor(k, args.rounds)
            fed["floor_s"] = floor
            fed["steady_s"] = statistics.median(fed["fit_s"][1:])
            fed["floor_steady_s"] = statistics.median(floor[1:])
            fed["ratio"] = fed["steady_s"] / fed["floor_steady_s"]
            results.append(fed)
            print(f"{n} clients ({k}/round): round {fed['steady_s']:.2f} s vs floor {fed['floor_steady_s']:.2f} s "
                  f"(ratio {fed['ratio']:.2f}); driver {fed['driver_rss_mb']:.0f} MiB, workers "
                  f"{max(fed['worker_rss_mb']):.0f} MiB", flush=True)
        shared = Path(tmp) / "data-80k.jsonl"
        write_data(shared, 80_000)
        mem = [run_isolated(str(shared), n, 10, 2, str(Path(tmp) / f"mem-{n}")) for n in (100, 10_000)]
    per_client_kb = (mem[1]["driver_rss_mb"] - mem[0]["driver_rss_mb"]) * 1024.0 / (10_000 - 100)
    lines = ["# Scale (benchmarks/scale.py)", "", f"command: python {' '.join(sys.argv)}",
             f"machine: {platform.machine()}, {mp.cpu_count()} cores; 2 Ray workers (1 CPU, 1 thread each); "
             f"{args.rounds} rounds; 5 steps × batch 8 × 64 tokens per sampled client; wall time "
             f"{time.perf_counter() - t_all:.0f} s", "",
             "| registered clients | sampled / round | steady round (s) | floor (s) | ratio | s per sampled client | "
             "driver peak (MiB) | worker peak (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['registered']} | {r['per_round']} | {r['steady_s']:.2f} | {r['floor_steady_s']:.2f} | "
                     f"{r['ratio']:.2f} | {r['steady_s'] / r['per_round']:.3f} | {r['driver_rss_mb']:.0f} | "
                     f"{max(r['worker_rss_mb']):.0f} |")
    lines += ["", "Memory per registered client (same 80,000-sample data, 10 sampled per round, 2 rounds): driver peak "
              f"{mem[0]['driver_rss_mb']:.0f} MiB with 100 registered, {mem[1]['driver_rss_mb']:.0f} MiB with 10,000 → "
              f"**{per_client_kb:.1f} KiB per registered client** (target ≤ 1 MB"
              + ("; negative: the per-client cost is below the noise of the driver's peak, which the tokenization "
                 f"sets, so it is at most about {abs(per_client_kb):.0f} KiB" if per_client_kb < 0 else "")
              + f"); worker peaks {max(mem[0]['worker_rss_mb']):.0f} / {max(mem[1]['worker_rss_mb']):.0f} MiB."]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.md").write_text(text + "\n")
    (out / "scale.json").write_text(json.dumps({"runs": results, "memory": mem,
                                                 "kib_per_registered_client": per_client_kb}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [r["per_round"] for r in results]
    ax.plot(xs, [r["steady_s"] for r in results], marker="o", label="fedsim round")
    ax.plot(xs, [r["floor_steady_s"] for r in results], marker="s", label="floor (same steps)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampled clients per round (10% of registered)")
    ax.set_ylabel("steady-state round time (s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
