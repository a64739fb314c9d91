"""Units of work: a saga's consecutive inline steps, run back to back, committed together.

While an inline handler runs, the coordinator sets its unit in the repository's
hook (`eventsourcing.repository.CURRENT_UNIT`), so a handler's plain
`await hub.repository(X).get(id)` joins it: it gets what an earlier step of the
unit saved (not committed yet), and the stream it loads is held in this process
until the unit ends, so sagas running side by side take turns on a hot
aggregate instead of conflicting on commit.

Deadlock-free by wait-die: a unit that holds nothing always waits for a stream; one
that holds some waits for as long as it takes only behind units it has priority
over (`rank`: the older saga); behind others it waits 20 ms at most and then backs
off (`Contended`): it commits what it did, lets its streams go, and runs the step
again in a new unit. Unbounded waits only go from older to younger units, so a
cycle of waits cannot last.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..eventsourcing.aggregate import Aggregate
    from ..eventsourcing.store import EventStore
    from ..hub import Hub

__all__ = ["Contended", "StreamLock", "StreamLocks", "Unit"]

_PATIENCE = 0.02  # how long a unit waits behind one without priority before backing off


class Contended(BaseException):
    """A unit's step needs a stream a unit with priority holds: it runs again in a new unit.

    A BaseException, like CancelledError: a handler's `except Exception` must not turn
    this passing contention into a business failure (the step is simply run again).
    """


class StreamLocks:
    """The streams of one hub's event store that units of this process hold or wait
    for (one per hub: `hub.extension(StreamLocks, StreamLocks)`)."""

    __slots__ = ("by_id", "store")

    def __init__(self, hub: Hub) -> None:
        self.store = hub.events
        #: stream id -> its lock, only while it is held or waited for
        self.by_id: dict[str, StreamLock] = {}


class StreamLock:
    """A stream held by one unit at a time; handed over in arrival order. Lives in
    `table` (by stream id) only while held or waited for."""

    __slots__ = ("_key", "_table", "owner", "waiters")

    def __init__(self, table: dict[str, StreamLock], key: str) -> None:
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
        if self.free() and table.get(self._key) is self:
            del table[self._key]


class Unit:
    """Inline command handlers of one saga, run back to back and committed together.

    Implements the repository's `UnitOfWork` hook (see the module docstring): loads
    of `locks.store`'s streams made while it is the current unit join it.
    """

    __slots__ = ("_held", "_locks", "_names", "aggregates", "closed", "on_wait_end", "rank",
                 "waiting_for_stream")

    def __init__(self, locks: StreamLocks, rank: tuple[float, str] = (0.0, "")) -> None:
        self._locks = locks
        self.rank = rank  # lower is older: priority on streams (see the module docstring)
        self.aggregates: dict[str, Aggregate] = {}  # saved by the unit's steps, by id
        self._held: list[StreamLock] = []
        self._names: list[str] = []  # the held streams' ids, in step with _held
        self.closed = False  # committed or abandoned: no longer in effect (see `close`)
        self.waiting_for_stream = False  # that another unit holds
        #: called (soon) after the unit's current wait for a stream ends
        self.on_wait_end: Callable[[], None] | None = None

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def add_saved(self, saved: Iterable[Aggregate]) -> None:
        """A step succeeded: what it saved is the unit's state from here on."""
        for agg in saved:
            self.aggregates[agg.id] = agg

    # the repository's UnitOfWork hook ------------------------------------------------
    def saved(self, stream_id: str) -> Aggregate | None:
        """What an earlier step of the unit saved of `stream_id` (not committed yet)."""
        return self.aggregates.get(stream_id)

    async def hold_stream(self, store: EventStore, stream_id: str) -> bool:
        """Hold `stream_id` of `store` until the unit ends; True when this call took it
        (a stream of another store, or one the unit holds, is not taken)."""
        locks = self._locks
        if self.closed or store is not locks.store:
            return False
        table = locks.by_id
        lock = table.get(stream_id)
        if lock is None:
            lock = table[stream_id] = StreamLock(table, stream_id)
        if lock.owner is self:
            return False
        if lock.free():
            await lock.take(self)  # (at once)
        else:
            self.waiting_for_stream = True
            try:
                await self._wait_for(lock, stream_id)
            finally:
                self.waiting_for_stream = False
                then, self.on_wait_end = self.on_wait_end, None
                if then is not None:
                    asyncio.get_running_loop().call_soon(then)
        self._held.append(lock)
        self._names.append(stream_id)
        return True

    def release_stream(self, stream_id: str) -> None:
        """Let go of one stream before the unit ends."""
        if stream_id in self._names:
            i = self._names.index(stream_id)
            del self._names[i]
            self._held.pop(i).release()

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

    def close(self) -> None:
        """The unit is over: release its streams. A task a handler started (it inherits
        the context) then loads as if there were no unit."""
        self.closed = True
        for lock in self._held:
            lock.release()
        self._held.clear()
        self._names.clear()
