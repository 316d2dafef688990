"""Attach LoRA with PEFT once, then swap adapter weights per client.

One PEFT model per worker hosts one named adapter per distinct (rank, alpha, rslora); a client job only copies its
tensors into the adapter's parameters (``Tensor.copy_``), never re-wraps or reloads the base.

Two-level methods (PF2LoRA, FedDPA) activate a second, personal adapter next to the main one — PEFT's multi-adapter
support: both are active and their outputs add up, each multiplied by its mixing weight (PEFT's ``set_scale``).
"""

from __future__ import annotations

import torch

from fedsim.errors import AggregationError
from fedsim.lora import ops
from fedsim.models.base import head_exclusion, is_conv1d, weight_matrix
from fedsim.types import LoraSpec, ModuleShape, Tensors

MAX_ADAPTERS = 8  # named adapters kept per worker (one per distinct rank/alpha in use)


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward`` for vanilla LoRA, with the scaling and the residual add folded into the second
    GEMM: ``addmm(W0 x, A x, Bᵀ, alpha=s)`` = W0 x + s · B A x in one kernel, where PEFT runs B(A x), then a multiply
    and an add over the (tokens × d_out) output, forward and backward. The same function up to float rounding
    (~1e-7 relative); ~10% of a small model's training step on CPU, a kernel launch or two per layer on GPU.

    Everything else — adapters off or merged, DoRA and other variants, a bias on B, mixed-batch ``adapter_names``,
    an input in another dtype than the adapter — goes to PEFT's own forward."""
    lora_a_keys = self.lora_A.keys()
    active = [n for n in self.active_adapters if n in lora_a_keys]
    if (args or kwargs or self.disable_adapters or self.merged or self.lora_variant
            or any(self.lora_B[n].bias is not None or self.lora_A[n].weight.dtype != x.dtype for n in active)):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    if result.dtype != x.dtype:
        return type(self).forward(self, x, *args, **kwargs)
    shape = result.shape
    out = result.reshape(-1, shape[-1])
    for n in active:
        h = self.lora_A[n](self.lora_dropout[n](x))
        out = torch.addmm(out, h.reshape(-1, h.shape[-1]), self.lora_B[n].weight.t(), alpha=self.scaling[n])
    return out.view(shape)


def _install_fused_forward(model: torch.nn.Module) -> int:
    """Give every plain PEFT ``lora.Linear`` (not the HQQ / bitsandbytes ones) :func:`fused_lora_forward`; return
    how many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for mod in model.modules():
        if type(mod) is Linear and "forward" not in mod.__dict__:
            mod.forward = fused_lora_forward.__get__(mod)
            count += 1
    return count


def adapter_name(lora: LoraSpec, personal: bool = False) -> str:
    a = f"{lora.alpha:g}".replace(".", "p").replace("-", "m")
    return ("p_" if personal else "") + f"r{lora.rank}_a{a}" + ("_rs" if lora.rslora else "")


class AdapterHost:
    """A PEFT model over a frozen base, with one adapter per LoRA spec, created lazily.

    A model task's head (``head_modules``: a classifier) is trained in full beside the main adapter. It is not
    PEFT's ``modules_to_save`` copy per adapter (PEFT refuses two active adapters over one), but the base's own head
    modules, whose values are swapped per client like the adapters' (:meth:`load_head`, :meth:`read_head`) and reset
    to the base's initial head when a payload carries none. Their tensors are keyed ``head.<module>.<parameter>``.

    Args:
        base: the frozen base model.
        target_modules: module names LoRA adapts, a regular expression, or ``all-linear`` (PEFT's forms).
        lora_dropout: dropout on the LoRA input.
        head_modules: paths of the modules trained in full (the model task's ``modules_to_save``).
    """

    def __init__(self, base: torch.nn.Module, target_modules: tuple[str, ...] | str, lora_dropout: float = 0.0,
                 head_modules: list[str] | tuple[str, ...] = ()):
        self.base = base
        # PEFT's rule for modules_to_save: nothing inside the head is adapted
        self.exclude = head_exclusion(head_modules)
        self.head = {ops.HEAD_PREFIX + f"{m}.{n}": p for m in head_modules
                     for n, p in base.get_submodule(m).named_parameters()}
        with torch.no_grad():
            self._initial_head = {k: p.detach().clone() for k, p in self.head.items()}
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.lora_dropout = lora_dropout
        self.model: torch.nn.Module | None = None
        self._params: dict[str, dict[str, torch.nn.Parameter]] = {}
        self.num_wraps = 0  # how many times get_peft_model ran (once per worker)
        self.active: tuple[str, ...] = ()
        self._mix: dict[str, float] = {}  # adapter name -> weight its PEFT scaling is multiplied by (1.0 if absent)

    def _config(self, lora: LoraSpec):
        from peft import LoraConfig

        return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, use_rslora=lora.rslora,
                          target_modules=self.target_modules, lora_dropout=self.lora_dropout, bias="none",
                          fan_in_fan_out=self._fan_in_fan_out(), exclude_modules=self.exclude)

    def _fan_in_fan_out(self) -> bool:
        """PEFT's ``fan_in_fan_out``: whether the adapted layers store their weight as (d_in, d_out) — GPT-2's
        ``Conv1D``, unless a quantized copy of the base turned them into linear layers."""
        if not hasattr(self, "_fifo"):
            self._fifo = any(is_conv1d(m) for m in self.base.modules())
        return self._fifo

    def activate(self, lora: LoraSpec, personal: LoraSpec | None = None,
                 mix: tuple[float, float] = (1.0, 1.0)) -> str:
        """Make the adapter for ``lora`` the active one (creating it on first use) and return its name.

        With ``personal``, the personal adapter of that rank/alpha is active too; ``mix`` = (w_main, w_personal)
        multiplies each adapter's LoRA scaling, so the layer computes W0 x + w_main ΔW x + w_personal ΔW_p x.
        """
        name = self._ensure(lora, False)
        names = (name,)
        if personal is not None:
            names = (name, self._ensure(personal, True))
            self._params[name] = self._params.pop(name)  # keep the main adapter out of the eviction's way
        if self.active != names:  # set_adapter walks every module: only call it on a change
            if len(names) == 1:
                self.model.set_adapter(name)
            else:
                self.model.base_model.set_adapter(list(names))
            self.active = names
        weights = dict(zip(names, mix))
        if any(self._mix.get(n, 1.0) != weights[n] for n in names):
            self._set_scales(weights)
        return name

    def _ensure(self, lora: LoraSpec, personal: bool) -> str:
        """Create the adapter on first use (evicting the least recently used beyond MAX_ADAPTERS); mark it used."""
        name = adapter_name(lora, personal)
        if self.model is None:
            from peft import get_peft_model

            self.model = get_peft_model(self.base, self._config(lora), adapter_name=name)
            _install_fused_forward(self.model)
            self.num_wraps += 1
        elif name not in self._params:
            if len(self._params) >= MAX_ADAPTERS:  # evict the least recently used adapter
                victim = next(iter(self._params))
                self.model.delete_adapter(victim)
                del self._params[victim]
                self._mix.pop(victim, None)
                self.active = ()
            self.model.add_adapter(name, self._config(lora))
        if name not in self._params:
            self._params[name] = self._index(name)
        else:
            self._params[name] = self._params.pop(name)  # most recently used last
        return name

    def enable_checkpointing(self) -> None:
        """Gradient checkpointing of the base (recompute its activations in the backward pass; non-reentrant, so
        the frozen base needs no input gradients), once."""
        if not getattr(self, "_checkpointing", False):
            inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            if hasattr(inner, "activation_checkpointing_enable"):  # transformers ≥ 5.2x; the old name goes in v6
                inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self._checkpointing = True

    def _set_scales(self, weights: dict[str, float]) -> None:
        from peft.tuners.lora import LoraLayer

        for mod in self.model.modules():
            if isinstance(mod, LoraLayer):
                for n, w in weights.items():
                    mod.set_scale(n, w)  # scaling = w · alpha / r (or / √r with rsLoRA), as PEFT computes it
        self._mix.update(weights)

    def _index(self, name: str) -> dict[str, torch.nn.Parameter]:
        params = {}
        prefix = "base_model.model."
        for mod_name, mod in self.model.named_modules():
            if hasattr(mod, "lora_A") and name in getattr(mod, "lora_A", {}):
                path = mod_name[len(prefix):] if mod_name.startswith(prefix) else mod_name
                params[ops.a_key(path)] = mod.lora_A[name].weight
                params[ops.b_key(path)] = mod.lora_B[name].weight
        return params

    def target_paths(self) -> list[str]:
        """Module paths of the adapted layers (of the active main adapter)."""
        name = self.active[0]
        return ops.modules(self._params[name])

    def base_weight(self, module: str) -> torch.Tensor:
        """The frozen base weight (d_out, d_in) of an adapted module (a ``Conv1D``'s: a transposed view)."""
        mod = self.model.get_submodule("base_model.model." + module) if self.model is not None else \
            self.base.get_submodule(module)
        return weight_matrix(mod)

    def shapes(self, lora: LoraSpec) -> dict[str, ModuleShape]:
        """Module → shape of the adapted layers (from the adapter's own factors)."""
        p = self.params(lora)
        return {ops.module_of(k): ModuleShape(d_in=p[k].shape[1], d_out=p[ops.b_key(ops.module_of(k))].shape[0])
                for k in p if ops.factor_of(k) == "A"}

    def params(self, lora: LoraSpec, personal: bool = False) -> dict[str, torch.nn.Parameter]:
        return self._params[adapter_name(lora, personal)]

    def load(self, lora: LoraSpec, tensors: Tensors, personal: bool = False) -> None:
        """Copy ``tensors`` into the adapter for ``lora`` (the personal one with ``personal``); every key is needed."""
        params = self.params(lora, personal)
        if sorted(params) != sorted(tensors):
            missing = sorted(set(params) - set(tensors))[:3]
            raise AggregationError(f"payload does not match the model's adapter (missing e.g. {missing})")
        with torch.no_grad():
            for k, p in params.items():
                t = tensors[k]
                if t.shape != p.shape:
                    raise AggregationError(f"{k}: payload shape {tuple(t.shape)} != adapter shape {tuple(p.shape)}")
                p.copy_(t)

    def set_trainable(self, lora: LoraSpec, factors: tuple[str, ...], personal: bool = False
                      ) -> list[torch.nn.Parameter]:
        """Enable gradients on the chosen factors ("A", "B") of an adapter (others off); return them. The head, if
        any, trains with the main adapter (whenever it trains a factor)."""
        out = []
        for k, p in self.params(lora, personal).items():
            on = ops.factor_of(k) in factors
            p.requires_grad_(on)
            if on:
                out.append(p)
        if not personal:
            for p in self.head.values():
                p.requires_grad_(bool(factors))
            out += list(self.head.values()) if factors else []
        return out

    def load_head(self, tensors: Tensors | None) -> None:
        """Copy a head into the base's head modules; None: the base's initial head. Every key is needed."""
        if not self.head:
            return
        src = self.head_source(tensors)
        with torch.no_grad():
            for k, p in self.head.items():
                p.copy_(src[k])

    def head_source(self, tensors: Tensors | None) -> Tensors:
        """The head a client starts from: ``tensors`` once checked against the model's, or (None) the base's initial
        head.

        Raises:
            AggregationError: a key missing or a shape that differs."""
        src = self._initial_head if tensors is None else tensors
        if sorted(src) != sorted(self.head):
            missing = sorted(set(self.head) - set(src))[:3]
            raise AggregationError(f"the payload's head does not match the model's (missing e.g. {missing})")
        for k, p in self.head.items():
            if src[k].shape != p.shape:
                raise AggregationError(f"{k}: payload shape {tuple(src[k].shape)} != head shape {tuple(p.shape)}")
        return src

    def head_layers(self) -> dict[str, tuple[torch.nn.Linear, str, str | None]] | None:
        """The head's linear layers: path in the base → (layer, its weight's key, its bias's key or None); None when
        some head parameter is not a linear layer's (a packed pass computes linear heads only). Found once: the
        head's modules never change."""
        if not hasattr(self, "_head_layers"):
            self._head_layers = self._find_head_layers()
        return self._head_layers

    def _find_head_layers(self) -> dict[str, tuple[torch.nn.Linear, str, str | None]] | None:
        keys = {id(p): k for k, p in self.head.items()}
        layers = {}
        for path, mod in self.base.named_modules():
            if isinstance(mod, torch.nn.Linear) and id(mod.weight) in keys:
                layers[path] = (mod, keys[id(mod.weight)], keys.get(id(mod.bias)) if mod.bias is not None else None)
        covered = {k for _, w, b in layers.values() for k in (w, b) if k is not None}
        return layers if covered == set(self.head) else None

    def read_head(self) -> Tensors:
        """A CPU float32 copy of the head's tensors ({} without a head)."""
        return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in self.head.items()}

    def read(self, lora: LoraSpec, personal: bool = False) -> Tensors:
        """A CPU float32 copy of the adapter's tensors."""
        return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in self.params(lora, personal).items()}
