"""Client-side transforms of an update, applied on the worker after local training, before the update is sent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from fedsim.types import Tensors


@dataclass(frozen=True)
class TransformContext:
    """Where an update comes from: all randomness of a transform derives from (seed, round, client, attempt)."""

    seed: int
    server_round: int
    client_id: int
    attempt: int = 1
    start: Tensors | None = None  # the values the client started the round from (the payload), shared keys
    state: Tensors | None = None  # what this transform kept for this client last time (its ``state_key``), if any


@dataclass
class Sent:
    """What a transform leaves for the next one (or the wire).

    Attributes:
        tensors: the update's tensors as the server will see them.
        metrics: the client's metrics from this transform.
        wire: each tensor's bytes on the wire where a transform encoded them (compression); None: their raw size.
        state: the client's new state for this transform (kept in the client state store), or None to keep none.
    """

    tensors: Tensors
    metrics: dict[str, float] = field(default_factory=dict)
    wire: dict[str, int] | None = None
    state: Tensors | None = None

    @staticmethod
    def of(out: Sent | tuple[Tensors, dict[str, float]]) -> Sent:
        """A transform's result: a :class:`Sent`, or a (tensors, metrics) pair (raw on the wire, no state)."""
        return out if isinstance(out, Sent) else Sent(*out)


class UpdateTransform:
    """Maps the tensors a client uploads (its shared tensors after local training) to the ones it sends.

    Attributes:
        metric_keys: the metric keys :meth:`__call__` returns (they join the client's metrics).
        round_metrics: those of them the round's row reports (example-weighted means).
        state_key: the name of the per-client state it keeps (:attr:`keeps_state`), stored under
            ``transform.<state_key>.<key>`` and given back in :attr:`TransformContext.state`.
        sees_head: it also takes the uploaded head's tensors.
    """

    metric_keys: ClassVar[tuple[str, ...]] = ()
    round_metrics: ClassVar[tuple[str, ...]] = ()
    state_key: ClassVar[str | None] = None
    # it also takes the uploaded head's tensors (keys head.<module>.<param>, beside the adapter's; a classifier trained
    # in full): a compression of everything a client sends
    sees_head: ClassVar[bool] = False

    @property
    def keeps_state(self) -> bool:
        """Whether clients keep state for it between rounds (the run opens a client state store)."""
        return False

    def __call__(self, tensors: Tensors, ctx: TransformContext) -> Sent | tuple[Tensors, dict[str, float]]:
        """The tensors sent and this transform's metrics (a pair), or a :class:`Sent` with their wire size and the
        client's new state."""
        raise NotImplementedError


def fault_draws(seed: int, server_round: int, client_id: int, attempt: int) -> np.ndarray:
    """The three uniform draws of one client attempt's injected faults: (kill the worker, NaN update, hang)."""
    return np.random.default_rng([seed, server_round, client_id, attempt, 13]).random(3)


@dataclass(frozen=True)
class NanFault(UpdateTransform):
    """Fault injection (``faults.nan_update_prob``): with probability ``prob`` per client attempt, every tensor of
    the update is NaN — a corrupt update that the server's validation must reject."""

    prob: float

    def __call__(self, tensors: Tensors, ctx: TransformContext) -> tuple[Tensors, dict[str, float]]:
        if fault_draws(ctx.seed, ctx.server_round, ctx.client_id, ctx.attempt)[1] < self.prob:
            return {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, {}
        return tensors, {}


@dataclass(frozen=True)
class Attack(UpdateTransform):
    """Model poisoning by the malicious clients (``clients.malicious``, :class:`fedsim.config.clients.MaliciousConfig`):
    each update of a client in ``clients`` has its change Δ (sent minus started from) replaced; deterministic per
    (seed, round, client, attempt). Reports ``malicious/attacked`` (1 for an attacker, 0 otherwise)."""

    clients: frozenset[int]
    attack: str
    multiplier: float = -1.0
    std: float = 1.0
    value: float = 1.0

    metric_keys: ClassVar[tuple[str, ...]] = ("malicious/attacked",)

    def __call__(self, tensors: Tensors, ctx: TransformContext) -> tuple[Tensors, dict[str, float]]:
        if ctx.client_id not in self.clients:
            return tensors, {"malicious/attacked": 0.0}
        start = ctx.start or {}
        if self.attack == "label_flip":  # data poisoning: the update is what training on flipped labels gave
            return tensors, {"malicious/attacked": 1.0}
        if self.attack == "nan":
            return {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, {"malicious/attacked": 1.0}
        g = torch.Generator().manual_seed(int(np.random.default_rng(
            [ctx.seed, ctx.server_round, ctx.client_id, ctx.attempt, 43]).integers(2**62)))
        out = {}
        for k, v in tensors.items():
            s = start.get(k, torch.zeros_like(v)).to(v.dtype)
            if self.attack in ("sign_flip", "scale"):
                delta = self.multiplier * (v - s)
            elif self.attack == "gaussian":
                delta = torch.randn(v.shape, generator=g, dtype=v.dtype) * self.std
            else:  # fixed
                delta = torch.full_like(v, self.value)
            out[k] = s + delta
        return out, {"malicious/attacked": 1.0}

