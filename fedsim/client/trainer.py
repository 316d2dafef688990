"""fedsim's local training recipe: how one client trains its adapter tensors for one round.

Seeded batches drawn epoch by epoch, the model task's loss, the client objectives' penalties and gradient hooks,
gradient-norm clipping, AdamW or SGD. Every local procedure (:mod:`fedsim.client.procedures`) trains through
:func:`train_local`; the packed trainer (:mod:`fedsim.client.packed`) follows the same recipe over a client axis.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedsim.client.batching import collate
from fedsim.config import TrainingConfig
from fedsim.data.tokenized import TokenizedSplit
from fedsim.objectives import BoundObjective, bind

METRIC_KEYS = ("train/loss", "train/steps", "train/tokens", "train/time_s")  # what train_local reports
ROUND_METRICS = ("train/loss", "train/steps", "train/tokens")  # those the round's row averages over its clients


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


def bind_objectives(objectives: Sequence[Any], params: dict[str, torch.Tensor], lora: Any,
                    personal: dict[str, torch.Tensor] | None = None) -> list[BoundObjective]:
    """The payload's client objectives bound to the client's trainable adapter tensors (``params``, by key), each with
    the state it kept in the client's ``personal`` tensors."""
    return [bind(o, lambda: params, lora, lora.scaling, personal) for o in objectives]


def train_local(model: torch.nn.Module, params: list[torch.nn.Parameter], split: TokenizedSplit, indices: np.ndarray,
                cfg: TrainingConfig, pad_id: int, seed: tuple[int, ...], device: torch.device, task: Any,
                objectives: Sequence[BoundObjective] = ()) -> dict[str, float]:
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
        task: the model task (:class:`fedsim.models.tasks.ModelTask`): its loss is what the client minimises.
        objectives: client objectives bound to the adapter (e.g. HETLoRA's tail norm): their penalties join the
            loss, their gradient hooks run after each backward pass, their metrics join the result.

    Returns:
        ``train/loss`` (mean over steps), ``train/steps``, ``train/tokens``, ``train/time_s``, and the objectives'
        metrics.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(list(seed))
    torch.manual_seed(int(rng.integers(2**62)))  # dropout, if any, is a function of (seed, round, client)
    steps = cfg.steps_for(len(indices))
    opt = make_optimizer(params, cfg)
    if not model.training:  # Module.train() walks every submodule: only switch when needed
        model.train()
    total, tokens = 0.0, 0
    for batch_idx in batch_schedule(indices, steps, cfg.batch_size, rng):
        batch = collate(split, batch_idx, pad_id, device)
        loss = task.loss(model, batch)  # causal LM: the LM head at labelled positions only
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite training loss {loss.item()}")
        objective = loss
        for term in objectives:
            extra = term.penalty()
            if extra is not None:
                objective = objective + extra
        objective.backward()
        for term in objectives:
            term.after_backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        total += loss.item()
        tokens += int((batch["labels"] != -100).sum())
    out = {"train/loss": total / steps, "train/steps": float(steps), "train/tokens": float(tokens),
           "train/time_s": time.perf_counter() - t0}
    for term in objectives:
        out.update(term.finish())
    return out


def objective_keys(objectives: Sequence[Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every metric key, the round's metric keys) the payload's objectives report."""
    keys = tuple(k for o in objectives for k in o.metric_keys)
    return keys, tuple(k for o in objectives for k in o.round_metrics)

