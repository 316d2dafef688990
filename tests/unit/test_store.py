import pytest
import torch

from fedsim.client.store import ClientStateStore
from fedsim.errors import ScenarioError


def _state(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"x.lora_B.weight": torch.randn(16, 8, generator=g), "x.lora_A.weight": torch.randn(8, 16, generator=g)}


def test_round_trip_and_copies(tmp_path):
    store = ClientStateStore(tmp_path / "s", budget_bytes=10**6)
    s = _state(0)
    store.put(7, s)
    s["x.lora_A.weight"].zero_()  # mutating the caller's dict does not reach the store
    got = store.get(7)
    assert torch.equal(got["x.lora_B.weight"], _state(0)["x.lora_B.weight"])
    assert torch.equal(got["x.lora_A.weight"], _state(0)["x.lora_A.weight"])
    got["x.lora_B.weight"].zero_()  # nor does mutating what get() returned
    assert torch.equal(store.get(7)["x.lora_B.weight"], _state(0)["x.lora_B.weight"])
    assert store.get(8) is None and 7 in store and 8 not in store


def test_spills_beyond_budget_and_reads_back_exactly(tmp_path):
    per_client = 2 * 16 * 8 * 4  # bytes of one state
    store = ClientStateStore(tmp_path / "s", budget_bytes=10 * per_client)
    for i in range(1000):
        store.put(i, _state(i))
        assert store.memory_bytes <= 10 * per_client  # memory never grows with registered clients
    assert len(store) == 1000 and store.num_spilled >= 990
    assert len(list((tmp_path / "s").glob("client_*.safetensors"))) >= 990
    for i in (0, 1, 500, 989, 999):
        got = store.get(i)
        assert all(torch.equal(got[k], v) for k, v in _state(i).items())
    # an update of a spilled client wins over its old file
    store.put(3, _state(42))
    assert torch.equal(store.get(3)["x.lora_A.weight"], _state(42)["x.lora_A.weight"])


def test_flush_and_reopen(tmp_path):
    store = ClientStateStore(tmp_path / "s")
    for i in range(5):
        store.put(i, _state(i))
    store.flush()
    again = ClientStateStore.open(tmp_path / "s")
    assert len(again) == 5 and torch.equal(again.get(4)["x.lora_B.weight"], _state(4)["x.lora_B.weight"])


def test_unwritable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ScenarioError, match="cannot write client state"):
        ClientStateStore(blocker / "states")
