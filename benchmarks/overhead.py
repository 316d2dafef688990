"""Engine overhead: fedsim's Ray round time against the pure-compute floor, measured side by side in one run.

Workload (issue #2): each round trains 100 clients × 5 local steps (batch 8 × 64 tokens, LoRA r=8 on all seven
projections of the tiny model) with 2 Ray workers (1 CPU, 1 thread each).

Floor (measured before and after fedsim, in the same run): the same training steps — same model, same batch shapes, same loss, same optimizer, same number of steps per client —
with the model built and wrapped once, split over 2 plain processes with one thread each, nothing else (no adapter
swaps, no data collation, no communication, no aggregation). The floor's round time is the slower process's time.

Printed and saved: the steady-state fedsim round time (fit time: sample → configure → train → aggregate; the
evaluation is excluded since the floor does none), the floor round time, and their ratio (target ≤ 1.10).

Usage: python benchmarks/overhead.py [--rounds 5] [--clients 100] [--out benchmarks/results]
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
from common import floor_loop, floor_rounds  # noqa: E402

SEQ = 64
BATCH = 8
STEPS = 5
RANK = 8


def scenario_dict(data_path: str, num_clients: int, rounds: int) -> dict:
    return {
        "name": "overhead", "seed": 0, "rounds": rounds,
        "model": {"name": "tiny"},  # hidden 64, 2 layers, 7 projections adapted
        "data": {"source": data_path, "max_seq_len": SEQ, "task_field": None, "test": {"fraction": 0.05}},
        "partition": {"method": "iid", "min_samples": BATCH},
        "clients": {"num_clients": num_clients, "per_round": num_clients, "lora": {"rank": RANK, "alpha": 16}},
        "training": {"local_steps": STEPS, "batch_size": BATCH, "lr": 0.001},
        "eval": {"every": 10_000, "at_start": False, "batch_size": 256},
        "resources": {"backend": "ray", "num_workers": 2, "num_cpus": 1},
        "logging": {"console": False, "jsonl": True, "wandb": {"mode": "disabled"}},
    }


def write_data(path: Path, n: int) -> None:
    """Rows whose prompt is long enough that every sample is exactly SEQ tokens after truncation."""
    import numpy as np

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    with open(path, "w") as f:
        for _ in range(n):
            prompt = "".join(rng.choice(letters, size=3 * SEQ))
            answer = "".join(rng.choice(letters[:26], size=6))
            f.write(json.dumps({"instruction": prompt, "output": answer}) + "\n")


def _floor_worker(args: tuple, queue: mp.Queue) -> None:
    rounds, num_clients = args
    import torch

    torch.set_num_threads(1)
    from fedsim.config import ModelConfig
    from fedsim.models.adapters import AdapterHost
    from fedsim.models.base import build_base_model
    from fedsim.models.lm_loss import causal_lm_loss
    from fedsim.types import LoraSpec

    cfg = ModelConfig()
    lora = LoraSpec(RANK, 16.0)
    host = AdapterHost(build_base_model(cfg), cfg.target_modules)
    host.activate(lora)
    params = host.set_trainable(lora, ("A", "B"))
    model = host.model
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 384, (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, : SEQ - 7] = -100
    # the loss a fedsim client computes
    queue.put(floor_loop(lambda: causal_lm_loss(model, ids, labels).backward(), params, num_clients, rounds))


def measure_floor(num_clients: int, rounds: int) -> list[float]:
    return floor_rounds(_floor_worker, num_clients, (rounds,))


def measure_fedsim(num_clients: int, rounds: int, workdir: Path) -> tuple[list[float], dict]:
    from fedsim.config import scenario_from_dict
    from fedsim.driver import run_scenario

    data = workdir / "data.jsonl"
    write_data(data, max(2000, num_clients * BATCH * 2))
    t0 = time.perf_counter()
    summary = run_scenario(scenario_from_dict(scenario_dict(str(data), num_clients, rounds)), workdir / "run")
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["round"] >= 1]
    return [r["time/fit_s"] for r in rows], {"total_s": total, "summary": summary, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    # The floor runs before and after fedsim so that drifts in machine speed hit both sides alike.
    floor_before = measure_floor(args.clients, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        fed_rounds, info = measure_fedsim(args.clients, args.rounds, Path(tmp))
    floor_after = measure_floor(args.clients, args.rounds)
    floor_rounds = floor_before + floor_after
    # steady state: drop round 1 (worker start-up, model build, first PEFT wrap) on both sides
    fed = statistics.median(fed_rounds[1:])
    floor = statistics.median(floor_before[1:] + floor_after[1:])
    ratio = fed / floor
    rows = info["rows"][1:]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    lines = [
        "# fedsim engine overhead (benchmarks/overhead.py)",
        "",
        f"command: python benchmarks/overhead.py --rounds {args.rounds} --clients {args.clients}",
        f"machine: {platform.machine()}, {mp.cpu_count()} cores, Python {platform.python_version()}",
        f"workload per round: {args.clients} clients × {STEPS} steps, batch {BATCH} × {SEQ} tokens, "
        f"LoRA r={RANK} on 7 projections of the tiny model, 2 Ray workers (1 CPU, 1 thread each)",
        "",
        "| | round 1 (s) | steady-state round, median of rounds 2.. (s) |",
        "|---|---|---|",
        f"| fedsim, Ray backend (fit time) | {fed_rounds[0]:.2f} | {fed:.2f} |",
        f"| floor: same steps, 2 plain processes | {floor_before[0]:.2f} | {floor:.2f} |",
        "",
        f"**ratio fedsim / floor = {ratio:.3f}** (target ≤ 1.10)",
        "",
        f"fedsim round breakdown, median of rounds 2..: train {med('time/train_s'):.2f} s, aggregate "
        f"{med('time/aggregate_s'):.3f} s, mean client time inside a worker {med('train/client_time_s') * 1000:.0f} ms",
        "",
        f"fedsim rounds (s): {', '.join(f'{t:.2f}' for t in fed_rounds)}",
        f"floor rounds (s), before | after fedsim: {', '.join(f'{t:.2f}' for t in floor_before)} | "
        f"{', '.join(f'{t:.2f}' for t in floor_after)}",
        f"fedsim total wall time incl. Ray start-up and final evaluation: {info['total_s']:.1f} s",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.md").write_text(text + "\n")
    (out / "overhead.json").write_text(json.dumps({
        "fedsim_rounds_s": fed_rounds, "floor_rounds_s": floor_rounds, "fedsim_steady_s": fed,
        "floor_steady_s": floor, "ratio": ratio, "clients": args.clients, "rounds": args.rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
