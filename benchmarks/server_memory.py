"""Server memory at realistic update sizes: the round's updates gathered (the path before streaming), streamed one at a
time while the clients train (``resources.worker_partials: false``), folded into one partial per worker
(``resources.worker_partials: true``), or the default (``auto``: here, partials), side by side in one run; beside
each measured peak, :mod:`fedsim.memory`'s estimate of it (what ``fedsim validate`` prints) and their ratio.

The model is TinyLlama-shaped, built from config (hidden 2048, 22 layers, intermediate 5632, 32 heads — without
grouped-query attention, so k/v are 2048 × 2048 —, bfloat16 base on CPU: ~1.1B parameters), LoRA r = 16 on the seven
projections: 13.9M parameters, 55.5 MB per update in float32. FedIT, 2 Ray workers, the server in the driver (its own
process is the one measured).

Dry mode: a round needs no real training to measure what the server holds, so the clients run a *dry* local
procedure (defined here; a procedure function travels with the payload to the workers): each adds seeded noise to its
adapter instead of taking optimizer steps — full-size updates, no forward pass. Everything else is the real engine:
payloads, the workers' adapter swaps, transport, validation, aggregation, accounting.

Measured per (path, clients per round), each in a fresh process, 2 rounds: the driver's peak RSS, split into private
memory (``RssAnon``: what the server allocated) and object-store pages it mapped (``RssShmem``), sampled every 20 ms;
the object store's peak use (plasma memory plus spilled bytes, sampled every 0.5 s); the bytes moved into the server
(``engine/server_in_bytes``); the steady round's (round 2) wall time of training and aggregation (``time/fit_s``) and
of aggregation alone (``time/aggregate_s``; with partials the workers fold while they train). The gathered path is run up to the client count
this machine can hold (see ``--gathered-max``): beyond it the driver alone would need more memory than there is.

Usage: python benchmarks/server_memory.py [--clients 10 50 200] [--gathered-max 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import in_subprocess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_layers": 22, "num_heads": 32}
SMOKE = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4}  # --smoke: the script's check
PATHS = ("gathered", "streamed", "partials", "default")


def scenario(path: str, clients: int, rounds: int, shape: dict = SHAPE) -> dict:
    return {
        "name": f"server_memory_{path}_{clients}", "seed": 0, "rounds": rounds,
        "model": {"name": "tiny", "tiny": shape, "dtype": "bfloat16"},
        "data": {"source": "synthetic", "synthetic": {"tasks": ["add", "reverse"], "num_train": 8 * clients,
                                                      "num_test": 16}, "max_seq_len": 16},
        "partition": {"method": "iid"},
        "clients": {"num_clients": clients, "per_round": clients, "lora": {"rank": 16, "alpha": 32}},
        "strategy": {"name": "dry_fedit_gathered" if path == "gathered" else "dry_fedit"},
        "training": {"local_steps": 1, "batch_size": 4},
        "eval": {"every": 1000, "at_start": False, "batch_size": 16},
        "resources": {"backend": "ray", "num_workers": 2, "num_cpus": 1,
                      **({} if path == "default" else {"worker_partials": path == "partials"})},
        "logging": {"console": False, "plots": False, "wandb": {"mode": "disabled"}},
    }


def register_dry_strategies() -> None:
    """FedIT whose clients run the dry procedure; and the same, aggregating the gathered round at once (the path
    before streaming: every update fetched, then averaged)."""
    from dataclasses import replace

    import torch

    from fedsim.lora import ops
    from fedsim.strategies import register
    from fedsim.strategies.fedit import FedIT

    def dry(job):
        """Seeded noise on the trainable tensors instead of optimizer steps: a full-size update, no forward pass."""
        p = job.payload
        params = job.host.set_trainable(p.lora, p.trainable)
        g = torch.Generator().manual_seed(hash(job.seed) % 2**31)
        with torch.no_grad():
            for t in params:
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype), alpha=1e-3)
        return {"train/loss": 0.0, "train/steps": 0.0}

    dry.metric_keys, dry.round_metrics = (), ()

    @register("dry_fedit")
    class DryFedIT(FedIT):
        def configure(self, ctx, state, clients):
            payloads = super().configure(ctx, state, clients)
            one = replace(next(iter(payloads.values())), procedure=dry)
            return {cid: one for cid in payloads}

    @register("dry_fedit_gathered")
    class GatheredDryFedIT(DryFedIT):
        streams = False

        def aggregate(self, ctx, state, updates):  # FedIT's aggregation before streaming, verbatim
            keys = ops.check_same_keys([u.tensors for u in updates])
            tensors = ops.weighted_average([u.tensors for u in updates], self._weights(updates), keys)
            return self._copy_state(state, tensors=tensors)


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


def one(args: tuple, queue) -> None:
    """One configuration in this (fresh) process: peak memory of the driver (the server), of the object store."""
    import threading

    path, clients, rounds, out, shape = args
    os.environ["FEDSIM_QUIET"] = "1"
    register_dry_strategies()
    import ray

    import fedsim
    from fedsim.config import scenario_from_dict

    peaks = {"VmRSS": 0, "RssAnon": 0, "RssShmem": 0, "store": 0}
    stop = threading.Event()

    def sample_memory() -> None:
        while not stop.is_set():
            for k, v in _status().items():
                peaks[k] = max(peaks[k], v)
            stop.wait(0.02)

    def sample_store() -> None:
        from ray._private.internal_api import memory_summary

        while not stop.is_set():
            if ray.is_initialized():
                try:
                    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
                    used = sum(int(m) for m in re.findall(r"(?:Plasma memory usage|Spilled) (\d+) MiB", text))
                    peaks["store"] = max(peaks["store"], used * 2**20)
                except Exception:
                    pass
            stop.wait(0.5)

    threads = [threading.Thread(target=f, daemon=True) for f in (sample_memory, sample_store)]
    for t in threads:
        t.start()
    sc = scenario_from_dict(scenario(path, clients, rounds, shape))
    from fedsim.components import resolve
    from fedsim.federation.prepare import prepare
    from fedsim.memory import estimate

    components = resolve(sc)
    guess = estimate(sc, prepare(sc), components)
    t0 = time.perf_counter()
    summary, run_dir = fedsim.run(sc, out=f"{out}/{path}_{clients}")
    stop.set()
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    queue.put({"path": path, "clients": clients, "peak_rss_mb": peaks["VmRSS"] / 2**20,
               "peak_private_mb": peaks["RssAnon"] / 2**20, "peak_shm_mb": peaks["RssShmem"] / 2**20,
               "peak_store_mb": peaks["store"] / 2**20, "server_in_mb": last["engine/server_in_bytes"] / 2**20,
               "server_in_objects": last["engine/server_in_objects"], "up_mb_simulated": last["comm/up_bytes"] / 2**20,
               "fit_s": last["time/fit_s"], "aggregate_s": last["time/aggregate_s"],
               "total_s": time.perf_counter() - t0, "took": guess.path,
               "est_server_mb": sum(guess.server.values()) / 2**20, "est_store_mb": sum(guess.store.values()) / 2**20,
               "update_mb": last["comm/up_bytes"] / clients / 2**20})


def table(results: list[dict]) -> str:
    lines = ["| path (taken) | clients/round | server peak RSS (MB) | of it private | of it store pages | estimate "
             "(measured / est.) | object store peak (MB) | estimate (measured / est.) | into the server (MB, "
             "objects) | round: train + aggregate (s) | of it aggregate (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['path']} ({r['took']}) | {r['clients']} | {r['peak_rss_mb']:,.0f} | "
                     f"{r['peak_private_mb']:,.0f} | {r['peak_shm_mb']:,.0f} | {r['est_server_mb']:,.0f} "
                     f"({r['peak_rss_mb'] / r['est_server_mb']:.2f}) | {r['peak_store_mb']:,.0f} | "
                     f"{r['est_store_mb']:,.0f} ({r['peak_store_mb'] / r['est_store_mb']:.2f}) | "
                     f"{r['server_in_mb']:,.0f} ({r['server_in_objects']:.0f}) | {r['fit_s']:.1f} | "
                     f"{r['aggregate_s']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--gathered-max", type=int, default=50,
                    help="the largest client count run on the gathered path (its driver holds every update twice)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--runs", default="/tmp/fedsim_server_memory")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer, 64-wide model: checks the script, measures nothing")
    args = ap.parse_args()
    shape = SMOKE if args.smoke else SHAPE
    results: list[dict] = []
    name = "server_memory_smoke" if args.smoke else "server_memory"
    save = Path(args.out) / f"{name}.json"
    for clients in args.clients:
        for path in PATHS:
            if path == "gathered" and clients > args.gathered_max:
                continue
            r = in_subprocess(one, (path, clients, args.rounds, f"{args.runs}/{time.time_ns()}", shape))
            results.append(r)
            print(json.dumps(r), flush=True)
            save.write_text(json.dumps({"machine": f"{platform.node()} ({os.cpu_count()} cores)",
                                        "results": results}, indent=1))  # each part saved when done
    print(table(results))
    (Path(args.out) / f"{name}.md").write_text(
        f"# Server memory ({os.cpu_count()} cores, {shape}, LoRA r = 16 on 7 projections, FedIT, 2 workers)\n\n"
        f"`python benchmarks/server_memory.py {' '.join(sys.argv[1:])}`\n\n{table(results)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
