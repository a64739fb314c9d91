"""Retention, with no I/O: how far `trim` may cut a topic.

Each limit of a topic's `Retention` removes the oldest messages beyond it;
the cut (remove every position at or below it) is the highest position any
limit removes, kept below the topic's *floor*: the lowest position that a
subscription whose pattern matches the topic still needs (its lowest pending
row, or the first message after its cursor). `None` is the one "no floor"
(no such subscription) and "no cut" everywhere.

`plan_trim` is the rule. What each limit removes (`LimitCuts`) is defined by
`limit_cuts` over the topic's messages; the SQL engines ask their store the
same three questions with indexed queries instead of reading the topic
(tests/test_planners.py checks every engine against `limit_cuts`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .. import topics as _topics

if TYPE_CHECKING:
    from .base import Retention

__all__ = ["LimitCuts", "TrimPlan", "limit_cuts", "plan_trim", "subscription_floor",
           "trim_floor"]


class LimitCuts(NamedTuple):
    """For one topic, the highest position each limit removes on its own (None: none).

    - `max_messages`: the (max_messages + 1)-th newest message;
    - `max_age`: the newest message stored before `now - max_age`;
    - `max_bytes`: the newest message at which the data sizes, added up from
      the newest message down, pass `max_bytes`.
    """

    max_messages: int | None = None
    max_age: int | None = None
    max_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class TrimPlan:
    """What one trim does to a topic: remove every message at a position <= `cut`."""

    cut: int | None  # None: remove nothing


def limit_cuts(retention: Retention, newest_first: Iterable[tuple[int, float, int]],
               now: float) -> LimitCuts:
    """`LimitCuts` over a topic's messages `(position, time, size)`, newest first.

    Reads only as far as the limits need. (Stored times never decrease with
    position, so the newest message that is too old is the first one met.)
    """
    keep, max_bytes = retention.max_messages, retention.max_bytes
    horizon = None if retention.max_age is None else now - retention.max_age
    count = age = by_bytes = None
    if keep is None and horizon is None and max_bytes is None:
        return LimitCuts()
    n = total = 0
    for position, time, size in newest_first:
        n += 1
        total += size
        if count is None and keep is not None and n > keep:
            count = position
        if age is None and horizon is not None and time < horizon:
            age = position
        if by_bytes is None and max_bytes is not None and total > max_bytes:
            by_bytes = position
        if ((count is not None or keep is None) and (age is not None or horizon is None)
                and (by_bytes is not None or max_bytes is None)):
            break  # every limit has its answer
    return LimitCuts(count, age, by_bytes)


def subscription_floor(cursor: int, lowest_pending: int | None) -> int:
    """The lowest position a subscription still needs: its lowest pending row, or the
    first message after its cursor."""
    if lowest_pending is None or lowest_pending > cursor:
        return cursor + 1
    return lowest_pending


def trim_floor(topic: str, subscriptions: Iterable[tuple[str, int, int | None]]) -> int | None:
    """The lowest position any subscription matching `topic` still needs (None: none
    matches). `subscriptions`: (pattern, cursor, lowest pending position or None)."""
    floor: int | None = None
    for pattern, cursor, lowest_pending in subscriptions:
        if _topics.matches(pattern, topic):
            mark = subscription_floor(cursor, lowest_pending)
            if floor is None or mark < floor:
                floor = mark
    return floor


def plan_trim(retention: Retention, cuts: LimitCuts, floor: int | None) -> TrimPlan:
    """The cut: the highest position any set limit removes, below `floor` (None: no floor).

    The smallest cut after which every limit holds (what is left is at most
    `max_messages` messages, `max_bytes` bytes, none older than `max_age`),
    unless a subscription still needs a message at or below it.
    """
    cut = None
    for limit, found in ((retention.max_messages, cuts.max_messages),
                         (retention.max_age, cuts.max_age),
                         (retention.max_bytes, cuts.max_bytes)):
        if limit is not None and found is not None and (cut is None or found > cut):
            cut = found
    if cut is not None and floor is not None and cut >= floor:
        cut = floor - 1
    return TrimPlan(cut if cut is not None and cut > 0 else None)  # positions start at 1
