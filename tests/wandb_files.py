"""Read W&B offline run files (``run-<id>.wandb``) back: the LevelDB-style log W&B writes, whose records are wandb's
own protobuf ``Record`` messages (parsed with wandb's generated classes)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
RECORD = struct.Struct("<IHB")  # checksum, length, type (1 full, 2 first, 3 middle, 4 last)


def records(path: Path) -> list[Any]:
    """Every Record in one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _ = HEADER.unpack_from(data, 0)
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B run file"
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
        pos += RECORD.size + length
        if kind == 1:
            parts = payload
        elif kind == 2:
            parts = payload
            continue
        elif kind == 3:
            parts += payload
            continue
        else:
            parts += payload
        rec = pb.Record()
        rec.ParseFromString(parts)
        out.append(rec)
        parts = b""
    return out


def run_files(run_dir: Path) -> list[Path]:
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


def of_type(run_dir: Path, kind: str) -> list[Any]:
    return [rec for f in run_files(run_dir) for rec in records(f) if rec.WhichOneof("record_type") == kind]
