"""Repositories: load aggregates (now or as they were) and save their new events."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from .. import topics as _topics
from ..engines.store_base import SnapshotRow, StreamLoad
from ..errors import DecodeError, InvalidArgument, NotFound
from ..util import parse_iso_time
from .aggregate import Aggregate, _resolver_of
from .records import Appended, RecordedEvent, check_stream_id
from .snapshots import capture, restore, schema_of
from .store import EventStore

__all__ = ["CURRENT_UNIT", "Repository", "UnitOfWork"]

A = TypeVar("A", bound=Aggregate)
log = logging.getLogger("tidings.eventsourcing")


class UnitOfWork(Protocol):
    """A unit of work that the current task's loads join (see `CURRENT_UNIT`).

    The saga coordinator runs inline command handlers in one (`tidings.saga.unit.Unit`):
    a handler's `repository.get` then sees what an earlier step of the unit saved, and
    holds the streams it loads until the unit commits. Loads at a `version` or `as_of`
    a time never join it.
    """

    def saved(self, stream_id: str) -> Aggregate | None:
        """The aggregate a step of the unit saved on `stream_id`, not committed yet."""
        ...

    async def hold_stream(self, store: EventStore, stream_id: str) -> bool:
        """Keep other units off `stream_id` until this one ends (waiting for it if need
        be); True when this call took it."""
        ...

    def release_stream(self, stream_id: str) -> None:
        """Let go of a stream this unit took (its load found nothing to guard)."""
        ...


#: The unit of work loads in this context join, if any: set by whoever runs one (the
#: saga coordinator, around an inline handler), inherited by the tasks it starts.
CURRENT_UNIT: ContextVar[UnitOfWork | None] = ContextVar("tidings_unit", default=None)


class Repository(Generic[A]):
    """Loads and saves one aggregate class; saves are optimistic (`ConcurrencyError` on conflict).

    With `snapshot_every=N`, a save that carries the stream across a multiple
    of N also stores a snapshot of the new state, in the same transaction.
    """

    def __init__(self, store: EventStore, cls: type[A], *, snapshot_every: int | None = None,
                 topic: str | None = None) -> None:
        if not isinstance(cls, type) or not issubclass(cls, Aggregate):
            raise InvalidArgument(f"{cls!r} is not a tidings.Aggregate subclass")
        if snapshot_every is not None and (not isinstance(snapshot_every, int)
                                           or isinstance(snapshot_every, bool)
                                           or snapshot_every < 1):
            raise InvalidArgument("snapshot_every must be an int >= 1 or None")
        self.store = store
        self.cls = cls
        self.snapshot_every = snapshot_every
        self.topic = _topics.validate_topic(topic or cls.event_topic or cls.__name__)
        self._resolver = _resolver_of(cls)

    # loading -----------------------------------------------------------------
    async def get(self, id: str, *, version: int | None = None,
                  as_of: datetime | str | None = None) -> A:
        """The aggregate now, at stream `version`, or as it was at time `as_of`.

        Starts from the newest usable snapshot and replays the events after
        it. Raises `NotFound` if the stream does not exist (or did not exist
        yet at `version`/`as_of`).
        """
        self.store.hub.check_open()
        check_stream_id(id)
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)
                                    or version < 1):
            raise InvalidArgument(f"version must be an int >= 1, got {version!r}")
        when = _timestamp(as_of) if as_of is not None else None
        unit = CURRENT_UNIT.get() if version is None and when is None else None
        took = False
        if unit is not None:
            mine = unit.saved(id)
            if isinstance(mine, self.cls):
                return _clone(mine)  # (a copy: the unit's own stays as saved)
            took = await unit.hold_stream(self.store, id)
        if version is None and when is None:
            kept = self.store.cached(id)
            if kept is not None and type(kept) is self.cls:
                fresh = await self._from_kept(id, kept)
                if fresh is not None:
                    return fresh
        load = await self.store.backend.load(id, schema_of(self.cls), version, when)
        if load.current == 0:
            if took and unit is not None:
                unit.release_stream(id)  # nothing to guard: a stream being created is checked on commit
            raise NotFound(f"{self.cls.__name__} {id!r} does not exist (no events in its stream)")
        if load.target == 0 or (version is not None and load.target < version):
            at = f"time {as_of}" if when is not None else f"version {version}"
            raise NotFound(
                f"{self.cls.__name__} {id!r} has no state at {at}; its stream is at version "
                f"{load.current}"
            )
        return await self._build(id, load, version, when)

    async def _from_kept(self, id: str, kept: A) -> A | None:
        """The aggregate from the state this process last saved, plus any newer events
        (written by another process); None when the stream is not where it was."""
        found = await self.store.backend.newer(id, kept.version, _KEPT_GAP)
        if found is None:
            return None  # elsewhere by far: a load from the newest snapshot is cheaper
        current, rows = found
        agg = _clone(kept)
        agg._repository = self
        decode = self._resolver.decode
        for r in rows:
            agg.apply(decode(r[4], r[5], r[8], id))
        agg.version = current
        return agg

    async def _build(self, id: str, load: StreamLoad, version: int | None,
                     when: float | None) -> A:
        agg = self.cls(id)
        if load.snapshot is not None:
            try:
                restore(agg, load.snapshot.data)
                agg.version = load.snapshot.version
            except (DecodeError, ValueError, TypeError) as exc:
                log.warning("ignoring unusable snapshot of %s %r at version %d: %s",
                            self.cls.__name__, id, load.snapshot.version, exc)
                load = await self.store.backend.load(id, None, version, when)
                agg = self.cls(id)
        decode = self._resolver.decode
        apply = agg.apply
        for _, type_name, type_version, data in load.rows:
            apply(decode(type_name, type_version, data, id))
        if load.rows:
            agg.version = load.rows[-1][0]
        agg._repository = self  # a commit() of it follows this repository's snapshot policy
        return agg

    async def history(self, id: str) -> list[RecordedEvent]:
        """The aggregate's recorded events, oldest first."""
        return [rec async for rec in self.store.read(id, resolver=self._resolver)]

    # saving ------------------------------------------------------------------
    async def save(self, agg: A, *, headers: Mapping[str, str] | None = None) -> Appended | None:
        """Store the aggregate's recorded events, if the stream is still where it was loaded.

        Raises `ConcurrencyError` (nothing stored) when someone else saved
        first: reload and retry the command. Returns None if nothing was recorded.
        """
        if not isinstance(agg, self.cls):
            raise InvalidArgument(f"this repository saves {self.cls.__name__}, not "
                                  f"{type(agg).__name__}")
        pending = agg._pending
        if not pending:
            return None
        expected = agg.version - len(pending)
        snapshot = self._due_snapshot(agg, expected)
        h = {"aggregate-type": self.cls.__name__}
        if headers:
            h.update(headers)
        out = await self.store._append(agg.id, pending, expected, self.topic, h, snapshot)
        agg._pending = []
        self.store.cache(agg)
        return out

    # snapshots -----------------------------------------------------------------
    def _due_snapshot(self, agg: A, expected: int) -> SnapshotRow | None:
        """A snapshot to store with this save, when it carries the stream across a
        multiple of `snapshot_every`."""
        every = self.snapshot_every
        if every is not None and agg.version // every > expected // every:
            return self._snapshot_row(agg, quiet=True)
        return None

    def _snapshot_row(self, agg: A, *, quiet: bool) -> SnapshotRow | None:
        import time

        try:
            data = capture(agg)
        except DecodeError:
            if not quiet:
                raise
            log.warning("not snapshotting %s %r: its state is not encodable",
                        self.cls.__name__, agg.id, exc_info=True)
            return None
        return SnapshotRow(agg.version, schema_of(self.cls), time.time(), data)

    async def snapshot(self, id_or_aggregate: str | A) -> int:
        """Store a snapshot of the aggregate's saved state now; returns its version."""
        if isinstance(id_or_aggregate, Aggregate):
            agg = id_or_aggregate
            if agg._pending:
                raise InvalidArgument("save the aggregate before snapshotting it")
        else:
            agg = await self.get(id_or_aggregate)
        row = self._snapshot_row(agg, quiet=False)
        assert row is not None
        await self.store.backend.save_snapshot(agg.id, row)
        return agg.version


_KEPT_GAP = 256  # newer events replayed onto a kept state at most


def _clone(agg: A) -> A:
    """A copy of an aggregate that shares no mutable state with it (every attribute,
    private ones too, with its own type: unlike a snapshot, nothing goes through JSON)."""
    new = object.__new__(type(agg))
    d = new.__dict__
    for k, v in vars(agg).items():
        if k == "_repository":
            d[k] = v
        elif k == "_pending":
            d[k] = list(v)
        else:
            d[k] = _copy_value(v)
    return new


_ATOMIC = frozenset({int, float, str, bytes, bool, type(None)})


def _copy_value(v: Any) -> Any:
    t = type(v)
    if t in _ATOMIC:
        return v
    only = _ATOMIC.issuperset  # of the types of every item: checked in C
    if t is dict:
        if only(map(type, v.values())) and only(map(type, v)):
            return dict(v)
    elif t is list:
        if only(map(type, v)):
            return list(v)
    elif t is set:
        if only(map(type, v)):
            return set(v)
    elif t is tuple or t is frozenset:
        if only(map(type, v)):
            return v
    return copy.deepcopy(v)


def _timestamp(as_of: datetime | str) -> float:
    if isinstance(as_of, str):
        when = parse_iso_time(as_of)
        if when is None:
            raise InvalidArgument(
                f"as_of {as_of!r} is not an ISO 8601 time; use e.g. '2024-05-01T12:00:00Z'")
        as_of = when
    if not isinstance(as_of, datetime):
        raise InvalidArgument("as_of must be a datetime or an ISO 8601 string")
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    # Event times are microsecond-precise floats: half a microsecond of slack makes
    # `as_of=rec.time` include `rec` whichever way the float was rounded.
    return as_of.timestamp() + 5e-7
