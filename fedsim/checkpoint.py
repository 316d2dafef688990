"""Checkpoints: the server's full state in safetensors + JSON (never pickle), written atomically.

Nothing else needs saving to resume exactly: client sampling, data order and fresh adapters all derive from
(seed, round, client id), the partition from the seed, and the metrics so far are in ``metrics.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedsim.errors import FedsimError, ScenarioError, write_failure
from fedsim.types import GlobalState, LoraSpec

FORMAT = 1
DIRNAME = "checkpoint"


def _encode(obj: Any, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    """JSON with non-string dict keys and tuples preserved (tagged); tensors go to ``tensors`` (saved with the
    state's safetensors file) and are referred to by name."""
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise TypeError("tensors in this part of a checkpoint are not supported")
        name = f"state/{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__pairs__": [[_encode(k), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} (strategy state must be JSON data or tensors)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"} and tensors is not None:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__pairs__"}:
            return {_decode(k): _decode(v, tensors) for k, v in obj["__pairs__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


PREVIOUS = f".{DIRNAME}.prev"  # the checkpoint before the newest one, kept until the next one is complete


class CheckpointError(FedsimError):
    """A checkpoint could not be written, or is corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(run_dir: Path, server_round: int, state: GlobalState, strategy_state: dict[str, Any],
         client_state: Path | None = None, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``run_dir/checkpoint`` for the state after ``server_round``, atomically: the new one is written beside
    the old, with a SHA-256 digest of every file in its ``meta.json``, then swapped in; the one before stays as
    ``.checkpoint.prev`` (a fallback should the newest ever be damaged).

    ``client_state``: a flushed client state store directory, snapshotted by hard links (its files are only ever
    replaced, never rewritten in place, so a link keeps this round's version). ``provenance``: what the state was
    computed from (:func:`provenance`), checked by :func:`check_resume`.

    Raises:
        CheckpointError: the write failed (e.g. a full disk); nothing half-written is left, the last good
            checkpoint is intact.
    """
    from safetensors import SafetensorError

    tmp = run_dir / f".{DIRNAME}.tmp"
    try:
        return _save(run_dir, tmp, server_round, state, strategy_state, client_state, provenance)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error, not an OSError
        shutil.rmtree(tmp, ignore_errors=True)
        last = last_round(run_dir)
        kept = (f"the last good checkpoint (round {last}) is intact in {run_dir / DIRNAME}" if last else
                "no earlier checkpoint exists")
        raise CheckpointError(
            f"could not write the checkpoint of round {server_round} in {run_dir}: {write_failure(e)}; {kept}. "
            f"Free space (or fix the directory), then continue with `fedsim run --resume {run_dir}`") from None


def _save(run_dir: Path, tmp: Path, server_round: int, state: GlobalState, strategy_state: dict[str, Any],
          client_state: Path | None, provenance: dict[str, Any] | None) -> Path:
    tensors = {f"global/{k}": v.contiguous() for k, v in state.tensors.items()}
    for v, delta in enumerate(state.base_deltas, start=1):
        tensors.update({f"delta/{v}/{k}": t.contiguous() for k, t in delta.items()})
    meta = {"format": FORMAT, "round": server_round, "base_version": state.base_version,
            "num_base_deltas": len(state.base_deltas),
            "lora": {"rank": state.lora.rank, "alpha": state.lora.alpha, "rslora": state.lora.rslora},
            "extras": _encode(state.extras), "strategy_state": _encode(strategy_state, tensors)}
    if provenance is not None:
        meta["provenance"] = provenance
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    digests = {"state.safetensors": _sha256(tmp / "state.safetensors")}
    if client_state is not None:
        snap = tmp / "client_state"
        snap.mkdir()
        for f in Path(client_state).glob("*.safetensors"):
            try:
                os.link(f, snap / f.name)
            except OSError:
                shutil.copy2(f, snap / f.name)
            digests[f"client_state/{f.name}"] = _sha256(snap / f.name)
    meta["digests"] = digests
    text = json.dumps(meta, indent=1)
    meta["meta_digest"] = hashlib.sha256(text.encode()).hexdigest()  # of the text above: catches a cut meta.json
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    final, prev = run_dir / DIRNAME, run_dir / PREVIOUS
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(final, prev)
    os.replace(tmp, final)
    return final


def _round_of(path: Path) -> int | None:
    try:
        return int(_read_meta(path)["round"])
    except Exception:
        return None


def last_round(run_dir: Path) -> int | None:
    """The round of ``run_dir``'s newest readable checkpoint (None if it has none)."""
    return _round_of(Path(run_dir) / DIRNAME) or _round_of(Path(run_dir) / PREVIOUS)


def exists(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint (also one left mid-replacement by a kill, or only damaged ones)."""
    return any((Path(run_dir) / d / "meta.json").is_file() for d in (DIRNAME, PREVIOUS, f".{DIRNAME}.old"))


def _read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint directory, checked against its own digest.

    Raises:
        CheckpointError: missing, not JSON, cut short or edited.
    """
    file = path / "meta.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{file} is corrupt or partial (not valid JSON)") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} is corrupt (not a JSON object)")
    digest = meta.pop("meta_digest", None)
    if digest is None:
        raise CheckpointError(f"{file} carries no digest of its own (it was edited, or not written by fedsim)")
    if hashlib.sha256(json.dumps(meta, indent=1).encode()).hexdigest() != digest:
        raise CheckpointError(f"{file} was changed after it was written (its digest does not match)")
    if meta.get("format") != FORMAT:
        raise ScenarioError("--resume", f"checkpoint format {meta.get('format')} is not {FORMAT}",
                            "resume with the fedsim version that wrote it")
    for key, kind in (("round", int), ("base_version", int), ("num_base_deltas", int), ("lora", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{file} is corrupt: {key!r} is missing or not a {kind.__name__}")
    return meta


def _read(path: Path) -> tuple[int, GlobalState, dict[str, Any]]:
    meta = _read_meta(path)
    for name, digest in meta.get("digests", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f} is corrupt or partial (its SHA-256 does not match the one written with it)")
    try:
        flat = load_file(str(path / "state.safetensors"))
    except Exception as e:
        raise CheckpointError(f"{path / 'state.safetensors'} is corrupt or unreadable ({e.__class__.__name__})") \
            from None
    tensors = {k[len("global/"):]: v for k, v in flat.items() if k.startswith("global/")}
    deltas: list[dict[str, torch.Tensor]] = [{} for _ in range(meta["num_base_deltas"])]
    try:
        for k, v in flat.items():
            if k.startswith("delta/"):
                _, version, key = k.split("/", 2)
                deltas[int(version) - 1][key] = v
        state = GlobalState(tensors=tensors, lora=LoraSpec(**meta["lora"]), base_version=meta["base_version"],
                            extras=_decode(meta["extras"]), base_deltas=deltas)
        saved = {k: v for k, v in flat.items() if k.startswith("state/")}
        strategy_state = _decode(meta["strategy_state"], saved)
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise CheckpointError(f"{path} is inconsistent ({e.__class__.__name__}: {e})") from None
    return meta["round"], state, strategy_state


def load(run_dir: Path, previous: bool = False, command: str = "fedsim run --resume {run_dir}"
         ) -> tuple[int, GlobalState, dict[str, Any], Path]:
    """(round, global state, strategy state, the checkpoint directory read) from ``run_dir/checkpoint``
    (``previous``: from the one before it), every file verified against the digest written with it. ``command``:
    what the reader runs (``{run_dir}`` filled in), which the errors' fixes repeat with ``--previous-checkpoint``.

    Raises:
        ScenarioError: no checkpoint, one written by an incompatible version, or a damaged one — naming the file,
            and the intact previous checkpoint to resume from when there is one.
    """
    run_dir = Path(run_dir)
    final, prev, old = run_dir / DIRNAME, run_dir / PREVIOUS, run_dir / f".{DIRNAME}.old"
    if previous:
        if not (prev / "meta.json").is_file():
            raise ScenarioError("--previous-checkpoint", f"{run_dir} keeps no previous checkpoint",
                                f"read the newest: {command.format(run_dir=run_dir)}")
        try:
            return (*_read(prev), prev)
        except CheckpointError as e:
            raise ScenarioError("--resume", f"the previous checkpoint is damaged too: {e}",
                                "start the run anew; the metrics so far are in metrics.jsonl") from None
    if not (final / "meta.json").is_file():
        # killed between the two renames of save(): the newest complete checkpoint is the previous one
        for fallback in (prev, old):
            if (fallback / "meta.json").is_file():
                final = fallback
                break
        else:
            raise ScenarioError("--resume", f"{run_dir} holds no checkpoint",
                                "resume a run directory written by `fedsim run` (checkpoint.every sets how often)")
    try:
        return (*_read(final), final)
    except CheckpointError as e:
        back = _round_of(prev) if final != prev and (prev / "meta.json").is_file() else None
        if back is not None:
            try:
                _read(prev)
            except CheckpointError:
                back = None
        if back is not None:
            raise ScenarioError("--resume" if "--resume" in command else "RUN_DIR",
                                f"{e}; the previous checkpoint (round {back}) is intact",
                                f"use it: {command.format(run_dir=run_dir)} --previous-checkpoint") from None
        raise ScenarioError("--resume", str(e), "start the run anew; the metrics so far are in metrics.jsonl") \
            from None


DAMAGED = f".{DIRNAME}.damaged"  # a newest checkpoint set aside by a resume from the previous one


def set_aside_newest(run_dir: Path) -> Path | None:
    """Before a run resumed from the previous checkpoint writes its next one: move the (damaged) newest out of the
    rotation, to ``.checkpoint.damaged``, so that the next save does not push it into ``.checkpoint.prev`` over the
    good checkpoint the run resumed from. Returns where it went (None: there was none)."""
    final = Path(run_dir) / DIRNAME
    if not final.exists():
        return None
    target = Path(run_dir) / DAMAGED
    shutil.rmtree(target, ignore_errors=True)
    os.replace(final, target)
    return target


def restore_client_state(checkpoint_dir: Path | None, target: Path) -> None:
    """Replace ``target`` with the client state snapshot of ``checkpoint_dir`` (the one :func:`load` read; None, or
    one without a snapshot: an empty store)."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    snap = Path(checkpoint_dir) / "client_state" if checkpoint_dir is not None else None
    if snap is not None and snap.is_dir():
        for f in snap.glob("*.safetensors"):
            shutil.copy2(f, target / f.name)


# --------------------------------------------------------------------------------------------------------------
# what a checkpoint was computed from

CHANGEABLE = ("name", "logging", "checkpoint", "resources", "eval.batch_size")
"""Keys (and sections) that ``--allow-changed`` may let differ on resume: they say where results go, how often they
are saved and how the work is spread, never what is computed."""


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj))  # the form meta.json gives back (e.g. integer mapping keys as strings)


def provenance(scenario: Any) -> dict[str, Any]:
    """The resolved scenario and the SHA-256 of every local data file it reads."""
    from fedsim.data.sources import data_files, file_digest

    return {"scenario": _json(scenario.model_dump(mode="json")),
            "data_files": {f: file_digest(f) for f in data_files(scenario.data)}}


def _default_scenario() -> dict[str, Any]:
    """Every key of a scenario at its default (the schema's; the strategy is not looked up)."""
    from fedsim.config import scenario_from_dict

    return scenario_from_dict({}, check_strategy=False).model_dump(mode="json")


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _covered(key: str, by: tuple[str, ...]) -> bool:
    return any(key == b or key.startswith(b + ".") for b in by)


def check_resume(checkpoint_dir: Path, scenario: Any, allow_changed: tuple[str, ...] = (),
                 field: str = "--resume") -> None:
    """Refuse to continue (or export) a checkpoint with a scenario or data files other than those it was computed
    from, or one without the record to tell.

    ``allow_changed``: keys or sections (within :data:`CHANGEABLE`) that may differ; ``field``: what the errors name.

    Raises:
        ScenarioError: naming every key that differs (old → new) and every data file whose contents changed.
    """
    for key in allow_changed:
        if not _covered(key, CHANGEABLE):
            raise ScenarioError("--allow-changed", f"{key!r} changes what the run computes, so a resume cannot "
                                f"change it", f"start a new run instead; keys that may change: {', '.join(CHANGEABLE)}")
    try:
        was = json.loads((Path(checkpoint_dir) / "meta.json").read_text(encoding="utf-8")).get("provenance")
    except (OSError, json.JSONDecodeError):
        return  # load() has verified this file already
    if not isinstance(was, dict) or not isinstance(was.get("scenario"), dict):
        raise ScenarioError(field, f"{Path(checkpoint_dir) / 'meta.json'} holds no record of the scenario it was "
                            "computed from, so a changed scenario.yaml could not be told apart",
                            "start the run anew")
    now = provenance(scenario)
    old, new = _flat(was["scenario"]), _flat(now["scenario"])
    defaults = _flat(_json(_default_scenario()))
    absent = object()
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k, absent) != new.get(k, absent)
               and not _covered(k, allow_changed)
               # a key newer than the checkpoint, at its default: the run computed what the default computes
               and not (k not in old and k in defaults and new.get(k) == defaults[k])]
    problems = [f"{k}: {old.get(k, '(absent)')!r} → {new.get(k, '(absent)')!r}" for k in changed]
    files_old, files_new = was.get("data_files", {}), now["data_files"]
    for f in sorted(set(files_old) | set(files_new)):
        if f not in files_new:
            problems.append(f"data file {f} is no longer read")
        elif f not in files_old:
            problems.append(f"data file {f} was not read before")
        elif files_old[f] != files_new[f]:
            problems.append(f"data file {f} changed since the checkpoint (its SHA-256 differs)")
    if problems:
        can = [k for k in changed if _covered(k, CHANGEABLE)]
        fix = ("restore them in scenario.yaml and the data files, or start a new run"
               + (f"; to keep the new {', '.join(can)} pass --allow-changed {' '.join(can)}" if can else ""))
        raise ScenarioError(field, f"the scenario or its data changed since the checkpoint of "
                            f"{Path(checkpoint_dir).parent}: " + "; ".join(problems), fix)
