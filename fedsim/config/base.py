"""What every scenario section shares: frozen, strict pydantic models, and how a share of the clients is dealt."""

from __future__ import annotations

import numpy as np
from pydantic import ValidationError

from fedsim.schema import Strict


class Frozen(Strict):
    """A scenario section: immutable, every key it does not declare an error, numbers finite and never booleans
    (:class:`fedsim.schema.Strict`)."""


def check_mix(tiers: tuple | None, per_client: tuple | None) -> None:
    """A mix is tiers (non-empty, fractions summing to 1) or a per-client list, not both."""
    if tiers is not None and per_client is not None:
        raise ValueError("give either tiers or per_client, not both")
    if tiers is not None:
        if not tiers:
            raise ValueError("tiers needs at least one tier")
        total = sum(t.fraction for t in tiers)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"tier fractions sum to {total:g}; they must sum to 1")


def deal_tiers(fractions: list[float], num_clients: int, seed: int, salt: int) -> list[int]:
    """Tier index of each client id: largest-remainder counts, dealt by a permutation seeded by (seed, salt)."""
    exact = [f * num_clients for f in fractions]
    counts = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: num_clients - sum(counts)]:
        counts[i] += 1
    labels = [i for i, c in enumerate(counts) for _ in range(c)]
    perm = np.random.default_rng([seed, salt]).permutation(num_clients)
    per_client = [0] * num_clients
    for client, tier in zip(perm, labels):
        per_client[int(client)] = tier
    return per_client


def format_validation(e: ValidationError, prefix: str = "") -> str:
    """pydantic's errors as one line: each offending key's dotted path and what is wrong with it."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-after"))
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling and nesting (see `fedsim validate --help`)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
