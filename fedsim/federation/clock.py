"""The simulated clock: how long each client would take on its own hardware and network, so that rounds have a
simulated duration (reported next to wall time) and an optional deadline drops stragglers.

A client's time = local steps / its speed + download and upload bytes at the configured bandwidths + 2 × latency;
a round lasts as long as its slowest client (capped at the deadline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedsim.config import ClockConfig, deal_tiers
from fedsim.types import ClientFailure, ClientSpec


def client_speeds(clock: ClockConfig, num_clients: int, seed: int, bits: list[int]) -> list[float]:
    """Steps per second of each client id: ``steps_per_s`` or its speed tier's (dealt by a seeded permutation),
    times ``by_bits[bits]`` for a client whose base has those bits."""
    if clock.tiers is None:
        base = [clock.steps_per_s] * num_clients
    else:
        tier = deal_tiers([t.fraction for t in clock.tiers], num_clients, seed, salt=227)
        base = [clock.tiers[t].steps_per_s for t in tier]
    mult = clock.by_bits or {}
    return [v * mult.get(b, 1.0) for v, b in zip(base, bits)]


def client_links(clock: ClockConfig, num_clients: int, seed: int) -> list[tuple[float, float]]:
    """(down, up) Mbit/s of each client id: its speed tier's links where the tier gives them (the tiers dealt as in
    :func:`client_speeds`), else the clock's."""
    if clock.tiers is None:
        return [(clock.down_mbps, clock.up_mbps)] * num_clients
    tier = deal_tiers([t.fraction for t in clock.tiers], num_clients, seed, salt=227)
    return [(clock.tiers[t].down_mbps or clock.down_mbps, clock.tiers[t].up_mbps or clock.up_mbps) for t in tier]


def client_time(clock: ClockConfig, steps: float, speed: float, down_bytes: float, up_bytes: float,
                links: tuple[float, float] | None = None) -> float:
    """Simulated seconds for one client's round: compute, then transfers at its links' bandwidths (``links``, its
    (down, up) Mbit/s; default the clock's)."""
    down_mbps, up_mbps = links or (clock.down_mbps, clock.up_mbps)
    return (steps / speed + 8.0 * down_bytes / (down_mbps * 1e6) + 8.0 * up_bytes / (up_mbps * 1e6)
            + 2 * clock.latency_s)


@dataclass
class Admitted:
    """What the clock lets through: the clients in time, the late ones (as failures), the round's simulated length."""

    ok: list[tuple[Any, Any]]
    late: list[ClientFailure]
    round_s: float


def admit(clock: ClockConfig, ok: Sequence[tuple[Any, Any]], clients: Sequence[ClientSpec],
          down: dict[int, tuple[int, int]]) -> Admitted:
    """Each successful client's simulated time (its steps, its speed, its download and upload bytes); past
    ``clock.deadline_s``, a straggler, dropped from the round."""
    sim = {res.client_id: client_time(clock, res.metrics.get("train/steps", 0.0), clients[res.client_id].speed,
                                      down[res.client_id][1], res.metrics.get("client/up_bytes", 0.0),
                                      clients[res.client_id].links)
           for res, _ in ok}
    late = sorted(c for c, t in sim.items() if clock.deadline_s is not None and t > clock.deadline_s)
    failures = [ClientFailure(c, f"missed the round deadline: simulated {sim[c]:.1f} s > clock.deadline_s "
                                 f"{clock.deadline_s:g}") for c in late]
    round_s = clock.deadline_s if late else max(sim.values(), default=0.0)
    return Admitted([(res, h) for res, h in ok if res.client_id not in set(late)], failures, round_s)
