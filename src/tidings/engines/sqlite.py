"""`sqlite:///path.db`: the embedded engine — one file, no server, several processes.

WAL mode, so readers never block the writer. All writes of a process go
through one writer thread that group-commits whatever is queued into one
transaction (each request in its own savepoint, so one failing request
leaves the others intact). Other processes sharing the file take turns on
SQLite's write lock (`BEGIN IMMEDIATE` with a busy timeout) and notice each
other's commits with a cheap `PRAGMA data_version` look, taken by the writer
thread (its connection does not count its own commits; see `_look_for_others`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time as _time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec

from .. import topics as _topics
from ..errors import EngineUnavailable, InvalidArgument
from ..messages import Message, OutMessage, Published
from . import sqlite_subscriptions as _subs
from .base import (
    HOLDING_MESSAGE,
    HOLDING_WRITER,
    Engine,
    Retention,
    Settle,
    SubscriptionInfo,
    TopicInfo,
)
from .delivery import SubscriptionSpec
from .sqlite_tx import MSG_COLS, Tx
from .store_base import StoreBackend

__all__ = ["HOLDING_WRITER", "SqliteEngine", "Tx"]


T = TypeVar("T")
#: Seconds `open` keeps trying while other processes hold a new file locked.
_OPEN_WAIT = 30.0

_dec_headers = msgspec.json.Decoder(dict[str, str]).decode

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS tidings_meta (
        name TEXT PRIMARY KEY, value ANY) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS tidings_topics (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, retention TEXT)""",
    # position is assigned by the writer from tidings_meta.position, so it never
    # goes backwards or gets reused, even after the newest rows are trimmed.
    """CREATE TABLE IF NOT EXISTS tidings_messages (
        position INTEGER PRIMARY KEY,
        topic_id INTEGER NOT NULL,
        id TEXT NOT NULL,
        key TEXT,
        time REAL NOT NULL,
        headers BLOB,
        data BLOB NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS tidings_messages_topic ON tidings_messages (topic_id, position)",
    """CREATE TABLE IF NOT EXISTS tidings_message_ids (
        id TEXT PRIMARY KEY, position INTEGER NOT NULL, time REAL NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS tidings_subscriptions (
        id INTEGER PRIMARY KEY, grp TEXT NOT NULL, pattern TEXT NOT NULL,
        spec TEXT NOT NULL, cursor INTEGER NOT NULL, UNIQUE (grp, pattern))""",
    """CREATE TABLE IF NOT EXISTS tidings_pending (
        sub_id INTEGER NOT NULL, position INTEGER NOT NULL, key TEXT,
        attempt INTEGER NOT NULL, due REAL NOT NULL,
        PRIMARY KEY (sub_id, position)) WITHOUT ROWID""",
]

def _connect(path: str, *, writer: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0,
                           cached_statements=512)
    conn.execute("PRAGMA busy_timeout = 30000")
    if writer:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = OFF")
    return conn


class _Job:
    __slots__ = ("durable", "fn", "future", "notify", "result")

    def __init__(self, fn: Callable[[Tx], Any], future: asyncio.Future[Any], durable: bool,
                 notify: bool | str = True):
        self.fn = fn
        self.future = future
        self.durable = durable
        self.notify = notify
        self.result: Any = None


_STOP = object()
_WATCH = object()  # a waiter appeared: the idle writer starts looking (see _watch)
_BUSY = object()  # an inline read met a lock: go to a reader thread


class SqliteEngine(Engine):
    """The embedded engine on one SQLite file (WAL, group commit, multi-process).

    `durability="full"` (default) fsyncs every commit that stores messages, so
    an acknowledged publish survives power loss; `"normal"` relies on the OS
    (survives a process crash, not a power cut). Delivery bookkeeping (fetch,
    ack) always commits with NORMAL: losing it only means a redelivery.
    """

    def __init__(
        self,
        path: str,
        *,
        url: str | None = None,
        durability: str = "full",
        dedup_window: float | str = 120.0,
        poll_interval: float | str = 0.005,
        max_batch: int | str = 2000,
    ) -> None:
        super().__init__()
        if durability not in ("full", "normal"):
            raise InvalidArgument(
                f"durability must be 'full' or 'normal', got {durability!r}"
            )
        self.path = path
        self.url = url or f"sqlite:///{path}"
        self.durability = durability
        self.dedup_window = float(dedup_window)
        self.poll_interval = float(poll_interval)
        self.max_batch = int(max_batch)
        if not 0 <= self.dedup_window < float("inf"):
            raise InvalidArgument(f"dedup_window must be seconds >= 0, got {dedup_window!r}")
        if not 0 < self.poll_interval <= 60:
            raise InvalidArgument(
                f"poll_interval must be seconds above 0 (at most 60), got {poll_interval!r}")
        if self.max_batch < 1:
            raise InvalidArgument(f"max_batch must be at least 1, got {max_batch!r}")
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._topic_ids: dict[str, int] = {}
        self._topic_names: dict[int, str] = {}
        self._topic_known = 0
        self._topic_lock = threading.RLock()
        self._new_topics: list[tuple[str, int]] = []  # created in the open transaction
        self._closed = False
        self._synchronous: str | None = None
        self._last_prune = 0.0
        # The log's head as the writer last saw it: the counter in tidings_meta and the
        # newest message's time. Valid while no other connection has committed (see
        # _look_for_others); None: read it in the next transaction.
        self._head_position: int | None = None
        self._head_time: float | None = None
        self._inline_conn: sqlite3.Connection | None = None

    # lifecycle ---------------------------------------------------------------
    async def open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise EngineUnavailable(
                f"cannot open {self.url!r}: directory {directory!r} does not exist; create it "
                "first or point the URL at an existing folder"
            )
        self._loop = asyncio.get_running_loop()
        conn = await self._create()
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="tidings-sqlite-read")
        self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        self._thread = threading.Thread(
            target=self._writer, args=(conn,), name="tidings-sqlite-writer", daemon=True
        )
        self._thread.start()

    async def _create(self) -> sqlite3.Connection:
        """The writer's connection, the file in WAL mode with tidings' tables. Processes
        opening a new file at once take turns: switching it to WAL can answer "database
        is locked" at once (SQLite does not wait there), so that is tried again."""
        deadline = _time.monotonic() + _OPEN_WAIT
        while True:
            conn = None
            try:
                conn = _connect(self.path, writer=True)
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if mode != "wal":
                    raise EngineUnavailable(f"cannot put {self.path!r} in WAL mode (got {mode})")
                conn.execute("BEGIN IMMEDIATE")
                for ddl in SCHEMA:
                    conn.execute(ddl)
                conn.execute("COMMIT")
                self._new_topics.clear()
                return conn
            except sqlite3.Error as exc:
                if conn is not None:
                    conn.close()
                busy = isinstance(exc, sqlite3.OperationalError) and (
                    "locked" in str(exc) or "busy" in str(exc))
                if not busy or _time.monotonic() > deadline:
                    raise EngineUnavailable(
                        f"cannot open {self.url!r}: {exc}; check the path and its permissions"
                        + (" (another process holds it locked)" if busy else "")
                    ) from None
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join)
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        for c in self._reader_conns:
            c.close()
        if self._inline_conn is not None:
            self._inline_conn.close()
        self._notify()

    def event_store(self) -> StoreBackend:
        from .sqlite_store import SqliteStore  # (it imports this module)

        return SqliteStore(self)

    # the writer ----------------------------------------------------------------
    def _writer(self, conn: sqlite3.Connection) -> None:
        q = self._queue
        loop = self._loop
        assert loop is not None
        while True:
            try:
                # idle: look for other processes' commits as often as poll_interval says,
                # while anyone waits (else sleep until there is work, or a waiter: _watch)
                first = q.get(timeout=self.poll_interval if self._waiters else None)
            except queue.Empty:
                self._look_for_others(conn)
                continue
            if first is _WATCH:
                self._look_for_others(conn)
                continue
            if first is _STOP:
                break
            jobs: list[_Job] = [first]
            stop = False
            while len(jobs) < self.max_batch:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _WATCH:
                    continue  # (the transaction below looks anyway)
                if nxt is _STOP:
                    stop = True
                    break
                jobs.append(nxt)
            wrote = self._commit(conn, jobs)
            loop.call_soon_threadsafe(self._resolve, jobs, wrote)
            if stop:
                break
        conn.close()

    def _watch(self) -> None:
        if self._thread is not None and not self._closed:
            self._queue.put(_WATCH)

    def _look_for_others(self, conn: sqlite3.Connection) -> None:
        """In the writer thread: wake every waiter if another connection (another
        process, another hub on this file) committed since the last look.

        The writer's own connection does not count its own commits in data_version, so
        this process's writes (which wake exactly the waiters they concern) never
        cause a wake-everyone, however busy it is.
        """
        try:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error:
            self._forget_head()
            return
        if version != self._data_version:
            self._data_version = version
            self._forget_head()  # another connection may have stored messages
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._notify)

    def _commit(self, conn: sqlite3.Connection, jobs: list[_Job]) -> set[str]:
        """Run the jobs in one transaction; the topics of the messages it stored."""
        durable = self.durability == "full" and any(j.durable for j in jobs)
        sync = "FULL" if durable else "NORMAL"
        try:
            if sync != self._synchronous:
                conn.execute(f"PRAGMA synchronous = {sync}")
                self._synchronous = sync
            conn.execute("BEGIN IMMEDIATE")
            self._look_for_others(conn)  # (before this transaction writes anything)
        except sqlite3.Error as exc:
            err = EngineUnavailable(f"cannot start a write on {self.url!r}: {exc}")
            for j in jobs:
                j.result = err
            return set()
        tx = Tx(self, conn, self._now(conn))
        single = len(jobs) == 1
        for j in jobs:
            if single:
                try:
                    j.result = (True, j.fn(tx))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    j.result = exc
                continue
            conn.execute("SAVEPOINT job")
            try:
                j.result = (True, j.fn(tx))
                conn.execute("RELEASE job")
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                self._forget_new_topics()
                j.result = exc
        try:
            if single and isinstance(jobs[0].result, BaseException):
                conn.execute("ROLLBACK")
                self._forget_new_topics()
                return set()
            tx._finish()
            if tx.now - self._last_prune > 10.0:
                self._last_prune = tx.now
                conn.execute(
                    "DELETE FROM tidings_message_ids WHERE time < ?",
                    (tx.now - self.dedup_window,),
                )
            conn.execute("COMMIT")
            self._new_topics.clear()
            if not tx._dirty:
                return set()
            self._head_position, self._head_time = tx._position, tx.now
            return tx.topics
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._forget_new_topics()
            self._forget_head()
            err = EngineUnavailable(f"commit to {self.url!r} failed: {exc}")
            for j in jobs:
                j.result = err
            return set()

    def _now(self, conn: sqlite3.Connection) -> float:
        """Commit time, never earlier than the last stored message's (time order = log order).

        In the writer's transaction, after `_look_for_others`: the newest message's time
        is read only when another connection may have committed since this writer's
        last commit (else it is the time that commit stored its messages with).
        """
        now = round(_time.time(), 6)  # microseconds, like the datetimes users compare with
        last = self._head_time
        if last is None:
            row = conn.execute(
                "SELECT max(time) FROM tidings_messages "
                "WHERE position = (SELECT max(position) FROM tidings_messages)").fetchone()
            last = self._head_time = float(row[0]) if row and row[0] is not None else 0.0
        return last if last > now else now

    def _head(self, conn: sqlite3.Connection) -> int:
        """The log's last position (the counter in tidings_meta), in the writer's
        transaction; read only when another connection may have moved it."""
        last = self._head_position
        if last is None:
            row = conn.execute("SELECT value FROM tidings_meta WHERE name = 'position'"
                               ).fetchone()
            last = self._head_position = int(row[0]) if row else 0
        return last

    def _forget_head(self) -> None:
        self._head_position = self._head_time = None

    def _resolve(self, jobs: list[_Job], topics: set[str]) -> None:
        patterns: list[str] = []
        wake = bool(topics)
        for j in jobs:
            r = j.result
            if isinstance(r, tuple):
                if isinstance(j.notify, str):
                    patterns.append(j.notify)
                wake = wake or bool(j.notify)
            if j.future.cancelled():
                continue
            if isinstance(r, tuple):
                j.future.set_result(r[1])
            elif isinstance(r, sqlite3.Error):
                j.future.set_exception(EngineUnavailable(f"{self.url}: {r}"))
            else:
                j.future.set_exception(r)
        if wake:
            self._notify(topics, patterns)

    async def transact(self, fn: Callable[[Tx], T], *, durable: bool = True,
                       notify: bool | str = True) -> T:
        """Run `fn(tx)` on the writer thread inside a group-committed transaction.

        All of `fn`'s writes commit together or not at all; the call returns
        after the commit (fsynced when `durable` and durability is 'full').
        The commit wakes the waiters for the topics it stored messages on; `notify`
        False: no one else, a pattern: that subscription's waiters too (it settled).
        """
        if self._closed:
            raise EngineUnavailable("the SQLite engine is closed")
        if HOLDING_WRITER.get():
            raise InvalidArgument(HOLDING_MESSAGE)
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put(_Job(fn, fut, durable, notify))
        return await fut

    # topic ids (cached; read or created on the writer thread) --------------------
    def _topic_id(self, conn: sqlite3.Connection, name: str) -> int:
        tid = self._topic_ids.get(name)
        if tid is not None:
            return tid
        row = conn.execute("SELECT id FROM tidings_topics WHERE name = ?", (name,)).fetchone()
        if row is None:
            cur = conn.execute("INSERT INTO tidings_topics (name) VALUES (?)", (name,))
            tid = int(cur.lastrowid or 0)
            self._new_topics.append((name, tid))
        else:
            tid = int(row[0])
        with self._topic_lock:
            self._topic_ids[name] = tid
            self._topic_names[tid] = name
        return tid

    def _forget_new_topics(self) -> None:
        """A rollback undid topic rows created since the last commit: drop them from the cache."""
        with self._topic_lock:
            for name, tid in self._new_topics:
                self._topic_ids.pop(name, None)
                self._topic_names.pop(tid, None)
                self._topic_known = min(self._topic_known, tid - 1)
            self._new_topics.clear()

    def _refresh_topics(self, conn: sqlite3.Connection) -> dict[int, str]:
        rows = conn.execute(
            "SELECT id, name FROM tidings_topics WHERE id > ?", (self._topic_known,)
        ).fetchall()
        if rows:
            with self._topic_lock:
                for tid, name in rows:
                    self._topic_ids[name] = tid
                    self._topic_names[tid] = name
                    self._topic_known = max(self._topic_known, tid)
        return self._topic_names

    def _matching_ids(self, conn: sqlite3.Connection, pattern: str) -> list[int]:
        self._refresh_topics(conn)
        rx = _topics.matcher(pattern)
        with self._topic_lock:
            return [tid for tid, name in self._topic_names.items() if rx.match(name)]

    # the log -----------------------------------------------------------------
    async def append(self, messages: Sequence[OutMessage]) -> list[Published]:
        return await self.transact(lambda tx: tx.append(messages), durable=True)

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, writer=False)
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    def _read_inline(self, fn: Callable[[sqlite3.Connection], T], atomic: bool = True
                     ) -> T | object:
        """Run a small read on the event loop's own connection; _BUSY when it must wait.

        A point read from a WAL database takes microseconds, far less than the hop to a
        reader thread and back, and a WAL reader never waits for the writer. It can
        only meet a lock in rare moments (a WAL being recovered); then the caller goes
        to a reader thread, so the loop never blocks on a lock.
        """
        conn = self._inline_conn
        if conn is None:
            conn = self._inline_conn = _connect(self.path, writer=False)
            conn.execute("PRAGMA busy_timeout = 0")
        try:
            if atomic:
                conn.execute("BEGIN")
        except sqlite3.OperationalError:
            return _BUSY
        try:
            return fn(conn)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return _BUSY
            raise
        finally:
            if atomic:
                conn.execute("COMMIT")

    async def _read_op(self, fn: Callable[[sqlite3.Connection], T], *,
                       inline: bool = False, atomic: bool = True) -> T:
        """Run a read in one consistent snapshot; `inline` for small, bounded reads.

        `atomic=False` (inline only): each statement sees the newest commit, for reads
        whose statements need no common snapshot.
        """
        if self._closed or self._readers is None:
            raise EngineUnavailable("the SQLite engine is closed")
        if inline:
            try:
                result = self._read_inline(fn, atomic)
            except sqlite3.Error as exc:
                raise EngineUnavailable(f"read from {self.url!r} failed: {exc}") from None
            if result is not _BUSY:
                return result  # type: ignore[return-value]

        def run() -> T:
            conn = self._reader()
            conn.execute("BEGIN")  # one consistent snapshot for the whole read
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

        try:
            return await asyncio.get_running_loop().run_in_executor(self._readers, run)
        except sqlite3.Error as exc:
            raise EngineUnavailable(f"read from {self.url!r} failed: {exc}") from None

    def _messages(self, rows: Sequence[tuple[Any, ...]], attempts: dict[int, int] | None = None,
                  ) -> list[Message]:
        names = self._topic_names
        out = []
        for position, topic_id, id, key, ts, headers, data in rows:
            out.append(Message(
                id, names[topic_id], key, data,
                _dec_headers(headers) if headers else {}, ts, position,
                attempts.get(position, 0) if attempts else 0,
            ))
        return out

    def _scan(self, conn: sqlite3.Connection, pattern: str, after: int, stop: int | None,
              limit: int) -> list[tuple[Any, ...]]:
        ids = self._matching_ids(conn, pattern)
        if not ids:
            return []
        sql = f"SELECT {MSG_COLS} FROM tidings_messages WHERE position > ?"
        params: list[Any] = [after]
        if stop is not None:
            sql += " AND position <= ?"
            params.append(stop)
        if len(ids) < len(self._topic_names):
            sql += f" AND topic_id IN ({','.join(map(str, ids))})"
        sql += " ORDER BY position LIMIT ?"
        params.append(limit)
        return conn.execute(sql, params).fetchall()

    async def read(self, pattern: str, after: int, stop: int | None, limit: int) -> list[Message]:
        def op(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return self._scan(conn, pattern, after, stop, limit)

        rows = await self._read_op(op, inline=limit <= 256)
        return self._messages(rows)

    async def last_position(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT value FROM tidings_meta WHERE name = 'position'").fetchone()
            return int(row[0]) if row else 0

        return await self._read_op(op)

    async def position_before(self, timestamp: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            # time is non-decreasing in position, so binary-search the primary key
            row = conn.execute("SELECT min(position), max(position) FROM tidings_messages"
                               ).fetchone()
            if row[0] is None:
                return 0
            lo, hi, best = int(row[0]), int(row[1]), 0
            while lo <= hi:
                mid = (lo + hi) // 2
                r = conn.execute(
                    "SELECT position, time FROM tidings_messages WHERE position >= ? "
                    "ORDER BY position LIMIT 1", (mid,)
                ).fetchone()
                if r is None or r[1] >= timestamp:
                    hi = mid - 1
                else:
                    best = max(best, int(r[0]))
                    lo = int(r[0]) + 1
            return best

        return await self._read_op(op)

    # subscriptions and retention: engines/sqlite_subscriptions.py ----------------
    async def subscribe(self, spec: SubscriptionSpec, start_after: int | None) -> Any:
        return await _subs.subscribe(self, spec, start_after)

    async def fetch(
        self, handle: Any, limit: int, now: float, settles: Sequence[Settle] = ()
    ) -> tuple[list[Message], float | None]:
        return await _subs.fetch(self, handle, limit, now, settles)

    async def settle(self, handle: Any, items: Sequence[Settle], now: float) -> None:
        await _subs.settle(self, handle, items, now)

    async def delete_subscription(self, group: str, pattern: str) -> bool:
        return await _subs.delete_subscription(self, group, pattern)

    async def set_retention(self, topic: str, retention: Retention) -> None:
        await _subs.set_retention(self, topic, retention)

    async def trim(self, now: float) -> int:
        return await _subs.trim(self, now)

    async def topics(self) -> list[TopicInfo]:
        return await _subs.topics(self)

    async def subscriptions(self) -> list[SubscriptionInfo]:
        return await _subs.subscriptions(self)

    # wake-ups across processes ---------------------------------------------------------
