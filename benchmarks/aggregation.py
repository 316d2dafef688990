"""Aggregation at scale: one aggregation of N rank-8 updates over the seven projections of a 10M-parameter Llama
(hidden 512, intermediate 1376, 4 layers), for every registered strategy that aggregates, at N = 100, 250 and 500;
with each result checked against its definition (FLoRA / FlexLoRA / FedEx-LoRA: the exact Σ p_k s_k B_k A_k).

Each aggregation is timed twice: the first call (a fresh strategy: its buffers allocated and paged in) and the steady
call (the same call again). For the strategies that sum products (FLoRA, FlexLoRA, FedEx-LoRA) the table also gives the
gathered floor: Σ c_k B_k A_k of every module by one GEMM over all the round's stacked factors — the arithmetic any
exact aggregation must do, at the best GEMM efficiency, with the whole round in memory. ``--previous-flush`` times
FLoRA and FlexLoRA with the flush rule before #50 (a product sum took its waiting blocks at 1/8 of its size) beside
the current one, alternating, under the same load.

Imported by benchmarks/scale.py (``--aggregation``), or run alone. Writes ``aggregation.md`` / ``aggregation.json``
under benchmarks/results/.

Usage: python benchmarks/aggregation.py [--clients 100 250 500] [--strategies ...] [--previous-flush]
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


PRODUCT_SUMS = ("flora", "flexlora", "fedex")


def gathered_floor(ups) -> float:
    """Seconds for Σ c_k B_k A_k of every module by one GEMM over all the updates' stacked factors (float32)."""
    import torch

    from fedsim.lora import ops

    t0 = time.perf_counter()
    for m in shapes():
        b_s = torch.cat([u.tensors[ops.b_key(m)] * u.lora.scaling for u in ups], dim=1)
        a_s = torch.cat([u.tensors[ops.a_key(m)] for u in ups], dim=0)
        b_s @ a_s
    return time.perf_counter() - t0


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
            strategy.aggregate(ctx, state, ups)
            steady = time.perf_counter() - t0
            t0 = time.perf_counter()
            strategy.configure(RoundContext(2, 3, 0), new, [ClientSpec(0, 10, lora)])
            conf = time.perf_counter() - t0
            floor = gathered_floor(ups) if name in PRODUCT_SUMS else None
            err = exact_error(name, new, ups)
            rows.append({"strategy": name, "clients": n, "aggregate_s": agg, "steady_s": steady, "configure_s": conf,
                         "floor_s": floor, "exact_error": err, "threads": torch.get_num_threads()})
            print(f"{name:<9} {n:>4} clients: aggregate {agg:6.2f} s (steady {steady:6.2f} s), configure {conf:5.2f} s"
                  + (f", gathered floor {floor:5.2f} s" if floor is not None else "")
                  + (f", relative error vs exact {err:.1e}" if err is not None else ""), flush=True)
            del ups, new
    return rows


def previous_flush(clients: list[int], repeats: int = 2) -> list[dict]:
    """FLoRA and FlexLoRA aggregations with the flush rule before #50 and with the current one, alternating."""
    from fedsim.strategies import StrategySpec, fold, make_strategy
    from fedsim.types import LoraSpec, RoundContext

    current = fold.Partial.product

    def before(self, module, client_id, b, a, coef, stacked_until=0.0):  # the rule before #50, as it was
        self.stack(module, client_id, b, a, coef)
        width = self.width(module)
        if module not in self.dense and width <= stacked_until:
            return
        d_out, d_in = b.shape[0], a.shape[1]
        if module not in self.dense or 8 * width * (d_out + d_in) >= d_out * d_in or width >= fold.FLUSH_COLUMNS:
            self.flush(module)

    lora, rows = LoraSpec(RANK, 2.0 * RANK), []
    for name in ("flora", "flexlora"):
        for n in clients:
            strategy = make_strategy(name)
            state = strategy.init_state(StrategySpec(shapes(), lora, 0))
            state.extras.pop("round1", None)
            ups = updates(n, strategy, lora)
            times: dict[str, list[float]] = {"before": [], "now": []}
            try:
                for _ in range(repeats):
                    for rule, product in (("before", before), ("now", current)):
                        fold.Partial.product = product
                        t0 = time.perf_counter()
                        strategy.aggregate(RoundContext(1, 3, 0), state, ups)
                        times[rule].append(time.perf_counter() - t0)
            finally:
                fold.Partial.product = current
            rows.append({"strategy": name, "clients": n, "before_s": min(times["before"]), "now_s": min(times["now"])})
            print(f"{name:<9} {n:>4} clients: flush rule before #50 {rows[-1]['before_s']:.2f} s, now "
                  f"{rows[-1]['now_s']:.2f} s ({rows[-1]['before_s'] / rows[-1]['now_s']:.2f}×)", flush=True)
    return rows


def report(rows: list[dict], argv: list[str], flush_rows: list[dict] = ()) -> str:
    ns = sorted({r["clients"] for r in rows})
    lines = ["# Aggregation at scale (benchmarks/aggregation.py)", "",
             f"command: python {' '.join(argv)}",
             f"machine: {platform.machine()}, {mp.cpu_count()} cores, torch threads {rows[0]['threads']}; "
             f"rank-{RANK} updates over a Llama of hidden {HIDDEN}, intermediate {INTER}, {LAYERS} layers (7 "
             "projections each, 10M parameters); one strategy.aggregate call (first, then steady: the same call "
             "again), and the next round's configure (where FlexLoRA truncates ΔW per client). Gathered floor: one "
             "GEMM per module over all the round's stacked factors (the product sums' arithmetic at its most "
             "efficient, the whole round in memory).", "",
             "| strategy | " + " | ".join(f"aggregate, {n} (s)" for n in ns) + f" | steady, {ns[-1]} (s) | "
             f"configure, {ns[-1]} (s) | gathered floor, {ns[-1]} (s) | {ns[-1]} vs {ns[0]} | error vs exact |",
             "|---" * (len(ns) + 6) + "|"]
    for name in dict.fromkeys(r["strategy"] for r in rows):
        mine = {r["clients"]: r for r in rows if r["strategy"] == name}
        last = mine[ns[-1]]
        err, floor = last["exact_error"], last.get("floor_s")
        lines.append(f"| {name} | " + " | ".join(f"{mine[n]['aggregate_s']:.2f}" for n in ns)
                     + f" | {last.get('steady_s', float('nan')):.2f} | {last['configure_s']:.2f} | "
                     f"{'—' if floor is None else f'{floor:.2f}'} | "
                     f"{last['aggregate_s'] / max(mine[ns[0]]['aggregate_s'], 1e-9):.1f}× "
                     f"(clients {ns[-1] / ns[0]:.0f}×) | {'—' if err is None else f'{err:.1e}'} |")
    if flush_rows:
        lines += ["", "The product sums' flush rule, side by side (alternating, best of 2 each): before #50 a sum took "
                  "its waiting blocks at 1/8 of its size (every 32 columns on the 512 × 512 projections); now at 256 "
                  "columns or its own size.", "", "| strategy | clients | before (s) | now (s) | speed-up |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['strategy']} | {r['clients']} | {r['before_s']:.2f} | {r['now_s']:.2f} | "
                  f"{r['before_s'] / r['now_s']:.2f}× |" for r in flush_rows]
    return "\n".join(lines)


def main() -> int:
    from fedsim.strategies import available_strategies

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 250, 500])
    ap.add_argument("--strategies", nargs="+", default=sorted(available_strategies()))
    ap.add_argument("--previous-flush", action="store_true", help="also time the flush rule before #50, alternating")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    rows = measure(args.strategies, args.clients)
    flush_rows = previous_flush(args.clients) if args.previous_flush else []
    text = report(rows, sys.argv, flush_rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aggregation.md").write_text(text + "\n")
    (out / "aggregation.json").write_text(json.dumps({"rows": rows, "flush": flush_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
