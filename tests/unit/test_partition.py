import numpy as np
import pytest

from fedsim.config import PartitionConfig
from fedsim.data import partition as P
from fedsim.errors import ScenarioError

GROUPS = np.repeat(np.arange(5), 200)  # 1000 samples, 5 balanced labels


def _check_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards", "quantity"])
def test_every_sample_used_once_and_seeded(method):
    cfg = PartitionConfig(method=method, alpha=0.5, shards_per_client=2, min_samples=5)
    a = P.partition(cfg, GROUPS, len(GROUPS), 20, seed=1)
    b = P.partition(cfg, GROUPS, len(GROUPS), 20, seed=1)
    c = P.partition(cfg, GROUPS, len(GROUPS), 20, seed=2)
    _check_exact_cover(a, len(GROUPS))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert min(len(p) for p in a) >= 5


def test_natural_one_group_per_client():
    parts = P.partition(PartitionConfig(method="natural"), GROUPS, len(GROUPS), 5, seed=0)
    _check_exact_cover(parts, len(GROUPS))
    assert [set(GROUPS[p]) for p in parts] == [{0}, {1}, {2}, {3}, {4}]
    with pytest.raises(ScenarioError, match="num_clients=5"):
        P.partition(PartitionConfig(method="natural"), GROUPS, len(GROUPS), 4, seed=0)


def test_natural_several_clients_per_group():
    """k clients per group: each group's rows dealt over k clients of its own, in group order, sizes within one."""
    parts = P.partition(PartitionConfig(method="natural"), GROUPS, len(GROUPS), 15, seed=0)
    _check_exact_cover(parts, len(GROUPS))
    assert [set(GROUPS[p]) for p in parts] == [{g} for g in range(5) for _ in range(3)]
    for g in range(5):
        sizes = [len(parts[3 * g + j]) for j in range(3)]
        assert max(sizes) - min(sizes) <= 1
    again = P.partition(PartitionConfig(method="natural"), GROUPS, len(GROUPS), 15, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = P.partition(PartitionConfig(method="natural"), GROUPS, len(GROUPS), 15, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))  # the deal is seeded
    with pytest.raises(ScenarioError, match="not a multiple of 5"):
        P.partition(PartitionConfig(method="natural"), GROUPS, len(GROUPS), 12, seed=0)


def _skew(parts):
    """Mean total-variation distance between client label distributions and the global one."""
    hist = P.label_histogram(parts, GROUPS, 5).astype(float)
    dist = hist / hist.sum(1, keepdims=True)
    return float(np.mean(0.5 * np.abs(dist - 0.2).sum(1)))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    skews = [np.mean([_skew(P.dirichlet(GROUPS, 10, a, 1, seed=s)) for s in range(3)]) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


def test_shards_give_about_k_labels():
    parts = P.shards(GROUPS, 10, 2, seed=0)
    assert max(len(set(GROUPS[p])) for p in parts) <= 3


def test_quantity_skew_sizes_vary_with_alpha():
    sizes_low = [len(p) for p in P.quantity(1000, 10, 0.1, 5, seed=0)]
    sizes_high = [len(p) for p in P.quantity(1000, 10, 100.0, 5, seed=0)]
    assert np.std(sizes_low) > 3 * np.std(sizes_high)
    assert min(sizes_low) >= 5 and sum(sizes_low) == 1000


def test_errors_are_scenario_errors():
    with pytest.raises(ScenarioError, match="only 10 training samples"):
        P.partition(PartitionConfig(), None, 10, 20, seed=0)
    with pytest.raises(ScenarioError, match="min_samples"):
        P.partition(PartitionConfig(min_samples=60), None, 1000, 20, seed=0)
    with pytest.raises(ScenarioError, match="partition.by"):
        P.partition(PartitionConfig(method="dirichlet"), None, 1000, 20, seed=0)
    with pytest.raises(ScenarioError, match="Dirichlet"):
        P.dirichlet(GROUPS, 100, 0.01, 9, seed=0, max_tries=3)
