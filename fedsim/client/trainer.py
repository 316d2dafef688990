"""Local training of one client's LoRA adapter."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from fedsim.client.batching import collate
from fedsim.client.lm_loss import causal_lm_loss
from fedsim.config import TrainingConfig
from fedsim.data.datasets import TokenizedSplit
from fedsim.lora import ops


def batch_schedule(indices: np.ndarray, num_steps: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``num_steps`` batches drawn epoch by epoch from a fresh permutation of ``indices`` (the last batch of an epoch
    may be smaller; a client with fewer samples than ``batch_size`` trains on all of them each step)."""
    batches: list[np.ndarray] = []
    while len(batches) < num_steps:
        perm = rng.permutation(indices)
        for start in range(0, len(perm), batch_size):
            batches.append(perm[start : start + batch_size])
            if len(batches) == num_steps:
                break
    return batches


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


Regularizer = Callable[[], torch.Tensor]


def tail_regularizer(params: dict[str, torch.nn.Parameter], scaling: float, start: int, lam: float) -> Regularizer:
    """HETLoRA's rank self-pruning term: ``λ Σ_modules ‖s · B[:, start:] @ A[start:, :]‖_F`` (differentiable)."""
    pairs = [(params[ops.a_key(m)], params[ops.b_key(m)]) for m in ops.modules(params)]

    def term() -> torch.Tensor:
        return lam * sum(torch.linalg.matrix_norm(scaling * b[:, start:] @ a[start:, :]) for a, b in pairs)

    return term


def train_local(model: torch.nn.Module, params: list[torch.nn.Parameter], split: TokenizedSplit, indices: np.ndarray,
                cfg: TrainingConfig, pad_id: int, seed: tuple[int, ...], device: torch.device,
                regularizer: Regularizer | None = None) -> dict[str, float]:
    """Train ``params`` (already loaded and set trainable) on the client's samples.

    Args:
        model: the PEFT model, with the client's adapter active.
        params: the trainable parameters.
        split: tokenized training split.
        indices: the client's sample indices.
        cfg: training settings (steps/epochs, batch size, optimizer, clipping).
        pad_id: padding token id.
        seed: (scenario seed, round, client id): all randomness of the job derives from it.
        device: where the model lives.
        regularizer: an extra differentiable loss term (e.g. HETLoRA's tail norm); its value before and after
            training is reported as ``reg/tail_norm_start`` / ``reg/tail_norm_end``.

    Returns:
        ``train/loss`` (mean over steps), ``train/steps``, ``train/tokens``, ``train/time_s``.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(list(seed))
    torch.manual_seed(int(rng.integers(2**62)))  # dropout, if any, is a function of (seed, round, client)
    steps = cfg.steps_for(len(indices))
    opt = make_optimizer(params, cfg)
    if not model.training:  # Module.train() walks every submodule: only switch when needed
        model.train()
    total, tokens = 0.0, 0
    reg_start = None
    if regularizer is not None:
        with torch.no_grad():
            reg_start = float(regularizer())
    for batch_idx in batch_schedule(indices, steps, cfg.batch_size, rng):
        batch = collate(split, batch_idx, pad_id, device)
        loss = causal_lm_loss(model, batch["input_ids"], batch["labels"])  # the LM head at labelled positions only
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite training loss {loss.item()}")
        objective = loss + regularizer() if regularizer is not None else loss
        objective.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        total += loss.item()
        tokens += int((batch["labels"] != -100).sum())
    out = {"train/loss": total / steps, "train/steps": float(steps), "train/tokens": float(tokens),
           "train/time_s": time.perf_counter() - t0}
    if regularizer is not None:
        with torch.no_grad():
            out["reg/tail_norm_start"], out["reg/tail_norm_end"] = reg_start, float(regularizer())
    return out
