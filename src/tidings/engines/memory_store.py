"""Event streams for `memory://`: plain lists and dicts in `MemoryEngine.state`.

Every operation runs without an `await` between its check and its write, so
each append is atomic and positions are assigned in the order appends
happen: a reader never sees a position filled in late.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import msgspec

from ..errors import ConcurrencyError, EventIdConflict
from ..messages import OutMessage
from .memory import EventHeaders, MemoryEngine
from .store_base import (
    AppendOutcome,
    EventRow,
    NewRecord,
    ProjectionState,
    SnapshotRow,
    StoreBackend,
    StoreTx,
    StreamAppend,
    StreamLoad,
)

__all__ = ["MemoryStore"]

T = TypeVar("T")
# headers as JSON, as the other engines store them: a row of plain values, which the
# garbage collector stops tracking (a dict in it would keep every row tracked)
_enc = msgspec.json.Encoder().encode


@dataclass(slots=True)
class _Tables:
    events: list[EventRow] = field(default_factory=list)  # index = position - 1
    streams: dict[str, list[int]] = field(default_factory=dict)  # stream -> positions
    ids: dict[str, int] = field(default_factory=dict)  # event id -> position
    snapshots: dict[str, list[tuple[int, SnapshotRow]]] = field(default_factory=dict)
    projections: dict[str, ProjectionState] = field(default_factory=dict)
    read_models: dict[str, dict[str, object]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class MemoryTx(StoreTx):
    """The in-memory transaction: `state` is a dict kept for the projection's read model.

    Messages published through it are stored when the event's handler succeeds
    (outside an event: when the transaction's function returns); `state` changes
    are not undone on failure (no durability to protect).
    """

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._t = store._tables
        self._now = store._clock()
        self._outbox: list[OutMessage] = []
        self.state: dict[str, object] = {}

    @property
    def now(self) -> float:
        return self._now

    async def events_after(self, position: int, limit: int) -> list[EventRow]:
        return self._t.events[position : position + limit]

    async def projection(self, name: str) -> ProjectionState | None:
        st = self._t.projections.get(name)
        self.state = self._t.read_models.setdefault(name, {})
        return replace(st) if st is not None else None

    async def save_projection(self, state: ProjectionState, now: float) -> None:
        state.updated = now
        self._t.projections[state.name] = replace(state)

    def publish_messages(self, messages: Sequence[OutMessage]) -> None:
        self._outbox.extend(messages)

    async def begin_event(self) -> None:
        self._flush()  # published outside any event's handler: keep

    async def end_event(self, ok: bool) -> None:
        if ok:
            self._flush()
        else:
            self._outbox.clear()

    def _flush(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            self._store.engine._store(outbox, self._now)
            self._store.engine._notify({m.topic for m in outbox})


class MemoryStore(StoreBackend):
    engine: MemoryEngine

    def __init__(self, engine: MemoryEngine) -> None:
        super().__init__(engine)
        tables = engine.state.get("eventstore")
        if tables is None:
            tables = engine.state["eventstore"] = _Tables()
        self._tables: _Tables = tables

    def _clock(self) -> float:
        t = self._tables
        last = t.events[-1][6] if t.events else 0.0
        # microseconds, like the engine's message times and the datetimes users pass
        return float(max(round(self.engine.now(), 6), self.engine._last_time, last))

    async def append(
        self,
        stream_id: str,
        records: Sequence[NewRecord],
        expected: int | None,
        topic: str,
        snapshot: SnapshotRow | None = None,
    ) -> AppendOutcome:
        messages: list[OutMessage] = []
        now = self._clock()
        out = self._append(stream_id, records, expected, topic, snapshot, now, messages)
        if messages:
            self.engine._store(messages, now)
            self.engine._notify((topic,))
        return out

    def _append(self, stream_id: str, records: Sequence[NewRecord], expected: int | None,
                topic: str, snapshot: SnapshotRow | None, now: float,
                messages: list[OutMessage]) -> AppendOutcome:
        """Append to the tables; the events' messages go to `messages` (for the caller
        to store, so a batch stores them all at once)."""
        t = self._tables
        dup = _duplicate(t, stream_id, records)
        if dup is not None:
            return dup
        positions = t.streams.get(stream_id, [])
        current = len(positions)
        if expected is not None and expected != current:
            raise ConcurrencyError(stream_id, expected, current)
        seen: set[str] = set()
        for r in records:
            if r.id in t.ids or r.id in seen:
                raise EventIdConflict(
                    f"event id {r.id!r} is already stored; give every new event a new id"
                )
            seen.add(r.id)
        return self._write(stream_id, records, topic, snapshot, now, messages)

    def _write(self, stream_id: str, records: Sequence[NewRecord], topic: str,
               snapshot: SnapshotRow | None, now: float, messages: list[OutMessage]
               ) -> AppendOutcome:
        """Append checked records (see `_append`)."""
        t = self._tables
        events, ids = t.events, t.ids
        positions = t.streams.get(stream_id)
        if positions is None:
            positions = t.streams[stream_id] = []
        pos, version = len(events), len(positions)
        first = pos + 1
        for r in records:
            pos += 1
            version += 1
            own = _enc(r.headers) if r.headers else None
            events.append((pos, stream_id, version, r.id, r.type, r.type_version, now, own,
                           r.data))
            positions.append(pos)
            ids[r.id] = pos
            # the message's headers as parts, made a dict when it is read (see EventHeaders)
            lazy: Any = EventHeaders(own, r.type, r.type_version, version, pos)
            messages.append(OutMessage(r.id, topic, stream_id, r.data, lazy, False))
        if snapshot is not None:
            _put_snapshot(t, stream_id, snapshot)
        return AppendOutcome(version, list(range(first, pos + 1)), time=now)

    async def append_batch(
        self,
        items: Sequence[StreamAppend],
        messages: Sequence[OutMessage] = (),
        snapshots: Mapping[str, SnapshotRow] | None = None,
    ) -> list[AppendOutcome]:
        t = self._tables
        # Check everything before changing anything, so a failure leaves nothing behind.
        versions: dict[str, int] = {}  # a stream may appear twice: its running version
        new_ids: set[str] = set()
        dups: list[AppendOutcome | None] = []
        for sid, recs, exp, _topic in items:
            current = versions.get(sid)
            if current is None:
                current = len(t.streams.get(sid, []))
            dup = _duplicate(t, sid, recs)  # (raises on a conflicting id)
            dups.append(dup)
            if dup is not None:
                continue  # stored before: appends nothing
            if exp is not None and exp != current:
                raise ConcurrencyError(sid, exp, current)
            for r in recs:
                if r.id in t.ids or r.id in new_ids:
                    raise EventIdConflict(
                        f"event id {r.id!r} is already stored; give every new event a new id")
                new_ids.add(r.id)
            versions[sid] = current + len(recs)
        # no await happens between the checks and the appends: nothing can interleave
        snaps = snapshots or {}
        now = self._clock()
        stored: list[OutMessage] = []
        out = [dup or self._write(sid, recs, topic, snaps.get(sid) if snaps else None, now,
                                  stored)
               for dup, (sid, recs, _exp, topic) in zip(dups, items, strict=True)]
        stored.extend(messages)
        if stored:
            self.engine._store(stored, now, results=False)
            self.engine._notify({m.topic for m in stored})
        return out

    async def read_stream(
        self, stream_id: str, from_version: int, to_version: int | None, limit: int
    ) -> list[EventRow]:
        positions = self._tables.streams.get(stream_id, [])
        stop = len(positions) if to_version is None else min(to_version, len(positions))
        lo = max(from_version, 1) - 1
        events = self._tables.events
        return [events[p - 1] for p in positions[lo : min(stop, lo + limit)]]

    async def read_all(self, after: int, stop: int | None, limit: int) -> list[EventRow]:
        events = self._tables.events
        end = len(events) if stop is None else min(stop, len(events))
        return events[after : min(end, after + limit)]

    async def stream_version(self, stream_id: str) -> int:
        return len(self._tables.streams.get(stream_id, ()))

    async def last_position(self) -> int:
        return len(self._tables.events)

    async def load(
        self, stream_id: str, schema: str | None, to_version: int | None, as_of: float | None
    ) -> StreamLoad:
        t = self._tables
        positions = t.streams.get(stream_id, [])
        current = len(positions)
        target = current if to_version is None else min(to_version, current)
        if as_of is not None:
            times = [t.events[p - 1][6] for p in positions]
            target = min(target, bisect.bisect_right(times, as_of))
        snap = None
        if schema is not None:
            for version, row in reversed(t.snapshots.get(stream_id, [])):
                if version <= target and row.schema == schema:
                    snap = row
                    break
        start = snap.version if snap else 0
        events = t.events
        rows = [(e[2], e[4], e[5], e[8]) for e in (events[p - 1] for p in positions[start:target])]
        return StreamLoad(current, target, snap, rows)

    async def save_snapshot(self, stream_id: str, snapshot: SnapshotRow) -> None:
        _put_snapshot(self._tables, stream_id, snapshot)

    async def projections(self) -> list[ProjectionState]:
        return [replace(s) for _, s in sorted(self._tables.projections.items())]

    async def transaction(self, fn: Callable[[StoreTx], Awaitable[T]]) -> T:
        # Serializes projection work in this process; the memory engine has no
        # other process to race with.
        async with self._tables.lock:
            tx = MemoryTx(self)
            result = await fn(tx)
            tx._flush()
            return result


def _put_snapshot(t: _Tables, stream_id: str, snapshot: SnapshotRow) -> None:
    snaps = t.snapshots.setdefault(stream_id, [])
    snaps[:] = [s for s in snaps if s[0] != snapshot.version]
    bisect.insort(snaps, (snapshot.version, snapshot), key=lambda s: s[0])


def _duplicate(t: _Tables, stream_id: str, records: Sequence[NewRecord]) -> AppendOutcome | None:
    if not records:
        return None
    pos = t.ids.get(records[0].id)
    if pos is None:
        return None
    rows = t.events[pos - 1 : pos - 1 + len(records)]
    same = len(rows) == len(records) and all(
        row[1] == stream_id and row[3] == r.id for row, r in zip(rows, records, strict=False)
    )
    if not same:
        raise EventIdConflict(
            f"event id {records[0].id!r} is already stored, but not as the start of this same "
            f"append to stream {stream_id!r}; give every new event a new id"
        )
    return AppendOutcome(rows[-1][2], [r[0] for r in rows], duplicate=True)


