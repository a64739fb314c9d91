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
                                              ("log", 2)]


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
