"""Checkpoints: the server's full state in safetensors + JSON (never pickle), written atomically.

Nothing else needs saving to resume exactly: client sampling, data order and fresh adapters all derive from
(seed, round, client id), the partition from the seed, and the metrics so far are in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedsim.errors import ScenarioError
from fedsim.types import GlobalState, LoraSpec

FORMAT = 1
DIRNAME = "checkpoint"


def _encode(obj: Any) -> Any:
    """JSON with non-string dict keys and tuples preserved (tagged)."""
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v) for k, v in obj.items()}
        return {"__pairs__": [[_encode(k), _encode(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} (strategy state must be JSON data or tensors)")


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__pairs__"}:
            return {_decode(k): _decode(v) for k, v in obj["__pairs__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v) for v in obj["__tuple__"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def save(run_dir: Path, server_round: int, state: GlobalState, strategy_state: dict[str, Any],
         client_state: Path | None = None) -> Path:
    """Write ``run_dir/checkpoint`` for the state after ``server_round`` (replacing any older one atomically).

    ``client_state``: a flushed client state store directory, snapshotted by hard links (its files are only ever
    replaced, never rewritten in place, so a link keeps this round's version)."""
    tensors = {f"global/{k}": v.contiguous() for k, v in state.tensors.items()}
    for v, delta in enumerate(state.base_deltas, start=1):
        tensors.update({f"delta/{v}/{k}": t.contiguous() for k, t in delta.items()})
    meta = {"format": FORMAT, "round": server_round, "base_version": state.base_version,
            "num_base_deltas": len(state.base_deltas),
            "lora": {"rank": state.lora.rank, "alpha": state.lora.alpha, "rslora": state.lora.rslora},
            "extras": _encode(state.extras), "strategy_state": _encode(strategy_state)}
    tmp = run_dir / f".{DIRNAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if client_state is not None:
        snap = tmp / "client_state"
        snap.mkdir()
        for f in Path(client_state).glob("*.safetensors"):
            try:
                os.link(f, snap / f.name)
            except OSError:
                shutil.copy2(f, snap / f.name)
    final = run_dir / DIRNAME
    old = run_dir / f".{DIRNAME}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def exists(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint (also one left mid-replacement by a kill)."""
    return any((Path(run_dir) / d / "meta.json").is_file() for d in (DIRNAME, f".{DIRNAME}.old"))


def load(run_dir: Path) -> tuple[int, GlobalState, dict[str, Any]]:
    """(round, global state, strategy state) from ``run_dir/checkpoint``.

    Raises:
        ScenarioError: no checkpoint, or one written by an incompatible version.
    """
    path = Path(run_dir) / DIRNAME
    if not (path / "meta.json").is_file():
        old = Path(run_dir) / f".{DIRNAME}.old"  # killed between the two renames of save()
        if (old / "meta.json").is_file():
            path = old
        else:
            raise ScenarioError("--resume", f"{run_dir} holds no checkpoint",
                                "resume a run directory written by `fedsim run` (checkpoint.every sets how often)")
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ScenarioError("--resume", f"checkpoint format {meta.get('format')} is not {FORMAT}",
                            "resume with the fedsim version that wrote it")
    flat = load_file(str(path / "state.safetensors"))
    tensors = {k[len("global/"):]: v for k, v in flat.items() if k.startswith("global/")}
    deltas: list[dict[str, torch.Tensor]] = [{} for _ in range(meta["num_base_deltas"])]
    for k, v in flat.items():
        if k.startswith("delta/"):
            _, version, key = k.split("/", 2)
            deltas[int(version) - 1][key] = v
    state = GlobalState(tensors=tensors, lora=LoraSpec(**meta["lora"]), base_version=meta["base_version"],
                        extras=_decode(meta["extras"]), base_deltas=deltas)
    return meta["round"], state, _decode(meta["strategy_state"])


def restore_client_state(run_dir: Path, target: Path) -> None:
    """Replace ``target`` with the client state snapshot of the checkpoint in ``run_dir`` (if it has one)."""
    snap = Path(run_dir) / DIRNAME / "client_state"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if snap.is_dir():
        for f in snap.glob("*.safetensors"):
            shutil.copy2(f, target / f.name)
