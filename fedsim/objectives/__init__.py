"""The client objective extension point: terms added to a client's local loss, and changes to its gradients.

A strategy puts objective objects in its payloads (:attr:`fedsim.types.ClientPayload.objectives`); the worker's
training recipe binds each to the client's trainable tensors before the first step, adds its penalty to every step's
loss, lets it adjust the gradients after every backward pass and the parameters after every optimizer step, and
collects its metrics (and any tensors it uploads) at the end. Objectives are pure tensor code (no I/O, no devices
beyond what the tensors carry), small and picklable: they travel inside payloads. An objective may keep per-client
state between rounds (SCAFFOLD's control variate): it names it with ``state_key``, receives the client's last state in
:meth:`ClientObjective.bind` and returns the next in :meth:`BoundObjective.state`; the client state store keeps it
(opened when the strategy declares ``keeps_client_state`` or the scenario's ``strategy.client_objective`` has a
``state_key``). A server side comes from :meth:`ClientObjective.server_stage`.
Examples: FedProx (:mod:`fedsim.objectives.proximal`), SCAFFOLD (:mod:`fedsim.objectives.scaffold`), HETLoRA's rank
self-pruning term (:mod:`fedsim.objectives.tail`); a new one is a subclass registered with ``@objective("name")``
(see docs/architecture.md, "How to add").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from fedsim import registry
from fedsim.types import LoraSpec, Tensors

objective = registry.decorator("objective")

Params = Callable[[], Tensors]  # the client's trainable adapter tensors by key, as they are now (live, with grads)


class BoundObjective:
    """One client's objective during one local training run (made by :meth:`ClientObjective.bind`)."""

    def penalty(self) -> torch.Tensor | None:
        """A differentiable term added to this step's loss, or None."""
        return None

    def after_backward(self) -> None:
        """Called after each backward pass, before clipping and the optimizer step (e.g. to correct gradients)."""

    def after_step(self, lr: float) -> None:
        """Called after each optimizer step, with the step's learning rate (e.g. SCAFFOLD's corrected step)."""

    def finish(self) -> dict[str, float]:
        """Metrics after the last step (keys declared in the objective's ``metric_keys``)."""
        return {}

    def state(self) -> Tensors | None:
        """What the client keeps for its next round (objectives with a ``state_key``), after :meth:`finish`."""
        return None

    def upload(self) -> Tensors | None:
        """Tensors the client sends the server with its update, after :meth:`finish` (objectives with a
        ``state_key``; e.g. SCAFFOLD's Δc_i): they reach the server stages in :attr:`ClientUpdate.extra
        <fedsim.types.ClientUpdate>` and count as upload."""
        return None


class ClientObjective:
    """A change to the local objective, shipped in a payload. Subclasses implement :meth:`bind`.

    Attributes:
        packable: whether it works in a packed pass, where each client's tensors are views of shared packed
            tensors (a gradient hook on a parameter's ``.grad`` does not; a penalty does).
        metric_keys: every metric key :meth:`BoundObjective.finish` returns.
        round_metrics: those of them the round's row reports (example-weighted means over the round's clients).
        state_key: the name of the per-client state it keeps (None: it keeps none).
    """

    packable: ClassVar[bool] = True
    metric_keys: ClassVar[tuple[str, ...]] = ()
    round_metrics: ClassVar[tuple[str, ...]] = ()
    state_key: ClassVar[str | None] = None

    def carried(self) -> Tensors:
        """Tensors this objective carries to the client inside its payload (counted as download; e.g. SCAFFOLD's
        server control variate c)."""
        return {}

    def refuses(self, strategy: Any, scenario: Any) -> tuple[str, str] | None:
        """(why, fix) when this objective cannot run with the strategy class ``strategy`` in ``scenario``: checked
        when the scenario is loaded. None: it can."""
        return None

    def server_stage(self, scenario: Any, strategy: Any) -> Any:
        """The server side of the method, a :class:`fedsim.pipeline.ServerStage` run after the strategy's
        aggregation (SCAFFOLD's update of c and its global step size), or None. A stage may replace this
        objective in each round's payloads (its ``configure``), carrying what the server holds."""
        return None

    def bind(self, params: Params, lora: LoraSpec, scaling: float, state: Tensors | None = None) -> BoundObjective:
        """This objective for one client: ``params`` gives its trainable adapter tensors, ``lora`` its rank and alpha,
        ``scaling`` the LoRA scaling its forward pass uses, ``state`` what it kept from the client's last round (None
        on its first)."""
        raise NotImplementedError


def bind(objective: ClientObjective, params: Params, lora: LoraSpec, scaling: float, personal: Tensors | None
         ) -> BoundObjective:
    """``objective`` bound to one client, with the state it kept in the client's ``personal`` tensors (an objective
    without a ``state_key`` is bound without it: ``bind(params, lora, scaling)`` is all it needs to take)."""
    if objective.state_key is None:
        return objective.bind(params, lora, scaling)
    return objective.bind(params, lora, scaling, state_in(objective, personal))


STATE_PREFIX = "objective."  # a client's objective state in the client state store: objective.<state_key>.<key>


def state_in(objective: ClientObjective, personal: Tensors | None) -> Tensors | None:
    """The client's stored state of ``objective`` (None: none yet, or the objective keeps none)."""
    if objective.state_key is None or not personal:
        return None
    prefix = f"{STATE_PREFIX}{objective.state_key}."
    mine = {k[len(prefix):]: v for k, v in personal.items() if k.startswith(prefix)}
    return mine or None


def state_out(objectives: list[ClientObjective], bound: list[BoundObjective], upload: bool = False) -> Tensors:
    """The state each objective keeps for the client's next round, keyed for the client state store (``upload``:
    what each sends the server instead, keyed the same way)."""
    out: Tensors = {}
    for objective, b in zip(objectives, bound):
        if objective.state_key is None:
            continue
        for k, v in ((b.upload() if upload else b.state()) or {}).items():
            out[f"{STATE_PREFIX}{objective.state_key}.{k}"] = v.detach().to("cpu")
    return out


def uploaded(state_key: str, extra: Tensors) -> Tensors:
    """What the objective with ``state_key`` uploaded, from an update's ``extra`` tensors, by its own keys."""
    prefix = f"{STATE_PREFIX}{state_key}."
    return {k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix)}
