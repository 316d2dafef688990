"""Privacy and robustness (issue #27) side by side.

1. ``speed``: at 500 rank-8 updates over the 10M-parameter shapes of ``benchmarks/aggregation.py``, FedIT's aggregation
   alone, then with each robust rule (``strategy.robust``) and with central differential privacy (clipping, noise, one
   accountant step) around it; and local DP's transform per client update. Target: a robust aggregation ≤ 2 s;
   clipping and noise negligible next to the round.
2. ``robustness``: the synthetic setting of ``benchmarks/fl_baselines.py`` (20 clients, Dirichlet(0.5) task skew, rank
   8, 20 local steps) with 10 clients per round; 0%, 10% and 30% of the clients malicious (each sends −10 × its change:
   ``sign_flip``, factor 10) × the mean (FedIT), the coordinate-wise median, the trimmed mean (β = 0.3) and Krum
   (f = 3); final accuracy over ``--seeds`` seeds.
3. ``privacy``: the privacy–utility curve of central DP-FedAvg for FedIT and FFA-LoRA on the same setting: the clipping
   norm C of each strategy set to the median norm of its clients' updates in a run without DP (on a seed that is not
   reported), then σ over ``--sigmas``; ε at δ = 1e-2 (RDP accountant, q = 10/20, the rounds given) against final
   accuracy over the seeds. FFA-LoRA's paper argues that freezing A suits differential privacy (half the noised
   coordinates, no noise multiplied by noise in B·A): does it hold here?

Writes ``privacy_robustness{tag}.md`` / ``.json`` under benchmarks/results/.

Usage: python benchmarks/privacy_robustness.py [--parts speed robustness privacy] [--seeds 3] [--rounds 20]
       [--sigmas 0 0.01 0.03 0.1 0.3] [--base warm|random] [--jobs 2]
"""

from __future__ import annotations

import argparse
import dataclasses
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
from fl_baselines import BASE  # noqa: E402

SETTING = merge(BASE, {"clients": {"per_round": 10}})
TUNE_SEED = 1000
DELTA = 1e-2
ATTACK = {"attack": "sign_flip", "factor": 10.0}
RULES = {"mean": None, "median": {"method": "median"}, "trimmed_mean": {"method": "trimmed_mean", "trim": 0.3},
         "krum": {"method": "krum", "byzantine": 3}}


# -- 1. speed --------------------------------------------------------------------------------------------------------
def speed(clients: int) -> list[dict]:
    import aggregation
    import torch

    from fedsim.pipeline.privacy import CentralPrivacy, LocalPrivacy, PrivacyAccountant
    from fedsim.pipeline.robust import RobustAggregation
    from fedsim.pipeline.transforms import TransformContext
    from fedsim.strategies import StrategySpec, make_strategy
    from fedsim.types import LoraSpec, RoundContext

    lora = LoraSpec(aggregation.RANK, 2.0 * aggregation.RANK)
    ctx = RoundContext(2, 3, 0)
    strategy = make_strategy("fedit")
    state = strategy.init_state(StrategySpec(aggregation.shapes(), lora, 0))
    ups = aggregation.updates(clients, strategy, lora)

    def timed(stage) -> tuple[float, float]:
        """(the whole aggregation, the stage's own part of it)."""
        t0 = time.perf_counter()
        kept = stage.before(ctx, state, ups).updates if stage else ups
        t1 = time.perf_counter()
        new = strategy.aggregate(ctx, state, kept)
        t2 = time.perf_counter()
        if stage:
            stage.after(ctx, state, new)
            stage.end_round(ctx, ups)
        t3 = time.perf_counter()
        return t3 - t0, (t1 - t0) + (t3 - t2) if stage else t2 - t1

    accountant = PrivacyAccountant("central", 1.0, clients / 10_000, 1e-5)
    stages = {"FedIT aggregate (the mean)": None,
              **{f"+ {name}": RobustAggregation(**rule) for name, rule in RULES.items() if rule},
              "+ multi_krum (f = 50, m = 400)": RobustAggregation("multi_krum", byzantine=50, select=400),
              "+ norm_bound": RobustAggregation("norm_bound", max_norm=1.0),
              "+ central DP (clip, noise, RDP step)": CentralPrivacy(1.0, 1.0, clients, accountant, strategy.is_shared),
              "+ central DP, adaptive clipping": CentralPrivacy(1.0, 1.0, clients, accountant, strategy.is_shared,
                                                                adaptive=(0.5, 0.2, clients / 20))}
    rows = []
    for label, stage in stages.items():
        s, own = min(timed(stage) for _ in range(2))
        rows.append({"step": label, "s": s, "stage_s": own})
        print(f"{label:<45} {s:6.3f} s (its own part {own:.3f} s)", flush=True)
    local = LocalPrivacy(1.0, 1.0)
    start = {k: state.tensors[k] for k in ups[0].tensors}
    t0 = time.perf_counter()
    for u in ups[:50]:
        local(u.tensors, TransformContext(0, 2, u.client_id, 1, start))
    per = (time.perf_counter() - t0) / 50
    rows.append({"step": "local DP transform, per client update", "s": per, "stage_s": per})
    print(f"local DP per update {per * 1000:.1f} ms", flush=True)
    params = sum(v.numel() for v in ups[0].tensors.values())
    for r in rows:
        r.update(clients=clients, params_per_update=params, threads=torch.get_num_threads())
    return rows


# -- 2./3. runs -----------------------------------------------------------------------------------------------------
def _norms_transform():
    from fedsim.pipeline.transforms import UpdateTransform

    @dataclasses.dataclass(frozen=True)
    class Norms(UpdateTransform):
        log: list = dataclasses.field(default_factory=list, compare=False)

        def __call__(self, tensors, ctx):
            start = ctx.start or {}
            self.log.append(float(sum(float(((tensors[k] - start[k]).double() ** 2).sum()) for k in tensors) ** 0.5))
            return tensors, {}

    return Norms()


def run_one(args: tuple) -> dict:
    """(kind, label, seed, rounds, overrides) → the run's final accuracy (and, for ``calibrate``, its update norms)."""
    kind, label, seed, rounds, extra = args
    from fedsim.components import resolve
    from fedsim.config import scenario_from_dict
    from fedsim.driver import run_scenario

    raw = with_base(merge(SETTING, {"name": f"{kind}-{seed}", "seed": seed, "rounds": rounds, **extra}))
    sc = scenario_from_dict(raw)
    comp = resolve(sc)
    norms = _norms_transform() if kind == "calibrate" else None
    if norms is not None:
        comp = dataclasses.replace(comp, transforms=(*comp.transforms, norms))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = run_scenario(sc, Path(tmp) / "run", components=comp)
    out = {"kind": kind, "label": label, "seed": seed, "final_accuracy": summary["final/eval/accuracy"],
           "epsilon": (summary.get("privacy") or {}).get("epsilon"), "time_s": time.perf_counter() - t0}
    if norms is not None:
        out["norms"] = norms.log
    return out


def pool_map(runs: list[tuple], jobs: int) -> list[dict]:
    out = []
    with mp.get_context("spawn").Pool(jobs) as pool:
        for i, r in enumerate(pool.imap_unordered(run_one, runs), start=1):
            out.append(r)
            print(f"[{r['kind']} {i}/{len(runs)}] {r['label']!s:<28} seed {r['seed']:>4}: accuracy "
                  f"{r['final_accuracy']:.3f} ε {r['epsilon']} ({r['time_s']:.0f} s)", flush=True)
    return out


def robustness_runs(seeds: list[int], rounds: int) -> list[tuple]:
    runs = []
    for share in (0.0, 0.1, 0.3):
        for rule, robust in RULES.items():
            strategy = {"name": "fedit", **({"robust": robust} if robust else {})}
            clients = {"malicious": {"fraction": share, **ATTACK}} if share else {}
            runs += [("robustness", (share, rule), s, rounds, {"strategy": strategy, "clients": clients})
                     for s in seeds]
    return runs


def robustness_report(results: list[dict], seeds: list[int]) -> list[str]:
    lines = [f"10 of 20 clients per round; malicious clients send −10 × their change (sign_flip, factor 10); trimmed "
             f"mean β = 0.3, Krum f = 3. Final accuracy, mean ± std over {len(seeds)} seeds.", "",
             "| malicious | " + " | ".join(RULES) + " |", "|---|" + "---|" * len(RULES)]
    for share in (0.0, 0.1, 0.3):
        cells = [mean_std([r["final_accuracy"] for r in results if tuple(r["label"]) == (share, rule)])
                 for rule in RULES]
        lines.append(f"| {share:.0%} | " + " | ".join(cells) + " |")
    return lines


def calibrate(strategies: list[str], rounds: int, jobs: int) -> dict[str, float]:
    """Each strategy's clipping norm: the median norm of its updates in a run without DP (seed TUNE_SEED)."""
    runs = [("calibrate", name, TUNE_SEED, rounds, {"strategy": {"name": name}}) for name in strategies]
    return {r["label"]: statistics.median(r["norms"]) for r in pool_map(runs, jobs)}


def privacy_runs(clips: dict[str, float], sigmas: list[float], seeds: list[int], rounds: int) -> list[tuple]:
    return [("privacy", (name, sigma), s, rounds,
             {"strategy": {"name": name}, "privacy": {"clipping_norm": clips[name], "noise_multiplier": sigma,
                                                      "delta": DELTA}})
            for name in clips for sigma in sigmas for s in seeds]


def privacy_report(results: list[dict], clips: dict[str, float], sigmas: list[float], seeds: list[int],
                   plain: dict[str, list[float]]) -> list[str]:
    lines = [f"Central DP-FedAvg, 10 of 20 clients per round (q = 0.5), δ = {DELTA:g}; C per strategy = the median "
             f"update norm without DP (seed {TUNE_SEED}): " + ", ".join(f"{k} {v:.3g}" for k, v in clips.items())
             + f". Final accuracy, mean ± std over {len(seeds)} seeds; σ = 0 clips without noise.", "",
             "| σ | ε (RDP) | " + " | ".join(clips) + " | " + " − ".join(reversed(list(clips))) + ", paired |",
             "|---|---|" + "---|" * (len(clips) + 1)]
    lines.append("| no DP | — | " + " | ".join(mean_std(plain[n]) for n in clips) + " | "
                 + _paired(plain, list(clips)) + " |")
    for sigma in sigmas:
        acc = {n: [r["final_accuracy"] for r in sorted(results, key=lambda r: r["seed"])
                   if tuple(r["label"]) == (n, sigma)] for n in clips}
        eps = next((r["epsilon"] for r in results if tuple(r["label"])[1] == sigma), None)
        eps_s = "∞" if eps is None or eps == float("inf") else f"{eps:.3g}"
        lines.append(f"| {sigma:g} | {eps_s} | " + " | ".join(mean_std(acc[n]) for n in clips) + " | "
                     + _paired(acc, list(clips)) + " |")
    return lines


def _paired(acc: dict[str, list[float]], names: list[str]) -> str:
    if len(names) != 2 or not acc[names[0]] or len(acc[names[0]]) != len(acc[names[1]]):
        return "—"
    diffs = [b - a for a, b in zip(acc[names[0]], acc[names[1]])]
    return f"{mean_std(diffs)} ({sum(d > 0 for d in diffs)}/{len(diffs)} ahead)"


# -- main -----------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["speed", "robustness", "privacy"],
                    choices=["speed", "robustness", "privacy"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1, 0.3])
    ap.add_argument("--clients", type=int, default=500, help="speed: updates per aggregation")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--base", choices=["random", "warm"], default="warm")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    base_tag = use_base(args)
    t_all = time.perf_counter()
    seeds = list(range(args.seeds))
    out: dict = {"command": f"python {' '.join(sys.argv)}", "machine": f"{platform.machine()}, {mp.cpu_count()} cores"}
    md = ["# Privacy and robustness (benchmarks/privacy_robustness.py)", "", f"command: `{out['command']}`",
          f"machine: {out['machine']}", ""]
    if "speed" in args.parts:
        rows = out["speed"] = speed(args.clients)
        md += [f"## Server cost at {args.clients} rank-8 updates (10M-parameter shapes of benchmarks/aggregation.py)",
               "", f"{rows[0]['params_per_update']:,} parameters per update, {rows[0]['threads']} torch threads; "
               "best of 2; the strategy's aggregation included in every line (\"s\"), and the stage's own part beside it.",
               "", "| step | s | the stage alone, s |", "|---|---|---|"]
        md += [f"| {r['step']} | {r['s']:.3f} | {r['stage_s']:.3f} |" for r in rows] + [""]
    if "robustness" in args.parts:
        res = out["robustness"] = pool_map(robustness_runs(seeds, args.rounds), args.jobs)
        md += [f"## Robustness: {args.rounds} rounds, {base_label()}", ""] + robustness_report(res, seeds) + [""]
        save(args, base_tag, out, md)  # a later part's failure must not cost this one's hour
    if "privacy" in args.parts:
        clips = out["clips"] = calibrate(["fedit", "ffa"], args.rounds, args.jobs)
        plain_runs = pool_map([("privacy", (n, "none"), s, args.rounds, {"strategy": {"name": n}})
                               for n in clips for s in seeds], args.jobs)
        plain = {n: [r["final_accuracy"] for r in sorted(plain_runs, key=lambda r: r["seed"])
                     if tuple(r["label"])[0] == n] for n in clips}
        res = out["privacy"] = pool_map(privacy_runs(clips, args.sigmas, seeds, args.rounds), args.jobs)
        out["plain"] = plain
        md += [f"## Privacy–utility: {args.rounds} rounds, {base_label()}", ""]
        md += privacy_report(res, clips, args.sigmas, seeds, plain) + [""]
    md.append(f"wall time {time.perf_counter() - t_all:.0f} s")
    save(args, base_tag, out, md)
    print("\n".join(md))
    return 0


def save(args, base_tag: str, out: dict, md: list[str]) -> None:
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    name = f"privacy_robustness{base_tag}{args.tag}"
    (dest / f"{name}.json").write_text(json.dumps(out, indent=1, default=str))
    (dest / f"{name}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
