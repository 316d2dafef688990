"""Packed clients: clients per second of one worker against clients_per_pass K, side by side in one run.

Workload: every client trains 5 local steps of batch 8 × 64 tokens (LoRA r=8 on all seven projections, AdamW,
clipping at 1.0) on one worker — the Worker class the Ray actors run, in a process of its own with 1 thread (a
worker with ``num_cpus: 1``), so that each process's peak RSS is that worker's memory. For each model and each K,
the worker trains ``--clients`` clients in packs of K (K = 1: one by one, today's path), after one warm-up pack;
each (model, K) runs ``--repeats`` times, K ascending then descending, and the fastest run is reported.

Models, built from config (no download): ``tiny`` (the built-in model: hidden 64, 2 layers) and ``larger``
(hidden 512, intermediate 1376, 8 layers, 8 heads); with ``--preset gpu``, a SmolLM2-135M-shaped Llama (hidden 576,
intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocabulary 49152) with batches of 8 × 256 tokens on CUDA.

Printed and saved (benchmarks/results/packing.{md,json}): seconds per pack, clients/s, the speed-up over K = 1 and
peak memory per worker, for every (model, K). Targets (issue #12): ≥ 1.4× clients/s at the best K for the tiny
model on CPU; ≥ 4× at K = 16 for the 135M model on a GPU.

Usage: python benchmarks/packing.py [--clients 32] [--ks 1 2 4 8 16] [--models tiny larger] [--preset cpu|gpu]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import in_subprocess  # noqa: E402

STEPS, BATCH, RANK = 5, 8, 8
MODELS = {
    "tiny": {},  # the built-in defaults
    "larger": {"hidden_size": 512, "intermediate_size": 1376, "num_layers": 8, "num_heads": 8},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_layers": 30, "num_heads": 9,
                     "num_kv_heads": 3, "vocab_size": 49152},
}


def write_data(path: Path, n: int, seq: int) -> None:
    """Rows whose prompt is long enough that every sample is exactly ``seq`` byte tokens after truncation."""
    import numpy as np

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"instruction": "".join(rng.choice(letters, size=3 * seq)),
                                "output": "".join(rng.choice(letters[:26], size=6))}) + "\n")


def scenario(data: str, model: str, k: int, seq: int, gpu: bool) -> dict:
    tiny = dict(MODELS[model])
    tiny.pop("vocab_size", None)
    tiny.pop("num_kv_heads", None)
    return {
        "name": "packing", "seed": 0, "rounds": 1,
        "model": {"name": "tiny", "tiny": tiny},
        "data": {"source": data, "max_seq_len": seq, "task_field": None, "test": {"fraction": 0.05}},
        "partition": {"method": "iid", "min_samples": BATCH},
        "clients": {"num_clients": 64, "per_round": 8, "lora": {"rank": RANK, "alpha": 16}},
        "training": {"local_steps": STEPS, "batch_size": BATCH, "lr": 0.001},
        "resources": {"backend": "local", "num_workers": 1, "num_cpus": 1, "num_gpus": 1 if gpu else 0,
                      "clients_per_pass": k},
        "logging": {"console": False, "wandb": {"mode": "disabled"}},
    }


def _measure(args: tuple, queue: mp.Queue) -> None:
    data, model, k, clients, seq, gpu = args

    import torch

    torch.set_num_threads(1)
    from fedsim.config import scenario_from_dict
    from fedsim.driver import prepare
    from fedsim.runtime.worker import ClientJob, Worker, peak_rss_mb
    from fedsim.strategies import make_strategy
    from fedsim.types import RoundContext

    raw = scenario(data, model, k, seq, gpu)
    if model == "smollm2-135m":  # a wider vocabulary and grouped-query attention than the tiny builder's defaults
        import fedsim.models.base as base

        original = base.tiny_config

        def config(cfg):
            c = original(cfg)
            c.vocab_size, c.num_key_value_heads = MODELS[model]["vocab_size"], MODELS[model]["num_kv_heads"]
            return c

        base.tiny_config = config
    sc = scenario_from_dict(raw)
    prep = prepare(sc)
    strategy = make_strategy("fedit")
    state = strategy.init_state(prep.spec)
    worker = Worker(sc, prep.data, num_gpus=1 if gpu else 0)
    ids = [c % len(prep.clients) for c in range(clients + k)]
    payloads = strategy.configure(RoundContext(1, 1, 0), state, [prep.clients[c] for c in sorted(set(ids))])
    jobs = [(ClientJob(prep.clients[c], prep.parts[c], 1 + i), payloads[c]) for i, c in enumerate(ids)]

    def run(batch):
        if k == 1:
            for job in batch:
                worker.run_client(*job)
        else:
            out = worker.run_pack(batch)
            bad = [o for o in out if not isinstance(o, tuple)]
            if bad:
                raise RuntimeError(bad[0])

    def sync():
        if gpu:
            torch.cuda.synchronize()

    run(jobs[:k])  # warm-up: model build, PEFT wrap, first pass
    sync()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(k, k + clients, k):
        run(jobs[i:i + k])
    sync()
    elapsed = time.perf_counter() - t0
    out = {"model": model, "k": k, "clients": clients, "time_s": elapsed, "clients_per_s": clients / elapsed,
           "peak_rss_mb": peak_rss_mb()}
    if gpu:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["device_name"] = torch.cuda.get_device_name()
    queue.put(out)


def measure(args: tuple) -> dict:
    return in_subprocess(_measure, args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32, help="clients timed per (model, K); a multiple of every K")
    ap.add_argument("--large-clients", type=int, default=16, help="the same for models other than tiny")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--repeats", type=int, default=2, help="runs per (model, K); the fastest is reported")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    gpu = args.preset == "gpu"
    models = args.models or (["smollm2-135m"] if gpu else ["tiny", "larger"])
    seq = 256 if gpu else 64
    if any(n % k for k in args.ks for n in (args.clients, args.large_clients)):
        ap.error("--clients and --large-clients must be multiples of every K")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        write_data(data, 64 * 40, seq)
        for model in models:
            best: dict[int, dict] = {}
            for rep in range(args.repeats):  # K ascending, then descending: drifts in machine speed hit all K alike
                for k in (args.ks if rep % 2 == 0 else args.ks[::-1]):
                    n = args.clients if model == "tiny" else args.large_clients
                    r = measure((str(data), model, k, n, seq, gpu))
                    print(f"{model:>14} K={k:<3} {r['clients_per_s']:8.2f} clients/s  peak RSS "
                          f"{r['peak_rss_mb']:.0f} MiB", flush=True)
                    if k not in best or r["clients_per_s"] > best[k]["clients_per_s"]:
                        best[k] = r
            results += [best[k] for k in args.ks]
    device = results[0].get("device_name") if gpu else f"CPU ({platform.machine()}, 1 thread per worker)"
    lines = ["# Packed clients (benchmarks/packing.py)", "",
             f"command: python benchmarks/packing.py --preset {args.preset} --clients {args.clients} --ks "
             f"{' '.join(map(str, args.ks))} --large-clients {args.large_clients} --repeats {args.repeats}",
             f"device: {device}; {mp.cpu_count()} cores, Python {platform.python_version()}",
             f"workload: per client {STEPS} steps of batch {BATCH} × {seq} tokens, LoRA r={RANK} on 7 projections, "
             f"AdamW, clipping 1.0; {args.clients} clients per K for tiny, {args.large_clients} for the others, after "
             f"a warm-up pack; fastest of "
             f"{args.repeats} runs (K ascending, then descending)", "",
             "| model | K (clients_per_pass) | s per pack | clients/s | speed-up vs K=1 | peak RSS per worker (MiB) |"
             + (" peak GPU memory (MiB) |" if gpu else ""),
             "|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for model in models:
        rows = [r for r in results if r["model"] == model]
        base = next((r["clients_per_s"] for r in rows if r["k"] == 1), rows[0]["clients_per_s"])
        for r in rows:
            r["speedup"] = r["clients_per_s"] / base
            lines.append(f"| {model} | {r['k']} | {r['time_s'] / (r['clients'] / r['k']):.3f} | "
                         f"{r['clients_per_s']:.2f} | **{r['speedup']:.2f}×** | {r['peak_rss_mb']:.0f} |"
                         + (f" {r['peak_gpu_mb']:.0f} |" if gpu else ""))
        best = max(rows, key=lambda r: r["speedup"])
        lines.append(f"| {model}: best | K={best['k']} | | | **{best['speedup']:.2f}×** | |" + (" |" if gpu else ""))
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "packing" if not gpu else "packing_gpu"
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps({"device": device, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
