"""A warm base: the built-in tiny model's architecture, pretrained, so that federated fine-tuning starts from a model
with useful representations instead of random features.

Same size as ``model.name: tiny`` (Llama, hidden 64, 2 layers, 0.13M parameters, ByT5's byte-level vocabulary), so
that a benchmark's random-base and warm-base runs differ only in the pretraining and cost the same. Pretraining
(all weights, next-token loss on every token) draws each sequence, with equal odds, from

- general text: a 48-byte window of an AG News headline and description (``../shared/data/ag_news``; any CSV whose
  rows end in text columns works, ``--corpus``), which teaches the byte-level statistics of English, and
- ten byte-level instruction tasks disjoint from the benchmarks' (the built-in add, reverse, sort, upper, count, first,
  last, max): lower, dup, sub, min, len, swap, second, rot, double, has — reading an instruction, copying, comparing,
  counting and editing characters and digits, in the format fine-tuning uses (instruction, newline, answer, eos).

Because the text is AG News, a benchmark refuses the warm base on its AG News setting (the base has read that text).
The result is written with ``save_pretrained`` (model and tokenizer) and loads through the real hub path:
``model: {name: <dir>}``. The directory is a deterministic function of the settings (seeded), cached under
``$FEDSIM_CACHE_DIR/warm_base/<hash>`` (default ``~/.cache/fedsim``); ``ensure()`` builds it once (~2 min on 2 cores).

Usage: python benchmarks/warm_base.py [--steps 3000] [--corpus CSV] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from fedsim.config import ModelConfig, TinyModelConfig

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "ag_news" / "test.csv"
# the built-in tiny model's architecture, with Llama's initialisation for training from scratch
TINY = TinyModelConfig(init_std=0.02)
SIZE = {"hidden_size": TINY.hidden_size, "intermediate_size": TINY.intermediate_size,
        "num_hidden_layers": TINY.num_layers, "num_attention_heads": TINY.num_heads}
STEPS, BATCH, LR, SEED, MAX_LEN, TEXT_SHARE, WINDOW = 3000, 32, 3e-3, 0, 32, 0.5, 48
LETTERS = "abcdefgh"


def _word(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list(LETTERS), size=n))


def _digits(rng: np.random.Generator, n: int) -> list[str]:
    return [str(int(x)) for x in rng.integers(0, 10, size=n)]


def _lower(r):
    w = _word(r, 3)
    return f"lower {w.upper()}", w


def _dup(r):
    w = _word(r, 2)
    return f"dup {w}", w + w


def _sub(r):
    a, b = sorted(int(x) for x in r.integers(0, 9, 2))
    return f"sub {b} {a}", str(b - a)


def _min(r):
    d = _digits(r, 3)
    return f"min {' '.join(d)}", min(d)


def _len(r):
    w = _word(r, int(r.integers(1, 7)))
    return f"len {w}", str(len(w))


def _swap(r):
    w = _word(r, 4)
    return f"swap {w}", w[-1] + w[1:-1] + w[0]


def _second(r):
    w = _word(r, 4)
    return f"second {w}", w[1]


def _rot(r):
    w = _word(r, 4)
    return f"rot {w}", w[1:] + w[0]


def _double(r):
    w = _word(r, 3)
    return f"double {w}", "".join(c + c for c in w)


def _has(r):
    w, c = _word(r, 4), LETTERS[int(r.integers(0, len(LETTERS)))]
    return f"has {c} in {w}", "yes" if c in w else "no"


PRETRAIN_TASKS = {"lower": _lower, "dup": _dup, "sub": _sub, "min": _min, "len": _len, "swap": _swap,
                  "second": _second, "rot": _rot, "double": _double, "has": _has}  # none is a benchmark task


def settings(steps: int = STEPS, corpus: Path = CORPUS) -> dict:
    return {"size": SIZE, "steps": steps, "batch": BATCH, "lr": LR, "seed": SEED, "tasks": sorted(PRETRAIN_TASKS),
            "format": "instruction + newline, answer, eos", "text_share": TEXT_SHARE, "window": WINDOW,
            "corpus": Path(corpus).name, "v": 2}


def default_dir(steps: int = STEPS, corpus: Path = CORPUS) -> Path:
    key = hashlib.sha256(json.dumps(settings(steps, corpus), sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.environ.get("FEDSIM_CACHE_DIR", Path.home() / ".cache" / "fedsim"))
    return root / "warm_base" / key


class CorpusError(ValueError):
    """The text corpus is missing or holds no text."""


def read_corpus(path: Path) -> list[str]:
    """The text of a CSV corpus: every row's non-numeric columns joined (AG News: "title. description")."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"the warm base's text corpus {path} does not exist: pass --corpus with a CSV of text rows "
                          f"(AG News is in ../shared/data/ag_news/test.csv beside the project)")
    with path.open(newline="", encoding="utf-8") as f:
        rows = [". ".join(c.strip() for c in row if c.strip() and not c.strip().isdigit()) for row in csv.reader(f)]
    rows = [r for r in rows if r]
    if not rows:
        raise CorpusError(f"the warm base's text corpus {path} holds no text rows")
    return rows


def _task_seq(rng: np.random.Generator, tok) -> list[int]:
    names = sorted(PRETRAIN_TASKS)
    prompt, answer = PRETRAIN_TASKS[names[int(rng.integers(0, len(names)))]](rng)
    ids = (tok(prompt + "\n", add_special_tokens=False)["input_ids"]
           + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    return ids[:MAX_LEN]


def _text_seq(rng: np.random.Generator, texts: list[list[int]]) -> list[int]:
    t = texts[int(rng.integers(0, len(texts)))]
    start = int(rng.integers(0, max(1, len(t) - WINDOW + 1)))
    return t[start: start + WINDOW]


def _pad(seqs: list[list[int]], pad_id: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(s)
    return ids, labels


def pretrain(out: Path, steps: int = STEPS, log=print, corpus: Path = CORPUS) -> dict:
    """Pretrain and ``save_pretrained`` to ``out``; returns what was measured (also in ``out/warm_base.json``)."""
    import torch
    from transformers import ByT5Tokenizer, LlamaForCausalLM

    from fedsim.models.base import tiny_config

    text = read_corpus(corpus)
    torch.manual_seed(SEED)
    tok = ByT5Tokenizer()
    cut = max(1, len(text) // 20)  # the last 5% of the corpus: held-out text
    train_text = [tok(t, add_special_tokens=False)["input_ids"] for t in text[:-cut] or text]
    held_text = [tok(t, add_special_tokens=False)["input_ids"] for t in text[-cut:]]
    model = LlamaForCausalLM(tiny_config(ModelConfig(name="tiny", tiny=TINY)))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng, held = np.random.default_rng(SEED), np.random.default_rng(SEED + 1)
    held_tasks = _pad([_task_seq(held, tok) for _ in range(512)], tok.pad_token_id)
    held_windows = _pad([_text_seq(held, held_text) for _ in range(256)], tok.pad_token_id)
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        seqs = [_text_seq(rng, train_text) if rng.random() < TEXT_SHARE else _task_seq(rng, tok) for _ in range(BATCH)]
        ids, labels = _pad(seqs, tok.pad_token_id)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps:
            log(f"step {step}/{steps}  loss {float(loss.detach()):.3f}  ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    with torch.no_grad():
        task_loss = float(model(input_ids=held_tasks[0], labels=held_tasks[1]).loss)
        text_loss = float(model(input_ids=held_windows[0], labels=held_windows[1]).loss)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    info = {**settings(steps, corpus), "params": sum(p.numel() for p in model.parameters()),
            "held_out_loss": task_loss, "held_out_text_loss": text_loss, "train_s": time.perf_counter() - t0}
    (out / "warm_base.json").write_text(json.dumps(info, indent=2))
    return info


def ensure(steps: int = STEPS, log=print, corpus: Path = CORPUS) -> Path:
    """The warm base's directory, pretrained on first use."""
    out = default_dir(steps, corpus)
    if not (out / "warm_base.json").is_file():
        log(f"pretraining the warm base into {out} (once, ~2 min) ...")
        pretrain(out, steps, log, corpus)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--corpus", default=str(CORPUS), help="CSV of text rows (default: AG News beside the project)")
    ap.add_argument("--out", help="directory (default: the cache directory for these settings)")
    args = ap.parse_args()
    out = Path(args.out) if args.out else default_dir(args.steps, Path(args.corpus))
    try:
        info = pretrain(out, args.steps, corpus=Path(args.corpus))
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: info[k] for k in ("params", "held_out_loss", "held_out_text_loss", "train_s")}))
    print(f"saved to {out}: use it as `model: {{name: {out}}}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
