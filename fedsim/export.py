"""The model a run leaves behind, as one PEFT LoRA adapter: every update merged into the base during the run (FLoRA's
stacked factors, FedEx-LoRA's residuals) plus the final adapter, exactly.

Strategies that merge into the base start every round from a fresh adapter, so their final adapter alone holds
little of what the federation learned. The exported adapter is, per module, the total
``T = Σ_v ΔW_v + s·B·A`` written as one LoRA at scaling 1 (``alpha = r`` per module): through QR of the stacked
factors and the SVD of a small core when their width is below the layer's, else the eigendecomposition of the dense
``T``'s Gram matrix (:func:`fedsim.lora.ops.singular_form`, as FlexLoRA's aggregation); each factor carries ``√S``. Components whose singular value is below ``1e-7·s_max`` are dropped (an error of the order of
float32 rounding), so each module's rank is the numerical rank of its total, at most ``min(d_out, d_in)``; PEFT's
``rank_pattern`` / ``alpha_pattern`` give every module its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fedsim.config import Scenario
from fedsim.lora import ops
from fedsim.types import LoraSpec, Tensors

RELATIVE_CUTOFF = 1e-7


@dataclass
class ExportedAdapter:
    """An adapter in PEFT's layout: ``tensors`` keyed like the simulator's (``<module>.lora_A.weight`` …), the default
    ``lora`` and, where modules differ from it, per-module ranks and alphas (keys: escaped module paths)."""

    tensors: Tensors
    lora: LoraSpec
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


def complete_adapter(tensors: Tensors, lora: LoraSpec, deltas: Sequence[Tensors]) -> ExportedAdapter:
    """The final adapter with the base deltas folded in (unchanged when there are none).

    Args:
        tensors: the final global adapter (PEFT orientation: B (d_out, r), A (r, d_in)).
        lora: its rank and scaling.
        deltas: the updates merged into the base, oldest first: per module ``<module>.delta_B`` (d_out, R) and
            ``<module>.delta_A`` (R, d_in), or a dense ``<module>.delta_W`` (d_out, d_in).
    """
    if not deltas:
        return ExportedAdapter(dict(tensors), lora)
    return combine([(tensors, lora.scaling)], deltas)


def combine(adapters: Sequence[tuple[Tensors, float]], deltas: Sequence[Tensors] = ()) -> ExportedAdapter:
    """Σ deltas + Σ_j c_j B_j A_j per module, as one LoRA at scaling 1 (see the module's docstring)."""
    out: Tensors = {}
    ranks: dict[str, int] = {}
    names = {m for d in deltas for m in ops.delta_modules(d)}
    for tensors, _ in adapters:
        names |= set(ops.modules(tensors))
    for m in sorted(names):
        bs = [d[f"{m}.delta_B"].float() for d in deltas if f"{m}.delta_B" in d]
        as_ = [d[f"{m}.delta_A"].float() for d in deltas if f"{m}.delta_A" in d]
        dense = [d[f"{m}.delta_W"].float() for d in deltas if f"{m}.delta_W" in d]
        for tensors, c in adapters:
            if ops.b_key(m) in tensors and c != 0:
                bs.append(c * tensors[ops.b_key(m)].float())
                as_.append(tensors[ops.a_key(m)].float())
        if not bs and not dense:  # every contribution weighted 0: one zero component
            any_t = next(t for t, _ in adapters if ops.b_key(m) in t)
            out[ops.b_key(m)] = torch.zeros_like(any_t[ops.b_key(m)][:, :1]).float()
            out[ops.a_key(m)] = torch.zeros_like(any_t[ops.a_key(m)][:1]).float()
            ranks[m] = 1
            continue
        shape = dense[0].shape if dense else (bs[0].shape[0], as_[0].shape[1])
        if dense or sum(b.shape[1] for b in bs) >= min(shape):
            total = sum(dense, torch.zeros(shape))
            if bs:
                total = total + torch.cat(bs, 1) @ torch.cat(as_, 0)
            u, sa = ops.dense_singular_form(total)
        else:
            u, sa = ops.singular_form(torch.cat(bs, 1), torch.cat(as_, 0))
        s = sa.double().norm(dim=1)  # (U, S Vᵀ): the singular values are the rows' norms
        k = max(1, int((s > RELATIVE_CUTOFF * float(s.max())).sum()))
        root = s[:k].clamp_min(1e-30).sqrt()
        out[ops.b_key(m)] = (u[:, :k].double() * root).float().contiguous()
        out[ops.a_key(m)] = (sa[:k].double() / root[:, None]).float().contiguous()
        ranks[m] = k
    top = max(ranks.values())
    patterns = {re.escape(m): r for m, r in ranks.items() if r != top}
    return ExportedAdapter(out, LoraSpec(rank=top, alpha=float(top)), rank_pattern=patterns,
                           alpha_pattern={p: float(r) for p, r in patterns.items()})


def save_peft_adapter(adapter: ExportedAdapter, scenario: Scenario, path: Path) -> None:
    """Write the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), loadable with
    ``PeftModel.from_pretrained(base, path)`` on the same base model. The config is written without importing PEFT
    (with transformers, 3 s at the end of every run): the settings that differ from ``LoraConfig``'s defaults, which
    PEFT fills in when it loads the file (a test reads it back with PEFT and compares)."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(peft_config_dict(adapter, scenario), indent=2) + "\n",
                                               encoding="utf-8")
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in adapter.tensors.items()},
              str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


def peft_config_dict(adapter: ExportedAdapter, scenario: Scenario) -> dict:
    """The adapter's ``peft.LoraConfig`` settings, as its ``adapter_config.json`` holds them."""
    lora = adapter.lora
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": scenario.model.name,
            "r": lora.rank, "lora_alpha": lora.alpha, "use_rslora": lora.rslora,
            "rank_pattern": dict(adapter.rank_pattern), "alpha_pattern": dict(adapter.alpha_pattern),
            "target_modules": sorted(scenario.model.target_modules), "lora_dropout": scenario.model.lora_dropout,
            "bias": "none", "inference_mode": False}


def dense_totals(adapters: Sequence[tuple[Tensors, float]]) -> dict[str, torch.Tensor]:
    """Σ_j c_j B_j A_j per module, dense (d_out, d_in), float64."""
    out: dict[str, torch.Tensor] = {}
    for tensors, c in adapters:
        for m in ops.modules(tensors):
            dw = c * tensors[ops.b_key(m)].double() @ tensors[ops.a_key(m)].double()
            out[m] = out[m] + dw if m in out else dw
    return out


def export_client(run_dir: Path, client_id: int | None, out: Path, merged: bool = False) -> dict:
    """Write the model client ``client_id`` (None: the global model) uses at the end of the run: the global model plus its personal tensors
    (FedSA-LoRA's B, FedDPA's and PF2LoRA's local adapter, FedQLoRA's quantization-aware adapter), set up exactly as
    the simulator's personalized evaluation sets it up, as one PEFT adapter on the client's own base; ``merged``: a
    full model with everything merged in (``save_pretrained``, tokenizer included) — for a quantized client, its
    dequantized base plus the adapters, i.e. the model it evaluates.

    Returns what was written (``fedsim_export.json`` holds the same).

    Raises:
        ScenarioError: no run, no checkpoint, no such client, or an adapter that cannot be exact (a quantized base
            re-quantized after merges: use ``merged``).
    """
    import json
    import shutil
    import tempfile

    from fedsim import checkpoint
    from fedsim.client.store import ClientStateStore
    from fedsim.config import load_scenario
    from fedsim.driver import prepare
    from fedsim.errors import ScenarioError
    from fedsim.models.quant import FULL
    from fedsim.runtime.worker import Worker
    from fedsim.server import Server

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "scenario.yaml").is_file():
        raise ScenarioError("RUN_DIR", f"{run_dir} holds no scenario.yaml", "give a run directory written by fedsim run")
    sc = load_scenario(run_dir / "scenario.yaml")
    if client_id is not None and not 0 <= client_id < sc.clients.num_clients:
        raise ScenarioError("--client", f"client {client_id} is not in the run (clients 0..{sc.clients.num_clients - 1})",
                            "give a client id of the run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ScenarioError("--out", f"{out} exists and is not an empty directory", "give a new directory")
    last, state, strategy_state, used = checkpoint.load(run_dir)
    prep = prepare(sc)
    quant = prep.clients[client_id].quant if client_id is not None else FULL
    server = Server(sc.strategy.name, sc.strategy.params, prep.spec)
    server.set_state(state, strategy_state)
    personal = None
    if client_id is not None:
        with tempfile.TemporaryDirectory(prefix="fedsim-export-") as tmp:
            checkpoint.restore_client_state(used, Path(tmp))
            personal = ClientStateStore.open(tmp).get(client_id)
    worker = Worker(sc, prep.data)
    deltas = server.base_deltas(since=0)
    for version, delta in deltas:
        worker.apply_base_delta(version, delta)
    payload = server.eval_payload()
    own = worker._personal_payload(payload, quant) if client_id is not None else replace(payload, personal_lora=None)
    host = worker.host(payload.base_version, quant)
    host.activate(own.lora, own.personal_lora, own.mix)
    worker._load(host, own, client_id, personal, quant)
    parts = [(host.read(own.lora), own.lora.scaling * (own.mix[0] if own.personal_lora is not None else 1.0))]
    if own.personal_lora is not None:
        parts.append((host.read(own.personal_lora, personal=True), own.personal_lora.scaling * own.mix[1]))
    quantized = quant.bits < 16
    out.mkdir(parents=True, exist_ok=True)
    info = {"run_dir": str(run_dir), "client_id": client_id, "round": last, "strategy": sc.strategy.name,
            "base_model": sc.model.name, "base_bits": quant.bits, "base_backend": quant.label,
            "merged": merged, "personal": personal is not None}
    if own.extras.get("dynamic"):
        info["note"] = ("FedDPA-D weighs the two adapters per test instance; the export holds the training mixture "
                        f"(global {own.mix[0]:g}, local {own.mix[1]:g})")
    if merged:
        from fedsim.models.base import build_base_model, load_tokenizer
        from fedsim.models.quant import dequantized_weight

        model = build_base_model(sc.model, "cpu")
        totals = dense_totals(parts)
        with torch.no_grad():
            for m in host.target_paths():
                layer = host.model.get_submodule("base_model.model." + m)
                base = dequantized_weight(layer).cpu().double() if quantized else \
                    getattr(layer, "base_layer", layer).weight.detach().cpu().double()
                target = model.get_submodule(m).weight
                target.copy_((base + totals.get(m, 0.0)).to(target.dtype))
        model.save_pretrained(str(out))
        load_tokenizer(sc.model).save_pretrained(str(out))
    else:
        if quantized and deltas:
            shutil.rmtree(out, ignore_errors=True)
            raise ScenarioError("--merged", f"client {client_id}'s base is {quant.label}, re-quantized after the run "
                                "merged updates into it: no adapter on the original quantized base reproduces it",
                                "export with --merged (its dequantized base with everything merged in)")
        save_peft_adapter(combine(parts, [d for _, d in deltas] if not quantized else []), sc, out)
    (out / "fedsim_export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info
