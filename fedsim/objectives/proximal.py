"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020): the local objective adds
μ/2 ‖θ − θ_global‖² over the client's trainable adapter tensors, θ_global being what the client started the round
from. μ = 0 is plain local training, to the bit (the term adds an exact zero)."""

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
    def __init__(self, mu: float, params: Params):
        self.mu, self.params = mu, params
        with torch.no_grad():  # θ_global: the trainable tensors as the round starts
            self.start = {k: v.detach().clone() for k, v in params().items() if v.requires_grad}

    def _sq(self) -> torch.Tensor:
        p = self.params()
        return sum(((p[k] - v) ** 2).sum() for k, v in self.start.items())

    def penalty(self) -> torch.Tensor:
        return self.mu / 2 * self._sq()

    def finish(self) -> dict[str, float]:
        with torch.no_grad():
            return {"fedprox/distance": float(self._sq()) ** 0.5}
