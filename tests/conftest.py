"""Shared fixtures: an isolated cache, tiny scenarios, and Ray instances (shared, or a test's own)."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 3,
    "rounds": 2,
    "model": {"name": "tiny", "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2}},
    "data": {"source": "synthetic", "synthetic": {"tasks": ["add", "upper", "count"], "num_train": 240,
                                                   "num_test": 48}, "max_seq_len": 24},
    "partition": {"method": "dirichlet", "by": "task", "alpha": 1.0, "min_samples": 5},
    "clients": {"num_clients": 8, "per_round": 3, "lora": {"rank": 4, "alpha": 8}},
    "training": {"local_steps": 3, "batch_size": 8, "lr": 0.005},
    "eval": {"every": 1, "batch_size": 16},
    "resources": {"backend": "local", "num_workers": 2, "num_cpus": 1},
    "logging": {"console": False, "plots": False, "wandb": {"mode": "disabled"}},
}


def news_data(tmp_path, rows: int = 60, test_fraction: float = 0.25) -> dict[str, Any]:
    """A ``data`` section for a header-less two-label news CSV written into ``tmp_path`` (classification)."""
    lines = [f'{1 + i % 2},"title {i}","text number {i}"' for i in range(rows)]
    (tmp_path / "news.csv").write_text("\n".join(lines) + "\n")
    return {"source": str(tmp_path / "news.csv"), "format": "classification", "columns": ["label", "title", "body"],
            "prompt_template": "{title}: {body}\nTopic: ", "label_names": {1: "World", 2: "Sports"},
            "task_field": None, "test": {"fraction": test_fraction}}


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["FEDSIM_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedsim-cache"))


@pytest.fixture
def tiny_raw() -> dict[str, Any]:
    """A fresh copy of a tiny scenario mapping (1-layer model, 240 samples, 8 clients, local backend)."""
    return copy.deepcopy(TINY)


@pytest.fixture
def tiny_scenario(tiny_raw):
    from fedsim.config import scenario_from_dict

    return scenario_from_dict(tiny_raw)


SHARED_RAY_CPUS = 6  # logical: the largest pool a test asks for (threads are pinned per worker)


def _start_shared_ray() -> None:
    """A local Ray instance started as fedsim starts one (its system config, its lean set of processes), with room
    for every test's pool: 6 logical CPUs and one logical GPU (fractional-GPU placement on a CPU machine)."""
    from fedsim.config import scenario_from_dict
    from fedsim.runtime.ray.pool import init_ray

    raw = copy.deepcopy(TINY)
    raw["resources"] = {"backend": "ray", "num_workers": SHARED_RAY_CPUS, "num_cpus": 1,
                        "num_gpus": 1 / SHARED_RAY_CPUS}
    init_ray(scenario_from_dict(raw))


@pytest.fixture
def ray_session(request):
    """A Ray instance shared by the tests that run on Ray in this process (fedsim joins a running instance, so each
    run saves starting and stopping one: ~4 s). After the test the instance must be idle again — every CPU and GPU
    free once the run's actors are gone —, or it is shut down, and the next test starts another. A test marked
    ``own_ray`` (it needs a head of its own: its processes, its environment, a cluster address) starts with no
    instance and leaves none."""
    import time

    import ray

    own = request.node.get_closest_marker("own_ray") is not None
    if own and ray.is_initialized():
        ray.shutdown()
    if not own and not ray.is_initialized():
        _start_shared_ray()
    yield
    if not ray.is_initialized():
        return
    if own:
        ray.shutdown()
        return
    deadline = time.monotonic() + 5.0
    while ray.available_resources() != ray.cluster_resources():
        if time.monotonic() > deadline:
            ray.shutdown()  # something of the test's still holds resources: start clean next time
            return
        time.sleep(0.1)
