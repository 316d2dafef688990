import numpy as np
import pytest
import torch

from fedsim.data.datasets import load_data
from fedsim.errors import BackendError
from fedsim.lora import ops
from fedsim.runtime.worker import ClientJob, Worker
from fedsim.types import ClientPayload, ClientSpec, LoraSpec


def test_worker_merges_base_updates_in_place_once(tiny_scenario):
    w = Worker(tiny_scenario, load_data(tiny_scenario))
    host = w.host()
    lora = LoraSpec(2, 4.0)
    host.activate(lora)
    module = "model.layers.0.self_attn.q_proj"
    before = host.base_weight(module).clone()
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(32, 3, generator=g), torch.randn(3, 32, generator=g)
    dense = torch.randn(32, 32, generator=g)
    w.apply_base_delta(1, {f"{module}.delta_B": b, f"{module}.delta_A": a})
    w.apply_base_delta(2, {f"{module}.delta_W": dense})
    w.apply_base_delta(2, {f"{module}.delta_W": dense})  # a replay is ignored
    torch.testing.assert_close(host.base_weight(module), before + b @ a + dense)
    with pytest.raises(BackendError, match="before 3"):
        w.apply_base_delta(4, {f"{module}.delta_W": dense})
    assert w.num_builds == 1 and host.num_wraps == 1
    # a fresh adapter is trained on the merged base; payloads must name the worker's base version
    job = ClientJob(ClientSpec(0, 30, lora), np.arange(30), server_round=3)
    res, up = w.run_client(job, ClientPayload(tensors={}, lora=lora, base_version=2, fresh=True))
    assert sorted(up.tensors) == sorted(host.params(lora)) and res.metrics["train/steps"] == 3
    with pytest.raises(BackendError, match="base version 1"):
        w.run_client(job, ClientPayload(tensors={}, lora=lora, base_version=1, fresh=True))


def test_fresh_adapters_are_seeded_per_client_and_round(tiny_scenario):
    w = Worker(tiny_scenario, load_data(tiny_scenario))
    lora = LoraSpec(2, 4.0)
    fresh = ClientPayload(tensors={}, lora=lora, fresh=True)
    ups = {}
    for cid, rnd in [(0, 1), (0, 1), (1, 1), (0, 2)]:
        _, up = w.run_client(ClientJob(ClientSpec(cid, 30, lora), np.arange(30), rnd), fresh)
        ups.setdefault((cid, rnd), []).append(up.tensors)
    k = ops.a_key("model.layers.0.self_attn.q_proj")
    assert torch.equal(ups[(0, 1)][0][k], ups[(0, 1)][1][k])
    assert not torch.equal(ups[(0, 1)][0][k], ups[(1, 1)][0][k])
    assert not torch.equal(ups[(0, 1)][0][k], ups[(0, 2)][0][k])
