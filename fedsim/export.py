"""``fedsim export``: the model a client (or the federation) uses at the end of a run, for PEFT or as a full model.

The exported adapter folds every update merged into the base during the run into one LoRA adapter, exactly
(:mod:`fedsim.lora.merge`); a client's adds its personal tensors, set up as the simulator's personalized evaluation
sets them up.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedsim import checkpoint
from fedsim.client.store import ClientStateStore
from fedsim.components import resolve
from fedsim.config import Scenario, load_scenario
from fedsim.errors import FedsimError, ScenarioError
from fedsim.federation.artifacts import write_tokenizer
from fedsim.federation.prepare import prepare
from fedsim.lora.merge import combine, dense_totals
from fedsim.lora.ops import HEAD_PREFIX
from fedsim.models.adapter_io import save_peft_adapter
from fedsim.runtime.personal_eval import own_payload
from fedsim.runtime.worker import Worker
from fedsim.server import Server
from fedsim.types import FULL, QuantSpec, Tensors


def export_client(run_dir: Path, client_id: int | None, out: Path, merged: bool = False,
                  previous: bool = False) -> dict:
    """Write the model client ``client_id`` (None: the global model) uses at the end of the run: the global model
    plus its personal tensors (FedSA-LoRA's B, FedDPA's and PF2LoRA's local adapter, FedQLoRA's quantization-aware
    adapter), set up exactly as the simulator's personalized evaluation sets it up, as one PEFT adapter on the
    client's own base; ``merged``: a full model with everything merged in (``save_pretrained``, tokenizer included)
    — for a quantized client, its dequantized base plus the adapters, i.e. the model it evaluates.

    Returns what was written (``fedsim_export.json`` holds the same).

    Raises:
        ScenarioError: no run, no checkpoint, no such client, or an adapter that cannot be exact (a quantized base
            re-quantized after merges: use ``merged``).
    """
    run_dir, out = Path(run_dir), Path(out)
    sc = _checked(run_dir, client_id, out)
    command = f"fedsim export {{run_dir}}{f' --client {client_id}' if client_id is not None else ''}"
    last, state, strategy_state, used = checkpoint.load(run_dir, previous,
                                                        command + (" --merged" if merged else ""))
    checkpoint.check_resume(used, sc, field="RUN_DIR")  # the model merged into the base the run actually used
    prep = prepare(sc)
    components = resolve(sc)
    quant = prep.clients[client_id].quant if client_id is not None else FULL
    server = Server(components.strategy, spec=prep.spec, stages=components.stages,
                         objectives=components.objectives)
    server.set_state(state, strategy_state)
    personal = _personal_state(used, client_id) if client_id is not None else None
    worker = Worker(sc, prep.data, components=components)
    deltas = server.base_deltas(since=0)
    for version, delta in deltas:
        worker.apply_base_delta(version, delta)
    payload = server.eval_payload()
    own = own_payload(payload, quant) if client_id is not None else replace(payload, personal_lora=None)
    host = worker.host(payload.base_version, quant)
    host.activate(own.lora, own.personal_lora, own.mix)
    worker.starts.load(host, own, client_id, personal, quant)
    parts = [(host.read(own.lora), own.lora.scaling * (own.mix[0] if own.personal_lora is not None else 1.0))]
    if own.personal_lora is not None:
        parts.append((host.read(own.personal_lora, personal=True), own.personal_lora.scaling * own.mix[1]))
    info = {"run_dir": str(run_dir), "client_id": client_id, "round": last, "strategy": sc.strategy.name,
            "base_model": sc.model.name, "base_bits": quant.bits, "base_backend": quant.label,
            "merged": merged, "personal": personal is not None}
    if own.dynamic_mix is not None:
        info["note"] = ("FedDPA-D weighs the two adapters per test instance; the export holds the training mixture "
                        f"(global {own.mix[0]:g}, local {own.mix[1]:g})")

    def write(tmp: Path) -> None:
        if merged:
            _write_merged(sc, host, parts, quant, components.task, tmp)
        else:
            _write_adapter(sc, parts, quant, [d for _, d in deltas], client_id, components.task, tmp,
                           host.read_head())
        (tmp / "fedsim_export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")

    _atomically(out, write)
    return info


def _atomically(out: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a new directory beside ``out``, renamed to ``out`` once complete: a failure (a full disk —
    ``OSError``, or safetensors' ``SafetensorError`` — a killed process) leaves no half-written export at ``out``.

    Raises:
        FedsimError: the export could not be written (naming the cause; nothing is left behind).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        if out.is_dir():  # the empty directory _checked allowed
            out.rmdir()
        os.replace(tmp, out)
    except Exception as e:  # noqa: BLE001 — OSError, SafetensorError (not an OSError) and what savers raise
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, FedsimError):
            raise
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedsimError(f"cannot write the export to {out}: {type(e).__name__}: {cause}; nothing was left there "
                          "(fix: free space or give --out on another disk)") from None


def _checked(run_dir: Path, client_id: int | None, out: Path) -> Scenario:
    """The run's scenario, once the run, the client and the output directory are checked."""
    if not (run_dir / "scenario.yaml").is_file():
        raise ScenarioError("RUN_DIR", f"{run_dir} holds no scenario.yaml", "give a run directory written by fedsim run")
    sc = load_scenario(run_dir / "scenario.yaml", relative_to=Path.cwd())
    if client_id is not None and not 0 <= client_id < sc.clients.num_clients:
        raise ScenarioError("--client", f"client {client_id} is not in the run (clients 0..{sc.clients.num_clients - 1})",
                            "give a client id of the run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ScenarioError("--out", f"{out} exists and is not an empty directory", "give a new directory")
    return sc


def _personal_state(checkpoint_dir: Path, client_id: int) -> Tensors | None:
    """The client's private tensors as the checkpoint's client state snapshot holds them."""
    with tempfile.TemporaryDirectory(prefix="fedsim-export-") as tmp:
        checkpoint.restore_client_state(checkpoint_dir, Path(tmp))
        return ClientStateStore.open(tmp).get(client_id)


def _write_merged(sc: Scenario, host: Any, parts: list, quant: QuantSpec, task: Any, out: Path) -> None:
    """A full model: the client's base (dequantized) plus every adapter, merged (``save_pretrained`` + tokenizer)."""
    from fedsim.models.base import weight_matrix
    from fedsim.models.quant import dequantized_weight

    model = task.build(sc.model, "cpu")
    totals = dense_totals(parts)
    with torch.no_grad():
        for m in host.target_paths():
            layer = host.model.get_submodule("base_model.model." + m)
            base = dequantized_weight(layer).cpu().double() if quant.bits < 16 else \
                weight_matrix(layer).detach().cpu().double()
            target = weight_matrix(model.get_submodule(m))
            target.copy_((base + totals.get(m, 0.0)).to(target.dtype))
        params = dict(model.named_parameters())
        for k, v in host.read_head().items():  # the trained classifier head, in place of the initial one
            target = params[k[len(HEAD_PREFIX):]]
            target.copy_(v.to(target.dtype))
    model.save_pretrained(str(out))
    write_tokenizer(sc, task, out)


def _write_adapter(sc: Scenario, parts: list, quant: QuantSpec, deltas: list[Tensors], client_id: int | None,
                   task: Any, out: Path, head: Tensors) -> None:
    """One PEFT adapter on the client's own base: its adapters, plus (full-precision bases) every merged update, and
    the trained head of a model task that has one.

    Raises:
        ScenarioError: a quantized base re-quantized after merges (no adapter on the original base reproduces it).
    """
    quantized = quant.bits < 16
    if quantized and deltas:
        shutil.rmtree(out, ignore_errors=True)
        raise ScenarioError("--merged", f"client {client_id}'s base is {quant.label}, re-quantized after the run "
                            "merged updates into it: no adapter on the original quantized base reproduces it",
                            "export with --merged (its dequantized base with everything merged in)")
    save_peft_adapter(replace(combine(parts, deltas if not quantized else []), head=head), sc, out, task)
    write_tokenizer(sc, task, out)
