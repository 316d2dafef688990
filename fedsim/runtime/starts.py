"""Where a client's adapters start a round: the payload's tensors, then the client's own private ones; keys neither
gives (a client's first visit, a fresh adapter) start as PEFT initialises them, seeded by (seed, round, client)."""

from __future__ import annotations

import numpy as np
import torch

from fedsim.lora import ops
from fedsim.lora.ops import init_adapter, split_personal
from fedsim.models.adapters import AdapterHost
from fedsim.runtime.bases import BaseCache
from fedsim.types import FULL, ClientJob, ClientPayload, ModuleShape, QuantSpec, Tensors


def head_of(payload: ClientPayload, personal: Tensors | None) -> Tensors | None:
    """The head a client starts from: its own when it keeps one (:func:`~fedsim.lora.ops.own_head`), else the
    payload's (None: the base's initial head)."""
    return ops.own_head(personal) or payload.head


class AdapterStarts:
    """The adapters a client starts from.

    Args:
        seed: the scenario seed.
        bases: the worker's bases (a quantization-aware adapter's LoftQ start reads their quantization error).
    """

    def __init__(self, seed: int, bases: BaseCache):
        self.seed, self.bases = seed, bases

    def seeded_init(self, shapes: dict[str, ModuleShape], rank: int, *key: int) -> Tensors:
        """PEFT's initialisation (A random, B = 0) from a generator seeded by (seed, *key)."""
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, *key]).integers(2**62)))
        return init_adapter(shapes, rank, gen)

    def initial(self, shapes: dict[str, ModuleShape], payload: ClientPayload, client_id: int | None,
                personal: Tensors | None) -> Tensors:
        """The main adapter a client starts from: payload tensors, then its own private ones; keys neither gives (a
        client's first visit) start as PEFT does — B = 0, A random — seeded by (seed, client)."""
        own, _ = split_personal(personal or {})
        tensors = dict(payload.tensors)
        tensors.update(own)
        missing = {k for m in shapes for k in (ops.a_key(m), ops.b_key(m))} - set(tensors)
        if missing:
            init = self.seeded_init(shapes, payload.lora.rank, *([7] + ([client_id] if client_id is not None else [])))
            tensors.update({k: init[k] for k in missing})
        return tensors

    def fresh(self, shapes: dict[str, ModuleShape], payload: ClientPayload, job: ClientJob) -> Tensors:
        """A new adapter, initialised here as PEFT does, seeded by (seed, round, client)."""
        return self.seeded_init(shapes, payload.lora.rank, job.server_round, job.spec.client_id, 5)

    def load(self, host: AdapterHost, payload: ClientPayload, client_id: int | None, personal: Tensors | None,
             quant: QuantSpec = FULL) -> None:
        """Payload tensors, then the client's personal ones (:meth:`initial`); the same for the personal adapter."""
        host.load(payload.lora, self.initial(host.shapes(payload.lora), payload, client_id, personal))
        host.load_head(head_of(payload, personal))
        self.load_personal(host, payload, client_id, personal, quant)

    def load_personal(self, host: AdapterHost, payload: ClientPayload, client_id: int | None,
                      personal: Tensors | None, quant: QuantSpec = FULL) -> None:
        """The client's personal adapter (two-level methods): its own, or on its first visit a seeded PEFT start —
        or with ``personal_init: loftq``, the truncated SVD of its base's quantization error."""
        if payload.personal_lora is None:
            return
        _, tensors = split_personal(personal or {})
        if not tensors:  # the client's first visit
            if payload.personal_init == "loftq":
                tensors = self.bases.loftq_init(host, quant, payload.personal_lora)
            else:
                tensors = self.seeded_init(host.shapes(payload.lora), payload.personal_lora.rank, 9,
                                           -1 if client_id is None else client_id)
        host.load(payload.personal_lora, tensors, personal=True)
