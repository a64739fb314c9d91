"""Small helpers more than one layer needs: a bounded most-recent map and ISO 8601 times."""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime
from typing import TypeVar

__all__ = ["Recent", "parse_iso_time"]

K = TypeVar("K")
V = TypeVar("V")


class Recent(OrderedDict[K, V]):
    """A map that keeps the `limit` entries put or looked at last (`put`, `seen`); the
    least recent goes first."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: K, value: V) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)

    def seen(self, key: K) -> V | None:
        """The value under `key` (now the most recent), or None."""
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value


def parse_iso_time(text: str) -> datetime | None:
    """`text` as an ISO 8601 time (a time without an offset is UTC), or None when it is
    not one."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
