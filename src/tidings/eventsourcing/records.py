"""The values the event store takes and gives: new events, recorded events, outcomes."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from ..engines.store_base import EventRow
from ..errors import InvalidStreamId
from .events import TypeResolver

__all__ = [
    "ANY",
    "MAX_STREAM_ID_LENGTH",
    "NO_STREAM",
    "Appended",
    "CaughtUp",
    "NewEvent",
    "RecordedEvent",
    "check_stream_id",
]

MAX_STREAM_ID_LENGTH = 255

#: `expected_version=NO_STREAM`: the stream must not exist yet (it is version 0).
NO_STREAM: Final = 0


class _Any:
    """`expected_version=ANY`: append whatever the stream's version is (no concurrency check)."""

    _instance: _Any | None = None

    def __new__(cls) -> _Any:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ANY"

    def __reduce__(self) -> str:
        return "ANY"


ANY: Final = _Any()

_dec_headers = msgspec.json.Decoder(dict[str, str]).decode
_dec_any = msgspec.json.Decoder().decode


def check_stream_id(stream_id: object) -> str:
    """Return `stream_id` if it is a usable stream (aggregate) id, else raise `InvalidStreamId`."""
    if not isinstance(stream_id, str):
        raise InvalidStreamId(
            f"a stream id must be a str, got {type(stream_id).__name__}; use the aggregate's id"
        )
    if not stream_id or len(stream_id) > MAX_STREAM_ID_LENGTH or "\x00" in stream_id:
        raise InvalidStreamId(
            f"stream id {stream_id[:40]!r} must be 1 to {MAX_STREAM_ID_LENGTH} characters "
            "(no NUL); use a short, stable id such as 'order-42'"
        )
    return stream_id


class NewEvent:
    """An event to append, with its own id and headers.

    Give either a typed `event` (a `tidings.Event`, msgspec.Struct, dataclass
    or pydantic model) or a `type` name and `data` (a dict, or JSON bytes).
    An `id` you choose makes the append idempotent: re-sending it stores nothing new.
    """

    __slots__ = ("_encoded", "data", "event", "headers", "id", "type")

    def __init__(
        self,
        event: object = None,
        *,
        type: str | None = None,
        data: Mapping[str, Any] | bytes | None = None,
        id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.event = event
        self.type = type
        self.data = data
        self.id = id
        self.headers = headers
        self._encoded: tuple[Any, str, int, bytes] | None = None  # by Aggregate.record

    def __repr__(self) -> str:
        what = self.event if self.event is not None else f"{self.type}({self.data!r})"
        return f"NewEvent({what!r}, id={self.id!r})"


class Appended(msgspec.Struct, frozen=True):
    """What an append stored: the stream's version after it and each event's global position.

    `duplicate` is True when these event ids were stored already by an
    identical earlier append (nothing new was stored).
    """

    stream_id: str
    version: int
    positions: list[int]
    duplicate: bool = False


class CaughtUp(msgspec.Struct, frozen=True):
    """Yielded once by `subscribe_all(..., markers=True)`: every event up to `position` is delivered."""

    position: int


class RecordedEvent:
    """A stored event: the typed `event` plus its stream, version, global position, time, headers.

    `event` decodes on first access (upcasting old versions) and raises
    `UnknownEventType` when no class is registered for `type`; `data` (bytes)
    and `json()` give raw access either way.
    """

    __slots__ = ("_event", "_headers", "_resolver", "_row")
    _event: Any
    _headers: dict[str, str]

    # Holding the stored row and reading fields from it on demand keeps a scan
    # of millions of events cheap: constructing one costs two attribute stores.
    def __init__(self, row: EventRow, resolver: TypeResolver) -> None:
        self._row = row
        self._resolver = resolver

    @property
    def position(self) -> int:
        """The event's global position (unique, increasing in commit order)."""
        return self._row[0]

    @property
    def stream_id(self) -> str:
        return self._row[1]

    @property
    def version(self) -> int:
        """The event's version in its stream (1, 2, 3, … with no gap)."""
        return self._row[2]

    @property
    def id(self) -> str:
        return self._row[3]

    @property
    def type(self) -> str:
        return self._row[4]

    @property
    def type_version(self) -> int:
        """The version of the event's type it was stored with (before upcasting)."""
        return self._row[5]

    @property
    def timestamp(self) -> float:
        """When the event was stored (seconds since the epoch)."""
        return self._row[6]

    @property
    def data(self) -> bytes:
        """The stored JSON bytes, exactly as written."""
        return self._row[8]

    @property
    def event(self) -> Any:
        """The typed event (upcast to its class's current version)."""
        try:
            return self._event
        except AttributeError:
            row = self._row
            ev = self._event = self._resolver.decode(row[4], row[5], row[8], row[1])
            return ev

    def json(self) -> Any:
        """The stored data as plain JSON values, exactly as written (no upcasting)."""
        return _dec_any(self._row[8])

    @property
    def headers(self) -> dict[str, str]:
        try:
            return self._headers
        except AttributeError:
            raw = self._row[7]
            h: dict[str, str] = _dec_headers(raw) if raw else {}
            self._headers = h
            return h

    @property
    def time(self) -> datetime:
        """When the event was stored (UTC)."""
        return datetime.fromtimestamp(self.timestamp, UTC)

    @property
    def correlation_id(self) -> str | None:
        return self.headers.get("correlation-id")

    @property
    def causation_id(self) -> str | None:
        return self.headers.get("causation-id")

    @property
    def actor(self) -> str | None:
        return self.headers.get("actor")

    def caused(self, **extra: str) -> dict[str, str]:
        """Audit headers for events caused by this one: same correlation id, causation = this id."""
        h = {"correlation-id": self.correlation_id or self.id, "causation-id": self.id}
        h.update({k.replace("_", "-"): v for k, v in extra.items()})
        return h

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able view with the raw data (as written)."""
        return {
            "stream_id": self.stream_id, "version": self.version, "position": self.position,
            "id": self.id, "type": self.type, "type_version": self.type_version,
            "time": self.time.isoformat(), "headers": self.headers, "data": self.json(),
        }

    def __repr__(self) -> str:
        return (f"RecordedEvent(stream_id={self.stream_id!r}, version={self.version}, "
                f"position={self.position}, type={self.type!r})")

