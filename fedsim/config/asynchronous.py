"""The ``asynchronous`` section: buffered asynchronous aggregation on the simulated clock (FedBuff, Nguyen et al.,
AISTATS 2022; :mod:`fedsim.federation.buffered`, :mod:`fedsim.pipeline.asynchronous`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedsim.config.base import Frozen


class AsyncConfig(Frozen):
    """Buffered asynchronous aggregation.

    ``concurrency`` clients train at once, each from the global model of the moment it starts; a client's arrival
    is its start plus its simulated time (``clock``), and the freed slot goes to a new client at once. Every
    ``buffer`` (K) arrivals the server steps: x ← x + ``server_lr`` · (1/K) Σ w(s_i) Δ_i over the arrived updates,
    Δ_i a client's change from the version it started from and s_i its staleness (versions since). ``staleness``:
    w(s) = 1 (``constant``), (1 + s)^−``exponent`` (``polynomial``; FedBuff's 1/√(1+s) at 0.5), or ``hinge``
    (1 for s ≤ ``hinge_after``, else 1 / (``hinge_slope`` · (s − hinge_after) + 1); FedAsync's). ``rounds`` counts
    server steps.
    """

    concurrency: int = Field(10, ge=1, le=1_000_000)
    """clients in flight at once"""
    buffer: int = Field(5, ge=1, le=1_000_000)
    """K: arrivals per server step (≤ concurrency)"""
    server_lr: float = Field(1.0, gt=0.0, le=1e3)
    """η_g, the server step's learning rate"""
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    """the weight of a stale update: constant, polynomial or hinge"""
    exponent: float = 0.5
    """polynomial: w(s) = (1 + s)^-exponent"""
    hinge_after: int = Field(4, ge=0)
    """hinge: full weight up to this staleness"""
    hinge_slope: float = Field(1.0, gt=0.0)
    """hinge: w(s) = 1 / (slope · (s − hinge_after) + 1) beyond it"""

    @model_validator(mode="after")
    def _consistent(self) -> AsyncConfig:
        if self.buffer > self.concurrency:
            raise ValueError(f"buffer {self.buffer} is larger than concurrency {self.concurrency}: with that few "
                             "clients in flight the buffer waits on updates from its own step's clients; set buffer ≤ "
                             "concurrency")
        if self.exponent < 0:
            raise ValueError(f"exponent {self.exponent:g} is negative: staler updates would weigh more; give an "
                             "exponent ≥ 0 (0.5 is FedBuff's)")
        return self

    def weight(self, staleness: int) -> float:
        """w(s), the weight of an update ``staleness`` versions old."""
        if self.staleness == "constant":
            return 1.0
        if self.staleness == "polynomial":
            return float((1.0 + staleness) ** -self.exponent)
        return 1.0 if staleness <= self.hinge_after else 1.0 / (self.hinge_slope * (staleness - self.hinge_after) + 1.0)
