"""What every validated mapping of a scenario shares — its sections (:class:`fedsim.config.base.Frozen`) and the
parameters of strategies: immutable, every undeclared key an error, numbers finite and not booleans.

YAML reads ``.inf`` and ``.nan`` as floats, and bounds such as ``gt=0`` let infinity through: an infinite clipping norm
turned the model to NaN in round 1, an infinite noise multiplier hung the accountant. And pydantic reads ``true`` as 1
for an int (``rounds: true`` ran one round). No count, rate, norm or multiplier of fedsim means anything infinite.
"""

from __future__ import annotations

import math
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Strict(BaseModel):
    """Immutable; undeclared keys, non-finite numbers and booleans given as numbers are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and bool_for_number(value, field.annotation):
            raise ValueError(f"{value!r} is a boolean, not a number: give a number here")
        return value


def bool_for_number(value: Any, annotation: Any) -> bool:
    """Whether ``value`` holds a boolean where ``annotation`` wants a number — an int or float field (optional or
    not), or the values of a dict or list of numbers: pydantic would read it as 0 or 1."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        members = [a for a in args if a is not type(None)]
        if isinstance(value, bool):
            return all(a in (int, float) for a in members)
        return len(members) == 1 and bool_for_number(value, members[0])
    if annotation in (int, float):
        return isinstance(value, bool)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return any(bool_for_number(v, args[1]) for v in value.values())
    if origin in (list, tuple) and isinstance(value, (list, tuple)) and (len(args) == 1 or args[1:] == (Ellipsis,)):
        return any(bool_for_number(v, args[0]) for v in value)
    return False


def non_finite(value: Any, where: str = "") -> str | None:
    """The dotted key of the first infinite or NaN number in a free mapping (a strategy's or objective's
    ``params``, checked by their own classes later), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        if (found := non_finite(v, f"{where}.{k}" if where else str(k))) is not None:
            return found
    return None
