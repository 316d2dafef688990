"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020): the local objective adds
μ/2 ‖θ − θ_global‖² over the client's trainable adapter tensors, θ_global being what the client started the round
from. μ = 0 is plain local training, to the bit (the term adds nothing)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsim.objectives import BoundObjective, ClientObjective, Params, objective
from fedsim.types import LoraSpec, Tensors


@objective("fedprox")
@dataclass(frozen=True)
class Proximal(ClientObjective):
    """μ/2 ‖θ − θ_global‖²; ``fedprox/distance`` is ‖θ − θ_global‖ after local training."""

    mu: float = 0.01

    metric_keys = round_metrics = ("fedprox/distance",)

    def __post_init__(self) -> None:
        if not self.mu >= 0:
            raise ValueError(f"mu must be ≥ 0 (0 is plain local training), got {self.mu}")

    def bind(self, params: Params, lora: LoraSpec, scaling: float, state: Tensors | None = None) -> BoundObjective:
        return _BoundProximal(self.mu, params)


class _BoundProximal(BoundObjective):
    """Trained one by one (the parameters are leaves with their own ``.grad``), the term enters as its gradient,
    μ(θ − θ_global), added to every step's gradients in two fused ops — differentiating the penalty through autograd
    cost 1.28× a step of the tiny model (benchmarks/fl_baselines.py). In a packed pass each client's tensors are views
    of packed ones, without a ``.grad`` of their own: there the penalty joins the loss. The two give the same gradient
    (the packing tests compare them)."""

    def __init__(self, mu: float, params: Params):
        self.mu, self.params = mu, params
        live = params()
        with torch.no_grad():  # θ_global: the trainable tensors as the round starts
            self.start = {k: v.detach().clone() for k, v in live.items() if v.requires_grad}
        self.on_grad = all(live[k].is_leaf for k in self.start)

    def _sq(self) -> torch.Tensor:
        p = self.params()
        return sum(((p[k] - v) ** 2).sum() for k, v in self.start.items())

    def penalty(self) -> torch.Tensor | None:
        if self.mu == 0 or self.on_grad:
            return None
        return self.mu / 2 * self._sq()

    def after_backward(self) -> None:
        if self.mu == 0 or not self.on_grad:
            return
        live = self.params()
        keys = [k for k in self.start if live[k].grad is not None]
        with torch.no_grad():
            diff = torch._foreach_sub([live[k].detach() for k in keys], [self.start[k] for k in keys])
            torch._foreach_add_([live[k].grad for k in keys], diff, alpha=self.mu)

    def finish(self) -> dict[str, float]:
        with torch.no_grad():
            return {"fedprox/distance": float(self._sq()) ** 0.5}
