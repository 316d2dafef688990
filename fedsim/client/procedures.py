"""Local training procedures: how one client trains its adapter(s) in one round.

A strategy picks one per payload (``ClientPayload.procedure``, a registered ``procedure``) and gives its settings in
``ClientPayload.procedure_options``:

- ``joint``: every trainable tensor, one optimizer (FedIT and most baselines).
- ``alternate``: FedDPA-T — the personal adapter first, with the main (global) adapter frozen and both active, mixed
  by ``payload.mix``; then the main adapter alone, as FedIT trains it.
- ``bilevel``: PF2LoRA — each step updates the personal adapter y by a gradient step of size α, then the common adapter
  x with the hypergradient of f(x, y⁺(x)) (:func:`hypergradient`); ``mode`` selects the ablations.

The procedures leave the trained values in the host's adapters; the worker reads them back.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedsim import registry
from fedsim.client.schedule import lr_factor, lr_metrics, scheduled
from fedsim.client.trainer import autocast, batch_schedule, compute_dtype, make_optimizer, train_local
from fedsim.config import TrainingConfig
from fedsim.data.tokenized import TokenizedSplit
from fedsim.models.adapters import AdapterHost
from fedsim.models.base import seed_torch, set_training
from fedsim.models.tasks import ModelTask
from fedsim.objectives import BoundObjective
from fedsim.types import AlternateOptions, BilevelOptions, ClientPayload

procedure = registry.decorator("procedure")


@dataclass
class LocalJob:
    """Everything a procedure needs: the host (adapters loaded), the payload, the client's data and settings."""

    host: AdapterHost
    payload: ClientPayload
    split: TokenizedSplit
    indices: np.ndarray
    cfg: TrainingConfig
    pad_id: int
    seed: tuple[int, ...]
    device: torch.device
    task: ModelTask
    objectives: Sequence[BoundObjective] = ()
    lr: float | None = None  # the round's learning rate (training.round_lr_schedule); None: training.lr

    def train(self, params: list[torch.nn.Parameter], seed: tuple[int, ...] | None = None,
              objectives: Sequence[BoundObjective] = ()) -> dict[str, float]:
        """:func:`~fedsim.client.trainer.train_local` of ``params`` on this client's data."""
        return train_local(self.host.model, params, self.split, self.indices, self.cfg, self.pad_id,
                           self.seed if seed is None else seed, self.device, self.task, objectives, self.lr)


@procedure("joint")
def joint(job: LocalJob) -> dict[str, float]:
    """Every trainable tensor (and the personal adapter's, if any), one optimizer (FedIT and most baselines)."""
    p = job.payload
    params = job.host.set_trainable(p.lora, p.trainable)
    if p.personal_lora is not None:
        params += job.host.set_trainable(p.personal_lora, ("A", "B"), personal=True)
    return job.train(params, objectives=job.objectives)


joint.metric_keys = joint.round_metrics = ()


@procedure("alternate")
def alternate(job: LocalJob) -> dict[str, float]:
    """The personal adapter first (main frozen, both active, mixed), then the main adapter (personal frozen).

    :class:`~fedsim.types.AlternateOptions`: ``personal_phase`` (default True) runs the first phase — FedDPA skips it
    in round 1, when the global adapter is still untrained; ``personal_in_main_phase`` (default False) keeps the
    frozen personal adapter active while the main one trains — FedDPA trains its global adapter alone, FedQLoRA keeps
    the quantization-aware adapter in place, since it corrects the base the LoRA adapter trains on."""
    p, host = job.payload, job.host
    opts = p.procedure_options if isinstance(p.procedure_options, AlternateOptions) else AlternateOptions()
    out: dict[str, float] = {}
    if p.personal_lora is None:
        raise ValueError("the alternate procedure needs a personal adapter (payload.personal_lora)")
    if opts.personal_phase:
        host.activate(p.lora, p.personal_lora, p.mix)
        host.set_trainable(p.lora, ())
        personal = host.set_trainable(p.personal_lora, ("A", "B"), personal=True)
        m = job.train(personal, seed=job.seed + (1,))
        out.update({"personal/loss": m["train/loss"], "personal/time_s": m["train/time_s"]})
    if opts.personal_in_main_phase:
        host.activate(p.lora, p.personal_lora, p.mix)
    else:
        host.activate(p.lora)  # the global adapter alone, as it is aggregated
    host.set_trainable(p.personal_lora, (), personal=True)
    params = host.set_trainable(p.lora, p.trainable)
    m = job.train(params, objectives=job.objectives)
    return {**m, **out}


alternate.metric_keys = alternate.round_metrics = ("personal/loss", "personal/time_s")


Loss = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]


def hypergradient(f: Loss, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor], alpha: float,
                  second_order: bool = True, max_norm: float | None = None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, float]]:
    """One PF2LoRA step's gradients: the lower-level update y⁺ = y − α ∇_y f(x, y) and the hypergradient

        d/dx f(x, y⁺(x)) = ∇_x f(x, y⁺) − α ∇²_{xy} f(x, y) ∇_y f(x, y⁺),

    the Hessian-vector product by double backpropagation (∇_x of ⟨∇_y f(x, y), v⟩ with v held constant).

    Args:
        f: the loss as a function of (x tensors, y tensors); it must be differentiable twice.
        x: upper-level (common adapter) tensors, requiring grad.
        y: lower-level (personal adapter) tensors, requiring grad.
        alpha: the lower-level learning rate α.
        second_order: False drops the Hessian-vector term (the first-order ablation).
        max_norm: clip ∇_y f(x, y) to this norm by a factor c, held constant: the step is then y − cα ∇_y f and the
            hypergradient is exact for α_eff = cα.

    Returns:
        (hypergradient per x, y⁺ per y (detached), metrics: ``loss`` = f(x, y), ``loss_plus`` = f(x, y⁺),
        ``hvp_norm``).
    """
    x, y = list(x), list(y)
    loss = f(x, y)
    g_y = torch.autograd.grad(loss, y, create_graph=second_order)
    alpha = alpha * _clip_factor(g_y, max_norm)
    y_plus = [(yi.detach() - alpha * gi.detach()).requires_grad_(True) for yi, gi in zip(y, g_y)]
    loss_plus = f(x, y_plus)
    grads = torch.autograd.grad(loss_plus, x + y_plus, allow_unused=True)
    g_x = [g if g is not None else torch.zeros_like(xi) for g, xi in zip(grads[: len(x)], x)]
    v = [g if g is not None else torch.zeros_like(yi) for g, yi in zip(grads[len(x):], y_plus)]
    hvp_norm = 0.0
    if second_order:
        dot = sum((gi * vi).sum() for gi, vi in zip(g_y, v))  # ⟨∇_y f(x, y), v⟩, differentiable in x
        hvp = torch.autograd.grad(dot, x, allow_unused=True)
        hvp = [h if h is not None else torch.zeros_like(xi) for h, xi in zip(hvp, x)]
        g_x = [gx - alpha * h for gx, h in zip(g_x, hvp)]
        hvp_norm = float(torch.sqrt(sum((h.detach().float() ** 2).sum() for h in hvp)))
    return ([g.detach() for g in g_x], [yp.detach() for yp in y_plus],
            {"loss": float(loss.detach()), "loss_plus": float(loss_plus.detach()), "hvp_norm": hvp_norm})


MODES = ("bilevel", "first_order", "simultaneous")


@procedure("bilevel")
def bilevel(job: LocalJob) -> dict[str, float]:
    """PF2LoRA local training. :class:`~fedsim.types.BilevelOptions`: ``inner_lr`` (α), ``mode`` (one of
    :data:`MODES`).

    The lower level is plain gradient descent (the hypergradient formula differentiates through exactly that
    step); the upper level applies the hypergradient with the scenario's optimizer at ``training.lr`` (η). With
    ``training.max_grad_norm`` set, both gradients are clipped to it: y's by a factor c that the hypergradient
    treats as part of α (α_eff = c·α), x's hypergradient like any gradient.
    """
    from torch.func import functional_call

    p, host, cfg = job.payload, job.host, job.cfg
    alpha, mode = _bilevel_options(job)
    t0 = time.perf_counter()
    host.activate(p.lora, p.personal_lora, p.mix)
    x = host.set_trainable(p.lora, p.trainable)
    y = host.set_trainable(p.personal_lora, ("A", "B"), personal=True)
    model = host.model
    names = {id(t): n for n, t in model.named_parameters()}
    x_names, y_names = [names[id(t)] for t in x], [names[id(t)] for t in y]
    rng = np.random.default_rng(list(job.seed))
    seed_torch(int(rng.integers(2**62)), job.device)
    steps = cfg.steps_for(len(job.indices))
    base_lr = cfg.lr if job.lr is None else job.lr
    opt = make_optimizer(x, cfg, base_lr)
    set_training(model, True)
    # bfloat16 autocast; float16 would need loss scaling through the hypergradient, so it computes in float32 (the
    # scenario refuses autocast: fp16 here; autocast: true on a GPU without bfloat16 lands here)
    cast = autocast(cfg, job.device) if compute_dtype(cfg, job.device) is torch.bfloat16 else contextlib.nullcontext()
    sums = {"loss": 0.0, "loss_plus": 0.0, "hvp_norm": 0.0}
    tokens = 0
    for step, batch_idx in enumerate(batch_schedule(job.indices, steps, cfg.batch_size, rng)):
        if scheduled(cfg):
            for group in opt.param_groups:
                group["lr"] = base_lr * lr_factor(cfg, step, steps)
        batch = job.task.collate(job.split, batch_idx, job.pad_id, job.device)

        def f(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], batch=batch) -> torch.Tensor:
            override = dict(zip(x_names, xs)) | dict(zip(y_names, ys))
            return job.task.loss(model, batch, lambda **kw: functional_call(model, override, args=(), kwargs=kw))

        with cast:
            g_x, y_new, step = _bilevel_step(f, x, y, alpha, mode, cfg.max_grad_norm)
        if not math.isfinite(step["loss"]):
            raise FloatingPointError(f"non-finite training loss {step['loss']}")
        with torch.no_grad():
            for yi, v in zip(y, y_new):
                yi.copy_(v)
        for xi, g in zip(x, g_x):
            xi.grad = g.to(xi.dtype)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(x, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for k in sums:
            sums[k] += step[k]
        tokens += int((batch["labels"] != -100).sum())
    return {"train/loss": sums["loss"] / steps, "train/loss_after_inner": sums["loss_plus"] / steps,
            "pf2lora/hvp_norm": sums["hvp_norm"] / steps, "train/steps": float(steps), "train/tokens": float(tokens),
            "train/time_s": time.perf_counter() - t0, **lr_metrics(cfg, base_lr, steps)}


def _bilevel_options(job: LocalJob) -> tuple[float, str]:
    """(α, mode) of a bilevel job, once the job is checked.

    Raises:
        ValueError: an unknown mode, no personal adapter, or client objectives (the hypergradient differentiates
            the task loss alone).
    """
    p = job.payload
    opts = p.procedure_options if isinstance(p.procedure_options, BilevelOptions) else BilevelOptions()
    if opts.mode not in MODES:
        raise ValueError(f"unknown bilevel mode {opts.mode!r}; choose one of {MODES}")
    if p.personal_lora is None:
        raise ValueError("the bilevel procedure needs a personal adapter (payload.personal_lora)")
    if job.objectives:
        raise ValueError("the bilevel procedure takes no client objectives (its hypergradient differentiates the "
                         "task loss alone)")
    if job.cfg.grad_accum_steps > 1:
        raise ValueError("the bilevel procedure differentiates through one batch per step: use a larger "
                         "training.batch_size instead of training.grad_accum_steps")
    return float(opts.inner_lr), opts.mode


def _bilevel_step(f: Loss, x: list[torch.Tensor], y: list[torch.Tensor], alpha: float, mode: str,
                  max_norm: float | None) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, float]]:
    """One step's (upper-level gradient, new lower-level values, metrics) in ``mode``: the hypergradient (with or
    without its Hessian-vector term), or the simultaneous ablation — both from ∇f(x, y) at the same point."""
    if mode == "simultaneous":
        loss = f(x, y)
        grads = torch.autograd.grad(loss, x + y)
        g_x, g_y = list(grads[: len(x)]), list(grads[len(x):])
        c = _clip_factor(g_y, max_norm)
        y_new = [(yi.detach() - c * alpha * gi) for yi, gi in zip(y, g_y)]
        return g_x, y_new, {"loss": float(loss.detach()), "loss_plus": math.nan, "hvp_norm": 0.0}
    with _twice_differentiable(mode == "bilevel"):
        return hypergradient(f, x, y, alpha, second_order=(mode == "bilevel"), max_norm=max_norm)


def _twice_differentiable(on: bool):
    """Fused attention kernels (flash, memory-efficient; on CPU and CUDA) have no double backward: the
    Hessian-vector product needs PyTorch's math implementation of scaled-dot-product attention."""
    if not on:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _clip_factor(grads: Sequence[torch.Tensor], max_norm: float | None) -> float:
    if max_norm is None:
        return 1.0
    norm = float(torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads)))
    return min(1.0, max_norm / (norm + 1e-6))


bilevel.metric_keys = bilevel.round_metrics = ("train/loss_after_inner", "pf2lora/hvp_norm")

PROCEDURES: dict[str, Callable[[LocalJob], dict[str, float]]] = {
    "joint": joint, "alternate": alternate, "bilevel": bilevel,
}
