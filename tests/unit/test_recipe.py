"""The training recipe: transformers' learning-rate schedules within local training, a decay across rounds, gradient
accumulation equal to the large batch, gradient checkpointing equal to plain backprop, autocast keeping fp32
adapters; packed clients follow the schedules exactly; what is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tolerances import F32_NETWORK, F64, HALF_TRAINING

from fedsim.client.schedule import lr_factor, round_lr
from fedsim.config import TrainingConfig, scenario_from_dict
from fedsim.data.datasets import load_data
from fedsim.errors import ScenarioError
from fedsim.models.base import target_shapes
from fedsim.runtime.worker import ClientJob, Worker
from fedsim.strategies import StrategySpec, make_strategy
from fedsim.types import ClientPayload, ClientSpec, LoraSpec

LORA = LoraSpec(4, 8.0)


@pytest.mark.parametrize("kind, hf", [("constant", "constant_with_warmup"), ("linear", "linear"),
                                      ("cosine", "cosine")])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_are_transformers_own(kind, hf, warmup):
    from transformers import get_scheduler

    total = 17
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_scheduler(hf, opt, num_warmup_steps=warmup, num_training_steps=total)
    cfg = TrainingConfig(lr=1.0, lr_schedule=kind, warmup_steps=warmup, local_steps=total)
    for step in range(total):
        assert lr_factor(cfg, step, total) == pytest.approx(opt.param_groups[0]["lr"], abs=F64), step
        opt.step()
        sched.step()


def test_round_schedules_decay_towards_min_lr_as_openfedllm():
    # OpenFedLLM's cosine_learning_rate(current_round, total_rounds, initial_lr, min_lr), current_round from 0
    def openfedllm(current_round, total_rounds, initial_lr, min_lr):
        return min_lr + 0.5 * (initial_lr - min_lr) * (1 + math.cos(math.pi * current_round / total_rounds))

    cfg = TrainingConfig(lr=0.01, min_lr=0.001, round_lr_schedule="cosine")
    for r in range(1, 11):
        assert round_lr(cfg, r, 10) == pytest.approx(openfedllm(r - 1, 10, 0.01, 0.001))
    assert round_lr(cfg, 1, 10) == pytest.approx(0.01) and round_lr(cfg, 10, 10) > 0.001
    lin = TrainingConfig(lr=0.01, min_lr=0.0, round_lr_schedule="linear")
    assert round_lr(lin, 3, 4) == pytest.approx(0.005)
    assert round_lr(TrainingConfig(lr=0.01), 7, 10) == 0.01


def _run(tiny_raw, n=32, **training):
    tiny_raw["training"].update(training)
    sc = scenario_from_dict(tiny_raw)
    data = load_data(sc)
    state = make_strategy("fedit").init_state(StrategySpec(target_shapes(sc.model), LORA, 0))
    worker = Worker(sc, data)
    job = ClientJob(ClientSpec(0, n, LORA), np.arange(n), server_round=1)
    result, update = worker.run_client(job, ClientPayload(tensors=state.tensors, lora=LORA))
    return result, update, worker


def _rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def test_grad_accumulation_equals_the_large_batch(tiny_raw):
    big, ub, _ = _run(tiny_raw, batch_size=8, local_steps=4, grad_accum_steps=1)
    small, us, _ = _run(tiny_raw, batch_size=4, local_steps=4, grad_accum_steps=2)
    for k in ub.tensors:
        assert _rel(us.tensors[k], ub.tensors[k]) <= F32_NETWORK, k
    assert small.metrics["train/loss"] == pytest.approx(big.metrics["train/loss"], rel=F32_NETWORK)
    assert small.metrics["train/tokens"] == big.metrics["train/tokens"]


def _saved_bytes(tiny_raw, **training):
    """The bytes autograd saves for the backward pass during one client's training (checkpointing's own recompute
    saves under its own hooks, so what is counted here is what lives from forward to backward)."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result, update, worker = _run(tiny_raw, **training)
    return saved[0], update, worker


def test_gradient_checkpointing_computes_the_same_update_and_saves_activations(tiny_raw):
    """It was once inert on a worker that had not evaluated yet: PEFT's wrapper was in training mode around a base
    left in evaluation mode, and transformers checkpoints only in training mode. The same update, and a fraction of
    the saved activations."""
    plain_bytes, up, _ = _saved_bytes(copy_raw(tiny_raw), local_steps=3)
    ckpt_bytes, uc, worker = _saved_bytes(tiny_raw, local_steps=3, gradient_checkpointing=True)
    for k in up.tensors:
        assert _rel(uc.tensors[k], up.tensors[k]) <= F32_NETWORK, k
    inner = worker.host().model.get_base_model()
    assert getattr(inner, "is_activation_checkpointing", None) or inner.is_gradient_checkpointing
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_lora_dropout_applies_in_training_and_never_in_evaluation(tiny_raw):
    """model.lora_dropout changes the update (seeded: twice the same), and evaluation, after training, runs
    without it."""
    _, u0, plain = _run(copy_raw(tiny_raw), local_steps=3)
    raw = copy_raw(tiny_raw)
    raw["model"]["lora_dropout"] = 0.3
    _, u1, worker = _run(copy_raw(raw), local_steps=3)
    _, u2, _ = _run(raw, local_steps=3)
    assert any(_rel(u1.tensors[k], u0.tensors[k]) > 1e-3 for k in u0.tensors)
    assert all(torch.equal(u1.tensors[k], u2.tensors[k]) for k in u1.tensors)
    payload = ClientPayload(tensors=u1.tensors, lora=LORA)
    batches = [np.arange(16)]
    assert worker.evaluate(payload, batches) == plain.evaluate(payload, batches)  # no dropout at evaluation


@pytest.mark.parametrize("cast", [True, "fp16"])
def test_autocast_keeps_fp32_adapters_and_trains(tiny_raw, cast):
    plain, up, _ = _run(copy_raw(tiny_raw), local_steps=3)
    result, uc, worker = _run(tiny_raw, local_steps=3, autocast=cast)
    assert all(t.dtype == torch.float32 for t in uc.tensors.values())
    assert all(p.dtype == torch.float32 for p in worker.host().params(LORA).values())
    assert math.isfinite(result.metrics["train/loss"])
    assert result.metrics["train/loss"] == pytest.approx(plain.metrics["train/loss"], rel=HALF_TRAINING)  # bf16/fp16 rounding
    assert any(_rel(uc.tensors[k], up.tensors[k]) > 0 for k in up.tensors)  # it did compute in low precision


def test_autocast_dtypes_and_fp16_loss_scaling():
    """true: bf16 (fp16 only on a GPU without bf16); fp16 brings a loss scaler, which unscales before the
    objectives' hooks and clipping, and skips a step whose gradients overflow — objectives' corrections too."""
    from fedsim.client.trainer import _optimizer_step, compute_dtype, grad_scaler

    cpu = torch.device("cpu")
    assert compute_dtype(TrainingConfig(), cpu) is None
    assert compute_dtype(TrainingConfig(autocast=True), cpu) is torch.bfloat16
    assert compute_dtype(TrainingConfig(autocast="bf16"), cpu) is torch.bfloat16
    assert compute_dtype(TrainingConfig(autocast="fp16"), cpu) is torch.float16
    assert grad_scaler(TrainingConfig(autocast=True), cpu) is None
    cfg = TrainingConfig(autocast="fp16", optimizer="sgd", lr=0.5, max_grad_norm=None)
    scaler = grad_scaler(cfg, cpu)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5)

    class Seen:
        grads, steps = [], []

        def after_backward(self):
            self.grads.append(w.grad.clone())

        def after_step(self, lr):
            self.steps.append(lr)

    seen = Seen()
    scaler.scale((w * torch.tensor([1.0, 2.0, 3.0])).sum()).backward()
    _optimizer_step(opt, [w], cfg, [seen], scaler)
    torch.testing.assert_close(seen.grads[0], torch.tensor([1.0, 2.0, 3.0]))  # unscaled before the hooks
    torch.testing.assert_close(w.detach(), torch.tensor([0.5, 0.0, -0.5]))
    assert seen.steps == [0.5]
    before, scale = w.detach().clone(), scaler.get_scale()
    w.grad = torch.tensor([float("inf"), 0.0, 0.0])
    _optimizer_step(opt, [w], cfg, [seen], scaler)
    assert torch.equal(w.detach(), before) and scaler.get_scale() < scale and seen.steps == [0.5]  # skipped


def test_a_schedule_changes_training(tiny_raw):
    plain, up, _ = _run(copy_raw(tiny_raw), local_steps=3)
    warm, uw, _ = _run(copy_raw(tiny_raw), local_steps=3, lr_schedule="cosine", warmup_steps=1)
    assert any(_rel(uw.tensors[k], up.tensors[k]) > 1e-4 for k in up.tensors)


@pytest.mark.parametrize("sets, field", [
    (["training.local_steps=3", "training.warmup_steps=3"], "warmup_steps 3 is not below local_steps 3"),
    (["training.warmup_steps=1", "training.warmup_ratio=0.1"], "either warmup_steps or warmup_ratio"),
    (["training.min_lr=1.0"], "min_lr 1.0 is above lr"),
    (["strategy.name=pf2lora", "eval.local_test_fraction=0.2", "training.grad_accum_steps=2"],
     "training.grad_accum_steps: strategy 'pf2lora'"),
    (["strategy.name=pf2lora", "eval.local_test_fraction=0.2", "training.autocast=fp16"],
     "training.autocast: strategy 'pf2lora' differentiates through its local step.*use autocast: bf16"),
    (["training.autocast=fp8"], "training.autocast"),
])
def test_recipe_settings_that_cannot_work_are_refused(tiny_raw, sets, field):
    with pytest.raises(ScenarioError, match=field):
        scenario_from_dict(tiny_raw, sets)


def copy_raw(raw):
    import copy

    return copy.deepcopy(raw)
