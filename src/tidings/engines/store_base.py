"""The event-store backend protocol: what an engine implements to hold event streams.

The public event store (`tidings.eventsourcing`) validates, encodes and
decodes; a backend only stores rows and enforces the guarantees that need
the database: optimistic concurrency per stream, atomic batches, global
positions that are never filled in late, immutability, the outbox (each
event also stored as a message in the same transaction), snapshots kept
apart, and projection checkpoints written in the caller's transaction.

Nothing here is SQLite-shaped; the PostgreSQL backend implements the same
methods (positions assigned under the log's commit-order lock, so that
commit order equals position order).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import msgspec

from .. import topics as _topics
from ..errors import InvalidTopic
from ..messages import JSON, OutMessage, encode_data, new_id
from .base import Engine

__all__ = [
    "EVENT_COLUMNS",
    "AppendOutcome",
    "EventRow",
    "LoadRow",
    "NewRecord",
    "ProjectionState",
    "SnapshotRow",
    "StoreBackend",
    "StoreTx",
    "StreamAppend",
    "StreamLoad",
    "event_headers",
    "event_headers_open",
    "headers_of_event",
    "out_message",
]

T = TypeVar("T")
_enc_json = msgspec.json.Encoder().encode

#: Column order of an `EventRow` (also the SQL column order).
EVENT_COLUMNS = "position, stream_id, version, id, type, type_version, time, headers, data"

#: (position, stream_id, version, id, type, type_version, time, headers JSON or None, data)
EventRow = tuple[int, str, int, str, str, int, float, "bytes | None", bytes]

#: (version, type, type_version, data): what rebuilding an aggregate needs of an event.
LoadRow = tuple[int, str, int, bytes]


@dataclass(slots=True)
class NewRecord:
    """An encoded event on its way into a stream (the stream version is assigned by the backend)."""

    id: str
    type: str
    type_version: int
    data: bytes
    headers: dict[str, str]


#: One stream's part of `StoreBackend.append_batch`: (stream id, its new records, the
#: version it must be at or None for any, the topic its events are published on).
StreamAppend = tuple[str, Sequence[NewRecord], int | None, str]


@dataclass(slots=True)
class SnapshotRow:
    version: int
    schema: str
    time: float
    data: bytes


@dataclass(slots=True)
class AppendOutcome:
    version: int  # the stream's version after the append
    positions: list[int]
    duplicate: bool = False
    time: float = 0.0  # the events' stored time (0.0 for a duplicate)


@dataclass(slots=True)
class StreamLoad:
    """What loading an aggregate needs, read in one consistent snapshot."""

    current: int  # the stream's latest version (0: no such stream)
    target: int  # the version asked for (after applying `as_of`), at most `current`
    snapshot: SnapshotRow | None  # newest usable snapshot at or below `target`
    rows: list[LoadRow]  # events after the snapshot up to `target`


@dataclass(slots=True)
class ProjectionState:
    name: str
    position: int = 0
    status: str = "running"  # running | failed
    error: str | None = None
    failed_position: int | None = None
    updated: float = 0.0


class StoreTx(ABC):
    """A write transaction on the event store, lent to async code by `StoreBackend.transaction`.

    Projection handlers receive it as `tx`: their own writes through it commit with the
    projection's checkpoint, or not at all. Every method that reads or writes the store
    is async and returns its value. An engine whose driver is synchronous (SQLite, whose
    writer connection is lent to the event loop) does the work inside without
    suspending, so an await costs no hop to a thread.

    Engines add their own ways to write the read model (`tx.conn` and `tx.execute` on
    the SQL engines, `tx.state` on memory); the methods below are the ones the library
    itself uses, and the only ones it uses.
    """

    #: The event whose handler is running (a `RecordedEvent`), set before each call.
    record: object = None

    @property
    @abstractmethod
    def now(self) -> float:
        """The transaction's time, fixed when it began (what checkpoints are stamped with)."""

    @abstractmethod
    async def events_after(self, position: int, limit: int) -> list[EventRow]:
        """Up to `limit` events with a position above `position`, in position order."""

    @abstractmethod
    async def projection(self, name: str) -> ProjectionState | None:
        """The projection's stored state (None: never saved), read for an update.

        From this call until the transaction ends, no other transaction runs the same
        projection, in this process or (on a shared engine) in another.
        """

    @abstractmethod
    async def save_projection(self, state: ProjectionState, now: float) -> None:
        """Store `state`, its `updated` set to `now`, to commit with this transaction."""

    @abstractmethod
    def publish_messages(self, messages: Sequence[OutMessage]) -> None:
        """Store pub/sub messages with this transaction; never waits.

        Inside an event (`begin_event`) they are stored only if that event ends well.
        An engine may write them at once (SQLite: into the event's savepoint) or keep
        them until the event ends.
        """

    def publish(self, topic: str, data: object, *, key: str | None = None,
                headers: dict[str, str] | None = None) -> None:
        """Publish a message atomically with this projection's progress (never waits)."""
        self.publish_messages([out_message(topic, data, key, headers)])

    @abstractmethod
    async def begin_event(self) -> None:
        """Start one event's writes, so that `end_event(False)` can undo them alone.

        A projection calls it before each handler: a failing handler then leaves
        nothing behind, while the events before it in the batch stay written.
        """

    @abstractmethod
    async def end_event(self, ok: bool) -> None:
        """End the event begun last: keep its writes and the messages it published if
        `ok`, else undo them all (what was written before `begin_event` stays)."""


class StoreBackend(ABC):
    """Event streams on one engine (made by `Engine.event_store()`).

    The library reaches an engine's event store through these methods only.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @abstractmethod
    async def append(
        self,
        stream_id: str,
        records: Sequence[NewRecord],
        expected: int | None,
        topic: str,
        snapshot: SnapshotRow | None = None,
    ) -> AppendOutcome:
        """Append all records or none, and publish each as a message on `topic`, atomically.

        `expected` None means any version. Raises `ConcurrencyError` when the
        stream is not at `expected`. If the first record's id is stored
        already as the start of this same batch, returns the stored outcome
        with `duplicate=True`; any other reuse raises `EventIdConflict`.
        """

    @abstractmethod
    async def append_batch(
        self,
        items: Sequence[StreamAppend],
        messages: Sequence[OutMessage] = (),
        snapshots: Mapping[str, SnapshotRow] | None = None,
    ) -> list[AppendOutcome]:
        """Append to several streams and store `messages`, all in one transaction or none.

        What a command handler or a saga commits: the aggregates it changed, its
        inbox record, its reply or next commands. Each item (stream id, records,
        expected version, topic) is checked and published as `append` does it; a
        stream may come twice, the second item checked against the version the
        first leaves. `messages` are stored after the events' own messages, in
        the same transaction. `snapshots` (by stream id) are stored with their
        stream's new events, and not for an item that appends nothing.

        Returns one outcome per item, in order; an item whose first record's id
        is stored already as the start of that same append appends nothing and
        returns the stored outcome with `duplicate=True`. Raises
        `ConcurrencyError` when a stream is not at its expected version and
        `EventIdConflict` when an id is reused otherwise; either way nothing is
        stored.
        """

    @abstractmethod
    async def read_stream(
        self, stream_id: str, from_version: int, to_version: int | None, limit: int
    ) -> list[EventRow]:
        """Up to `limit` of the stream's events with `from_version <= version <= to_version`
        (None: to the end), in version order."""

    @abstractmethod
    async def read_all(self, after: int, stop: int | None, limit: int) -> list[EventRow]:
        """Up to `limit` events with `after < position <= stop`, in position order."""

    @abstractmethod
    async def stream_version(self, stream_id: str) -> int:
        """The stream's latest version (0: no such stream)."""

    async def newer(self, stream_id: str, version: int, limit: int
                    ) -> tuple[int, list[EventRow]] | None:
        """The stream's events after `version` (at most `limit` of them) with its latest
        version; None when the stream is behind `version` or more than `limit` ahead.

        What refreshing a state kept at `version` needs. This default reads the version,
        then the events; an engine that pays a round trip per read answers in one.
        """
        current = await self.stream_version(stream_id)
        gap = current - version
        if gap < 0 or gap > limit:
            return None
        rows = await self.read_stream(stream_id, version + 1, current, gap) if gap else []
        return (current, rows) if len(rows) == gap else None

    @abstractmethod
    async def last_position(self) -> int:
        """The position of the newest event (0: none yet)."""

    @abstractmethod
    async def load(
        self, stream_id: str, schema: str | None, to_version: int | None, as_of: float | None
    ) -> StreamLoad:
        """Snapshot (matching `schema` exactly) plus the events after it, in one read."""

    @abstractmethod
    async def save_snapshot(self, stream_id: str, snapshot: SnapshotRow) -> None:
        """Store (or replace) the stream's snapshot at `snapshot.version`, on its own."""

    @abstractmethod
    async def projections(self) -> list[ProjectionState]:
        """Every stored projection state, by name."""

    @abstractmethod
    async def transaction(self, fn: Callable[[StoreTx], Awaitable[T]]) -> T:
        """Run the async `fn(tx)` inside one write transaction, committed when it returns.

        An exception from `fn` rolls everything back and is re-raised. `fn`
        must not write through the hub or the store while it runs (it may hold
        the engine's writer or the log's lock, and would wait for itself): it
        writes through `tx`. An engine where such a write would wait for itself
        refuses it with `InvalidArgument` (see `base.HOLDING_WRITER`).
        """


def event_headers(r: NewRecord, stream_id: str, version: int, position: int) -> dict[str, str]:
    """The headers of the message that publishes an event (its audit headers included)."""
    return headers_of_event(r.headers, r.type, r.type_version, stream_id, version, position)


def headers_of_event(own: dict[str, str], type: str, type_version: int, stream_id: str,
                     version: int, position: int) -> dict[str, str]:
    """`event_headers` from the parts: the event's own headers, its type, where it is."""
    return {**own, "content-type": JSON, "event-type": type,
            "event-version": str(type_version), "stream-id": stream_id,
            "stream-version": str(version), "event-position": str(position)}


def event_headers_open(own: dict[str, str], type: str, type_version: int,
                       stream_id: str) -> bytes:
    """`event_headers` as JSON without the stream version and the event position, open at
    the end: for an engine that learns those late (in the database, or per row) and
    appends `"stream-version":"V","event-position":"P"}`. The same bytes as encoding
    `event_headers` whole, own headers with the added names included."""
    h = headers_of_event(own, type, type_version, stream_id, 0, 0)
    del h["stream-version"], h["event-position"]
    return _enc_json(h)[:-1] + b","


def out_message(topic: str, data: object, key: str | None,
                headers: dict[str, str] | None) -> OutMessage:
    """A message published by a projection handler through its `tx`."""
    _topics.validate_topic(topic)
    if topic.startswith("$"):
        raise InvalidTopic(f"topic {topic!r}: topics starting with '$' are tidings' own "
                           "(dead letters); publish to one of your own topics")
    raw, content_type = encode_data(data)
    h = {k.lower(): v for k, v in (headers or {}).items()}
    h.setdefault("content-type", content_type)
    return OutMessage(new_id(), topic, key, raw, h, False)
