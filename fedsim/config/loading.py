"""Scenario files in, validated scenarios out: YAML loading, ``--set`` overrides, one-line errors."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedsim.config.base import format_validation
from fedsim.config.paths import resolve_paths
from fedsim.config.scenario import Scenario
from fedsim.errors import ScenarioError


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``a.b.c=value`` override; the value is parsed as YAML (so ``3``, ``0.5``, ``[a, b]`` work)."""
    if "=" not in text:
        raise ScenarioError("--set", f"override {text!r} has no '='", "write it as key.path=value, e.g. rounds=5")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise ScenarioError("--set", f"override {text!r} has an empty key", "write it as key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ScenarioError(key, f"override value {raw!r} is not valid YAML ({e.__class__.__name__})") from None
    except RecursionError:
        raise ScenarioError(key, "override value is nested too deeply", TOO_DEEP) from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b=c`` override applied (creating nested mappings as needed)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ScenarioError(
                    ".".join(path[: i + 1]), "is a value, not a section, so it cannot take sub-keys",
                    f"set {'.'.join(path[: i + 1])}=... directly",
                )
            node = nxt
        node[path[-1]] = value
    return out

MAX_NODES = 100_000
MAX_DEPTH = 64  # levels of sections and lists; the schema's deepest setting is a handful of levels down
TOO_DEEP = "a scenario is a few levels of sections and settings; flatten it"


def _check_size(raw: Any) -> None:
    """Refuse pathological documents (YAML alias bombs, nesting hundreds of levels deep) before anything walks them
    recursively."""
    count = 0
    stack = [(raw, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ScenarioError("", f"the scenario has more than {MAX_NODES} values",
                                "scenario files hold settings, not data; point data.source at a file instead")
        if depth > MAX_DEPTH:
            raise ScenarioError("", "the scenario is nested too deeply", TOO_DEEP)
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def run_name_override(raw: dict, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """``logging.wandb.name={name}-<what the overrides changed>`` when overrides change more than the name and the
    logging, and neither the scenario nor an override names the W&B run: two runs of one file with different
    ``--set`` then get different W&B run and artifact names."""
    logging = raw.get("logging") if isinstance(raw.get("logging"), dict) else {}
    if isinstance(logging.get("wandb"), dict) and logging["wandb"].get("name"):
        return []
    keys = [o.split("=", 1) for o in overrides if "=" in o]
    if any(k.strip() == "logging.wandb.name" for k, _ in keys):
        return []
    changed = [f"{k.strip().split('.')[-1]}={v.strip()}" for k, v in keys
               if k.strip() != "name" and not k.strip().startswith("logging.")]
    if not changed:
        return []
    slug = re.sub(r"[^A-Za-z0-9_.=,\-]+", "-", "_".join(changed)).strip("-")[:120]
    return ["logging.wandb.name=" + json.dumps("{name}-" + slug)]  # quoted: YAML reads {…} as a mapping


def scenario_from_dict(raw: Any, overrides: list[str] | tuple[str, ...] = (), check_strategy: bool = True
                       ) -> Scenario:
    """Validate a raw mapping (plus overrides) into a :class:`Scenario`.

    ``check_strategy=False`` leaves out the strategy checks (name, params, what it needs of the scenario), which
    import every strategy and with them torch: what the command line validates before it starts Ray, then it
    validates again in full.

    Raises:
        ScenarioError: naming every invalid field and the fix.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ScenarioError("", f"a scenario must be a mapping of sections, got {type(raw).__name__}",
                            "start from scenarios/quickstart.yaml")
    try:
        _check_size(raw)
        raw = apply_overrides(raw, list(overrides) + run_name_override(raw, overrides))
        _check_size(raw)  # and the overrides' values
        raw = resolve_paths(raw, Path.cwd())  # what the file did not give: relative to the current directory
        return Scenario.model_validate(raw, context=None if check_strategy else {"strategy": False})
    except ValidationError as e:
        raise ScenarioError("", format_validation(e, model=Scenario)) from None
    except RecursionError:
        raise ScenarioError("", "the scenario is nested too deeply", TOO_DEEP) from None


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_strategy: bool = True,
                  relative_to: Path | None = None) -> Scenario:
    """Read a YAML scenario file and validate it. Relative paths in the file resolve against the file's directory
    (:mod:`fedsim.config.paths`), those in ``overrides`` against the current directory.

    Args:
        path: the YAML file.
        overrides: ``a.b=c`` strings applied before validation.
        check_strategy: False leaves the strategy checks out (see :func:`scenario_from_dict`).
        relative_to: where the file's relative paths resolve instead (a run directory's ``scenario.yaml`` written
            before paths were resolved: the directory the run was started from).

    Returns:
        The frozen, validated scenario.

    Raises:
        ScenarioError: file missing, not YAML, or invalid.
    """
    p = Path(path)
    if not p.is_file():
        what = ("is a directory" if p.is_dir() else "is not a regular file (a device, a pipe or a socket)"
                if p.exists() else "does not exist")
        raise ScenarioError("", f"scenario file {str(p)!r} {what}", "give the path of a YAML scenario file, e.g. "
                            "scenarios/quickstart.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError("", f"cannot read scenario file {str(p)!r}: {e}") from None
    if len(text) > 5_000_000:
        raise ScenarioError("", "scenario file is larger than 5 MB", "scenario files hold settings, not data")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ScenarioError("", f"{p.name}: {e}", "give each key once (the last one would silently win)") from None
    except yaml.YAMLError as e:
        raise ScenarioError("", f"{p.name} is not valid YAML: {e}", "fix the YAML syntax at the line shown") from None
    except RecursionError:
        raise ScenarioError("", f"{p.name} is nested too deeply", TOO_DEEP) from None
    if isinstance(raw, dict):
        raw = resolve_paths(raw, relative_to if relative_to is not None else p.resolve().parent)
    return scenario_from_dict(raw, overrides, check_strategy)


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` (standard YAML): merged keys may be overridden by the explicit ones
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base constructor reports unhashable keys itself
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice in one section (lines {seen[key]} and "
                                    f"{key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def dump_scenario(scenario: Scenario) -> str:
    """YAML text of the resolved scenario."""
    return yaml.safe_dump(scenario.to_dict(), sort_keys=False)
