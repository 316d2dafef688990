"""Compact transport of tensor dicts between processes.

A dict of tensors becomes one contiguous ``uint8`` numpy buffer plus an index, which Ray serializes out of band
(zero-copy from the object store) instead of pickling every tensor separately — with many clients per round that
per-tensor cost dominated aggregation. Any dtype travels (bf16 included) since only raw bytes are moved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.types import Tensors


@dataclass(frozen=True)
class Packed:
    """Tensors packed into one byte buffer. ``index`` holds (key, dtype name, shape, byte offset, byte length)."""

    buffer: np.ndarray
    index: tuple[tuple[str, str, tuple[int, ...], int, int], ...]


def pack(tensors: Tensors) -> Packed:
    """One contiguous CPU byte buffer holding every tensor."""
    parts, index, offset = [], [], 0
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8)
        parts.append(raw)
        index.append((key, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, raw.numel()))
        offset += raw.numel()
    buffer = torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.uint8)
    return Packed(buffer=buffer, index=tuple(index))


def unpack(packed: Packed) -> Tensors:
    """Tensors viewing one private, writable copy of the buffer (the transported one may be read-only)."""
    flat = torch.from_numpy(np.array(packed.buffer, copy=True))
    out: Tensors = {}
    for key, dtype, shape, offset, nbytes in packed.index:
        out[key] = flat[offset : offset + nbytes].view(getattr(torch, dtype)).view(shape)
    return out


FIELDS = ("tensors", "extra", "head")  # the tensor dicts of payloads, updates and server states that travel packed


def pack_tensors_of(obj: Any) -> Any:
    """A copy of a dataclass (payload, update, server state) whose tensor dicts (:data:`FIELDS`: the adapter, an
    objective's uploads, a model task's head) are packed; empty or absent ones stay as they are."""
    changes = {f: pack(v) for f in FIELDS if isinstance(v := getattr(obj, f, None), dict) and v}
    return dataclasses.replace(obj, **changes) if changes else obj


def unpack_tensors_of(obj: Any) -> Any:
    """Inverse of :func:`pack_tensors_of` (fields that are not packed pass through)."""
    changes = {f: unpack(v) for f in FIELDS if isinstance(v := getattr(obj, f, None), Packed)}
    return dataclasses.replace(obj, **changes) if changes else obj
