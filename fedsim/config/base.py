"""What every scenario section shares: frozen, strict pydantic models, and how a share of the clients is dealt."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from pydantic import ValidationError

from fedsim.schema import Strict


class Frozen(Strict):
    """A scenario section: immutable, every key it does not declare an error, numbers finite and never booleans
    (:class:`fedsim.schema.Strict`)."""


def check_mix(tiers: tuple | None, per_client: tuple | None) -> None:
    """A mix is tiers (non-empty, fractions summing to 1) or a per-client list, not both."""
    if tiers is not None and per_client is not None:
        raise ValueError("give either tiers or per_client, not both")
    if tiers is not None:
        if not tiers:
            raise ValueError("tiers needs at least one tier")
        total = sum(t.fraction for t in tiers)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"tier fractions sum to {total:g}; they must sum to 1")


def deal_tiers(fractions: list[float], num_clients: int, seed: int, salt: int) -> list[int]:
    """Tier index of each client id: largest-remainder counts, dealt by a permutation seeded by (seed, salt)."""
    exact = [f * num_clients for f in fractions]
    counts = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: num_clients - sum(counts)]:
        counts[i] += 1
    labels = [i for i, c in enumerate(counts) for _ in range(c)]
    perm = np.random.default_rng([seed, salt]).permutation(num_clients)
    per_client = [0] * num_clients
    for client, tier in zip(perm, labels):
        per_client[int(client)] = tier
    return per_client


def format_validation(e: ValidationError, prefix: str = "", model: type | None = None) -> str:
    """pydantic's errors as one line: each offending key's dotted path and what is wrong with it; an unknown key
    (with ``model``, the mapping validated) lists its section's keys and the closest one."""
    parts = []
    for err in _merge_union_branches(e.errors()):
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-after"))
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _unknown_key(model, [x for x in err["loc"] if not str(x).startswith("function-after")], prefix)
        elif err["type"] == "missing":
            msg = "required key is missing"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


_BRANCH = re.compile(r"^(bool|int|float|str|none|constrained-\w+|literal\[.*\])$")  # a union member in an error's loc
_KINDS = {"bool": ["true", "false"], "int": ["an integer"], "float": ["a number"], "str": ["a string"], "none": ["null"]}


def _merge_union_branches(errors: list[dict]) -> list[dict]:
    """pydantic reports a value that fits no member of a union (``true``/``false`` or ``auto``; a count or ``auto``)
    once per member, each under a location ending in the member's tag: one error instead, at the field, saying
    what it takes and what it got."""
    out: list[dict] = []
    for err in errors:
        loc, tag = tuple(err["loc"][:-1]), str(err["loc"][-1]) if err["loc"] else ""
        if not _BRANCH.match(tag):
            out.append(err)
            continue
        kinds = ([repr(v.strip(" '\"")) for v in tag[8:-1].split(",")] if tag.startswith("literal[")
                 else _KINDS.get(tag.removeprefix("constrained-"), [tag]))
        last = out[-1] if out else None
        if last is not None and last.get("branches") is not None and last["loc"] == loc:
            last["branches"] += [k for k in kinds if k not in last["branches"]]
            alternatives = last["branches"]
            if len(alternatives) > 1:
                last["msg"] = f"expected {', '.join(alternatives[:-1])} or {alternatives[-1]}, got {last['input']!r}"
        else:
            out.append({**err, "loc": loc, "branches": kinds})
    return out


def _unknown_key(model: type | None, loc: list, prefix: str = "") -> str:
    """What to say of an unknown key: the closest key of its section and the section's keys, when they are known."""
    import difflib

    fields = _section_fields(model, loc[:-1]) if model is not None else None
    if not fields:
        return "unknown key; remove it or check its spelling and nesting"
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.6)
    where = ".".join([prefix] * bool(prefix) + [str(x) for x in loc[:-1]]) or "a scenario"
    guess = f"did you mean {close[0]}? " if close else ""
    return f"unknown key; {guess}{where} takes {', '.join(fields)}"


def _section_fields(model: type, path: list) -> list[str] | None:
    """The keys of the section at ``path`` of ``model`` (through nested sections, optional or not), or None."""
    from types import UnionType
    from typing import Union, get_args, get_origin

    from pydantic import BaseModel

    def as_model(annotation: Any) -> type | None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        if get_origin(annotation) in (Union, UnionType):
            found = [m for a in get_args(annotation) if (m := as_model(a)) is not None]
            return found[0] if len(found) == 1 else None
        return None

    for part in path:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None or (model := as_model(field.annotation)) is None:
            return None
    return list(model.model_fields)
