"""Generation-based evaluation against a plain batched ``model.generate`` loop, side by side in one run.

Workload: the prompts of the shipped Alpaca fixture (scenarios/data/alpaca_tiny.json, 120 rows, prompts of 130–250
byte tokens), the built-in tiny Llama wrapped by PEFT with a rank-8 adapter — the model evaluation uses —, greedy,
``max_new_tokens`` 32, batches of 16. fedsim: :func:`fedsim.eval.generation.generate_batch` over
:func:`fedsim.federation.evaluation.generation_batches` (prompts ordered by length). Plain: the prompts' text through
the tokenizer with left padding, ``model.generate`` on batches in file order, decoded. Repeats interleaved; medians.
Prints tokens/s of each and the ratio (target ≥ 1.0), and the share of a round spent in evaluation for
scenarios/alpaca.yaml with generation every round; writes benchmarks/results/generation.md.

Usage: python benchmarks/generation.py [--repeats 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    import numpy as np
    import torch

    from fedsim.config import GenerateConfig, load_scenario
    from fedsim.data.datasets import load_data
    from fedsim.eval.generation import generate_batch, until_eos
    from fedsim.federation.evaluation import generation_batches
    from fedsim.models.adapters import AdapterHost
    from fedsim.models.base import build_base_model, load_tokenizer
    from fedsim.types import LoraSpec

    sc = load_scenario(str(ROOT / "scenarios" / "alpaca.yaml"), ["data.test.fraction=0.01"])
    data = load_data(sc)
    split = data.train  # 118 prompts
    tok = load_tokenizer(sc.model)
    torch.manual_seed(0)
    host = AdapterHost(build_base_model(sc.model), sc.model.target_modules)
    host.activate(LoraSpec(8, 16.0))
    model = host.model.eval()
    cfg = GenerateConfig(max_new_tokens=32, batch_size=16, max_samples=None)
    device = torch.device("cpu")
    n = len(split)
    texts = [tok.decode(split.sample(i)[: int(split.prompt_len[i])]) for i in range(n)]

    def fedsim_way() -> dict[int, str]:
        preds = {}
        for b in generation_batches(n, cfg, 0, split.prompt_len):
            out, _ = generate_batch(model, data, b, tok, cfg, device, seed=0, split=split)
            preds.update({int(i): p for i, p in zip(b, out.predictions)})
        return preds

    def plain_way() -> dict[int, str]:
        preds = {}
        for i in range(0, n, cfg.batch_size):
            enc = tok(texts[i : i + cfg.batch_size], return_tensors="pt", padding=True, padding_side="left",
                      add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                     eos_token_id=data.eos_id, pad_token_id=data.pad_id)
            for j, row in enumerate(gen[:, enc["input_ids"].shape[1]:].tolist()):
                useful = until_eos(row, data.eos_id)
                useful_tokens[i + j] = len(useful) + (len(useful) < len(row))  # with the EOS that ended it
                preds[i + j] = tok.decode(useful, skip_special_tokens=True).strip()
        return preds

    threads = torch.get_num_threads()  # (a run below configures its own)
    useful_tokens: dict[int, int] = {}
    times: dict[str, list[float]] = {"fedsim": [], "plain": []}
    preds: dict[str, dict[int, str]] = {}
    for _ in range(args.repeats):
        for name, fn in (("fedsim", fedsim_way), ("plain", plain_way)):
            t0 = time.perf_counter()
            preds[name] = fn()
            times[name].append(time.perf_counter() - t0)
    total = sum(useful_tokens.values())  # the same greedy answers both ways: the tokens a user gets
    same = sum(preds["fedsim"][i] == preds["plain"][i] for i in range(n)) / n
    rate = {k: total / statistics.median(v) for k, v in times.items()}
    ratio = rate["fedsim"] / rate["plain"]

    from fedsim.driver import run_scenario

    with tempfile.TemporaryDirectory() as tmp:
        run = load_scenario(str(ROOT / "scenarios" / "alpaca.yaml"),
                            ["rounds=3", "eval.generate.every=1", "logging.wandb.mode=disabled",
                             "logging.console=false"])
        run_scenario(run, Path(tmp) / "run")
        import json

        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    share = float(np.mean([r["time/eval_s"] / r["time_s"] for r in rows]))
    lines = [
        "# Generation-based evaluation vs a plain batched model.generate loop",
        "",
        f"`python benchmarks/generation.py --repeats {args.repeats}` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {threads} threads; {n} prompts of the Alpaca fixture, the tiny "
        f"Llama with a rank-8 PEFT adapter, greedy, max_new_tokens {cfg.max_new_tokens}, batches of {cfg.batch_size}.",
        "",
        "| way | median s | generated tokens | tokens/s |",
        "|---|---|---|---|",
        *(f"| {k} | {statistics.median(times[k]):.2f} | {total} | {rate[k]:.0f} |" for k in ("fedsim", "plain")),
        "",
        f"**fedsim / plain: {ratio:.2f}×** tokens/s (target ≥ 1.0); the two ways' answers agree on {same:.0%} of the "
        "prompts (greedy; left padding differs in batch composition only).",
        "",
        f"Share of a round spent in evaluation (scenarios/alpaca.yaml, 3 rounds, generation every round, 24 test "
        f"prompts): {share:.0%} (mean of time/eval_s / time_s).",
    ]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
