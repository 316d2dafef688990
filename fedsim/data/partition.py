"""Non-IID partitioners: seeded pure functions from sample labels/groups to client index sets.

Every partitioner returns a list with one sorted ``int64`` index array per client; together they use every sample
exactly once (except ``shards``' remainder, which is spread over the first clients). Determinism comes from the
explicit ``seed``; no global random state is touched.
"""

from __future__ import annotations

import numpy as np

from fedsim.config import PartitionConfig
from fedsim.errors import ScenarioError

Partition = list[np.ndarray]


def _finish(parts: list[list[int] | np.ndarray]) -> Partition:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(num_samples: int, num_clients: int, seed: int) -> Partition:
    """Shuffle and deal the samples round-robin: client sizes differ by at most one."""
    perm = np.random.default_rng([seed, 101]).permutation(num_samples)
    return _finish([perm[c::num_clients] for c in range(num_clients)])


def quantity(num_samples: int, num_clients: int, alpha: float, min_samples: int, seed: int) -> Partition:
    """IID labels, skewed sizes: client shares ~ Dirichlet(alpha) (smaller alpha → more unequal), each client at
    least ``min_samples``."""
    rng = np.random.default_rng([seed, 103])
    spare = num_samples - min_samples * num_clients
    shares = rng.dirichlet(np.full(num_clients, alpha))
    sizes = min_samples + np.floor(shares * spare).astype(np.int64)
    sizes[: num_samples - int(sizes.sum())] += 1  # hand out the rounding remainder
    perm = rng.permutation(num_samples)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return _finish([perm[bounds[c] : bounds[c + 1]] for c in range(num_clients)])


def dirichlet(groups: np.ndarray, num_clients: int, alpha: float, min_samples: int, seed: int,
              max_tries: int = 100) -> Partition:
    """Label skew (Hsu et al. 2019): for each label, split its samples over clients with proportions
    ~ Dirichlet(alpha · 1). Redraws (up to ``max_tries``) until every client has ``min_samples``.

    Smaller alpha → each client sees fewer labels.
    """
    rng = np.random.default_rng([seed, 107])
    labels = np.unique(groups)
    by_label = {lab: np.flatnonzero(groups == lab) for lab in labels}
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for lab in labels:
            idx = rng.permutation(by_label[lab])
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return _finish(parts)
    raise ScenarioError(
        "partition.min_samples",
        f"a Dirichlet(alpha={alpha}) split of {len(groups)} samples over {num_clients} clients left some client with "
        f"fewer than {min_samples} samples in {max_tries} draws",
        "raise partition.alpha, lower partition.min_samples or use fewer clients",
    )


def shards(groups: np.ndarray, num_clients: int, shards_per_client: int, seed: int) -> Partition:
    """Pathological label skew (McMahan et al. 2017): sort by label, cut into ``num_clients · k`` shards, deal ``k``
    random shards to each client, so each client sees about ``k`` labels."""
    rng = np.random.default_rng([seed, 109])
    order = np.lexsort((rng.permutation(len(groups)), groups))  # by label, random within a label
    num_shards = num_clients * shards_per_client
    pieces = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards)
    return _finish([np.concatenate([pieces[s] for s in assignment[c::num_clients]]) for c in range(num_clients)])


def natural(groups: np.ndarray, num_clients: int, seed: int) -> Partition:
    """The groups (e.g. tasks) as clients: one group per client, or, with ``k`` times as many clients as groups, each
    group's rows dealt IID over ``k`` clients of their own (clients ``g·k .. g·k + k − 1`` hold group ``g``)."""
    labels = np.unique(groups)
    if num_clients % len(labels):
        raise ScenarioError(
            "clients.num_clients",
            f"the natural split gives each of the {len(labels)} groups the same number of clients, but "
            f"{num_clients} clients is not a multiple of {len(labels)}",
            f"set clients.num_clients={len(labels)} (or a multiple of it) or use partition.method: dirichlet",
        )
    k = num_clients // len(labels)
    rng = np.random.default_rng([seed, 113])
    parts: list[np.ndarray] = []
    for lab in labels:
        idx = np.flatnonzero(groups == lab)
        if k > 1:
            idx = rng.permutation(idx)
        parts += [idx[j::k] for j in range(k)]
    return _finish(parts)


def partition(cfg: PartitionConfig, groups: np.ndarray | None, num_samples: int, num_clients: int,
              seed: int) -> Partition:
    """Dispatch on ``cfg.method`` and check the result.

    Args:
        cfg: the scenario's partition section.
        groups: (num_samples,) integer label/group codes, or None when the data has no such field.
        num_samples: training set size.
        num_clients: number of clients.
        seed: scenario seed.

    Raises:
        ScenarioError: more clients than samples, more shards than samples, a method that needs labels on data
            without them, or a client below ``min_samples``.
    """
    if num_clients > num_samples:
        raise ScenarioError("clients.num_clients",
                            f"{num_clients} clients but only {num_samples} training samples",
                            "use fewer clients or more data (e.g. data.synthetic.num_train)")
    if cfg.min_samples * num_clients > num_samples:
        raise ScenarioError("partition.min_samples",
                            f"{num_clients} clients × min_samples {cfg.min_samples} exceeds {num_samples} samples",
                            "lower partition.min_samples or clients.num_clients")
    needs_groups = cfg.method in ("dirichlet", "shards", "natural")
    if needs_groups and (groups is None or (groups < 0).any()):
        raise ScenarioError("partition.by", f"partition.method {cfg.method!r} needs a label/group field in every row",
                            "set partition.by to a field of the data, or use method iid/quantity")
    if cfg.method == "iid":
        parts = iid(num_samples, num_clients, seed)
    elif cfg.method == "quantity":
        parts = quantity(num_samples, num_clients, cfg.alpha, cfg.min_samples, seed)
    elif cfg.method == "dirichlet":
        parts = dirichlet(groups, num_clients, cfg.alpha, cfg.min_samples, seed)
    elif cfg.method == "shards":
        if num_clients * cfg.shards_per_client > num_samples:
            raise ScenarioError(
                "partition.shards_per_client",
                f"{num_clients} clients × {cfg.shards_per_client} shards = {num_clients * cfg.shards_per_client:,} "
                f"shards for {num_samples:,} samples: most shards would be empty",
                f"set shards_per_client to at most {max(1, num_samples // num_clients)} (a shard of one sample or "
                "more), or use fewer clients")
        parts = shards(groups, num_clients, cfg.shards_per_client, seed)
    else:
        parts = natural(groups, num_clients, seed)
    small = [c for c, p in enumerate(parts) if len(p) < cfg.min_samples]
    if small:
        raise ScenarioError("partition.min_samples",
                            f"clients {small[:5]} have fewer than {cfg.min_samples} samples under {cfg.method!r}",
                            "lower partition.min_samples, use fewer clients or another method")
    return parts


def label_histogram(parts: Partition, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """(num_clients, num_groups) counts of each group per client."""
    hist = np.zeros((len(parts), max(num_groups, 1)), dtype=np.int64)
    for c, p in enumerate(parts):
        if num_groups and len(p):
            hist[c] = np.bincount(groups[p], minlength=num_groups)
        elif len(p):
            hist[c, 0] = len(p)
    return hist
