"""Pub/sub on PostgreSQL: tidings beside raw asyncpg on the same throwaway server.

The server is started here from the machine's PostgreSQL binaries
(`tests/pgserver.py`) with PostgreSQL's default durability (fsync on,
synchronous_commit on), or `TIDINGS_BENCH_POSTGRES_URL` when set. Every run
gets a fresh schema (tidings) or a fresh table (the peer); tidings and its
peer alternate within a repetition; the median of the repetitions is
reported. Payloads are 200 random bytes; only the publishing/consuming loop
is timed, never connect or close.

Rows:
- publish_many: batches of 1,000 through `hub.publish_many`, against raw
  asyncpg `copy_records_to_table` and `executemany` of the same rows (same
  columns and index as `tidings_messages`), one transaction per batch;
- end to end: one publisher (publish_many batches) and 4 consumers, each on
  its own hub (its own connections), sharing one subscription and acking
  every message; timed until the last ack reached the server.
- event appends through the repository: the event-store `append` of
  `benchmarks/eventstore.py` (same aggregate and events: 1,000 aggregates x
  100 events, saved 10 at a time) on this server. tidings serves 100 saves
  concurrently (`hub.repository(...).save`, durability full) in a fresh
  schema; the `eventsourcing` library's PostgreSQL persistence
  (`PERSISTENCE_MODULE=eventsourcing.postgres`, psycopg 3) saves one
  aggregate per `Application.save`, synchronously, in a fresh database of
  the same server. The one-save-at-a-time tidings figure is reported too.
  The ratio is the median of the per-repetition ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import tidings

from . import paired_ratio, progress, publish_batches, row, summary

TOPIC = "bench.orders"
PAYLOAD_BYTES = 200
BATCH = 1_000
CONSUMERS = 4
MAX_IN_FLIGHT = 1_000
END_TO_END_TARGET = 10_000.0  # msg/s, absolute
HEADERS = b'{"content-type":"application/octet-stream"}'
RUN_TIMEOUT = 300.0
COLUMNS = ["position", "topic_id", "id", "key", "time", "headers", "data"]
PEER_SCHEMA = (
    """CREATE TABLE {t} (
        position bigint PRIMARY KEY, topic_id int NOT NULL, id text NOT NULL, key text,
        time float8 NOT NULL, headers bytea, data bytea NOT NULL)""",
    "CREATE INDEX {t}_topic ON {t} (topic_id, position)",
)


@dataclass(frozen=True)
class Sizes:
    reps: int
    bulk: int  # messages through publish_many / the peers
    e2e: int  # messages end to end
    aggregates: int  # event appends: aggregates x events each, PER_SAVE per save
    per_aggregate: int


FULL = Sizes(reps=3, bulk=100_000, e2e=100_000, aggregates=1_000, per_aggregate=100)
QUICK = Sizes(reps=1, bulk=3_000, e2e=3_000, aggregates=20, per_aggregate=20)
PER_SAVE = 10
SAVES_IN_FLIGHT = 100
APPEND_TARGET = 3.0


@contextlib.asynccontextmanager
async def server() -> AsyncIterator[str]:
    """A base URL: `TIDINGS_BENCH_POSTGRES_URL`, or a throwaway server for this run."""
    url = os.environ.get("TIDINGS_BENCH_POSTGRES_URL")
    if url:
        yield url
        return
    from tests.pgserver import PgServer

    pg = PgServer()  # default durability: fsync and synchronous_commit on
    await asyncio.to_thread(pg.start)
    try:
        yield pg.url()
    finally:
        await asyncio.to_thread(pg.stop)


def _schema_url(base: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}schema=b_{uuid.uuid4().hex[:10]}"


async def _drop_schema(base: str, url: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    schema = url.rsplit("schema=", 1)[1]
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


# peers ------------------------------------------------------------------------------
async def peer_bulk(base: str, payloads: list[bytes], n: int, how: str) -> float:
    """Raw asyncpg: BATCH rows per transaction by COPY or by executemany."""
    import asyncpg

    table = f"peer_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(base)
    try:
        for ddl in PEER_SCHEMA:
            await conn.execute(ddl.format(t=table))
        insert = f"INSERT INTO {table} VALUES ($1, $2, $3, $4, $5, $6, $7)"
        prefix = os.urandom(9).hex()
        t0 = perf_counter()
        done = 0
        while done < n:
            size = min(BATCH, n - done)
            now = time.time()
            rows = [(done + i + 1, 1, f"{prefix}{done + i + 1:x}", None, now, HEADERS,
                     payloads[i]) for i in range(size)]
            async with conn.transaction():
                if how == "copy":
                    await conn.copy_records_to_table(table, records=rows, columns=COLUMNS)
                else:
                    await conn.executemany(insert, rows)
            done += size
        rate = n / (perf_counter() - t0)
        await conn.execute(f"DROP TABLE {table}")
        return rate
    finally:
        await conn.close()


# event appends: the eventsourcing library on the same server ---------------------------
@contextlib.asynccontextmanager
async def _scratch_database(base: str) -> AsyncIterator[str]:
    """A fresh database on the server behind `base` (dropped afterwards); yields its URL."""
    import asyncpg

    name = f"es_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(base)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def _es_env(url: str) -> dict[str, str]:
    """eventsourcing's PostgreSQL settings for the database at `url`."""
    parts = urlsplit(url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": unquote(parts.path.lstrip("/")) or "postgres",
        "POSTGRES_HOST": parts.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": unquote(parts.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(parts.password or ""),
    }


async def es_append_pg(base: str, aggregates: int, per_aggregate: int) -> float:
    """eventsourcing's `Application.save`, one save at a time, in its own database."""
    from .eventstore import _es_classes_cached, es_append_with

    async with _scratch_database(base) as url:
        def measure() -> float:
            _, bank = _es_classes_cached()
            app = bank(env=_es_env(url))  # creates its tables: not timed
            return es_append_with(app, aggregates, per_aggregate, PER_SAVE)

        return await asyncio.to_thread(measure)


async def tidings_append_pg(base: str, aggregates: int, per_aggregate: int,
                            concurrency: int) -> float:
    """`hub.repository(...).save` with `concurrency` saves in flight, in a fresh schema."""
    from .eventstore import tidings_append

    url = _schema_url(base)
    try:
        return await tidings_append(url, aggregates, per_aggregate, PER_SAVE, concurrency)
    finally:
        await _drop_schema(base, url)


async def _appends(base: str, s: Sizes) -> list[dict[str, Any]]:
    total = s.aggregates * s.per_aggregate
    try:
        import eventsourcing.postgres  # noqa: F401 - the peer, with psycopg 3 and its pool
    except ModuleNotFoundError as exc:
        missing: str | None = exc.name
        progress(f"postgres: event appends without the peer ({missing!r} is not installed; "
                 "pip install 'tidings[bench]')")
    else:
        missing = None
    ours: list[float] = []
    theirs: list[float] = []
    for rep in range(1, s.reps + 1):
        if missing is None:
            theirs.append(await asyncio.wait_for(
                es_append_pg(base, s.aggregates, s.per_aggregate), RUN_TIMEOUT))
        ours.append(await asyncio.wait_for(
            tidings_append_pg(base, s.aggregates, s.per_aggregate, SAVES_IN_FLIGHT),
            RUN_TIMEOUT))
        versus = f", eventsourcing {theirs[-1]:,.0f} events/s" if theirs else ""
        progress(f"postgres: event appends run {rep}/{s.reps}: tidings {ours[-1]:,.0f} "
                 f"events/s{versus}")
    one = await asyncio.wait_for(
        tidings_append_pg(base, s.aggregates, s.per_aggregate, 1), RUN_TIMEOUT)
    progress(f"postgres: event appends one save at a time: tidings {one:,.0f} events/s")
    peer = summary(theirs) if theirs else None
    peer_name = ("eventsourcing Application.save (postgres)" if missing is None
                 else f"eventsourcing (not installed: {missing})")
    sizes = dict(aggregates=s.aggregates, events=total, per_save=PER_SAVE)
    return [
        row("event appends through the repository, PostgreSQL", summary(ours),
            peer_name, peer, "events/s", APPEND_TARGET,
            ratio=paired_ratio(ours, theirs) if theirs else None,
            samples=ours, peer_samples=theirs, **sizes,
            note=f"median of {s.reps}, PostgreSQL defaults; tidings: {SAVES_IN_FLIGHT} saves "
                 "in flight; eventsourcing: psycopg 3, its own database on the same server"),
        row("event appends through the repository, one save at a time, PostgreSQL", one,
            peer_name, peer, "events/s", 1.0, **sizes,
            note="tidings awaits each save before the next (the peer's way)"),
    ]


# tidings ----------------------------------------------------------------------------------
async def tidings_publish_many(base: str, payloads: list[bytes], n: int) -> float:
    url = _schema_url(base)
    hub = await tidings.connect(url)
    try:
        t0 = perf_counter()
        await publish_batches(hub, TOPIC, payloads[:BATCH], n)
        return n / (perf_counter() - t0)
    finally:
        await hub.close()
        await _drop_schema(base, url)


async def tidings_end_to_end(base: str, payloads: list[bytes], n: int) -> float:
    """`end_to_end` in a fresh schema of the server at `base` (dropped afterwards)."""
    url = _schema_url(base)
    try:
        return await end_to_end(url, payloads, n)
    finally:
        await _drop_schema(base, url)


async def end_to_end(url: str, payloads: list[bytes], n: int) -> float:
    """One publisher hub, CONSUMERS consumer hubs on one subscription, every message acked;
    on any engine's URL (an empty store)."""
    pub = await tidings.connect(url)
    hubs = [await tidings.connect(url) for _ in range(CONSUMERS)]
    try:
        subs = [await h.subscribe(TOPIC, group="bench", max_in_flight=MAX_IN_FLIGHT,
                                  batch=MAX_IN_FLIGHT // CONSUMERS) for h in hubs]
        got = 0
        done_all = asyncio.Event()

        async def publisher() -> None:
            await publish_batches(pub, TOPIC, payloads[:BATCH], n)

        async def consumer(sub: tidings.Subscription) -> None:
            nonlocal got
            while not done_all.is_set():
                for msg in await sub.fetch(MAX_IN_FLIGHT, wait=0.2):
                    await msg.ack()
                    got += 1
                await sub.flush()
                if got >= n:
                    done_all.set()

        t0 = perf_counter()
        await asyncio.gather(publisher(), *(consumer(s) for s in subs))
        rate = n / (perf_counter() - t0)
        for s in subs:
            await s.close()
        return rate
    finally:
        for h in [pub, *hubs]:
            await h.close()


async def _median(label: str, reps: int, ours: Callable[[], Awaitable[float]],
                  peers: dict[str, Callable[[], Awaitable[float]]]
                  ) -> tuple[float, dict[str, float], dict[str, Any]]:
    mine: list[float] = []
    theirs: dict[str, list[float]] = {k: [] for k in peers}
    for rep in range(1, reps + 1):
        for name, fn in peers.items():
            theirs[name].append(await asyncio.wait_for(fn(), RUN_TIMEOUT))
        mine.append(await asyncio.wait_for(ours(), RUN_TIMEOUT))
        versus = "".join(f", {k} {v[-1]:,.0f} msg/s" for k, v in theirs.items())
        progress(f"postgres: {label} run {rep}/{reps}: tidings {mine[-1]:,.0f} msg/s{versus}")
    samples = {"tidings_samples": mine, **{f"{k}_samples": v for k, v in theirs.items()}}
    return summary(mine), {k: summary(v) for k, v in theirs.items()}, samples


async def run(quick: bool) -> list[dict[str, Any]]:
    s = QUICK if quick else FULL
    payloads = [os.urandom(PAYLOAD_BYTES) for _ in range(BATCH)]
    rows = []
    async with server() as base:
        how = f"median of {s.reps}, PostgreSQL defaults (fsync, synchronous_commit on)"
        ours, peers, samples = await _median(
            "publish_many", s.reps, lambda: tidings_publish_many(base, payloads, s.bulk),
            {"copy": lambda: peer_bulk(base, payloads, s.bulk, "copy"),
             "executemany": lambda: peer_bulk(base, payloads, s.bulk, "executemany")})
        rows.append(row("publish_many (postgres)", ours, "asyncpg copy_records_to_table",
                        peers["copy"], "msg/s", 0.5, messages=s.bulk, batch=BATCH,
                        executemany=peers["executemany"], **samples,
                        note=f"{how}; {BATCH} per batch/transaction; the peer COPYs into "
                             "an equivalent table (same columns and index)"))
        rows.append(row("publish_many vs executemany (postgres)", ours,
                        "asyncpg executemany", peers["executemany"], "msg/s", 0.5,
                        messages=s.bulk, batch=BATCH))
        ours, _, samples = await _median(
            "end to end", s.reps, lambda: tidings_end_to_end(base, payloads, s.e2e), {})
        rows.append(row(f"end to end, {CONSUMERS} consumers (postgres)", ours, "none", None,
                        "msg/s", 1.0, ratio=ours / END_TO_END_TARGET,
                        target_label=f"≥ {END_TO_END_TARGET:,.0f} msg/s", messages=s.e2e,
                        **samples,
                        note=f"{how}; publish_many x{BATCH} -> {CONSUMERS} consumer hubs on "
                             f"one subscription (max_in_flight={MAX_IN_FLIGHT}) -> ack"))
        rows.extend(await _appends(base, s))
    return rows


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(asyncio.run(run("--quick" in sys.argv)), indent=1, default=str))
