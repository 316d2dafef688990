"""Before round 1: the data loaded and tokenized, split over the clients (non-IID), each client's settings (LoRA
rank and alpha, base precision, speed) dealt, and the strategy's spec — everything a run needs, and everything
``fedsim validate`` checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.components import Components, resolve
from fedsim.config import Scenario
from fedsim.data.datasets import TokenizedData, load_data, partition_field
from fedsim.data.partition import Partition, label_histogram, partition
from fedsim.data.poison import flip_labels
from fedsim.errors import ScenarioError
from fedsim.federation.clock import client_links, client_speeds
from fedsim.models.base import decoder_linear_shapes, target_shapes
from fedsim.models.quant import check_shapes, require_backend
from fedsim.strategies import StrategySpec
from fedsim.types import ClientSpec, LoraSpec


@dataclass
class Prepared:
    """Everything a run needs before the first round: data, partition and client specs."""

    scenario: Scenario
    data: TokenizedData
    parts: Partition
    clients: list[ClientSpec]
    spec: StrategySpec
    local_test: list[np.ndarray]  # per client, held-out indices of the training split (empty without any)


def prepare(scenario: Scenario, components: Components | None = None) -> Prepared:
    """Load and tokenize data, partition it, build client specs and the strategy spec (no training), with the run's
    resolved ``components`` — its row format, model task and strategy (the driver's; default: resolved here from the
    scenario's names, for a caller without a run).

    Raises:
        ScenarioError, DataError: anything that would make the run fail later.
    """
    if components is None:
        components = resolve(scenario)
    fmt, task = components.row_format, components.task
    data = load_data(scenario, fmt=fmt, task=task)
    n = len(data.train)
    groups = data.train.group if partition_field(scenario, fmt) and (data.train.group >= 0).all() else None
    parts = partition(scenario.partition, groups, n, scenario.clients.num_clients, scenario.seed)
    parts, local_test = split_local_test(parts, scenario.eval.local_test_fraction, scenario.seed)
    bad = scenario.clients.malicious
    if bad is not None and bad.attack == "label_flip":  # data poisoning: the attackers train on flipped copies
        data, parts, _ = flip_labels(data, parts, bad.clients(scenario.clients.num_clients, scenario.seed))
    lcfg = scenario.clients.lora
    task.check(scenario.model, data)
    auto_class = task.classes[0]
    shapes = target_shapes(scenario.model, auto_class, task.head_names)
    smallest = min(min(s.d_in, s.d_out) for s in shapes.values())
    ranks = {"clients.lora": lcfg.max_rank(), **components.strategy.param_ranks()}
    for key, rank in ranks.items():
        if rank > smallest:
            raise ScenarioError(key, f"rank {rank} exceeds the smallest adapted dimension {smallest}",
                                f"use ranks ≤ {smallest}")
    assigned = lcfg.assign(len(parts), scenario.seed)
    qcfg = scenario.clients.quant
    if qcfg.is_quantized():
        layers = decoder_linear_shapes(scenario.model, auto_class)
        for spec in qcfg.choices():
            check_shapes(spec, layers)
            require_backend(spec.backend)
    quants = qcfg.assign(len(parts), scenario.seed)
    speeds = client_speeds(scenario.clock, len(parts), scenario.seed, [q.bits for q in quants])
    links = client_links(scenario.clock, len(parts), scenario.seed)
    clients = [ClientSpec(client_id=c, num_examples=len(p), lora=LoraSpec(rank=r, alpha=a, rslora=lcfg.rslora),
                          quant=q, speed=v, links=link)
               for c, (p, (r, a), q, v, link) in enumerate(zip(parts, assigned, quants, speeds, links))]
    # the global adapter's spec: the single one, or the largest rank of the mix
    top = max(clients, key=lambda c: (c.lora.rank, c.lora.alpha)).lora
    return Prepared(scenario, data, parts, clients, StrategySpec(shapes=shapes, lora=top, seed=scenario.seed),
                    local_test)


def split_local_test(parts: Partition, fraction: float, seed: int) -> tuple[Partition, list[np.ndarray]]:
    """Hold out ``fraction`` of each client's shard (at least one sample) as its local test split, seeded per client.

    Raises:
        ScenarioError: a client would keep no training sample.
    """
    if fraction <= 0:
        return parts, [np.empty(0, dtype=np.int64) for _ in parts]
    train, test = [], []
    for c, p in enumerate(parts):
        k = max(1, int(round(fraction * len(p))))
        if len(p) - k < 1:
            raise ScenarioError("eval.local_test_fraction", f"client {c} has {len(p)} sample(s): nothing would be "
                                "left to train on", "lower eval.local_test_fraction or raise partition.min_samples")
        perm = np.random.default_rng([seed, c, 17]).permutation(p)
        test.append(np.sort(perm[:k]))
        train.append(np.sort(perm[k:]))
    return train, test


def local_eval_clients(num_clients: int, limit: int | None, seed: int) -> list[int]:
    """The clients scored on their local test splits at each evaluation: all, or a fixed seeded subset of ``limit``
    (with thousands of registered clients, scoring every one each time costs more than the round)."""
    if limit is None or limit >= num_clients:
        return list(range(num_clients))
    return sorted(int(c) for c in np.random.default_rng([seed, 29]).choice(num_clients, size=limit, replace=False))


def partition_table(prep: Prepared) -> tuple[np.ndarray, list[str]]:
    """Per-client histogram over the partition field's groups (or one column of counts)."""
    groups = prep.data.train.group
    names = prep.data.group_names
    if not names or (groups < 0).any():
        return np.array([[len(p)] for p in prep.parts], dtype=np.int64), ["samples"]
    return label_histogram(prep.parts, groups, len(names)), names
