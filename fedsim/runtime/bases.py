"""A worker's base models: built once, quantized once per (base version, bit width), merged into in place.

With full precision only, one base is wrapped by PEFT and merges are added to it in place. With quantized clients,
a full-precision master (CPU, never wrapped) takes the merges and each bit width is quantized from it once per base
version, on first use (least recently used variants out beyond :data:`MAX_BASES`).
"""

from __future__ import annotations

import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

from fedsim.config import Scenario
from fedsim.errors import BackendError
from fedsim.lora import ops
from fedsim.models.adapters import AdapterHost
from fedsim.models.base import resolve_dtype, weight_matrix
from fedsim.models.quant import dequantized_weight, packed_bytes, quantize_model
from fedsim.types import FULL, LoraSpec, QuantSpec, Tensors

MAX_BASES = 6  # base variants (bit widths) a worker keeps at once


class BaseCache:
    """The base models of one worker.

    Args:
        scenario: the resolved scenario (model, quantization, LoRA dropout).
        task: the model task that builds the base (:class:`fedsim.models.tasks.ModelTask`).
        device: where the models compute.
    """

    def __init__(self, scenario: Scenario, task: Any, device: torch.device):
        self.scenario, self.task, self.device = scenario, task, device
        self.quantized_run = scenario.clients.quant.is_quantized()
        self.master: torch.nn.Module | None = None
        self.hosts: OrderedDict[QuantSpec, tuple[int, AdapterHost]] = OrderedDict()
        self.version = 0
        self.num_builds = 0
        self.quantizations: Counter[str] = Counter()  # "v<version>/<label>" -> times quantized (must stay 1)
        self.base_bytes: dict[str, int] = {}  # label -> packed bytes of that base variant
        self._loftq: dict[tuple, Tensors] = {}

    def compute_dtype(self) -> torch.dtype:
        name = self.scenario.clients.quant.compute_dtype
        if name != "auto":
            return getattr(torch, name)
        return resolve_dtype(self.scenario.model, self.device)

    def _master(self) -> torch.nn.Module:
        if self.master is None:
            self.master = self.task.build(self.scenario.model, "cpu")
            self.num_builds += 1
        return self.master

    def host(self, base_version: int = 0, quant: QuantSpec = FULL) -> AdapterHost:
        """The cached PEFT model for ``base_version`` at ``quant`` (built or quantized on first use)."""
        if not self.quantized_run:
            quant = FULL  # one full-precision base, whatever the (unquantized) spec says
        if base_version != self.version:
            raise BackendError(f"payload asks for base version {base_version}, worker holds {self.version}; "
                               "base updates must be synced to every worker first")
        cached = self.hosts.get(quant)
        if cached is not None and cached[0] == self.version:
            self.hosts.move_to_end(quant)
            return cached[1]
        if not self.quantized_run:
            base = self.task.build(self.scenario.model, self.device)
            self.num_builds += 1
        else:
            master = self._master()
            self.hosts.pop(quant, None)
            while len(self.hosts) >= MAX_BASES:  # least recently used variant out
                self.hosts.popitem(last=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = quantize_model(master, quant, self.device, self.compute_dtype())
            self.quantizations[f"v{self.version}/{quant.label}"] += 1
        self.base_bytes[quant.label] = packed_bytes(base, quant)
        host = AdapterHost(base, self.scenario.model.target_modules, self.scenario.model.lora_dropout,
                           self.task.modules_to_save(base))
        self.hosts[quant] = (self.version, host)
        return host

    def apply_delta(self, version: int, delta: Tensors) -> int:
        """Merge base-model update ``version`` into the cached base, in place (once per version); with quantized
        clients into the full-precision master, from which each bit width is re-quantized once on its next use.

        ``delta`` holds per module ``<module>.delta_B`` (d_out, R) and ``<module>.delta_A`` (R, d_in), or a dense
        ``<module>.delta_W`` (d_out, d_in). Returns the base version afterwards.
        """
        if version <= self.version:
            return self.version  # already applied (e.g. replayed to a replacement worker)
        if version != self.version + 1:
            raise BackendError(f"base update {version} arrived before {self.version + 1}")
        if self.quantized_run:
            master = self._master()
            weights = {m: weight_matrix(master.get_submodule(m)) for m in ops.delta_modules(delta)}
        else:
            host = self.host(self.version)
            weights = {m: host.base_weight(m) for m in ops.delta_modules(delta)}
        with torch.no_grad():
            for module, weight in weights.items():
                if f"{module}.delta_W" in delta:
                    update = delta[f"{module}.delta_W"]
                else:
                    update = delta[f"{module}.delta_B"] @ delta[f"{module}.delta_A"]  # (d_out, d_in)
                weight.add_(update.to(device=weight.device, dtype=weight.dtype))
        self.version = version
        if self.quantized_run:
            self.hosts.clear()  # every variant is stale: each is re-quantized from the master on its next use
        else:
            self.hosts[FULL] = (version, self.hosts[FULL][1])
        return version

    def residuals(self, host: AdapterHost, quant: QuantSpec) -> Iterator[tuple[str, torch.Tensor]]:
        """(module, W − deq(q(W))) in float32 on CPU for every adapted module of ``host`` (a ``quant`` variant),
        one module at a time (they are d_out × d_in each: never all held at once)."""
        for module in sorted(host.target_paths()):
            layer = host.model.get_submodule("base_model.model." + module)
            if self.master is not None:
                full = weight_matrix(self.master.get_submodule(module)).detach().float().cpu()
            else:
                full = dequantized_weight(layer).cpu()
            yield module, full - dequantized_weight(layer).cpu()

    def loftq_init(self, host: AdapterHost, quant: QuantSpec, lora: LoraSpec) -> Tensors:
        """LoftQ-style start of a quantization-aware adapter: s·B·A = the rank-r truncated SVD of W − deq(q(W)),
        split evenly (B = U √S / √s, A = √S Vᵀ / √s); once per (base version, bit width, rank) per worker."""
        key = (self.version, quant, lora)
        if key not in self._loftq:
            out = {}
            for module, resid in self.residuals(host, quant):
                u, sv, vh = torch.linalg.svd(resid.double(), full_matrices=False)
                root = (sv[: lora.rank] / lora.scaling).sqrt()
                out[ops.b_key(module)] = (u[:, : lora.rank] * root).float()
                out[ops.a_key(module)] = (root[:, None] * vh[: lora.rank]).float()
            if len(self._loftq) >= 4 * MAX_BASES:
                self._loftq.pop(next(iter(self._loftq)))
            self._loftq[key] = out
        return {k: v.clone() for k, v in self._loftq[key].items()}

    def num_wraps(self) -> int:
        return sum(h.num_wraps for _, h in self.hosts.values())
