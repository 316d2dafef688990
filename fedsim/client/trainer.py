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

from fedsim.client.schedule import lr_factor, lr_metrics, scheduled
from fedsim.config import TrainingConfig
from fedsim.data.tokenized import TokenizedSplit
from fedsim.models.base import seed_torch, set_training
from fedsim.objectives import BoundObjective, bind

METRIC_KEYS = ("train/loss", "train/steps", "train/tokens", "train/time_s", "train/lr")  # what train_local reports
ROUND_METRICS = ("train/loss", "train/steps", "train/tokens", "train/lr")  # those the round's row averages over its clients


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


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainingConfig, lr: float | None = None
                   ) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params`` at ``lr`` (default ``training.lr``), its state in the parameters' dtype (fp32)."""
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def compute_dtype(cfg: TrainingConfig, device: torch.device) -> torch.dtype | None:
    """``training.autocast``'s compute dtype: None when off; ``true`` is bfloat16, or float16 on a GPU without it."""
    if cfg.autocast is False:
        return None
    if cfg.autocast == "fp16":
        return torch.float16
    if cfg.autocast is True and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(cfg: TrainingConfig, device: torch.device) -> Any:
    """``training.autocast``: the forward and backward in bfloat16 or float16 (:func:`compute_dtype`), the adapters
    and the optimizer state staying in float32; off, a no-op context."""
    import contextlib

    dtype = compute_dtype(cfg, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(cfg: TrainingConfig, device: torch.device) -> Any:
    """A loss scaler for float16 compute (small gradients would underflow fp16's range; bfloat16 has float32's), as
    transformers' Trainer uses one; None otherwise. A step whose gradients overflow is skipped and the scale lowered."""
    if compute_dtype(cfg, device) is not torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def bind_objectives(objectives: Sequence[Any], params: dict[str, torch.Tensor], lora: Any,
                    personal: dict[str, torch.Tensor] | None = None) -> list[BoundObjective]:
    """The payload's client objectives bound to the client's trainable adapter tensors (``params``, by key), each with
    the state it kept in the client's ``personal`` tensors."""
    return [bind(o, lambda: params, lora, lora.scaling, personal) for o in objectives]


def train_local(model: torch.nn.Module, params: list[torch.nn.Parameter], split: TokenizedSplit, indices: np.ndarray,
                cfg: TrainingConfig, pad_id: int, seed: tuple[int, ...], device: torch.device, task: Any,
                objectives: Sequence[BoundObjective] = (), lr: float | None = None) -> dict[str, float]:
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
        lr: the round's learning rate (``training.round_lr_schedule``; default ``training.lr``), which the schedule
            within local training (``lr_schedule`` after its warmup) multiplies step by step.

    With ``grad_accum_steps`` = k, each optimizer step takes k micro-batches of ``batch_size``, each micro-batch's
    mean loss weighted by its share of the step's labelled tokens: the gradient of the k·batch_size batch's mean
    loss, exactly.

    Returns:
        ``train/loss`` (mean over steps), ``train/steps``, ``train/tokens``, ``train/time_s``, and the objectives'
        metrics.

    Raises:
        ValueError: ``warmup_steps`` as long as the client's training (with ``local_epochs``, say).
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(list(seed))
    seed_torch(int(rng.integers(2**62)), device)  # dropout, if any, is a function of (seed, round, client)
    steps = cfg.steps_for(len(indices))
    base_lr = cfg.lr if lr is None else lr
    opt = make_optimizer(params, cfg, base_lr)
    moving = scheduled(cfg)
    _check_warmup(cfg, steps)
    set_training(model, True)
    scaler = grad_scaler(cfg, device)
    total, tokens = 0.0, 0
    k = cfg.grad_accum_steps
    micro = batch_schedule(indices, steps * k, cfg.batch_size, rng)
    for step in range(steps):
        if moving:
            for group in opt.param_groups:
                group["lr"] = base_lr * lr_factor(cfg, step, steps)
        with autocast(cfg, device):
            loss, n = _step_loss(model, task, split, micro[step * k: (step + 1) * k], pad_id, device, objectives,
                                 scaler)
        _optimizer_step(opt, params, cfg, objectives, scaler)
        total += loss
        tokens += n
    out = {"train/loss": total / steps, "train/steps": float(steps), "train/tokens": float(tokens),
           "train/time_s": time.perf_counter() - t0, **lr_metrics(cfg, base_lr, steps)}
    for term in objectives:
        out.update(term.finish())
    return out


def _check_warmup(cfg: TrainingConfig, steps: int) -> None:
    if cfg.warmup_steps and cfg.warmup_steps >= steps:
        raise ValueError(f"training.warmup_steps {cfg.warmup_steps} leaves none of this client's {steps} steps; "
                         "lower it, or use warmup_ratio")


def _optimizer_step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], cfg: TrainingConfig,
                    objectives: Sequence[BoundObjective], scaler: Any = None) -> None:
    """The objectives' gradient hooks, clipping, one optimizer step, gradients cleared. With a loss ``scaler``
    (float16) the gradients are unscaled first, and a step skipped for overflowing gradients is not corrected by
    the objectives either."""
    if scaler is not None:
        scaler.unscale_(opt)
    for term in objectives:
        term.after_backward()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    stepped = True
    if scaler is None:
        opt.step()
    else:
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        stepped = scaler.get_scale() >= scale  # lowered: the step was skipped
    opt.zero_grad(set_to_none=True)
    if stepped:
        for term in objectives:
            term.after_step(opt.param_groups[0]["lr"])


def _step_loss(model: torch.nn.Module, task: Any, split: TokenizedSplit, micro: list[np.ndarray], pad_id: int,
               device: torch.device, objectives: Sequence[BoundObjective], scaler: Any = None) -> tuple[float, int]:
    """Backpropagate one optimizer step's loss (its micro-batches', token-weighted, plus the objectives' penalties);
    return (the step's mean loss, its labelled tokens)."""
    batches = [task.collate(split, idx, pad_id, device) for idx in micro]
    counts = [task.count(b) for b in batches] if len(batches) > 1 else [0]
    step_tokens, value = sum(counts), 0.0
    for i, batch in enumerate(batches):
        loss = task.loss(model, batch)  # causal LM: the LM head at labelled positions only
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite training loss {loss.item()}")
        part = loss if len(batches) == 1 else loss * (counts[i] / max(step_tokens, 1))
        value += part.item()
        objective = part
        if i == 0:
            for term in objectives:
                extra = term.penalty()
                if extra is not None:
                    objective = objective + extra
        (objective if scaler is None else scaler.scale(objective)).backward()
    return value, sum(int((b["labels"] != -100).sum()) for b in batches)


def objective_keys(objectives: Sequence[Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every metric key, the round's metric keys) the payload's objectives report."""
    keys = tuple(k for o in objectives for k in o.metric_keys)
    return keys, tuple(k for o in objectives for k in o.round_metrics)

