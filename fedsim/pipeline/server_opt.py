"""Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021; FedAvgM: Hsu et al. 2019): the
server treats the round's aggregate as a pseudo-gradient and steps on the global state with its own optimizer.

With x the global state's tensors (the averaged LoRA factors) and Δ_t = x̄_t − x_{t−1} (the strategy's aggregate
minus the previous state), per tensor, elementwise:

- ``fedavgm``:   m_t = μ m_{t−1} + Δ_t;                                 x_t = x_{t−1} + η m_t
- ``fedadagrad``: m_t = β1 m_{t−1} + (1 − β1) Δ_t;  v_t = v_{t−1} + Δ_t²
- ``fedadam``:    m_t as above;                    v_t = β2 v_{t−1} + (1 − β2) Δ_t²
- ``fedyogi``:    m_t as above;                    v_t = v_{t−1} − (1 − β2) Δ_t² sign(v_{t−1} − Δ_t²)

and for the three adaptive ones x_t = x_{t−1} + η m_t / (√v_t + τ), with m_{−1} = 0 and v_{−1} = τ² (the paper's
Algorithm 2 asks v_{−1} ≥ τ²), no bias correction — as the paper writes them. ``fedavgm`` with η = 1, μ = 0 is the
strategy's own aggregate. Only for strategies whose state is averaged factors (``Strategy.averages_factors``); the
strategies that merge into the base (FLoRA, FedEx-LoRA) or keep ΔW in singular form (FlexLoRA) are refused: their
"state" is not a point the aggregate moves.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedsim.pipeline.stages import ServerStage
from fedsim.types import GlobalState, RoundContext, Tensors

OPTIMIZERS = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")


class ServerOptimizer(ServerStage):
    """A server optimizer as a stage after aggregation. Its moments (m, v) and step count checkpoint with the server.

    Args:
        name: one of :data:`OPTIMIZERS`.
        lr: η, the server learning rate.
        beta1, beta2: the moments' decay (adaptive optimizers).
        tau: τ, the adaptivity (adaptive optimizers).
        momentum: μ (``fedavgm``).
    """

    metric_keys: ClassVar[tuple[str, ...]] = ("server_opt/step_norm",)

    def __init__(self, name: str, lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 momentum: float = 0.9):
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {name!r}; choose from {OPTIMIZERS}")
        self.name, self.lr, self.beta1, self.beta2, self.tau, self.momentum = name, lr, beta1, beta2, tau, momentum
        self.t = 0
        self.m: Tensors = {}
        self.v: Tensors = {}

    def after(self, ctx: RoundContext, old: GlobalState, new: GlobalState) -> tuple[GlobalState, dict[str, float]]:
        out: Tensors = {}
        step2 = 0.0
        for key, x_new in new.tensors.items():
            x = old.tensors.get(key)
            if x is None or x.shape != x_new.shape:  # a tensor the state did not have: the aggregate as it is
                out[key] = x_new
                continue
            x = x.to(torch.float32)
            step = self._step(key, x_new.to(torch.float32) - x)
            out[key] = (x + step).to(x_new.dtype)
            step2 += float((step.double() ** 2).sum())
        self.t += 1
        state = GlobalState(tensors=out, lora=new.lora, base_version=new.base_version, extras=new.extras,
                            base_deltas=new.base_deltas)
        return state, {"server_opt/step_norm": step2**0.5}

    def _step(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        """The step for one tensor from its pseudo-gradient Δ (float32), updating the moments."""
        if self.name == "fedavgm":
            m = self.m.get(key)
            m = delta.clone() if m is None or m.shape != delta.shape else self.momentum * m + delta
            self.m[key] = m
            return self.lr * m
        m = self.m.get(key)
        m = torch.zeros_like(delta) if m is None or m.shape != delta.shape else m
        v = self.v.get(key)
        v = torch.full_like(delta, self.tau**2) if v is None or v.shape != delta.shape else v
        m = self.beta1 * m + (1 - self.beta1) * delta
        d2 = delta * delta
        if self.name == "fedadagrad":
            v = v + d2
        elif self.name == "fedadam":
            v = self.beta2 * v + (1 - self.beta2) * d2
        else:  # fedyogi
            v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
        self.m[key], self.v[key] = m, v
        return self.lr * m / (v.sqrt() + self.tau)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state.get("t", 0))
        self.m = {k: v.to(torch.float32).clone() for k, v in state.get("m", {}).items()}
        self.v = {k: v.to(torch.float32).clone() for k, v in state.get("v", {}).items()}
