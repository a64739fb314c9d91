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

import tidings

from . import progress, row, summary

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


FULL = Sizes(reps=3, bulk=100_000, e2e=100_000)
QUICK = Sizes(reps=1, bulk=3_000, e2e=3_000)


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


# tidings ----------------------------------------------------------------------------------
async def tidings_publish_many(base: str, payloads: list[bytes], n: int) -> float:
    url = _schema_url(base)
    hub = await tidings.connect(url)
    try:
        t0 = perf_counter()
        done = 0
        while done < n:
            size = min(BATCH, n - done)
            await hub.publish_many(TOPIC, payloads[:size])
            done += size
        return n / (perf_counter() - t0)
    finally:
        await hub.close()
        await _drop_schema(base, url)


async def tidings_end_to_end(base: str, payloads: list[bytes], n: int) -> float:
    """One publisher hub, CONSUMERS consumer hubs on one subscription, every message acked."""
    url = _schema_url(base)
    pub = await tidings.connect(url)
    hubs = [await tidings.connect(url) for _ in range(CONSUMERS)]
    try:
        subs = [await h.subscribe(TOPIC, group="bench", max_in_flight=MAX_IN_FLIGHT,
                                  batch=MAX_IN_FLIGHT // CONSUMERS) for h in hubs]
        got = 0
        done_all = asyncio.Event()

        async def publisher() -> None:
            done = 0
            while done < n:
                size = min(BATCH, n - done)
                await pub.publish_many(TOPIC, payloads[:size])
                done += size

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
        await _drop_schema(base, url)


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
    return rows


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(asyncio.run(run("--quick" in sys.argv)), indent=1, default=str))
