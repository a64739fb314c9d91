"""Pub/sub throughput: tidings on SQLite and in memory, beside raw sqlite3 and asyncio.Queue.

Every figure is the median of repeated runs (5; 3 for publish_many, the
longest). Each run gets a fresh temp
directory, and tidings and its peer alternate within a repetition so that
drift on the machine (page cache, other load) hits both alike. Payloads are
200 random bytes; SQLite runs use durability=full (fsync per commit) on both
sides. Only the publishing/consuming loop is timed, never connect or close.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import tidings

from . import progress, publish_batches, row, scratch_dir, summary

TOPIC = "bench.orders"
PAYLOAD_BYTES = 200
BATCH = 1_000
CONCURRENCY = 100
MAX_IN_FLIGHT = 1_000
END_TO_END_TARGET = 30_000.0  # msg/s, absolute
#: What tidings stores as headers for a bytes payload; the sqlite3 peer stores the same bytes.
HEADERS = b'{"content-type":"application/octet-stream"}'
#: A hung benchmark is a bug, not a slow figure: give up on one run after this long.
RUN_TIMEOUT = 300.0

# The same columns and index as tidings_messages (see SCHEMA in tidings/engines/sqlite.py).
PEER_SCHEMA = (
    """CREATE TABLE messages (
        position INTEGER PRIMARY KEY, topic_id INTEGER NOT NULL, id TEXT NOT NULL,
        key TEXT, time REAL NOT NULL, headers BLOB, data BLOB NOT NULL)""",
    "CREATE INDEX messages_topic ON messages (topic_id, position)",
)
PEER_INSERT = "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)"


@dataclass(frozen=True)
class Sizes:
    reps: int  # runs per figure (the median is reported)
    bulk_reps: int  # runs of (a), the longest
    bulk: int  # (a) messages through publish_many / executemany
    concurrent: int  # (b) messages through 100 concurrent publish calls
    one_by_one: int  # (b) messages through the commit-per-message peer
    sqlite_e2e: int  # (c)
    memory_e2e: int  # (d)


FULL = Sizes(reps=5, bulk_reps=3, bulk=200_000, concurrent=20_000, one_by_one=2_000,
             sqlite_e2e=60_000, memory_e2e=100_000)
QUICK = Sizes(reps=1, bulk_reps=1, bulk=3_000, concurrent=300, one_by_one=50, sqlite_e2e=2_000,
              memory_e2e=2_000)


# peers ------------------------------------------------------------------------------
def _peer_db(directory: str) -> sqlite3.Connection:
    conn = sqlite3.connect(os.path.join(directory, "peer.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    for ddl in PEER_SCHEMA:
        conn.execute(ddl)
    return conn


def sqlite_executemany(directory: str, payloads: list[bytes], n: int) -> float:
    """Raw sqlite3: executemany of BATCH rows per transaction (the practical ceiling)."""
    conn = _peer_db(directory)
    prefix = os.urandom(9).hex()
    try:
        t0 = perf_counter()
        done = 0
        while done < n:
            size = min(BATCH, n - done)
            now = time.time()
            rows = [(done + i + 1, 1, f"{prefix}{done + i + 1:x}", None, now, HEADERS,
                     payloads[i]) for i in range(size)]
            conn.execute("BEGIN")
            conn.executemany(PEER_INSERT, rows)
            conn.execute("COMMIT")
            done += size
        return n / (perf_counter() - t0)
    finally:
        conn.close()


def sqlite_commit_each(directory: str, payload: bytes, n: int) -> float:
    """Raw sqlite3, one thread: one INSERT and one COMMIT (one fsync) per message."""
    conn = _peer_db(directory)
    prefix = os.urandom(9).hex()
    try:
        t0 = perf_counter()
        for i in range(1, n + 1):
            conn.execute("BEGIN")
            conn.execute(PEER_INSERT, (i, 1, f"{prefix}{i:x}", None, time.time(), HEADERS,
                                       payload))
            conn.execute("COMMIT")
        return n / (perf_counter() - t0)
    finally:
        conn.close()


async def queue_end_to_end(payloads: list[bytes], n: int) -> float:
    """asyncio.Queue: a producer task puts n items, a consumer task gets them."""
    q: asyncio.Queue[bytes] = asyncio.Queue()
    k = len(payloads)

    async def producer() -> None:
        for i in range(n):
            await q.put(payloads[i % k])

    async def consumer() -> None:
        for _ in range(n):
            await q.get()

    t0 = perf_counter()
    await asyncio.gather(producer(), consumer())
    return n / (perf_counter() - t0)


# tidings --------------------------------------------------------------------------------
def _sqlite_url(directory: str) -> str:
    return f"sqlite:///{os.path.join(directory, 'tidings.db')}"


async def tidings_publish_many(directory: str, payloads: list[bytes], n: int) -> float:
    hub = await tidings.connect(_sqlite_url(directory), durability="full")
    try:
        t0 = perf_counter()
        await publish_batches(hub, TOPIC, payloads[:BATCH], n)
        return n / (perf_counter() - t0)
    finally:
        await hub.close()


async def tidings_concurrent(directory: str, payload: bytes, n: int) -> float:
    """CONCURRENCY worker tasks, each publishing one message at a time until n are stored."""
    hub = await tidings.connect(_sqlite_url(directory), durability="full")
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await hub.publish(TOPIC, payload)

    try:
        t0 = perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return n / (perf_counter() - t0)
    finally:
        await hub.close()


async def tidings_end_to_end(url: str, payloads: list[bytes], n: int, **options: Any) -> float:
    """A publisher task (publish_many in batches) and a consumer acking each message.

    Timed from the first publish until the last ack has reached the engine.
    """
    hub = await tidings.connect(url, **options)
    try:
        sub = await hub.subscribe(TOPIC, group="bench", max_in_flight=MAX_IN_FLIGHT)

        async def publisher() -> None:
            await publish_batches(hub, TOPIC, payloads[:BATCH], n)

        async def consumer() -> None:
            got = 0
            async for msg in sub:
                await msg.ack()
                got += 1
                if got == n:
                    break
            await sub.flush()

        t0 = perf_counter()
        await asyncio.gather(publisher(), consumer())
        rate = n / (perf_counter() - t0)
        await sub.close()
        return rate
    finally:
        await hub.close()


# the runs ---------------------------------------------------------------------------------
async def _timed(fn: Callable[..., Awaitable[float]], *args: Any, **kw: Any) -> float:
    return await asyncio.wait_for(fn(*args, **kw), RUN_TIMEOUT)


def _paired(ours: list[float], theirs: list[float]) -> list[float]:
    """Per-run ratios (each run measures tidings and its peer back to back), for the JSON."""
    return [round(o / t, 3) for o, t in zip(ours, theirs, strict=True)]


async def _side_by_side(
    label: str,
    reps: int,
    tidings_run: Callable[[str], Awaitable[float]],
    peer_name: str,
    peer_run: Callable[[str], Awaitable[float]] | None,
) -> tuple[list[float], list[float]]:
    ours: list[float] = []
    theirs: list[float] = []
    for rep in range(1, reps + 1):
        if peer_run is not None:
            with scratch_dir("peer") as d:
                theirs.append(await peer_run(d))
        with scratch_dir("tidings") as d:
            ours.append(await _timed(tidings_run, d))
        versus = f", {peer_name} {theirs[-1]:,.0f} msg/s" if peer_run is not None else ""
        progress(f"pubsub: {label} run {rep}/{reps}: tidings {ours[-1]:,.0f} msg/s{versus}")
    return ours, theirs


async def run(quick: bool) -> list[dict[str, Any]]:
    s = QUICK if quick else FULL
    payloads = [os.urandom(PAYLOAD_BYTES) for _ in range(BATCH)]
    rows = []
    how = f"durability=full, {PAYLOAD_BYTES} B payloads"

    async def executemany(d: str) -> float:
        return sqlite_executemany(d, payloads, s.bulk)

    ours, theirs = await _side_by_side(
        "publish_many", s.bulk_reps, lambda d: tidings_publish_many(d, payloads, s.bulk),
        "sqlite3 executemany", executemany)
    rows.append(row("publish_many (sqlite)", summary(ours), "sqlite3 executemany",
                    summary(theirs), "msg/s", 0.60, messages=s.bulk, batch=BATCH,
                    tidings_samples=ours, peer_samples=theirs, ratio_samples=_paired(ours, theirs),
                    note=f"median of {s.bulk_reps}, {how}, {BATCH} per batch/transaction"))

    async def commit_each(d: str) -> float:
        return sqlite_commit_each(d, payloads[0], s.one_by_one)

    ours, theirs = await _side_by_side(
        f"publish x{CONCURRENCY} concurrent", s.reps,
        lambda d: tidings_concurrent(d, payloads[0], s.concurrent),
        "sqlite3 commit/msg", commit_each)
    rows.append(row(f"publish x{CONCURRENCY} concurrent (sqlite)", summary(ours),
                    "sqlite3 commit/msg", summary(theirs), "msg/s", 5.0,
                    messages=s.concurrent, peer_messages=s.one_by_one,
                    tidings_samples=ours, peer_samples=theirs, ratio_samples=_paired(ours, theirs),
                    note=f"median of {s.reps}, {how}; peer: one thread, one INSERT + COMMIT "
                         "per message"))

    ours, _ = await _side_by_side(
        "end to end sqlite", s.reps,
        lambda d: tidings_end_to_end(_sqlite_url(d), payloads, s.sqlite_e2e,
                                     durability="full"),
        "none", None)
    rows.append(row("end to end (sqlite)", summary(ours), "none", None, "msg/s", 1.0,
                    ratio=summary(ours) / END_TO_END_TARGET,
                    target_label=f"≥ {END_TO_END_TARGET:,.0f} msg/s",
                    messages=s.sqlite_e2e, tidings_samples=ours,
                    note=f"median of {s.reps}, {how}; publish_many x{BATCH} -> subscriber "
                         f"(max_in_flight={MAX_IN_FLIGHT}) -> ack, one process"))

    # Both sides are one thread of pure Python, so CPU time measures them too, and unlike
    # wall time it is not skewed when other processes share the CPUs: a 0.2 s Queue run
    # often escapes preemption that a 1 s tidings run cannot.
    cpu: dict[str, list[float]] = {"tidings": [], "peer": []}

    async def on_cpu(side: str, work: Awaitable[float]) -> float:
        t0 = time.process_time()
        rate = await work
        cpu[side].append(s.memory_e2e / max(time.process_time() - t0, 1e-9))
        return rate

    ours, theirs = await _side_by_side(
        "end to end memory", s.reps,
        lambda _: on_cpu("tidings", tidings_end_to_end("memory://", payloads, s.memory_e2e)),
        "asyncio.Queue", lambda _: on_cpu("peer", queue_end_to_end(payloads, s.memory_e2e)))
    progress(f"pubsub: end to end memory per CPU-second: tidings {summary(cpu['tidings']):,.0f}, "
             f"asyncio.Queue {summary(cpu['peer']):,.0f} "
             f"(ratio {summary(cpu['tidings']) / summary(cpu['peer']):.2f})")
    rows.append(row("end to end (memory)", summary(ours), "asyncio.Queue", summary(theirs),
                    "msg/s", 0.25, messages=s.memory_e2e, tidings_samples=ours,
                    peer_samples=theirs, ratio_samples=_paired(ours, theirs),
                    tidings_per_cpu_second=summary(cpu["tidings"]),
                    peer_per_cpu_second=summary(cpu["peer"]),
                    cpu_ratio=summary(cpu["tidings"]) / summary(cpu["peer"]),
                    note=f"median of {s.reps}; peer: unbounded asyncio.Queue, "
                         "one producer task put(), one consumer task get()"))
    return rows
