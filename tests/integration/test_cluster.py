"""A two-node Ray cluster (ray.cluster_utils.Cluster, both nodes on this machine): workers spread over the nodes,
clients train on both, and the metrics equal a single-node run's."""

import json

import pytest

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario

COMPARED = ("train/loss", "eval/loss", "eval/accuracy", "comm/up_params", "clients/sampled")


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("ray_session")
def test_two_node_cluster_spreads_workers_and_matches_one_node(tiny_raw, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    # the one-node reference: the in-process backend, which equals a one-node Ray run (tests/integration/test_backends)
    single = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "single")
    tiny_raw["resources"].update(backend="ray", num_workers=2, num_cpus=1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        tiny_raw["resources"]["address"] = cluster.address
        multi = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "multi")
    finally:
        ray.shutdown()
        cluster.shutdown()
    nodes = {w["node"] for w in multi["workers"]}
    assert len(nodes) == 2, "one worker per node"
    assert all(w["num_clients"] > 0 for w in multi["workers"])  # clients trained on both nodes
    for a, b in zip(_rows(tmp_path / "single"), _rows(tmp_path / "multi")):
        for k in COMPARED:
            assert a.get(k) == b.get(k), (a["round"], k)
    assert single["final/eval/loss"] == multi["final/eval/loss"]
