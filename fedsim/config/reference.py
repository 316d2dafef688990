"""The scenario reference, generated from the schema itself so that it cannot drift from it: every section and key
with its type, default, bounds and description — a field's ``description``, else the comment on its line (or the
comment lines right above it) in the source — and the JSON Schema that editors use for completion and checking
(``fedsim schema``)."""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from fedsim.config.scenario import Scenario


@dataclass
class Key:
    path: str
    type: str
    default: str
    description: str


@dataclass
class Section:
    """One model of the schema at its place in a scenario (``""``: the top level)."""

    path: str
    doc: str
    keys: list[Key]
    model: str = ""


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (through unions, lists, tuples and dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _type(annotation: Any) -> str:
    """An annotation as a reader says it: ``int or null``, one of the literals, ``list of …``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in args)
    if origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return f"list of {_type(inner[0])}" if inner else "list"
    if origin is dict:
        return f"mapping of {_type(args[0])} to {_type(args[1])}" if args else "mapping"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _bounds(metadata: list[Any]) -> str:
    signs = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥", "max_length": "length ≤"}
    out = [f"{sign} {getattr(m, attr)}" for m in metadata for attr, sign in signs.items()
           if getattr(m, attr, None) is not None]
    return ", ".join(out)


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "see below" if isinstance(value, BaseModel) else f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, BaseModel):
        return "see below"
    return "`null`" if field.default is None else f"`{field.default!r}`".replace("True", "true").replace(
        "False", "false")


def _comments(cls: type) -> dict[str, str]:
    """field name → the comment on its line, or the comment lines right above it, in the class's source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    def standalone(line: int) -> bool:
        return line in comments and lines[line - 1].strip().startswith("#")

    out, taken = {}, set()
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            said = []
            if node.end_lineno in comments:  # a comment on its line, continued below it when the line is full
                line = node.end_lineno
                said.append(comments[line])
                while len(lines[line - 1]) >= 100 and standalone(line + 1):
                    line += 1
                    said.append(comments[line])
                    taken.add(line)
            above, line = [], node.lineno - 1
            while standalone(line) and line not in taken:  # or the comment lines right above it
                above.insert(0, comments[line])
                line -= 1
            out[node.target.id] = " ".join(above + said)
    return out


def sections(model: type[BaseModel] = Scenario, path: str = "") -> list[Section]:
    """Every section of ``model`` (depth first, in declaration order), each with its keys."""
    comments: dict[str, str] = {}
    for cls in reversed(model.__mro__):  # a subclass's comment wins
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls is not BaseModel:
            comments.update(_comments(cls))
    keys, nested = [], []
    for name, field in model.model_fields.items():
        where = f"{path}.{name}" if path else name
        bounds = _bounds(field.metadata)
        what = field.description or comments.get(name, "")
        keys.append(Key(where, _type(field.annotation) + (f" ({bounds})" if bounds else ""), _default(field),
                        what))
        nested += [(where, m) for m in _models(field.annotation)]
    doc = inspect.cleandoc(model.__doc__ or "") if model.__doc__ != BaseModel.__doc__ else ""
    out = [Section(path, doc, keys, model.__name__)]
    seen = set()
    for where, m in nested:
        if (where, m) not in seen:
            seen.add((where, m))
            out += sections(m, where)
    return out


def markdown() -> str:
    """The reference as one Markdown page: a section per model, a table of its keys."""
    parts = ["# Scenario reference", "",
             "Generated from the schema (`fedsim/config/`) when the documentation is built: every key a scenario "
             "file takes, with its type, default and bounds. Unknown keys are refused, with the closest known one "
             "named. For completion and checking in an editor, write the JSON Schema with "
             "`fedsim schema > scenario.schema.json` and point the YAML language server at it "
             "(`# yaml-language-server: $schema=scenario.schema.json` on a scenario's first line).", ""]
    for s in sections():
        parts += [f"## `{s.path}`" if s.path else "## Top level", ""]
        if s.doc:
            parts += [s.doc, ""]
        parts += ["| key | type | default | description |", "|---|---|---|---|"]
        for k in s.keys:
            cell = k.description.replace("|", "\\|")
            parts.append(f"| `{k.path}` | {k.type} | {k.default} | {cell} |")
        parts.append("")
    return "\n".join(parts)


def json_schema() -> dict[str, Any]:
    """The scenario's JSON Schema (draft 2020-12, as pydantic writes it)."""
    schema = Scenario.model_json_schema()
    for s in sections():  # a key described by a comment only: its description too
        props = schema["properties"] if s.model == Scenario.__name__ else schema["$defs"].get(s.model, {}).get(
            "properties", {})
        for k in s.keys:
            name = k.path.rsplit(".", 1)[-1]
            if name in props and k.description and "description" not in props[name]:
                props[name]["description"] = k.description
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "fedsim scenario"
    return schema
