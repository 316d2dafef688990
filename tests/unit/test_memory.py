"""The memory estimate before round 1 (#50 point 3): its parts follow the aggregation path the run takes, what stays
bounded stays bounded, and a run that would not fit is told which part to shrink and how."""

import copy

import pytest

from fedsim.components import resolve
from fedsim.config import scenario_from_dict
from fedsim.federation.prepare import prepare
from fedsim.memory import MB, MemoryEstimate, estimate


def _estimate(tiny_raw, per_round, **resources):
    raw = copy.deepcopy(tiny_raw)
    raw["clients"].update(num_clients=max(per_round, 8), per_round=per_round)
    raw["partition"] = {"method": "iid"}
    raw["data"]["synthetic"]["num_train"] = 20 * max(per_round, 8)
    raw["resources"].update(backend="ray", num_workers=2, **resources)
    sc = scenario_from_dict(raw)
    prep = prepare(sc)
    upload = sum(prep.spec.lora.rank * (s.d_in + s.d_out) * 4 for s in prep.spec.shapes.values())  # FedIT's: A, B
    return estimate(sc, prep, resolve(sc)), upload


def test_the_estimate_follows_the_path_and_what_streams_stays_bounded(tiny_raw):
    """FedIT by default folds on the workers; with worker_partials false the server folds each update as it comes;
    either way the object store holds a few updates per worker, at 10 clients a round as at 200."""
    stores = []
    for per_round in (10, 200):
        default, upload = _estimate(tiny_raw, per_round)
        fed, _ = _estimate(tiny_raw, per_round, worker_partials=False, clients_per_call=1)
        assert default.path == "partials" and fed.path == "fed"
        assert default.store["partials"] == 2 * 2 * upload  # two workers' float64 partials
        assert default.worker["its partial"] == 2 * upload
        # (depth + 1) × workers × 1 a call, and one being written per worker
        assert fed.store["updates waiting"] == min(per_round, 3 * 2 + 2) * upload
        assert "gathered updates" not in fed.server
        for est in (default, fed):  # the server's process maps the store's pages it reads
            assert est.server["object-store pages it maps"] == pytest.approx(1.25 * sum(est.store.values()))
        stores.append((sum(default.store.values()), sum(fed.store.values())))
    assert stores[1][0] <= 1.5 * stores[0][0] and stores[1][1] <= 1.5 * stores[0][1]


def test_a_gathered_round_grows_with_the_clients_and_says_so(tiny_raw):
    tiny_raw["strategy"] = {"name": "fedit", "robust": {"method": "median"}}
    gathered, upload = _estimate(tiny_raw, 40)
    assert gathered.path == "gathered"
    assert gathered.store["gathered updates"] == gathered.server["gathered updates"] == 40 * upload
    said = gathered.warning(node_bytes=int(gathered.total * 0.5))
    assert said.startswith("memory: the run may need") and "runtime" in said  # tiny: the runtimes dominate
    assert gathered.warning(node_bytes=int(gathered.total * 2)) is None


@pytest.mark.parametrize(("part", "fix"), [
    ("gathered updates", "fewer clients.per_round"), ("base (float32)", "quantized bases"),
    ("activations", "training.batch_size"), ("base updates kept", "fewer rounds")])
def test_the_warning_names_the_largest_part_and_its_fix(part, fix):
    where = "server" if part in ("gathered updates", "base updates kept") else "worker"
    est = MemoryEstimate(worker={"runtime": 400 * MB}, server={"runtime": 400 * MB}, store={}, workers=2)
    getattr(est, where)[part] = 10_000 * MB
    said = est.warning(node_bytes=4_000 * MB)
    assert part in said and fix in said, said


def test_a_gpu_run_counts_the_bases_and_training_on_the_gpu_not_in_host_memory(tiny_raw):
    on_cpu, _ = _estimate(tiny_raw, 10)
    on_gpu, _ = _estimate(tiny_raw, 10, num_gpus=0.5)
    moved = {k for k in on_cpu.worker if k.startswith("base (")} | {"adapter and optimizer", "activations"}
    assert {k for k in on_gpu.gpu if not k.startswith("base (")} == {"adapter and optimizer", "activations"}
    assert "base (bfloat16)" in on_gpu.gpu  # dtype auto on a GPU
    assert set(on_gpu.worker) == set(on_cpu.worker) - moved
    assert on_gpu.total == pytest.approx(on_cpu.total - 2 * sum(on_cpu.worker[k] for k in moved))
    assert any(line.startswith("on each worker's GPU share ~") for line in on_gpu.lines())
