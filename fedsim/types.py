"""Plain data records that cross the boundaries between driver, server, backend and workers.

Adapter tensors are dicts keyed ``"<module path>.lora_A.weight"`` / ``"<module path>.lora_B.weight"`` where the module
path is the base model's (e.g. ``model.layers.0.self_attn.q_proj``); A has shape (r, d_in) and B (d_out, r), as in PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch

Tensors = dict[str, "torch.Tensor"]  # torch stays out of scenario validation (the command line starts Ray first)


@dataclass(frozen=True)
class LoraSpec:
    """Rank and scaling of one LoRA adapter, computed exactly as PEFT does."""

    rank: int
    alpha: float
    rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5) if self.rslora else self.alpha / self.rank


@dataclass(frozen=True)
class QuantSpec:
    """How a client stores its base model.

    Args:
        bits: 1, 2, 3, 4, 8 (quantized), 16 (bfloat16 weights) or 32 (full precision).
        backend: ``hqq``, ``bnb`` or ``none`` (16/32 bits).
        group_size: weights per quantization group along the input dimension (HQQ).
        quant_type: bitsandbytes 4-bit type, ``nf4`` or ``fp4``.
        blocksize: weights per absmax block (bitsandbytes 4-bit).
    """

    bits: int = 32
    backend: str = "none"
    group_size: int = 64
    quant_type: str = "nf4"
    blocksize: int = 64

    @property
    def quantized(self) -> bool:
        return self.backend != "none"

    @property
    def label(self) -> str:
        if not self.quantized:
            return f"{self.bits}bit"
        extra = f"-{self.quant_type}" if self.backend == "bnb" and self.bits == 4 else ""
        return f"{self.bits}bit-{self.backend}{extra}"


FULL = QuantSpec()  # the full-precision base


@dataclass(frozen=True)
class ClientSpec:
    """A virtual client: its id, its data size and its own settings (LoRA rank/alpha, how it stores the base)."""

    client_id: int
    num_examples: int
    lora: LoraSpec
    quant: QuantSpec = QuantSpec()
    speed: float = 10.0  # local steps per second on the client's own hardware (the simulated clock)
    links: tuple[float, float] | None = None  # its (down, up) Mbit/s (the simulated clock; None: the clock's)


@dataclass(frozen=True)
class ModuleShape:
    """Shape of one adapted linear layer: ``d_in`` input features, ``d_out`` output features."""

    d_in: int
    d_out: int


@dataclass
class RoundReport:
    """What the server reports of a round's aggregation.

    Attributes:
        up_params, up_bytes: what the round's clients uploaded (``comm/up_params``, ``comm/up_bytes``).
        aggregated: the updates aggregated.
        rejected: client id → why its update was rejected.
        stage_metrics: the server stages' metrics for the round's row.
        per_client_up: client id → [params, bytes] it uploaded (rejected ones too).
        server_in_bytes, server_in_objects: what the simulator itself moved into the server
            (``engine/server_in_*``: every update, or the workers' partials).

    It reads as the mapping the server returned before it was typed (``report["aggregated"]``,
    ``report["comm/up_bytes"]``), for callers written against that.
    """

    up_params: float
    up_bytes: float
    aggregated: float
    rejected: dict[int, str]
    stage_metrics: dict[str, float]
    per_client_up: dict[int, list[int]]
    server_in_bytes: float
    server_in_objects: float

    _KEYS: ClassVar[dict[str, str]] = {"comm/up_params": "up_params", "comm/up_bytes": "up_bytes",
                                       "engine/server_in_bytes": "server_in_bytes",
                                       "engine/server_in_objects": "server_in_objects"}

    def __getitem__(self, key: str) -> Any:
        name = self._KEYS.get(key, key)
        if name.startswith("_") or name not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, name)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._KEYS.get(key, key) in self.__dataclass_fields__

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


@dataclass(frozen=True)
class RoundContext:
    """What a strategy may know about the round in progress (``asynchronous``: a buffered asynchronous run's step,
    read by its server stage, :mod:`fedsim.pipeline.asynchronous`)."""

    server_round: int
    num_rounds: int
    seed: int
    asynchronous: AsyncStep | None = None


@dataclass(frozen=True)
class AsyncStep:
    """One server step of a buffered asynchronous run (``asynchronous``).

    Attributes:
        starts: (client id, the global version it started from) for each update the step aggregates.
        live: the versions clients still in flight started from (the server keeps them until they arrive).
        task: when configuring, the client start it is for (the run's n-th; a key for the payload's randomness).
    """

    starts: tuple[tuple[int, int], ...] = ()
    live: tuple[int, ...] = ()
    task: int = 0


@dataclass
class GlobalState:
    """The server's state: the global adapter tensors plus strategy-specific extras.

    ``base_version`` counts merges into the base model (strategies that merge bump it).
    """

    tensors: Tensors
    lora: LoraSpec
    base_version: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    # base_deltas[v - 1] is the update that turns base version v - 1 into v: per module either
    # "<module>.delta_B" (d_out, R) and "<module>.delta_A" (R, d_in), or a dense "<module>.delta_W" (d_out, d_in).
    base_deltas: list[Tensors] = field(default_factory=list)


@dataclass(frozen=True)
class AlternateOptions:
    """The ``alternate`` local procedure (FedDPA-T, iterative FedQLoRA): the personal adapter first, then the main one.

    Args:
        personal_phase: run the personal phase (FedDPA skips it in round 1, when the global adapter is untrained).
        personal_in_main_phase: keep the frozen personal adapter active while the main one trains (FedQLoRA: it
            corrects the base the LoRA adapter trains on); else the main adapter trains alone (FedDPA).
    """

    personal_phase: bool = True
    personal_in_main_phase: bool = False


@dataclass(frozen=True)
class BilevelOptions:
    """The ``bilevel`` local procedure (PF2LoRA): lower-level step size α and the mode (``bilevel``,
    ``first_order`` or ``simultaneous``: the ablations)."""

    inner_lr: float = 0.5
    mode: str = "bilevel"


@dataclass(frozen=True)
class DynamicMix:
    """FedDPA-D's instance-wise weighting of the two adapters at evaluation (see :mod:`fedsim.strategies.feddpa`)."""

    instances: int = 5
    max_weight: float = 0.5
    embedding: str = "last"
    weights: str = "global"


@dataclass
class ClientPayload:
    """What the server sends one client: adapter weights to load and what to train.

    Every field a worker acts on is typed here; nothing travels as a string key in a loose mapping.

    Args:
        tensors: adapter weights to load before training (keys as in :mod:`fedsim.types`).
        lora: rank/alpha of the adapter the client trains.
        trainable: which factor kinds are trained: any of ``"A"``, ``"B"``.
        base_version: version of the base model the client must use.
        fresh: the client initialises a new adapter itself (nothing to download).
        base_update_params: size of the base-model updates the client downloads to reach ``base_version``.
        personal_lora: rank/alpha of the client's second, personal adapter (two-level methods), else None.
        mix: (w_main, w_personal): weights of the two adapters' outputs when both are active.
        procedure: the local training procedure (a registered ``procedure``: ``joint``, ``alternate``, ``bilevel``;
            or the procedure function itself, which travels with the payload to any worker) and
            ``procedure_options`` its settings (:class:`AlternateOptions`, :class:`BilevelOptions`).
        personal_init: how a client's personal adapter starts on its first visit: ``peft`` (B = 0, A random) or
            ``loftq`` (the rank-r truncated SVD of its quantization error, FedQLoRA).
        objectives: client objectives added to the local loss (:mod:`fedsim.objectives`, e.g. HETLoRA's tail).
        measure_qa: evaluation measures how well the personal adapter estimates the quantization error (FedQLoRA).
        no_personal_for: base labels (e.g. ``"16bit"``) whose clients are evaluated without the personal adapter.
        dynamic_mix: FedDPA-D's instance-wise weights at evaluation, else None.
        head: the global head of a model task that trains one in full (a classifier; keys ``head.<module>.<param>``),
            set by the server; None: the base model's initial head.
    """

    tensors: Tensors
    lora: LoraSpec
    trainable: tuple[str, ...] = ("A", "B")
    base_version: int = 0
    fresh: bool = False  # the client starts a new adapter itself (seeded PEFT init), ``tensors`` is empty
    base_update_params: int = 0  # parameters of base-model updates this client must download (FLoRA, FedEx-LoRA)
    personal_lora: LoraSpec | None = None
    mix: tuple[float, float] = (1.0, 1.0)
    procedure: str | Any = "joint"
    procedure_options: AlternateOptions | BilevelOptions | None = None
    personal_init: str = "peft"
    objectives: tuple[Any, ...] = ()
    measure_qa: bool = False
    no_personal_for: tuple[str, ...] = ()
    dynamic_mix: DynamicMix | None = None
    head: Tensors | None = None
    wire: dict[str, int] | None = None  # each tensor's bytes on the wire where the server encoded them (compression)


@dataclass
class ClientUpdate:
    """What a client sends back after local training (tensors on CPU)."""

    client_id: int
    num_examples: int
    lora: LoraSpec
    tensors: Tensors
    metrics: dict[str, float] = field(default_factory=dict)
    # what client objectives upload besides the adapter (SCAFFOLD's Δc_i), keyed objective.<state_key>.<key>: the
    # server stages read them; strategies never see them
    extra: Tensors = field(default_factory=dict)
    # the client's trained head (a model task's modules trained in full, keys head.<module>.<param>): the server
    # averages it beside the strategy's aggregation; strategies never see it
    head: Tensors = field(default_factory=dict)
    # each tensor's bytes on the wire where the client encoded them (compression.upload); None: their raw size
    wire: dict[str, int] | None = None


@dataclass(frozen=True)
class ClientJob:
    """One client's work in one round (``attempt`` counts retries from 1)."""

    spec: ClientSpec
    indices: np.ndarray
    server_round: int
    attempt: int = 1
    personal: Tensors | None = None  # the client's private tensors from earlier rounds


@dataclass(frozen=True)
class ClientFailure:
    """A client that did not return an update this round, and why."""

    client_id: int
    reason: str

    @classmethod
    def of(cls, client_id: int, error: BaseException) -> ClientFailure:
        """The failure of a client whose job raised ``error``."""
        return cls(client_id, f"{error.__class__.__name__}: {error}")


@dataclass(frozen=True)
class ClientResult:
    """The small part of a client's result the driver sees (the tensors go straight to the server)."""

    client_id: int
    num_examples: int
    metrics: dict[str, float]
    worker: str
    personal: Tensors | None = None  # the client's private tensors (never given to the server)
    note: str | None = None  # something the run's log should say once (e.g. why a client was not packed)
    logged: tuple[str, ...] = ()  # the keys of ``metrics`` the round's row reports (example-weighted means)
    # a worker that folded the update into its partial (resources.worker_partials): its upload (params, bytes), and
    # why the update was rejected (None: folded)
    upload: tuple[int, int] | None = None
    rejected: str | None = None
