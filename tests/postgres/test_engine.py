"""What only the PostgreSQL engine has: migrations, schemas, `transact`, errors, positions."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from tests.pg_plugin import needs

import tidings
from tidings import topics
from tidings.engines.postgres import PgTx, PostgresEngine
from tidings.engines.postgres_sql import Migration, pattern_regex
from tidings.messages import OutMessage

asyncpg = needs("asyncpg")
pytestmark = [pytest.mark.service]


def base(url: str) -> str:
    return url.split("?", 1)[0]


def schema_of(url: str) -> str:
    return url.rsplit("schema=", 1)[1]


async def test_a_schema_made_by_an_earlier_version_gets_the_new_claim_functions(
        postgres_url: str) -> None:
    """A schema at log migration 2 (before the claims' lookups by position): opening it
    replaces both claiming functions, and they claim as before."""
    from tidings.engines.postgres_sql import LOG_MIGRATIONS, apply_migrations

    schema = schema_of(postgres_url)
    conn = await asyncpg.connect(base(postgres_url))
    try:
        async with conn.transaction():
            assert await apply_migrations(conn, f'"{schema}"', "log",
                                          [m for m in LOG_MIGRATIONS if m.version <= 2]) == 2
        async with await tidings.connect(postgres_url) as hub:
            for key in ("k1", "k2", "k1"):
                await hub.publish("mig.a", key, key=key)
            sub = await hub.subscribe("mig.>", group="g", ordered=True)
            got = await sub.fetch(10, wait=2.0)
            assert [m.decode() for m in got] == ["k1", "k2"]  # the second k1 waits its turn
            for m in got:
                await m.ack(wait=True)
            assert [m.decode() for m in await sub.fetch(10, wait=2.0)] == ["k1"]
        rows = await conn.fetch(
            f'SELECT version FROM "{schema}".tidings_migrations WHERE component = $1 '
            "ORDER BY version", "log")
        assert [r[0] for r in rows] == [m.version for m in LOG_MIGRATIONS]
        config = await conn.fetch(
            "SELECT proname, proconfig FROM pg_proc WHERE pronamespace = $1::regnamespace "
            "AND proname IN ('tidings_fetch', 'tidings_claim') ORDER BY proname", schema)
        assert [(r[0], r[1]) for r in config] == [
            ("tidings_claim", ["enable_bitmapscan=off"]),
            ("tidings_fetch", ["enable_bitmapscan=off"])]
    finally:
        await conn.close()


async def test_migrations_are_recorded_and_run_once(postgres_url: str) -> None:
    async with await tidings.connect(postgres_url) as hub:
        engine = hub.engine
        assert isinstance(engine, PostgresEngine)
        assert await engine.migrate() == 0  # already applied on open
    async with await tidings.connect(postgres_url) as hub:  # a second open changes nothing
        await hub.publish("a.b", "x")
    conn = await asyncpg.connect(base(postgres_url))
    try:
        rows = await conn.fetch(
            f'SELECT component, version FROM "{schema_of(postgres_url)}".tidings_migrations')
    finally:
        await conn.close()
    from tidings.engines.postgres_sql import LOG_MIGRATIONS
    from tidings.engines.postgres_store import EVENTSTORE_MIGRATIONS

    assert sorted(tuple(r) for r in rows) == sorted(  # the event store's too, on open
        [("log", m.version) for m in LOG_MIGRATIONS]
        + [("eventstore", m.version) for m in EVENTSTORE_MIGRATIONS])


async def test_concurrent_first_opens_migrate_once(postgres_url: str) -> None:
    hubs = await asyncio.gather(*(tidings.connect(postgres_url) for _ in range(5)))
    try:
        await hubs[0].publish("a.b", "x")
        assert [m.data for m in await _read(hubs[4], "a.b")] == [b"x"]
    finally:
        for h in hubs:
            await h.close()


async def test_tables_live_in_the_chosen_schema(postgres_url: str) -> None:
    async with await tidings.connect(postgres_url) as hub:
        await hub.publish("a.b", "x")
    conn = await asyncpg.connect(base(postgres_url))
    try:
        schema = schema_of(postgres_url)
        assert await conn.fetchval("SELECT to_regclass($1)", f"{schema}.tidings_messages")
        assert await conn.fetchval("SELECT to_regclass('public.tidings_messages')") is None
    finally:
        await conn.close()


async def test_migrate_false_needs_a_migrated_schema(postgres_url: str) -> None:
    with pytest.raises(tidings.EngineUnavailable, match="tidings migrate"):
        await tidings.connect(postgres_url + "&migrate=false")
    async with await tidings.connect(postgres_url):
        pass
    async with await tidings.connect(postgres_url + "&migrate=false") as hub:
        await hub.publish("a.b", "x")


class MgNoted(tidings.Event):
    n: int


async def test_migrate_false_creates_no_event_store_tables(postgres_url: str) -> None:
    """With migrate=false nothing creates tables on first use either: the event store
    says to run `tidings migrate` and stores nothing; after a migrate it works."""
    conn = await asyncpg.connect(base(postgres_url))
    try:
        from tidings.engines.postgres import LOG_MIGRATIONS
        from tidings.engines.postgres_sql import apply_migrations

        schema = schema_of(postgres_url)
        async with conn.transaction():  # the log's tables only, as an older version made
            await apply_migrations(conn, f'"{schema}"', "log", LOG_MIGRATIONS)
        async with await tidings.connect(postgres_url + "&migrate=false") as hub:
            with pytest.raises(tidings.EngineUnavailable, match="tidings migrate"):
                await hub.events.append("m-1", [MgNoted(n=1)])
            assert await conn.fetchval("SELECT to_regclass($1)",
                                       f"{schema}.tidings_events") is None
            assert await hub.engine.migrate() >= 1  # what `tidings migrate` runs
        async with await tidings.connect(postgres_url + "&migrate=false") as hub:
            out = await hub.events.append("m-1", [MgNoted(n=1)])
            assert out.version == 1
    finally:
        await conn.close()


@pytest.mark.parametrize("query, error", [
    ("schema=1abc", tidings.InvalidArgument), ("schema=a;drop", tidings.InvalidArgument),
    ("durability=sometimes", tidings.InvalidArgument), ("pool_max=0", tidings.InvalidArgument),
])
async def test_bad_options_are_rejected(postgres_url: str, query: str,
                                        error: type[Exception]) -> None:
    with pytest.raises(error):
        await tidings.connect(f"{base(postgres_url)}?{query}")


async def test_durability_normal_publishes_and_reads_back(postgres_url: str) -> None:
    async with await tidings.connect(postgres_url + "&durability=normal") as hub:
        await hub.publish("a.b", "x")
        await hub.publish_many("a.b", ["y"] * 600)  # the COPY path too
        assert len(await _read(hub, "a.b")) == 601


async def test_unknown_option_is_rejected(postgres_url: str) -> None:
    with pytest.raises(tidings.InvalidArgument, match="poll_interval"):
        await tidings.connect(postgres_url, poll_interval=1.0)


async def test_unreachable_server_says_what_to_do() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(tidings.EngineUnavailable, match="check that PostgreSQL is running"):
        await tidings.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")


async def test_missing_database_says_what_to_do(postgres_url: str) -> None:
    url = base(postgres_url).rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(tidings.EngineUnavailable, match="does not exist"):
        await tidings.connect(url)


async def test_transact_commits_own_writes_with_messages(postgres_url: str) -> None:
    async with await tidings.connect(postgres_url) as hub:
        engine = hub.engine
        assert isinstance(engine, PostgresEngine)
        await engine.apply_migrations("test", [Migration(1, "orders", [
            "CREATE TABLE {s}.orders (id text PRIMARY KEY)"])])

        async def ok(tx: PgTx) -> list[tidings.Published]:
            await tx.conn.execute(f"INSERT INTO {tx.table('orders')} VALUES ('o-1')")
            return await tx.append([OutMessage("m-1", "orders.created", "o-1", b"{}", None)])

        (published,) = await engine.transact(ok)

        async def fails(tx: PgTx) -> None:
            await tx.conn.execute(f"INSERT INTO {tx.table('orders')} VALUES ('o-2')")
            await tx.append([OutMessage("m-2", "orders.created", "o-2", b"{}", None)])
            raise RuntimeError("business rule")

        with pytest.raises(RuntimeError):
            await engine.transact(fails)
        assert [m.id for m in await _read(hub, "orders.>")] == ["m-1"]
        assert published.position == (await _read(hub, "orders.>"))[0].position
        async with engine.conns.pool.acquire() as conn:
            assert await conn.fetchval(f"SELECT array_agg(id) FROM {engine.sql.schema}.orders"
                                       ) == ["o-1"]


async def test_immutable_tables_refuse_changes(postgres_url: str) -> None:
    async with await tidings.connect(postgres_url) as hub:
        engine = hub.engine
        assert isinstance(engine, PostgresEngine)
        await engine.apply_migrations("test", [Migration(1, "ledger", [
            "CREATE TABLE {s}.ledger (n int)",
            "CREATE TRIGGER ledger_immutable BEFORE UPDATE OR DELETE ON {s}.ledger "
            "FOR EACH ROW EXECUTE FUNCTION {s}.tidings_refuse_change()",
        ])])
        async with engine.conns.pool.acquire() as conn:
            await conn.execute(f"INSERT INTO {engine.sql.schema}.ledger VALUES (1)")
            with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="immutable"):
                await conn.execute(f"UPDATE {engine.sql.schema}.ledger SET n = 2")
            with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="immutable"):
                await conn.execute(f"DELETE FROM {engine.sql.schema}.ledger")


async def test_positions_are_never_filled_in_late(postgres_url: str) -> None:
    """Many connections publish at once while a follower tails the log: it misses nothing."""
    writers = [await tidings.connect(postgres_url) for _ in range(6)]
    seen: list[int] = []
    try:
        async with await tidings.connect(postgres_url) as reader:
            total = 6 * 150

            async def follow() -> None:
                async for m in reader.read("late.>", follow=True, page=7):
                    seen.append(m.position)
                    if len(seen) == total:
                        return

            async def write(h: tidings.Hub, k: int) -> None:
                for i in range(150):
                    if i % 3:
                        await h.publish(f"late.w{k}", i)
                    else:  # a client id takes the longer path (the log lock, then dedup)
                        await h.publish(f"late.w{k}", i, id=f"{k}-{i}")

            await asyncio.wait_for(asyncio.gather(follow(), *(
                write(h, k) for k, h in enumerate(writers))), 60)
            stored = [m.position for m in await _read(reader, "late.>")]
    finally:
        for h in writers:
            await h.close()
    assert seen == sorted(seen)
    assert seen == stored  # a position filled in late would be missing from `seen`


async def test_pattern_regex_matches_like_topics_matches(postgres_url: str) -> None:
    patterns = ["a", "a.b", "a.*", "a.>", "*", ">", "*.b", "a.*.c", "$dlq.>", "$dlq.*",
                "*.*", "a-b.c_d", "x$.>"]
    names = ["a", "a.b", "a.b.c", "b", "a.c", "$dlq.g", "$dlq.g.h", "x.b", "a-b.c_d",
             "a.x.c", "x$.y", "ab", "a.bb"]
    conn = await asyncpg.connect(base(postgres_url))
    try:
        rows = await conn.fetch(
            "SELECT p, t, t ~ r FROM unnest($1::text[], $2::text[]) AS x(p, r), "
            "unnest($3::text[]) AS t",
            patterns, [pattern_regex(p) for p in patterns], names)
    finally:
        await conn.close()
    assert [(p, t) for p, t, ok in rows if ok != topics.matches(p, t)] == []


async def _read(hub: tidings.Hub, pattern: str, **kw: Any) -> list[tidings.Message]:
    return [m async for m in hub.read(pattern, **kw)]


async def test_bad_data_in_one_grouped_commit_fails_it_alone(postgres_url: str) -> None:
    """Commits grouped into one transaction: a batch whose data the database refuses (a
    NUL byte in an event id) fails alone with InvalidEvent; its neighbours are stored."""
    from tidings.engines.store_base import NewRecord
    from tidings.messages import new_id

    async with await tidings.connect(postgres_url) as hub:
        b = hub.events.backend

        def batch(i: int, eid: str | None = None) -> Any:
            return b.append_batch([(f"nul-{i}", [NewRecord(eid or new_id(), "MgNoted", 1,
                                                           b'{"n": 1}', {})], 0, "nul")])

        out = await asyncio.gather(*(batch(i, "bad\x00id" if i == 3 else None)
                                     for i in range(8)), return_exceptions=True)
        assert isinstance(out[3], tidings.InvalidEvent), out[3]
        assert all(isinstance(o, list) for i, o in enumerate(out) if i != 3), out
        assert [await b.stream_version(f"nul-{i}") for i in range(8)] == [
            0 if i == 3 else 1 for i in range(8)]
        with pytest.raises(tidings.InvalidEvent):  # alone, too: the caller's data, not a 503
            await batch(99, "solo\x00id")
        appends = [b.append(f"nul-a{i}", [NewRecord("bad\x00" if i == 2 else new_id(),
                                                     "MgNoted", 1, b'{"n": 1}', {})],
                            0, "nul") for i in range(5)]
        out = await asyncio.gather(*appends, return_exceptions=True)
        assert isinstance(out[2], tidings.InvalidEvent), out[2]
        assert [type(o).__name__ for i, o in enumerate(out) if i != 2] == ["AppendOutcome"] * 4


async def test_reads_and_acks_asked_together_share_a_statement(postgres_url: str) -> None:
    """Log reads (and acks of several subscriptions) asked for while one is under way go
    out as one statement; each read still gets exactly its own pattern's messages."""
    async with await tidings.connect(postgres_url) as hub:
        for i in range(30):
            await hub.publish(["rt.a", "rt.b.x", "rt.b.y", "other"][i % 4], i)
        engine = hub.engine
        asks = [(p, after, stop, limit) for p in ("rt.a", "rt.>", "rt.b.*", "*", "nothing")
                for after, stop, limit in [(0, None, 100), (5, 20, 100), (0, None, 3)]]
        alone = [await engine.read(*a) for a in asks]
        together = await asyncio.gather(*(engine.read(*a) for a in asks))
        assert [[(m.position, m.topic, m.data) for m in r] for r in together] == [
            [(m.position, m.topic, m.data) for m in r] for r in alone]
        assert [m.topic for m in alone[0]] == ["rt.a"] * 8
        assert len(alone[2]) == 3 and alone[-1] == []
        subs = [await hub.subscribe(p, group=f"rt-{i}", start="beginning")
                for i, p in enumerate(("rt.a", "rt.>"))]
        got = [await s.fetch(100, wait=1.0) for s in subs]
        await asyncio.gather(*(m.ack(wait=True) for batch in got for m in batch))
        infos = {i.pattern: i for i in await engine.subscriptions()}
        assert infos["rt.a"].pending == 0 and infos["rt.>"].pending == 0
        assert len(got[0]) == 8 and len(got[1]) == 23
