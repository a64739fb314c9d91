"""Repositories: load aggregates (now or as they were) and save their new events."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections import deque
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast

from .. import topics as _topics
from ..engines.store_base import SnapshotRow, StreamLoad
from ..errors import DecodeError, InvalidArgument, NotFound
from .aggregate import Aggregate, _resolver_of
from .records import Appended, RecordedEvent, check_stream_id
from .snapshots import capture, restore, schema_of
from .store import EventStore

__all__ = ["Repository"]

A = TypeVar("A", bound=Aggregate)
log = logging.getLogger("tidings.eventsourcing")


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
        unit = UNIT.get()
        took = False
        if unit is not None and version is None and when is None:
            mine = unit.lookup(self.cls, id)
            if mine is not None:
                return mine  # type: ignore[return-value]
            took = await unit.hold(self.store, id)
        if version is None and when is None:
            kept = self.store.kept(id)
            if kept is not None and type(kept) is self.cls:
                fresh = await self._from_kept(id, kept)
                if fresh is not None:
                    return fresh
        load = await self.store.backend.load(id, schema_of(self.cls), version, when)
        if load.current == 0:
            if took and unit is not None:
                unit.let_go(id)  # nothing to guard: a stream being created is checked on commit
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
        backend = self.store.backend
        current = await backend.stream_version(id)
        gap = current - kept.version
        if gap < 0 or gap > _KEPT_GAP:
            return None  # elsewhere by far: a load from the newest snapshot is cheaper
        rows = []
        if gap:
            rows = await backend.read_stream(id, kept.version + 1, current, gap)
            if len(rows) != gap:
                return None
        agg = cast(A, _clone(kept))
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
        self.store.remember(agg)
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


class Contended(BaseException):
    """A unit's step needs a stream a unit with priority holds: it runs again in a new unit.

    A BaseException, like CancelledError: a handler's `except Exception` must not turn
    this passing contention into a business failure (the step is simply run again).
    """


class StreamLock:
    """A stream held by one unit at a time; handed over in arrival order. Lives in
    `table` (the store's locks, by stream id) only while held or waited for."""

    __slots__ = ("owner", "waiters", "_table", "_key")

    def __init__(self, table: dict[str, StreamLock] | None = None, key: str = "") -> None:
        self.owner: Unit | None = None
        self.waiters: deque[tuple[asyncio.Future[None], Unit]] = deque()
        self._table = table
        self._key = key

    def free(self) -> bool:
        return self.owner is None and not self.waiters

    async def take(self, unit: Unit) -> None:
        if self.free():
            self.owner = unit
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append((fut, unit))
        try:
            await fut
        except asyncio.CancelledError:
            if self.owner is unit:  # handed over just as the wait was cancelled
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove((fut, unit))
                self._drop_if_free()
            raise

    def release(self) -> None:
        while self.waiters:
            fut, unit = self.waiters.popleft()
            if not fut.done():
                self.owner = unit
                fut.set_result(None)
                return
        self.owner = None
        self._drop_if_free()

    def _drop_if_free(self) -> None:
        table = self._table
        if table is not None and self.free() and table.get(self._key) is self:
            del table[self._key]


class Unit:
    """Inline command handlers of one saga, run back to back and committed together.

    While one runs (the `UNIT` context variable is set), a repository `get` of an
    aggregate that an earlier step of the unit saved returns a copy of that unsaved
    state, and every stream it loads is held in this process until the unit commits:
    sagas running side by side take turns on a hot aggregate instead of conflicting.

    Deadlock-free by wait-die: a unit that holds nothing always waits for a stream; one
    that holds some waits for as long as it takes only behind units it has priority
    over (`rank`: the older saga); behind others it waits 20 ms at most and then backs
    off (`Contended`): it commits what it did, lets its streams go, and runs the step
    again in a new unit. Unbounded waits only go from older to younger units, so a
    cycle of waits cannot last.
    """

    def __init__(self, rank: tuple[float, str] = (0.0, "")) -> None:
        self.rank = rank
        self.aggregates: dict[str, Aggregate] = {}  # saved by the unit's steps, by id
        self._held: list[StreamLock] = []
        self._names: list[str] = []  # the held streams' ids, in step with _held
        self.closed = False  # committed or abandoned: no longer in effect (see `close`)
        self.waiting = False  # for a stream another unit holds
        #: called (soon) after the unit's current wait for a stream ends (see `hold`)
        self.after_wait: Callable[[], None] | None = None

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def keep(self, saved: list[Any]) -> None:
        """A step succeeded: what it saved is the unit's state from here on."""
        for agg in saved:
            self.aggregates[agg.id] = agg

    def lookup(self, cls: type, id: str) -> Aggregate | None:
        agg = self.aggregates.get(id)
        return _clone(agg) if agg is not None and isinstance(agg, cls) else None

    async def hold(self, store: EventStore, stream_id: str) -> bool:
        """Hold `stream_id` until the unit ends; True when this call took it."""
        if self.closed:
            return False
        locks = store._locks
        lock = locks.get(stream_id)
        if lock is None:
            lock = locks[stream_id] = StreamLock(locks, stream_id)
        if lock.owner is self:
            return False
        if lock.free():
            await lock.take(self)  # (at once)
        else:
            self.waiting = True
            try:
                await self._wait_for(lock, stream_id)
            finally:
                self.waiting = False
                then, self.after_wait = self.after_wait, None
                if then is not None:
                    asyncio.get_running_loop().call_soon(then)
        self._held.append(lock)
        self._names.append(stream_id)
        return True

    async def _wait_for(self, lock: StreamLock, stream_id: str) -> None:
        if self._held:
            ahead = [lock.owner] + [u for _, u in lock.waiters]
            if not all(u is not None and self.rank < u.rank for u in ahead):
                # a younger unit waits a little (the holder usually commits soon), then
                # backs off: a wait that could close a cycle is always bounded
                try:
                    async with asyncio.timeout(_PATIENCE):
                        await lock.take(self)
                except TimeoutError:
                    raise Contended(stream_id) from None
                return
        await lock.take(self)

    def let_go(self, stream_id: str) -> None:
        """Release one stream before the unit ends."""
        if stream_id in self._names:
            i = self._names.index(stream_id)
            del self._names[i]
            self._held.pop(i).release()

    def close(self) -> None:
        """The unit is over: release its streams. A task a handler started (it inherits
        the context) then loads as if there were no unit."""
        self.closed = True
        for lock in self._held:
            lock.release()
        self._held.clear()
        self._names.clear()


_KEPT_GAP = 256  # newer events replayed onto a kept state at most
_PATIENCE = 0.02  # how long a unit waits behind one without priority before backing off
UNIT: ContextVar[Unit | None] = ContextVar("tidings_unit", default=None)


def _clone(agg: Aggregate) -> Aggregate:
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
        try:
            as_of = datetime.fromisoformat(as_of)
        except ValueError:
            raise InvalidArgument(
                f"as_of {as_of!r} is not an ISO 8601 time; use e.g. '2024-05-01T12:00:00Z'"
            ) from None
    if not isinstance(as_of, datetime):
        raise InvalidArgument("as_of must be a datetime or an ISO 8601 string")
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    # Event times are microsecond-precise floats: half a microsecond of slack makes
    # `as_of=rec.time` include `rec` whichever way the float was rounded.
    return as_of.timestamp() + 5e-7
