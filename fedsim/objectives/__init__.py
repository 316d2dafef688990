"""The client objective extension point: terms added to a client's local loss, and changes to its gradients.

A strategy puts objective objects in its payloads (:attr:`fedsim.types.ClientPayload.objectives`); the worker's
training recipe binds each to the client's trainable tensors before the first step, adds its penalty to every step's
loss, lets it adjust the gradients after every backward pass, and collects its metrics at the end. Objectives are pure
tensor code (no I/O, no devices beyond what the tensors carry), small and picklable: they travel inside payloads.
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


class ClientObjective:
    """A change to the local objective, shipped in a payload. Subclasses implement :meth:`bind`.

    Attributes:
        packable: whether it works in a packed pass, where each client's tensors are views of shared packed
            tensors (a gradient hook on a parameter's ``.grad`` does not; a penalty does).
        metric_keys: every metric key :meth:`BoundObjective.finish` returns.
        round_metrics: those of them the round's row reports (example-weighted means over the round's clients).
    """

    packable: ClassVar[bool] = True
    metric_keys: ClassVar[tuple[str, ...]] = ()
    round_metrics: ClassVar[tuple[str, ...]] = ()

    def bind(self, params: Params, lora: LoraSpec, scaling: float) -> BoundObjective:
        """This objective for one client: ``params`` gives its trainable adapter tensors, ``lora`` its rank and alpha,
        ``scaling`` the LoRA scaling its forward pass uses."""
        raise NotImplementedError
