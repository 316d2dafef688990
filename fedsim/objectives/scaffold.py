"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML 2020),
option II control variates, as one client objective with its server stage — the example of a method that needs
both sides.

Server: the control variate c (zeros at first, one tensor per shared trainable adapter tensor), sent with every
payload. Client i, starting from the global x with its own c_i (zeros on its first round, then kept in the client
state store, which spills to disk like personal adapters), corrects every local step: after the optimizer's step
y ← y − η_t (c − c_i), so that with plain SGD y ← y − η_t (g − c_i + c), exactly the paper's corrected step. After
its K steps, option II: c_i⁺ = c_i − c + (x − y) / Σ_t η_t (Σ_t η_t = K η_l at a constant learning rate, the
paper's form; with an lr schedule, the steps' own rates). It uploads its adapter (the strategy averages it) and
Δc_i = c_i⁺ − c_i: communication doubles, and is counted. Server, after the strategy's aggregate x̄:
x ← x + η_g (x̄ − x) (η_g = ``server_lr``, the global step size; 1 is the plain aggregate) and
c ← c + (1/N) Σ_{i∈S} Δc_i with N the federation's clients.

With AdamW (the default optimizer) the correction is applied to the step rather than fed through Adam's moments,
as OpenFedLLM does: c and c_i are then averages of the optimizer's steps per unit learning rate, the same units as
the correction. Composes with the strategies whose global state is factors averaged over clients at one rank and
whose local training takes client objectives: ``fedit``, ``ffa``, ``fedsa`` (its shared A), ``feddpa`` (its global
adapter), ``fedqlora``; refused with the others (mixed ranks change the tensors' shapes between clients; FLoRA,
FedEx-LoRA and FlexLoRA merge into the base; PF2LoRA's hypergradient takes no objectives).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from fedsim.lora import ops
from fedsim.objectives import BoundObjective, ClientObjective, Params, objective, uploaded
from fedsim.pipeline import ServerStage
from fedsim.types import ClientPayload, ClientUpdate, GlobalState, LoraSpec, RoundContext, Tensors

STATE_KEY = "scaffold"


@objective("scaffold")
@dataclass(frozen=True)
class Scaffold(ClientObjective):
    """SCAFFOLD's client side; ``server_lr`` is η_g, ``c`` the server's control variate this round (filled in by
    :class:`ScaffoldStage`; empty means zeros).

    Metrics: ``scaffold/correction_norm`` ‖c − c_i‖ as the client starts, ``scaffold/delta_c_norm`` ‖Δc_i‖.
    """

    server_lr: float = 1.0
    c: Tensors = field(default_factory=dict, compare=False, repr=False)

    packable: ClassVar[bool] = False  # it changes each client's parameters after the optimizer step
    state_key: ClassVar[str | None] = STATE_KEY
    metric_keys: ClassVar[tuple[str, ...]] = ("scaffold/correction_norm", "scaffold/delta_c_norm")
    round_metrics: ClassVar[tuple[str, ...]] = metric_keys

    def __post_init__(self) -> None:
        if not 0 < self.server_lr <= 1e3:
            raise ValueError(f"server_lr (η_g, the global step size) must be in (0, 1000], got {self.server_lr}")

    def carried(self) -> Tensors:
        return self.c

    def refuses(self, strategy: Any, scenario: Any) -> tuple[str, str] | None:
        if strategy.name in COMPOSES_WITH and not scenario.clients.lora.is_mixed():
            return None
        if strategy.name in COMPOSES_WITH:
            why = "its control variates need every client's shared tensors at one shape, but the scenario mixes ranks"
        else:
            why = (f"strategy {strategy.name!r} does not keep one set of averaged factors trained by a plain local "
                   "procedure (it merges into the base, keeps ΔW in singular form, mixes ranks, or differentiates "
                   "through its local step)")
        return why, f"use SCAFFOLD with one of {', '.join(COMPOSES_WITH)} at a single rank"

    def server_stage(self, scenario: Any, strategy: Any) -> ServerStage:
        return ScaffoldStage(self.server_lr, scenario.clients.num_clients, strategy.is_shared)

    def bind(self, params: Params, lora: LoraSpec, scaling: float, state: Tensors | None = None) -> BoundObjective:
        return _BoundScaffold(self.c, params, state)


COMPOSES_WITH = ("fedit", "ffa", "fedsa", "feddpa", "fedqlora")


class _BoundScaffold(BoundObjective):
    """One client's run: the corrected steps, then c_i⁺ and Δc_i."""

    def __init__(self, c: Tensors, params: Params, c_i: Tensors | None):
        live = params()
        self.params = params
        # the corrected tensors: those the server sent a variate for (the shared ones the payload trains)
        self.keys = [k for k in sorted(c) if k in live]
        # the variates' precision: float32, or the parameters' own when finer (float64 in the formula tests)
        self.dtype = {k: torch.promote_types(live[k].dtype, torch.float32) for k in self.keys}
        with torch.no_grad():
            self.x = {k: live[k].detach().to(self.dtype[k], copy=True) for k in self.keys}  # the global x
            self.c = {k: c[k].to(live[k].device, self.dtype[k]) for k in self.keys}
            c_i = c_i or {}
            self.c_i = {k: (c_i[k].to(live[k].device, self.dtype[k]) if k in c_i and c_i[k].shape == c[k].shape
                            else torch.zeros_like(self.c[k])) for k in self.keys}
            self.correction = {k: self.c[k] - self.c_i[k] for k in self.keys}  # c − c_i, fixed for the round
        self.lr_sum = 0.0
        self.delta_c: Tensors = {}

    def after_step(self, lr: float) -> None:
        live = self.params()
        with torch.no_grad():
            for k in self.keys:
                live[k].add_(self.correction[k].to(live[k].dtype), alpha=-lr)
        self.lr_sum += lr

    def finish(self) -> dict[str, float]:
        live = self.params()
        with torch.no_grad():
            if self.lr_sum > 0:  # option II: c_i⁺ − c_i = −c + (x − y) / Σ η_t
                self.delta_c = {k: (self.x[k] - live[k].detach().to(self.dtype[k])) / self.lr_sum - self.c[k]
                                for k in self.keys}
            else:
                self.delta_c = {k: torch.zeros_like(self.c[k]) for k in self.keys}
            corr = sum(float((v.double() ** 2).sum()) for v in self.correction.values()) ** 0.5
            dc = sum(float((v.double() ** 2).sum()) for v in self.delta_c.values()) ** 0.5
        return {"scaffold/correction_norm": corr, "scaffold/delta_c_norm": dc}

    def state(self) -> Tensors:
        return {k: self.c_i[k] + self.delta_c[k] for k in self.keys}  # c_i⁺

    def upload(self) -> Tensors:
        return dict(self.delta_c)


class ScaffoldStage(ServerStage):
    """SCAFFOLD's server side: puts c in every payload's objective, applies the global step size, and updates c
    from the round's Δc_i. c checkpoints with the server.

    Args:
        server_lr: η_g.
        num_clients: N, the federation's clients.
        is_shared: which adapter keys clients upload (the strategy's).
    """

    metric_keys: ClassVar[tuple[str, ...]] = ("scaffold/c_norm",)

    def __init__(self, server_lr: float, num_clients: int, is_shared: Any):
        self.server_lr, self.num_clients, self.is_shared = server_lr, num_clients, is_shared
        self.c: Tensors = {}
        self._total: Tensors = {}  # the round's Σ_{i∈S} Δc_i

    def configure(self, ctx: RoundContext, state: GlobalState, payload: ClientPayload) -> ClientPayload:
        keys = [k for k in sorted(payload.tensors) if self.is_shared(k) and ops.factor_of(k) in payload.trainable]
        c = {k: self.c[k] if k in self.c else torch.zeros(payload.tensors[k].shape, dtype=self.dtype(payload, k))
             for k in keys}
        objectives = tuple(replace(o, c=c) if isinstance(o, Scaffold) else o for o in payload.objectives)
        return replace(payload, objectives=objectives)

    @staticmethod
    def dtype(payload: ClientPayload, key: str) -> torch.dtype:
        """c's precision: float32, or the state's own when finer."""
        return torch.promote_types(payload.tensors[key].dtype, torch.float32)

    def admit(self, ctx: RoundContext, state: GlobalState, update: ClientUpdate
              ) -> tuple[ClientUpdate | None, str | None]:
        """Checks the update's Δc_i and adds it to the round's Σ Δc_i (in place: one sum, however many clients)."""
        delta = uploaded(STATE_KEY, update.extra)
        reason = self._invalid(state, update, delta)
        if reason is not None:
            return None, f"update rejected: SCAFFOLD's Δc {reason}"
        for k, v in delta.items():
            if k in self._total:
                self._total[k].add_(v.to(self._total[k].dtype))
            else:
                self._total[k] = v.to(self.c[k].dtype if k in self.c else v.dtype, copy=True)
        return update, None

    def _invalid(self, state: GlobalState, update: ClientUpdate, delta: Tensors) -> str | None:
        for k, v in delta.items():
            ref = self.c.get(k, state.tensors.get(k))
            if ref is None:
                return f"has an unexpected tensor {k}"
            if v.shape != ref.shape:
                return f"{k} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}"
        bad = ops.first_nonfinite(delta)
        return None if bad is None else f"{bad} holds NaN or Inf values"

    def after(self, ctx: RoundContext, old: GlobalState, new: GlobalState) -> tuple[GlobalState, dict[str, float]]:
        if self.server_lr != 1.0:  # x ← x + η_g (x̄ − x)
            tensors = {k: (old.tensors[k].float() + self.server_lr * (v.float() - old.tensors[k].float())).to(v.dtype)
                       if k in old.tensors and old.tensors[k].shape == v.shape else v for k, v in new.tensors.items()}
            new = replace(new, tensors=tensors)
        for k, v in self._total.items():  # c ← c + (1/N) Σ_{i∈S} Δc_i
            self.c[k] = (self.c[k] if k in self.c else torch.zeros_like(v)) + v / self.num_clients
        self._total = {}
        norm = sum(float((v.double() ** 2).sum()) for v in self.c.values()) ** 0.5
        return new, {"scaffold/c_norm": norm}

    def end_round(self, ctx: RoundContext, received: Sequence[int]) -> dict[str, float]:
        self._total = {}  # a round whose every update a later stage rejected leaves nothing behind
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"c": dict(self.c)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.c = {k: v.clone() for k, v in state.get("c", {}).items()}
