"""Connections to PostgreSQL for the engine: the pool, lost connections, errors, LISTEN.

What the engine relies on:

- `run(op)` hands `op` a pooled connection and rides out a restarting server:
  a lost connection is retried (on a new connection) for `reconnect_timeout`
  seconds when nothing was sent yet or the operation is safe to repeat;
  otherwise the caller gets `EngineUnavailable` saying the outcome is unknown;
- every asyncpg or OS error leaves here as `EngineUnavailable` with what to do;
- `listen` keeps one connection LISTENing on a channel and reconnects it, and
  reports each (re)connection, because notifications sent meanwhile are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from ..errors import EngineUnavailable

__all__ = ["Attempt", "Batched", "Connections", "Ending"]

T = TypeVar("T")


def _asyncpg() -> Any:
    try:
        import asyncpg  # type: ignore[import-untyped]
    except ImportError:
        raise EngineUnavailable(
            "the PostgreSQL engine needs asyncpg; install it with pip install 'tidings[postgres]'"
        ) from None
    return asyncpg


def lost(exc: BaseException) -> bool:
    """True when `exc` means the connection is gone or the server is (re)starting."""
    pg = _asyncpg()
    if isinstance(exc, (OSError, pg.PostgresConnectionError,
                        pg.exceptions.CannotConnectNowError,
                        pg.exceptions.AdminShutdownError,
                        pg.exceptions.CrashShutdownError,
                        pg.exceptions.TooManyConnectionsError,
                        # the protocol lost track after a dropped connection
                        pg.exceptions.InternalClientError)):
        return True
    text = str(exc)
    return isinstance(exc, pg.InterfaceError) and "pool is clos" not in text and (
        "closed" in text or "released back to the pool" in text)


def rolled_back(exc: BaseException) -> bool:
    """True when the server rolled the transaction back to break a deadlock or conflict."""
    pg = _asyncpg()
    return isinstance(exc, (pg.exceptions.DeadlockDetectedError,
                            pg.exceptions.SerializationError))


def driver_error(exc: BaseException) -> bool:
    pg = _asyncpg()
    return isinstance(exc, (pg.PostgresError, pg.InterfaceError, OSError,
                            pg.exceptions.InternalClientError))


class Attempt:
    """How far one try got: once `sent`, a lost connection leaves the outcome unknown."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False


class Ending:
    """Lets a transaction's body send its last statements together with the COMMIT."""

    __slots__ = ("_attempt", "_conn", "done")

    def __init__(self, conn: Any, attempt: Attempt) -> None:
        self._conn = conn
        self._attempt = attempt
        self.done = False

    async def commit_with(self, sql: str) -> None:
        """Run `sql` (simple query protocol; it must end with COMMIT) as the transaction's end."""
        self._attempt.sent = True
        await self._conn.execute(sql)
        self.done = True


class Connections:
    """A pool plus one LISTEN connection to the server behind `dsn`."""

    def __init__(self, dsn: str, where: str, *, schema: str, pool_min: int, pool_max: int,
                 reconnect_timeout: float) -> None:
        self.dsn = dsn
        self.where = where  # host:port/db, for messages (never the password)
        self.schema = schema
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.reconnect_timeout = reconnect_timeout
        self.pool: Any = None
        self.closed = False
        self._listener: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        #: Set while the LISTEN connection is up.
        self.listening = asyncio.Event()

    async def open(self) -> None:
        pg = _asyncpg()

        async def no_reset(conn: Any) -> None:
            # Our transactions always end with COMMIT or ROLLBACK; skipping asyncpg's
            # RESET ALL / UNLISTEN on every release saves a round trip per operation.
            return None

        try:
            # pool_min defaults to 0: a floor would make asyncpg reconnect (and log) in the
            # background while the server restarts; we reconnect on demand instead.
            self.pool = await pg.create_pool(
                self.dsn, min_size=self.pool_min, max_size=self.pool_max, reset=no_reset,
                server_settings={"application_name": "tidings"},
            )
        except Exception as exc:
            raise self.translate(exc, "connecting") from None

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stopping.set()
        if self._listener is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._listener), 12.0)
            except (TimeoutError, Exception):
                self._listener.cancel()
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), 10.0)
            except (TimeoutError, Exception):
                self.pool.terminate()

    # running operations ----------------------------------------------------------------
    async def run(self, op: Callable[[Any, Attempt], Awaitable[T]], what: str, *,
                  retry: bool = True, patience: float | None = None) -> T:
        """Run `op(conn, attempt)` on a pooled connection, riding out lost connections.

        A lost connection is retried for `reconnect_timeout` seconds (or
        `patience`) when nothing was sent yet (`attempt.sent` is False), or
        always when `retry` (the operation is safe to repeat).
        """
        deadline: float | None = None
        delay = 0.02
        while True:
            if self.closed or self.pool is None:
                raise EngineUnavailable(
                    f"the PostgreSQL engine for {self.where} is closed; open a new hub with "
                    "tidings.connect()")
            attempt = Attempt()
            try:
                async with self.pool.acquire() as conn:
                    return await op(conn, attempt)
            except Exception as exc:
                if isinstance(exc, EngineUnavailable) or not driver_error(exc):
                    raise
                if rolled_back(exc):
                    # nothing was committed: repeat, unless the caller's code must decide
                    if attempt.sent and not retry:
                        raise EngineUnavailable(
                            f"PostgreSQL at {self.where} rolled back while {what} "
                            f"({type(exc).__name__}); nothing was committed, try again"
                        ) from None
                elif not lost(exc):
                    raise self.translate(exc, what) from None
                elif attempt.sent and not retry:
                    raise EngineUnavailable(
                        f"lost the connection to PostgreSQL at {self.where} while {what}; it "
                        "may or may not have been committed (a publish with id= can be "
                        "repeated safely)") from None
                now = time.monotonic()
                if deadline is None:
                    deadline = now + (self.reconnect_timeout if patience is None else patience)
                if now >= deadline or self.closed:
                    raise self.translate(exc, what) from None
                await asyncio.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, 0.5)

    @staticmethod
    @contextlib.asynccontextmanager
    async def transaction(conn: Any, attempt: Attempt,
                          begin: str = "BEGIN") -> AsyncIterator[Ending]:
        """BEGIN (or `begin`, which may hold more statements) … COMMIT, ROLLBACK on error.

        The body may end the transaction itself with `ending.commit_with(sql)`, which
        sends its last statements and the COMMIT in one round trip.
        """
        await conn.execute(begin)
        ending = Ending(conn, attempt)
        try:
            yield ending
        except BaseException:
            try:
                await asyncio.shield(conn.execute("ROLLBACK"))
            except BaseException:
                with contextlib.suppress(Exception):  # gone already if the pool took it back
                    conn.terminate()  # state unknown: never hand it back to the pool
            raise
        if not ending.done:
            attempt.sent = True
            await conn.execute("COMMIT")

    def translate(self, exc: BaseException, what: str) -> EngineUnavailable:
        """A driver error as `EngineUnavailable`, saying what to do about it."""
        pg = _asyncpg()
        if isinstance(exc, pg.exceptions.InvalidCatalogNameError):
            hint = "the database does not exist; create it (createdb) or fix the URL"
        elif isinstance(exc, (pg.exceptions.InvalidPasswordError,
                              pg.exceptions.InvalidAuthorizationSpecificationError)):
            hint = "authentication failed; check the user and password in the URL"
        elif isinstance(exc, pg.exceptions.InsufficientPrivilegeError):
            hint = (f"permission denied; the user needs CREATE on the database and USAGE on "
                    f"schema {self.schema!r}")
        elif isinstance(exc, pg.exceptions.ReadOnlySQLTransactionError):
            hint = "the server is read-only (a standby?); point the URL at the primary"
        elif isinstance(exc, pg.exceptions.TooManyConnectionsError):
            hint = "the server has too many connections; lower pool_max or raise max_connections"
        elif lost(exc):
            hint = (f"cannot reach the server ({type(exc).__name__}: {exc}); check that "
                    "PostgreSQL is running and that the URL's host and port are right")
        else:
            hint = f"{type(exc).__name__}: {exc}"
        return EngineUnavailable(f"PostgreSQL at {self.where}: {what} failed: {hint}")

    # LISTEN ---------------------------------------------------------------------------
    async def listen(self, channel: str, on_notify: Callable[[str], None],
                     on_connect: Callable[[], None], *, wait: float = 5.0) -> None:
        """Start LISTENing on `channel` in the background (waits up to `wait` for the first)."""
        self._listener = asyncio.create_task(self._listen(channel, on_notify, on_connect),
                                             name="tidings-pg-listen")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.listening.wait(), wait)

    async def _listen(self, channel: str, on_notify: Callable[[str], None],
                      on_connect: Callable[[], None]) -> None:
        pg = _asyncpg()
        stopping = self._stopping
        delay = 0.05
        while not stopping.is_set():
            try:
                # never cancelled mid-handshake (that leaks the socket): close() sets
                # `stopping` and waits for us instead
                conn = await pg.connect(self.dsn, timeout=10,
                                        server_settings={"application_name": "tidings-listen"})
            except (Exception, TimeoutError):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                delay = min(delay * 2, 1.0)
                continue
            gone = asyncio.Event()
            conn.add_termination_listener(lambda _c, gone=gone: gone.set())
            try:
                await conn.add_listener(channel, lambda _c, _pid, _ch, payload: on_notify(payload))
                self.listening.set()
                delay = 0.05
                on_connect()
                waits = [asyncio.ensure_future(gone.wait()),
                         asyncio.ensure_future(stopping.wait())]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
            except Exception:
                pass  # lost while subscribing: start over
            finally:
                self.listening.clear()
                if not conn.is_closed():
                    try:
                        await asyncio.wait_for(conn.close(), 2.0)
                    except (Exception, TimeoutError):
                        conn.terminate()


class Batched:
    """Calls that share a statement: those made while one is under way go together in
    the next, as appends share a commit. `run(conn, attempt, calls)` answers the calls
    (argument tuples, at most `limit`) on one connection with one result each, in order;
    an exception as a result is raised to that call alone.

    With `retry` (reads, claims, settles), a lost connection repeats the statement;
    without (commits), once `run` marked the attempt sent the callers hear that the
    outcome is unknown. `stopped` is what they hear when the engine stops meanwhile."""

    def __init__(self, conns: Connections, what: str,
                 run: Callable[[Any, Attempt, list[tuple[Any, ...]]], Awaitable[list[Any]]], *,
                 limit: int = 200, retry: bool = True, stopped: str | None = None) -> None:
        self._conns = conns
        self._what = what
        self._run = run
        self._limit = limit
        self._retry = retry
        self._stopped = stopped or f"{what} was cut off (the engine is closing); ask again"
        self._queue: list[tuple[Any, ...]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def __call__(self, *args: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((*args, fut))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        return await fut

    async def _flush(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue[:self._limit], self._queue[self._limit:]
                futs: list[asyncio.Future[Any]] = [item[-1] for item in group]
                calls = [item[:-1] for item in group]

                async def op(conn: Any, attempt: Attempt,
                             calls: list[tuple[Any, ...]] = calls) -> list[Any]:
                    return await self._run(conn, attempt, calls)

                try:
                    results = await self._conns.run(op, self._what, retry=self._retry)
                except BaseException as exc:
                    err = exc if isinstance(exc, Exception) else EngineUnavailable(self._stopped)
                    for fut in futs:
                        if not fut.done():
                            fut.set_exception(err)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for fut, result in zip(futs, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        finally:
            self._flusher = None
            if self._queue:  # asked for while we were finishing
                self._flusher = asyncio.ensure_future(self._flush())
