"""Packed clients: train K clients' LoRA adapters in one forward/backward pass over one shared, frozen base.

Every step concatenates the active clients' batches along the batch axis and runs the base model once. Each adapted
layer adds, per client k, ``s_k · B_k A_k x`` for that client's rows only — a client axis through two batched matmuls
(``torch.bmm`` over (K, rows·T, d)). The clients' factors live in packed tensors A (K, r_max, d_in) and
B (K, d_out, r_max); a client of rank r_k < r_max is padded with zero rows of A and zero columns of B, which get zero
gradients and which AdamW and SGD leave at zero, so padding is exact.

Why the result equals training the clients one by one:

- the loss of the pass is the *sum* of the clients' own mean losses, and the clients' parameters are disjoint, so
  each client's gradient is exactly the gradient of its own loss;
- rows never interact (attention is within a sequence; in a causal LM right padding puts pads after every real
  token and pad positions carry no label; an encoder's attention mask hides the pads), so a longer packed batch, or
  filler rows that bring a client's sub-batch up to the pack's row count, change nothing for the real rows — the
  model task builds the packed batch and each client's mean loss over its own block (``pack_collate``,
  ``pack_losses``);
- a model task's head (a classifier's linear layers) is per client too: each head layer's output is recomputed
  block by block with that client's weight and bias, trained and clipped with its adapter;
- each client keeps its own data order (the same seeded batch schedule as :func:`~fedsim.client.trainer.train_local`),
  its own scaling (alpha/r or alpha/√r), its own gradient-norm clipping (per-client norm over its own tensors) and its
  own optimizer state; the optimizers below are torch's AdamW and SGD written over the client axis with a mask, so
  a client that has finished its steps (or failed) is left out of the step, never stepped with a zero gradient.

Floating point differs from the sequential path only in summation order (≈1e-7 relative per step).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedsim.client.schedule import lr_factor, lr_metrics, scheduled
from fedsim.client.trainer import batch_schedule
from fedsim.config import TrainingConfig
from fedsim.data.tokenized import TokenizedSplit
from fedsim.errors import AggregationError
from fedsim.lora import ops
from fedsim.models.base import seed_torch, set_training
from fedsim.models.tasks import ModelTask
from fedsim.objectives import BoundObjective, ClientObjective, bind, state_out
from fedsim.types import LoraSpec, ModuleShape, Tensors


@dataclass
class PackMember:
    """One client of a pack: its adapter to start from, its data and its settings.

    Args:
        lora: the client's rank and alpha.
        tensors: the adapter to start from (every key of every adapted module), float32.
        indices: the client's training sample indices.
        seed: (scenario seed, round, client id), as for sequential training.
        objectives: the client's objectives (packable ones: e.g. HETLoRA's rank self-pruning term).
        personal: the client's private tensors (where its objectives keep their state).
    """

    lora: LoraSpec
    tensors: Tensors
    indices: np.ndarray
    seed: tuple[int, ...]
    objectives: tuple[ClientObjective, ...] = ()
    personal: Tensors | None = None
    head: Tensors | None = None  # the head to start from (a model task's, e.g. a classifier's), checked


HeadLayers = dict  # path in the base → (nn.Linear, its weight's key, its bias's key or None): AdapterHost.head_layers


class _PackedOptimizer:
    """torch's AdamW / SGD (single-tensor formulas), vectorized over a leading client axis, stepping only the clients
    in a mask. Every active client has taken the same number of steps (they start together and leave for good), so
    the bias correction is one scalar."""

    def __init__(self, params: list[torch.Tensor], cfg: TrainingConfig):
        self.params, self.cfg = params, cfg
        self.t = 0
        if cfg.optimizer == "adamw":
            self.m = [torch.zeros_like(p) for p in params]
            self.v = [torch.zeros_like(p) for p in params]
        else:
            self.buf: list[torch.Tensor | None] = [None for _ in params]

    @torch.no_grad()
    def step(self, mask: torch.Tensor | None, lr: torch.Tensor | None = None) -> None:
        """One step for the clients in ``mask`` (K,) bool; None: every client. ``lr``: each client's learning rate
        this step (K,) (a schedule); None: ``training.lr`` for all."""
        cfg = self.cfg
        self.t += 1
        for i, p in enumerate(self.params):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            keep = None if mask is None else mask.view(-1, *([1] * (p.dim() - 1)))
            rate: float | torch.Tensor = cfg.lr if lr is None else lr.view(-1, *([1] * (p.dim() - 1)))
            if cfg.optimizer == "adamw":
                b1, b2, eps = 0.9, 0.999, 1e-8
                m = self.m[i].lerp(g, 1 - b1)
                v = self.v[i].mul(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2**self.t)).add_(eps)
                if lr is None:
                    new_p = p.mul(1 - cfg.lr * cfg.weight_decay).addcdiv_(m, denom, value=-cfg.lr / (1 - b1**self.t))
                else:
                    new_p = p.mul(1 - rate * cfg.weight_decay) - (rate / (1 - b1**self.t)) * (m / denom)
                self.m[i] = m if keep is None else torch.where(keep, m, self.m[i])
                self.v[i] = v if keep is None else torch.where(keep, v, self.v[i])
            else:
                d = g + cfg.weight_decay * p if cfg.weight_decay else g
                if cfg.momentum:
                    # torch starts the momentum buffer at the first gradient, per client; an inactive client's first
                    # step cannot come later (clients only ever leave the pack), so one buffer start for all is exact
                    buf = d.clone() if self.buf[i] is None else self.buf[i] * cfg.momentum + d
                    self.buf[i] = buf if self.buf[i] is None or keep is None else torch.where(keep, buf, self.buf[i])
                    d = buf
                new_p = p - rate * d
            p.copy_(new_p if keep is None else torch.where(keep, new_p, p))


class _PackedLora:
    """The packed factors and the forward hooks that add each client's LoRA term to its rows.

    All A factors live in one tensor (K, Σ_modules r_max·d_in) and all B factors in another (K, Σ d_out·r_max), with
    per-module views (K, r_max, d_in) and (K, d_out, r_max): the optimizer and the per-client clipping then touch two
    tensors per step, not two per module.
    """

    def __init__(self, members: Sequence[PackMember], shapes: dict[str, ModuleShape], device: torch.device,
                 trainable: tuple[str, ...]):
        self.modules = sorted(shapes)
        self.ranks = [m.lora.rank for m in members]
        r_max = max(self.ranks)
        k = len(members)
        self.layout: dict[str, tuple[int, int, int, int]] = {}  # module -> (offset in A, d_in, offset in B, d_out)
        off_a = off_b = 0
        for mod in self.modules:
            self.layout[mod] = (off_a, shapes[mod].d_in, off_b, shapes[mod].d_out)
            off_a += r_max * shapes[mod].d_in
            off_b += shapes[mod].d_out * r_max
        self.r_max = r_max
        flat_a = torch.zeros((k, off_a), dtype=torch.float32)
        flat_b = torch.zeros((k, off_b), dtype=torch.float32)
        full_a, full_b = self._views(flat_a, flat_b)
        for i, m in enumerate(members):
            for mod in self.modules:
                full_a[mod][i, : m.lora.rank] = m.tensors[ops.a_key(mod)]
                full_b[mod][i, :, : m.lora.rank] = m.tensors[ops.b_key(mod)]
        self.flat_a = flat_a.to(device).requires_grad_("A" in trainable)
        self.flat_b = flat_b.to(device).requires_grad_("B" in trainable)
        self.trainable = [t for t in (self.flat_a, self.flat_b) if t.requires_grad]
        self.scaling = torch.tensor([m.lora.scaling for m in members], dtype=torch.float32, device=device)
        self.select(None)

    def _views(self, flat_a: torch.Tensor, flat_b: torch.Tensor
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        r, n = self.r_max, flat_a.shape[0]
        a = {m: flat_a[:, oa:oa + r * di].view(n, r, di) for m, (oa, di, _, _) in self.layout.items()}
        b = {m: flat_b[:, ob:ob + do * r].view(n, do, r) for m, (_, _, ob, do) in self.layout.items()}
        return a, b

    def select(self, active: torch.Tensor | None) -> None:
        """The clients whose rows the next pass holds (None: all of them, in order); views made anew each step."""
        self.full_a, self.full_b = self._views(self.flat_a, self.flat_b)
        if active is None:
            self.A, self.B, self.s = self.full_a, self.full_b, self.scaling
        else:  # one gather per factor tensor, not one per module
            self.A, self.B = self._views(self.flat_a[active], self.flat_b[active])
            self.s = self.scaling[active]

    def hook(self, module: str):
        def add_lora(_layer: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            a, b, s = self.A[module], self.B[module], self.s
            n = a.shape[0]
            xs = x.to(a.dtype).reshape(n, -1, x.shape[-1])  # (n, rows·T, d_in): client k's rows are block k
            h = torch.bmm(xs, a.transpose(1, 2)) * s.view(n, 1, 1)  # (n, rows·T, r): scaled at the narrow end
            if out.dtype == a.dtype:  # out + s·(x Aᵀ) Bᵀ in one fused batched GEMM
                return torch.baddbmm(out.reshape(n, -1, out.shape[-1]), h, b.transpose(1, 2)).reshape(out.shape)
            # as PEFT: the LoRA term in the adapter's dtype (float32), added to the base output, then cast back
            return (out + torch.bmm(h, b.transpose(1, 2)).reshape(out.shape)).to(out.dtype)

        return add_lora

    def client_tensors(self, i: int) -> Tensors:
        """Client i's adapter at its own rank, float32 on the CPU."""
        r = self.ranks[i]
        full_a, full_b = self._views(self.flat_a.detach(), self.flat_b.detach())
        out = {}
        for mod in self.modules:
            out[ops.a_key(mod)] = full_a[mod][i, :r].to("cpu", torch.float32, copy=True)
            out[ops.b_key(mod)] = full_b[mod][i, :, :r].to("cpu", torch.float32, copy=True)
        return out

    def client_views(self, i: int) -> Tensors:
        """Client i's adapter at its own rank, as views of the packed factors (differentiable, current)."""
        r = self.ranks[i]
        out = {}
        for mod in self.modules:
            out[ops.a_key(mod)] = self.full_a[mod][i, :r]  # (r, d_in)
            out[ops.b_key(mod)] = self.full_b[mod][i, :, :r]  # (d_out, r)
        return out

    def bind(self, i: int, member: PackMember) -> list[BoundObjective]:
        """Client i's objectives bound to its views (made anew at every call, as :meth:`select` remakes them)."""
        return [bind(o, lambda: self.client_views(i), member.lora, float(self.scaling[i]), member.personal)
                for o in member.objectives]


class _PackedHead:
    """Each client's copy of a model task's head (a classifier's linear layers), trained in full: all of it in one
    tensor (K, Σ sizes), and forward hooks that replace each head layer's output, block k of its rows computed with
    client k's weight and bias — ``x W_kᵀ + b_k`` by one batched matmul, as ``nn.Linear`` computes it for one client.
    The base's own head modules stay as they are (their output is discarded, their parameters frozen meanwhile)."""

    def __init__(self, layers: HeadLayers, starts: Sequence[Tensors], device: torch.device):
        self.layers = layers
        params = {k: p for layer, w, b in layers.values() for k, p in ((w, layer.weight), (b, layer.bias)) if k}
        self.keys = sorted(params)
        self.shapes = {k: tuple(params[k].shape) for k in self.keys}
        dtype = next(iter(params.values())).dtype  # the head's own dtype: the same arithmetic as one by one
        flat = torch.stack([torch.cat([s[k].reshape(-1).to(dtype) for k in self.keys]) for s in starts])
        self.flat = flat.to(device).requires_grad_(True)
        self.select(None)

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, off, n = {}, 0, flat.shape[0]
        for k in self.keys:
            size = math.prod(self.shapes[k])
            out[k] = flat[:, off:off + size].view(n, *self.shapes[k])
            off += size
        return out

    def select(self, active: torch.Tensor | None) -> None:
        """The clients whose rows the next pass holds (None: all, in order)."""
        self.current = self._views(self.flat if active is None else self.flat[active])

    def hook(self, path: str):
        _, w_key, b_key = self.layers[path]

        def per_client(_layer: torch.nn.Module, args: tuple, _out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            w = self.current[w_key]  # (n, d_out, d_in)
            n = w.shape[0]
            xs = x.reshape(n, -1, x.shape[-1])  # client k's rows are block k
            y = torch.bmm(xs, w.transpose(1, 2)) if b_key is None else \
                torch.baddbmm(self.current[b_key].unsqueeze(1), xs, w.transpose(1, 2))
            return y.reshape(*x.shape[:-1], w.shape[1])

        return per_client

    def client_tensors(self, i: int) -> Tensors:
        """Client i's head, float32 on the CPU (as :meth:`AdapterHost.read_head` reads it)."""
        views = self._views(self.flat.detach())
        return {k: v[i].to("cpu", torch.float32, copy=True) for k, v in views.items()}


@contextlib.contextmanager
def _packed_forward(peft_model: torch.nn.Module, packed: _PackedLora, head: _PackedHead | None = None
                    ) -> Iterator[None]:
    """PEFT's own adapters off, the packed LoRA terms (and each client's head) on, for the duration of the block."""
    layers = {m: peft_model.get_submodule("base_model.model." + m) for m in packed.modules}
    heads = {} if head is None else {path: layer for path, (layer, _, _) in head.layers.items()}
    frozen = [p for layer in heads.values() for p in layer.parameters() if p.requires_grad]
    handles = []
    try:
        for m, layer in layers.items():
            layer.enable_adapters(False)  # the layer computes its base output only (quantized or not)
            handles.append(layer.register_forward_hook(packed.hook(m)))
        for path, layer in heads.items():
            handles.append(layer.register_forward_hook(head.hook(path)))
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for h in handles:
            h.remove()
        for layer in layers.values():
            layer.enable_adapters(True)
        for p in frozen:
            p.requires_grad_(True)


def check_member(member: PackMember, shapes: dict[str, ModuleShape]) -> None:
    """Raise AggregationError when a member's tensors do not fit the model (same wording as the sequential path)."""
    want = {k for m in shapes for k in (ops.a_key(m), ops.b_key(m))}
    missing = sorted(want - set(member.tensors))
    if missing or set(member.tensors) - want:
        raise AggregationError(f"payload does not match the model's adapter (missing e.g. {missing[:3]})")
    r = member.lora.rank
    for m, s in shapes.items():
        for key, shape in ((ops.a_key(m), (r, s.d_in)), (ops.b_key(m), (s.d_out, r))):
            if tuple(member.tensors[key].shape) != shape:
                raise AggregationError(f"{key}: payload shape {tuple(member.tensors[key].shape)} != adapter shape "
                                       f"{shape}")


Trained = tuple[Tensors, dict[str, float], Tensors, Tensors, Tensors]


def train_packed(model: torch.nn.Module, shapes: dict[str, ModuleShape], members: Sequence[PackMember],
                 trainable: tuple[str, ...], split: TokenizedSplit, cfg: TrainingConfig, pad_id: int,
                 device: torch.device, task: ModelTask, lr: float | None = None, head: HeadLayers | None = None
                 ) -> list[Trained | Exception]:
    """Train every member's adapter together, one pass per step over the base inside ``model`` (a PEFT model), with
    ``task``'s packed batches and losses; ``head``: the model task's head layers (each member starts from its own
    ``head``, trained with its adapter).

    Returns, per member in order, (trained adapter tensors, metrics as :func:`train_local` reports them plus
    ``train/clients_per_pass``, the state its objectives keep, what they upload, its trained head or {}) or the
    exception that ended that client (e.g. a non-finite loss); the others go on.
    """
    t0 = time.perf_counter()
    run = _PackRun(model, shapes, members, trainable, split, cfg, pad_id, device, task, lr, head)
    set_training(model, True)
    with _packed_forward(model, run.packed, run.head):
        for step in range(max(run.steps)):
            if not run.step(step):
                break
    return run.results(time.perf_counter() - t0)


class _PackRun:
    """The state of one packed training run: each client's batch schedule, running loss and tokens, failures."""

    def __init__(self, model: torch.nn.Module, shapes: dict[str, ModuleShape], members: Sequence[PackMember],
                 trainable: tuple[str, ...], split: TokenizedSplit, cfg: TrainingConfig, pad_id: int,
                 device: torch.device, task: ModelTask, lr: float | None = None, head: HeadLayers | None = None):
        self.model, self.split, self.cfg, self.pad_id, self.device = model, split, cfg, pad_id, device
        self.task = task
        self.base_lr = cfg.lr if lr is None else lr
        self.k, self.members = len(members), members
        self.packed = _PackedLora(members, shapes, device, trainable)
        self.head = _PackedHead(head, [m.head for m in members], device) if head and trainable else None
        # dropout in the base, if any: the pack's own stream, a function of its first client's (seed, round, id)
        seed_torch(int(np.random.default_rng(list(members[0].seed) + [1]).integers(2**62)), device)
        self.schedules, self.steps = [], []
        for m in members:
            rng = np.random.default_rng(list(m.seed))
            rng.integers(2**62)  # the sequential path seeds torch (dropout) from this draw: keep the stream aligned
            n_steps = cfg.steps_for(len(m.indices))
            self.steps.append(n_steps)
            self.schedules.append(batch_schedule(m.indices, n_steps, cfg.batch_size, rng))
        self.params = self.packed.trainable + ([self.head.flat] if self.head is not None else [])
        self.opt = _PackedOptimizer(self.params, cfg)
        self.failed: dict[int, Exception] = {}
        self.totals = [0.0] * self.k
        self.tokens = [0] * self.k
        self.bound = [self.packed.bind(i, m) for i, m in enumerate(members)]

    def step(self, step: int) -> bool:
        """One pass for the clients with a batch left at ``step``; False when none is left."""
        k, device, packed = self.k, self.device, self.packed
        active = [i for i in range(k) if step < self.steps[i] and i not in self.failed]
        if not active:
            return False
        chosen = None if len(active) == k else torch.tensor(active, device=device)
        packed.select(chosen)
        if self.head is not None:
            self.head.select(chosen)
        batch = self.task.pack_collate(self.split, [self.schedules[i][step] for i in active], self.pad_id, device)
        losses, counts = self.task.pack_losses(self.model, batch, len(active))
        objective = self._objective(active, losses, counts)
        stepping = [i for i in active if i not in self.failed]
        if not stepping:
            return True
        torch.stack(objective).sum().backward()
        mask = None
        if len(stepping) < k:
            mask = torch.zeros(k, dtype=torch.bool, device=device)
            mask[stepping] = True
        if self.cfg.max_grad_norm is not None:
            _clip_per_client(self.params, self.cfg.max_grad_norm)
        self.opt.step(mask, self._rates(step))
        for p in self.params:
            p.grad = None
        return True

    def _rates(self, step: int) -> torch.Tensor | None:
        """Each client's learning rate at ``step`` of its own schedule (its own number of steps); None: constant."""
        if not scheduled(self.cfg):
            return None
        rates = [self.base_lr * lr_factor(self.cfg, step, n) for n in self.steps]
        return torch.tensor(rates, dtype=torch.float32, device=self.device)

    def _objective(self, active: list[int], losses: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
        """Each active client's loss plus its objectives' penalties (a client with a non-finite loss fails)."""
        values = losses.detach().cpu().tolist()
        labelled = counts.tolist()  # what each client's loss is a mean over this step (labelled tokens, rows)
        objective = []
        for j, i in enumerate(active):
            if not math.isfinite(values[j]):
                self.failed[i] = FloatingPointError(f"non-finite training loss {values[j]}")
                continue
            term = losses[j]
            for b in self.bound[i]:
                extra = b.penalty()
                if extra is not None:
                    term = term + extra
            objective.append(term)
            self.totals[i] += values[j]
            self.tokens[i] += int(labelled[j])
        return objective

    def results(self, elapsed: float) -> list[Trained | Exception]:
        """Per client: its trained tensors, metrics, objective state, objective uploads and head (or its failure)."""
        out: list[Trained | Exception] = []
        for i in range(self.k):
            if i in self.failed:
                out.append(self.failed[i])
                continue
            metrics = {"train/loss": self.totals[i] / self.steps[i], "train/steps": float(self.steps[i]),
                       "train/tokens": float(self.tokens[i]), "train/time_s": elapsed / self.k,
                       "train/clients_per_pass": float(self.k), **lr_metrics(self.cfg, self.base_lr, self.steps[i])}
            self.packed.select(None)  # each client's views over the final values
            for b in self.bound[i]:
                metrics.update(b.finish())
            objectives = list(self.members[i].objectives)
            state = state_out(objectives, self.bound[i])
            head = self.head.client_tensors(i) if self.head is not None else {}
            out.append((self.packed.client_tensors(i), metrics, state, state_out(objectives, self.bound[i], True),
                        head))
        return out


@torch.no_grad()
def _clip_per_client(params: list[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` for each client on its own slices: the norm over all of that client's gradients, scaled
    by min(1, max_norm / (norm + 1e-6)). Clients without a gradient (inactive) have norm 0 and are left as they are."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    sq = sum(g.float().pow(2).sum(dim=tuple(range(1, g.dim()))) for g in grads)  # (K,)
    coef = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
