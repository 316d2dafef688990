"""The ``clients`` section: how many, sampled how, and each one's LoRA rank and base precision."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedsim.config.base import Frozen, check_mix, deal_tiers
from fedsim.config.quant import check_spec, default_backend
from fedsim.types import QuantSpec

QuantBackend = Literal["auto", "hqq", "bnb", "none"]


class RankTier(Frozen):
    """A share of the clients with one LoRA rank (alpha defaults to 2 × rank)."""

    fraction: float = Field(gt=0.0, le=1.0)
    """its share of the clients"""
    rank: int = Field(ge=1, le=4096)
    """LoRA rank"""
    alpha: float | None = Field(None, gt=0.0, le=1e6)
    """LoRA alpha (default: the section's)"""


class RankChoice(Frozen):
    """One client's LoRA rank (alpha defaults to 2 × rank)."""

    rank: int = Field(ge=1, le=4096)
    """LoRA rank"""
    alpha: float | None = Field(None, gt=0.0, le=1e6)
    """LoRA alpha (default: the section's)"""


class LoraSpecConfig(Frozen):
    """LoRA hyperparameters. The scaling follows PEFT: alpha/r, or alpha/sqrt(r) with ``rslora``.

    Every client gets ``rank``/``alpha`` unless ``tiers`` (shares of the clients, assigned by a seeded permutation)
    or ``per_client`` (one entry per client, in client-id order) say otherwise.
    """

    rank: int = Field(8, ge=1, le=4096)
    """LoRA rank r"""
    alpha: float = Field(16.0, gt=0.0, le=1e6)
    """LoRA alpha α (the scaling is α/r, or α/√r with rslora)"""
    rslora: bool = False
    """rank-stabilised scaling α/√r"""
    tiers: tuple[RankTier, ...] | None = None
    """mixed ranks: shares of the clients at each rank"""
    per_client: tuple[RankChoice, ...] | None = None
    """mixed ranks: one rank per client id, in order"""

    @model_validator(mode="after")
    def _one_mix(self) -> LoraSpecConfig:
        check_mix(self.tiers, self.per_client)
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


class QuantTier(Frozen):
    """A share of the clients with one bit width."""

    fraction: float = Field(gt=0.0, le=1.0)
    """its share of the clients"""
    bits: int
    """the base's bits: 2, 3, 4, 8, 16 or 32"""
    backend: QuantBackend = "auto"
    """the quantization library (auto, bnb, hqq)"""


class QuantChoice(Frozen):
    """One client's bit width."""

    bits: int
    """the base's bits: 2, 3, 4, 8, 16 or 32"""
    backend: QuantBackend = "auto"
    """the quantization library (auto, bnb, hqq)"""


class QuantConfig(Frozen):
    """How each client stores its base model: ``bits`` for everyone, or ``tiers`` (shares, dealt by a seeded
    permutation) or ``per_client`` (one entry per client). ``backend: auto`` picks HQQ for 1–3 bits, bitsandbytes for
    4/8, none for 16/32. ``group_size`` is HQQ's group along the input dimension, ``blocksize`` bitsandbytes' 4-bit
    block, ``quant_type`` its 4-bit type; ``compute_dtype: auto`` is float32 on CPU, bfloat16 (else float16) on GPU."""

    bits: int = 32
    """the clients' base bits: 2, 3 (HQQ), 4, 8 (bitsandbytes or HQQ), 16, 32 (full precision)"""
    backend: QuantBackend = "auto"
    """auto, bnb (bitsandbytes) or hqq"""
    tiers: tuple[QuantTier, ...] | None = None
    """a mix: shares of the clients at each bit width"""
    per_client: tuple[QuantChoice, ...] | None = None
    """a mix: one bit width per client id"""
    group_size: int = Field(64, ge=1, le=1 << 20)
    """HQQ's quantization group"""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """bitsandbytes 4-bit: nf4 or fp4"""
    blocksize: int = Field(64, ge=1, le=1 << 20)
    """bitsandbytes 4-bit's block"""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """the dtype quantized layers compute in (auto: float32 on CPU, bfloat16 on GPU)"""

    @model_validator(mode="after")
    def _valid(self) -> QuantConfig:
        check_mix(self.tiers, self.per_client)
        for spec in self.choices():
            check_spec(spec)
        return self

    def _spec(self, bits: int, backend: str) -> QuantSpec:
        backend = default_backend(bits) if backend == "auto" else backend
        # only the settings of the spec's own backend, so that equal bases get equal keys
        return QuantSpec(bits=bits, backend=backend, group_size=self.group_size if backend == "hqq" else 64,
                         quant_type=self.quant_type if backend == "bnb" else "nf4",
                         blocksize=self.blocksize if backend == "bnb" else 64)

    def choices(self) -> list[QuantSpec]:
        """The distinct :class:`~fedsim.types.QuantSpec` this section can assign, in order."""
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

    def assign(self, num_clients: int, seed: int) -> list[QuantSpec]:
        """The QuantSpec of each client id."""
        if self.per_client is not None:
            return [self._spec(c.bits, c.backend) for c in self.per_client]
        if self.tiers is None:
            return [self._spec(self.bits, self.backend)] * num_clients
        specs = [self._spec(t.bits, t.backend) for t in self.tiers]
        return [specs[t] for t in deal_tiers([t.fraction for t in self.tiers], num_clients, seed, salt=223)]


class MaliciousConfig(Frozen):
    """Malicious clients (``clients.malicious``): a fixed, seeded ``fraction`` of the clients poison every update
    they send (:class:`fedsim.pipeline.transforms.Attack`). With Δ the change of the shared tensors in the round:
    ``sign_flip`` sends −factor·Δ (factor 1 by default), ``scale`` sends factor·Δ (10 by default), ``gaussian`` sends
    noise N(0, std²) in place of Δ, ``fixed`` the constant ``value`` in every coordinate of Δ, ``nan`` NaN (rejected
    by the server's validation). Data poisoning: ``label_flip`` trains on the client's rows with each label l
    replaced by (l + 1) mod K (classification data; :mod:`fedsim.data.poison`) and sends the update as it is."""

    fraction: float = Field(gt=0.0, lt=1.0)
    """the share of the clients that attack (a fixed seeded set)"""
    attack: Literal["sign_flip", "scale", "gaussian", "fixed", "nan", "label_flip"] = "sign_flip"
    """sign_flip, scale, gaussian, fixed, nan or label_flip"""
    factor: float | None = None
    """sign_flip / scale: the multiplier"""
    std: float = Field(1.0, gt=0.0)
    """gaussian: the noise's standard deviation"""
    value: float = 1.0
    """fixed: the value sent"""

    def count(self, num_clients: int) -> int:
        return int(round(self.fraction * num_clients))

    def clients(self, num_clients: int, seed: int) -> frozenset[int]:
        """The malicious clients: a seeded choice of :meth:`count` of them, the same every round."""
        import numpy as np

        rng = np.random.default_rng([seed, 41])
        return frozenset(int(c) for c in rng.choice(num_clients, size=self.count(num_clients), replace=False))

    def multiplier(self) -> float:
        """Δ's multiplier of the sign_flip and scale attacks."""
        if self.attack == "sign_flip":
            return -(self.factor if self.factor is not None else 1.0)
        return self.factor if self.factor is not None else 10.0


class ClientsConfig(Frozen):
    num_clients: int = Field(20, ge=1, le=10_000_000)
    """the registered (virtual) clients"""
    per_round: int | float = 5
    """clients sampled a round: a count, or a fraction of num_clients"""
    lora: LoraSpecConfig = LoraSpecConfig()
    """the clients' LoRA ranks and alphas (one, tiers or per client)"""
    # uniform: per_round of the available clients; size: probability ∝ the client's number of samples; poisson: each
    # available client independently with probability per_round / num_clients (a varying count)
    sampling: Literal["uniform", "size", "poisson"] = "uniform"
    availability: float = Field(1.0, gt=0.0, le=1.0)  # probability that a client is reachable in a round
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # probability that a sampled client drops out during the round
    state_budget_mb: float = Field(256.0, gt=0.0, le=1e7)  # client state kept in memory; the rest spills to disk
    state_dir: str | None = None
    """where client state spills (default: the run directory's client_state/)"""
    quant: QuantConfig = QuantConfig()
    """the clients' quantized bases (one, tiers or per client)"""
    malicious: MaliciousConfig | None = None
    """model-poisoning clients (robust aggregation's test)"""

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
    def _some_honest_and_some_malicious(self) -> ClientsConfig:
        m = self.malicious
        if m is not None:
            n = m.count(self.num_clients)
            if n < 1 or n >= self.num_clients:
                raise ValueError(f"malicious.fraction {m.fraction} of {self.num_clients} clients makes {n} malicious "
                                 "client(s): it must leave at least one of each (raise or lower the fraction)")
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
