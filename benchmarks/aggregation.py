"""Aggregation at scale: one aggregation of N rank-8 updates over the seven projections of a 10M-parameter Llama
(hidden 512, intermediate 1376, 4 layers), for every registered strategy that aggregates, at N = 100, 250 and 500;
with each result checked against its definition (FLoRA / FlexLoRA / FedEx-LoRA: the exact Σ p_k s_k B_k A_k).

Imported by benchmarks/scale.py (``--aggregation``), or run alone. Writes ``aggregation.md`` / ``aggregation.json``
under benchmarks/results/.

Usage: python benchmarks/aggregation.py [--clients 100 250 500] [--strategies ...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

HIDDEN, INTER, LAYERS, RANK = 512, 1376, 4, 8


def shapes() -> dict:
    from fedsim.types import ModuleShape

    out = {}
    for layer in range(LAYERS):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"model.layers.{layer}.self_attn.{p}"] = ModuleShape(d_in=HIDDEN, d_out=HIDDEN)
        out[f"model.layers.{layer}.mlp.gate_proj"] = ModuleShape(d_in=HIDDEN, d_out=INTER)
        out[f"model.layers.{layer}.mlp.up_proj"] = ModuleShape(d_in=HIDDEN, d_out=INTER)
        out[f"model.layers.{layer}.mlp.down_proj"] = ModuleShape(d_in=INTER, d_out=HIDDEN)
    return out


def updates(n: int, strategy, lora, seed: int = 0) -> list:
    import torch

    from fedsim.lora import ops
    from fedsim.types import ClientUpdate

    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n):
        t = {}
        for m, s in shapes().items():
            t[ops.a_key(m)] = torch.randn(lora.rank, s.d_in, generator=g) * 0.02
            t[ops.b_key(m)] = torch.randn(s.d_out, lora.rank, generator=g) * 0.02
        out.append(ClientUpdate(c, 10 + c % 7, lora, {k: v for k, v in t.items() if strategy.is_shared(k)}))
    return out


def exact_error(name: str, new, ups) -> float | None:
    """max over modules of ‖global ΔW − Σ p_k s_k B_k A_k‖ / ‖Σ …‖ for the strategies defined to be exact."""
    from fedsim.lora import ops

    if name not in ("flora", "flexlora", "fedex"):
        return None
    p = ops.normalized_weights(u.num_examples for u in ups)
    worst = 0.0
    for m in list(shapes())[4:7]:  # the three MLP projections suffice to check (the reference is slow)
        want = sum(float(p[k]) * u.lora.scaling * (u.tensors[ops.b_key(m)].double() @ u.tensors[ops.a_key(m)].double())
                   for k, u in enumerate(ups))
        if name == "flexlora":
            got = ops.delta_w(new.tensors, m, new.lora.scaling).double()
        else:
            d = new.base_deltas[-1]
            got = (d[f"{m}.delta_B"].double() @ d[f"{m}.delta_A"].double() if f"{m}.delta_B" in d
                   else d[f"{m}.delta_W"].double())
            if name == "fedex":
                got = got + ops.delta_w(new.tensors, m, new.lora.scaling).double()
        worst = max(worst, float((got - want).norm() / want.norm()))
    return worst


def measure(names: list[str], clients: list[int]) -> list[dict]:
    import torch

    from fedsim.strategies import StrategySpec, available_strategies, make_strategy
    from fedsim.types import ClientSpec, LoraSpec, RoundContext

    lora = LoraSpec(RANK, 2.0 * RANK)
    ctx = RoundContext(1, 3, 0)
    rows = []
    for name in names:
        if not available_strategies()[name].aggregates:
            continue
        for n in clients:
            strategy = make_strategy(name)
            state = strategy.init_state(StrategySpec(shapes(), lora, 0))
            state.extras.pop("round1", None)  # FlexLoRA: a round after the first (its configure truncates ΔW)
            ups = updates(n, strategy, lora)
            t0 = time.perf_counter()
            new = strategy.aggregate(ctx, state, ups)
            agg = time.perf_counter() - t0
            t0 = time.perf_counter()
            strategy.configure(RoundContext(2, 3, 0), new, [ClientSpec(0, 10, lora)])
            conf = time.perf_counter() - t0
            err = exact_error(name, new, ups)
            rows.append({"strategy": name, "clients": n, "aggregate_s": agg, "configure_s": conf, "exact_error": err,
                         "threads": torch.get_num_threads()})
            print(f"{name:<9} {n:>4} clients: aggregate {agg:6.2f} s, configure {conf:5.2f} s"
                  + (f", relative error vs exact {err:.1e}" if err is not None else ""), flush=True)
            del ups, new
    return rows


def report(rows: list[dict], argv: list[str]) -> str:
    ns = sorted({r["clients"] for r in rows})
    lines = ["# Aggregation at scale (benchmarks/aggregation.py)", "",
             f"command: python {' '.join(argv)}",
             f"machine: {platform.machine()}, {mp.cpu_count()} cores, torch threads {rows[0]['threads']}; "
             f"rank-{RANK} updates over a Llama of hidden {HIDDEN}, intermediate {INTER}, {LAYERS} layers (7 "
             "projections each, 10M parameters); one strategy.aggregate call, and the next round's configure "
             "(where FlexLoRA truncates ΔW per client); target ≤ 2 s at 500 clients.", "",
             "| strategy | " + " | ".join(f"aggregate, {n} (s)" for n in ns) + f" | configure, {ns[-1]} (s) | "
             f"{ns[-1]} vs {ns[0]} | error vs exact |", "|---" * (len(ns) + 4) + "|"]
    for name in dict.fromkeys(r["strategy"] for r in rows):
        mine = {r["clients"]: r for r in rows if r["strategy"] == name}
        err = mine[ns[-1]]["exact_error"]
        lines.append(f"| {name} | " + " | ".join(f"{mine[n]['aggregate_s']:.2f}" for n in ns)
                     + f" | {mine[ns[-1]]['configure_s']:.2f} | "
                     f"{mine[ns[-1]]['aggregate_s'] / max(mine[ns[0]]['aggregate_s'], 1e-9):.1f}× "
                     f"(clients {ns[-1] / ns[0]:.0f}×) | {'—' if err is None else f'{err:.1e}'} |")
    return "\n".join(lines)


def main() -> int:
    from fedsim.strategies import available_strategies

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 250, 500])
    ap.add_argument("--strategies", nargs="+", default=sorted(available_strategies()))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    rows = measure(args.strategies, args.clients)
    text = report(rows, sys.argv)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aggregation.md").write_text(text + "\n")
    (out / "aggregation.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
