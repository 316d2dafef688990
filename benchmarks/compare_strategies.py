"""Compare aggregation strategies on the same scenario, several seeds, side by side.

Settings (each run uses the local backend, which gives the same numbers as the Ray backend, one thread per run):
- ``synthetic``: the built-in tasks, 20 clients, Dirichlet(0.5) split by task;
- ``ag_news``: AG News by local path (../shared/data/ag_news), a Dirichlet(0.5) label-skewed split, scored over the
  four label options;
and two rank mixes each: ``uniform`` (every client r = 8; all strategies) and ``mixed`` (ranks {2, 4, 8, 16} in equal
shares; the strategies that support mixed ranks).

Writes ``compare_strategies.md`` (final accuracy mean ± std over seeds, total communication), ``.json`` with every
run's curve, and one PNG of accuracy per round per setting.

Usage: python benchmarks/compare_strategies.py [--seeds 3] [--rounds 10] [--jobs 2] [--settings synthetic ag_news]
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
from common import add_base_argument, base_label, merge, use_base, with_base  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AG_NEWS = ROOT.parent / "shared" / "data" / "ag_news" / "test.csv"

BASE = {
    "model": {"name": "tiny"},
    "partition": {"method": "dirichlet", "alpha": 0.5, "min_samples": 10},
    "clients": {"num_clients": 20, "per_round": 5},
    "training": {"local_steps": 20, "batch_size": 16, "lr": 0.003},
    "eval": {"every": 1, "batch_size": 100},
    "resources": {"backend": "local", "num_threads": 1},
    "logging": {"console": False, "wandb": {"mode": "disabled"}},
}
DATA = {
    "synthetic": {"data": {"source": "synthetic", "synthetic": {"num_train": 2000, "num_test": 400},
                           "max_seq_len": 32}, "partition": {"by": "task"}},
    "ag_news": {"data": {"source": str(AG_NEWS), "format": "classification",
                         "columns": ["label", "title", "description"],
                         "prompt_template": "{title}. {description}\nTopic: ",
                         "label_names": {1: "World", 2: "Sports", 3: "Business", 4: "Sci/Tech"},
                         "task_field": None, "max_seq_len": 96, "test": {"fraction": 0.1, "max_samples": 400}}},
}
RANKS = {
    "uniform": {"rank": 8, "alpha": 16},
    "mixed": {"tiers": [{"fraction": 0.25, "rank": r, "alpha": 2 * r} for r in (2, 4, 8, 16)]},
}
UNIFORM_ONLY = ("fedit", "ffa", "fedex", "fedsa")
MIXED_OK = ("flora", "hetlora", "flexlora")


def run_one(args: tuple[str, str, str, int, int, float]) -> dict:
    data_name, rank_name, strategy, seed, rounds, local_test = args
    from fedsim.config import scenario_from_dict
    from fedsim.driver import run_scenario

    raw = merge(BASE, DATA[data_name])
    raw = merge(raw, {"name": f"{data_name}-{rank_name}-{strategy}-{seed}", "seed": seed, "rounds": rounds,
                      "clients": {"lora": RANKS[rank_name]}, "strategy": {"name": strategy},
                      "eval": {"local_test_fraction": local_test}})
    raw = with_base(raw)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = run_scenario(scenario_from_dict(raw), Path(tmp) / "run")
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"data": data_name, "ranks": rank_name, "strategy": strategy, "seed": seed,
            "accuracy": [r["eval/accuracy"] for r in rows], "final_accuracy": summary["final/eval/accuracy"],
            "final_loss": summary["final/eval/loss"],
            "comm_params": summary["comm/total_up_params"] + summary["comm/total_down_params"],
            "comm_up_params": summary["comm/total_up_params"], "comm_down_params": summary["comm/total_down_params"],
            "personal_accuracy": summary.get("final/eval/personal/accuracy"),
            "personal_worst10": summary.get("final/eval/personal/accuracy_worst10"),
            "time_s": time.perf_counter() - t0}


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["data"], r["ranks"]) for r in results})
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, (d, k) in zip(axes[0], settings):
        for s in sorted({r["strategy"] for r in results if (r["data"], r["ranks"]) == (d, k)}):
            curves = [r["accuracy"] for r in results if (r["data"], r["ranks"], r["strategy"]) == (d, k, s)]
            mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
            ax.plot(range(len(mean)), mean, marker="o", ms=3, label=s)
        ax.set_title(f"{d}, {k} ranks")
        ax.set_xlabel("round")
        ax.set_ylabel("eval accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=["synthetic", "ag_news"], choices=sorted(DATA))
    ap.add_argument("--strategies", nargs="+", help="only these strategies")
    ap.add_argument("--local-test", type=float, default=0.0,
                    help="hold out this share of each client's shard and report personalized accuracy too "
                         "(needed by personalized strategies such as fedsa, which are skipped without it)")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    add_base_argument(ap)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.base == "warm" and "ag_news" in args.settings:
        print("error: the warm base was pretrained on AG News text (benchmarks/warm_base.py), so it cannot be compared "
              "on the ag_news setting: pass --settings synthetic, or --base random", file=sys.stderr)
        return 2
    base_tag = use_base(args)
    if "ag_news" in args.settings and not AG_NEWS.is_file():
        print(f"skipping ag_news: {AG_NEWS} not found", file=sys.stderr)
        args.settings = [s for s in args.settings if s != "ag_news"]
    from fedsim.strategies import get_strategy_class

    def wanted(s: str) -> bool:
        if args.strategies and s not in args.strategies:
            return False
        return args.local_test > 0 or not get_strategy_class(s).has_personal_state

    runs = [(d, k, s, seed, args.rounds, args.local_test) for d in args.settings for k in RANKS
            for s in (UNIFORM_ONLY + MIXED_OK if k == "uniform" else MIXED_OK) if wanted(s)
            for seed in range(args.seeds)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        results = []
        for i, r in enumerate(pool.imap_unordered(run_one, runs), start=1):
            results.append(r)
            print(f"[{i}/{len(runs)}] {r['data']:<9} {r['ranks']:<7} {r['strategy']:<8} seed {r['seed']}: "
                  f"acc {r['final_accuracy']:.3f}  ({r['time_s']:.0f}s)", flush=True)
    results.sort(key=lambda r: (r["data"], r["ranks"], r["strategy"], r["seed"]))

    lines = ["# Strategy comparison (benchmarks/compare_strategies.py)", "",
             f"command: python {' '.join(sys.argv)}",
             f"{args.seeds} seeds, {args.rounds} rounds, 20 clients (5 per round), Dirichlet(0.5) split, {base_label()}, "
             f"20 local steps of batch 16; wall time {time.perf_counter() - t0:.0f} s", "",
             "| data | ranks | strategy | final accuracy (mean ± std) | best round accuracy (mean) | "
             "total communication (M params, up + down) |" + (" personalized accuracy (mean ± std) | worst 10% |"
                                                               if args.local_test > 0 else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if args.local_test > 0 else "")]
    for (d, k, s) in sorted({(r["data"], r["ranks"], r["strategy"]) for r in results}):
        rs = [r for r in results if (r["data"], r["ranks"], r["strategy"]) == (d, k, s)]
        acc = [r["final_accuracy"] for r in rs]
        best = statistics.mean(max(r["accuracy"]) for r in rs)
        comm = statistics.mean(r["comm_params"] for r in rs) / 1e6
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        line = f"| {d} | {k} | {s} | {statistics.mean(acc):.3f} ± {std:.3f} | {best:.3f} | {comm:.2f} |"
        if args.local_test > 0:
            pa = [r["personal_accuracy"] for r in rs]
            pstd = statistics.stdev(pa) if len(pa) > 1 else 0.0
            line += f" {statistics.mean(pa):.3f} ± {pstd:.3f} | {statistics.mean(r['personal_worst10'] for r in rs):.3f} |"
        lines.append(line)
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"compare_strategies{base_tag}{args.tag}"
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    plot(results, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
