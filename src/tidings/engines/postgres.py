"""`postgresql://…`: the engine for many processes on many machines, on PostgreSQL 15+.

The same guarantees as the SQLite engine, through asyncpg and a pool:

- positions a reader can trust: every append updates the position counter
  row in its own transaction, so appends take turns on that row's lock until
  they commit, and commit order is position order (docs/architecture.md);
- fetch locks the subscription row (`FOR UPDATE`), then runs the same pure
  `plan_fetch` as every engine on one snapshot, so competing consumers on any
  number of connections and processes never hold the same message at once;
- wake-ups through LISTEN/NOTIFY on a dedicated connection that reconnects by
  itself; appends and settles NOTIFY in their own transaction;
- lost connections (a restarted server) are retried for `reconnect_timeout`
  seconds wherever repeating is safe; otherwise the caller gets
  `EngineUnavailable` with what to do.

URL options (`postgresql://user@host/db?schema=app&pool_max=20`): `schema`
(default `tidings`), `pool_min`, `pool_max`, `reconnect_timeout` (seconds),
`durability` (`full`: publishes wait for the WAL flush; `normal`: they do
not), `dedup_window` (seconds), `migrate` (`false`: do not create or upgrade
the schema on open; run `engine.migrate()` yourself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time as _time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from .. import topics as _topics
from ..errors import EngineUnavailable, InvalidArgument
from ..messages import Message, OutMessage, Published, new_id
from .base import Engine, Retention, Settle, SubscriptionInfo, TopicInfo
from .delivery import Pending, SubscriptionSpec, dead_letter_headers, plan_fetch
from .postgres_sql import (
    LOG_MIGRATIONS,
    MSG_COLS,
    Migration,
    Statements,
    channel_for,
    check_schema,
    pattern_regex,
)

__all__ = ["PgTx", "PostgresEngine"]

T = TypeVar("T")

_enc_headers = msgspec.json.Encoder().encode
_dec_headers = msgspec.json.Decoder(dict[str, str]).decode

#: Batches at least this big are stored with COPY instead of one INSERT … unnest.
COPY_MIN = 2000
_OPTIONS = ("schema", "pool_min", "pool_max", "reconnect_timeout", "durability",
            "dedup_window", "migrate")
_MIGRATE_LOCK = 0x7469_6469  # "tidi": the advisory lock key for migrations
_FAR = 2**62


def _lost(exc: BaseException) -> bool:
    """True when `exc` means the connection is gone or the server is (re)starting."""
    import asyncpg

    if isinstance(exc, (OSError, asyncpg.PostgresConnectionError,
                        asyncpg.exceptions.CannotConnectNowError,
                        asyncpg.exceptions.AdminShutdownError,
                        asyncpg.exceptions.CrashShutdownError,
                        asyncpg.exceptions.TooManyConnectionsError,
                        # the protocol lost track after a dropped connection
                        asyncpg.exceptions.InternalClientError)):
        return True
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc) and \
        "pool is clos" not in str(exc)


class _Attempt:
    """How far one try got: after `sent`, a lost connection leaves the outcome unknown."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False


class PgTx:
    """One PostgreSQL transaction, handed to functions run by `PostgresEngine.transact`.

    `conn` is the asyncpg connection (its statements run in this transaction;
    `conn.transaction()` inside makes a savepoint); `append` stores messages
    atomically with them. Tables are in `engine.schema`; `table(name)` gives
    the qualified name.
    """

    def __init__(self, engine: PostgresEngine, conn: Any, now: float, sync: str) -> None:
        self.engine = engine
        self.conn = conn
        self.now = now
        self.sync = sync  # synchronous_commit for this transaction's appends
        self.stored = False
        self._locked = False
        self._new_topics: dict[str, int] = {}

    def table(self, name: str) -> str:
        return f"{self.engine.sql.schema}.{name}"

    async def lock_log(self) -> None:
        """Take the log's commit-order lock now (held until commit; idempotent).

        Positions assigned by this transaction after this call (messages, or
        another component's own global positions) are never filled in late:
        no other appender can commit between this point and our commit.
        """
        if not self._locked:
            await self.conn.execute(self.engine.sql.lock_log)
            self._locked = True

    async def append(self, messages: Sequence[OutMessage]) -> list[Published]:
        """Store messages in this transaction (deduplicating client-supplied ids)."""
        out = await self.engine._store(self, messages)
        self.stored = self.stored or any(not p.duplicate for p in out)
        return out


class PostgresEngine(Engine):
    """The log, subscriptions and (via `transact`) other components on one PostgreSQL schema."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__()
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        unknown = [k for k in options if k not in _OPTIONS and k not in query]
        if unknown:
            raise InvalidArgument(
                f"unknown PostgreSQL engine option {unknown[0]!r}; known: {', '.join(_OPTIONS)}"
            )
        opts = {k: v for k, v in options.items() if k in _OPTIONS}
        self.url = url
        # the DSN asyncpg sees: the URL without tidings' own parameters
        dsn_query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in _OPTIONS])
        self._dsn = urlunsplit(parts._replace(scheme="postgresql", query=dsn_query))
        self._where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}" \
                      f"{parts.path or '/'}"
        try:
            self.schema = check_schema(str(opts.get("schema", "tidings")))
            self.pool_min = int(opts.get("pool_min", 0))
            self.pool_max = int(opts.get("pool_max", 10))
            self.reconnect_timeout = float(opts.get("reconnect_timeout", 10.0))
            self.dedup_window = float(opts.get("dedup_window", 120.0))
        except ValueError as exc:
            raise InvalidArgument(f"bad PostgreSQL engine option: {exc}") from None
        durability = str(opts.get("durability", "full"))
        if durability not in ("full", "normal"):
            raise InvalidArgument(f"durability must be 'full' or 'normal', got {durability!r}")
        self.durability = durability
        self._sync = "on" if durability == "full" else "off"
        self._auto_migrate = str(opts.get("migrate", "true")).lower() not in ("0", "false", "no")
        if not 0 <= self.pool_min <= self.pool_max or self.pool_max < 1:
            raise InvalidArgument("need 0 <= pool_min <= pool_max and pool_max >= 1")
        self.sql = Statements(self.schema)
        self._channel = channel_for(self.schema)
        self._origin = new_id()  # our own NOTIFYs come back to us: skip them
        self._pool: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        #: Set while the LISTEN connection is up (tests wait on it).
        self._listening = asyncio.Event()
        self._closed = False
        self._topic_ids: dict[str, int] = {}
        self._topic_names: dict[int, str] = {}
        self._last_prune = 0.0

    # lifecycle ---------------------------------------------------------------
    async def open(self) -> None:
        try:
            import asyncpg
        except ImportError:
            raise EngineUnavailable(
                "the PostgreSQL engine needs asyncpg; install it with "
                "pip install 'tidings[postgres]'"
            ) from None

        async def no_reset(conn: Any) -> None:
            # Our transactions always end with COMMIT or ROLLBACK; skipping asyncpg's
            # RESET ALL / UNLISTEN on every release saves a round trip per operation.
            return None

        try:
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=self.pool_min, max_size=self.pool_max, reset=no_reset,
                server_settings={"application_name": "tidings"},
            )
        except Exception as exc:
            raise self._translate(exc, "connecting") from None
        try:
            if self._auto_migrate:
                await self.migrate()
            else:
                await self._run(self._check_schema, "checking the schema", patience=0.0)
        except BaseException:
            await self._pool.close()
            raise
        self._listener = asyncio.create_task(self._listen(), name="tidings-pg-listen")
        # Wake-ups from other processes work from the moment open() returns (if the
        # server lets us LISTEN soon; otherwise consumers fall back on their idle poll).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), 5.0)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._listener is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._listener), 12.0)
            except (TimeoutError, Exception):
                self._listener.cancel()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 10.0)
            except (TimeoutError, Exception):
                self._pool.terminate()
        self._notify()

    # migrations ----------------------------------------------------------------
    async def migrate(self) -> int:
        """Create the schema and apply the log's missing migrations; returns how many ran."""
        return await self.apply_migrations("log", LOG_MIGRATIONS)

    async def apply_migrations(self, component: str, migrations: Sequence[Migration]) -> int:
        """Apply `component`'s migrations not yet recorded, in version order, atomically.

        Other components (the event store) call this with their own list;
        `{s}` in their statements is the quoted schema name.
        """
        s = self.sql.schema

        async def op(conn: Any, attempt: _Attempt) -> int:
            async with self._transaction(conn, attempt):
                # one migrator at a time per database (processes may start together)
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {s}.tidings_migrations ("
                    "component text NOT NULL, version int NOT NULL, description text NOT NULL, "
                    "applied_at timestamptz NOT NULL DEFAULT now(), "
                    "PRIMARY KEY (component, version))"
                )
                done = {r[0] for r in await conn.fetch(
                    f"SELECT version FROM {s}.tidings_migrations WHERE component = $1",
                    component)}
                ran = 0
                for m in sorted(migrations, key=lambda m: m.version):
                    if m.version in done:
                        continue
                    for ddl in m.statements:
                        await conn.execute(ddl.replace("{s}", s))
                    await conn.execute(
                        f"INSERT INTO {s}.tidings_migrations (component, version, description) "
                        "VALUES ($1, $2, $3)", component, m.version, m.description)
                    ran += 1
                return ran

        return await self._run(op, "migrating the schema", patience=0.0)

    async def _check_schema(self, conn: Any, attempt: _Attempt) -> None:
        found = await conn.fetchval(
            "SELECT to_regclass($1)", f"{self.sql.schema}.tidings_messages")
        if found is None:
            raise EngineUnavailable(
                f"schema {self.schema!r} on {self._where} has no tidings tables; run "
                "`tidings migrate` (or connect once without migrate=false)"
            )

    # running operations ----------------------------------------------------------
    async def _run(self, op: Callable[[Any, _Attempt], Awaitable[T]], what: str, *,
                   retry: bool = True, patience: float | None = None) -> T:
        """Run `op(conn, attempt)` on a pooled connection, riding out lost connections.

        A lost connection is retried for `reconnect_timeout` seconds (or
        `patience`) when nothing was sent yet, or always when `retry` (the
        operation is safe to repeat); otherwise it becomes `EngineUnavailable`.
        """
        deadline: float | None = None
        delay = 0.02
        while True:
            if self._closed or self._pool is None:
                raise EngineUnavailable(
                    f"the PostgreSQL engine for {self._where} is closed; open a new hub "
                    "with tidings.connect()")
            attempt = _Attempt()
            try:
                async with self._pool.acquire() as conn:
                    return await op(conn, attempt)
            except Exception as exc:
                if isinstance(exc, EngineUnavailable) or not _is_driver_error(exc):
                    raise
                if not _lost(exc):
                    raise self._translate(exc, what) from None
                if attempt.sent and not retry:
                    raise EngineUnavailable(
                        f"lost the connection to PostgreSQL at {self._where} while {what}; "
                        "it may or may not have been stored (publish with an id= to retry "
                        "safely)") from None
                now = _time.monotonic()
                if deadline is None:
                    deadline = now + (self.reconnect_timeout if patience is None else patience)
                if now >= deadline or self._closed:
                    raise self._translate(exc, what) from None
                await asyncio.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, 0.5)

    @contextlib.asynccontextmanager
    async def _transaction(self, conn: Any, attempt: _Attempt,
                           begin: str = "BEGIN") -> AsyncIterator[None]:
        await conn.execute(begin)
        try:
            yield
        except BaseException:
            try:
                await asyncio.shield(conn.execute("ROLLBACK"))
            except BaseException:
                conn.terminate()  # state unknown: never hand it back to the pool
            raise
        attempt.sent = True
        await conn.execute("COMMIT")

    def _translate(self, exc: BaseException, what: str) -> EngineUnavailable:
        import asyncpg

        where = self._where
        if isinstance(exc, asyncpg.exceptions.InvalidCatalogNameError):
            hint = "the database does not exist; create it (createdb) or fix the URL"
        elif isinstance(exc, (asyncpg.exceptions.InvalidPasswordError,
                              asyncpg.exceptions.InvalidAuthorizationSpecificationError)):
            hint = "authentication failed; check the user and password in the URL"
        elif isinstance(exc, asyncpg.exceptions.InsufficientPrivilegeError):
            hint = (f"permission denied; the user needs CREATE on the database and USAGE "
                    f"on schema {self.schema!r}")
        elif isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
            hint = "the server is read-only (a standby?); point the URL at the primary"
        elif isinstance(exc, asyncpg.exceptions.TooManyConnectionsError):
            hint = "the server has too many connections; lower pool_max or raise max_connections"
        elif _lost(exc):
            hint = (f"cannot reach the server ({type(exc).__name__}: {exc}); check that "
                    "PostgreSQL is running and the URL's host and port are right")
        else:
            hint = f"{type(exc).__name__}: {exc}"
        return EngineUnavailable(f"PostgreSQL at {where}: {what} failed: {hint}")

    async def transact(self, fn: Callable[[PgTx], Awaitable[T]], *, durable: bool = True) -> T:
        """Run the async `fn(tx)` in one transaction; all its writes commit together or not at all.

        Returns after the commit. An exception from `fn` rolls back and is
        re-raised. A lost connection before `fn` starts is retried; during it
        (or the commit), `EngineUnavailable` says the outcome is unknown.
        """

        async def op(conn: Any, attempt: _Attempt) -> T:
            tx = PgTx(self, conn, round(_time.time(), 6),
                      self._sync if durable else "off")
            async with conn.transaction():
                attempt.sent = True
                result = await fn(tx)
            self._committed(tx)
            return result

        return await self._run(op, "running a transaction", retry=False)

    def _committed(self, tx: PgTx) -> None:
        if tx._new_topics:
            self._remember_topics(tx._new_topics)
        if tx.stored:
            self._notify()

    # topics ------------------------------------------------------------------------
    def _remember_topics(self, ids: dict[str, int]) -> None:
        for name, tid in ids.items():
            self._topic_ids[name] = tid
            self._topic_names[tid] = name

    async def _resolve_topics(self, conn: Any, names: set[str], tx: PgTx | None
                              ) -> dict[str, int]:
        """Topic ids by name, creating missing topics (in `tx` when given, else at once)."""
        known = self._topic_ids if tx is None else {**self._topic_ids, **tx._new_topics}
        missing = [n for n in names if n not in known]
        for _ in range(5):
            if not missing:
                break
            got = {r[1]: r[0] for r in await conn.fetch(self.sql.create_topics, missing)}
            if tx is None:
                self._remember_topics(got)
            else:
                tx._new_topics.update(got)
            known = {**known, **got}
            # a topic created concurrently is not in this statement's snapshot: look again
            missing = [n for n in missing if n not in got]
        if missing:
            raise EngineUnavailable(f"could not create topics {missing} on {self._where}")
        return known

    async def _names(self, conn: Any, ids: set[int]) -> dict[int, str]:
        missing = [i for i in ids if i not in self._topic_names]
        if missing:
            for tid, name in await conn.fetch(self.sql.topic_names, missing):
                self._remember_topics({name: tid})
        return self._topic_names

    async def _messages(self, conn: Any, rows: Sequence[Any],
                        attempts: dict[int, int] | None = None) -> list[Message]:
        names = await self._names(conn, {r[1] for r in rows})
        out = []
        for position, topic_id, id, key, ts, headers, data in rows:
            out.append(Message(
                id, names[topic_id], key, data, _dec_headers(headers) if headers else {}, ts,
                position, attempts.get(position, 0) if attempts else 0,
            ))
        return out

    # the log -----------------------------------------------------------------
    async def append(self, messages: Sequence[OutMessage]) -> list[Published]:
        if not messages:
            return []
        single = len(messages) < COPY_MIN and not any(m.client_id for m in messages)

        async def op(conn: Any, attempt: _Attempt) -> list[Published]:
            now = round(_time.time(), 6)
            await self._resolve_topics(conn, {m.topic for m in messages}, None)
            tx = PgTx(self, conn, now, self._sync)
            if single:  # one statement is one transaction: one round trip, one commit
                attempt.sent = True
                out = await self._store(tx, messages)
            else:
                async with self._transaction(conn, attempt):
                    out = await self._store(tx, messages)
            self._notify()
            return out

        return await self._run(op, "publishing", retry=False)

    async def _store(self, tx: PgTx, messages: Sequence[OutMessage]) -> list[Published]:
        """Append in `tx`: dedup client ids under the log lock, reserve positions, insert."""
        conn, sql = tx.conn, self.sql
        out: list[Published | None] = []
        todo: list[OutMessage] = []
        seen: dict[str, int] = {}
        client = [m.id for m in messages if m.client_id]
        known: dict[str, int] = {}
        if client:
            await tx.lock_log()  # before looking, so a concurrent publish of the same id waits
            horizon = tx.now - self.dedup_window
            known = {r[0]: r[1] for r in await conn.fetch(sql.known_ids, client)
                     if r[2] >= horizon}
        for m in messages:
            if m.client_id:
                first = seen.get(m.id, known.get(m.id))
                if first is not None:
                    out.append(Published(first, m.id, True))
                    continue
                seen[m.id] = -1
            todo.append(m)
            out.append(None)
        if not todo:
            return [p for p in out if p is not None]
        tids = await self._resolve_topics(conn, {m.topic for m in todo}, tx)
        topic_ids = [tids[m.topic] for m in todo]
        heads: list[bytes | None] = []
        last_h: object = None
        last_enc: bytes | None = None
        for m in todo:
            if m.headers is not last_h:  # batches share one headers dict: encode it once
                last_h, last_enc = m.headers, (_enc_headers(m.headers) if m.headers else None)
            heads.append(last_enc)
        ids = [m.id for m in todo]
        n = len(todo)
        if n >= COPY_MIN:
            base, stamp, _ = await conn.fetchrow(sql.reserve, n, tx.now, self._channel,
                                                 self._origin)
            await conn.copy_records_to_table(
                sql.messages_table, schema_name=self.schema, columns=MSG_COLS.split(", "),
                records=[(base + i, topic_ids[i - 1], ids[i - 1], todo[i - 1].key, stamp,
                          heads[i - 1], todo[i - 1].data) for i in range(1, n + 1)],
            )
            if client:
                rows = [(m.id, base + i, stamp) for i, m in enumerate(todo, 1) if m.client_id]
                await conn.execute(sql.remember_ids, *map(list, zip(*rows, strict=True)))
        else:
            args = [n, tx.now, topic_ids, ids, [m.key for m in todo], heads,
                    [m.data for m in todo], self._channel, self._origin, tx.sync]
            if client:
                base, stamp, _ = await conn.fetchrow(
                    sql.append_ids, *args, [m.client_id for m in todo])
            else:
                base, stamp, _ = await conn.fetchrow(sql.append, *args)
        if tx.now - self._last_prune > 10.0:
            self._last_prune = tx.now
            await conn.execute(sql.prune_ids, tx.now - self.dedup_window)
        pos = base
        result: list[Published] = []
        for p, m in zip(out, _fill(todo, out), strict=True):
            if p is not None:
                result.append(p)
                continue
            pos += 1
            if m.client_id:
                seen[m.id] = pos
            result.append(Published(pos, m.id, False))
        # duplicates inside this very batch point at the first copy
        return [Published(seen[p.id], p.id, True) if p.duplicate and p.position == -1 else p
                for p in result]

    async def read(self, pattern: str, after: int, stop: int | None, limit: int) -> list[Message]:
        regex = pattern_regex(pattern)

        async def op(conn: Any, attempt: _Attempt) -> list[Message]:
            rows = await conn.fetch(self.sql.read, after, _FAR if stop is None else stop,
                                    limit, regex)
            return await self._messages(conn, rows)

        return await self._run(op, "reading")

    async def last_position(self) -> int:
        async def op(conn: Any, attempt: _Attempt) -> int:
            return int(await conn.fetchval(self.sql.last_position) or 0)

        return await self._run(op, "reading the last position")

    async def position_before(self, timestamp: float) -> int:
        async def op(conn: Any, attempt: _Attempt) -> int:
            # time never decreases with position: binary-search the primary key
            lo, hi = await conn.fetchrow(self.sql.bounds)
            if lo is None:
                return 0
            best = 0
            while lo <= hi:
                mid = (lo + hi) // 2
                r = await conn.fetchrow(self.sql.first_at_or_after, mid)
                if r is None or r[1] >= timestamp:
                    hi = mid - 1
                else:
                    best = max(best, int(r[0]))
                    lo = int(r[0]) + 1
            return best

        return await self._run(op, "finding a position by time")

    # subscriptions -------------------------------------------------------------
    async def subscribe(self, spec: SubscriptionSpec, start_after: int | None) -> Any:
        text = json.dumps(asdict(spec))

        async def op(conn: Any, attempt: _Attempt) -> int:
            return int(await conn.fetchval(self.sql.subscribe, spec.group, spec.pattern, text,
                                           start_after or 0))

        return (await self._run(op, "subscribing"), spec)

    async def fetch(
        self, handle: Any, limit: int, now: float, settles: Sequence[Settle] = ()
    ) -> tuple[list[Message], float | None]:
        sub_id, spec = handle
        regex = pattern_regex(spec.pattern)
        sql = self.sql

        async def op(conn: Any, attempt: _Attempt) -> tuple[list[Message], float | None]:
            tx = PgTx(self, conn, now, "off")
            async with self._transaction(conn, attempt, sql.begin_claim.format(sub_id=sub_id)):
                if settles:
                    await self._settle_in(tx, sub_id, spec, settles)
                rows = await conn.fetch(sql.claim_snapshot, sub_id, regex, limit,
                                        spec.max_in_flight, spec.max_deliver, now)
                cursor = last = None
                pending: list[Pending] = []
                found: list[Any] = []
                for r in rows:
                    kind = r[0]
                    if kind == 0:
                        cursor = r[1]
                    elif kind == 1:
                        last = r[1]
                    elif kind == 2:
                        pending.append(Pending(r[1], r[2], r[3], r[4]))
                    else:
                        found.append(r)
                if cursor is None:  # the subscription was deleted
                    return [], None
                pending.sort(key=lambda p: p.position)
                found.sort(key=lambda r: r[1])
                live = sum(1 for p in pending
                           if p.attempt < spec.max_deliver or p.due > now)
                want = max(0, min(limit, spec.max_in_flight - live))
                cands = [(r[1], r[2]) for r in found]
                plan = plan_fetch(spec, pending, cands, cursor=cursor, now=now, limit=limit)
                if want and len(found) < want and len(plan.added) == len(found):
                    plan.cursor = max(plan.cursor, last or 0)  # nothing else matches up to last
                if plan.dead:
                    await self._dead_letter(tx, sub_id, spec, {p.position: p.attempt
                                                               for p in plan.dead}, "max_deliver")
                by_pos = {r[1]: tuple(r[i] for i in (1, 5, 6, 2, 7, 8, 9)) for r in found}
                added = {p.position for p in plan.added}
                again = [p for p in plan.deliver if p.position not in added]
                if plan.added or again or plan.cursor != cursor:
                    more = await conn.fetch(
                        sql.claim_write, sub_id,
                        [p.position for p in plan.added], [p.key for p in plan.added],
                        [p.attempt for p in plan.added], [p.due for p in plan.added],
                        [p.position for p in again], [p.attempt for p in again],
                        [p.due for p in again], plan.cursor,
                        [p.position for p in again if p.position not in by_pos])
                    for r in more:
                        by_pos[r[0]] = tuple(r)
            self._committed(tx)
            if settles:
                self._notify()  # room or a parked key may be free for this process's waiters
            attempts = {p.position: p.attempt for p in plan.deliver}
            out = [by_pos[p.position] for p in plan.deliver if p.position in by_pos]
            return await self._messages(conn, out, attempts), plan.next_due

        return await self._run(op, "fetching messages")

    async def _settle_in(self, tx: PgTx, sub_id: int, spec: SubscriptionSpec,
                         items: Sequence[Settle]) -> None:
        conn, sql, now = tx.conn, self.sql, tx.now
        acks = [s.position for s in items if s.kind == "ack"]
        releases = [s.position for s in items if s.kind == "release"]
        others = [s for s in items if s.kind in ("nack", "term")]
        await conn.execute(sql.settle_simple, sub_id, acks, releases, now, self._channel,
                           self._origin)
        if not others:
            return
        attempts = dict(await conn.fetch(sql.pending_rows, sub_id,
                                         [s.position for s in others]))
        later: dict[int, float] = {}
        dead: dict[int, int] = {}
        terms: dict[int, int] = {}
        for s in others:
            a = attempts.get(s.position)
            if not a:
                continue  # already settled, dead-lettered, or reclaimed and parked
            if s.kind == "term":
                terms[s.position] = a
            elif a >= spec.max_deliver:
                dead[s.position] = a
            else:
                later[s.position] = now + s.delay
        if later:
            await conn.execute(sql.set_due, sub_id, list(later), list(later.values()))
        if terms:
            await self._dead_letter(tx, sub_id, spec, terms, "terminated")
        if dead:
            await self._dead_letter(tx, sub_id, spec, dead, "max_deliver")

    async def _dead_letter(self, tx: PgTx, sub_id: int, spec: SubscriptionSpec,
                           attempts: dict[int, int], reason: str) -> None:
        """Remove pending rows and append their messages to the dead-letter topic, atomically."""
        rows = await tx.conn.fetch(self.sql.remove_pending, sub_id, list(attempts))
        if spec.dead_letter is None or not rows:
            return
        out = []
        for m in await self._messages(tx.conn, rows):
            h = dead_letter_headers(
                dict(m.headers), topic=m.topic, id=m.id, position=m.position,
                group=spec.group, reason=reason, attempts=attempts[m.position])
            out.append(OutMessage(new_id(), spec.dead_letter, m.key, m.data, h))
        await tx.append(out)

    async def settle(self, handle: Any, items: Sequence[Settle], now: float) -> None:
        sub_id, spec = handle

        async def op(conn: Any, attempt: _Attempt) -> None:
            tx = PgTx(self, conn, now, "off")
            async with self._transaction(conn, attempt,
                                         self.sql.begin_claim.format(sub_id=sub_id)):
                await self._settle_in(tx, sub_id, spec, items)
            self._committed(tx)
            self._notify()

        await self._run(op, "settling messages")

    async def delete_subscription(self, group: str, pattern: str) -> bool:
        async def op(conn: Any, attempt: _Attempt) -> bool:
            async with self._transaction(conn, attempt):
                sub_id = await conn.fetchval(self.sql.find_subscription, group, pattern)
                if sub_id is None:
                    return False
                await conn.execute(self.sql.delete_pending, sub_id)
                await conn.execute(self.sql.delete_subscription, sub_id)
                return True

        return await self._run(op, "deleting a subscription")

    # retention -----------------------------------------------------------------
    async def set_retention(self, topic: str, retention: Retention) -> None:
        text = json.dumps(asdict(retention))

        async def op(conn: Any, attempt: _Attempt) -> None:
            await conn.execute(self.sql.set_retention, topic, text)

        await self._run(op, "setting retention")

    async def trim(self, now: float) -> int:
        sql = self.sql

        async def op(conn: Any, attempt: _Attempt) -> int:
            removed = 0
            async with self._transaction(conn, attempt):
                topics = await conn.fetch(sql.retained_topics)
                if not topics:
                    return 0
                subs = await conn.fetch(sql.sub_floors)
                for tid, name, text in topics:
                    r = Retention(**json.loads(text))
                    cut = 0
                    if r.max_messages is not None:
                        cut = max(cut, await conn.fetchval(sql.cut_count, tid,
                                                           r.max_messages) or 0)
                    if r.max_age is not None:
                        cut = max(cut, await conn.fetchval(sql.cut_age, tid,
                                                           now - r.max_age) or 0)
                    if r.max_bytes is not None:
                        cut = max(cut, await conn.fetchval(sql.cut_bytes, tid,
                                                           r.max_bytes) or 0)
                    floor = _FAR
                    for pattern, cursor, low in subs:
                        if _topics.matches(pattern, name):
                            mark = cursor + 1 if low is None else min(low, cursor + 1)
                            floor = min(floor, mark)
                    cut = min(cut, floor - 1)
                    if cut > 0:
                        status = await conn.execute(sql.trim, tid, cut)
                        removed += int(status.split()[-1])
            return removed

        return await self._run(op, "trimming")

    # introspection -------------------------------------------------------------
    async def topics(self) -> list[TopicInfo]:
        async def op(conn: Any, attempt: _Attempt) -> list[TopicInfo]:
            return [TopicInfo(*r) for r in await conn.fetch(self.sql.topic_stats)]

        return await self._run(op, "listing topics")

    async def subscriptions(self) -> list[SubscriptionInfo]:
        now = _time.time()

        async def op(conn: Any, attempt: _Attempt) -> list[SubscriptionInfo]:
            out = []
            for sub_id, grp, pattern, spec, cursor in await conn.fetch(
                    self.sql.subscription_rows):
                s = json.loads(spec)
                pending, in_flight = await conn.fetchrow(self.sql.subscription_counts,
                                                         sub_id, now)
                behind = await conn.fetchval(self.sql.behind, cursor, pattern_regex(pattern))
                out.append(SubscriptionInfo(grp, pattern, cursor, pending, in_flight,
                                            behind + pending, bool(s["ordered"]),
                                            int(s["max_in_flight"])))
            return out

        return await self._run(op, "listing subscriptions")

    # wake-ups across processes -------------------------------------------------------
    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload != self._origin:
            self._notify()

    async def _listen(self) -> None:
        """Keep one connection LISTENing; reconnect (and wake everyone) when it drops."""
        import asyncpg

        stopping = self._stopping
        delay = 0.05
        while not stopping.is_set():
            try:
                # never cancelled mid-handshake (that leaks the socket): close() sets
                # `stopping` and waits for us instead
                conn = await asyncpg.connect(self._dsn, timeout=10)
            except (Exception, TimeoutError):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                delay = min(delay * 2, 1.0)
                continue
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c: lost.set())
            try:
                await conn.add_listener(self._channel, self._on_notification)
                self._listening.set()
                delay = 0.05
                self._notify()  # notifications sent while we were away are lost: look again
                waits = [asyncio.ensure_future(lost.wait()),
                         asyncio.ensure_future(stopping.wait())]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
            except Exception:
                pass  # lost while subscribing: start over
            finally:
                self._listening.clear()
                if not conn.is_closed():
                    try:
                        await asyncio.wait_for(conn.close(), 2.0)
                    except (Exception, TimeoutError):
                        conn.terminate()


def _fill(todo: Sequence[OutMessage], out: Sequence[Published | None]) -> list[OutMessage | None]:
    """`todo` spread over the `None` slots of `out` (the messages actually stored)."""
    it = iter(todo)
    return [next(it) if p is None else None for p in out]


def _is_driver_error(exc: BaseException) -> bool:
    import asyncpg

    return isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                            asyncpg.exceptions.InternalClientError))

