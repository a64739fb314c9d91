"""Projections: read models fed with every event in global order, checkpointed atomically.

A projection's handler runs inside a write transaction that also stores
the projection's checkpoint, so its read-model writes (through `tx`) and
its progress commit together: after a crash it resumes exactly after the
last committed event. A handler that raises stops its projection: the
event's writes are undone, the status becomes `failed` with the error and
the event's position, and nothing after it is processed until `retry` (or
`rebuild`). Other projections keep running.

On SQLite a batch (`batch` events, default 200) holds the engine's writer
while its handlers run, so handlers should be quick and must not write
through the hub: other writers wait for the batch to commit. On PostgreSQL
a batch is one transaction, which holds the log's lock once a handler has
published through `tx` (appenders wait for it the same way). Only the
`StoreTx` protocol's methods are used here; each event's writes run between
`tx.begin_event()` and `tx.end_event(ok)`, so a failing handler's writes are
undone alone.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import types
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from ..engines.store_base import ProjectionState, StoreTx
from ..errors import ClosedError, InvalidArgument, NotFound, TidingsError
from .events import event_type_name
from .records import RecordedEvent
from .store import _DEFAULT_RESOLVER, EventStore

__all__ = ["HandlerT", "Projection", "ProjectionStatus", "Projections", "projections_for"]

log = logging.getLogger("tidings.eventsourcing")

Handler = Callable[[Any, Any], Awaitable[None] | None]
HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])
Reset = Callable[[Any], Awaitable[None] | None]
Progress = Callable[[int, int], None]


class ProjectionStatus(msgspec.Struct, frozen=True):
    """Where a projection is: `status` is 'running' or 'failed'; `lag` events are left to do."""

    name: str
    status: str
    position: int
    head: int
    lag: int
    error: str | None = None
    failed_position: int | None = None


@dataclass(slots=True)
class Projection:
    name: str
    handler: Handler
    reset: Reset | None
    batch: int
    types: frozenset[str] | None  # only these event types (None: all)
    typed: bool  # the handler takes the typed event, not the RecordedEvent

    @classmethod
    def build(cls, name: str, handler: Handler, reset: Reset | None, batch: int) -> Projection:
        if not callable(handler):
            raise InvalidArgument("a projection handler must be callable as handler(event, tx)")
        wanted = _wanted_types(handler)
        names = None if wanted is None else frozenset(event_type_name(t) for t in wanted)
        return cls(name, handler, reset, batch, names, wanted is not None)


def _wanted_types(handler: Handler) -> tuple[type, ...] | None:
    """Event classes named by the first parameter's annotation (None: all, as RecordedEvent)."""
    try:
        params = list(inspect.signature(handler).parameters.values())
        hints = typing.get_type_hints(handler)
    except Exception:  # noqa: BLE001 - unresolvable annotations: deliver RecordedEvents
        return None
    if not params or params[0].name not in hints:
        return None
    hint = hints[params[0].name]
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,
                                                                   types.UnionType) else (hint,)
    if any(o is RecordedEvent or o is Any or not isinstance(o, type) for o in options):
        return None
    return tuple(options)


class Projections:
    """The projections registered on a hub: run them, see their status, rebuild them."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._registry: dict[str, Projection] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def register(self, name: str, handler: Handler, *, reset: Reset | None = None,
                 batch: int = 200) -> None:
        if not isinstance(name, str) or not name or len(name) > 200:
            raise InvalidArgument("a projection name must be a non-empty str (at most 200 chars)")
        if name in self._registry:
            raise InvalidArgument(f"a projection named {name!r} is already registered")
        if not isinstance(batch, int) or batch < 1:
            raise InvalidArgument("batch must be an int >= 1")
        self._registry[name] = Projection.build(name, handler, reset, batch)

    @property
    def names(self) -> list[str]:
        return sorted(self._registry)

    def _get(self, name: str) -> Projection:
        p = self._registry.get(name)
        if p is None:
            known = ", ".join(self.names) or "none"
            raise NotFound(f"no projection named {name!r} is registered (registered: {known})")
        return p

    # status ----------------------------------------------------------------------
    async def status(self, name: str) -> ProjectionStatus:
        """The projection's checkpoint, status and lag (also for one not registered here)."""
        self._store.hub.check_open()
        states = {s.name: s for s in await self._store.backend.projections()}
        head = await self._store.backend.last_position()
        return _status(states.get(name) or ProjectionState(name), head)

    async def statuses(self) -> list[ProjectionStatus]:
        """Every projection registered here or stored, by name."""
        self._store.hub.check_open()
        states = {s.name: s for s in await self._store.backend.projections()}
        head = await self._store.backend.last_position()
        names = sorted(set(states) | set(self._registry))
        return [_status(states.get(n) or ProjectionState(n), head) for n in names]

    # running ---------------------------------------------------------------------
    async def catch_up(self, name: str | None = None, *, progress: Progress | None = None
                       ) -> list[ProjectionStatus]:
        """Process every event stored so far, for one projection or all; returns their status."""
        names = [name] if name is not None else self.names
        if name is not None:
            self._get(name)
        out = []
        for n in names:
            await self._catch_up(self._registry[n], progress)
            out.append(await self.status(n))
        return out

    async def _catch_up(self, p: Projection, progress: Progress | None) -> None:
        backend = self._store.backend
        async with self._locks.setdefault(p.name, asyncio.Lock()):
            states = {s.name: s for s in await backend.projections()}
            st = states.get(p.name) or ProjectionState(p.name)
            head = await backend.last_position()
            if st.status != "running" or st.position >= head:
                return
            while True:
                self._store.hub.check_open()
                st, n = await self._batch(p)
                if progress is not None:
                    progress(st.position, max(head, st.position))
                if st.status != "running" or n < p.batch:
                    return

    async def _batch(self, p: Projection) -> tuple[ProjectionState, int]:
        async def body(tx: StoreTx) -> tuple[ProjectionState, int]:
            st = await tx.projection(p.name) or ProjectionState(p.name)
            if st.status != "running":
                return st, 0
            rows = await tx.events_after(st.position, p.batch)
            tel = self._store.hub.telemetry
            for row in rows:
                if p.types is not None and row[4] not in p.types:
                    st.position = row[0]
                    continue
                rec = RecordedEvent(row, _DEFAULT_RESOLVER)
                tx.record = rec
                await tx.begin_event()
                try:
                    if tel is None:
                        r = p.handler(rec.event if p.typed else rec, tx)
                        if inspect.isawaitable(r):
                            await r
                    else:  # in the trace of what appended the event
                        with tel.projecting(rec, p.name):
                            r = p.handler(rec.event if p.typed else rec, tx)
                            if inspect.isawaitable(r):
                                await r
                except Exception as exc:  # noqa: BLE001 - recorded as the projection's status
                    await tx.end_event(False)
                    st.status = "failed"
                    st.error = f"{type(exc).__name__}: {exc}"
                    st.failed_position = rec.position
                    log.error("projection %r stopped at event %d (%s %r v%d): %s", p.name,
                              rec.position, rec.type, rec.stream_id, rec.version, st.error)
                    break
                await tx.end_event(True)
                st.position = rec.position
            if rows:
                await tx.save_projection(st, tx.now)
            return st, len(rows)

        return await self._store.backend.transaction(body)

    async def run(self, names: Iterable[str] | None = None) -> None:
        """Keep the projections up to date until the hub closes or this task is cancelled."""
        chosen = list(names) if names is not None else self.names
        if not chosen:
            raise InvalidArgument("no projections registered; decorate handlers with "
                                  "@hub.projection(name)")
        for n in chosen:
            self._get(n)
        tasks = [asyncio.create_task(self._follow(self._registry[n]),
                                     name=f"tidings:projection:{n}") for n in chosen]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, p: Projection) -> None:
        hub = self._store.hub
        engine = hub.engine
        while not hub.closed:
            changed = engine.changes()
            try:
                await self._catch_up(p, None)
            except ClosedError:
                return
            except TidingsError as exc:  # the engine is unavailable for now: try again later
                if hub.closed:
                    return
                log.warning("projection %r: %s; retrying in a second", p.name, exc)
                await asyncio.sleep(1.0)
                continue
            await engine.wait(changed, 5.0)

    # maintenance -----------------------------------------------------------------
    async def rebuild(self, name: str, *, progress: Progress | None = None) -> ProjectionStatus:
        """Reset the projection to position 0 (calling its `reset(tx)`) and replay every event.

        The reset and the new checkpoint commit together; the replay then
        proceeds in batches, so a crash mid-rebuild resumes where it stopped.
        """
        p = self._get(name)

        async def reset(tx: StoreTx) -> None:
            await tx.projection(p.name)  # (also: no other runner until this commits)
            if p.reset is not None:
                r = p.reset(tx)
                if inspect.isawaitable(r):
                    await r
            await tx.save_projection(ProjectionState(p.name), tx.now)

        async with self._locks.setdefault(p.name, asyncio.Lock()):
            await self._store.backend.transaction(reset)
        await self._catch_up(p, progress)
        return await self.status(name)

    async def retry(self, name: str) -> ProjectionStatus:
        """Clear a failed projection's error so it resumes at the event that failed."""
        async def clear(tx: StoreTx) -> None:
            st = await tx.projection(name)
            if st is not None and st.status != "running":
                st.status, st.error, st.failed_position = "running", None, None
                await tx.save_projection(st, tx.now)

        await self._store.backend.transaction(clear)
        return await self.status(name)


def _status(st: ProjectionState, head: int) -> ProjectionStatus:
    return ProjectionStatus(st.name, st.status, st.position, head, max(0, head - st.position),
                            st.error, st.failed_position)


def projections_for(store: EventStore) -> Projections:
    return store.hub.extension(Projections, lambda hub: Projections(store))
