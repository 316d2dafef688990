"""Client selection, from an explicit generator derived from (seed, round)."""

from __future__ import annotations

import numpy as np


def round_rng(seed: int, server_round: int, stream: int = 0) -> np.random.Generator:
    """The generator for one purpose (``stream``) in one round: independent of every other round and purpose."""
    return np.random.default_rng([seed, server_round, stream])


def sample_clients(num_clients: int, num_sampled: int, seed: int, server_round: int) -> list[int]:
    """``num_sampled`` distinct client ids drawn uniformly, sorted.

    Args:
        num_clients: registered clients.
        num_sampled: clients to draw (≤ num_clients).
        seed: scenario seed.
        server_round: round number, from 1.
    """
    rng = round_rng(seed, server_round, stream=1)
    chosen = rng.choice(num_clients, size=min(num_sampled, num_clients), replace=False)
    return sorted(int(c) for c in chosen)
