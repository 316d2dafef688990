"""Client selection and availability, from explicit generators derived from (seed, round)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def round_rng(seed: int, server_round: int, stream: int = 0) -> np.random.Generator:
    """The generator for one purpose (``stream``) in one round: independent of every other round and purpose."""
    return np.random.default_rng([seed, server_round, stream])


def available_clients(num_clients: int, availability: float, seed: int, server_round: int) -> np.ndarray:
    """Ids of the clients reachable this round: each independently with probability ``availability``."""
    if availability >= 1.0:
        return np.arange(num_clients)
    return np.flatnonzero(round_rng(seed, server_round, stream=2).random(num_clients) < availability)


def sample_clients(num_clients: int, num_sampled: int, seed: int, server_round: int,
                   sizes: Sequence[int] | np.ndarray | None = None, availability: float = 1.0,
                   poisson: bool = False) -> list[int]:
    """Up to ``num_sampled`` distinct client ids among the available ones, sorted.

    Args:
        num_clients: registered clients.
        num_sampled: clients to draw (fewer if fewer are available).
        seed: scenario seed.
        server_round: round number, from 1.
        sizes: per-client sample counts for size-weighted sampling (probability ∝ size, without replacement);
            None samples uniformly.
        availability: probability that a client is reachable this round.
        poisson: each available client independently with probability ``num_sampled / num_clients`` instead.
    """
    pool = available_clients(num_clients, availability, seed, server_round)
    if poisson:
        keep = round_rng(seed, server_round, stream=1).random(len(pool)) < num_sampled / num_clients
        return sorted(int(c) for c in pool[keep])
    k = min(num_sampled, len(pool))
    if k == 0:
        return []
    rng = round_rng(seed, server_round, stream=1)
    if sizes is None:
        chosen = pool[rng.choice(len(pool), size=k, replace=False)]
    else:
        w = np.asarray(sizes, dtype=np.float64)[pool]
        chosen = pool[rng.choice(len(pool), size=k, replace=False, p=w / w.sum())]
    return sorted(int(c) for c in chosen)


def dropped_out(clients: Sequence[int], dropout: float, seed: int, server_round: int) -> set[int]:
    """The sampled clients that drop out during the round (each with probability ``dropout``, drawn per client)."""
    if dropout <= 0:
        return set()
    return {c for c in clients if np.random.default_rng([seed, server_round, int(c), 19]).random() < dropout}
