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
the schema, the event store's tables included; run `tidings migrate` or
`engine.migrate()` yourself).
"""

from __future__ import annotations

import json
import time as _time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from ..errors import EngineUnavailable, InvalidArgument
from ..messages import Message, OutMessage, Published, new_id
from .base import (
    HOLDING_MESSAGE,
    HOLDING_WRITER,
    Engine,
    Retention,
    Settle,
    SubscriptionInfo,
    TopicInfo,
)
from .delivery import (
    MAX_DELIVER,
    Dead,
    Pending,
    SubscriptionSpec,
    dead_letter,
    plan_fetch,
    plan_settle,
    split_settles,
)
from .postgres_conn import Attempt, Batched, Connections
from .postgres_sql import (
    LOG_MIGRATIONS,
    MSG_COLS,
    Migration,
    Statements,
    channel_for,
    check_schema,
    pattern_regex,
)
from .postgres_sql import (
    apply_migrations as _apply_migrations,
)
from .retention import LimitCuts, plan_trim, subscription_floor, trim_floor
from .store_base import StoreBackend

__all__ = ["PgTx", "PostgresEngine"]

T = TypeVar("T")

_enc_headers = msgspec.json.Encoder().encode
_dec_headers = msgspec.json.Decoder(dict[str, str]).decode

#: Batches at least this big are stored with COPY instead of one INSERT … unnest.
COPY_MIN = 500
_OPTIONS = ("schema", "pool_min", "pool_max", "reconnect_timeout", "durability",
            "dedup_window", "migrate")
_FAR = 2**62


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
        self.topics: set[str] = set()  # what it stored messages on (whom to wake)
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
        self.topics.update(m.topic for m in messages)
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
        dsn = urlunsplit(parts._replace(scheme="postgresql", query=dsn_query))
        self._where = where = (f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
                               f"{parts.path or '/'}")
        try:
            self.schema = check_schema(str(opts.get("schema", "tidings")))
            pool_min = int(opts.get("pool_min", 0))
            pool_max = int(opts.get("pool_max", 10))
            reconnect_timeout = float(opts.get("reconnect_timeout", 10.0))
            self.dedup_window = float(opts.get("dedup_window", 120.0))
        except ValueError as exc:
            raise InvalidArgument(f"bad PostgreSQL engine option: {exc}") from None
        durability = str(opts.get("durability", "full"))
        if durability not in ("full", "normal"):
            raise InvalidArgument(f"durability must be 'full' or 'normal', got {durability!r}")
        self.durability = durability
        self._sync = "on" if durability == "full" else "off"
        self._auto_migrate = str(opts.get("migrate", "true")).lower() not in ("0", "false", "no")
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise InvalidArgument("need 0 <= pool_min <= pool_max and pool_max >= 1")
        self.sql = Statements(self.schema)
        self._channel = channel_for(self.schema)
        self._origin = new_id()  # our own NOTIFYs come back to us: skip them
        self.conns = Connections(dsn, where, schema=self.schema, pool_min=pool_min,
                                 pool_max=pool_max, reconnect_timeout=reconnect_timeout)
        self._run = self.conns.run
        self._transaction = self.conns.transaction
        # fetches asked for while one is under way share the next statement
        self._fetches = Batched(self.conns, "fetching messages", self._run_fetches, limit=50)
        self._reads = Batched(self.conns, "reading", self._run_reads, limit=50)
        self._settles = Batched(self.conns, "settling messages", _run_settles, limit=50)
        self._topic_ids: dict[str, int] = {}
        self._topic_names: dict[int, str] = {}
        self._last_prune = 0.0

    # lifecycle ---------------------------------------------------------------
    async def open(self) -> None:
        await self.conns.open()
        try:
            if self._auto_migrate:
                self.migrations_applied = await self.migrate()
            else:
                await self._run(self._check_schema, "checking the schema", patience=0.0)
        except BaseException:
            await self.conns.close()
            raise
        # Wake-ups from other processes work from the moment open() returns (if the server
        # lets us LISTEN soon; otherwise consumers fall back on their idle poll).
        await self.conns.listen(self._channel, self._on_notification, self._notify)

    async def close(self) -> None:
        if self.conns.closed:
            return
        await self.conns.close()
        self._notify()

    def event_store(self) -> StoreBackend:
        from .postgres_store import PostgresStore  # (it imports this module)

        return PostgresStore(self)

    # migrations ----------------------------------------------------------------
    async def migrate(self) -> int:
        """Create the schema and apply the missing migrations of the log and of the event
        store; returns how many ran."""
        from .postgres_store import EVENTSTORE_MIGRATIONS  # (it imports this module)

        ran = await self.apply_migrations("log", LOG_MIGRATIONS)
        return ran + await self.apply_migrations("eventstore", EVENTSTORE_MIGRATIONS)

    async def apply_migrations(self, component: str, migrations: Sequence[Migration]) -> int:
        """Apply `component`'s migrations not yet recorded, in version order, atomically.

        Other components (the event store) call this with their own list;
        `{s}` in their statements is the quoted schema name.
        """

        async def op(conn: Any, attempt: Attempt) -> int:
            async with self._transaction(conn, attempt):
                return await _apply_migrations(conn, self.sql.schema, component, migrations)

        return await self._run(op, "migrating the schema", patience=0.0)

    async def _check_schema(self, conn: Any, attempt: Attempt) -> None:
        found = await conn.fetchval(
            "SELECT to_regclass($1)", f"{self.sql.schema}.tidings_messages")
        if found is None:
            raise EngineUnavailable(
                f"schema {self.schema!r} on {self._where} has no tidings tables; run "
                "`tidings migrate` (or connect once without migrate=false)"
            )

    async def transact(self, fn: Callable[[PgTx], Awaitable[T]], *, durable: bool = True) -> T:
        """Run the async `fn(tx)` in one transaction; all its writes commit together or not at all.

        Returns after the commit. An exception from `fn` rolls back and is
        re-raised. A lost connection before `fn` starts is retried; during it
        (or the commit), `EngineUnavailable` says the outcome is unknown.
        """

        if HOLDING_WRITER.get():
            raise InvalidArgument(HOLDING_MESSAGE)

        async def op(conn: Any, attempt: Attempt) -> T:
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
            self._notify(tx.topics)

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
        if HOLDING_WRITER.get():
            raise InvalidArgument(HOLDING_MESSAGE)
        if not messages:
            return []
        single = len(messages) < COPY_MIN and not any(m.client_id for m in messages)

        async def op(conn: Any, attempt: Attempt) -> list[Published]:
            now = round(_time.time(), 6)
            await self._resolve_topics(conn, {m.topic for m in messages}, None)
            tx = PgTx(self, conn, now, self._sync)
            tx.topics.update(m.topic for m in messages)
            if single:  # one statement is one transaction: one round trip, one commit
                attempt.sent = True
                out = await self._store(tx, messages)
            else:
                async with self._transaction(conn, attempt):
                    out = await self._store(tx, messages)
            self._notify(tx.topics)
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
                                                 self.payload({m.topic for m in todo}), tx.sync)
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
                    [m.data for m in todo], self._channel,
                    self.payload({m.topic for m in todo}), tx.sync]
            if client:
                base, stamp, _ = await conn.fetchrow(
                    sql.append_ids, *args, [m.client_id for m in todo])
            else:
                base, stamp, _ = await conn.fetchrow(sql.append, *args)
        if tx.now - self._last_prune > 10.0:
            self._last_prune = tx.now
            await conn.execute(sql.prune_ids, tx.now - self.dedup_window)
        pos = base
        stored = iter(todo)
        result: list[Published] = []
        for p in out:
            if p is None:  # the next stored message
                m = next(stored)
                pos += 1
                if m.client_id:
                    seen[m.id] = pos
                p = Published(pos, m.id, False)
            result.append(p)
        # duplicates inside this very batch point at the first copy
        return [Published(seen[p.id], p.id, True) if p.duplicate and p.position == -1 else p
                for p in result]

    async def read(self, pattern: str, after: int, stop: int | None, limit: int) -> list[Message]:
        """Shares a statement with the reads asked for meanwhile (followers of the log,
        such as the saga coordinator's, read after each commit that concerns them)."""
        got: list[Message] = await self._reads(pattern_regex(pattern), after,
                                               _FAR if stop is None else stop, limit)
        return got

    async def _run_reads(self, conn: Any, attempt: Attempt, calls: list[tuple[Any, ...]]
                         ) -> list[Any]:
        if len(calls) == 1:
            regex, after, stop, limit = calls[0]
            return [await self._messages(conn, await conn.fetch(self.sql.read, after, stop,
                                                                limit, regex))]
        parts: list[list[Any]] = [[] for _ in calls]
        regexes, afters, stops, limits = (list(c) for c in zip(*calls, strict=True))
        for r in await conn.fetch(self.sql.read_many, regexes, afters, stops, limits):
            parts[r[0] - 1].append(tuple(r)[1:])
        return [await self._messages(conn, rows) for rows in parts]

    async def last_position(self) -> int:
        async def op(conn: Any, attempt: Attempt) -> int:
            return int(await conn.fetchval(self.sql.last_position) or 0)

        return await self._run(op, "reading the last position")

    async def position_before(self, timestamp: float) -> int:
        async def op(conn: Any, attempt: Attempt) -> int:
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

        async def op(conn: Any, attempt: Attempt) -> int:
            return int(await conn.fetchval(self.sql.subscribe, spec.group, spec.pattern, text,
                                           start_after or 0))

        return (await self._run(op, "subscribing"), spec)

    async def fetch(
        self, handle: Any, limit: int, now: float, settles: Sequence[Settle] = ()
    ) -> tuple[list[Message], float | None]:
        sub_id, spec = handle
        regex = pattern_regex(spec.pattern)
        sql = self.sql
        # Acks and releases are conditional writes (see `split_settles`: with the plan of the
        # nacks and terms, the same as `plan_settle` over all of them), committed first, in
        # the same round trip as the BEGIN; nacks and terms are planned under the lock.
        acks, releases, others = split_settles(settles)
        if not others:
            got = await self._fetch_in_one(sub_id, spec, regex, limit, now, acks, releases)
            if got is not None:
                return got
            # a row is due for its dead letter: this fetch is planned here
        wake = (self._channel, self.payload((), spec.pattern))
        begin = sql.begin_claim(sub_id, lock=bool(others), notify=wake if others else None)
        if acks or releases:
            begin = (sql.settle_simple(sub_id, acks, releases, now, wake, spec.max_in_flight,
                                       spec.ordered) + "; " + begin)

        async def op(conn: Any, attempt: Attempt) -> tuple[list[Message], float | None]:
            tx = PgTx(self, conn, now, "off")
            async with self._transaction(conn, attempt, begin) as ending:
                if others:  # under the lock (taken with the BEGIN): pending rows, then log
                    await self._settle_others(tx, sub_id, spec, others)
                # The lock is held from here to the COMMIT: one round trip plus plan_fetch.
                rows = await conn.fetch(sql.claim, sub_id, regex, limit, spec.max_in_flight,
                                        spec.max_deliver, now, spec.ordered)
                cursor = last = None
                want = floor = 0
                pending: list[Pending] = []
                found: dict[int, tuple[Any, ...]] = {}  # candidates as message rows
                for r in rows:
                    kind = r[0]
                    if kind == 3:
                        found[r[1]] = (r[1], r[5], r[6], r[2], r[7], r[8], r[9])
                    elif kind == 2:
                        pending.append(Pending(r[1], r[2], r[3], r[4]))
                    elif kind == 0:
                        cursor = r[1]
                    elif kind == 1:
                        last, want = r[1], r[3]
                    else:
                        floor = r[1]
                if cursor is None:  # the subscription was deleted
                    return [], None
                pending.sort(key=lambda p: p.position)
                cands = sorted((pos, row[3]) for pos, row in found.items())
                plan = plan_fetch(spec, pending, cands, cursor=cursor, now=now, limit=limit)
                if want and len(found) < want and len(plan.added) == len(found):
                    plan.cursor = max(plan.cursor, last or 0)  # nothing else matches up to last
                if plan.dead:
                    await self._dead_letter(tx, sub_id, spec,
                                            [Dead(p, MAX_DELIVER) for p in plan.dead])
                added = {p.position for p in plan.added}
                again = [p for p in plan.deliver if p.position not in added]
                need = [p.position for p in again if p.position not in found]
                if need:  # redeliveries of messages below the cursor
                    for r in await conn.fetch(sql.by_position, need):
                        found[r[0]] = tuple(r)
                dead = {p.position for p in plan.dead}
                lowest = min((p.position for p in pending if p.position not in dead),
                             default=None)
                if plan.added and (lowest is None or plan.added[0].position < lowest):
                    lowest = plan.added[0].position
                low = subscription_floor(plan.cursor, lowest)  # the new `floor` column
                if plan.added or again or plan.cursor != cursor or low != floor:
                    await ending.commit_with(sql.claim_commit(
                        sub_id, plan.added, again,
                        plan.cursor if plan.cursor != cursor else None,
                        low if low != floor else None))
            self._committed(tx)
            if settles:  # room or a parked key may be free for this process's waiters
                self._notify(tx.topics, (spec.pattern,))
            attempts = {p.position: p.attempt for p in plan.deliver}
            out = [found[p.position] for p in plan.deliver if p.position in found]
            return await self._messages(conn, out, attempts), plan.next_due

        return await self._run(op, "fetching messages")

    async def _fetch_in_one(self, sub_id: int, spec: SubscriptionSpec, regex: str, limit: int,
                            now: float, acks: list[int], releases: list[int]
                            ) -> tuple[list[Message], float | None] | None:
        """A fetch in one statement (`tidings_fetch`, the same plan as `plan_fetch`), shared
        with the other consumers' fetches asked for meanwhile; None when a row is due for
        its dead letter (nothing was done: the caller plans the fetch itself)."""
        got: tuple[list[Message], float | None] | None = await self._fetches(
            sub_id, regex, limit, spec.max_in_flight, spec.max_deliver, now, spec.ack_wait,
            list(spec.backoff), spec.ordered, acks, releases, self.payload((), spec.pattern))
        if got is not None and (acks or releases):  # room may be free for waiters here
            self._notify((), (spec.pattern,))
        return got

    async def _run_fetches(self, conn: Any, attempt: Attempt, calls: list[tuple[Any, ...]]
                           ) -> list[Any]:
        """Several consumers' fetches in one statement, each its own `tidings_fetch` call,
        in the order of their subscriptions (so that statements locking several take the
        locks in one order everywhere: no deadlock)."""
        if len(calls) == 1:
            c = calls[0]
            parts = [await conn.fetch(self.sql.fetch, *c[:11], self._channel, c[11])]
        else:
            order = sorted(range(len(calls)), key=lambda i: calls[i][0])
            cols: list[list[Any]] = [[] for _ in range(15)]
            flat_backoff: list[float] = []
            flat_acks: list[int] = []
            flat_releases: list[int] = []
            for i in order:
                sub, regex, lim, mif, md, now, aw, backoff, ordered, acks, releases, pay = calls[i]
                for col, v in zip(cols, (
                        sub, regex, lim, mif, md, now, aw,
                        len(flat_backoff) + 1, len(flat_backoff) + len(backoff), ordered,
                        len(flat_acks) + 1, len(flat_acks) + len(acks),
                        len(flat_releases) + 1, len(flat_releases) + len(releases), pay),
                        strict=True):
                    col.append(v)
                flat_backoff += backoff
                flat_acks += acks
                flat_releases += releases
            by_k: list[list[Any]] = [[] for _ in calls]
            for r in await conn.fetch(self.sql.fetch_many, *cols, flat_backoff, flat_acks,
                                      flat_releases, self._channel):
                by_k[r[0] - 1].append(tuple(r)[1:])
            parts = [[] for _ in calls]
            for k, i in enumerate(order):
                parts[i] = by_k[k]
        out: list[Any] = []
        for rows in parts:
            if not rows:
                out.append(([], None))  # the subscription was deleted
            elif rows[-1][0] == 8:
                out.append(None)
            else:
                attempts = {r[1]: r[2] for r in rows[:-1]}
                found = [(r[1], r[4], r[5], r[6], r[7], r[8], r[9]) for r in rows[:-1]]
                out.append((await self._messages(conn, found, attempts), rows[-1][3]))
        return out

    async def _settle_others(self, tx: PgTx, sub_id: int, spec: SubscriptionSpec,
                             items: Sequence[Settle]) -> None:
        """Nacks and terms, planned on their rows (acks and releases went with the BEGIN)."""
        conn, sql = tx.conn, self.sql
        rows = {position: Pending(position, None, attempt, 0.0) for position, attempt in
                await conn.fetch(sql.pending_rows, sub_id, [s.position for s in items])}
        plan = plan_settle(spec, rows, items, tx.now)
        if plan.update:  # nacks: only their due changes
            await conn.execute(sql.set_due, sub_id, [p.position for p in plan.update],
                               [p.due for p in plan.update])
        if plan.dead:
            await self._dead_letter(tx, sub_id, spec, plan.dead)

    async def _dead_letter(self, tx: PgTx, sub_id: int, spec: SubscriptionSpec,
                           dead: Sequence[Dead]) -> None:
        """Remove pending rows and append their messages to the dead-letter topic, atomically
        (in the plan's order; a trimmed message has none)."""
        rows = await tx.conn.fetch(self.sql.remove_pending, sub_id,
                                   [d.row.position for d in dead])
        if spec.dead_letter is None or not rows:
            return
        messages = {m.position: m for m in await self._messages(tx.conn, rows)}
        await tx.append([dead_letter(spec, messages[d.row.position], d)
                         for d in dead if d.row.position in messages])

    async def settle(self, handle: Any, items: Sequence[Settle], now: float) -> None:
        sub_id, spec = handle
        acks, releases, others = split_settles(items)  # as in fetch
        wake = (self._channel, self.payload((), spec.pattern))
        simple = self.sql.settle_simple(sub_id, acks, releases, now, wake, spec.max_in_flight,
                                        spec.ordered)
        if not others:  # the common case: with the others asked for meanwhile, one trip
            await self._settles(simple)
            self._notify((), (spec.pattern,))  # room may be free for this process's waiters
            return
        begin = self.sql.begin_claim(sub_id, lock=True, notify=wake)
        if acks or releases:
            begin = f"{simple}; {begin}"

        async def op(conn: Any, attempt: Attempt) -> None:
            tx = PgTx(self, conn, now, "off")
            async with self._transaction(conn, attempt, begin):
                await self._settle_others(tx, sub_id, spec, others)
            self._committed(tx)
            self._notify((), (spec.pattern,))  # room may be free for this process's waiters

        await self._run(op, "settling messages")

    async def delete_subscription(self, group: str, pattern: str) -> bool:
        async def op(conn: Any, attempt: Attempt) -> bool:
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

        async def op(conn: Any, attempt: Attempt) -> None:
            await conn.execute(self.sql.set_retention, topic, text)

        await self._run(op, "setting retention")

    async def trim(self, now: float) -> int:
        sql = self.sql

        async def op(conn: Any, attempt: Attempt) -> int:
            removed = 0
            async with self._transaction(conn, attempt):
                topics = await conn.fetch(sql.retained_topics)
                if not topics:
                    return 0
                await conn.execute(sql.freeze_subscriptions)
                subs = await conn.fetch(sql.sub_floors)
                for tid, name, text in topics:
                    r = Retention(**json.loads(text))
                    cuts = await self._limit_cuts(conn, tid, r, now)
                    cut = plan_trim(r, cuts, trim_floor(name, subs)).cut
                    if cut is not None:
                        status = await conn.execute(sql.trim, tid, cut)
                        removed += int(status.split()[-1])
            return removed

        return await self._run(op, "trimming")

    async def _limit_cuts(self, conn: Any, tid: int, r: Retention, now: float) -> LimitCuts:
        """`retention.limit_cuts`, asked of the topic's (topic_id, position) index instead of
        read row by row; the same definitions (tests/test_planners.py compares them)."""
        sql = self.sql
        return LimitCuts(
            None if r.max_messages is None else await conn.fetchval(sql.cut_count, tid,
                                                                    r.max_messages),
            None if r.max_age is None else await conn.fetchval(sql.cut_age, tid,
                                                               now - r.max_age),
            None if r.max_bytes is None else await conn.fetchval(sql.cut_bytes, tid,
                                                                 r.max_bytes),
        )

    # introspection -------------------------------------------------------------
    async def topics(self) -> list[TopicInfo]:
        async def op(conn: Any, attempt: Attempt) -> list[TopicInfo]:
            return [TopicInfo(*r) for r in await conn.fetch(self.sql.topic_stats)]

        return await self._run(op, "listing topics")

    async def subscriptions(self) -> list[SubscriptionInfo]:
        now = _time.time()

        async def op(conn: Any, attempt: Attempt) -> list[SubscriptionInfo]:
            out = []
            for sub_id, grp, pattern, spec, cursor, floor in await conn.fetch(
                    self.sql.subscription_rows):
                s = json.loads(spec)
                pending, in_flight = await conn.fetchrow(self.sql.subscription_counts,
                                                         sub_id, now, floor)
                behind = await conn.fetchval(self.sql.behind, cursor, pattern_regex(pattern))
                out.append(SubscriptionInfo(grp, pattern, cursor, pending, in_flight,
                                            behind + pending, bool(s["ordered"]),
                                            int(s["max_in_flight"]), s.get("dead_letter")))
            return out

        return await self._run(op, "listing subscriptions")

    # wake-ups across processes -------------------------------------------------------
    def payload(self, topics: Iterable[str], pattern: str | None = None) -> str:
        """What a commit NOTIFYs: this engine (which skips its own) and whom to wake in the
        others, as `_notify` takes it: the topics stored on, and the pattern of the
        subscription whose rows were settled (marked `~`). One per line: topic names and
        patterns hold no line break (nor a quote: payloads go into SQL text). Too long
        for a NOTIFY (8,000 bytes): just the origin, which wakes everyone."""
        lines = [self._origin, *topics]
        if pattern is not None:
            lines.append("~" + pattern)
        text = "\n".join(lines)
        return text if len(text) < 7_000 else self._origin

    def _on_notification(self, payload: str) -> None:
        origin, _, rest = payload.partition("\n")
        if origin == self._origin:  # our own commits woke our waiters already
            return
        if not rest:
            self._notify()
            return
        lines = rest.split("\n")
        self._notify([t for t in lines if not t.startswith("~")],
                     [p[1:] for p in lines if p.startswith("~")])


async def _run_settles(conn: Any, attempt: Attempt, calls: list[tuple[Any, ...]]) -> list[None]:
    """Several subscriptions' acks and releases (`Statements.settle_simple`, each a
    transaction of its own) in one round trip: simple-protocol statements go together."""
    await conn.execute("; ".join(c[0] for c in calls))
    return [None] * len(calls)
