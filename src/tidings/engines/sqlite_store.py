"""Event streams for `sqlite:///…`: tables next to the message log, in the same file.

Appends run on the engine's writer thread inside its group commit, so an
event, its pub/sub message and an optional snapshot commit together (the
store is its own outbox). Triggers make the events table append-only for
every connection, not just this library's.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from ..errors import ConcurrencyError, EventIdConflict, InvalidArgument
from ..messages import OutMessage
from .base import HOLDING_WRITER
from .sqlite import SqliteEngine
from .sqlite_tx import INSERT_MESSAGES, Tx, insert_values
from .store_base import (
    EVENT_COLUMNS,
    AppendOutcome,
    EventRow,
    NewRecord,
    ProjectionState,
    SnapshotRow,
    StoreBackend,
    StoreTx,
    StreamAppend,
    StreamLoad,
    event_headers_open,
)

__all__ = ["SqliteStore", "SqliteTx"]

T = TypeVar("T")
_enc = msgspec.json.Encoder().encode

SCHEMA = [
    # position is the global order; it is assigned by the writer under SQLite's
    # write lock (see `SqliteStore.append`), never by AUTOINCREMENT.
    """CREATE TABLE IF NOT EXISTS tidings_events (
        position INTEGER PRIMARY KEY,
        stream_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        id TEXT NOT NULL,
        type TEXT NOT NULL,
        type_version INTEGER NOT NULL,
        time REAL NOT NULL,
        headers BLOB,
        data BLOB NOT NULL)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS tidings_events_stream ON tidings_events (stream_id, version)",
    "CREATE UNIQUE INDEX IF NOT EXISTS tidings_events_id ON tidings_events (id)",
    """CREATE TRIGGER IF NOT EXISTS tidings_events_no_update BEFORE UPDATE ON tidings_events
       BEGIN SELECT RAISE(ABORT, 'tidings_events is append-only: stored events are never updated'); END""",
    """CREATE TRIGGER IF NOT EXISTS tidings_events_no_delete BEFORE DELETE ON tidings_events
       BEGIN SELECT RAISE(ABORT, 'tidings_events is append-only: stored events are never deleted'); END""",
    """CREATE TABLE IF NOT EXISTS tidings_snapshots (
        stream_id TEXT NOT NULL, version INTEGER NOT NULL, schema TEXT NOT NULL,
        time REAL NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (stream_id, version)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS tidings_projections (
        name TEXT PRIMARY KEY, position INTEGER NOT NULL, status TEXT NOT NULL,
        error TEXT, failed_position INTEGER, updated REAL NOT NULL) WITHOUT ROWID""",
]

_INLINE_ROWS = 256  # read_all pages up to this many rows run on the loop's connection
_INSERT = f"INSERT INTO tidings_events ({EVENT_COLUMNS}) VALUES "
_SELECT = f"SELECT {EVENT_COLUMNS} FROM tidings_events"

#: Set while a `transaction` function runs: it holds the writer, so writing
#: through the store from inside it would wait for itself.
_HOLDING = HOLDING_WRITER


class _Aborted(Exception):
    """The transaction's function failed or was cancelled: roll back."""


class SqliteTx(StoreTx):
    """The engine's writer transaction, lent to async code on the event loop.

    `conn`/`execute`/`executemany` act on the same SQLite transaction that
    will store the projection's checkpoint. The writer thread waits while
    this code runs, so the connection is never used by two threads at once.
    The protocol's async methods run their statement directly and never
    suspend: no hop to a thread per call.
    """

    def __init__(self, tx: Tx) -> None:
        self._tx = tx
        self.conn: sqlite3.Connection = tx.conn

    @property
    def now(self) -> float:
        return self._tx.now

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        return self.conn.executemany(sql, rows)

    def publish_messages(self, messages: Sequence[OutMessage]) -> None:
        self._tx.append(messages)

    async def events_after(self, position: int, limit: int) -> list[EventRow]:
        return self.conn.execute(
            f"{_SELECT} WHERE position > ? ORDER BY position LIMIT ?", (position, limit)
        ).fetchall()

    async def projection(self, name: str) -> ProjectionState | None:
        row = self.conn.execute(
            "SELECT name, position, status, error, failed_position, updated "
            "FROM tidings_projections WHERE name = ?", (name,)
        ).fetchone()
        return ProjectionState(*row) if row else None

    async def save_projection(self, state: ProjectionState, now: float) -> None:
        state.updated = now
        self.conn.execute(
            "INSERT OR REPLACE INTO tidings_projections "
            "(name, position, status, error, failed_position, updated) VALUES (?, ?, ?, ?, ?, ?)",
            (state.name, state.position, state.status, state.error, state.failed_position,
             state.updated),
        )

    async def begin_event(self) -> None:
        self.conn.execute("SAVEPOINT tidings_event")

    async def end_event(self, ok: bool) -> None:
        if not ok:
            self.conn.execute("ROLLBACK TO tidings_event")
        self.conn.execute("RELEASE tidings_event")


class SqliteStore(StoreBackend):
    engine: SqliteEngine

    def __init__(self, engine: SqliteEngine) -> None:
        super().__init__(engine)
        self._created = False
        self._lock = asyncio.Lock()

    async def _ready(self) -> None:
        if self._created:
            return
        async with self._lock:
            if self._created:
                return

            def create(tx: Tx) -> None:
                for ddl in SCHEMA:
                    tx.execute(ddl)

            await self.engine.transact(create, durable=True)
            self._created = True

    async def _read(self, fn: Callable[[sqlite3.Connection], T], inline: bool = True,
                    atomic: bool = True) -> T:
        await self._ready()
        return await self.engine._read_op(fn, inline=inline, atomic=atomic)

    @staticmethod
    def _check_not_holding() -> None:
        if _HOLDING.get():
            raise InvalidArgument(
                "cannot append events from inside a projection handler: it holds the writer "
                "and would wait for itself; write through the handler's tx instead"
            )

    async def append(
        self,
        stream_id: str,
        records: Sequence[NewRecord],
        expected: int | None,
        topic: str,
        snapshot: SnapshotRow | None = None,
    ) -> AppendOutcome:
        self._check_not_holding()
        await self._ready()

        def op(tx: Tx) -> AppendOutcome:
            return append_in_tx(tx, stream_id, records, expected, topic, snapshot)

        return await self.engine.transact(op, durable=True)

    async def append_batch(
        self,
        items: Sequence[StreamAppend],
        messages: Sequence[OutMessage] = (),
        snapshots: Mapping[str, SnapshotRow] | None = None,
    ) -> list[AppendOutcome]:
        self._check_not_holding()
        await self._ready()
        snaps = snapshots or {}

        def op(tx: Tx) -> list[AppendOutcome]:
            return append_many_in_tx(tx, items, messages, snaps)

        return await self.engine.transact(op, durable=True)

    async def read_stream(
        self, stream_id: str, from_version: int, to_version: int | None, limit: int
    ) -> list[EventRow]:
        stop = to_version if to_version is not None else 2**62

        def op(conn: sqlite3.Connection) -> list[EventRow]:
            return conn.execute(
                f"{_SELECT} WHERE stream_id = ? AND version >= ? AND version <= ? "
                "ORDER BY version LIMIT ?", (stream_id, from_version, stop, limit)
            ).fetchall()

        return await self._read(op)

    async def read_all(self, after: int, stop: int | None, limit: int) -> list[EventRow]:
        end = stop if stop is not None else 2**62

        def op(conn: sqlite3.Connection) -> list[EventRow]:
            return conn.execute(
                f"{_SELECT} WHERE position > ? AND position <= ? ORDER BY position LIMIT ?",
                (after, end, limit),
            ).fetchall()

        # A page across all streams can be large: on a reader thread unless it is small
        # (one stream's events, read_stream, stay on the loop: streams are short).
        return await self._read(op, inline=limit <= _INLINE_ROWS)

    async def stream_version(self, stream_id: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT max(version) FROM tidings_events WHERE stream_id = ?",
                               (stream_id,)).fetchone()
            return int(row[0] or 0)

        return await self._read(op, atomic=False)  # one statement

    async def last_position(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT max(position) FROM tidings_events").fetchone()[0]
                       or 0)

        return await self._read(op)

    async def load(
        self, stream_id: str, schema: str | None, to_version: int | None, as_of: float | None
    ) -> StreamLoad:
        if to_version is None and as_of is None and schema is not None:
            return await self._read(lambda conn: _load_latest(conn, stream_id, schema),
                                    atomic=False)

        def op(conn: sqlite3.Connection) -> StreamLoad:
            current = int(conn.execute(
                "SELECT max(version) FROM tidings_events WHERE stream_id = ?", (stream_id,)
            ).fetchone()[0] or 0)
            target = current if to_version is None else min(to_version, current)
            if as_of is not None and target:
                row = conn.execute(
                    "SELECT max(version) FROM tidings_events WHERE stream_id = ? AND time <= ?",
                    (stream_id, as_of),
                ).fetchone()
                target = min(target, int(row[0] or 0))
            snap = None
            if schema is not None and target:
                row = conn.execute(
                    "SELECT version, schema, time, data FROM tidings_snapshots WHERE "
                    "stream_id = ? AND schema = ? AND version <= ? ORDER BY version DESC LIMIT 1",
                    (stream_id, schema, target),
                ).fetchone()
                snap = SnapshotRow(*row) if row else None
            start = snap.version if snap else 0
            rows = conn.execute(
                "SELECT version, type, type_version, data FROM tidings_events "
                "WHERE stream_id = ? AND version > ? AND version <= ? ORDER BY version",
                (stream_id, start, target),
            ).fetchall() if target > start else []
            return StreamLoad(current, target, snap, rows)

        return await self._read(op)

    async def save_snapshot(self, stream_id: str, snapshot: SnapshotRow) -> None:
        self._check_not_holding()
        await self._ready()
        await self.engine.transact(lambda tx: _put_snapshot(tx.conn, stream_id, snapshot),
                                   durable=False)

    async def projections(self) -> list[ProjectionState]:
        def op(conn: sqlite3.Connection) -> list[ProjectionState]:
            return [ProjectionState(*r) for r in conn.execute(
                "SELECT name, position, status, error, failed_position, updated "
                "FROM tidings_projections ORDER BY name")]

        return await self._read(op)

    async def transaction(self, fn: Callable[[StoreTx], Awaitable[T]]) -> T:
        self._check_not_holding()
        await self._ready()
        loop = asyncio.get_running_loop()
        lent: asyncio.Future[SqliteTx] = loop.create_future()
        done = threading.Event()
        ok = False

        def lend(tx: Tx) -> None:
            # On the writer thread: hand the open transaction to the event loop
            # and wait until `fn` is finished with it.
            loop.call_soon_threadsafe(_set_result, lent, SqliteTx(tx))
            done.wait()
            if not ok:
                raise _Aborted()

        # Not `durable`: projection checkpoints and their read models commit
        # together, so losing a recent commit to a power cut loses both and the
        # projection replays those events; no fsync needed.
        commit = asyncio.ensure_future(self.engine.transact(lend, durable=False))
        commit.add_done_callback(_consume)
        try:
            await asyncio.wait((lent, commit), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            done.set()
            raise
        if not lent.done():
            done.set()
            lent.cancel()
            await commit  # the writer failed before lending: its error
        stx = lent.result()
        token = _HOLDING.set(True)
        try:
            result = await fn(stx)
            ok = True
        finally:
            _HOLDING.reset(token)
            done.set()
        await commit
        return result


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _put_snapshot(conn: sqlite3.Connection, stream_id: str, s: SnapshotRow) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO tidings_snapshots (stream_id, version, schema, time, data) "
        "VALUES (?, ?, ?, ?, ?)", (stream_id, s.version, s.schema, s.time, s.data),
    )


def _duplicate(conn: sqlite3.Connection, first: int, stream_id: str,
               records: Sequence[NewRecord]) -> AppendOutcome:
    rows = conn.execute(
        "SELECT position, stream_id, version, id FROM tidings_events "
        "WHERE position >= ? ORDER BY position LIMIT ?", (first, len(records))
    ).fetchall()
    same = len(rows) == len(records) and all(
        r[1] == stream_id and r[3] == rec.id for r, rec in zip(rows, records, strict=False)
    )
    if not same:
        raise EventIdConflict(
            f"event id {records[0].id!r} is already stored, but not as the start of this same "
            f"append to stream {stream_id!r}; give every new event a new id"
        )
    return AppendOutcome(rows[-1][2], [r[0] for r in rows], duplicate=True)


def _load_latest(conn: sqlite3.Connection, stream_id: str, schema: str) -> StreamLoad:
    """The newest state: the newest snapshot, then every event after it.

    Two statements need no common snapshot here: events are only ever appended, and a
    snapshot is written with the events it covers, so whatever commits between them
    only adds events after the snapshot's version (replayed too).
    """
    row = conn.execute(
        "SELECT version, schema, time, data FROM tidings_snapshots WHERE stream_id = ? AND "
        "schema = ? ORDER BY version DESC LIMIT 1", (stream_id, schema)).fetchone()
    snap = SnapshotRow(*row) if row else None
    start = snap.version if snap else 0
    rows = conn.execute(
        "SELECT version, type, type_version, data FROM tidings_events "
        "WHERE stream_id = ? AND version > ? ORDER BY version", (stream_id, start)).fetchall()
    current = rows[-1][0] if rows else start
    return StreamLoad(current, current, snap, rows)


def append_in_tx(tx: Tx, stream_id: str, records: Sequence[NewRecord], expected: int | None,
                 topic: str, snapshot: SnapshotRow | None = None) -> AppendOutcome:
    """Append to one stream inside an open writer transaction (see `SqliteStore.append`)."""
    snaps = {stream_id: snapshot} if snapshot is not None else None
    return append_many_in_tx(tx, [(stream_id, records, expected, topic)], (), snaps)[0]


def append_many_in_tx(tx: Tx, items: Sequence[StreamAppend],
                      messages: Sequence[OutMessage] = (),
                      snapshots: Mapping[str, SnapshotRow] | None = None,
                      ) -> list[AppendOutcome]:
    """Append to several streams (each item: stream, records, expected version, topic),
    then store `messages`, inside an open writer transaction: one statement checks
    every item, one inserts every event, one publishes every event (the outbox), and
    `messages` follow the events' own messages."""
    if len(items) > _STATE_ITEMS:  # (a statement's parameters are bounded)
        parts = [append_many_in_tx(tx, items[i:i + _STATE_ITEMS], (), snapshots)
                 for i in range(0, len(items), _STATE_ITEMS)]
        if messages:
            tx.append(messages)
        return [o for part in parts for o in part]
    conn = tx.conn
    # Positions are taken here, on the engine's single writer inside the
    # write transaction (and under SQLite's write lock across processes):
    # commit order is position order, so a reader that has seen position N
    # never later finds a smaller one appear.
    known, versions, last = _state(conn, items)
    now = tx.now
    out: list[AppendOutcome] = []
    events: list[Any] = []  # the rows of tidings_events, one after the other
    published: list[Any] = []  # those of tidings_messages: each event published
    snaps: list[tuple[str, SnapshotRow]] = []
    own: dict[str, str] | None = None  # the records' own headers, encoded once while
    own_json: bytes | None = None      # they are the same (they are, within one save)
    for stream_id, records, expected, topic in items:
        first = known.get(records[0].id)
        if first is not None:
            out.append(_duplicate(conn, first, stream_id, records))
            continue
        current = versions.get(stream_id, 0)
        if expected is not None and expected != current:
            raise ConcurrencyError(stream_id, expected, current)
        n = len(records)
        topic_id = tx.topic_id(topic)
        heads: dict[tuple[str, int], bytes] = {}
        for i, r in enumerate(records, 1):
            pos, version = last + i, current + i
            h = r.headers
            if h is not own and h != own:
                own, own_json, heads = h, (_enc(h) if h else None), {}
            events += (pos, stream_id, version, r.id, r.type, r.type_version, now, own_json,
                       r.data)
            head = heads.get((r.type, r.type_version))
            if head is None:  # a template: `% (stream version, event position)`
                head = heads[r.type, r.type_version] = event_headers_open(
                    h, r.type, r.type_version, stream_id).replace(b"%", b"%%") + (
                    b'"stream-version":"%d","event-position":"%d"}')
            published += (0, topic_id, r.id, stream_id, now, head % (version, pos), r.data)
        out.append(AppendOutcome(current + n, list(range(last + 1, last + n + 1)), time=now))
        versions[stream_id] = current + n  # a stream may come twice
        last += n
        snapshot = snapshots.get(stream_id) if snapshots else None
        if snapshot is not None:
            snaps.append((stream_id, snapshot))
    try:
        insert_values(conn, _INSERT, 9, events)
    except sqlite3.IntegrityError:
        raise EventIdConflict(
            "an event id in this append is already stored (or given twice); give every new "
            "event a new id"
        ) from None
    if events:
        start = tx._next_positions(len(events) // 9)  # the messages' log positions
        published[::7] = range(start, start + len(events) // 9)
        insert_values(conn, INSERT_MESSAGES, 7, published)
    if messages:
        tx.append(messages)
    for stream_id, snapshot in snaps:
        _put_snapshot(conn, stream_id, snapshot)
    return out


_STATE_ITEMS = 200  # items checked by one statement at most
_state_sql: dict[tuple[int, int], str] = {}


def _state(conn: sqlite3.Connection, items: Sequence[StreamAppend]
           ) -> tuple[dict[str, int], dict[str, int], int]:
    """What appending `items` must check, in one statement: where each item's first
    event id is stored (if it is), each stream's version, and the last position."""
    ids = list(dict.fromkeys(recs[0].id for _, recs, _, _ in items))
    streams = list(dict.fromkeys(sid for sid, _, _, _ in items))
    key = (len(ids), len(streams))
    sql = _state_sql.get(key)
    if sql is None:
        sql = _state_sql[key] = (
            "SELECT 0, id, position FROM tidings_events WHERE id IN "
            f"({', '.join('?' * len(ids))}) UNION ALL "
            "SELECT 1, stream_id, max(version) FROM tidings_events WHERE stream_id IN "
            f"({', '.join('?' * len(streams))}) GROUP BY stream_id UNION ALL "
            "SELECT 2, '', max(position) FROM tidings_events")
    known: dict[str, int] = {}
    versions: dict[str, int] = {}
    last = 0
    for kind, name, value in conn.execute(sql, [*ids, *streams]):
        if kind == 0:
            known[name] = value
        elif kind == 1:
            versions[name] = value or 0
        else:
            last = value or 0
    return known, versions, last
