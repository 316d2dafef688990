"""W&B offline run files (``RUN_DIR/wandb/offline-run-*/run-*.wandb``) read back: the LevelDB-style log W&B writes,
whose records are wandb's own protobuf ``Record`` messages (parsed with wandb's generated classes).

A resume reads what W&B holds *durably* here — after ``kill -9`` the last records (even all of them) may be missing
from the file although ``wandb.log`` was called — so that it sends again exactly what is missing: no gap, no step
twice.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
RECORD = struct.Struct("<IHB")  # checksum, length, type (1 full, 2 first, 3 middle, 4 last)


def records(path: Path) -> list[Any]:
    """Every complete Record in one ``.wandb`` file, in order (a file cut short ends at its last whole record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < HEADER.size:
        return []
    ident, magic, _ = HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        return []
    out, pos, parts = [], HEADER.size, b""
    while pos + RECORD.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD.size:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = RECORD.unpack_from(data, pos)
        if kind == 0 and length == 0:
            pos += left
            continue
        payload = data[pos + RECORD.size: pos + RECORD.size + length]
        if len(payload) < length:
            break  # cut short by a kill
        pos += RECORD.size + length
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (2, 3):
            continue
        rec = pb.Record()
        try:
            rec.ParseFromString(parts)
        except Exception:  # noqa: BLE001 - a damaged record: nothing after it is trusted
            break
        out.append(rec)
        parts = b""
    return out


def run_files(run_dir: Path) -> list[Path]:
    """The offline segments of a run, oldest first (one per process that logged to it)."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Every history row of every offline segment of the run, in order: {"_step": …, key: value}."""
    rows = []
    for f in run_files(run_dir):
        for rec in records(f):
            if rec.WhichOneof("record_type") == "history":
                row = {}
                for item in rec.history.item:
                    key = item.key or "/".join(item.nested_key)
                    row[key] = json.loads(item.value_json)
                if rec.history.HasField("step"):
                    row["_step"] = rec.history.step.num
                rows.append(row)
    return rows


def durable_step(run_dir: Path) -> int:
    """The highest step the run's offline files hold (-1: none)."""
    return max((int(row["_step"]) for row in history(run_dir) if "_step" in row), default=-1)


def of_type(run_dir: Path, kind: str) -> list[Any]:
    return [rec for f in run_files(run_dir) for rec in records(f) if rec.WhichOneof("record_type") == kind]
