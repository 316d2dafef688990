"""Personalized accuracy of FedIT, FedSA-LoRA, FedDPA-T, PF2LoRA (with and without its second-order term, and with
both adapters trained simultaneously) and local-only training, side by side, several seeds.

Splits (each run on the local backend, one thread; the Ray backend gives the same numbers):
- ``synthetic-natural``: the 8 built-in synthetic tasks, one per client (8 clients, 4 per round);
- ``flan8-natural``: the FedDPA paper's eight FLAN tasks, one per client, by local path (../shared/data/flan8);
- ``synthetic-dirichlet``: the same synthetic tasks over 16 clients with a Dirichlet(0.3) task skew (8 per round).

Every client holds out 20% of its shard as its local test split. Reported per method: personalized accuracy (each
client's own model on its own local test split: global + personal adapters; FedIT has no personal part, so it is
its global adapter), mean ± std over seeds of the client mean, the worst 10% of clients, the global adapter alone
on the same local splits, and seconds per run.

Writes ``personalization.md``, ``.json`` (every run, with curves) and ``.png`` under benchmarks/results/.

Usage: python benchmarks/personalization.py [--seeds 3] [--rounds 10] [--jobs 2] [--settings ...] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_base_argument, base_label, mean_std, merge, use_base, with_base  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLAN8 = ROOT.parent / "shared" / "data" / "flan8"
TASKS = ["add", "reverse", "sort", "upper", "count", "first", "last", "max"]

BASE = {
    "model": {"name": "tiny"},
    "clients": {"lora": {"rank": 8, "alpha": 16}},
    "training": {"local_steps": 20, "batch_size": 16, "lr": 0.003},
    "eval": {"every": 2, "batch_size": 100, "local_test_fraction": 0.2},
    "resources": {"backend": "local", "num_threads": 1},
    "logging": {"console": False, "wandb": {"mode": "disabled"}},
}
SETTINGS = {
    "synthetic-natural": {
        "data": {"source": "synthetic", "synthetic": {"tasks": TASKS, "num_train": 1600, "num_test": 400},
                 "max_seq_len": 32},
        "partition": {"method": "natural", "by": "task"}, "clients": {"num_clients": 8, "per_round": 4}},
    "flan8-natural": {
        "data": {"source": str(FLAN8 / "client_*.json"), "test": {"source": str(FLAN8 / "test.jsonl"),
                                                                   "max_samples": 400},
                 "max_seq_len": 96},
        "partition": {"method": "natural", "by": "task"}, "clients": {"num_clients": 8, "per_round": 4}},
    "synthetic-dirichlet": {
        "data": {"source": "synthetic", "synthetic": {"tasks": TASKS, "num_train": 1600, "num_test": 400},
                 "max_seq_len": 32},
        "partition": {"method": "dirichlet", "by": "task", "alpha": 0.3, "min_samples": 20},
        "clients": {"num_clients": 16, "per_round": 8}},
}
METHODS = {
    "fedit": {"name": "fedit"},
    "fedsa": {"name": "fedsa"},
    "feddpa": {"name": "feddpa"},
    "pf2lora": {"name": "pf2lora", "params": {"inner_lr": 0.5}},
    "pf2lora-1st": {"name": "pf2lora", "params": {"inner_lr": 0.5, "mode": "first_order"}},
    "pf2lora-sim": {"name": "pf2lora", "params": {"inner_lr": 0.5, "mode": "simultaneous"}},
    "local": {"name": "local"},
}


def run_one(args: tuple[str, str, int, int]) -> dict:
    setting, method, seed, rounds = args
    from fedsim.config import scenario_from_dict
    from fedsim.driver import run_scenario

    raw = merge(merge(BASE, SETTINGS[setting]),
                {"name": f"{setting}-{method}-{seed}", "seed": seed, "rounds": rounds, "strategy": METHODS[method]})
    raw = with_base(raw)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = run_scenario(scenario_from_dict(raw), Path(tmp) / "run")
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    has_personal = "final/eval/personal/accuracy" in summary
    personal = "personal" if has_personal else "local_global"
    return {"setting": setting, "method": method, "seed": seed,
            "rounds": [r["round"] for r in rows if f"eval/{personal}/accuracy" in r],
            "personal_curve": [r[f"eval/{personal}/accuracy"] for r in rows if f"eval/{personal}/accuracy" in r],
            "personal_accuracy": summary[f"final/eval/{personal}/accuracy"],
            "personal_worst10": summary[f"final/eval/{personal}/accuracy_worst10"],
            "personal_std_clients": summary[f"final/eval/{personal}/accuracy_std"],
            "global_local_accuracy": summary["final/eval/local_global/accuracy"],
            "global_test_accuracy": summary["final/eval/accuracy"],
            "up_params": summary["comm/total_up_params"], "time_s": time.perf_counter() - t0}


def plot(results: list[dict], methods: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in results)]
    fig, axes = plt.subplots(2, len(settings), figsize=(5.2 * len(settings), 7.5), squeeze=False)
    for col, s in enumerate(settings):
        ax = axes[0][col]
        ms = [m for m in methods if any(r["setting"] == s and r["method"] == m for r in results)]
        for i, m in enumerate(ms):
            rs = [r for r in results if r["setting"] == s and r["method"] == m]
            acc = [r["personal_accuracy"] for r in rs]
            worst = [r["personal_worst10"] for r in rs]
            ax.bar(i - 0.2, statistics.mean(acc), 0.4, yerr=statistics.stdev(acc) if len(acc) > 1 else 0,
                   color="C0", label="mean over clients" if i == 0 else None, capsize=3)
            ax.bar(i + 0.2, statistics.mean(worst), 0.4, color="C3", label="worst 10% of clients" if i == 0 else None)
        ax.set_xticks(range(len(ms)), ms, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{s}: personalized accuracy")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[1][col]
        for m in ms:
            rs = [r for r in results if r["setting"] == s and r["method"] == m]
            curve = [statistics.mean(c) for c in zip(*(r["personal_curve"] for r in rs))]
            ax.plot(rs[0]["rounds"][: len(curve)], curve, marker="o", ms=3, label=m)
        ax.set_xlabel("round")
        ax.set_ylabel("personalized accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    add_base_argument(ap)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    base_tag = use_base(args)
    if "flan8-natural" in args.settings and not (FLAN8 / "test.jsonl").is_file():
        print(f"skipping flan8-natural: {FLAN8} not found", file=sys.stderr)
        args.settings = [s for s in args.settings if s != "flan8-natural"]
    runs = [(s, m, seed, args.rounds) for s in args.settings for m in args.methods for seed in range(args.seeds)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        results = []
        for i, r in enumerate(pool.imap_unordered(run_one, runs), start=1):
            results.append(r)
            print(f"[{i}/{len(runs)}] {r['setting']:<20} {r['method']:<12} seed {r['seed']}: personalized "
                  f"{r['personal_accuracy']:.3f} (worst 10% {r['personal_worst10']:.3f})  ({r['time_s']:.0f}s)",
                  flush=True)
    results.sort(key=lambda r: (list(SETTINGS).index(r["setting"]), args.methods.index(r["method"]), r["seed"]))
    lines = ["# Personalization (benchmarks/personalization.py)", "",
             f"command: python {' '.join(sys.argv)}",
             f"{args.seeds} seeds, {args.rounds} rounds, {base_label()}, rank-8 global adapter, 20 local steps of batch 16 "
             f"(AdamW, lr 3e-3), 20% of each client's shard held out as its local test split; "
             f"wall time {time.perf_counter() - t0:.0f} s", "",
             "| split | method | personalized accuracy (mean ± std over seeds) | worst 10% of clients | "
             "global adapter alone, same splits | client spread (std) | upload (M params) | s / run |",
             "|---|---|---|---|---|---|---|---|"]
    for s in args.settings:
        for m in args.methods:
            rs = [r for r in results if r["setting"] == s and r["method"] == m]
            if not rs:
                continue
            lines.append(
                f"| {s} | {m} | {mean_std([r['personal_accuracy'] for r in rs])} | "
                f"{mean_std([r['personal_worst10'] for r in rs])} | "
                f"{mean_std([r['global_local_accuracy'] for r in rs])} | "
                f"{statistics.mean(r['personal_std_clients'] for r in rs):.3f} | "
                f"{statistics.mean(r['up_params'] for r in rs) / 1e6:.2f} | {statistics.mean(r['time_s'] for r in rs):.0f} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"personalization{base_tag}{args.tag}"
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    plot(results, args.methods, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
