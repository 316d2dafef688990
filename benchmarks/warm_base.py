"""A warm base: a small Llama pretrained on tasks disjoint from the benchmarks', so that federated fine-tuning starts
from a model with useful representations instead of random features.

The benchmarks fine-tune on the built-in synthetic tasks (add, reverse, sort, upper, count, first, last, max), FLAN-8
and AG News. This script pretrains — all weights, next-token loss on prompt and answer — on ten other byte-level
tasks that exercise the same skills (reading an instruction, copying, comparing, counting and editing characters and
digits): lower, dup, sub, min, len, swap, second, rot, double, has. The byte-level tokenizer is the tiny model's (ByT5,
384 ids), so scenarios keep their data settings. The result is written with ``save_pretrained`` (model and tokenizer)
and loads through the real hub path: ``model: {name: <dir>}``.

The directory is a deterministic function of the settings (seeded), cached under
``$FEDSIM_CACHE_DIR/warm_base/<hash>`` (default ``~/.cache/fedsim``); ``ensure()`` builds it once.

Usage: python benchmarks/warm_base.py [--steps 1500] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

SIZE = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}
STEPS, BATCH, LR, SEED, MAX_LEN = 1500, 32, 3e-3, 0, 32
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


def settings(steps: int = STEPS) -> dict:
    return {"size": SIZE, "steps": steps, "batch": BATCH, "lr": LR, "seed": SEED, "tasks": sorted(PRETRAIN_TASKS),
            "format": "instruction + newline, answer, eos", "v": 1}


def default_dir(steps: int = STEPS) -> Path:
    key = hashlib.sha256(json.dumps(settings(steps), sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.environ.get("FEDSIM_CACHE_DIR", Path.home() / ".cache" / "fedsim"))
    return root / "warm_base" / key


def _batch(rng: np.random.Generator, tok, n: int):
    import torch

    names = sorted(PRETRAIN_TASKS)
    seqs = []
    for _ in range(n):
        prompt, answer = PRETRAIN_TASKS[names[int(rng.integers(0, len(names)))]](rng)
        ids = (tok(prompt + "\n", add_special_tokens=False)["input_ids"]
               + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        seqs.append(ids[:MAX_LEN])
    width = max(len(s) for s in seqs)
    ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(s)
    return ids, labels


def pretrain(out: Path, steps: int = STEPS, log=print) -> dict:
    """Pretrain and ``save_pretrained`` to ``out``; returns what was measured (also in ``out/warm_base.json``)."""
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    tok = ByT5Tokenizer()
    cfg = LlamaConfig(vocab_size=384, num_key_value_heads=SIZE["num_attention_heads"], max_position_embeddings=512,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False, **SIZE)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng, held = np.random.default_rng(SEED), np.random.default_rng(SEED + 1)
    test_ids, test_labels = _batch(held, tok, 512)
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        ids, labels = _batch(rng, tok, BATCH)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            log(f"step {step}/{steps}  loss {float(loss.detach()):.3f}  ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    with torch.no_grad():
        held_loss = float(model(input_ids=test_ids, labels=test_labels).loss)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    info = {**settings(steps), "params": sum(p.numel() for p in model.parameters()), "held_out_loss": held_loss,
            "train_s": time.perf_counter() - t0}
    (out / "warm_base.json").write_text(json.dumps(info, indent=2))
    return info


def ensure(steps: int = STEPS, log=print) -> Path:
    """The warm base's directory, pretrained on first use."""
    out = default_dir(steps)
    if not (out / "warm_base.json").is_file():
        log(f"pretraining the warm base into {out} (once) ...")
        pretrain(out, steps, log)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--out", help="directory (default: the cache directory for these settings)")
    args = ap.parse_args()
    out = Path(args.out) if args.out else default_dir(args.steps)
    info = pretrain(out, args.steps)
    print(json.dumps({k: info[k] for k in ("params", "held_out_loss", "train_s")}))
    print(f"saved to {out}: use it as `model: {{name: {out}}}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
