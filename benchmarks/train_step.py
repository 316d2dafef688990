"""One local training step, four ways, measured side by side in one run: PEFT's LoRA forward or fedsim's fused one
(scaling and residual add inside one ``addmm``), and the LM head at every position (transformers' ``.loss``) or at
the labelled positions only (``fedsim.models.lm_loss``).

Workload: overhead.py's — the tiny model, LoRA r = 8 on its seven projections, batches of 8 × 64 tokens whose last 7
tokens are labelled, AdamW with clipping, one thread; per repeat 20 clients × 5 steps in each way, interleaved so
that a drift in machine speed hits all four alike. Prints the median time per step of each and the ratio to PEFT's
full-logits step; writes benchmarks/results/train_step.md.

Usage: python benchmarks/train_step.py [--repeats 6] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import overhead


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    import torch
    from peft.tuners.lora.layer import Linear

    from fedsim.config import ModelConfig
    from fedsim.models.adapters import AdapterHost, fused_lora_forward
    from fedsim.models.base import build_base_model
    from fedsim.models.lm_loss import causal_lm_loss
    from fedsim.types import LoraSpec

    torch.set_num_threads(1)
    cfg, lora = ModelConfig(), LoraSpec(overhead.RANK, 16.0)
    host = AdapterHost(build_base_model(cfg), cfg.target_modules)
    host.activate(lora)
    params = host.set_trainable(lora, ("A", "B"))
    model = host.model
    model.train()
    layers = [m for m in model.modules() if type(m) is Linear]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 384, (overhead.BATCH, overhead.SEQ), generator=gen)
    labels = ids.clone()
    labels[:, : overhead.SEQ - 7] = -100

    def full_loss():
        return model(input_ids=ids, labels=labels).loss

    def kept_loss():
        return causal_lm_loss(model, ids, labels)

    ways = {"PEFT forward, all logits": (False, full_loss), "PEFT forward, labelled logits": (False, kept_loss),
            "fused forward, all logits": (True, full_loss), "fused forward, labelled logits (fedsim)": (True, kept_loss)}

    def run(fused: bool, loss_fn, clients: int = 20) -> float:
        for m in layers:
            if fused:
                m.forward = fused_lora_forward.__get__(m)
            else:
                m.__dict__.pop("forward", None)
        t0 = time.perf_counter()
        for _ in range(clients):
            opt = torch.optim.AdamW(params, lr=1e-3)
            for _ in range(overhead.STEPS):
                loss_fn().backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / (clients * overhead.STEPS)

    for fused, fn in ways.values():  # warm-up
        run(fused, fn, 2)
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.repeats):
        for name, (fused, fn) in ways.items():
            times[name].append(run(fused, fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["PEFT forward, all logits"]
    lines = ["# One LoRA training step, four ways (benchmarks/train_step.py)", "",
             f"command: python benchmarks/train_step.py --repeats {args.repeats}",
             f"machine: {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, one thread",
             "workload: tiny model, LoRA r=8 on 7 projections, batch 8 × 64 tokens (last 7 labelled), AdamW + "
             f"clipping; medians of {args.repeats} interleaved repeats of 20 clients × 5 steps", "",
             "| | ms per step | / PEFT, all logits |", "|---|---|---|"]
    lines += [f"| {k} | {1e3 * v:.2f} | {v / ref:.3f} |" for k, v in med.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
