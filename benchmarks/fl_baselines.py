"""The FL baselines (issue #26) side by side: accuracy over seeds, the client objectives' cost per local step, and
the server's cost at 500 clients.

1. ``accuracy``: FedIT, FedAvgM, FedAdagrad, FedAdam, FedYogi, FedProx and SCAFFOLD on the strategy comparison's
   synthetic setting (20 clients, 5 per round, a Dirichlet(0.5) task skew, rank 8, 20 local steps of batch 16,
   AdamW at 3e-3), ``--seeds`` seeds, ``--rounds`` rounds, on the warm base by default. Each method's
   hyperparameter (server η, FedProx's μ) is tuned on a seed that is not reported (``--tune``: a ``fedsim tune``
   search — Ray Tune, ``--samples`` log-uniform draws over the range in ``METHODS``, ASHA stopping the worse trials
   on eval accuracy — and the value of the completed trial with the best final accuracy; otherwise the values in
   ``TUNED``). Reported: final accuracy mean ± std, and each method minus FedIT paired by seed (same split, same
   initialisation), mean ± std and on how many seeds it was ahead.
2. ``overhead``: one client's local training, plain vs FedProx vs SCAFFOLD (with a nonzero c − c_i), interleaved in
   one process, on the tiny model and on a 10M-parameter Llama (hidden 512, 4 layers); the median of the trainer's
   own time per step; target ≤ 1.10× plain.
3. ``server``: at 500 rank-8 updates over the 10M-parameter shapes of ``benchmarks/aggregation.py``: FedIT's
   aggregation, then each server optimizer's step, and SCAFFOLD's server side (500 Δc_i validated and summed);
   target: one server-optimizer step (aggregation included) ≤ 2 s.

Writes ``fl_baselines{tag}.md`` / ``.json`` under benchmarks/results/.

Usage: python benchmarks/fl_baselines.py [--parts accuracy overhead server] [--seeds 5] [--rounds 20] [--tune]
       [--samples 8] [--base warm|random] [--jobs 2]
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
from common import base_label, mean_std, merge, use_base, with_base  # noqa: E402

TUNE_SEED = 1000  # the seed the hyperparameters are chosen on; never among the reported ones

BASE = {
    "model": {"name": "tiny"},
    "data": {"source": "synthetic", "synthetic": {"num_train": 2000, "num_test": 400}, "max_seq_len": 32},
    "partition": {"method": "dirichlet", "by": "task", "alpha": 0.5, "min_samples": 10},
    "clients": {"num_clients": 20, "per_round": 5, "lora": {"rank": 8, "alpha": 16}},
    "training": {"local_steps": 20, "batch_size": 16, "lr": 0.003},
    "eval": {"every": 2, "batch_size": 100},
    "resources": {"backend": "local", "num_threads": 1},
    "logging": {"console": False, "wandb": {"mode": "disabled"}},
}


def _opt(name: str):
    return lambda v: {"name": "fedit", "server_optimizer": {"name": name, "lr": v}}


# method → (the strategy block for a hyperparameter value, the search's key and range (None: not tuned), what the
# value is). The ranges span the earlier hand-made grids a factor of 3 beyond each end.
SERVER_LR = "strategy.server_optimizer.lr"
METHODS = {
    "fedit": (lambda v: {"name": "fedit"}, None, "—"),
    "fedavgm": (lambda v: {"name": "fedit", "server_optimizer": {"name": "fedavgm", "lr": v, "momentum": 0.9}},
                (SERVER_LR, 0.03, 3.0), "server η (μ = 0.9)"),
    "fedadagrad": (_opt("fedadagrad"), (SERVER_LR, 3e-3, 1.0), "server η (τ = 1e-3)"),
    "fedadam": (_opt("fedadam"), (SERVER_LR, 3e-3, 1.0), "server η (β = 0.9, 0.99; τ = 1e-3)"),
    "fedyogi": (_opt("fedyogi"), (SERVER_LR, 3e-3, 1.0), "server η (β = 0.9, 0.99; τ = 1e-3)"),
    "fedprox": (lambda v: {"name": "fedit", "client_objective": {"name": "fedprox", "params": {"mu": v}}},
                ("strategy.client_objective.params.mu", 3e-5, 3e-2), "μ"),
    "scaffold": (lambda v: {"name": "fedit", "client_objective": {"name": "scaffold", "params": {"server_lr": v}}},
                 None, "η_g"),
}
TUNED = {"fedit": None, "fedavgm": 0.331, "fedadagrad": 0.1, "fedadam": 0.0154, "fedyogi": 0.0154, "fedprox": 7.76e-4,
         "scaffold": 1.0}  # without --tune: the last search's choices to 3 digits (benchmarks/results/fl_baselines_warm.md)


# -- 1. accuracy -------------------------------------------------------------------------------------------------
def run_one(args: tuple[str, object, int, int]) -> dict:
    method, value, seed, rounds = args
    from fedsim.config import scenario_from_dict
    from fedsim.driver import run_scenario

    raw = scenario(method, value, seed, rounds)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = run_scenario(scenario_from_dict(raw), Path(tmp) / "run")
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"method": method, "value": value, "seed": seed,
            "rounds": [r["round"] for r in rows if "eval/accuracy" in r],
            "accuracy": [r["eval/accuracy"] for r in rows if "eval/accuracy" in r],
            "final_accuracy": summary["final/eval/accuracy"], "final_loss": summary["final/eval/loss"],
            "comm_params": summary["comm/total_up_params"] + summary["comm/total_down_params"],
            "time_s": time.perf_counter() - t0}


def _pool_map(runs: list[tuple], jobs: int, label: str) -> list[dict]:
    out = []
    with mp.get_context("spawn").Pool(jobs) as pool:
        for i, r in enumerate(pool.imap_unordered(run_one, runs), start=1):
            out.append(r)
            value = f"{r['value']:.3g}" if isinstance(r["value"], float) else str(r["value"])
            print(f"[{label} {i}/{len(runs)}] {r['method']:<10} {value:<7} seed {r['seed']:>4}: accuracy "
                  f"{r['final_accuracy']:.3f} ({r['time_s']:.0f} s)", flush=True)
    return out


def scenario(method: str, value, seed: int, rounds: int) -> dict:
    """The benchmark's scenario for one method at one hyperparameter value."""
    return with_base(merge(BASE, {"name": f"{method}-{value}-{seed}", "seed": seed, "rounds": rounds,
                                  "strategy": METHODS[method][0](value)}))


def tune(methods: list[str], rounds: int, jobs: int, samples: int, work: Path) -> tuple[dict, list[dict]]:
    """Each tuned method's hyperparameter by a ``fedsim tune`` search on ``TUNE_SEED``: ``samples`` log-uniform draws,
    ``jobs`` trials at once, ASHA on eval accuracy (eval every 2 rounds; a trial is compared from round 6); the value
    of the completed trial with the best final accuracy. Returns the chosen values and every trial."""
    import csv

    import yaml

    from fedsim.tune import run_tune

    chosen, trials = dict(TUNED), []
    for m in methods:
        if METHODS[m][1] is None:
            continue
        key, low, high = METHODS[m][1]
        (work / f"{m}.yaml").write_text(yaml.safe_dump(scenario(m, TUNED[m], TUNE_SEED, rounds)))
        (work / f"{m}-space.yaml").write_text(yaml.safe_dump({
            "space": {key: {"loguniform": [low, high]}}, "metric": "eval/accuracy", "mode": "max",
            "samples": samples, "concurrent": jobs, "asha": {"grace_period": 6, "reduction_factor": 2}}))
        t0 = time.perf_counter()
        run_tune(work / f"{m}.yaml", work / f"{m}-space.yaml", out=work / f"{m}-search")
        rows = list(csv.DictReader(open(work / f"{m}-search" / "tune.csv")))
        mine = [{"method": m, "value": float(r[key]), "rounds": int(r["rounds"]), "error": r["error"],
                 "final_accuracy": float(r["last eval/accuracy"]), "stopped_early": r["stopped_early"] == "True"}
                for r in rows]
        done = [r for r in mine if not r["stopped_early"] and not r["error"] and r["rounds"] == rounds]
        chosen[m] = max(done, key=lambda r: r["final_accuracy"])["value"]
        trials += mine
        print(f"[tune] {m}: {len(mine)} trials ({sum(r['stopped_early'] for r in mine)} stopped by ASHA) in "
              f"{time.perf_counter() - t0:.0f} s; {METHODS[m][2]} = {chosen[m]:.3g}", flush=True)
    return chosen, trials


def accuracy_report(results: list[dict], chosen: dict, grid: list[dict], methods: list[str]) -> list[str]:
    seeds = sorted({r["seed"] for r in results})
    by = {(r["method"], r["seed"]): r for r in results}
    lines = ["| method | hyperparameter | final accuracy (mean ± std) | − FedIT, paired by seed | ahead of FedIT "
             "| communication (M params) | s / run |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        rs = [by[(m, s)] for s in seeds if (m, s) in by]
        if not rs:
            continue
        acc = [r["final_accuracy"] for r in rs]
        diffs = [by[(m, s)]["final_accuracy"] - by[("fedit", s)]["final_accuracy"] for s in seeds
                 if (m, s) in by and ("fedit", s) in by]
        paired = "—" if m == "fedit" or not diffs else f"{statistics.mean(diffs):+.3f} ± " + (
            f"{statistics.stdev(diffs):.3f}" if len(diffs) > 1 else "0.000")
        ahead = "—" if m == "fedit" or not diffs else f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
        value = "—" if chosen.get(m) is None else f"{METHODS[m][2]} = {chosen[m]:.3g}"
        lines.append(f"| {m} | {value} | {mean_std(acc)} | {paired} | {ahead} | "
                     f"{statistics.mean(r['comm_params'] for r in rs) / 1e6:.2f} | "
                     f"{statistics.mean(r['time_s'] for r in rs):.0f} |")
    if grid:
        lines += ["", f"Tuning (`fedsim tune` on seed {TUNE_SEED}, not reported above; each trial's value → its last "
                  "eval accuracy, `(round N)` where ASHA stopped it):", ""]
        for m in methods:
            mine = sorted((r for r in grid if r["method"] == m), key=lambda r: r["value"])
            if mine:
                lines.append(f"- {m} ({METHODS[m][2]}): " + ", ".join(
                    f"{r['value']:.3g} → {r['final_accuracy']:.3f}" + (f" (round {r['rounds']})"
                                                                       if r["stopped_early"] else "")
                    for r in mine))
    return lines


# -- 2. per-step overhead of the client objectives ----------------------------------------------------------------
SIZES = {"tiny (hidden 64, 2 layers)": {},
         "10M Llama (hidden 512, 4 layers)": {"hidden_size": 512, "intermediate_size": 1376, "num_layers": 4,
                                              "num_heads": 8}}


def overhead(repeats: int, steps: int) -> list[dict]:
    import torch

    from fedsim.config import scenario_from_dict
    from fedsim.driver import prepare
    from fedsim.objectives.proximal import Proximal
    from fedsim.objectives.scaffold import Scaffold, ScaffoldStage
    from fedsim.runtime.worker import ClientJob, Worker
    from fedsim.strategies import make_strategy
    from fedsim.types import RoundContext

    torch.set_num_threads(1)
    rows = []
    for label, tiny in SIZES.items():
        raw = merge(BASE, {"rounds": 2, "model": {"tiny": tiny}, "training": {"local_steps": steps,
                                                                               "batch_size": 8},
                           "data": {"max_seq_len": 64}})
        sc = scenario_from_dict(raw)
        prep = prepare(sc)
        strategy = make_strategy("fedit")
        state = strategy.init_state(prep.spec)
        client = prep.clients[0]
        ctx = RoundContext(1, 2, 0)
        payload = strategy.configure(ctx, state, [client])[client.client_id]
        job = ClientJob(client, prep.parts[client.client_id], 1)
        stage = ScaffoldStage(1.0, sc.clients.num_clients, strategy.is_shared)
        gen = torch.Generator().manual_seed(0)
        stage.c = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in payload.tensors.items()
                   if strategy.is_shared(k)}
        variants = {"plain": payload,
                    "fedprox": _with(payload, (Proximal(mu=0.01),)),
                    "scaffold": stage.configure(ctx, state, _with(payload, (Scaffold(),)))}
        worker = Worker(sc, prep.data)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats + 1):  # the first pass warms up (discarded)
            for name, p in variants.items():
                result, _ = worker.run_client(job, p)
                times[name].append(result.metrics["train/time_s"] / steps)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        for name in variants:
            rows.append({"model": label, "variant": name, "step_ms": 1e3 * med[name],
                         "ratio": med[name] / med["plain"]})
            print(f"{label:<34} {name:<9} {1e3 * med[name]:7.2f} ms/step  {med[name] / med['plain']:.3f}× plain",
                  flush=True)
    return rows


def _with(payload, objectives):
    from dataclasses import replace

    return replace(payload, objectives=objectives)


# -- 3. the server at 500 clients ----------------------------------------------------------------------------------
def server(clients: int) -> list[dict]:
    from dataclasses import replace

    import aggregation
    import torch

    from fedsim.objectives import STATE_PREFIX
    from fedsim.objectives.scaffold import STATE_KEY, ScaffoldStage
    from fedsim.pipeline import ServerOptimizer
    from fedsim.strategies import StrategySpec, make_strategy
    from fedsim.types import LoraSpec, RoundContext

    lora = LoraSpec(aggregation.RANK, 2.0 * aggregation.RANK)
    ctx = RoundContext(2, 3, 0)
    strategy = make_strategy("fedit")
    state = strategy.init_state(StrategySpec(aggregation.shapes(), lora, 0))
    ups = aggregation.updates(clients, strategy, lora)
    t0 = time.perf_counter()
    new = strategy.aggregate(ctx, state, ups)
    agg = time.perf_counter() - t0
    rows = [{"step": f"FedIT aggregate of {clients} updates", "s": agg}]
    for name in ("fedavgm", "fedadagrad", "fedadam", "fedyogi"):
        opt = ServerOptimizer(name, lr=0.01)
        opt.after(ctx, state, new)  # round 1 creates the moments
        t0 = time.perf_counter()
        opt.after(ctx, state, new)
        rows.append({"step": f"{name} step", "s": time.perf_counter() - t0})
    prefix = f"{STATE_PREFIX}{STATE_KEY}."
    ups = [replace(u, extra={prefix + k: torch.randn_like(v) for k, v in u.tensors.items()})  # Δc_i as uploaded
           for u in ups]
    stage = ScaffoldStage(1.0, 4 * clients, strategy.is_shared)
    t0 = time.perf_counter()
    kept = stage.before(ctx, state, ups)
    stage.after(ctx, state, new)
    rows.append({"step": f"SCAFFOLD server side ({clients} Δc_i validated, c updated)", "s": time.perf_counter() - t0})
    assert len(kept.updates) == clients
    params = sum(v.numel() for v in ups[0].tensors.values())
    for r in rows:
        r.update(clients=clients, params_per_update=params, threads=torch.get_num_threads())
        print(f"{r['step']:<60} {r['s']:6.3f} s", flush=True)
    return rows


# -- 4. gradient checkpointing: activation memory saved ------------------------------------------------------------
MEM_MODEL = {"hidden_size": 512, "intermediate_size": 1376, "num_layers": 8, "num_heads": 8,
             "max_position_embeddings": 1024}


def _memory_child(args: tuple[bool, int, int, int, str], queue) -> None:
    """In a fresh process: one client's local training with or without gradient checkpointing; the growth of the
    peak RSS over a warm-up client of batch 1 (which built the base, PEFT and the optimizer) is the training step's
    activation memory."""
    import torch

    from fedsim.config import scenario_from_dict
    from fedsim.driver import prepare
    from fedsim.runtime.worker import ClientJob, Worker, peak_rss_mb
    from fedsim.strategies import make_strategy
    from fedsim.types import RoundContext

    checkpointing, seq, batch, steps, data = args
    torch.set_num_threads(2)
    raw = {"rounds": 1, "model": {"tiny": MEM_MODEL},
           "data": {"source": data, "max_seq_len": seq, "task_field": None, "test": {"fraction": 0.1}},
           "partition": {"method": "iid", "min_samples": batch}, "clients": {"num_clients": 2, "per_round": 1},
           "training": {"local_steps": 1, "batch_size": 1, "lr": 0.001, "gradient_checkpointing": checkpointing},
           "resources": BASE["resources"], "logging": BASE["logging"]}
    small = scenario_from_dict(raw)
    big = scenario_from_dict(merge(raw, {"training": {"local_steps": steps, "batch_size": batch}}))
    prep = prepare(small)
    strategy = make_strategy("fedit")
    client = prep.clients[0]
    payload = strategy.configure(RoundContext(1, 1, 0), strategy.init_state(prep.spec), [client])[client.client_id]
    job = ClientJob(client, prep.parts[client.client_id], 1)
    worker = Worker(small, prep.data)
    worker.run_client(job, payload)
    before = peak_rss_mb()
    worker.scenario = big
    result, _ = worker.run_client(job, payload)
    after = peak_rss_mb()
    queue.put({"gradient_checkpointing": checkpointing, "seq": seq, "batch": batch, "peak_mb": after,
               "activation_mb": after - before, "step_s": result.metrics["train/time_s"] / steps,
               "loss": result.metrics["train/loss"]})


def memory(seq: int, batch: int, steps: int) -> list[dict]:
    import numpy as np
    from common import in_subprocess

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "long.jsonl"
        rng = np.random.default_rng(0)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
        with open(data, "w") as f:  # rows long enough that every sequence is max_seq_len tokens
            for _ in range(8 * batch):
                f.write(json.dumps({"instruction": "".join(rng.choice(letters, size=2 * seq)), "output": "abc"}) + "\n")
        for checkpointing in (False, True):
            r = in_subprocess(_memory_child, (checkpointing, seq, batch, steps, str(data)))
            rows.append(r)
            print(f"gradient_checkpointing={checkpointing!s:<5} peak RSS {r['peak_mb']:7.0f} MB, training's growth "
                  f"{r['activation_mb']:6.0f} MB, {r['step_s']:.2f} s/step, loss {r['loss']:.4f}", flush=True)
    return rows


# -- main -----------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["accuracy", "server", "overhead", "memory"],
                    choices=["accuracy", "server", "overhead", "memory"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--tune", action="store_true", help=f"choose each hyperparameter on seed {TUNE_SEED} first")
    ap.add_argument("--samples", type=int, default=8, help="--tune: trials per method")
    ap.add_argument("--base", choices=["random", "warm"], default="warm")
    ap.add_argument("--repeats", type=int, default=7, help="overhead: timed passes per variant")
    ap.add_argument("--steps", type=int, default=20, help="overhead: local steps per pass")
    ap.add_argument("--clients", type=int, default=500, help="server: updates per round")
    ap.add_argument("--seq", type=int, default=512, help="memory: tokens per sequence")
    ap.add_argument("--batch", type=int, default=8, help="memory: sequences per step")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    from fedsim.quiet import silence_libraries

    silence_libraries(mark=True)  # the libraries' notices off here and in the Tune trials' processes, as the CLI does
    base_tag = use_base(args)
    t_all = time.perf_counter()
    out: dict = {"command": f"python {' '.join(sys.argv)}",
                 "machine": f"{platform.machine()}, {mp.cpu_count()} cores"}
    lines = ["# FL baselines (benchmarks/fl_baselines.py)", "", f"command: `python {' '.join(sys.argv)}`",
             f"machine: {out['machine']}", ""]
    if "accuracy" in args.parts:
        methods = ["fedit", *[m for m in args.methods if m != "fedit"]]
        with tempfile.TemporaryDirectory() as work:
            chosen, grid = (tune(methods, args.rounds, args.jobs, args.samples, Path(work)) if args.tune
                            else (dict(TUNED), []))
        runs = [(m, chosen[m], seed, args.rounds) for m in methods for seed in range(args.seeds)]
        results = _pool_map(runs, args.jobs, "run")
        out.update(chosen=chosen, grid=grid, results=results)
        lines += [f"## Accuracy: {args.seeds} seeds, {args.rounds} rounds, {base_label()}", "",
                  "20 clients (5 per round), Dirichlet(0.5) task skew over the 8 synthetic tasks, rank 8, 20 local "
                  "steps of batch 16, AdamW 3e-3; exact-match accuracy on the global test set after the last round.",
                  "", *accuracy_report(results, chosen, grid, methods), ""]
    if "server" in args.parts:
        rows = server(args.clients)
        out["server"] = rows
        lines += [f"## The server at {args.clients} clients", "",
                  f"Rank-8 updates over the 7 projections of a 10M-parameter Llama (hidden 512, 4 layers; "
                  f"{rows[0]['params_per_update'] / 1e3:.0f}k parameters each), torch threads {rows[0]['threads']}. "
                  "Target: one server-optimizer step, aggregation included, ≤ 2 s.", "",
                  "| step | s |", "|---|---|", *[f"| {r['step']} | {r['s']:.3f} |" for r in rows],
                  f"| worst total: aggregate + slowest server step | "
                  f"{rows[0]['s'] + max(r['s'] for r in rows[1:]):.3f} |", ""]
    if "overhead" in args.parts:
        rows = overhead(args.repeats, args.steps)
        out["overhead"] = rows
        lines += ["## Per-step cost of the client objectives", "",
                  f"One client, {args.steps} local steps of batch 8 × 64 tokens, one thread; median over "
                  f"{args.repeats} interleaved passes of the trainer's own time per step (target ≤ 1.10× plain). "
                  "FedProx μ = 0.01; SCAFFOLD with c − c_i ≠ 0.", "",
                  "| model | variant | ms / step | × plain |", "|---|---|---|---|",
                  *[f"| {r['model']} | {r['variant']} | {r['step_ms']:.2f} | {r['ratio']:.3f} |" for r in rows], ""]
    if "memory" in args.parts:
        rows = memory(args.seq, args.batch, steps=3)
        out["memory"] = rows
        plain, ckpt = rows
        lines += ["## Gradient checkpointing: memory saved", "",
                  f"One client, 3 local steps of batch {args.batch} × {args.seq} tokens on a Llama of hidden 512, 8 "
                  "layers (built from config, float32, CPU, 2 threads), each setting in a fresh process after a "
                  "warm-up client of one sequence (which built the base, PEFT and the optimizer); peak RSS of the "
                  "process.", "",
                  "| gradient_checkpointing | RSS after the warm-up (MB) | peak RSS (MB) | s / step | train loss |",
                  "|---|---|---|---|---|",
                  *[f"| {r['gradient_checkpointing']} | {r['peak_mb'] - r['activation_mb']:.0f} | {r['peak_mb']:.0f} "
                    f"| {r['step_s']:.2f} | {r['loss']:.6f} |" for r in rows],
                  "", f"Saved: {plain['peak_mb'] - ckpt['peak_mb']:.0f} MB of peak memory "
                  f"({1 - ckpt['peak_mb'] / plain['peak_mb']:.0%}), at {ckpt['step_s'] / plain['step_s']:.2f}× the "
                  "time per step (on CPU, fresh activation buffers cost page faults, so the recompute can even come "
                  "out ahead).", ""]
    lines.append(f"wall time {time.perf_counter() - t_all:.0f} s")
    text = "\n".join(lines)
    print(text)
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    name = f"fl_baselines{base_tag}{args.tag}"
    (dest / f"{name}.md").write_text(text + "\n")
    (dest / f"{name}.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
