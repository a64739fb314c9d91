"""What only the PostgreSQL event store shows: many connections, migrations, shared order."""

from __future__ import annotations

import asyncio

import pytest
from tests.pg_plugin import needs

import tidings
from tidings.engines.postgres import PostgresEngine
from tidings.engines.postgres_store import PostgresStore
from tidings.eventsourcing import Appended

asyncpg = needs("asyncpg")
pytestmark = [pytest.mark.service]


class PgStoreEv(tidings.Event):
    n: int


def base(url: str) -> str:
    return url.split("?", 1)[0]


def schema_of(url: str) -> str:
    return url.rsplit("schema=", 1)[1]


async def test_store_migrations_are_recorded_once(postgres_url: str) -> None:
    for _ in range(2):
        async with await tidings.connect(postgres_url) as hub:
            assert isinstance(hub.engine, PostgresEngine)
            assert isinstance(hub.events.backend, PostgresStore)
            await hub.events.append("m-1", [PgStoreEv(n=1)])
    conn = await asyncpg.connect(base(postgres_url))
    try:
        rows = await conn.fetch(f'SELECT component, version FROM "{schema_of(postgres_url)}"'
                                ".tidings_migrations ORDER BY component")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("eventstore", 1), ("eventstore", 2), ("log", 1),
                                              ("log", 2), ("log", 3)]


async def test_competing_writers_on_one_stream_never_both_win(postgres_url: str) -> None:
    """Hubs race to append the next version of one stream: each version is won once."""
    hubs = [await tidings.connect(postgres_url) for _ in range(4)]
    wins: list[int] = []
    try:
        async def writer(h: tidings.Hub, k: int) -> None:
            while len(wins) < 40:
                v = await h.events.stream_version("race-1")
                try:
                    await h.events.append("race-1", [PgStoreEv(n=k)], expected_version=v)
                except tidings.ConcurrencyError:
                    continue
                wins.append(v + 1)

        await asyncio.wait_for(asyncio.gather(*(writer(h, k) for k, h in enumerate(hubs))), 60)
        recs = [r async for r in hubs[0].events.read("race-1")]
    finally:
        for h in hubs:
            await h.close()
    assert sorted(wins) == list(range(1, len(wins) + 1))
    assert [r.version for r in recs] == list(range(1, len(wins) + 1))


async def test_positions_are_never_filled_in_late(postgres_url: str) -> None:
    """Connections append to many streams (and publish) at once; a follower misses nothing."""
    writers = [await tidings.connect(postgres_url) for _ in range(5)]
    total = 5 * 40
    seen: list[int] = []
    try:
        async with await tidings.connect(postgres_url) as reader:
            sub = reader.events.subscribe_all(page=7)

            async def follow() -> None:
                async for rec in sub:
                    seen.append(rec.position)
                    if len(seen) == total:
                        return

            async def write(h: tidings.Hub, k: int) -> None:
                for i in range(40):
                    await h.events.append(f"late-{k}-{i % 3}", [PgStoreEv(n=i)])
                    if i % 5 == 0:
                        await h.publish("noise.x", i)  # the log's own appends, interleaved

            await asyncio.wait_for(asyncio.gather(follow(), *(
                write(h, k) for k, h in enumerate(writers))), 60)
            await sub.close()
            stored = [r.position async for r in reader.events.read_all(raw=True)]
            # each event's message is in the log, and the log has them in the same order
            published = [int(m.headers["event-position"]) async for m in reader.read("late")]
    finally:
        for h in writers:
            await h.close()
    assert published == seen
    assert seen == list(range(1, total + 1))
    assert stored == seen


async def test_group_commit_fails_only_the_offending_appends(postgres_url: str) -> None:
    """Concurrent appends share one commit; a conflict or a reused id fails alone."""
    async with await tidings.connect(postgres_url) as hub:
        store = hub.events
        await store.append("g-taken", [tidings.NewEvent(PgStoreEv(n=0), id="taken-id")])
        jobs = [store.append(f"g-{i}", [PgStoreEv(n=i)], expected_version=0) for i in range(30)]
        jobs.append(store.append("g-0", [PgStoreEv(n=99)], expected_version=0))  # conflict
        jobs.append(store.append("g-other", [tidings.NewEvent(PgStoreEv(n=1), id="taken-id")]))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        assert all(isinstance(r, Appended) for r in results[1:30]), results
        # exactly one of the two appends to g-0 at version 0 won
        assert sorted(type(r).__name__ for r in (results[0], results[30])) == [
            "Appended", "ConcurrencyError"]
        assert isinstance(results[31], tidings.EventIdConflict)
        assert [r.event.n async for r in store.read("g-5")] == [5]
        assert [r async for r in store.read("g-other")] == []
        positions = [r.position async for r in store.read_all()]
        assert positions == sorted(positions) and len(positions) == len(set(positions)) == 31


async def test_reads_and_loads_asked_together_share_a_statement_and_answer_each(
        postgres_url: str) -> None:
    """Stream reads and loads asked for while one is under way go out as one statement
    (`_Batched`); each caller still gets exactly its own stream's answer: versions,
    bounds, limits, snapshots, a time cut, a stream that does not exist."""
    from tidings.engines.store_base import NewRecord, SnapshotRow

    async with await tidings.connect(postgres_url) as hub:
        b = hub.events.backend
        assert isinstance(b, PostgresStore)
        for i in range(6):
            recs = [NewRecord(f"bt-{i}-{k}", "Ev", 1, b'{"k": %d}' % k, {}) for k in range(i + 3)]
            await b.append_batch([(f"bt-{i}", recs, 0, "bt")])
            if i % 2:
                await b.save_snapshot(f"bt-{i}", SnapshotRow(2, "s1", 1.0, b"snap"))
        cut = (await b.read_stream("bt-3", 1, 1, 1))[0][6]  # the time of bt-3's events
        reads = [(f"bt-{i}", lo, hi, lim) for i in range(6) for lo, hi, lim in
                 [(1, None, 100), (2, 4, 100), (1, None, 2), (5, None, 10)]]
        reads.append(("bt-none", 1, None, 10))
        loads = [(f"bt-{i}", schema, to, None) for i in range(6)
                 for schema in (None, "s1", "other") for to in (None, 1, 3)]
        loads += [("bt-3", None, None, cut - 1.0), ("bt-5", None, None, cut + 3600.0),
                  ("bt-none", "s1", None, None)]

        one_by_one_reads = [await b.read_stream(*r) for r in reads]
        one_by_one_loads = [await b.load(*x) for x in loads]
        together = await asyncio.gather(*(b.read_stream(*r) for r in reads),
                                        *(b.load(*x) for x in loads))
        assert list(together[:len(reads)]) == one_by_one_reads
        assert list(together[len(reads):]) == one_by_one_loads
        assert [r[2] for r in one_by_one_reads[1]] == [2, 3]  # bt-0, versions 2..4 of 3
        odd = one_by_one_loads[3 * 3 + 3]  # bt-1, schema s1, to the end
        assert odd.snapshot is not None and odd.snapshot.version == 2
        assert [r[0] for r in odd.rows] == [3, 4]
        assert one_by_one_loads[-3].target == 0  # a time before bt-3's first event
        assert one_by_one_loads[-2].target == 8  # a time after all of bt-5
        assert one_by_one_loads[-1].current == 0 and one_by_one_reads[-1] == []
