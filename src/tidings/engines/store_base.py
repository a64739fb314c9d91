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

import inspect
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

from .. import topics as _topics
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
    "StreamLoad",
    "backend_for",
    "event_headers",
    "headers_of_event",
    "maybe_await",
    "out_message",
]

T = TypeVar("T")

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
    """A write transaction on the store, open while an async function runs.

    Projection handlers receive it as `tx`: their own writes through it
    commit with the projection's checkpoint, or not at all.

    The methods below may return their result directly (SQLite, memory) or
    an awaitable of it (PostgreSQL, whose driver is async); callers pass
    what they get through `maybe_await`.
    """

    @abstractmethod
    def events_after(self, position: int, limit: int
                     ) -> list[EventRow] | Awaitable[list[EventRow]]: ...

    @abstractmethod
    def projection(self, name: str
                   ) -> ProjectionState | None | Awaitable[ProjectionState | None]: ...

    @abstractmethod
    def save_projection(self, state: ProjectionState, now: float) -> None | Awaitable[None]: ...

    @abstractmethod
    def publish_messages(self, messages: Sequence[OutMessage]) -> None:
        """Store pub/sub messages in this transaction."""

    @property
    @abstractmethod
    def now(self) -> float: ...

    # one event's writes, undone alone if its handler fails
    @abstractmethod
    def _begin_event(self) -> None | Awaitable[None]: ...

    @abstractmethod
    def _end_event(self, ok: bool) -> None | Awaitable[None]: ...


async def maybe_await(value: T | Awaitable[T]) -> T:
    """`value`, awaited first if it is awaitable (see `StoreTx`)."""
    if inspect.isawaitable(value):
        return await cast("Awaitable[T]", value)
    return value


class StoreBackend(ABC):
    """Event streams on one engine."""

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
    async def read_stream(
        self, stream_id: str, from_version: int, to_version: int | None, limit: int
    ) -> list[EventRow]: ...

    @abstractmethod
    async def read_all(self, after: int, stop: int | None, limit: int) -> list[EventRow]:
        """Up to `limit` events with `after < position <= stop`, in position order."""

    @abstractmethod
    async def stream_version(self, stream_id: str) -> int: ...

    @abstractmethod
    async def last_position(self) -> int: ...

    @abstractmethod
    async def load(
        self, stream_id: str, schema: str | None, to_version: int | None, as_of: float | None
    ) -> StreamLoad:
        """Snapshot (matching `schema` exactly) plus the events after it, in one read."""

    @abstractmethod
    async def save_snapshot(self, stream_id: str, snapshot: SnapshotRow) -> None: ...

    @abstractmethod
    async def projections(self) -> list[ProjectionState]: ...

    @abstractmethod
    async def transaction(self, fn: Callable[[StoreTx], Awaitable[T]]) -> T:
        """Run the async `fn(tx)` inside one write transaction, committed when it returns.

        An exception from `fn` rolls everything back and is re-raised. `fn`
        must not write through the hub or the store while it runs (it holds
        the engine's writer): it writes through `tx`.
        """


def backend_for(engine: Engine) -> StoreBackend:
    """The event-store backend of an engine."""
    from .memory import MemoryEngine
    from .sqlite import SqliteEngine

    if isinstance(engine, SqliteEngine):
        from .sqlite_store import SqliteStore

        return SqliteStore(engine)
    if isinstance(engine, MemoryEngine):
        from .memory_store import MemoryStore

        return MemoryStore(engine)
    from .postgres import PostgresEngine

    if isinstance(engine, PostgresEngine):
        from .postgres_store import PostgresStore

        return PostgresStore(engine)
    from ..errors import Unsupported

    raise Unsupported(f"the engine behind {engine.url!r} has no event store")


def event_headers(r: NewRecord, stream_id: str, version: int, position: int) -> dict[str, str]:
    """The headers of the message that publishes an event (its audit headers included)."""
    return headers_of_event(r.headers, r.type, r.type_version, stream_id, version, position)


def headers_of_event(own: dict[str, str], type: str, type_version: int, stream_id: str,
                     version: int, position: int) -> dict[str, str]:
    """`event_headers` from the parts: the event's own headers, its type, where it is."""
    return {**own, "content-type": JSON, "event-type": type,
            "event-version": str(type_version), "stream-id": stream_id,
            "stream-version": str(version), "event-position": str(position)}


def out_message(topic: str, data: object, key: str | None,
                headers: dict[str, str] | None) -> OutMessage:
    """A message published by a projection handler through its `tx`."""
    _topics.validate_topic(topic)
    raw, content_type = encode_data(data)
    h = {k.lower(): v for k, v in (headers or {}).items()}
    h.setdefault("content-type", content_type)
    return OutMessage(new_id(), topic, key, raw, h, False)
