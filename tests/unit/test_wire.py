"""What travels between the driver and the workers (fedsim/runtime/wire.py): every tensor dict of a payload or an
update — the adapter, an objective's uploads, a classifier's head — as one byte buffer, and back bit for bit."""

from __future__ import annotations

import pickle

import torch

from fedsim.runtime.wire import Packed, pack_tensors_of, unpack_tensors_of
from fedsim.types import ClientPayload, ClientUpdate, LoraSpec


def test_every_tensor_dict_of_an_update_travels_packed_and_comes_back_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    update = ClientUpdate(client_id=3, num_examples=7, lora=LoraSpec(4, 8.0),
                          tensors={"m.lora_A.weight": torch.randn(4, 6, generator=g),
                                   "m.lora_B.weight": torch.randn(6, 4, generator=g).bfloat16()},
                          metrics={"train/loss": 1.0}, extra={"scaffold.c": torch.randn(3, generator=g)},
                          head={"head.classifier.weight": torch.randn(2, 6, generator=g),
                                "head.classifier.bias": torch.zeros(2)})
    packed = pack_tensors_of(update)
    assert all(isinstance(getattr(packed, f), Packed) for f in ("tensors", "extra", "head"))
    back = unpack_tensors_of(pickle.loads(pickle.dumps(packed)))
    for field in ("tensors", "extra", "head"):
        want, got = getattr(update, field), getattr(back, field)
        assert sorted(want) == sorted(got)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
            got[k].add_(1)  # writable, and no longer the sender's memory
            assert not torch.equal(got[k], want[k])


def test_empty_and_absent_dicts_pass_through():
    payload = ClientPayload(tensors={}, lora=LoraSpec(4, 8.0), trainable=("A", "B"), fresh=True)
    assert payload.head is None
    assert unpack_tensors_of(pack_tensors_of(payload)) == payload
