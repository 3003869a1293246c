"""Strict pydantic building blocks shared by the sweep and cluster schemas, and the one-line
error they turn a validation failure into.

Owns: what "strict" means for a config file (an integer is an integer: not ``true``, ``"64"`` or
``64.0``; a number is an int or a float, never a string, a boolean, NaN or infinity; a boolean
is ``true``/``false``; unknown keys are errors) and the message ``<key>: <what is wrong> (got
<kind>)`` that names the key and what was written, never more than a short refused word.

Must not import: anything from bench; torch, ray, pandas.
"""

from __future__ import annotations

import difflib
import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Strict, StrictBool, StrictInt, StrictStr, ValidationError

# Strict scalars: YAML's "64", true and 64.0 are not the integer 64; "yes" is not a boolean.
Int = StrictInt
Bool = StrictBool
Str = StrictStr
Float = Annotated[float, Strict()]  # an int or a float; not a string or a boolean
IntOrAuto = Optional[Union[StrictInt, Literal["auto"]]]


class StrictModel(BaseModel):
    # allow_inf_nan: NaN passes every < / > check, so it would validate and fail only inside Ray.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


def int_or_auto(value: Any) -> Any:
    """Before validation of an ``N | auto`` key: a clear message instead of a union's two errors."""
    if value is None or value == "auto" or type(value) is int:
        return value
    raise ValueError(f"must be a whole number or 'auto' (got {kind(value)})")


def kind(value: Any) -> str:
    """What YAML value a user wrote, in words (never the value itself)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"  # date, datetime, bytes (!!binary), set


_TYPE_ERRORS = {"int_type", "float_type", "bool_type", "string_type", "dict_type", "list_type", "tuple_type",
                "literal_error", "model_type", "model_attributes_type", "int_from_float"}


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (a key)"
        else:
            out += ("." if out else "") + str(part)
    return out


def _got(e: dict) -> str:
    """What the user wrote instead: a short word for a refused choice, else its kind."""
    value = e.get("input")
    if e["type"] == "literal_error" and isinstance(value, str) and len(value) <= 40 and value.isprintable():
        return repr(value)
    return kind(value)


def first_error(err: ValidationError) -> str:
    """One line for the first problem; a misspelt key first (it explains the required key it left
    missing), with the required key it most resembles."""
    errors = err.errors()
    unknown = [x for x in errors if x["type"] == "extra_forbidden"]
    e = unknown[0] if unknown else errors[0]
    if unknown:
        missing = [str(x["loc"][-1]) for x in errors
                   if x["type"] == "missing" and tuple(x["loc"][:-1]) == tuple(e["loc"][:-1])]
        near = difflib.get_close_matches(str(e["loc"][-1]), missing, n=1)
        if near:
            e = {**e, "msg": f"unknown key; did you mean {near[0]!r}?"}
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] in _TYPE_ERRORS:
        msg += f" (got {_got(e)})"
    more = len(err.errors()) - 1
    where = _where(e["loc"])
    return (f"{where}: " if where else "") + msg + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")
