"""Mixed-precision clients: FedIT, FLoRA, FedQLoRA and FedQLoRA-iterative over bases at 16, 4, 2 bits and a {2, 4, 8}
mix, several seeds, side by side.

Each run: the built-in synthetic tasks, 20 clients (5 per round), Dirichlet(0.5) task skew, tiny model, rank 8, local
backend, one thread (the Ray backend gives the same numbers). Bits: ``all-16`` (bf16 weights), ``all-4`` (bitsandbytes
NF4), ``all-2`` (HQQ, group 32), ``mix-248`` (a third each of 2-bit HQQ, 4-bit NF4, 8-bit HQQ). FedQLoRA's
quantization-aware adapters have rank 4 and start from the truncated SVD of each client's quantization error.

Reported per (bits, method): global accuracy on the test set (the LoRA adapter on the full-precision base), each
client's own accuracy on its held-out 20% (its quantized base + its adapters), the *quantization bias* — relative
distance of the learned update ΔW (FLoRA: all merged updates; others: s·B·A) from the same method's run with every
client at 16 bits, same seed — and, for FedQLoRA, how well the quantization-aware adapters match W − deq(q(W))
(relative error, correlation). Packed base sizes per bit width come from the workers.

Writes ``mixed_precision.md``, ``.json`` and ``.png`` under benchmarks/results/.

Usage: python benchmarks/mixed_precision.py [--seeds 3] [--rounds 10] [--jobs 2]
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

BASE = {
    "model": {"name": "tiny"},
    "data": {"source": "synthetic", "synthetic": {"tasks": ["add", "reverse", "sort", "upper", "count"],
                                                  "num_train": 2000, "num_test": 400}, "max_seq_len": 32},
    "partition": {"method": "dirichlet", "by": "task", "alpha": 0.5, "min_samples": 10},
    "clients": {"num_clients": 20, "per_round": 5, "lora": {"rank": 8, "alpha": 16}},
    "training": {"local_steps": 20, "batch_size": 16, "lr": 0.003},
    "eval": {"every": 2, "batch_size": 100, "local_test_fraction": 0.2},
    "resources": {"backend": "local", "num_threads": 1},
    "logging": {"console": False, "wandb": {"mode": "disabled"}},
}
BITS = {
    "all-16": {"bits": 16},
    "all-4": {"bits": 4},
    "all-2": {"bits": 2, "group_size": 32},
    "mix-248": {"tiers": [{"fraction": 1 / 3, "bits": 2}, {"fraction": 1 / 3, "bits": 4},
                          {"fraction": 1 / 3, "bits": 8}], "group_size": 32},
}
METHODS = {
    "fedit": {"name": "fedit"},
    "flora": {"name": "flora"},
    "fedqlora": {"name": "fedqlora", "params": {"qa_rank": 4, "qa_init": "loftq"}},
    "fedqlora-iter": {"name": "fedqlora", "params": {"qa_rank": 4, "qa_init": "loftq", "iterative": True}},
}


def learned_update(run_dir: Path) -> dict:
    """Module → the total ΔW the run learned: every merged base update plus s·B·A of the final global adapter."""
    from fedsim import checkpoint
    from fedsim.lora import ops

    _, state, _, _ = checkpoint.load(run_dir)
    out = {m: ops.delta_w(state.tensors, m, state.lora.scaling) for m in ops.modules(state.tensors)}
    for delta in state.base_deltas:
        for m in {k.rsplit(".delta_", 1)[0] for k in delta}:
            d = delta[f"{m}.delta_W"] if f"{m}.delta_W" in delta else delta[f"{m}.delta_B"] @ delta[f"{m}.delta_A"]
            out[m] = out.get(m, 0) + d.float()
    return out


def run_one(args: tuple[str, str, int, int, str]) -> dict:
    bits, method, seed, rounds, tmp_root = args
    from fedsim.config import scenario_from_dict
    from fedsim.driver import run_scenario

    raw = merge(BASE, {"name": f"{bits}-{method}-{seed}", "seed": seed, "rounds": rounds,
                       "clients": {"quant": BITS[bits]}, "strategy": METHODS[method]})
    raw = with_base(raw)
    run_dir = Path(tmp_root) / f"{bits}-{method}-{seed}"
    t0 = time.perf_counter()
    summary = run_scenario(scenario_from_dict(raw), run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"bits": bits, "method": method, "seed": seed, "run_dir": str(run_dir),
            "rounds": [r["round"] for r in rows if "eval/accuracy" in r],
            "accuracy_curve": [r["eval/accuracy"] for r in rows if "eval/accuracy" in r],
            "accuracy": summary["final/eval/accuracy"], "personal_accuracy": summary["final/eval/personal/accuracy"],
            "qa_rel_error": summary.get("final/eval/qa/rel_error"), "qa_corr": summary.get("final/eval/qa/corr"),
            "qa_by_bits": {k.removeprefix("final/eval/qa/"): v for k, v in summary.items()
                           if k.startswith("final/eval/qa/") and k.count("/") == 4},
            "base_mb": {k.removeprefix("memory/base_mb/"): v for k, v in summary.items()
                        if k.startswith("memory/base_mb/")},
            "time_s": time.perf_counter() - t0}


def bias(runs: list[dict]) -> None:
    """Add ``bias``: ‖ΔW − ΔW(all-16, same method and seed)‖_F / ‖ΔW(all-16)‖_F over all modules."""
    ref = {(r["method"], r["seed"]): learned_update(Path(r["run_dir"])) for r in runs if r["bits"] == "all-16"}
    for r in runs:
        base = ref.get((r["method"], r["seed"]))
        if base is None:
            r["bias"] = None
            continue
        mine = learned_update(Path(r["run_dir"]))
        num = sum(float((mine[m] - base[m]).norm() ** 2) for m in base)
        den = sum(float(base[m].norm() ** 2) for m in base)
        r["bias"] = (num / den) ** 0.5


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    bits = [b for b in BITS if any(r["bits"] == b for r in results)]
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    width = 0.8 / len(methods)
    for key, ax, title in (("accuracy", axes[0], "global accuracy (test set)"),
                           ("personal_accuracy", axes[1], "each client's own model (local test)"),
                           ("bias", axes[2], "quantization bias ‖ΔW − ΔW_16‖ / ‖ΔW_16‖")):
        for j, m in enumerate(methods):
            vals, errs = [], []
            for b in bits:
                xs = [r[key] for r in results if r["bits"] == b and r["method"] == m and r[key] is not None]
                vals.append(statistics.mean(xs) if xs else 0.0)
                errs.append(statistics.stdev(xs) if len(xs) > 1 else 0.0)
            ax.bar([i + j * width for i in range(len(bits))], vals, width, yerr=errs, capsize=2, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(bits))], bits)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--tag", default="")
    add_base_argument(ap)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    base_tag = use_base(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(b, m, s, args.rounds, tmp) for b in args.bits for m in args.methods for s in range(args.seeds)]
        results = []
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for i, r in enumerate(pool.imap_unordered(run_one, runs), start=1):
                results.append(r)
                print(f"[{i}/{len(runs)}] {r['bits']:<8} {r['method']:<14} seed {r['seed']}: acc {r['accuracy']:.3f} "
                      f"own {r['personal_accuracy']:.3f} ({r['time_s']:.0f}s)", flush=True)
        bias(results)
    for r in results:
        r.pop("run_dir")
    results.sort(key=lambda r: (list(BITS).index(r["bits"]), list(METHODS).index(r["method"]), r["seed"]))
    sizes: dict[str, float] = {}
    for r in results:
        sizes.update(r["base_mb"])
    lines = ["# Mixed-precision clients (benchmarks/mixed_precision.py)", "",
             f"command: python {' '.join(sys.argv)}",
             f"{args.seeds} seeds, {args.rounds} rounds, 20 clients (5 per round), Dirichlet(0.5), {base_label()}, rank 8, "
             f"20 local steps; wall time {time.perf_counter() - t0:.0f} s", "",
             "| bits | method | global accuracy | own model, local test | quantization bias vs all-16 | "
             "QA adapter rel. error | QA adapter corr. | s / run |", "|---|---|---|---|---|---|---|---|"]
    for b in args.bits:
        for m in args.methods:
            rs = [r for r in results if r["bits"] == b and r["method"] == m]
            lines.append(f"| {b} | {m} | {mean_std([r['accuracy'] for r in rs])} | {mean_std([r['personal_accuracy'] for r in rs])} "
                         f"| {mean_std([r['bias'] for r in rs])} | {mean_std([r['qa_rel_error'] for r in rs])} | "
                         f"{mean_std([r['qa_corr'] for r in rs])} | {statistics.mean(r['time_s'] for r in rs):.0f} |")
    lines += ["", "QA adapter per bit width (FedQLoRA, mean over runs): "
              + ", ".join(f"{k} {statistics.mean(r['qa_by_bits'][k] for r in results if k in r['qa_by_bits']):.3f}"
                          for k in sorted({k for r in results for k in r["qa_by_bits"]})),
              "", "Packed base size per bit width (MB; the tiny model, embeddings and LM head in fp32): "
              + ", ".join(f"{k} {v:.3f}" for k, v in sorted(sizes.items(), key=lambda kv: kv[1]))]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"mixed_precision{base_tag}{args.tag}"
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    plot(results, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
