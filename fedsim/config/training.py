"""The ``training``, ``eval``, ``checkpoint``, ``clock`` and ``faults`` sections: what a client and a round do."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fedsim.config.base import Frozen


class TrainingConfig(Frozen):
    local_steps: int | None = Field(None, ge=1, le=1_000_000)
    """optimizer steps per client per round (default 10)"""
    local_epochs: float | None = Field(None, gt=0.0, le=10_000)
    """or passes over the client's rows per round"""
    batch_size: int = Field(8, ge=1, le=65536)
    """rows per micro-batch"""
    lr: float = Field(3e-3, gt=0.0, le=10.0)
    """the clients' learning rate"""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw or sgd"""
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    """the optimizer's weight decay"""
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    """sgd's momentum"""
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """clip the gradient's norm (null: no clipping)"""
    # the learning rate within local training (transformers' schedules), after a warmup in steps or as a ratio
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=1_000_000)
    """linear warm-up steps of lr_schedule"""
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """or the warm-up's share of the steps"""
    # the clients' learning rate across rounds (OpenFedLLM's cosine decay), from lr at round 1 towards min_lr
    round_lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr: float = Field(0.0, ge=0.0, le=10.0)
    """the floor of round_lr_schedule"""
    grad_accum_steps: int = Field(1, ge=1, le=4096)  # micro-batches of batch_size per optimizer step
    gradient_checkpointing: bool = False  # recompute the base's activations in the backward pass: less memory
    # compute in bf16 or fp16 with fp32 adapters and optimizer state; true: bf16 (fp16 on a GPU without it);
    # fp16 scales the loss (torch.amp.GradScaler), as transformers' Trainer does
    autocast: bool | Literal["bf16", "fp16"] = False
    """low-precision compute with fp32 adapters: true (bf16 or fp16 by device), bf16, fp16 (loss-scaled)"""

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingConfig:
        if self.local_steps is not None and self.local_epochs is not None:
            raise ValueError("set either local_steps or local_epochs, not both")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set either warmup_steps or warmup_ratio, not both")
        if self.local_steps is not None and self.warmup_steps >= self.local_steps > 0 and self.warmup_steps > 0:
            raise ValueError(f"warmup_steps {self.warmup_steps} is not below local_steps {self.local_steps}: the "
                             "schedule would never leave its warmup; lower warmup_steps")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}; the round schedule decays towards it")
        return self

    def steps_for(self, num_examples: int) -> int:
        """Local optimizer steps for a client holding ``num_examples`` samples (``grad_accum_steps`` micro-batches
        each)."""
        if self.local_epochs is not None:
            per_epoch = -(-num_examples // (self.batch_size * self.grad_accum_steps))
            return max(1, int(round(self.local_epochs * per_epoch)))
        return self.local_steps if self.local_steps is not None else 10


class GenerateConfig(Frozen):
    """Generation-based evaluation (``eval.generate``): the generative metrics (``eval.metrics``: ``rouge1``,
    ``rouge2``, ``rouge_l``, ``bleu``, ``chrf``, ``exact_match`` or your own functions) on generated answers to a fixed,
    seeded sample of the test set — every ``every`` rounds (and at the last round; None: at the last round only)."""

    every: int | None = Field(None, ge=1)
    """rounds between generation evaluations (null: the last round only)"""
    max_samples: int | None = Field(200, ge=1)  # test samples generated for (a fixed seeded subset); None: all
    max_new_tokens: int = Field(64, ge=1, le=32768)
    """tokens generated per answer"""
    batch_size: int = Field(16, ge=1, le=4096)
    """prompts per batch"""
    do_sample: bool = False  # greedy by default; sampled generation is seeded (the run's seed and the round)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    """sampling temperature (do_sample)"""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """nucleus sampling's p (do_sample)"""
    log_samples: int = Field(8, ge=0, le=10_000)  # generations kept per evaluation (generations.jsonl, W&B table)
    personal: bool = True  # also generate with each client's own model on its local test split, when it has one


class HarnessConfig(Frozen):
    """Benchmarks through lm-evaluation-harness (``eval.harness``, the ``eval`` extra): lm-eval ``tasks`` (registered
    names, or your own YAML tasks under ``include_path``) on the global model — and on the named ``clients``' own
    models — every ``every`` rounds and at the last (None: the last only)."""

    tasks: tuple[str, ...] = Field(min_length=1)
    """lm-evaluation-harness tasks"""
    include_path: str | None = None
    """a directory of task definitions of your own"""
    every: int | None = Field(None, ge=1)
    """rounds between harness evaluations (null: the last round only)"""
    limit: float | None = Field(None, gt=0)  # documents per task: a count (≥ 1) or a fraction (< 1); None: all
    num_fewshot: int | None = Field(None, ge=0)
    """few-shot examples"""
    batch_size: int = Field(8, ge=1, le=4096)
    """requests per batch"""
    apply_chat_template: bool = False
    """format requests with the tokenizer's chat template"""
    clients: tuple[int, ...] = ()
    """also evaluate these clients' own models"""

    @field_validator("limit")
    @classmethod
    def _count_or_fraction(cls, v: float | None) -> float | int | None:
        if v is not None and v >= 1:
            if v != int(v):
                raise ValueError(f"limit {v} is neither a count (a whole number) nor a fraction below 1")
            return int(v)
        return v

    @field_validator("include_path")
    @classmethod
    def _a_directory(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_dir():
            raise ValueError(f"include_path {v!r} is not a directory; give the folder holding your task YAML files")
        return str(Path(v).expanduser().resolve()) if v is not None else v


class EvalConfig(Frozen):
    every: int = Field(1, ge=1)
    """rounds between evaluations (and always the last)"""
    batch_size: int = Field(64, ge=1, le=65536)
    """test rows per batch"""
    at_start: bool = True
    """evaluate the initial model (round 0)"""
    # share of each client's shard held out as its local test split (personalized evaluation); 0 = none
    local_test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    # how many clients (a fixed, seeded subset) are scored on their local test splits; None = all
    local_clients: int | None = Field(None, ge=1)
    # metrics reported beside loss, accuracy and per-task accuracy: registered names (fedsim.eval.metrics), e.g.
    # macro_f1 and mcc for classification
    metrics: tuple[str, ...] = ()
    # generation-based evaluation; set it, or name a generative metric in metrics, to generate (defaults then apply)
    generate: GenerateConfig | None = None
    harness: HarnessConfig | None = None  # lm-evaluation-harness tasks on the in-memory model


class CheckpointConfig(Frozen):
    """How often the server state is saved for ``fedsim run --resume`` (always after the last round too)."""

    every: int = Field(1, ge=1)
    """rounds between checkpoints (and always the last)"""


class FaultsConfig(Frozen):
    """Fault injection, a testing aid: each client attempt draws its faults from (seed, round, client, attempt).

    ``kill_worker_prob``: the worker process exits mid-job (Ray backend); ``nan_update_prob``: the update is filled
    with NaN (rejected by the server); ``hang_prob``: the job sleeps ``hang_s`` (Ray backend; pair it with
    ``resources.client_timeout_s``).
    """

    kill_worker_prob: float = Field(0.0, ge=0.0, le=1.0)
    """a client attempt kills its worker process (Ray)"""
    nan_update_prob: float = Field(0.0, ge=0.0, le=1.0)
    """a client attempt sends NaN tensors"""
    hang_prob: float = Field(0.0, ge=0.0, le=1.0)
    """a client attempt hangs before training"""
    hang_s: float = Field(3600.0, gt=0.0)
    """how long a hang lasts"""

    def any(self) -> bool:
        return self.kill_worker_prob > 0 or self.nan_update_prob > 0 or self.hang_prob > 0

    def in_process(self) -> bool:
        """Whether worker kills or hangs are injected (faults of the worker process, not of the update)."""
        return self.kill_worker_prob > 0 or self.hang_prob > 0


class SpeedTier(Frozen):
    """A share of the clients with one compute speed (and, optionally, links of their own: a tier's ``down_mbps`` /
    ``up_mbps`` replace the clock's for its clients)."""

    fraction: float = Field(gt=0.0, le=1.0)
    """its share of the clients"""
    steps_per_s: float = Field(gt=0.0, le=1e9)
    """local steps per second"""
    down_mbps: float | None = Field(None, gt=0.0, le=1e9)
    """its clients' downlink (default: the clock's)"""
    up_mbps: float | None = Field(None, gt=0.0, le=1e9)
    """its clients' uplink (default: the clock's)"""


class ClockConfig(Frozen):
    """The simulated clock: how long each client would take on its own hardware and network, so that rounds have a
    simulated duration (reported next to wall time) and an optional deadline drops stragglers.

    A client's time = local steps / its speed + download and upload bytes at the configured bandwidths + 2 × latency;
    a round lasts as long as its slowest client (capped at the deadline). Speed: ``steps_per_s`` for everyone, or
    ``tiers`` (shares, dealt by a seeded permutation), times ``by_bits[bits]`` for a client whose base has those bits.
    :mod:`fedsim.federation.clock` does the arithmetic.
    """

    steps_per_s: float = Field(10.0, gt=0.0, le=1e9)
    """every client's local steps per second (without tiers)"""
    tiers: tuple[SpeedTier, ...] | None = None
    """speed (and link) tiers: shares of the clients"""
    by_bits: dict[int, float] | None = None
    """a speed multiplier by base bits"""
    down_mbps: float = Field(100.0, gt=0.0, le=1e9)
    """downlink Mbit/s"""
    up_mbps: float = Field(20.0, gt=0.0, le=1e9)
    """uplink Mbit/s"""
    latency_s: float = Field(0.05, ge=0.0, le=1e6)
    """latency per transfer"""
    deadline_s: float | None = Field(None, gt=0.0)
    """clients slower than this are stragglers: their updates are dropped (null: no deadline)"""

    @model_validator(mode="after")
    def _valid(self) -> ClockConfig:
        if self.tiers is not None:
            total = sum(t.fraction for t in self.tiers)
            if not self.tiers or abs(total - 1.0) > 1e-6:
                raise ValueError(f"speed tier fractions sum to {total:g}; they must sum to 1")
        for bits, factor in (self.by_bits or {}).items():
            if factor <= 0:
                raise ValueError(f"by_bits[{bits}] must be a positive speed multiplier, got {factor}")
        return self

