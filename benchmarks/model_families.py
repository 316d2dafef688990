"""Model families: fedsim's round against a plain PEFT training loop on the same steps, per family, side by side in
one run (issue #25, point 7; the method of benchmarks/overhead.py).

Families (offline stand-ins built from config by ``model.config``, randomly initialised, byte-level tokenizer; no
dropout): Llama (the tiny model, hidden 64, 2 layers, LoRA on its seven projections), GPT-2 (n_embd 64, 2 layers,
LoRA on its Conv1D c_attn / c_proj / c_fc) and a RoBERTa sequence classifier (hidden 64, 2 layers, LoRA on query and
value, the classification head trained in full and averaged by the server).

Workload per round: every client × 5 local steps of batch 8 × 64 tokens (the classifier: 60 tokens of text and a
label), r = 8, AdamW, gradient clipping at 1.0; 2 Ray workers (1 CPU, 1 thread each).

Floor (measured before and after fedsim, in the same run): the same steps on a model wrapped once by PEFT's
``get_peft_model`` (the classifier's head trainable), split over 2 plain processes with one thread each — a fresh
AdamW per client, the task's own loss (fedsim's: the causal LM's at the labelled positions; the classifier's
cross-entropy), nothing else: no adapter swaps, no data collation, no communication, no aggregation. Its round time
is the slower process's. fedsim's is the fit time (sample → configure → train → aggregate; no evaluation), in its
default settings (``resources.clients_per_call: auto``: from round 2 each Ray call trains several clients one after
another; ``--one-per-call`` measures one client per call beside it).
Printed and saved: per family the steady round (median of rounds 2..) of both and their ratio (target ≤ 1.10) —
with ``--repeats R``, R fedsim runs each between two floor runs and the median of their ratios —, and
fedsim with each worker's clients packed into shared passes (``resources.clients_per_pass: auto``; the classifier's
clients each with their own head in the pass).

Usage: python benchmarks/model_families.py [--rounds 4] [--clients 40] [--repeats 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import floor_loop, floor_rounds  # noqa: E402

SEQ = 64
BATCH = 8
STEPS = 5
RANK = 8
CLS_LEN = SEQ - 4  # a classifier row: its text, truncated so that the text and its 3-byte label fill SEQ tokens

FAMILIES = {
    "llama": {"name": "tiny", "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                                       "num_heads": 4}},
    "gpt2": {"name": "openai-community/gpt2", "target_modules": ["c_attn", "c_proj", "c_fc"],
             "config": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128,
                        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}},
    "roberta": {"name": "FacebookAI/roberta-base", "task": "seq_cls", "num_labels": 2,
                "target_modules": ["query", "value"],
                "config": {"model_type": "roberta", "hidden_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 130,
                           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
}


def scenario_dict(family: str, data_path: str, num_clients: int, rounds: int, packed: bool = False,
                  per_call: int | str = "auto") -> dict:
    classifier = family == "roberta"
    data = ({"source": data_path, "format": "classification", "columns": ["label", "text"],
             "prompt_template": "{text}", "task_field": None, "max_seq_len": SEQ, "test": {"fraction": 0.05}}
            if classifier else {"source": data_path, "max_seq_len": SEQ, "task_field": None,
                                "test": {"fraction": 0.05}})
    return {
        "name": f"families-{family}", "seed": 0, "rounds": rounds, "model": FAMILIES[family], "data": data,
        "partition": {"method": "iid", "min_samples": BATCH},
        "clients": {"num_clients": num_clients, "per_round": num_clients, "lora": {"rank": RANK, "alpha": 16}},
        "training": {"local_steps": STEPS, "batch_size": BATCH, "lr": 0.001},
        "eval": {"every": 10_000, "at_start": False, "batch_size": 256},
        "resources": {"backend": "ray", "num_workers": 2, "num_cpus": 1,
                      "clients_per_pass": "auto" if packed else 1, "clients_per_call": per_call},
        "logging": {"console": False, "jsonl": True, "wandb": {"mode": "disabled"}},
    }


def write_data(family: str, path: Path, n: int) -> None:
    """Rows long enough that every sample is SEQ tokens after truncation (the classifier's: its text CLS_LEN)."""
    import numpy as np

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    if family == "roberta":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            for i in range(n):
                w.writerow(["pos" if i % 2 else "neg", "".join(rng.choice(letters, size=3 * SEQ))])
        return
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"instruction": "".join(rng.choice(letters, size=3 * SEQ)),
                                "output": "".join(rng.choice(letters[:26], size=6))}) + "\n")


def _floor_worker(args: tuple, queue) -> None:
    family, rounds, num_clients = args
    import torch
    from peft import LoraConfig, get_peft_model

    from fedsim.config import ModelConfig
    from fedsim.models.base import configure_threads
    from fedsim.models.tasks import task_for

    configure_threads(1)
    cfg = ModelConfig(**FAMILIES[family])
    task = task_for(cfg)
    base = task.build(cfg)
    targets = list(cfg.target_modules)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=16, target_modules=targets,
                                            exclude_modules=r"(.*\.)?(classifier)(\..*)?" if family == "roberta"
                                            else None))
    head = [p for m in task.modules_to_save(base) for p in base.get_submodule(m).parameters()]
    for p in head:
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    gen = torch.Generator().manual_seed(0)
    if family == "roberta":
        ids = torch.randint(3, 300, (BATCH, CLS_LEN), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "labels": torch.randint(0, 2, (BATCH,), generator=gen)}
    else:
        ids = torch.randint(3, 300, (BATCH, SEQ), generator=gen)
        labels = ids.clone()
        labels[:, : SEQ - 7] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    queue.put(floor_loop(lambda: task.loss(model, batch).backward(), params, num_clients, rounds))


def measure_floor(family: str, num_clients: int, rounds: int) -> list[float]:
    return floor_rounds(_floor_worker, num_clients, (family, rounds))


def measure_fedsim(family: str, num_clients: int, rounds: int, workdir: Path, packed: bool = False,
                   per_call: int | str = "auto") -> list[float]:
    from fedsim.config import scenario_from_dict
    from fedsim.driver import run_scenario

    data = workdir / ("data.csv" if family == "roberta" else "data.jsonl")
    if not data.exists():
        write_data(family, data, max(2000, num_clients * BATCH * 2))
    out = workdir / ("packed" if packed else f"run-{per_call}")
    run_scenario(scenario_from_dict(scenario_dict(family, str(data), num_clients, rounds, packed, per_call)), out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["time/fit_s"] for r in rows if r["round"] >= 1]


def measure_family(family: str, args: argparse.Namespace) -> dict:
    """R repeats of fedsim (default, packed, and with ``--one-per-call`` one client per call), each between two
    floor runs; each repeat's ratios against the floor runs on either side."""
    floors = [measure_floor(family, args.clients, args.rounds)]
    runs: dict[str, list] = {"fedsim": [], "packed": [], "one": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs["fedsim"].append(measure_fedsim(family, args.clients, args.rounds, Path(tmp)))
            runs["packed"].append(measure_fedsim(family, args.clients, args.rounds, Path(tmp), packed=True))
            if args.one_per_call:
                runs["one"].append(measure_fedsim(family, args.clients, args.rounds, Path(tmp), per_call=1))
        floors.append(measure_floor(family, args.clients, args.rounds))
    around = [statistics.median(floors[i][1:] + floors[i + 1][1:]) for i in range(args.repeats)]
    r: dict = {"floor_rounds_s": floors, "floor_steady_s": statistics.median(around)}
    for name, xs in runs.items():
        if xs:
            r[f"{name}_rounds_s"] = xs
            r[f"{name}_steady_s"] = statistics.median(steady(x) for x in xs)
            r[f"{name}_ratios"] = [steady(x) / fl for x, fl in zip(xs, around)]
    r["ratios"] = r.pop("fedsim_ratios")
    for name in ("", "packed_", "one_"):
        if f"{name}ratios" in r:
            r[f"{name}ratio"] = statistics.median(r[f"{name}ratios"])
    return r


def steady(xs: list[float]) -> float:
    """Median of rounds 2.. (round 1 builds the workers' models and wraps them)."""
    return statistics.median(xs[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=1,
                    help="fedsim runs per family, each between two floor runs; the ratio is the median of the "
                         "repeats' (this machine's speed drifts by up to half within minutes)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--one-per-call", action="store_true",
                    help="also run fedsim with one client per Ray call (resources.clients_per_call: 1) in each repeat")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    results: dict[str, dict] = {}
    lines = [
        "# Model families: fedsim against a plain PEFT loop (benchmarks/model_families.py)", "",
        f"command: python benchmarks/model_families.py --rounds {args.rounds} --clients {args.clients} "
        f"--repeats {args.repeats}" + (" --one-per-call" if args.one_per_call else ""),
        f"machine: {platform.machine()}, {mp.cpu_count()} cores, Python {platform.python_version()}",
        f"workload per round: {args.clients} clients × {STEPS} steps, batch {BATCH} × {SEQ} tokens, LoRA r={RANK}, "
        "2 Ray workers (1 CPU, 1 thread each); floor: the same steps on one PEFT-wrapped model per process, "
        f"2 plain processes, measured before and after each of the {args.repeats} fedsim run(s); a repeat's ratio: "
        "fedsim's steady round over the median steady round of the floor runs on either side; shown: the median "
        "of the repeats (their range)", "",
        "| family | fedsim steady round (s) | floor steady round (s) | ratio (target ≤ 1.10) | "
        "fedsim packed (s) | packed / floor |" + (" one client per call (s) | its ratio |" if args.one_per_call else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.one_per_call else ""),
    ]

    def span(xs: list[float]) -> str:
        mid = statistics.median(xs)
        return f"{mid:.3f}" if len(xs) == 1 else f"{mid:.3f} ({min(xs):.3f}–{max(xs):.3f})"

    for family in args.families:
        r = results[family] = measure_family(family, args)
        one = (f" | {r['one_steady_s']:.2f} | {span(r['one_ratios'])}" if args.one_per_call else "")
        lines.append(f"| {family} | {r['fedsim_steady_s']:.2f} | {r['floor_steady_s']:.2f} | **{span(r['ratios'])}** | "
                     f"{r['packed_steady_s']:.2f} | {span(r['packed_ratios'])}{one} |")
        print(lines[-1], flush=True)
    lines += ["", "rounds (s), floor | fedsim | fedsim packed " + ("| one per call " if args.one_per_call else "")
              + "| floor ...:"]
    for family, r in results.items():
        runs = [r["floor_rounds_s"][0]]
        for i in range(args.repeats):
            runs += [r["fedsim_rounds_s"][i], r["packed_rounds_s"][i]] + (
                [r["one_rounds_s"][i]] if args.one_per_call else []) + [r["floor_rounds_s"][i + 1]]
        lines.append(f"- {family}: " + " | ".join(", ".join(f"{t:.2f}" for t in ts) for ts in runs))
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_families.md").write_text(text + "\n")
    (out / "model_families.json").write_text(json.dumps({"clients": args.clients, "rounds": args.rounds,
                                                         "repeats": args.repeats, "families": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
