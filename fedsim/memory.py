"""What a run will hold in memory, estimated before round 1 (``fedsim validate`` and the run's first lines).

Per process and for Ray's object store, from the model's shapes (a build on the meta device, cached), the clients'
ranks and bit widths, the strategy and the aggregation path the run takes (:class:`~fedsim.components.Components`):

- a **worker**: its runtime (Python, torch, transformers, Ray: measured), the base model in the model's dtype plus
  one copy per quantized bit width it trains, the adapter with its gradient and optimizer state, a batch's
  activations, the updates a training call holds;
- the **server** (the driver, or its own actor): its runtime, the global state (with the base updates FLoRA and
  FedEx-LoRA keep every round), the running sums of the round and the update or partial it reads at a time — or,
  where the round is gathered, every update of it;
- the **object store**: the round's payload, and the updates waiting for the server — a partial per worker, a window
  of a few calls per worker, or the whole round.

The constants are measured (``benchmarks/server_memory.py`` prints each estimate beside the peak it measures); the
estimate is for planning — which path, how many clients per round, whether it fits —, not an allocator's account.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

MB = 2**20
# resident memory of the processes' own code and libraries, measured on the tiny model (Python, torch, transformers'
# model code, Ray's core worker; benchmarks/vs_flower.py and benchmarks/server_memory.py)
WORKER_RUNTIME = 450 * MB
SERVER_RUNTIME = 370 * MB
# the store's pages the server's process has touched by a round's end, per byte of the store's peak: it reads every
# update or partial and writes the payloads, and the store's allocator places them on other pages as objects come
# and go (benchmarks/server_memory.py: 1.0-1.3x on every path)
STORE_PAGES = 1.25
ADAM_BYTES = 16  # a trainable float32 parameter: itself, its gradient, AdamW's two moments (SGD: 8)


@dataclass
class MemoryEstimate:
    """Bytes by part: one worker's (the largest), the server's, the object store's; the path the round takes."""

    worker: dict[str, float] = field(default_factory=dict)
    gpu: dict[str, float] = field(default_factory=dict)  # a worker's parts on its GPU (resources.num_gpus > 0)
    server: dict[str, float] = field(default_factory=dict)
    store: dict[str, float] = field(default_factory=dict)
    workers: int = 1
    path: str = ""
    backend: str = "ray"

    @property
    def total(self) -> float:
        """The node's share of host memory: the server, every worker, the object store (a local run: all on this
        machine); a worker's GPU parts (:attr:`gpu`) are not in it."""
        store = sum(self.store.values()) if self.backend == "ray" else 0.0
        return sum(self.server.values()) + self.workers * sum(self.worker.values()) + store

    def lines(self) -> list[str]:
        """The estimate in words: one line per process, its parts largest first."""
        def line(name: str, parts: dict[str, float]) -> str:
            top = sorted(((v, k) for k, v in parts.items() if v >= 0.5 * MB), reverse=True)
            return (f"{name} ~{_mb(sum(parts.values()))}" + (f" ({', '.join(f'{k} {_mb(v)}' for v, k in top)})"
                                                            if top else ""))

        out = [line(f"worker (each of {self.workers})", self.worker)]
        if self.gpu:
            out.append(line("on each worker's GPU share", self.gpu))
        out.append(line("server", self.server))
        if self.backend == "ray":
            out.append(line("object store", self.store))
        return out

    def warning(self, node_bytes: int | None) -> str | None:
        """One line, with the fix for the largest part, when the run would need more than 90% of this node's memory
        (None when it fits)."""
        if not node_bytes or self.total <= 0.9 * node_bytes:
            return None
        parts = {f"workers' {k}": v * self.workers for k, v in self.worker.items()}
        parts.update({f"server's {k}": v for k, v in self.server.items()})
        parts.update({f"object store's {k}": v for k, v in self.store.items()} if self.backend == "ray" else {})
        top = max(parts, key=parts.__getitem__)
        fix = next((f for key, f in FIXES if key in top), "fewer resources.num_workers")
        return (f"memory: the run may need ~{_mb(self.total)}, more than this node's {_mb(node_bytes)}; the largest "
                f"part is the {top} (~{_mb(parts[top])}): {fix}")


FIXES = (  # the largest part of an estimate → what shrinks it
    ("gathered updates", "the round is gathered on the server: use fewer clients.per_round, or a strategy and rules "
                        "that stream (strategy.robust norm_bound does; median, trimmed_mean and Krum do not), so "
                        "that the server folds each update as it comes"),
    ("base (", "each worker holds the base: use fewer resources.num_workers, or quantized bases (clients.quant)"),
    ("activations", "use a smaller training.batch_size or data.max_seq_len"),
    ("base updates kept", "the strategy keeps every round's base update: use fewer rounds"),
    ("updates waiting", "use fewer resources.num_workers, or resources.clients_per_call: 1"),
    ("partial", "use fewer resources.num_workers"),
    ("round sums", "the strategy's running sums are dense (d_out × d_in per module): adapt fewer modules"),
)


def _mb(n: float) -> str:
    return f"{n / MB:,.0f} MB" if n < 10 * 2**30 else f"{n / 2**30:,.1f} GB"


def node_memory() -> int | None:
    """This machine's memory in bytes (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def estimate(scenario: Any, prep: Any, components: Any, path: Any = None) -> MemoryEstimate:
    """The estimate for ``scenario`` as prepared (:class:`~fedsim.federation.prepare.Prepared`: the adapted modules'
    shapes, the row length in force), with its resolved components and aggregation path (default: the one
    :func:`~fedsim.components.aggregation_path` gives them)."""
    from fedsim.components import aggregation_path
    from fedsim.models.base import linear_shapes
    from fedsim.runtime.ray.dispatch import CALL_BYTES

    model, spec, res, strategy = scenario.model, prep.spec, scenario.resources, components.strategy
    auto_class = components.task.classes[0]
    linears = linear_shapes(model, auto_class)
    params = linear_shapes(model, auto_class, part="params")
    workers = res.total_workers
    adapter = _adapter_bytes(spec.shapes, spec.lora.rank, lambda key: True)
    upload = _adapter_bytes(spec.shapes, spec.lora.rank, strategy.is_shared)
    path = (path or aggregation_path(scenario, strategy, components.stages)).name
    per_call = min(scenario.clients.num_per_round(), res.clients_per_call if isinstance(res.clients_per_call, int)
                   else max(1, int(CALL_BYTES // max(upload, 1.0))))  # clients_per_call auto's cap (dispatch)
    dense = float(sum(s.d_in * s.d_out * 4 for s in spec.shapes.values()))
    sums = dense if strategy.streams and not strategy.partials_exact else 2.0 * upload  # float32 dense or float64
    out = MemoryEstimate(workers=workers, path=path, backend=res.backend)
    out.worker = _worker(scenario, prep.data.max_len, (linears, params), adapter, upload * per_call)
    if res.num_gpus > 0:  # the bases, the training state and the activations live on the GPU, not in this node's RAM
        out.gpu = {k: out.worker.pop(k) for k in list(out.worker)
                   if k.startswith("base (") or k in ("adapter and optimizer", "activations")}
    if path == "partials":
        out.worker["its partial"] = sums
    out.server, out.store = _server_and_store(scenario, strategy, (adapter, upload, sums, dense), (workers, per_call),
                                              path)
    return out


def _adapter_bytes(shapes: dict, rank: int, shared: Any) -> float:
    """float32 LoRA factors at ``rank`` over the adapted modules, the keys ``shared`` keeps (the upload)."""
    from fedsim.lora import ops

    total = 0
    for name, s in shapes.items():
        total += rank * s.d_in * 4 if shared(ops.a_key(name)) else 0
        total += rank * s.d_out * 4 if shared(ops.b_key(name)) else 0
    return float(total)


def _base_bytes(scenario: Any, linears: dict, params: int) -> dict[str, float]:
    """The bases a worker holds: the model in its dtype, and each quantized copy (block linears at bits, plus a
    16-bit scale and zero per group; the rest of the model as it is)."""
    from fedsim.models.base import in_blocks

    model = scenario.model
    dtype = model.dtype if model.dtype != "auto" else ("bfloat16" if scenario.resources.num_gpus > 0 else "float32")
    width = 4 if dtype == "float32" else 2
    out = {f"base ({dtype})": float(params * width)}
    blocks = sum(d_in * d_out for n, (d_in, d_out) in linears.items() if in_blocks(n))
    for q in scenario.clients.quant.choices():
        if q.bits >= 16:
            if q.bits == 16 and width == 4:
                out["base (16-bit copy)"] = float(params * 2)
            continue
        group = q.group_size if q.backend == "hqq" else q.blocksize
        out[f"base ({q.bits}-bit)"] = blocks * (q.bits + 32 / group) / 8 + (params - blocks) * width
    return out


def _worker(scenario: Any, max_len: int, model: tuple[dict, int], adapter: float, call: float) -> dict[str, float]:
    """One worker's parts: runtime, bases, training state, activations of a batch of ``max_len`` rows, the updates
    a call holds (``call``); ``model``: its linear layers' shapes and its parameter count."""
    (linears, params), tr, res = model, scenario.training, scenario.resources
    pack = res.clients_per_pass if isinstance(res.clients_per_pass, int) else 4
    tokens = tr.batch_size * max_len * pack
    hidden = max((d_in for d_in, _ in linears.values()), default=0)
    vocab = max((d_out for _, d_out in linears.values()), default=0)
    act = tokens * (sum(d_in + d_out for d_in, d_out in linears.values()) * 4 + vocab * 4 * 3 + hidden * 4 * 8)
    return {"runtime": float(WORKER_RUNTIME), **_base_bytes(scenario, linears, params),
            "adapter and optimizer": adapter * pack * (ADAM_BYTES if tr.optimizer == "adamw" else 8) / 4,
            "activations": float(act), "updates of a call": call}


def _server_and_store(scenario: Any, strategy: Any, sizes: tuple[float, float, float, float],
                      pool: tuple[int, int], path: str) -> tuple[dict[str, float], dict[str, float]]:
    """The server's parts and the object store's, for the round's aggregation ``path``: ``sizes`` are the adapter's,
    an upload's, the round's running sums' and the dense product's bytes; ``pool``: (workers, clients per call)."""
    from fedsim.runtime.ray.dispatch import PIPELINE_DEPTH

    (adapter, upload, sums, dense), (workers, per_call) = sizes, pool
    per_round = scenario.clients.num_per_round()
    server = {"runtime": float(SERVER_RUNTIME), "global state": adapter}
    if strategy.merges_into_base:  # the base updates of every round, kept for late joiners
        server["base updates kept"] = scenario.rounds * min(dense, per_round * upload)
    store = {"payloads": 2 * adapter}  # the round's, and the evaluation's or the last round's not yet released
    if path == "partials":
        server["round sums"], server["a partial read"] = sums, sums
        store["fold spec"] = adapter
        store["partials"] = min(workers, per_round) * sums  # one per worker
    elif path == "fed":
        server["round sums"] = sums  # an update is read in place (its tensors are views of the store's pages)
        window = (PIPELINE_DEPTH + 1) * workers * per_call  # Dispatch.window, and one being written per worker
        store["updates waiting"] = min(per_round, window + workers) * upload
    else:
        server["gathered updates"] = per_round * upload
        store["gathered updates"] = per_round * upload
    if scenario.resources.backend == "ray":
        server["object-store pages it maps"] = STORE_PAGES * sum(store.values())
    return server, store
