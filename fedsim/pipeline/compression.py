"""Compressed communication (``compression``): what a client uploads, and what the server broadcasts, encoded.

Each shared tensor travels as its *change* from the values the client started the round from (the payload the server
sent it, which the server knows): Δ = sent − start. The change is encoded by a :class:`Codec`, the receiver decodes it
and adds the start back — so the factors arrive as start + Δ̂. Encoding the change rather than the factor keeps the
quantization grid on the round's small steps.

- ``fp16`` / ``bf16``: Δ in half precision (round to nearest: off by at most half a unit in the last place).
- ``int8`` / ``int4``: Δ in blocks of ``block_size`` values, each block's min and step (float32) and one code per
  value, rounded *stochastically* — up with probability equal to the remainder — so that E[Δ̂] = Δ (unbiased; QSGD's
  argument, Alistarh et al. 2017). Codes of 4 bits go two to a byte.
- ``topk``: the largest ``topk_fraction`` of each tensor's entries (by magnitude), as their positions (int32 indices,
  or a bitmap where that is smaller) and their float32 values. With error feedback (Karimireddy et al. 2019, EF-SGD)
  the client keeps what it did not send, r = (Δ + r_prev) − Δ̂, in the client state store, and adds it next round.

The wire format is fixed by the tensor's size and the codec alone (the receiver knows both), so no header travels:
:meth:`Encoded.to_bytes` is exactly :attr:`Encoded.nbytes` bytes, and :meth:`Codec.from_bytes` reads it back. The
upload's bytes (``comm/up_bytes``, and the simulated clock) are these sizes.

With differential privacy, the client's clipping and noise (``privacy.mode: local``) run before compression, which is
post-processing of the privatized update: the accountant's ε holds unchanged. With central privacy the server clips
what arrives (start + Δ̂), so each client's contribution is bounded by C whatever the codec did, and the accountant's
sensitivity holds too; an error-feedback residual never leaves its client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from fedsim.lora import ops
from fedsim.pipeline.stages import ServerStage
from fedsim.pipeline.transforms import Sent, TransformContext, UpdateTransform
from fedsim.types import ClientPayload, GlobalState, RoundContext, Tensors

UPLOADS = ("fp16", "bf16", "int8", "int4", "topk")
BROADCASTS = ("fp16", "bf16", "int8", "int4")
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
_BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class Encoded:
    """One tensor on the wire: its arrays in the order they are sent (see :meth:`Codec.layout`)."""

    method: str
    shape: tuple[int, ...]
    arrays: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.arrays)

    def to_bytes(self) -> bytes:
        """The bytes sent: the arrays one after another, little-endian, nothing else."""
        return b"".join(a.contiguous().flatten().view(torch.uint8).numpy().tobytes() for a in self.arrays)


@dataclass(frozen=True)
class Codec:
    """How a tensor of changes is encoded (``method``: one of :data:`UPLOADS`).

    Args:
        block_size: values per block of ``int8`` / ``int4`` (each block sends its own min and step).
        fraction: ``topk``'s share of each tensor's entries kept.
    """

    method: str
    block_size: int = 1024
    fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in UPLOADS:
            raise ValueError(f"unknown compression {self.method!r}; use one of {', '.join(UPLOADS)}")

    def kept(self, numel: int) -> int:
        """``topk``: how many entries of a tensor of ``numel`` are sent."""
        return min(numel, max(1, math.ceil(self.fraction * numel)))

    def layout(self, numel: int) -> list[tuple[torch.dtype, int]]:
        """The arrays a tensor of ``numel`` values travels as: (dtype, length) each, in order."""
        if self.method in _HALF:
            return [(_HALF[self.method], numel)]
        if self.method in _BITS:
            blocks = -(-numel // self.block_size)
            codes = numel if _BITS[self.method] == 8 else -(-numel // 2)
            return [(torch.uint8, codes), (torch.float32, blocks), (torch.float32, blocks)]
        k = self.kept(numel)
        where = (torch.uint8, -(-numel // 8)) if -(-numel // 8) < 4 * k else (torch.int32, k)  # bitmap or indices
        return [where, (torch.float32, k)]

    def wire_bytes(self, numel: int) -> int:
        return sum(_itemsize(d) * n for d, n in self.layout(numel))

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Encoded:
        """``x`` (any float dtype) encoded; ``generator`` draws the stochastic rounding."""
        flat = x.detach().to(torch.float32).flatten()
        if self.method in _HALF:
            arrays: tuple[torch.Tensor, ...] = (flat.to(_HALF[self.method]),)
        elif self.method in _BITS:
            arrays = self._quantize(flat, _BITS[self.method], generator)
        else:
            arrays = self._top(flat)
        return Encoded(self.method, tuple(x.shape), arrays)

    def _quantize(self, flat: torch.Tensor, bits: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        n, levels, size = flat.numel(), 2**bits - 1, self.block_size
        blocks = -(-n // size)
        padded = torch.cat([flat, flat[-1:].expand(blocks * size - n)]).view(blocks, size)  # the last value repeats
        lo, hi = padded.amin(1), padded.amax(1)
        step = (hi - lo) / levels
        step = torch.where(step > 0, step, torch.ones_like(step))  # a constant block: every code 0, decoded as lo
        scaled = (padded - lo[:, None]) / step[:, None]
        noise = torch.rand(scaled.shape, generator=generator)
        codes = torch.floor(scaled + noise).clamp_(0, levels).to(torch.uint8).flatten()[:n]
        if bits == 4:
            codes = torch.cat([codes, codes.new_zeros(n % 2)])
            codes = codes[0::2] | (codes[1::2] << 4)
        return codes, lo, step

    def _top(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, k = flat.numel(), self.kept(flat.numel())
        idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        values = flat[idx]
        if self.layout(n)[0][0] == torch.int32:
            return idx.to(torch.int32), values
        mask = np.zeros(n, dtype=bool)
        mask[idx.numpy()] = True
        return torch.from_numpy(np.packbits(mask, bitorder="little")), values

    def decode(self, enc: Encoded) -> torch.Tensor:
        """The float32 values ``enc`` stands for, in its shape."""
        n = math.prod(enc.shape)
        if self.method in _HALF:
            flat = enc.arrays[0].to(torch.float32)
        elif self.method in _BITS:
            codes, lo, step = enc.arrays
            if _BITS[self.method] == 4:
                codes = torch.stack([codes & 15, codes >> 4], 1).flatten()[:n]
            size, blocks = self.block_size, lo.numel()
            q = torch.cat([codes, codes.new_zeros(blocks * size - n)]).view(blocks, size).to(torch.float32)
            flat = (lo[:, None] + q * step[:, None]).flatten()[:n]
        else:
            where, values = enc.arrays
            idx = where.to(torch.int64) if where.dtype == torch.int32 else torch.from_numpy(
                np.flatnonzero(np.unpackbits(where.numpy(), count=n, bitorder="little")))
            flat = torch.zeros(n, dtype=torch.float32)
            flat[idx] = values
        return flat.view(enc.shape)

    def from_bytes(self, data: bytes, shape: tuple[int, ...]) -> Encoded:
        """The :class:`Encoded` that :meth:`Encoded.to_bytes` sent for a tensor of ``shape``."""
        arrays, at = [], 0
        for dtype, count in self.layout(math.prod(shape)):
            size = _itemsize(dtype) * count
            if at + size > len(data):
                raise ValueError(f"{len(data)} bytes are too few for a {self.method} tensor of shape {shape}")
            arrays.append(torch.frombuffer(bytearray(data[at:at + size]), dtype=torch.uint8).view(dtype))
            at += size
        if at != len(data):
            raise ValueError(f"{len(data) - at} bytes left over after a {self.method} tensor of shape {shape}")
        return Encoded(self.method, tuple(shape), tuple(arrays))


def _itemsize(dtype: torch.dtype) -> int:
    return (torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)).bits // 8


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng(list(key)).integers(2**62)))


def encode_changes(codec: Codec, tensors: Tensors, start: Tensors, residual: Tensors | None,
                   generator: torch.Generator) -> tuple[Tensors, Tensors, dict[str, int], float]:
    """Each tensor as the receiver rebuilds it — start + decoded (Δ + residual) — in its own dtype; the new residuals
    (what was not sent: (Δ + residual) − decoded); each tensor's bytes on the wire; the relative error ‖Δ̂ − Δ‖ / ‖Δ‖ of
    the whole update (0 for no change). Keys in sorted order, so the draws do not depend on the mapping's order."""
    out, left, nbytes, err, norm = {}, {}, {}, 0.0, 0.0
    for k in sorted(tensors):
        v = tensors[k]
        s = start[k].to(torch.float32) if k in start else torch.zeros(v.shape)
        change = v.to(torch.float32) - s
        if residual is not None and k in residual:
            change = change + residual[k]
        dec = codec.decode(codec.encode(change, generator))
        left[k] = change - dec
        out[k] = (s + dec).to(v.dtype)
        nbytes[k] = codec.wire_bytes(v.numel())
        err += float(left[k].double().square().sum())
        norm += float(change.double().square().sum())
    return out, left, nbytes, math.sqrt(err / norm) if norm > 0 else 0.0


@dataclass(frozen=True)
class CompressUpload(UpdateTransform):
    """Each client's shared tensors encoded by ``codec`` for upload (``compression.upload``), the last client-side
    transform; with ``error_feedback`` the client keeps what it did not send (its state in the client state store,
    ``transform.compression.<key>``), and a non-finite update is sent without touching it. Reports
    ``compress/rel_error`` (‖Δ̂ − Δ‖ / ‖Δ‖, Δ with the residual carried in)."""

    codec: Codec
    error_feedback: bool = False

    state_key: ClassVar[str | None] = "compression"
    sees_head: ClassVar[bool] = True  # a classifier's head travels compressed too
    metric_keys: ClassVar[tuple[str, ...]] = ("compress/rel_error",)
    round_metrics: ClassVar[tuple[str, ...]] = metric_keys

    @property
    def keeps_state(self) -> bool:
        return self.error_feedback

    def __call__(self, tensors: Tensors, ctx: TransformContext) -> Sent:
        if ops.first_nonfinite(tensors) is not None:  # corrupt: rejected by the server; the residual stays
            wire = {k: self.codec.wire_bytes(v.numel()) for k, v in tensors.items()}
            return Sent(tensors, {"compress/rel_error": float("nan")}, wire=wire)
        gen = _generator(ctx.seed, ctx.server_round, ctx.client_id, ctx.attempt, 61)
        residual = ctx.state if self.error_feedback else None
        out, left, wire, rel = encode_changes(self.codec, tensors, ctx.start or {}, residual, gen)
        return Sent(out, {"compress/rel_error": rel}, wire=wire, state=left if self.error_feedback else None)


class CompressBroadcast(ServerStage):
    """The server's broadcast encoded by ``codec`` (``compression.download``): each distinct payload's adapter
    tensors (and the global head, where the model task trains one), as changes from zero, rounded stochastically from (seed, round, the payload's place in the round — in an
    asynchronous run, the client start it is for); the clients start from the decoded values, and download the
    encoded bytes (``comm/down_bytes``)."""

    def __init__(self, codec: Codec, seed: int):
        self.codec, self.seed = codec, seed
        self._round, self._count = -1, 0

    def configure(self, ctx: RoundContext, state: GlobalState, payload: ClientPayload) -> ClientPayload:
        if not payload.tensors and not payload.head:  # a fresh adapter, no head: nothing to download
            return payload
        if ctx.server_round != self._round:
            self._round, self._count = ctx.server_round, 0
        self._count += 1
        place = ctx.asynchronous.task if ctx.asynchronous is not None else self._count
        gen = _generator(self.seed, ctx.server_round, place, 67)
        out, _, nbytes, _ = encode_changes(self.codec, {**payload.tensors, **(payload.head or {})}, {}, None, gen)
        head = {k: out.pop(k) for k in payload.head} if payload.head else payload.head
        return replace(payload, tensors=out, head=head, wire=nbytes)
