"""Scenario schema: YAML in, validated frozen objects out.

A scenario file is parsed with ``yaml.safe_load`` (it can never execute code or import modules), command-line
``--set a.b=c`` overrides are applied to the raw mapping, and the result is validated by pydantic into a frozen
:class:`Scenario`. Unknown keys are rejected everywhere. Errors come out as one :class:`~fedsim.errors.ScenarioError`
that names each offending field and the fix.
"""

from __future__ import annotations

import copy
import string
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedsim.errors import ScenarioError

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TinyModelConfig(_Frozen):
    """Size of the built-in tiny Llama-architecture model (random init, byte-level vocabulary)."""

    hidden_size: int = Field(64, ge=8, le=4096)
    intermediate_size: int = Field(128, ge=8, le=16384)
    num_layers: int = Field(2, ge=1, le=64)
    num_heads: int = Field(4, ge=1, le=64)
    max_position_embeddings: int = Field(512, ge=16, le=32768)
    init_seed: int = Field(1234, ge=0)
    # Larger than Llama's 0.02: the frozen, random lm_head must be able to express confident predictions, since with
    # RMSNorm before it the largest logit is bounded by about init_std · hidden_size.
    init_std: float = Field(0.1, gt=0.0, le=2.0)

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "pick num_heads that divides hidden_size"
            )
        return self


class ModelConfig(_Frozen):
    """The base model. ``name: tiny`` builds a small Llama from config (no download); anything else is a Hugging Face
    hub name or a local directory loaded with ``from_pretrained``."""

    name: str = "tiny"
    tiny: TinyModelConfig = TinyModelConfig()
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    revision: str | None = None
    trust_remote_code: bool = False

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("needs at least one module name, e.g. [q_proj, v_proj]")
        return v

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, v: bool) -> bool:
        if v:
            raise ValueError(
                "scenario files may not execute code; load models whose architecture is part of transformers"
            )
        return v


class SyntheticConfig(_Frozen):
    """Built-in procedurally generated multi-task instruction data (see :mod:`fedsim.data.synthetic`)."""

    tasks: tuple[str, ...] = ("add", "reverse", "sort", "upper", "count")
    num_train: int = Field(2000, ge=1, le=10_000_000)
    num_test: int = Field(400, ge=1, le=1_000_000)
    seed: int = Field(0, ge=0)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from fedsim.data.synthetic import TASKS

        unknown = [t for t in v if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown synthetic task(s) {unknown}; choose from {sorted(TASKS)}")
        if not v:
            raise ValueError(f"needs at least one task; choose from {sorted(TASKS)}")
        return v


class TestSplitConfig(_Frozen):
    """Where the global test set comes from: a separate source (file or hub split) or a held-out fraction."""

    source: str | None = None
    split: str | None = None
    fraction: float | None = Field(None, gt=0.0, lt=1.0)
    max_samples: int | None = Field(None, ge=1)


class DataConfig(_Frozen):
    """Training data: source, format and field names."""

    source: str = "synthetic"
    synthetic: SyntheticConfig = SyntheticConfig()
    format: Literal["instruction", "classification"] = "instruction"
    split: str = "train"
    subset: str | None = None
    columns: tuple[str, ...] | None = None
    prompt_template: str | None = None
    response_field: str = "output"
    label_field: str = "label"
    label_names: dict[int | str, str] | None = None
    task_field: str | None = "task"
    test: TestSplitConfig = TestSplitConfig()
    max_seq_len: int = Field(64, ge=8, le=65536)
    max_train_samples: int | None = Field(None, ge=1)

    @field_validator("prompt_template")
    @classmethod
    def _plain_placeholders(cls, v: str | None) -> str | None:
        if v is None:
            return v
        for _, name, spec, conv in string.Formatter().parse(v):
            if name is None:
                continue
            if not name.isidentifier() or spec or conv:
                raise ValueError(
                    f"placeholder {{{name}}} is not a plain field name; use {{field}} with the column name only"
                )
        return v

    def template(self) -> str:
        """The prompt template in force (format-dependent default)."""
        if self.prompt_template is not None:
            return self.prompt_template
        return "{instruction}\n" if self.format == "instruction" else "{text}\nLabel: "


class PartitionConfig(_Frozen):
    """How training samples are split over clients (non-IID)."""

    method: Literal["iid", "dirichlet", "shards", "natural", "quantity"] = "iid"
    alpha: float = Field(0.5, gt=0.0, le=1e6)
    by: str | None = None
    shards_per_client: int = Field(2, ge=1, le=10_000)
    min_samples: int = Field(1, ge=1)


class RankTier(_Frozen):
    """A share of the clients with one LoRA rank (alpha defaults to 2 × rank)."""

    fraction: float = Field(gt=0.0, le=1.0)
    rank: int = Field(ge=1, le=4096)
    alpha: float | None = Field(None, gt=0.0, le=1e6)


class RankChoice(_Frozen):
    """One client's LoRA rank (alpha defaults to 2 × rank)."""

    rank: int = Field(ge=1, le=4096)
    alpha: float | None = Field(None, gt=0.0, le=1e6)


def _check_mix(tiers: tuple | None, per_client: tuple | None) -> None:
    """A mix is tiers (non-empty, fractions summing to 1) or a per-client list, not both."""
    if tiers is not None and per_client is not None:
        raise ValueError("give either tiers or per_client, not both")
    if tiers is not None:
        if not tiers:
            raise ValueError("tiers needs at least one tier")
        total = sum(t.fraction for t in tiers)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"tier fractions sum to {total:g}; they must sum to 1")


class LoraSpecConfig(_Frozen):
    """LoRA hyperparameters. The scaling follows PEFT: alpha/r, or alpha/sqrt(r) with ``rslora``.

    Every client gets ``rank``/``alpha`` unless ``tiers`` (shares of the clients, assigned by a seeded permutation)
    or ``per_client`` (one entry per client, in client-id order) say otherwise.
    """

    rank: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0.0, le=1e6)
    rslora: bool = False
    tiers: tuple[RankTier, ...] | None = None
    per_client: tuple[RankChoice, ...] | None = None

    @model_validator(mode="after")
    def _one_mix(self) -> LoraSpecConfig:
        _check_mix(self.tiers, self.per_client)
        return self

    def is_mixed(self) -> bool:
        return len({(r, a) for r, a in self.choices()}) > 1

    def choices(self) -> list[tuple[int, float]]:
        """The distinct (rank, alpha) pairs this section can assign."""
        if self.tiers is not None:
            return [(t.rank, t.alpha if t.alpha is not None else 2.0 * t.rank) for t in self.tiers]
        if self.per_client is not None:
            return [(c.rank, c.alpha if c.alpha is not None else 2.0 * c.rank) for c in self.per_client]
        return [(self.rank, self.alpha)]

    def max_rank(self) -> int:
        return max(r for r, _ in self.choices())

    def assign(self, num_clients: int, seed: int) -> list[tuple[int, float]]:
        """(rank, alpha) for each client id. Tiers: largest-remainder counts, dealt by a seeded permutation."""
        if self.per_client is not None:
            return self.choices()
        if self.tiers is None:
            return [(self.rank, self.alpha)] * num_clients
        choices = self.choices()
        return [choices[t] for t in deal_tiers([t.fraction for t in self.tiers], num_clients, seed, salt=211)]


def deal_tiers(fractions: list[float], num_clients: int, seed: int, salt: int) -> list[int]:
    """Tier index of each client id: largest-remainder counts, dealt by a permutation seeded by (seed, salt)."""
    exact = [f * num_clients for f in fractions]
    counts = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: num_clients - sum(counts)]:
        counts[i] += 1
    labels = [i for i, c in enumerate(counts) for _ in range(c)]
    perm = np.random.default_rng([seed, salt]).permutation(num_clients)
    per_client = [0] * num_clients
    for client, tier in zip(perm, labels):
        per_client[int(client)] = tier
    return per_client


QuantBackend = Literal["auto", "hqq", "bnb", "none"]


class QuantTier(_Frozen):
    """A share of the clients with one bit width."""

    fraction: float = Field(gt=0.0, le=1.0)
    bits: int
    backend: QuantBackend = "auto"


class QuantChoice(_Frozen):
    """One client's bit width."""

    bits: int
    backend: QuantBackend = "auto"


class QuantConfig(_Frozen):
    """How each client stores its base model: ``bits`` for everyone, or ``tiers`` (shares, dealt by a seeded
    permutation) or ``per_client`` (one entry per client). ``backend: auto`` picks HQQ for 1–3 bits, bitsandbytes for
    4/8, none for 16/32. ``group_size`` is HQQ's group along the input dimension, ``blocksize`` bitsandbytes' 4-bit
    block, ``quant_type`` its 4-bit type; ``compute_dtype: auto`` is float32 on CPU, bfloat16 (else float16) on GPU."""

    bits: int = 32
    backend: QuantBackend = "auto"
    tiers: tuple[QuantTier, ...] | None = None
    per_client: tuple[QuantChoice, ...] | None = None
    group_size: int = Field(64, ge=1, le=1 << 20)
    quant_type: Literal["nf4", "fp4"] = "nf4"
    blocksize: int = Field(64, ge=1, le=1 << 20)
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="after")
    def _valid(self) -> QuantConfig:
        _check_mix(self.tiers, self.per_client)
        from fedsim.models.quant_specs import check_spec

        for spec in self.choices():
            check_spec(spec)
        return self

    def _spec(self, bits: int, backend: str):
        from fedsim.models.quant_specs import QuantSpec, default_backend

        backend = default_backend(bits) if backend == "auto" else backend
        # only the settings of the spec's own backend, so that equal bases get equal keys
        return QuantSpec(bits=bits, backend=backend, group_size=self.group_size if backend == "hqq" else 64,
                         quant_type=self.quant_type if backend == "bnb" else "nf4",
                         blocksize=self.blocksize if backend == "bnb" else 64)

    def choices(self) -> list:
        """The distinct :class:`~fedsim.models.quant.QuantSpec` this section can assign, in order."""
        if self.tiers is not None:
            items = [(t.bits, t.backend) for t in self.tiers]
        elif self.per_client is not None:
            items = [(c.bits, c.backend) for c in self.per_client]
        else:
            items = [(self.bits, self.backend)]
        return list(dict.fromkeys(self._spec(b, k) for b, k in items))

    def is_quantized(self) -> bool:
        return any(s.quantized or s.bits != 32 for s in self.choices())

    def backends(self) -> set[str]:
        """The quantization backends this section's clients use (``none`` for 16/32 bits)."""
        return {s.backend for s in self.choices()}

    def assign(self, num_clients: int, seed: int) -> list:
        """The QuantSpec of each client id."""
        if self.per_client is not None:
            return [self._spec(c.bits, c.backend) for c in self.per_client]
        if self.tiers is None:
            return [self._spec(self.bits, self.backend)] * num_clients
        specs = [self._spec(t.bits, t.backend) for t in self.tiers]
        return [specs[t] for t in deal_tiers([t.fraction for t in self.tiers], num_clients, seed, salt=223)]


class ClientsConfig(_Frozen):
    num_clients: int = Field(20, ge=1, le=10_000_000)
    per_round: int | float = 5
    lora: LoraSpecConfig = LoraSpecConfig()
    sampling: Literal["uniform", "size"] = "uniform"  # size: probability ∝ the client's number of samples
    availability: float = Field(1.0, gt=0.0, le=1.0)  # probability that a client is reachable in a round
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # probability that a sampled client drops out during the round
    state_budget_mb: float = Field(256.0, gt=0.0, le=1e7)  # client state kept in memory; the rest spills to disk
    # where spilled client state goes (a subdirectory per run); default: <run dir>/client_state
    state_dir: str | None = None
    quant: QuantConfig = QuantConfig()

    @field_validator("per_round", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # YAML "yes"/"true" would otherwise become 1
            raise ValueError("must be a count (int >= 1) or a fraction in (0, 1], not a boolean")
        return v

    @field_validator("per_round")
    @classmethod
    def _per_round(cls, v: int | float) -> int | float:
        if isinstance(v, float) and not v.is_integer() and not 0.0 < v <= 1.0:
            raise ValueError("a fractional per_round must lie in (0, 1]; use an integer for a count")
        if isinstance(v, float) and v.is_integer() and v > 1:
            v = int(v)
        if isinstance(v, float) and v <= 0 or isinstance(v, int) and v < 1:
            raise ValueError("must be a count (int >= 1) or a fraction in (0, 1]")
        return v

    @model_validator(mode="after")
    def _per_client_length(self) -> ClientsConfig:
        for what, lst in (("lora", self.lora.per_client), ("quant", self.quant.per_client)):
            if lst is not None and len(lst) != self.num_clients:
                raise ValueError(f"{what}.per_client lists {len(lst)} clients but num_clients is "
                                 f"{self.num_clients}; give one entry per client")
        return self

    @model_validator(mode="after")
    def _enough_clients(self) -> ClientsConfig:
        if isinstance(self.per_round, int) and self.per_round > self.num_clients:
            raise ValueError(
                f"per_round {self.per_round} exceeds num_clients {self.num_clients}; lower per_round "
                "or use a fraction such as 0.25"
            )
        return self

    def num_per_round(self) -> int:
        """Number of clients sampled each round."""
        if isinstance(self.per_round, float):
            return max(1, int(round(self.per_round * self.num_clients)))
        return self.per_round


class TrainingConfig(_Frozen):
    local_steps: int | None = Field(None, ge=1, le=1_000_000)
    local_epochs: float | None = Field(None, gt=0.0, le=10_000)
    batch_size: int = Field(8, ge=1, le=65536)
    lr: float = Field(3e-3, gt=0.0, le=10.0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingConfig:
        if self.local_steps is not None and self.local_epochs is not None:
            raise ValueError("set either local_steps or local_epochs, not both")
        return self

    def steps_for(self, num_examples: int) -> int:
        """Local optimizer steps for a client holding ``num_examples`` samples."""
        if self.local_epochs is not None:
            per_epoch = -(-num_examples // self.batch_size)
            return max(1, int(round(self.local_epochs * per_epoch)))
        return self.local_steps if self.local_steps is not None else 10


class EvalConfig(_Frozen):
    every: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1, le=65536)
    at_start: bool = True
    # share of each client's shard held out as its local test split (personalized evaluation); 0 = none
    local_test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    # how many clients (a fixed, seeded subset) are scored on their local test splits; None = all
    local_clients: int | None = Field(None, ge=1)


class ServerResources(_Frozen):
    """Resources of the server, which holds the global state and aggregates. None (the default): it runs in the
    driver process (Ray backend: no process of its own to start or keep in memory). Any CPU or GPU: a Ray actor of
    its own, isolated from the driver and placed where those resources are (e.g. a GPU for a heavy aggregation)."""

    num_cpus: float = Field(0.0, ge=0.0, le=1024)
    num_gpus: float = Field(0.0, ge=0.0, le=64)


class WorkerPool(_Frozen):
    """Extra workers, sized for the clients whose base has one of ``bits`` (e.g. a GPU share for 16-bit clients)."""

    bits: tuple[int, ...] = Field(min_length=1)
    num_workers: int = Field(1, ge=1, le=4096)
    num_cpus: float = Field(1.0, gt=0.0, le=1024)
    num_gpus: float = Field(0.0, ge=0.0, le=64)


MAX_CLIENTS_PER_PASS = 256


class ResourcesConfig(_Frozen):
    backend: Literal["local", "ray"] = "ray"
    num_workers: int = Field(2, ge=1, le=4096)
    num_cpus: float = Field(1.0, gt=0.0, le=1024)
    num_gpus: float = Field(0.0, ge=0.0, le=64)
    num_threads: int | None = Field(None, ge=1, le=1024)
    address: str | None = None
    server: ServerResources = ServerResources()
    dashboard: bool = False
    max_retries: int = Field(1, ge=0, le=100)
    # consecutive rounds in which every sampled client fails before the run stops with their reason; 0 = never
    max_failed_rounds: int = Field(3, ge=0, le=1_000_000)
    client_timeout_s: float | None = Field(None, gt=0.0)
    # clients whose base has one of a pool's bits are trained by that pool's workers; the rest by the main pool
    pools: tuple[WorkerPool, ...] = ()
    # clients trained together in one pass over one base (fedsim.client.packed): 1 = one at a time; auto = as many
    # as fit pack_tokens tokens per pass (batch_size × max_seq_len each)
    clients_per_pass: int | Literal["auto"] = 1
    # the token budget of one packed pass for clients_per_pass: auto (None: 4096 on CPU workers, 32768 with GPUs)
    pack_tokens: int | None = Field(None, ge=1, le=2**24)

    @field_validator("clients_per_pass")
    @classmethod
    def _per_pass(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= MAX_CLIENTS_PER_PASS:
            raise ValueError(f"clients_per_pass must be between 1 and {MAX_CLIENTS_PER_PASS} or 'auto', got {v}")
        return v

    def pack_size(self, tokens_per_client: int) -> int:
        """Clients per packed pass: ``clients_per_pass``, or for ``auto`` as many as fit the token budget
        (``pack_tokens``; default 4096 tokens on CPU workers — where a pass gains little beyond that — and 32768 on
        GPU workers), at least 1 and at most MAX_CLIENTS_PER_PASS."""
        if self.clients_per_pass != "auto":
            return int(self.clients_per_pass)
        budget = self.pack_tokens or (32768 if self.num_gpus > 0 else 4096)
        return max(1, min(MAX_CLIENTS_PER_PASS, budget // max(1, tokens_per_client)))

    @model_validator(mode="after")
    def _pools_disjoint(self) -> ResourcesConfig:
        seen: dict[int, int] = {}
        for i, pool in enumerate(self.pools):
            for b in pool.bits:
                if b in seen:
                    raise ValueError(f"pools {seen[b]} and {i} both claim {b}-bit clients; give each bit width to "
                                     "one pool")
                seen[b] = i
        return self

    def pool_of(self, bits: int) -> int:
        """Index of the pool that trains ``bits``-bit clients (-1: the main pool)."""
        return next((i for i, p in enumerate(self.pools) if bits in p.bits), -1)

    def slots(self) -> list[tuple[int, float, float]]:
        """(pool index, num_cpus, num_gpus) of every worker: the main pool (-1) first."""
        out = [(-1, self.num_cpus, self.num_gpus)] * self.num_workers
        for i, p in enumerate(self.pools):
            out += [(i, p.num_cpus, p.num_gpus)] * p.num_workers
        return out

    def threads_per_worker(self) -> int:
        """torch intra-op threads per worker — every worker, pools included, so that a client's result does not depend
        on which worker (or backend) trains it."""
        return self.num_threads or max(1, int(self.num_cpus))


class WandbConfig(_Frozen):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "fedsim"
    group: str | None = None
    entity: str | None = None
    tags: tuple[str, ...] = ()


class LoggingConfig(_Frozen):
    console: bool = True
    progress: Literal["auto", "rich", "plain", "off"] = "auto"
    jsonl: bool = True
    wandb: WandbConfig = WandbConfig()


class FaultsConfig(_Frozen):
    """Fault injection, a testing aid: each client attempt draws its faults from (seed, round, client, attempt).

    ``kill_worker_prob``: the worker process exits mid-job (Ray backend); ``nan_update_prob``: the update is filled
    with NaN (rejected by the server); ``hang_prob``: the job sleeps ``hang_s`` (Ray backend; pair it with
    ``resources.client_timeout_s``).
    """

    kill_worker_prob: float = Field(0.0, ge=0.0, le=1.0)
    nan_update_prob: float = Field(0.0, ge=0.0, le=1.0)
    hang_prob: float = Field(0.0, ge=0.0, le=1.0)
    hang_s: float = Field(3600.0, gt=0.0)

    def any(self) -> bool:
        return self.kill_worker_prob > 0 or self.nan_update_prob > 0 or self.hang_prob > 0


class SpeedTier(_Frozen):
    """A share of the clients with one compute speed."""

    fraction: float = Field(gt=0.0, le=1.0)
    steps_per_s: float = Field(gt=0.0, le=1e9)


class ClockConfig(_Frozen):
    """The simulated clock: how long each client would take on its own hardware and network, so that rounds have a
    simulated duration (reported next to wall time) and an optional deadline drops stragglers.

    A client's time = local steps / its speed + download and upload bytes at the configured bandwidths + 2 × latency;
    a round lasts as long as its slowest client (capped at the deadline). Speed: ``steps_per_s`` for everyone, or
    ``tiers`` (shares, dealt by a seeded permutation), times ``by_bits[bits]`` for a client whose base has those bits.
    """

    steps_per_s: float = Field(10.0, gt=0.0, le=1e9)
    tiers: tuple[SpeedTier, ...] | None = None
    by_bits: dict[int, float] | None = None
    down_mbps: float = Field(100.0, gt=0.0, le=1e9)
    up_mbps: float = Field(20.0, gt=0.0, le=1e9)
    latency_s: float = Field(0.05, ge=0.0, le=1e6)
    deadline_s: float | None = Field(None, gt=0.0)

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

    def speeds(self, num_clients: int, seed: int, bits: list[int]) -> list[float]:
        """Steps per second of each client id."""
        if self.tiers is None:
            base = [self.steps_per_s] * num_clients
        else:
            tier = deal_tiers([t.fraction for t in self.tiers], num_clients, seed, salt=227)
            base = [self.tiers[t].steps_per_s for t in tier]
        mult = self.by_bits or {}
        return [v * mult.get(b, 1.0) for v, b in zip(base, bits)]

    def client_time(self, steps: float, speed: float, down_bytes: float, up_bytes: float) -> float:
        """Simulated seconds for one client's round: compute, then transfers at the configured bandwidths."""
        return (steps / speed + 8.0 * down_bytes / (self.down_mbps * 1e6) + 8.0 * up_bytes / (self.up_mbps * 1e6)
                + 2 * self.latency_s)


class CheckpointConfig(_Frozen):
    """How often the server state is saved for ``fedsim run --resume`` (always after the last round too)."""

    every: int = Field(1, ge=1)


class StrategyConfig(_Frozen):
    name: str = "fedit"
    params: dict[str, Any] = Field(default_factory=dict)


class Scenario(_Frozen):
    """A whole federated fine-tuning experiment. Build one with :func:`load_scenario` or :func:`scenario_from_dict`."""

    name: str = Field("run", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    rounds: int = Field(10, ge=1, le=1_000_000)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    clients: ClientsConfig = ClientsConfig()
    training: TrainingConfig = TrainingConfig()
    eval: EvalConfig = EvalConfig()
    strategy: StrategyConfig = StrategyConfig()
    resources: ResourcesConfig = ResourcesConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    clock: ClockConfig = ClockConfig()
    faults: FaultsConfig = FaultsConfig()

    def pack_size(self) -> int:
        """Clients per packed training pass (``resources.clients_per_pass``, ``auto`` resolved for this scenario's
        batch_size × max_seq_len)."""
        return self.resources.pack_size(self.training.batch_size * self.data.max_seq_len)

    @field_validator("name")
    @classmethod
    def _name_stays_in_runs(cls, v: str) -> str:
        if set(v) == {"."} and len(v) <= 2:  # "." is runs/ itself, ".." its parent
            raise ValueError(f"name {v!r} would put the run outside its own directory under runs/; use a name "
                             "with a letter or digit, e.g. quickstart")
        return v

    @model_validator(mode="after")
    def _faults_need_ray(self) -> Scenario:
        f = self.faults
        if self.resources.backend == "local" and (f.kill_worker_prob > 0 or f.hang_prob > 0):
            raise ScenarioError("faults", "worker kills and hangs need the Ray backend (a local client runs inside "
                                "the driver process)", "set resources.backend: ray, or use only nan_update_prob")
        return self

    @model_validator(mode="after")
    def _strategy_known(self, info: ValidationInfo) -> Scenario:
        if info.context and info.context.get("strategy") is False:  # checked later (it imports every strategy)
            return self
        from fedsim.strategies import available_strategies, get_strategy_class

        cls = get_strategy_class(self.strategy.name)  # raises ScenarioError naming the registered ones
        if cls.has_personal_state and self.eval.local_test_fraction <= 0:
            raise ScenarioError("eval.local_test_fraction", f"strategy {cls.name!r} keeps personal adapters, which "
                                "are evaluated on each client's local test split, but none is held out",
                                "set eval.local_test_fraction, e.g. 0.2")
        if self.clients.lora.is_mixed() and not cls.supports_mixed_ranks:
            mixed = sorted(n for n, c in available_strategies().items() if c.supports_mixed_ranks)
            raise ScenarioError("clients.lora", f"strategy {cls.name!r} needs every client at one rank and alpha, "
                                "but the scenario mixes them", f"use one of {', '.join(mixed)} or a single rank")
        try:
            cls.Params(**self.strategy.params)
        except ValidationError as e:
            raise ScenarioError("strategy.params", _format_validation(e, prefix="strategy.params"), None) from None
        return self

    def strategy_params(self) -> BaseModel:
        """The strategy's own validated hyperparameters."""
        from fedsim.strategies import get_strategy_class

        return get_strategy_class(self.strategy.name).Params(**self.strategy.params)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved scenario (all defaults filled in) as plain YAML-able data."""
        return self.model_dump(mode="json")


# ----------------------------------------------------------------------------------------------------------------
# loading


def _format_validation(e: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-after"))
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling and nesting (see `fedsim validate --help`)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``a.b.c=value`` override; the value is parsed as YAML (so ``3``, ``0.5``, ``[a, b]`` work)."""
    if "=" not in text:
        raise ScenarioError("--set", f"override {text!r} has no '='", "write it as key.path=value, e.g. rounds=5")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise ScenarioError("--set", f"override {text!r} has an empty key", "write it as key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ScenarioError(key, f"override value {raw!r} is not valid YAML ({e.__class__.__name__})") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b=c`` override applied (creating nested mappings as needed)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ScenarioError(
                    ".".join(path[: i + 1]), "is a value, not a section, so it cannot take sub-keys",
                    f"set {'.'.join(path[: i + 1])}=... directly",
                )
            node = nxt
        node[path[-1]] = value
    return out


MAX_NODES = 100_000


def _check_size(raw: Any) -> None:
    """Refuse pathological documents (e.g. YAML alias bombs) before validation walks them."""
    count = 0
    stack = [raw]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ScenarioError("", f"the scenario has more than {MAX_NODES} values",
                                "scenario files hold settings, not data; point data.source at a file instead")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def scenario_from_dict(raw: Any, overrides: list[str] | tuple[str, ...] = (), check_strategy: bool = True
                       ) -> Scenario:
    """Validate a raw mapping (plus overrides) into a :class:`Scenario`.

    ``check_strategy=False`` leaves out the strategy checks (name, params, what it needs of the scenario), which
    import every strategy and with them torch: what the command line validates before it starts Ray, then it
    validates again in full.

    Raises:
        ScenarioError: naming every invalid field and the fix.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ScenarioError("", f"a scenario must be a mapping of sections, got {type(raw).__name__}",
                            "start from scenarios/quickstart.yaml")
    _check_size(raw)
    raw = apply_overrides(raw, overrides)
    try:
        return Scenario.model_validate(raw, context=None if check_strategy else {"strategy": False})
    except ValidationError as e:
        raise ScenarioError("", _format_validation(e)) from None
    except RecursionError:
        raise ScenarioError("", "the scenario is nested too deeply") from None


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_strategy: bool = True
                  ) -> Scenario:
    """Read a YAML scenario file and validate it.

    Args:
        path: the YAML file.
        overrides: ``a.b=c`` strings applied before validation.
        check_strategy: False leaves the strategy checks out (see :func:`scenario_from_dict`).

    Returns:
        The frozen, validated scenario.

    Raises:
        ScenarioError: file missing, not YAML, or invalid.
    """
    p = Path(path)
    if not p.is_file():
        raise ScenarioError("", f"scenario file {str(p)!r} does not exist", "check the path, e.g. scenarios/quickstart.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError("", f"cannot read scenario file {str(p)!r}: {e}") from None
    if len(text) > 5_000_000:
        raise ScenarioError("", "scenario file is larger than 5 MB", "scenario files hold settings, not data")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ScenarioError("", f"{p.name}: {e}", "give each key once (the last one would silently win)") from None
    except yaml.YAMLError as e:
        raise ScenarioError("", f"{p.name} is not valid YAML: {e}", "fix the YAML syntax at the line shown") from None
    return scenario_from_dict(raw, overrides, check_strategy)


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base constructor reports unhashable keys itself
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice in one section (lines {seen[key]} and "
                                    f"{key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def dump_scenario(scenario: Scenario) -> str:
    """YAML text of the resolved scenario."""
    return yaml.safe_dump(scenario.to_dict(), sort_keys=False)
