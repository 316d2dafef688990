"""Relative paths in a scenario: a scenario file's resolve against the file's own directory, so that a run reads the
same files from any working directory; values given on the command line (``--set``) or in a mapping built in code
resolve against the current directory. Every local path the scenario names is then absolute (the run directory's
``scenario.yaml`` included, so that a resume from anywhere reads the same files); hub ids and the built-in names
(``synthetic``, ``tiny``, ``package:...``) are left as they are.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# a Hugging Face hub repository id: ``name`` or ``namespace/name`` (huggingface_hub's validate_repo_id, in short)
_HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)?")
_DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
BUILT_IN = {"synthetic", "tiny"}
RELATIVE = ("relative paths in a scenario file resolve against the file's directory, those given with --set against "
            "the current one")
HUB_OR_LOCAL = ("give a hub id you can reach, or a local directory saved with save_pretrained (none of that name was "
                f"found locally: {RELATIVE})")


def could_be_hub_id(value: str) -> bool:
    """Whether ``value`` has the form of a hub id (``org/name`` or ``name``; no ``..``, no leading dot)."""
    return bool(_HUB_ID.fullmatch(value)) and ".." not in value and "--" not in value


def _looks_local(value: str, kind: str) -> bool:
    """A value that can only be a local path: it starts with ``./``, ``../`` or ``~``, is not of a hub id's form, or
    (a data source) names a data file or a glob."""
    if kind == "local" or value.startswith(("./", "../", "~", ".\\", "..\\")) or value in (".", ".."):
        return True
    if kind == "data" and (value.lower().endswith(_DATA_EXTENSIONS) or any(ch in value for ch in "*?[")):
        return True
    return not could_be_hub_id(value)


def resolve(value: str, base: Path, kind: str = "local") -> str:
    """``value`` as an absolute path when it is a local one, a relative one taken from ``base``.

    ``kind``: ``local`` (always a path: a config file, a directory fedsim creates), ``data`` (a data source: a path,
    a glob, or a hub data set) or ``model`` (a local directory or a hub id). A value of a hub id's form (``org/name``)
    is a local path only where ``base`` holds it.
    """
    if value in BUILT_IN or value.startswith("package:") or not value:
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return os.path.normpath(expanded)
    joined = os.path.normpath(os.path.join(base, expanded))
    if _looks_local(value, kind) or os.path.exists(joined):
        return joined
    return value  # a hub id


# (keys to the value, its kind — see resolve); "*" stands for every entry of a mapping
PATH_FIELDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("data", "source"), "data"),
    (("data", "test", "source"), "data"),
    (("data", "sources", "*", "source"), "data"),
    (("data", "sources", "*", "test_source"), "data"),
    (("model", "name"), "model"),
    (("model", "tokenizer"), "model"),
    (("model", "config"), "local"),
    (("clients", "state_dir"), "local"),
    (("eval", "harness", "include_path"), "local"),
    (("logging", "tensorboard", "dir"), "local"),
)


def resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of a raw scenario mapping with its local paths made absolute, relative ones taken from ``base``."""
    out = dict(raw)

    def walk(node: Any, keys: tuple[str, ...], kind: str) -> Any:
        if not isinstance(node, dict):
            return node
        node = dict(node)
        head, rest = keys[0], keys[1:]
        for name in list(node) if head == "*" else [head] if head in node else []:
            if rest:
                node[name] = walk(node[name], rest, kind)
            elif isinstance(node[name], str):
                node[name] = resolve(node[name], base, kind)
        return node

    for keys, kind in PATH_FIELDS:
        out = walk(out, keys, kind)
    return out
