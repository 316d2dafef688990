"""Pure tensor helpers for LoRA adapter dicts (no I/O, no devices beyond what the inputs carry).

Keys follow :mod:`fedsim.types`: ``<module>.lora_A.weight`` with A of shape (r, d_in) and ``<module>.lora_B.weight``
with B of shape (d_out, r). The low-rank update of a module is ``ΔW = s · B @ A`` of shape (d_out, d_in).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from fedsim.errors import AggregationError
from fedsim.types import ModuleShape, Tensors

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
# Keys of a client's second, personal adapter (PF2LoRA's (D_k, C_k), FedDPA's local adapter) carry this prefix in
# client results and in the client state store; they never appear in a payload or an update.
PERSONAL_PREFIX = "personal."
# Keys of a client objective's own state (fedsim.objectives: objective.<state_key>.<key>): neither adapter's.
OBJECTIVE_PREFIX = "objective."
# Keys of a model task's head trained in full beside the adapter (a classifier: head.<module>.<parameter>); they
# travel in ClientPayload.head / ClientUpdate.head, never among an adapter's factors.
HEAD_PREFIX = "head."
# Keys of a client-side update transform's state (fedsim.pipeline.transforms: transform.<state_key>.<key>, e.g. the
# error-feedback residual of compressed uploads): neither adapter's.
TRANSFORM_PREFIX = "transform."


def a_key(module: str) -> str:
    return module + A_SUFFIX


def b_key(module: str) -> str:
    return module + B_SUFFIX


def factor_of(key: str) -> str:
    """``"A"`` or ``"B"`` for an adapter key."""
    if key.endswith(A_SUFFIX):
        return "A"
    if key.endswith(B_SUFFIX):
        return "B"
    raise AggregationError(f"key {key!r} is not a LoRA factor (expected it to end in {A_SUFFIX} or {B_SUFFIX})")


def module_of(key: str) -> str:
    factor_of(key)
    return key[: -len(A_SUFFIX)]


def personal_key(key: str) -> str:
    """The state-store key of a personal-adapter tensor."""
    return PERSONAL_PREFIX + key


def split_personal(tensors: Tensors) -> tuple[Tensors, Tensors]:
    """(keys of the main adapter, keys of the personal adapter with the prefix removed); a client objective's or a
    transform's state and a head of its own (:func:`own_head`) are in neither."""
    main = {k: v for k, v in tensors.items()
            if not k.startswith((PERSONAL_PREFIX, OBJECTIVE_PREFIX, HEAD_PREFIX, TRANSFORM_PREFIX))}
    personal = {k[len(PERSONAL_PREFIX):]: v for k, v in tensors.items() if k.startswith(PERSONAL_PREFIX)}
    return main, personal


def own_head(personal: Tensors | None) -> Tensors | None:
    """The head a client keeps to itself in its state (a strategy that aggregates nothing: local-only training), or
    None when it keeps none."""
    head = {k: v for k, v in (personal or {}).items() if k.startswith(HEAD_PREFIX)}
    return head or None


def modules(tensors: Tensors) -> list[str]:
    """Sorted module paths present in an adapter dict."""
    return sorted({module_of(k) for k in tensors})


def init_adapter(shapes: dict[str, ModuleShape], rank: int, generator: torch.Generator) -> Tensors:
    """A fresh adapter initialised as PEFT does by default: A ~ kaiming-uniform(a=√5), B = 0.

    Args:
        shapes: module path → shape of the adapted linear layer.
        rank: LoRA rank r.
        generator: the source of randomness (seeded by the caller).

    Returns:
        ``{module.lora_A.weight: (r, d_in), module.lora_B.weight: (d_out, r)}`` in float32.
    """
    out: Tensors = {}
    for m in sorted(shapes):
        s = shapes[m]
        # kaiming_uniform_(a=sqrt(5)) on a (r, d_in) weight: bound = sqrt(6 / ((1 + a^2) * fan_in)) = 1/sqrt(d_in)
        bound = 1.0 / math.sqrt(s.d_in)
        a = torch.rand((rank, s.d_in), generator=generator, dtype=torch.float32) * (2 * bound) - bound
        out[a_key(m)] = a  # (r, d_in)
        out[b_key(m)] = torch.zeros((s.d_out, rank), dtype=torch.float32)  # (d_out, r)
    return out


def check_same_keys(dicts: Sequence[Tensors], what: str = "update") -> list[str]:
    """Raise :class:`AggregationError` unless every dict has the same keys and shapes; return the sorted keys."""
    if not dicts:
        raise AggregationError(f"no {what}s to aggregate")
    keys = sorted(dicts[0])
    for i, d in enumerate(dicts[1:], start=1):
        if sorted(d) != keys:
            missing = sorted(set(keys) - set(d))[:3]
            extra = sorted(set(d) - set(keys))[:3]
            raise AggregationError(f"{what} {i} has different keys (missing {missing}, unexpected {extra})")
        for k in keys:
            if d[k].shape != dicts[0][k].shape:
                raise AggregationError(
                    f"{what} {i}: {k} has shape {tuple(d[k].shape)}, expected {tuple(dicts[0][k].shape)}"
                )
    return keys


def normalized_weights(num_examples: Iterable[int | float]) -> torch.Tensor:
    """p_k = n_k / Σ n as float64 (summing in float64 keeps the weights exact enough for any client count)."""
    w = torch.tensor([float(n) for n in num_examples], dtype=torch.float64)
    if (w < 0).any() or not torch.isfinite(w).all():
        raise AggregationError("client weights must be finite and non-negative")
    total = w.sum()
    if total <= 0:
        raise AggregationError("client weights sum to zero: every update has num_examples == 0")
    return w / total


def weighted_average(dicts: Sequence[Tensors], weights: torch.Tensor, keys: Iterable[str] | None = None) -> Tensors:
    """Σ_k w_k · dicts[k][key] for each key, accumulated in float32 and cast back to the inputs' dtype."""
    keys = list(keys) if keys is not None else check_same_keys(dicts)
    out: Tensors = {}
    for key in keys:
        ref = dicts[0][key]
        acc = torch.zeros(ref.shape, dtype=torch.float32, device=ref.device)
        for w, d in zip(weights.tolist(), dicts):
            acc.add_(d[key].to(torch.float32), alpha=w)
        out[key] = acc.to(ref.dtype)
    return out


def delta_w(tensors: Tensors, module: str, scaling: float) -> torch.Tensor:
    """ΔW = s · B @ A for one module, in float32, shape (d_out, d_in)."""
    a = tensors[a_key(module)].to(torch.float32)  # (r, d_in)
    b = tensors[b_key(module)].to(torch.float32)  # (d_out, r)
    return scaling * (b @ a)


def num_params(tensors: Tensors) -> int:
    return sum(t.numel() for t in tensors.values())


def first_nonfinite(tensors: Tensors) -> str | None:
    """The first key (in the mapping's order) whose tensor holds a NaN or an Inf, or None.

    One fused norm over all the tensors first (a NaN or Inf makes its tensor's norm non-finite; 8× faster than one
    check per tensor at 500 updates); only tensors whose norm is not finite — which finite values can also reach, by
    overflow — are checked element by element."""
    keys = list(tensors)
    if not keys:
        return None
    try:
        norms = torch.stack(torch._foreach_norm([tensors[k] for k in keys]))
    except (RuntimeError, TypeError):  # mixed dtypes or devices, integer tensors: one tensor at a time
        suspects = keys
    else:
        suspects = [k for k, ok in zip(keys, torch.isfinite(norms).tolist()) if not ok]
    return next((k for k in suspects if not bool(torch.isfinite(tensors[k]).all())), None)


def num_bytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def sent_bytes(tensors: Tensors, wire: dict[str, int] | None) -> int:
    """The bytes ``tensors`` take on the wire: each one's encoded size where ``wire`` gives it, else its raw size."""
    wire = wire or {}
    return sum(wire[k] if k in wire else t.numel() * t.element_size() for k, t in tensors.items())


def pad_rank(tensors: Tensors, rank: int) -> Tensors:
    """Zero-pad every factor to ``rank``: A (r, d_in) → (rank, d_in), B (d_out, r) → (d_out, rank)."""
    out: Tensors = {}
    for k, t in tensors.items():
        r = t.shape[0] if factor_of(k) == "A" else t.shape[1]
        if r > rank:
            raise AggregationError(f"{k} has rank {r}, larger than the padding target {rank}")
        if r == rank:
            out[k] = t
        elif factor_of(k) == "A":
            out[k] = torch.cat([t, t.new_zeros(rank - r, t.shape[1])], dim=0)
        else:
            out[k] = torch.cat([t, t.new_zeros(t.shape[0], rank - r)], dim=1)
    return out


def truncate_rank(tensors: Tensors, rank: int) -> Tensors:
    """Keep the first ``rank`` components: A[:rank, :], B[:, :rank] (copies)."""
    return {k: (t[:rank, :] if factor_of(k) == "A" else t[:, :rank]).clone() for k, t in tensors.items()}


def scale_b(tensors: Tensors, factor: float) -> Tensors:
    """Multiply every B by ``factor`` (moves a LoRA scaling in or out of the factors); A is shared, not copied."""
    return {k: (t * factor if factor_of(k) == "B" else t) for k, t in tensors.items()}


def delta_modules(delta: Tensors) -> list[str]:
    """The modules a base update names (keys ``<module>.delta_B`` / ``.delta_A`` / ``.delta_W``)."""
    return sorted({k.rsplit(".delta_", 1)[0] for k in delta})


def stack(factors: Sequence[tuple[Tensors, float]], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking for one module: given (adapter, c_k) pairs, return B_s (d_out, Σr) and A_s (Σr, d_in) with
    B_s @ A_s = Σ_k c_k B_k A_k exactly (c_k is folded into B_k's block). Float32."""
    bs = [t[b_key(module)] for t, _ in factors]  # (d_out, r_k) each
    b_s = torch.cat(bs, dim=1).to(torch.float32)
    scale = torch.cat([torch.full((b.shape[1],), float(c), dtype=torch.float32) for b, (_, c) in zip(bs, factors)])
    b_s.mul_(scale[None, :])  # c_k on B_k's columns: one pass, no temporary per client
    a_s = torch.cat([t[a_key(module)] for t, _ in factors], dim=0).to(torch.float32)
    return b_s, a_s


def lowrank_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the product ``b @ a`` (d_out, R)·(R, d_in) without forming it when R is small:
    QR of both factors, then the SVD of an R×R core. Returns U (d_out, k), S (k,), Vh (k, d_in), k = min(R, d_out, d_in)."""
    b = b.to(torch.float64)
    a = a.to(torch.float64)
    r = b.shape[1]
    if r >= min(b.shape[0], a.shape[1]):
        u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
        return u.float(), s.float(), vh.float()
    qb, rb = torch.linalg.qr(b)  # (d_out, R), (R, R)
    qa, ra = torch.linalg.qr(a.T)  # (d_in, R), (R, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # core (R, R)
    return (qb @ u).float(), s.float(), (vh @ qa.T).float()


def orthonormal_completion(vh: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    """``vh`` (k, d) with orthonormal rows, extended to ``rows`` orthonormal rows (k ≤ rows ≤ d): the first k are
    ``vh``'s, the others span random directions orthogonal to them (Gram–Schmidt by QR, in float64)."""
    k, d = vh.shape
    if rows <= k:
        return vh
    if rows > d:
        raise ValueError(f"cannot find {rows} orthonormal rows in {d} dimensions")
    extra = torch.randn(d, rows - k, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([vh.to(torch.float64).T, extra], dim=1))  # (d, rows)
    return torch.cat([vh, q[:, k:].T.to(vh.dtype)], dim=0)


def singular_form(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``b @ a`` (d_out, R)·(R, d_in) as (U, S Vᵀ): U with orthonormal columns, the rows of the second factor
    orthogonal with norms S in decreasing order, and U (S Vᵀ) = b @ a (exact up to rounding). k = min(R, d_out, d_in)
    components.

    While R < min(d_out, d_in): QR of both factors and the SVD of the R×R core (never forming b @ a). Else the dense
    product and the eigendecomposition of its min(d)×min(d) Gram matrix (float64): far cheaper than an SVD of the
    dense matrix, and exact in the product because U is a complete orthonormal basis of the smaller side.
    """
    d_out, r, d_in = b.shape[0], b.shape[1], a.shape[1]
    if r < min(d_out, d_in):
        u, s, vh = lowrank_svd(b, a)
        return u, (s[:, None] * vh)
    return dense_singular_form(b.float() @ a.float())


def product_sum(factors: Sequence[tuple[Tensors, float]], module: str, chunk: int = 64) -> torch.Tensor:
    """Σ_k c_k B_k A_k for one module, dense (d_out, d_in) float32: GEMMs over chunks of clients' stacked factors
    (the cost of one big GEMM, without holding all the stacked factors at once)."""
    out = None
    for i in range(0, len(factors), chunk):
        b_s, a_s = stack(factors[i: i + chunk], module)
        out = b_s @ a_s if out is None else out.addmm_(b_s, a_s)
    return out


def dense_singular_form(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`singular_form` of a dense (d_out, d_in) matrix: the eigendecomposition (float64) of its smaller Gram
    matrix gives an orthonormal basis U of that side, sorted by singular value, and ΔW = U (Uᵀ ΔW) holds to float32
    rounding whatever the eigenvectors' accuracy (U is a complete orthonormal basis)."""
    dense = dense.float()
    d_out, d_in = dense.shape
    if d_out <= d_in:
        _, evecs = torch.linalg.eigh(dense @ dense.T)  # ascending
        u = evecs.flip(1).float().contiguous()
        return u, u.T @ dense
    _, evecs = torch.linalg.eigh(dense.T @ dense)  # (d_in, d_in): ΔW = (ΔW V) Vᵀ
    v = evecs.flip(1).float()
    us = dense @ v  # orthogonal columns, norms S
    s = us.norm(dim=0)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return (us / safe).contiguous(), s[:, None] * v.T


def per_module(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, the items side by side on as many threads as torch uses, each single-threaded
    (LAPACK releases the GIL): a small factorization runs whole on one core instead of two cores sharing it.
    Measured on 2 cores, 28 eigendecompositions of 512 × 512: 0.27 s against 0.35 s one after another on two
    threads each (and 0.44 s with two threads each side by side); on a busy machine 0.9 s against 2.6–7.5 s. The
    order is kept and each call is independent. (The thread count is process-wide: torch runs nothing else meanwhile
    where this is called — between rounds, or in the server actor's one method at a time.)"""
    threads = torch.get_num_threads()
    workers = min(len(items), threads)
    if workers <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def product_norms_sq(tensors: Tensors) -> float:
    """Σ over modules of ‖B A‖_F² without forming any B A: Σ (BᵀB) ⊙ (A Aᵀ) from r×r Gram matrices, the modules of
    one shape in one batched pair of Gram products (an update's 28 modules cost ~6 kernels instead of ~140; HETLoRA
    weighs every update by it)."""
    groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for m in modules(tensors):
        b, a = tensors[b_key(m)], tensors[a_key(m)]
        bs, as_ = groups.setdefault((tuple(b.shape), tuple(a.shape)), ([], []))
        bs.append(b)
        as_.append(a)
    total = 0.0
    for bs, as_ in groups.values():
        b, a = torch.stack(bs).float(), torch.stack(as_).float()
        total += float((b.transpose(1, 2) @ b).mul_(a @ a.transpose(1, 2)).sum())
    return total
