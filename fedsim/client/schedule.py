"""Learning rates of the training recipe: within local training, transformers' schedules (constant, linear, cosine,
each after a linear warmup from 0, as ``transformers.get_scheduler`` computes them: the step counted from 0 before
each optimizer step); across rounds, a decay of the clients' learning rate from ``lr`` towards ``min_lr``."""

from __future__ import annotations

import math

from fedsim.config import TrainingConfig


def warmup_steps(cfg: TrainingConfig, total: int) -> int:
    """The warmup in optimizer steps: ``warmup_steps``, or ``ceil(warmup_ratio · total)`` as transformers rounds it
    — but always leaving a client one step past its warmup (a client with few samples would otherwise train at
    learning rate 0 only)."""
    if cfg.warmup_steps:
        return cfg.warmup_steps
    return min(math.ceil(cfg.warmup_ratio * total), max(total - 1, 0))


def lr_factor(cfg: TrainingConfig, step: int, total: int) -> float:
    """transformers' schedule multiplier at ``step`` (from 0) of ``total`` optimizer steps."""
    w = warmup_steps(cfg, total)
    if step < w:
        return step / max(1, w)
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "linear":
        return max(0.0, (total - step) / max(1, total - w))
    progress = (step - w) / max(1, total - w)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def round_lr(cfg: TrainingConfig, server_round: int, num_rounds: int) -> float:
    """The clients' learning rate in ``server_round`` (from 1): ``lr`` in round 1, decaying towards ``min_lr`` as
    OpenFedLLM's ``cosine_learning_rate`` does (``min_lr + ½(lr − min_lr)(1 + cos(π t / T))`` with t the round
    from 0 and T the rounds; the last round stays one step above ``min_lr``); ``linear`` the same line."""
    if cfg.round_lr_schedule == "constant":
        return cfg.lr
    t = (server_round - 1) / max(1, num_rounds)
    if cfg.round_lr_schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * t
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))


def lr_metrics(cfg: TrainingConfig, base_lr: float, total: int) -> dict[str, float]:
    """``train/lr``, the mean learning rate of a client's ``total`` optimizer steps, when the recipe schedules it
    (the constant recipe logs nothing: its rate is ``training.lr``)."""
    if not scheduled(cfg) or total <= 0:
        return {}
    return {"train/lr": base_lr * sum(lr_factor(cfg, s, total) for s in range(total)) / total}


def scheduled(cfg: TrainingConfig) -> bool:
    """Whether the learning rate moves at all (the constant recipe leaves the optimizer's lr untouched)."""
    return (cfg.lr_schedule != "constant" or cfg.warmup_steps > 0 or cfg.warmup_ratio > 0
            or cfg.round_lr_schedule != "constant")
