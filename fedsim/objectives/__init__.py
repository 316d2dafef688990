"""The client objective extension point: terms added to a client's local loss, and changes to its gradients.

A strategy puts objective objects in its payloads (:attr:`fedsim.types.ClientPayload.objectives`); the worker's
training recipe binds each to the client's trainable tensors before the first step, adds its penalty to every step's
loss, lets it adjust the gradients after every backward pass, and collects its metrics at the end. Objectives are pure
tensor code (no I/O, no devices beyond what the tensors carry), small and picklable: they travel inside payloads. An
objective may keep per-client state between rounds (SCAFFOLD's control variate, say): it names it with ``state_key``,
receives the client's last state in :meth:`ClientObjective.bind` and returns the next in :meth:`BoundObjective.state`;
the client state store keeps it (the strategy declares ``keeps_client_state``).
HETLoRA's rank self-pruning term (:mod:`fedsim.objectives.tail`) is the first; a new one is a subclass registered with
``@objective("name")`` (see docs/architecture.md, "How to add").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

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

    def finish(self) -> dict[str, float]:
        """Metrics after the last step (keys declared in the objective's ``metric_keys``)."""
        return {}

    def state(self) -> Tensors | None:
        """What the client keeps for its next round (objectives with a ``state_key``), after :meth:`finish`."""
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


def state_out(objectives: list[ClientObjective], bound: list[BoundObjective]) -> Tensors:
    """The state each objective keeps for the client's next round, keyed for the client state store."""
    out: Tensors = {}
    for objective, b in zip(objectives, bound):
        state = b.state() if objective.state_key is not None else None
        for k, v in (state or {}).items():
            out[f"{STATE_PREFIX}{objective.state_key}.{k}"] = v.detach().to("cpu")
    return out
