"""Event store: tidings beside the `eventsourcing` library (its SQLite persistence on a file).

Both sides get the same domain: an account aggregate opened with one event
and then sent `Deposited(amount, memo)` events (memo: 40 characters), the
same number of aggregates and events, files in fresh temp directories, and
fsync on every commit (tidings durability=full; eventsourcing's WAL database
with SQLite's default synchronous=FULL). Only the measured loop is timed.

- append: 1,000 aggregates x 100 events, saved 10 events at a time through
  each library's repository. tidings serves 100 saves concurrently (an
  asyncio service handling requests) and group-commits them; eventsourcing's
  `Application.save` is synchronous, one transaction per save.
- append, one save at a time: the same saves through tidings' repository, each
  awaited before the next, beside raw `sqlite3` writing the same rows with one
  commit per save (`raw_append`: same tables, indexes and rows, WAL,
  synchronous=FULL), the two run alternately.
- load: `repository.get` of an aggregate with 1,000 events (median of many
  loads), and of one with a snapshot at version 990 plus 10 events.
- scan: `hub.events.read_all(raw=True)` over the 100,000 appended events
  beside a raw sqlite3 `SELECT` of the same columns of the same table.

Ratios of side-by-side runs are the median of the per-pair ratios.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from time import perf_counter
from typing import Any

import msgspec

import tidings

from . import paired_ratio, progress, row, scratch_dir, summary

MEMO = "m" * 40


class BenchOpened(tidings.Event):
    owner: str


class BenchDeposited(tidings.Event):
    amount: int
    memo: str


class BenchAccount(tidings.Aggregate):
    owner: str = ""
    balance: int = 0

    def apply(self, event: Any) -> None:
        match event:
            case BenchDeposited(amount=a):
                self.balance += a
            case BenchOpened(owner=o):
                self.owner = o

    def deposit(self, amount: int) -> None:
        self.record(BenchDeposited(amount=amount, memo=MEMO))


def _es_classes() -> tuple[Any, Any]:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class EsAccount(Aggregate):
        @event("Opened")
        def __init__(self, owner: str) -> None:
            self.owner = owner
            self.balance = 0

        @event("Deposited")
        def deposit(self, amount: int, memo: str) -> None:
            self.balance += amount

    class Bank(Application[Any]):
        is_snapshotting_enabled = True

    return EsAccount, Bank


def _es_app(path: str) -> Any:
    _, bank = _es_classes_cached()
    return bank(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": path})


_CACHE: dict[str, Any] = {}


def _es_classes_cached() -> tuple[Any, Any]:
    if "es" not in _CACHE:
        _CACHE["es"] = _es_classes()
    return _CACHE["es"]  # type: ignore[no-any-return]


# append ---------------------------------------------------------------------------------


def es_append(path: str, aggregates: int, per_aggregate: int, per_save: int) -> float:
    return es_append_with(_es_app(path), aggregates, per_aggregate, per_save)


def es_append_with(app: Any, aggregates: int, per_aggregate: int, per_save: int) -> float:
    """The eventsourcing side of `append` on an application `app` (closed afterwards)."""
    account_cls, _ = _es_classes_cached()
    accounts = []
    t0 = perf_counter()
    for _ in range(aggregates):
        a = account_cls(owner="ann")
        for j in range(per_save - 1):
            a.deposit(j, MEMO)
        app.save(a)
        accounts.append(a)
    for _ in range(1, per_aggregate // per_save):
        for a in accounts:
            for j in range(per_save):
                a.deposit(j, MEMO)
            app.save(a)
    elapsed = perf_counter() - t0
    app.close()
    return aggregates * per_aggregate / elapsed


async def tidings_append(url: str, aggregates: int, per_aggregate: int, per_save: int,
                         concurrency: int) -> float:
    async with await tidings.connect(url, durability="full") as hub:
        repo = hub.repository(BenchAccount)
        accounts = [BenchAccount(f"acct-{i}") for i in range(aggregates)]
        gate = asyncio.Semaphore(concurrency)

        async def first(a: BenchAccount) -> None:
            async with gate:
                a.record(BenchOpened(owner="ann"))
                for j in range(per_save - 1):
                    a.deposit(j)
                await repo.save(a)

        async def more(a: BenchAccount) -> None:
            async with gate:
                for j in range(per_save):
                    a.deposit(j)
                await repo.save(a)

        t0 = perf_counter()
        if concurrency == 1:
            for a in accounts:
                await first(a)
            for _ in range(1, per_aggregate // per_save):
                for a in accounts:
                    await more(a)
        else:
            await asyncio.gather(*(first(a) for a in accounts))
            for _ in range(1, per_aggregate // per_save):
                await asyncio.gather(*(more(a) for a in accounts))
        elapsed = perf_counter() - t0
        assert await hub.events.last_position() == aggregates * per_aggregate
    return aggregates * per_aggregate / elapsed


def raw_append(path: str, aggregates: int, per_aggregate: int, per_save: int) -> float:
    """Raw `sqlite3` writing what a tidings save writes, one commit per save (the peer
    of "one save at a time").

    The same file settings (WAL, synchronous=FULL: an fsync per commit) and the same
    tables, indexes and triggers (tidings' own DDL); per save, in one transaction:
    the event rows (their headers JSON as tidings stores them), one message row per
    event (the outbox: the event's data again, with the headers a subscriber reads)
    and the log's position counter in `tidings_meta`. Every event's data is encoded
    in the loop, as the repository does. What it skips: reading anything, and the
    hand-over to a writer thread and back. It keeps each stream's version and both
    position counters in memory (one writer, nobody else on the file), where tidings
    reads the stream's version, whether the first event id is stored and the last
    event position in the transaction, because other processes may write the same
    file.
    """
    from tidings.engines.sqlite import SCHEMA as LOG_SCHEMA
    from tidings.engines.sqlite_store import SCHEMA as STORE_SCHEMA
    from tidings.messages import new_id

    enc = msgspec.json.Encoder().encode
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    for ddl in (*LOG_SCHEMA, *STORE_SCHEMA):
        conn.execute(ddl)
    topic = "BenchAccount"
    topic_id = conn.execute("INSERT INTO tidings_topics (name) VALUES (?)", (topic,)).lastrowid
    insert_event = ("INSERT INTO tidings_events (position, stream_id, version, id, type, "
                    "type_version, time, headers, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
    insert_message = ("INSERT INTO tidings_messages (position, topic_id, id, key, time, "
                      "headers, data) VALUES (?, ?, ?, ?, ?, ?, ?)")
    set_position = ("INSERT INTO tidings_meta (name, value) VALUES ('position', ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value")
    streams = [f"acct-{i}" for i in range(aggregates)]
    versions = dict.fromkeys(streams, 0)
    event_pos = message_pos = 0

    def save(stream: str, events: list[tuple[str, Any]]) -> None:
        nonlocal event_pos, message_pos
        now = round(time.time(), 6)
        version = versions[stream]
        ids = [new_id() for _ in events]
        own = enc({"aggregate-type": topic, "correlation-id": ids[0]})
        rows, messages = [], []
        for eid, (type_name, data) in zip(ids, events, strict=True):
            event_pos += 1
            message_pos += 1
            version += 1
            raw = enc(data)
            rows.append((event_pos, stream, version, eid, type_name, 1, now, own, raw))
            headers = {"aggregate-type": topic, "correlation-id": ids[0],
                       "content-type": "application/json", "event-type": type_name,
                       "event-version": "1", "stream-id": stream,
                       "stream-version": str(version), "event-position": str(event_pos)}
            messages.append((message_pos, topic_id, eid, stream, now, enc(headers), raw))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(insert_event, rows)
        conn.executemany(insert_message, messages)
        conn.execute(set_position, (message_pos,))
        conn.execute("COMMIT")
        versions[stream] = version

    t0 = perf_counter()
    for stream in streams:
        save(stream, [("BenchOpened", {"owner": "ann"})]
             + [("BenchDeposited", {"amount": j, "memo": MEMO}) for j in range(per_save - 1)])
    for _ in range(1, per_aggregate // per_save):
        for stream in streams:
            save(stream, [("BenchDeposited", {"amount": j, "memo": MEMO})
                          for j in range(per_save)])
    elapsed = perf_counter() - t0
    assert conn.execute("SELECT count(*) FROM tidings_messages").fetchone()[0] == (
        aggregates * per_aggregate)
    conn.close()
    return aggregates * per_aggregate / elapsed


# load -------------------------------------------------------------------------------


def _median_time(fn: Any, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = perf_counter()
        fn()
        samples.append(perf_counter() - t0)
    return summary(samples)


async def _amedian_time(fn: Any, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = perf_counter()
        await fn()
        samples.append(perf_counter() - t0)
    return summary(samples)


def es_load(path: str, events: int, snapshot_at: int | None, loads: int) -> float:
    account_cls, _ = _es_classes_cached()
    app = _es_app(path)
    a = account_cls(owner="ann")
    for j in range(events - 1):
        a.deposit(j, MEMO)
        if (j + 2) % 100 == 0 or (snapshot_at and j + 2 == snapshot_at):
            app.save(a)
            if snapshot_at and a.version == snapshot_at:
                app.take_snapshot(a.id, version=snapshot_at)
    app.save(a)
    got = app.repository.get(a.id)
    assert got.version == events and got.balance == a.balance
    seconds = _median_time(lambda: app.repository.get(a.id), loads)
    app.close()
    return seconds


async def tidings_load(url: str, events: int, snapshot_at: int | None, loads: int) -> float:
    async with await tidings.connect(url, durability="full") as hub:
        repo = hub.repository(BenchAccount)
        a = BenchAccount("acct-load")
        a.record(BenchOpened(owner="ann"))
        for j in range(events - 1):
            a.deposit(j)
            if a.version % 100 == 0 or a.version == snapshot_at:
                await repo.save(a)
                if a.version == snapshot_at:
                    await repo.snapshot(a)
        await repo.save(a)
        got = await repo.get(a.id)
        assert got.version == events and got.balance == a.balance

        async def cold() -> BenchAccount:
            # from the store, as the peer loads: not from what this process just saved
            hub.events.drop_cached()
            return await repo.get(a.id)

        return await _amedian_time(cold, loads)


# scan ------------------------------------------------------------------------------


def raw_scan(path: str) -> tuple[int, float]:
    conn = sqlite3.connect(path)
    try:
        t0 = perf_counter()
        n = 0
        for _ in conn.execute("SELECT position, stream_id, version, id, type, type_version, "
                              "time, headers, data FROM tidings_events ORDER BY position"):
            n += 1
        return n, perf_counter() - t0
    finally:
        conn.close()


async def tidings_scan(url: str) -> tuple[int, float]:
    async with await tidings.connect(url) as hub:
        t0 = perf_counter()
        n = 0
        async for _ in hub.events.read_all(raw=True, page=5000):
            n += 1
        return n, perf_counter() - t0


# the run ---------------------------------------------------------------------------





async def run(quick: bool) -> list[dict[str, Any]]:
    aggregates, per_aggregate, per_save = (50, 20, 10) if quick else (1000, 100, 10)
    load_events, loads, reps = (200, 5, 1) if quick else (1000, 40, 3)
    snapshot_at = load_events - 10
    total = aggregates * per_aggregate
    rows: list[dict[str, Any]] = []

    es_rates, td_rates, td_seq_rates, raw_seq_rates = [], [], [], []
    scans_td, scans_raw = [], []
    for rep in range(reps):
        progress(f"eventstore: append {total:,} events, repetition {rep + 1}/{reps}")
        with scratch_dir("es-append") as d:
            es_rates.append(es_append(os.path.join(d, "es.db"), aggregates, per_aggregate,
                                      per_save))
        with scratch_dir("td-append") as d:
            url = f"sqlite:///{d}/t.db"
            td_rates.append(await tidings_append(url, aggregates, per_aggregate, per_save, 100))
            # the scans read the table just written (warm page cache on both sides),
            # alternating so that drift on the machine hits both alike
            for _ in range(3):
                n1, t_raw = raw_scan(f"{d}/t.db")
                n2, t_td = await tidings_scan(url)
                assert n1 == n2 == total
                scans_raw.append(n1 / t_raw)
                scans_td.append(n2 / t_td)
        with scratch_dir("raw-append-seq") as d:
            raw_seq_rates.append(raw_append(os.path.join(d, "r.db"), aggregates,
                                            per_aggregate, per_save))
        with scratch_dir("td-append-seq") as d:
            td_seq_rates.append(await tidings_append(f"sqlite:///{d}/t.db", aggregates,
                                                     per_aggregate, per_save, 1))
    es_rate, td_rate = summary(es_rates), summary(td_rates)
    rows.append(row(f"append via repository, {aggregates:,} aggregates (sqlite, full)",
                    td_rate, "eventsourcing Application.save", es_rate, "events/s", 3.0,
                    ratio=paired_ratio(td_rates, es_rates),
                    note="tidings: 100 saves in flight, group commit", samples=td_rates,
                    peer_samples=es_rates))
    rows.append(row("append via repository, one save at a time (sqlite, full)",
                    summary(td_seq_rates), "raw sqlite3, same rows, a commit per save",
                    summary(raw_seq_rates), "events/s", 0.6,
                    ratio=paired_ratio(td_seq_rates, raw_seq_rates),
                    note="tidings: each save awaited before the next; eventsourcing "
                         f"Application.save: {es_rate:,.0f} events/s",
                    samples=td_seq_rates, peer_samples=raw_seq_rates))

    progress(f"eventstore: load an aggregate of {load_events:,} events")
    es_full, td_full, es_snap, td_snap = [], [], [], []
    for _ in range(reps):
        with scratch_dir("es-load") as d:
            es_full.append(es_load(os.path.join(d, "es.db"), load_events, None, loads))
        with scratch_dir("td-load") as d:
            td_full.append(await tidings_load(f"sqlite:///{d}/t.db", load_events, None, loads))
        with scratch_dir("es-snap") as d:
            es_snap.append(es_load(os.path.join(d, "es.db"), load_events, snapshot_at, loads))
        with scratch_dir("td-snap") as d:
            td_snap.append(await tidings_load(f"sqlite:///{d}/t.db", load_events, snapshot_at,
                                              loads))
    es_f, td_f, es_s, td_s = map(summary, (es_full, td_full, es_snap, td_snap))
    rows.append(row(f"load aggregate of {load_events:,} events", 1 / td_f,
                    "eventsourcing repository.get", 1 / es_f, "loads/s", 5.0,
                    ms=td_f * 1e3, peer_ms=es_f * 1e3))
    rows.append(row(f"load with snapshot at {snapshot_at} vs without", 1 / td_s,
                    "tidings without snapshot", 1 / td_f, "loads/s", 10.0, ms=td_s * 1e3))
    rows.append(row(f"load with snapshot at {snapshot_at}", 1 / td_s,
                    "eventsourcing snapshot load", 1 / es_s, "loads/s", 1.0,
                    ms=td_s * 1e3, peer_ms=es_s * 1e3))
    rows.append(row("read_all scan (raw)", summary(scans_td), "sqlite3 SELECT same table",
                    summary(scans_raw), "rows/s", 0.5, ratio=paired_ratio(scans_td, scans_raw),
                    samples=scans_td, peer_samples=scans_raw))
    return rows


if __name__ == "__main__":
    for r in asyncio.run(run(quick=bool(os.environ.get("QUICK")))):
        print(r)
