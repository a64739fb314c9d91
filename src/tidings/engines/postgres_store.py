"""Event streams for `postgresql://…`: tables next to the message log, in the same schema.

The same guarantees as the SQLite store:

- global positions a reader can trust: an append takes the log's
  commit-order lock (`PgTx.lock_log`) before it reads the last position, so
  appends take turns until they commit and commit order is position order
  (docs/architecture.md, "Positions a reader can trust");
- optimistic concurrency per stream and the same duplicate-id rules: the
  stream's version and the first id are read under that lock;
- the store is its own outbox: each event is also stored as a pub/sub
  message, in the same transaction (`PgTx.append`);
- stored events are immutable for every client, not just this library:
  triggers call `tidings_refuse_change()` on UPDATE, DELETE and TRUNCATE.

The tables are created by the "eventstore" component's migrations
(`PostgresEngine.apply_migrations`) the first time the store is used.

Projection handlers get a `PostgresTx`: `tx.conn` (asyncpg, in the
projection's transaction), `await tx.execute(sql, *args)`, `tx.table(name)`
for schema-qualified names, and `tx.publish(…)`. Each event runs in a
savepoint, so a failing handler's writes are undone alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from ..errors import (
    ConcurrencyError,
    EngineUnavailable,
    EventIdConflict,
    InvalidArgument,
    InvalidEvent,
)
from ..messages import OutMessage
from .base import HOLDING_WRITER
from .postgres import PgTx, PostgresEngine
from .postgres_conn import Attempt
from .postgres_sql import Migration
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
    event_headers,
)

__all__ = ["EVENTSTORE_MIGRATIONS", "PostgresStore", "PostgresTx"]

T = TypeVar("T")
_enc = msgspec.json.Encoder().encode
_FAR = 2**62

#: Set while a `transaction` function runs. Its transaction may hold the log's lock (once
#: a handler publishes), so an append through the store would wait for itself.
_HOLDING = HOLDING_WRITER  # shared with the engine, which refuses hub writes meanwhile

# An append in one round trip. First the log's commit-order lock (the counter row that
# every appender of messages or events updates or locks until it commits); only then the
# checks and the insert. In a VOLATILE function each query takes a fresh snapshot (READ
# COMMITTED), so they see every append committed before the lock was granted (one plain
# statement would keep the snapshot it took before waiting). Returns (0, last position
# before ours, stream version before ours, time), or (1, position of the first id, stored
# already), or (2, NULL, the stream's current version) when `p_expected` is not it.
_APPEND_FUNCTION = (
    "CREATE FUNCTION {s}.tidings_append_events(p_stream text, p_expected bigint, "
    "p_now float8, p_ids text[], p_types text[], p_tvs int[], p_headers bytea[], "
    "p_data bytea[]) RETURNS TABLE (o_kind int, o_position bigint, o_version bigint, "
    "o_time float8) LANGUAGE plpgsql VOLATILE AS $fn$\n"
    "DECLARE v_known bigint; v_current bigint; v_last bigint; v_time float8;\n"
    "BEGIN\n"
    "  PERFORM FROM {s}.tidings_meta WHERE name = 'position' FOR UPDATE;\n"
    "  SELECT position INTO v_known FROM {s}.tidings_events WHERE id = p_ids[1];\n"
    "  IF v_known IS NOT NULL THEN\n"
    "    RETURN QUERY SELECT 1, v_known, NULL::bigint, NULL::float8; RETURN;\n"
    "  END IF;\n"
    "  SELECT coalesce(max(version), 0) INTO v_current FROM {s}.tidings_events "
    "WHERE stream_id = p_stream;\n"
    "  IF p_expected IS NOT NULL AND p_expected <> v_current THEN\n"
    "    RETURN QUERY SELECT 2, NULL::bigint, v_current, NULL::float8; RETURN;\n"
    "  END IF;\n"
    "  SELECT position, time INTO v_last, v_time FROM {s}.tidings_events "
    "ORDER BY position DESC LIMIT 1;\n"
    "  v_last := coalesce(v_last, 0);\n"
    "  v_time := greatest(p_now, coalesce(v_time, 0));  -- never decreasing with position\n"
    f"  INSERT INTO {{s}}.tidings_events ({EVENT_COLUMNS}) "
    "SELECT v_last + u.n, p_stream, v_current + u.n, u.id, u.type, u.tv, v_time, u.headers, "
    "u.data FROM unnest(p_ids, p_types, p_tvs, p_headers, p_data) "
    "WITH ORDINALITY AS u(id, type, tv, headers, data, n);\n"
    "  RETURN QUERY SELECT 0, v_last, v_current, v_time;\n"
    "END $fn$"
)


EVENTSTORE_MIGRATIONS: list[Migration] = [
    Migration(1, "events, snapshots, projections", [
        # `position` is assigned under the log's commit-order lock (see `_append_in_tx`),
        # never by a sequence: a sequence hands out numbers in call order, not commit order.
        """CREATE TABLE {s}.tidings_events (
            position bigint PRIMARY KEY,
            stream_id text NOT NULL,
            version bigint NOT NULL,
            id text NOT NULL,
            type text NOT NULL,
            type_version int NOT NULL,
            time float8 NOT NULL,
            headers bytea,
            data bytea NOT NULL,
            CONSTRAINT tidings_events_stream UNIQUE (stream_id, version),
            CONSTRAINT tidings_events_id UNIQUE (id))""",
        _APPEND_FUNCTION,
        "CREATE TRIGGER tidings_events_immutable BEFORE UPDATE OR DELETE ON {s}.tidings_events "
        "FOR EACH ROW EXECUTE FUNCTION {s}.tidings_refuse_change()",
        "CREATE TRIGGER tidings_events_no_truncate BEFORE TRUNCATE ON {s}.tidings_events "
        "FOR EACH STATEMENT EXECUTE FUNCTION {s}.tidings_refuse_change()",
        """CREATE TABLE {s}.tidings_snapshots (
            stream_id text NOT NULL, version bigint NOT NULL, schema text NOT NULL,
            time float8 NOT NULL, data bytea NOT NULL,
            PRIMARY KEY (stream_id, version))""",
        """CREATE TABLE {s}.tidings_projections (
            name text PRIMARY KEY, position bigint NOT NULL, status text NOT NULL,
            error text, failed_position bigint, updated float8 NOT NULL)""",
    ]),
]


class _Sql:
    """The store's statements, with the schema filled in once."""

    def __init__(self, schema: str) -> None:
        ev, snaps = f"{schema}.tidings_events", f"{schema}.tidings_snapshots"
        proj = f"{schema}.tidings_projections"
        self.lock_key = f"tidings.projection.{schema}."
        select = f"SELECT {EVENT_COLUMNS} FROM {ev}"
        # One round trip: lock, check, insert (see `_APPEND_FUNCTION`).
        self.append = f"SELECT * FROM {schema}.tidings_append_events($1, $2, $3, $4, $5, " \
            "$6, $7, $8)"
        self.duplicate = (
            f"SELECT position, stream_id, version, id FROM {ev} "
            "WHERE position >= $1 ORDER BY position LIMIT $2"
        )
        self.read_stream = (
            f"{select} WHERE stream_id = $1 AND version >= $2 AND version <= $3 "
            "ORDER BY version LIMIT $4"
        )
        self.read_all = f"{select} WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3"
        self.stream_version = f"SELECT max(version) FROM {ev} WHERE stream_id = $1"
        self.last_position = f"SELECT max(position) FROM {ev}"
        self.version_at = f"SELECT max(version) FROM {ev} WHERE stream_id = $1 AND time <= $2"
        self.snapshot = (
            f"SELECT version, schema, time, data FROM {snaps} WHERE stream_id = $1 "
            "AND schema = $2 AND version <= $3 ORDER BY version DESC LIMIT 1"
        )
        self.tail = (
            f"SELECT version, type, type_version, data FROM {ev} "
            "WHERE stream_id = $1 AND version > $2 AND version <= $3 ORDER BY version"
        )
        self.put_snapshot = (
            f"INSERT INTO {snaps} (stream_id, version, schema, time, data) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (stream_id, version) DO UPDATE SET "
            "schema = excluded.schema, time = excluded.time, data = excluded.data"
        )
        cols = "name, position, status, error, failed_position, updated"
        self.projections = f"SELECT {cols} FROM {proj} ORDER BY name"
        self.projection = f"SELECT {cols} FROM {proj} WHERE name = $1"
        # one runner of a projection at a time, across processes (until commit)
        self.lock_projection = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
        self.save_projection = (
            f"INSERT INTO {proj} ({cols}) VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (name) DO UPDATE SET position = excluded.position, "
            "status = excluded.status, error = excluded.error, "
            "failed_position = excluded.failed_position, updated = excluded.updated"
        )


class PostgresTx(StoreTx):
    """The projection's PostgreSQL transaction, lent to its handlers.

    `conn` and `execute` act on the transaction that will store the
    projection's checkpoint. Messages published through it are stored when
    the event's handler succeeds (with the log lock taken then).
    """

    def __init__(self, sql: _Sql, tx: PgTx) -> None:
        self._sql = sql
        self._tx = tx
        self.conn: Any = tx.conn
        self._outbox: list[OutMessage] = []

    @property
    def now(self) -> float:
        return self._tx.now

    def table(self, name: str) -> str:
        """`name` qualified with the engine's schema."""
        return self._tx.table(name)

    async def execute(self, sql: str, *args: Any) -> str:
        return str(await self.conn.execute(sql, *args))

    def publish_messages(self, messages: Sequence[OutMessage]) -> None:
        self._outbox.extend(messages)

    async def _flush(self) -> None:
        if self._outbox:
            messages, self._outbox = self._outbox, []
            await self._tx.append(messages)

    async def events_after(self, position: int, limit: int) -> list[EventRow]:
        rows = await self.conn.fetch(self._sql.read_all, position, _FAR, limit)
        return [tuple(r) for r in rows]

    async def projection(self, name: str) -> ProjectionState | None:
        await self.conn.execute(self._sql.lock_projection, self._sql.lock_key + name)
        row = await self.conn.fetchrow(self._sql.projection, name)
        return ProjectionState(*row) if row else None

    async def save_projection(self, state: ProjectionState, now: float) -> None:
        state.updated = now
        await self.conn.execute(self._sql.save_projection, state.name, state.position,
                                state.status, state.error, state.failed_position, now)

    async def begin_event(self) -> None:
        await self._flush()  # published outside any event's handler: keep
        await self.conn.execute("SAVEPOINT tidings_event")

    async def end_event(self, ok: bool) -> None:
        if ok:
            await self._flush()
        else:
            self._outbox.clear()
            await self.conn.execute("ROLLBACK TO SAVEPOINT tidings_event")
        await self.conn.execute("RELEASE SAVEPOINT tidings_event")


#: at most this many appends share one commit
_GROUP = 200


_STOPPED = ("the event store stopped during the append; its outcome is unknown: retry it "
            "(its event ids make a retry safe)")


def _fail_all(futs: Sequence[asyncio.Future[Any]], exc: BaseException) -> None:
    """Tell every appender of a group that its transaction failed (a cancellation or
    another BaseException: that the store stopped, outcome unknown)."""
    err = exc if isinstance(exc, Exception) else EngineUnavailable(_STOPPED)
    for fut in futs:
        if not fut.done():
            fut.set_exception(err)


def _answer_all(futs: Sequence[asyncio.Future[Any]], results: Sequence[Any]) -> None:
    """Give each appender of a committed group its outcome (or its own error)."""
    for fut, r in zip(futs, results, strict=True):
        if fut.done():
            continue
        if isinstance(r, BaseException):
            fut.set_exception(r)
        else:
            fut.set_result(r)


class PostgresStore(StoreBackend):
    engine: PostgresEngine

    def __init__(self, engine: PostgresEngine) -> None:
        super().__init__(engine)
        self._sql = _Sql(engine.sql.schema)
        self._created = False
        # Group commit: appends queued while a commit is under way share the next one.
        self._queue: list[tuple[Any, ...]] = []
        self._flusher: asyncio.Task[None] | None = None
        # The same for append_batch (a saga's or a handler's commit).
        self._batches: list[tuple[Any, ...]] = []
        self._batch_flusher: asyncio.Task[None] | None = None

    async def _ready(self) -> None:
        if not self._created:  # idempotent: concurrent first calls just both look
            if self.engine._auto_migrate:
                await self.engine.apply_migrations("eventstore", EVENTSTORE_MIGRATIONS)
            else:  # migrate=false: create nothing, say what to run
                await self.engine._run(self._check_tables, "checking the event store")
            self._created = True

    async def _check_tables(self, conn: Any, attempt: Attempt) -> None:
        schema = self.engine.sql.schema
        if await conn.fetchval("SELECT to_regclass($1)", f"{schema}.tidings_events") is None:
            raise EngineUnavailable(
                f"schema {self.engine.schema!r} has no event-store tables and this hub was "
                "opened with migrate=false; run `tidings migrate` (or connect once without "
                "migrate=false)")

    async def _read(self, fn: Callable[[Any], Awaitable[T]], what: str) -> T:
        await self._ready()

        async def op(conn: Any, attempt: Attempt) -> T:
            return await fn(conn)

        return await self.engine._run(op, what)

    @staticmethod
    def _check_not_holding() -> None:
        if _HOLDING.get():
            raise InvalidArgument(
                "cannot append events from inside a projection handler: its transaction may "
                "hold the log's lock and would wait for itself; write through the handler's "
                "tx instead"
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
        fut: asyncio.Future[AppendOutcome] = asyncio.get_running_loop().create_future()
        self._queue.append((stream_id, records, expected, topic, snapshot, fut))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        return await fut

    async def _flush(self) -> None:
        """Commit queued appends together, in one transaction.

        Every append takes the log's lock until its commit, so one transaction
        per append makes concurrent appends wait for each other's WAL flush; one
        transaction for all that are queued shares that flush. A version
        conflict is found by a check (nothing is aborted) and fails that append
        alone; an event id reused (a database error, which aborts the
        transaction) makes the batch commit again one append at a time.
        """
        try:
            while self._queue:
                batch, self._queue = self._queue[:_GROUP], self._queue[_GROUP:]
                if len(batch) == 1:
                    await self._commit_one(*batch[0])
                    continue
                results: list[Any] = []

                async def op(tx: PgTx, batch: list[tuple[Any, ...]] = batch,
                             results: list[Any] = results) -> None:
                    results.clear()  # a retried transaction starts over
                    stored: list[OutMessage] = []
                    for stream_id, records, expected, topic, snapshot, _ in batch:
                        try:
                            out, msgs = await _append_in_tx(
                                self._sql, tx, stream_id, records, expected, topic)
                        except ConcurrencyError as exc:  # found by a check: nothing aborted
                            results.append(exc)
                            continue
                        if msgs and snapshot is not None:
                            await _put_snapshot(self._sql, tx.conn, stream_id, snapshot)
                        results.append(out)
                        stored.extend(msgs)
                    if stored:
                        await tx.append(stored)

                try:
                    await self.engine.transact(op, durable=True)
                except (EventIdConflict, InvalidEvent):
                    # an id reuse or refused data aborts the whole transaction: commit
                    # them one by one, so only the offending append fails
                    try:
                        for item in batch:
                            await self._commit_one(*item)
                    except BaseException:
                        for *_, fut in batch:  # not attempted: tell their appenders
                            if not fut.done():
                                fut.set_exception(EngineUnavailable(_STOPPED))
                        raise
                    continue
                except BaseException as exc:
                    _fail_all([item[-1] for item in batch], exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                _answer_all([item[-1] for item in batch], results)
        finally:
            self._flusher = None
            if self._queue:  # queued while we were finishing
                self._flusher = asyncio.ensure_future(self._flush())

    async def _commit_one(self, stream_id: str, records: Sequence[NewRecord],
                          expected: int | None, topic: str, snapshot: SnapshotRow | None,
                          fut: asyncio.Future[AppendOutcome]) -> None:
        async def op(tx: PgTx) -> AppendOutcome:
            out, messages = await _append_in_tx(self._sql, tx, stream_id, records, expected,
                                                topic)
            if messages:
                await tx.append(messages)
                if snapshot is not None:
                    await _put_snapshot(self._sql, tx.conn, stream_id, snapshot)
            return out

        try:
            out = await self.engine.transact(op, durable=True)
        except BaseException as exc:  # the appender must hear of it, even on cancellation
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else
                                  EngineUnavailable(_STOPPED))
            if not isinstance(exc, Exception):
                raise
            return
        if not fut.done():
            fut.set_result(out)

    async def append_batch(
        self,
        items: Sequence[StreamAppend],
        messages: Sequence[OutMessage] = (),
        snapshots: Mapping[str, SnapshotRow] | None = None,
    ) -> list[AppendOutcome]:
        """Queued and committed together with the other batches queued meanwhile (group
        commit, as `append`): each in a savepoint of one transaction, so a conflict or a
        reused id fails its own batch alone, and the log's lock and the WAL flush are
        taken once for all of them instead of once each."""
        self._check_not_holding()
        await self._ready()
        fut: asyncio.Future[list[AppendOutcome]] = asyncio.get_running_loop().create_future()
        self._batches.append((items, messages, snapshots or {}, fut))
        if self._batch_flusher is None:
            self._batch_flusher = asyncio.ensure_future(self._flush_batches())
        return await fut

    async def _batch_in_tx(self, tx: PgTx, items: Sequence[StreamAppend],
                           messages: Sequence[OutMessage], snaps: Mapping[str, SnapshotRow]
                           ) -> list[AppendOutcome]:
        out = []
        stored: list[OutMessage] = []  # every stream's messages in one statement
        for sid, recs, exp, topic in items:
            outcome, msgs = await _append_in_tx(self._sql, tx, sid, recs, exp, topic)
            out.append(outcome)
            stored.extend(msgs)
            snap = snaps.get(sid)
            if msgs and snap is not None:
                await _put_snapshot(self._sql, tx.conn, sid, snap)
        stored.extend(messages)
        if stored:
            await tx.append(stored)
        return out

    async def _flush_batches(self) -> None:
        try:
            while self._batches:
                group, self._batches = self._batches[:_GROUP], self._batches[_GROUP:]
                results: list[Any] = []

                async def op(tx: PgTx, group: list[tuple[Any, ...]] = group,
                             results: list[Any] = results) -> None:
                    results.clear()  # a retried transaction starts over
                    if len(group) == 1:  # alone: no savepoint needed
                        items, messages, snaps, _ = group[0]
                        results.append(await self._batch_in_tx(tx, items, messages, snaps))
                        return
                    for items, messages, snaps, _ in group:
                        topics, locked = dict(tx._new_topics), tx._locked
                        try:
                            async with tx.conn.transaction():  # a savepoint
                                results.append(
                                    await self._batch_in_tx(tx, items, messages, snaps))
                        except (ConcurrencyError, InvalidArgument) as exc:  # its own data
                            # undone alone: so is what it did to the transaction's state
                            tx._new_topics, tx._locked = topics, locked
                            results.append(exc)

                try:
                    await self.engine.transact(op, durable=True)
                except BaseException as exc:
                    _fail_all([item[-1] for item in group], exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                _answer_all([item[-1] for item in group], results)
        finally:
            self._batch_flusher = None
            if self._batches:  # queued while we were finishing
                self._batch_flusher = asyncio.ensure_future(self._flush_batches())

    async def read_stream(
        self, stream_id: str, from_version: int, to_version: int | None, limit: int
    ) -> list[EventRow]:
        stop = to_version if to_version is not None else _FAR

        async def op(conn: Any) -> list[EventRow]:
            rows = await conn.fetch(self._sql.read_stream, stream_id, from_version, stop, limit)
            return [tuple(r) for r in rows]

        return await self._read(op, "reading a stream")

    async def read_all(self, after: int, stop: int | None, limit: int) -> list[EventRow]:
        end = stop if stop is not None else _FAR

        async def op(conn: Any) -> list[EventRow]:
            rows = await conn.fetch(self._sql.read_all, after, end, limit)
            return [tuple(r) for r in rows]

        return await self._read(op, "reading events")

    async def stream_version(self, stream_id: str) -> int:
        async def op(conn: Any) -> int:
            return int(await conn.fetchval(self._sql.stream_version, stream_id) or 0)

        return await self._read(op, "reading a stream's version")

    async def last_position(self) -> int:
        async def op(conn: Any) -> int:
            return int(await conn.fetchval(self._sql.last_position) or 0)

        return await self._read(op, "reading the last event position")

    async def load(
        self, stream_id: str, schema: str | None, to_version: int | None, as_of: float | None
    ) -> StreamLoad:
        sql = self._sql

        async def op(conn: Any) -> StreamLoad:
            # one snapshot for every query (no append may slip in between them)
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                current = int(await conn.fetchval(sql.stream_version, stream_id) or 0)
                target = current if to_version is None else min(to_version, current)
                if as_of is not None and target:
                    at = await conn.fetchval(sql.version_at, stream_id, as_of)
                    target = min(target, int(at or 0))
                snap = None
                if schema is not None and target:
                    row = await conn.fetchrow(sql.snapshot, stream_id, schema, target)
                    snap = SnapshotRow(*row) if row else None
                start = snap.version if snap else 0
                rows = ([tuple(r) for r in await conn.fetch(sql.tail, stream_id, start, target)]
                        if target > start else [])
            return StreamLoad(current, target, snap, rows)

        return await self._read(op, "loading a stream")

    async def save_snapshot(self, stream_id: str, snapshot: SnapshotRow) -> None:
        self._check_not_holding()
        await self._ready()

        async def op(conn: Any) -> None:
            await _put_snapshot(self._sql, conn, stream_id, snapshot)

        await self._read(op, "saving a snapshot")  # one statement: safe to repeat

    async def projections(self) -> list[ProjectionState]:
        async def op(conn: Any) -> list[ProjectionState]:
            return [ProjectionState(*r) for r in await conn.fetch(self._sql.projections)]

        return await self._read(op, "reading projections")

    async def transaction(self, fn: Callable[[StoreTx], Awaitable[T]]) -> T:
        self._check_not_holding()
        await self._ready()

        async def body(tx: PgTx) -> T:
            stx = PostgresTx(self._sql, tx)
            token = _HOLDING.set(True)
            try:
                result = await fn(stx)
                await stx._flush()
            finally:
                _HOLDING.reset(token)
            return result

        # Not durable: a checkpoint and its read model commit together, so losing a recent
        # commit to a crash loses both and the projection replays those events.
        return await self.engine.transact(body, durable=False)


async def _put_snapshot(sql: _Sql, conn: Any, stream_id: str, s: SnapshotRow) -> None:
    await conn.execute(sql.put_snapshot, stream_id, s.version, s.schema, s.time, s.data)


async def _duplicate(sql: _Sql, conn: Any, first: int, stream_id: str,
                     records: Sequence[NewRecord]) -> AppendOutcome:
    rows = await conn.fetch(sql.duplicate, first, len(records))
    same = len(rows) == len(records) and all(
        r[1] == stream_id and r[3] == rec.id for r, rec in zip(rows, records, strict=False)
    )
    if not same:
        raise EventIdConflict(
            f"event id {records[0].id!r} is already stored, but not as the start of this same "
            f"append to stream {stream_id!r}; give every new event a new id"
        )
    return AppendOutcome(int(rows[-1][2]), [int(r[0]) for r in rows], duplicate=True)


async def _append_in_tx(sql: _Sql, tx: PgTx, stream_id: str, records: Sequence[NewRecord],
                        expected: int | None, topic: str
                        ) -> tuple[AppendOutcome, list[OutMessage]]:
    """Append to one stream inside an open engine transaction (see `PostgresStore.append`).

    Returns the outcome and the messages that publish the new events, which the caller
    stores in the same transaction (none for a duplicate).
    """
    conn = tx.conn
    # The log's lock first (taken by the function): from there to our commit no other
    # appender of events or messages can commit, so the positions assigned follow commit
    # order, and the checks see every append committed before ours.
    try:
        kind, last, current, now = await conn.fetchrow(
            sql.append, stream_id, expected, tx.now,
            [r.id for r in records], [r.type for r in records],
            [r.type_version for r in records],
            [_enc(r.headers) if r.headers else None for r in records],
            [r.data for r in records])
    except Exception as exc:
        if type(exc).__name__ == "UniqueViolationError":
            raise EventIdConflict(
                f"an event id in this append to {stream_id!r} is already stored; give "
                "every new event a new id"
            ) from None
        if any(c.__name__ == "DataError" for c in type(exc).__mro__):  # asyncpg's class
            raise InvalidEvent(  # the caller's data (a NUL byte, say), not the server
                f"the database refused this append to {stream_id!r}: {exc}; fix what it "
                "names") from None
        raise
    tx._locked = True  # what `tx.lock_log()` records: the function took the lock
    if kind == 1:
        return await _duplicate(sql, conn, last, stream_id, records), []
    if kind == 2:
        raise ConcurrencyError(stream_id, expected, int(current))
    last, current = int(last), int(current)
    messages = [
        OutMessage(r.id, topic, stream_id, r.data,
                   event_headers(r, stream_id, current + i, last + i), False)
        for i, r in enumerate(records, 1)
    ]
    n = len(records)
    return AppendOutcome(current + n, list(range(last + 1, last + n + 1)),
                         time=float(now)), messages
