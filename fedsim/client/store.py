"""Client state store: persistent per-client tensors (personal adapters, quantization-aware adapters, optimizer
state) keyed by client id, for hundreds to thousands of virtual clients.

States live in memory up to ``budget_bytes`` (least recently used first out); beyond it they are written to one
safetensors file per client under ``directory`` and read back on demand, so memory never grows with the number of
registered clients beyond the budget. Reads return copies: callers can never mutate a stored state in place.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedsim.errors import ScenarioError
from fedsim.types import Tensors


def _nbytes(state: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class ClientStateStore:
    """Per-client tensor dicts in memory up to a byte budget, spilled to safetensors files beyond it.

    Args:
        directory: where spilled states go (created; must be writable).
        budget_bytes: the most bytes of state held in memory.

    Raises:
        ScenarioError: the directory cannot be created or written.
    """

    def __init__(self, directory: str | Path, budget_bytes: int = 256 * 2**20):
        self.directory = Path(directory)
        self.budget_bytes = int(budget_bytes)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ScenarioError("clients.state_dir", f"cannot write client state to {self.directory}: {e.strerror}",
                                "point it at a writable directory") from None
        self._memory: OrderedDict[int, Tensors] = OrderedDict()
        self._memory_bytes = 0
        self._on_disk: set[int] = set()
        self.num_spilled = 0

    def _path(self, client_id: int) -> Path:
        return self.directory / f"client_{int(client_id)}.safetensors"

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._memory or client_id in self._on_disk

    def __len__(self) -> int:
        return len(self._memory) + len(self._on_disk - set(self._memory))

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    def put(self, client_id: int, state: Tensors) -> None:
        """Store a copy of ``state`` (CPU, contiguous) for ``client_id``, replacing any previous one."""
        copy = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        self._drop_memory(client_id)
        self._memory[client_id] = copy
        self._memory_bytes += _nbytes(copy)
        self._evict()

    def get(self, client_id: int) -> Tensors | None:
        """A copy of the client's state, or None if it has none."""
        if client_id in self._memory:
            self._memory.move_to_end(client_id)
            return {k: v.clone() for k, v in self._memory[client_id].items()}
        if client_id in self._on_disk:
            return load_file(str(self._path(client_id)))
        return None

    def _drop_memory(self, client_id: int) -> None:
        old = self._memory.pop(client_id, None)
        if old is not None:
            self._memory_bytes -= _nbytes(old)

    def _evict(self) -> None:
        while self._memory_bytes > self.budget_bytes and self._memory:
            client_id, state = self._memory.popitem(last=False)
            self._memory_bytes -= _nbytes(state)
            tmp = self._path(client_id).with_suffix(".tmp")
            save_file(state, str(tmp))
            os.replace(tmp, self._path(client_id))
            self._on_disk.add(client_id)
            self.num_spilled += 1

    def flush(self) -> None:
        """Write every in-memory state to disk too (for checkpoints); memory is kept."""
        for client_id, state in self._memory.items():
            tmp = self._path(client_id).with_suffix(".tmp")
            save_file(state, str(tmp))
            os.replace(tmp, self._path(client_id))
            self._on_disk.add(client_id)

    @classmethod
    def open(cls, directory: str | Path, budget_bytes: int = 256 * 2**20) -> ClientStateStore:
        """A store over a directory written earlier (e.g. by :meth:`flush` before a checkpoint)."""
        store = cls(directory, budget_bytes)
        for f in store.directory.glob("client_*.safetensors"):
            store._on_disk.add(int(f.stem.split("_", 1)[1]))
        return store

    def __repr__(self) -> str:
        return (f"ClientStateStore({len(self)} clients, {self._memory_bytes} B in memory of {self.budget_bytes}, "
                f"{len(self._on_disk)} on disk)")
