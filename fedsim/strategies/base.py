"""The strategy extension point.

A strategy is pure tensor code: payloads in, state out — no Ray, no CUDA calls, no files, no logging — so that it can
be tested with 3×2 tensors and reused outside the engine. The round loop lives in :mod:`fedsim.federation`.

To add an algorithm, write one file in ``fedsim/strategies/`` (or your own module — a script or a notebook will do —,
or a package registered through the ``fedsim.strategies`` entry-point group) with a subclass decorated by
:func:`register`. The driver resolves the scenario's strategy once and ships the instance to the server and the
workers, so a strategy defined in a notebook runs on Ray too.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field, field_validator

from fedsim import registry as _registry
from fedsim.errors import AggregationError
from fedsim.lora import ops
from fedsim.schema import Strict
from fedsim.strategies.fold import Partial
from fedsim.types import (
    ClientPayload,
    ClientSpec,
    ClientUpdate,
    GlobalState,
    LoraSpec,
    ModuleShape,
    RoundContext,
)


class NoParams(Strict):
    """A strategy without hyperparameters."""


class PersonalAdapterParams(Strict):
    """Rank and alpha of a two-level method's personal adapter (PF2LoRA's r~, FedDPA's local adapter)."""

    personal_rank: int | None = None  # None: the strategy's default
    personal_alpha: float | None = Field(None, gt=0.0)  # None: the same LoRA scaling as the global adapter

    @field_validator("personal_rank")
    @classmethod
    def _rank(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"the personal adapter's rank r~ must be at least 1, got {v} (e.g. 2)")
        return v

    def spec(self, lora: LoraSpec, default_rank: int) -> LoraSpec:
        rank = self.personal_rank or default_rank
        alpha = self.personal_alpha
        if alpha is None:  # keep the global adapter's scaling: alpha / r (or alpha / √r with rsLoRA)
            alpha = lora.scaling * (rank**0.5 if lora.rslora else rank)
        return LoraSpec(rank=rank, alpha=float(alpha), rslora=lora.rslora)


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy needs to build its initial state.

    Args:
        shapes: adapted module path → its linear layer's shape.
        lora: the global adapter's rank and alpha.
        seed: the scenario seed (initialisation must be a function of it).
    """

    shapes: dict[str, ModuleShape]
    lora: LoraSpec
    seed: int


def register(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator that registers a strategy under ``name`` (lower case) in :mod:`fedsim.registry`."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        key = name.lower()
        _registry.register("strategy", key, cls)
        cls.name = key
        return cls

    return deco


def registry() -> dict[str, type[Strategy]]:
    """Every registered strategy class by name."""
    return _registry.entries("strategy")


class Strategy(ABC):
    """Base class of aggregation strategies.

    Subclasses set ``Params`` (a frozen pydantic model of their own hyperparameters) and implement
    :meth:`init_state`, :meth:`configure` and either :meth:`aggregate` (the round's updates at once) or, when the
    aggregation is a reduction, ``streams = True`` with :meth:`fold` and :meth:`finish` (one update at a time: the
    server never holds the round's updates, and workers fold partials; :mod:`fedsim.strategies.fold`). None of the
    methods may mutate their arguments.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    supports_mixed_ranks: ClassVar[bool] = False
    has_personal_state: ClassVar[bool] = False  # some adapter tensors stay with their client (is_shared False)
    # per-client state beyond adapter tensors stays with the client (a client objective's: fedsim.objectives)
    keeps_client_state: ClassVar[bool] = False
    aggregates: ClassVar[bool] = True  # False only for the no-federation baseline (nothing is uploaded)
    # the global state is factors averaged over clients (FedIT and kin): a server optimizer can step on them
    averages_factors: ClassVar[bool] = False
    # each client starts from the state's own shared tensors (its update's tensors are coordinates of the state: a
    # robust rule or differential privacy may replace the average of them); HETLoRA's clients start from rescaled,
    # truncated copies
    clients_start_from_state: ClassVar[bool] = True
    # its local procedure takes training.grad_accum_steps and float16 loss scaling (PF2LoRA's bilevel step
    # differentiates through one batch per step)
    accumulates: ClassVar[bool] = True
    # its local procedure takes client objectives (strategy.client_objective: FedProx, SCAFFOLD); PF2LoRA's does not
    takes_objectives: ClassVar[bool] = True
    # its aggregation is a reduction, written as fold (one update into running sums) and finish (the new state)
    streams: ClassVar[bool] = False
    # partials of any grouping of clients merge into what one server fold makes: its running sums are float64 over
    # float32 values (fedsim.strategies.fold), so grouping moves them by ~1e-16 and the float32 result not at all
    # (save a value within 1e-16 of a float32 rounding boundary): workers fold by default
    # (resources.worker_partials: auto). Dense float32 product sums (FLoRA, FlexLoRA, FedEx-LoRA) group by worker
    # to float32 rounding; a new strategy is not assumed exact
    partials_exact: ClassVar[bool] = False
    # each round's update is merged into the base, and the server keeps every base update (for clients that missed
    # rounds, and the export): FLoRA, FedEx-LoRA — memory that grows with the rounds (fedsim.memory)
    merges_into_base: ClassVar[bool] = False
    # its clients' shared tensors may travel compressed (compression.upload / .download): the server's aggregation
    # takes factors rebuilt as start + a decoded change; a new strategy is not assumed to (compression_refusal)
    takes_compressed: ClassVar[bool] = False
    # it can step asynchronously (asynchronous: FedBuff): its global state is the average of the clients' shared
    # tensors, so a step of stale clients' changes is an average too (async_refusal)
    runs_async: ClassVar[bool] = False
    # why it cannot, when it cannot (the stacking, SVD and residual methods say what needs a synchronous round)
    async_refused: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.streams and (cls.fold is Strategy.fold or cls.finish is Strategy.finish):
            raise TypeError(f"strategy {cls.__name__} sets streams = True: implement fold and finish")

    def __init__(self, params: BaseModel | dict[str, Any] | None = None):
        if params is None or isinstance(params, dict):
            params = self.Params(**(params or {}))
        self.params = params

    # -- the three steps of a round ---------------------------------------------------------------------------
    @abstractmethod
    def init_state(self, spec: StrategySpec) -> GlobalState:
        """The global state before round 1."""

    @abstractmethod
    def configure(
        self, ctx: RoundContext, state: GlobalState, clients: Sequence[ClientSpec]
    ) -> dict[int, ClientPayload]:
        """Per-client payloads for the sampled ``clients``. Clients may share one payload object (it is then sent
        once through the object store)."""

    def aggregate(self, ctx: RoundContext, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        """A new global state from the round's updates (never mutating ``state`` or ``updates``). A streaming
        strategy's is :meth:`fold` of each update, then :meth:`finish`; others override it.

        Raises:
            AggregationError: keys or shapes do not match, or there is nothing to aggregate.
        """
        if not self.streams:
            raise NotImplementedError(f"strategy {type(self).__name__} implements neither aggregate nor fold/finish")
        if not updates:
            raise AggregationError("no client updates to aggregate")
        acc = self.begin(ctx, state)
        for u in updates:
            self.fold(ctx, state, acc, u)
        return self.finish(ctx, state, acc)

    # -- streaming aggregation (strategies with ``streams = True``) ---------------------------------------------
    def begin(self, ctx: RoundContext, state: GlobalState) -> Partial:
        """Empty running sums for the round."""
        return Partial(server_round=ctx.server_round, base_version=state.base_version)

    def fold(self, ctx: RoundContext, state: GlobalState, acc: Partial, update: ClientUpdate) -> None:
        """Add one update to ``acc`` (raising :class:`AggregationError` on an update that cannot join)."""
        raise NotImplementedError(f"strategy {self.name} does not stream its aggregation")

    def finish(self, ctx: RoundContext, state: GlobalState, acc: Partial) -> GlobalState:
        """The new global state from the running sums of every update of the round (at least one)."""
        raise NotImplementedError(f"strategy {self.name} does not stream its aggregation")

    def weight_of(self, update: ClientUpdate) -> float:
        """The update's weight before normalisation (default: its sample count)."""
        return float(update.num_examples)

    # -- optional hooks -----------------------------------------------------------------------------------------
    def eval_payload(self, state: GlobalState) -> ClientPayload:
        """The adapter the global model is evaluated with."""
        return ClientPayload(tensors=state.tensors, lora=state.lora, base_version=state.base_version)

    def download_cost(self, payload: ClientPayload) -> tuple[int, int]:
        """(params, bytes) one client downloads for ``payload``: its adapter tensors plus any base-model update."""
        return (ops.num_params(payload.tensors) + payload.base_update_params,
                ops.sent_bytes(payload.tensors, payload.wire) + 4 * payload.base_update_params)

    def upload_cost(self, update: ClientUpdate) -> tuple[int, int]:
        """(params, bytes) one client uploads: the tensors of its update (already filtered by :meth:`is_shared`), in
        the bytes they take on the wire (compressed: :attr:`ClientUpdate.wire`)."""
        return ops.num_params(update.tensors), ops.sent_bytes(update.tensors, update.wire)

    def compression_refusal(self, error_feedback: bool) -> str | None:
        """Why this strategy's uploads cannot travel compressed (``compression``; with the client keeping what it did
        not send when ``error_feedback``), or None when they can. Refuses unless the strategy declares
        :attr:`takes_compressed`."""
        if not self.aggregates:
            return f"strategy {self.name!r} uploads nothing, so there is nothing to compress"
        if not self.takes_compressed:
            return (f"strategy {self.name!r} does not declare that its aggregation takes compressed factors "
                    "(Strategy.takes_compressed)")
        return None

    def async_refusal(self) -> str | None:
        """Why this strategy cannot run asynchronously (``asynchronous``), or None when it can (:attr:`runs_async`)."""
        if not self.aggregates:
            return f"strategy {self.name!r} uploads nothing, so there is nothing to aggregate"
        if self.runs_async:
            return None
        return f"strategy {self.name!r} " + (self.async_refused or "does not declare that it can step asynchronously "
                                             "(Strategy.runs_async)")

    def is_shared(self, key: str) -> bool:
        """Whether the adapter tensor ``key`` leaves the client (is uploaded). Default: every LoRA factor."""
        return True

    def param_ranks(self) -> dict[str, int]:
        """The LoRA ranks the strategy's own params set, by scenario key (e.g. HETLoRA's ``max_rank``): each must fit
        the adapted layers, as ``clients.lora.rank`` must (checked before round 1)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Strategy-internal state beyond :class:`GlobalState` (e.g. a server optimizer), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    # -- helpers for subclasses ---------------------------------------------------------------------------------
    @staticmethod
    def _fresh_adapter(spec: StrategySpec, rank: int | None = None) -> dict[str, torch.Tensor]:
        """PEFT's default initialisation (A random, B = 0) at ``rank`` (default: the spec's), seeded by the scenario."""
        return ops.init_adapter(spec.shapes, rank or spec.lora.rank, torch.Generator().manual_seed(spec.seed))

    def _require_uniform(self, state: GlobalState, clients: Sequence[ClientSpec]) -> None:
        """Raise unless every client trains at the global rank and alpha (methods that cannot mix ranks)."""
        for c in clients:
            if c.lora != state.lora:
                raise AggregationError(f"{self.name} needs every client at the global rank/alpha {state.lora}; "
                                       f"client {c.client_id} has {c.lora}")

    @staticmethod
    def _weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
        if not updates:
            raise AggregationError("no client updates to aggregate")
        return ops.normalized_weights(u.num_examples for u in updates)

    def _weigh(self, acc: Partial, update: ClientUpdate, total: str = "w") -> float:
        """The update's weight, checked and counted into ``acc.totals[total]``; the client joins ``acc``."""
        w = self.weight_of(update)
        if not (w >= 0 and w < float("inf")):
            raise AggregationError("client weights must be finite and non-negative")
        acc.joined(update.client_id)
        acc.count(total, w)
        return w

    def _check_one(self, update: ClientUpdate, state: GlobalState, keys: Sequence[str] | None = None) -> None:
        """One update against the state: exactly ``keys`` (default: the state's shared keys), each at the rank its
        spec says and of a shape compatible with the global tensor."""
        keys = sorted(k for k in state.tensors if self.is_shared(k)) if keys is None else keys
        if sorted(update.tensors) != list(keys):
            missing = sorted(set(keys) - set(update.tensors))[:3]
            extra = sorted(set(update.tensors) - set(keys))[:3]
            raise AggregationError(f"client {update.client_id} sent different keys (missing e.g. {missing}, "
                                   f"unexpected e.g. {extra})")
        self._check_updates([update], state)

    @staticmethod
    def _check_updates(updates: Sequence[ClientUpdate], shapes_from: GlobalState | None = None) -> list[str]:
        """Keys common to all updates (each checked against its own rank); raises on any mismatch."""
        if not updates:
            raise AggregationError("no client updates to aggregate")
        keys = sorted(updates[0].tensors)
        rank_dim = {k: 0 if ops.factor_of(k) == "A" else 1 for k in keys}  # A: (r, d_in), B: (d_out, r)
        ref = shapes_from.tensors if shapes_from is not None else {}
        other = {k: ref[k].shape[1 - rank_dim[k]] for k in keys if k in ref}
        for u in updates:
            if len(u.tensors) != len(keys) or any(k not in rank_dim for k in u.tensors):
                missing = sorted(set(keys) - set(u.tensors))[:3]
                raise AggregationError(f"client {u.client_id} sent different keys (missing e.g. {missing})")
            for k, t in u.tensors.items():
                r = t.shape[rank_dim[k]]
                if r != u.lora.rank:
                    raise AggregationError(f"client {u.client_id}: {k} has shape {tuple(t.shape)}, rank {r}; "
                                           f"its spec says rank {u.lora.rank}")
                if k in other and t.shape[1 - rank_dim[k]] != other[k]:
                    raise AggregationError(f"client {u.client_id}: {k} has shape {tuple(t.shape)}, "
                                           f"incompatible with the global {tuple(ref[k].shape)}")
        return keys

    @staticmethod
    def _copy_state(state: GlobalState, **changes: Any) -> GlobalState:
        fields = dict(tensors=state.tensors, lora=state.lora, base_version=state.base_version,
                      extras=copy.deepcopy(state.extras), base_deltas=list(state.base_deltas))
        fields.update(changes)
        return GlobalState(**fields)
