"""Client-level differential privacy (``privacy``; DP-FedAvg, McMahan et al., "Learning Differentially Private
Recurrent Language Models", ICLR 2018) and its accounting.

A client's *update* is the change Δ_k of the tensors it shares (what it uploads minus what it started the round from),
as one vector. Its norm is clipped to C: Δ̂_k = Δ_k · min(1, C/‖Δ_k‖).

- ``central`` (:class:`CentralPrivacy`, a server stage; a trusted server, the averaging strategies): the new shared
  tensors are x + (Σ_k Δ̂_k + N(0, σ²C²I)) / (qN) — DP-FedAvg's fixed-denominator estimator with uniform client weights,
  qN the expected number of clients per round (:func:`fedsim.config.privacy.sample_rate`). It replaces the strategy's
  own (sample-weighted) average of the shared tensors; what the strategy keeps besides them is untouched. A round in
  which no update is aggregated still adds the noise (the output must not reveal that nobody took part). Adaptive
  clipping (Andrew et al., NeurIPS 2021) moves C each round towards the ``target_quantile`` of the update norms.
- ``local`` (:class:`LocalPrivacy`, a client transform; every strategy): each client sends x_k + Δ̂_k + N(0, σ²C²I)
  itself; the server aggregates as the strategy does (post-processing).

Accounting (:class:`PrivacyAccountant`) uses Opacus's accountants: central — the subsampled Gaussian mechanism with
multiplier σ and rate q, one step per round, for adding or removing one client; local — the Gaussian mechanism with
multiplier σ/2 (replacing a client's whole data set moves its clipped update by up to 2C), no amplification (the
server sees who took part), composed over the most rounds any client has taken part in.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedsim.pipeline.robust import change_norms
from fedsim.pipeline.stages import ServerStage, with_shared
from fedsim.pipeline.transforms import TransformContext, UpdateTransform
from fedsim.types import ClientUpdate, GlobalState, RoundContext, Tensors

# Rényi orders for the RDP accountant: Opacus's defaults and larger ones, which small ε (large σ) needs
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512, 1024]


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` after ``steps`` rounds of the (subsampled) Gaussian mechanism, by Opacus's accountant: 0 before
    the first round, ∞ without noise, never below 0 (the RDP-to-(ε, δ) conversion goes below 0 where δ alone covers
    the mechanism — a large δ and much noise: the mechanism is then (0, δ)-DP, and ε is 0)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": ε is then an upper bound, still valid
        warnings.simplefilter("ignore")
        eps = float(acc.get_epsilon(delta, alphas=RDP_ORDERS) if accountant == "rdp" else acc.get_epsilon(delta))
    return max(0.0, eps)


def solve_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The smallest noise multiplier σ (to 1%) with ε(σ) ≤ ``target_epsilon`` after ``steps`` rounds.

    Raises:
        ValueError: the target cannot be reached (σ would exceed 10⁴).
    """
    if epsilon(1e4, sample_rate, steps, delta, accountant) > target_epsilon:
        raise ValueError(f"ε = {target_epsilon:g} at δ = {delta:g} cannot be reached in {steps} round(s) at sampling "
                         f"rate {sample_rate:.3g}, even with noise multiplier 10⁴: raise target_epsilon or delta, "
                         "or run fewer rounds or sample fewer clients per round")
    lo, hi = 0.0, 1.0
    while epsilon(hi, sample_rate, steps, delta, accountant) > target_epsilon:
        lo, hi = hi, hi * 2
    while hi - lo > 0.005 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if epsilon(mid, sample_rate, steps, delta, accountant) > target_epsilon else (lo, mid)
    return hi


def effective_noise(noise_multiplier: float, count_noise: float | None) -> float:
    """The updates' noise multiplier when adaptive clipping's count takes noise σ_b: (σ⁻² − (2σ_b)⁻²)^(−1/2) (Andrew
    et al., Theorem 1), so that the round is a Gaussian mechanism with multiplier σ; σ without adaptive clipping.

    Raises:
        ValueError: σ_b too small to leave the updates any noise budget.
    """
    if count_noise is None or noise_multiplier == 0:
        return noise_multiplier
    if count_noise == 0 or (2 * count_noise) ** -2 >= noise_multiplier**-2:
        raise ValueError(f"adaptive clipping's count_noise {count_noise:g} must exceed noise_multiplier / 2 = "
                         f"{noise_multiplier / 2:g}, or the clipped count alone spends the whole privacy budget")
    return (noise_multiplier**-2 - (2 * count_noise) ** -2) ** -0.5


def generator(*key: int) -> torch.Generator:
    """A torch generator seeded from ``key`` (seed, round, ...)."""
    return torch.Generator().manual_seed(int(np.random.default_rng(list(key)).integers(2**62)))


def clip(delta: Tensors, max_norm: float) -> tuple[Tensors, float]:
    """``delta`` scaled to norm ≤ ``max_norm`` (float64 norm over every tensor together); (clipped, its norm before)."""
    norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in delta.values()))
    if norm <= max_norm:
        return delta, norm
    scale = max_norm / norm
    return {k: d * scale for k, d in delta.items()}, norm


def gaussian(like: Tensors, std: float, gen: torch.Generator) -> Tensors:
    """N(0, std²) per coordinate, float64, keys in sorted order from ``gen``."""
    return {k: torch.randn(like[k].shape, generator=gen, dtype=torch.float64) * std for k in sorted(like)}


@dataclass
class PrivacyAccountant:
    """ε at δ after every round (see the module's docstring for what each mode accounts).

    Args:
        mode: ``central`` or ``local``; noise_multiplier: σ (the whole mechanism's); sample_rate: q (central);
        delta: δ; accountant: ``rdp`` or ``prv``.
    """

    mode: str
    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        self._step_rdp = None  # RDP of one round at every order: the same each round, computed once

    def mechanism(self) -> tuple[float, float]:
        """(noise multiplier, sampling rate) of one round's release, as accounted."""
        return (self.noise_multiplier, self.sample_rate) if self.mode == "central" else (self.noise_multiplier / 2, 1.0)

    def epsilon(self, steps: int) -> float:
        """ε after ``steps`` rounds (central) or ``steps`` participations (local). With RDP, one round's RDP is
        computed once and composed by multiplying (what Opacus's RDP accountant does with its history), so a round
        costs microseconds instead of a recomputation."""
        sigma, q = self.mechanism()
        if self.accountant != "rdp" or steps <= 0 or sigma <= 0:
            return epsilon(sigma, q, steps, self.delta, self.accountant)
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        if self._step_rdp is None:
            self._step_rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDP_ORDERS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return max(0.0, float(get_privacy_spent(orders=RDP_ORDERS, rdp=self._step_rdp * steps, delta=self.delta)[0]))


class CentralPrivacy(ServerStage):
    """DP-FedAvg at the server (``privacy.mode: central``), with optional adaptive clipping; reports ε per round.

    Args:
        clipping_norm: C (adaptive clipping's start); noise_multiplier: σ; expected_clients: qN, the denominator;
        accountant: ε's accountant; is_shared: which state keys clients upload (the strategy's); adaptive: (target quantile γ, learning rate η_C, count noise σ_b) or None.
    """

    metric_keys: ClassVar[tuple[str, ...]] = ("privacy/epsilon", "privacy/clipped", "privacy/clipping_norm",
                                              "privacy/noise_std", "privacy/noise_multiplier")

    def __init__(self, clipping_norm: float, noise_multiplier: float, expected_clients: float,
                 accountant: PrivacyAccountant, is_shared: Callable[[str], bool],
                 adaptive: tuple[float, float, float] | None = None):
        self.clip, self.sigma, self.denominator = clipping_norm, noise_multiplier, expected_clients
        self.is_shared = is_shared
        self.accountant, self.adaptive = accountant, adaptive
        self.update_sigma = effective_noise(noise_multiplier, adaptive[2] if adaptive else None)
        self._sum: list[torch.Tensor] | None = None  # the round's Σ_k Δ̂_k, from its first update on
        self._keys: list[str] = []
        self._start: Tensors = {}
        self._count = self._within = 0
        self._metrics: dict[str, float] = {}

    def admit(self, ctx: RoundContext, state: GlobalState, update: ClientUpdate
              ) -> tuple[ClientUpdate | None, str | None]:
        """Clip the update's change and add it to the round's sum (float32, fused kernels, in place)."""
        if self._sum is None:
            self._begin(state)
        (delta, norm), = change_norms([update], self._start, self._keys)
        self._count, self._within = self._count + 1, self._within + (norm <= self.clip)
        torch._foreach_add_(self._sum, delta, alpha=min(1.0, self.clip / norm) if norm > 0 else 1.0)
        return update, None

    def _begin(self, state: GlobalState) -> None:
        self._keys = sorted(k for k in state.tensors if self.is_shared(k))
        self._start = {k: state.tensors[k].to(torch.float32) for k in self._keys}
        self._sum = [torch.zeros_like(v) for v in self._start.values()]  # Σ_k Δ̂_k
        self._count = self._within = 0

    def _release(self, ctx: RoundContext, state: GlobalState) -> Tensors:
        """The round's new shared tensors: the start plus (Σ_k Δ̂_k + N(0, σ²C²)) / qN; C adapts after."""
        if self._sum is None:  # a round without updates: the noise alone
            self._begin(state)
        total = {k: a.to(torch.float64) for k, a in zip(self._keys, self._sum)}
        std = self.update_sigma * self.clip
        if std > 0:
            for k, z in gaussian(total, std, generator(ctx.seed, ctx.server_round, 47)).items():
                total[k] += z
        released = {k: state.tensors[k].to(torch.float64) + total[k] / self.denominator for k in self._keys}
        self._metrics = {"privacy/clipped": (self._count - self._within) / self._count if self._count else 0.0,
                         "privacy/clipping_norm": self.clip, "privacy/noise_std": std / self.denominator,
                         "privacy/noise_multiplier": self.sigma}
        if self.adaptive is not None:
            self._adapt(ctx, self._within)
        self._sum = None
        return released

    def _adapt(self, ctx: RoundContext, within: int) -> None:
        """C ← C·exp(−η_C(b̃ − γ)), b̃ = (#{‖Δ_k‖ ≤ C} + N(0, σ_b²)) / qN."""
        quantile, lr, count_noise = self.adaptive
        noise = float(np.random.default_rng([ctx.seed, ctx.server_round, 53]).normal()) * count_noise
        share = (within + noise) / self.denominator
        self.clip *= math.exp(-lr * (share - quantile))

    def after(self, ctx: RoundContext, old: GlobalState, new: GlobalState) -> tuple[GlobalState, dict[str, float]]:
        return with_shared(new, self._release(ctx, old)), {}

    def idle(self, ctx: RoundContext, old: GlobalState, new: GlobalState) -> tuple[GlobalState, dict[str, float]]:
        """A round without updates: the state moves by the noise alone."""
        return self.after(ctx, old, new)

    def end_round(self, ctx: RoundContext, received: Sequence[int]) -> dict[str, float]:
        metrics, self._metrics = self._metrics, {}
        return {**metrics, "privacy/epsilon": self.accountant.epsilon(ctx.server_round)}

    def state_dict(self) -> dict[str, Any]:
        return {"clipping_norm": self.clip} if self.adaptive is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip = float(state.get("clipping_norm", self.clip))


class LocalAccounting(ServerStage):
    """ε of local differential privacy (``privacy.mode: local``): for the client that has sent the most updates."""

    metric_keys: ClassVar[tuple[str, ...]] = ("privacy/epsilon", "privacy/noise_multiplier")

    def __init__(self, accountant: PrivacyAccountant):
        self.accountant = accountant
        self.sent: dict[str, int] = {}

    def end_round(self, ctx: RoundContext, received: Sequence[int]) -> dict[str, float]:
        for cid in received:  # every update that reached the server was released, aggregated or not
            self.sent[str(cid)] = self.sent.get(str(cid), 0) + 1
        return {"privacy/epsilon": self.accountant.epsilon(max(self.sent.values(), default=0)),
                "privacy/noise_multiplier": self.accountant.noise_multiplier}

    def state_dict(self) -> dict[str, Any]:
        return {"sent": dict(self.sent)} if self.sent else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sent = {str(k): int(v) for k, v in state.get("sent", {}).items()}


@dataclass(frozen=True)
class LocalPrivacy(UpdateTransform):
    """Each client clips its change of the shared tensors to C and adds N(0, σ²C²) to every coordinate before it
    uploads (``privacy.mode: local``); the noise is drawn from (seed, round, client, attempt)."""

    clipping_norm: float
    noise_multiplier: float

    metric_keys: ClassVar[tuple[str, ...]] = ("privacy/clipped",)
    round_metrics: ClassVar[tuple[str, ...]] = metric_keys  # the row: the example-weighted share clipped

    def __call__(self, tensors: Tensors, ctx: TransformContext) -> tuple[Tensors, dict[str, float]]:
        start = {k: (ctx.start or {}).get(k, torch.zeros_like(v)).to(torch.float64) for k, v in tensors.items()}
        delta, norm = clip({k: v.to(torch.float64) - start[k] for k, v in tensors.items()}, self.clipping_norm)
        noise = gaussian(delta, self.noise_multiplier * self.clipping_norm,
                         generator(ctx.seed, ctx.server_round, ctx.client_id, ctx.attempt, 59))
        out = {k: (start[k] + delta[k] + noise[k]).to(v.dtype) for k, v in tensors.items()}
        return out, {"privacy/clipped": float(norm > self.clipping_norm)}
