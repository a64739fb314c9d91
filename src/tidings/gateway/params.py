"""Numbers, positions and ack ids read from text: ASCII only, bounded, one rule per kind.

Python's own parsers accept far more than a client means: `'²'.isdigit()` is
true and `int('²')` fails, `int('٣')` is 3, `int('1_000')` is 1000,
`float('nan')` and `float('inf')` parse. Every number the gateway reads from a
query string, a header or an ack id goes through here, so a bad one is a 422
naming the parameter and its range (never a 500), and the routes accept
exactly what /v1/openapi.json describes: the patterns below are written into
that document too.
"""

from __future__ import annotations

import math
import re
from typing import TypeVar

from starlette.requests import Request

from ..messages import MAX_POSITION
from .http import ApiError

__all__ = [
    "ACK_ID",
    "MAX_POSITION",
    "POSITION",
    "ack_id",
    "integer_param",
    "number_param",
    "parse_ack_id",
    "parse_position",
]

D = TypeVar("D", int, None)


def _at_most(n: int) -> str:
    """A regular expression for the integers 1..n written without leading zeros."""
    digits = str(n)
    alternatives = []
    if len(digits) > 1:
        alternatives.append(f"[1-9][0-9]{{0,{len(digits) - 2}}}")  # fewer digits than n
    for i, d in enumerate(digits):  # as many digits: n's first i digits, then a smaller one
        low = "1" if i == 0 else "0"
        if int(d) > int(low):
            rest = len(digits) - i - 1
            tail = f"[0-9]{{{rest}}}" if rest else ""
            alternatives.append(f"{digits[:i]}[{low}-{int(d) - 1}]{tail}")
    alternatives.append(digits)
    return "|".join(alternatives)


#: 0 to MAX_POSITION in ASCII digits (leading zeros allowed), as the document's patterns say.
POSITION = rf"0*(?:{_at_most(MAX_POSITION)})|0+"
#: 1 to MAX_POSITION.
POSITIVE = rf"0*(?:{_at_most(MAX_POSITION)})"
#: 0 to MAX_POSITION - 1: a position something can still follow (SSE's Last-Event-ID).
BEFORE_LAST = rf"0*(?:{_at_most(MAX_POSITION - 1)})|0+"

_GROUP = r"[A-Za-z0-9_-]+"
_TOKEN = r"[A-Za-z0-9_$-]+"
_PATTERN = rf"(?:{_TOKEN}|\*)(?:\.(?:{_TOKEN}|\*))*(?:\.>)?|>"
#: What a pull hands out as `ack_id`: `group:pattern:position`.
ACK_ID = rf"({_GROUP}):({_PATTERN}):({POSITION})"

_ACK_ID = re.compile(ACK_ID)
_DIGITS = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


def _digits(text: str) -> int | None:
    """`text` as an int when it is ASCII digits; None when not (or past any useful size)."""
    if not _DIGITS.fullmatch(text):
        return None
    significant = text.lstrip("0")
    if len(significant) > 20:  # far past any bound here; int() of it would only cost time
        return None
    return int(significant or "0")


def parse_position(text: str, low: int = 0, high: int = MAX_POSITION) -> int | None:
    """`text` as an integer from `low` to `high`, or None when it is anything else."""
    value = _digits(text)
    return value if value is not None and low <= value <= high else None


def integer_param(request: Request, name: str, default: D, low: int, high: int) -> int | D:
    """Query parameter `name` as an integer in [low, high] (`default` when absent)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = parse_position(raw, low, high)
    if value is None:
        raise ApiError(422, "invalid_field", f"query parameter {name!r} must be an integer "
                       f"from {low} to {high} in ASCII digits, got {raw[:40]!r}")
    return value


def number_param(request: Request, name: str, default: float, low: float, high: float) -> float:
    """Query parameter `name` as a number in [low, high] (`default` when absent)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = float(raw) if _NUMBER.fullmatch(raw) else math.nan
    if not low <= value <= high:  # also false for NaN
        raise ApiError(422, "invalid_field", f"query parameter {name!r} must be a number from "
                       f"{low:g} to {high:g} (such as 1 or 0.5), got {raw[:40]!r}")
    return value


def ack_id(group: str, pattern: str, position: int) -> str:
    return f"{group}:{pattern}:{position}"


def parse_ack_id(value: str) -> tuple[str, str, int]:
    """(group, pattern, position) of an ack id, or a 422 when `value` is not one.

    Only the form is checked here: whether that subscription exists, and
    whether the group is the route's, are the caller's (404) questions.
    """
    found = _ACK_ID.fullmatch(value)
    if found is None:
        raise ApiError(422, "invalid_field", f"{value[:300]!r} is not an ack id "
                       "(group:pattern:position); pass the ack_id values exactly as a pull "
                       "returned them")
    group, pattern, position = found.groups()
    return group, pattern, int(position.lstrip("0") or "0")
