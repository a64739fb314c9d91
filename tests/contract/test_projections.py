"""Projections: global order, atomic checkpoints, resume, rebuild, visible failure."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest

import tidings
from tidings import NewEvent, RecordedEvent
from tidings.engines.postgres_store import PostgresTx

#: Event streams: every engine that holds them (nats:// carries messages only).
pytestmark = pytest.mark.events

GUARD = 10.0




class PjAdded(tidings.Event):
    item: str
    qty: int = 1


class PjRemoved(tidings.Event):
    item: str


async def put(tx: Any, key: str, value: int) -> None:
    """Write one read-model row through the projection's transaction (any engine)."""
    if isinstance(tx, PostgresTx):  # the same transaction as the checkpoint
        rm = tx.table("rm")
        await tx.execute(f"CREATE TABLE IF NOT EXISTS {rm} (k text PRIMARY KEY, v bigint)")
        await tx.execute(f"INSERT INTO {rm} (k, v) VALUES ($1, $2) "
                         "ON CONFLICT (k) DO UPDATE SET v = excluded.v", key, value)
    elif hasattr(tx, "execute"):  # SQLite: the same transaction as the checkpoint
        tx.execute("CREATE TABLE IF NOT EXISTS rm (k TEXT PRIMARY KEY, v INTEGER)")
        tx.execute("INSERT OR REPLACE INTO rm (k, v) VALUES (?, ?)", (key, value))
    else:
        tx.state[key] = value


async def read_model(hub: tidings.Hub, name: str) -> dict[str, int]:
    if hub.url.startswith("postgres"):
        async def q(tx: Any) -> dict[str, int]:
            rm = tx.table("rm")
            if await tx.conn.fetchval("SELECT to_regclass($1)", rm) is None:
                return {}
            return {r[0]: r[1] for r in await tx.conn.fetch(f"SELECT k, v FROM {rm}")}

        db = getattr(hub.engine, "db", hub.engine)  # (with a broker: its database)
        return await db.transact(q)  # type: ignore[no-any-return]
    if hub.url.startswith("sqlite"):
        conn = sqlite3.connect(hub.url.split("///", 1)[1].split("?")[0])
        try:
            return dict(conn.execute("SELECT k, v FROM rm").fetchall())
        except sqlite3.OperationalError:
            return {}
        finally:
            conn.close()
    tables = hub.events.backend._tables  # type: ignore[attr-defined]
    return dict(tables.read_models.get(name, {}))


async def until(check: Any, what: str) -> None:
    async def loop() -> None:
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(loop(), GUARD)
    except TimeoutError:
        pytest.fail(f"{what} did not happen")


async def test_handlers_get_events_in_global_order(hub: tidings.Hub) -> None:
    everything: list[int] = []
    typed: list[Any] = []

    @hub.projection("all")
    async def on_all(rec: RecordedEvent, tx: Any) -> None:
        assert tx.record is rec
        everything.append(rec.position)

    @hub.projection("adds")
    def on_add(event: PjAdded, tx: Any) -> None:  # annotated: only these, typed
        typed.append(event)

    for i in range(12):
        await hub.events.append(f"cart-{i % 3}",
                                [PjAdded(item=f"i{i}") if i % 2 else PjRemoved(item=f"i{i}")])
    out = await hub.projections.catch_up()
    assert everything == list(range(1, 13))
    assert typed == [PjAdded(item=f"i{i}") for i in range(1, 12, 2)]
    assert [(s.name, s.status, s.position, s.lag) for s in out] == [
        ("adds", "running", 12, 0), ("all", "running", 12, 0)]
    await hub.projections.catch_up("all")  # nothing new: nothing again
    assert everything == list(range(1, 13))


async def test_checkpoint_and_read_model_commit_together(hub: tidings.Hub) -> None:
    @hub.projection("stock", batch=4)
    async def stock(rec: RecordedEvent, tx: Any) -> None:
        ev = rec.event
        if isinstance(ev, PjAdded):
            if ev.item == "boom":
                await put(tx, "half-written", 1)  # undone with the failing event
                raise RuntimeError("cannot stock boom")
            await put(tx, ev.item, ev.qty)

    for i in range(6):
        await hub.events.append("s-1", [PjAdded(item=f"x{i}", qty=i)])
    await hub.events.append("s-1", [PjAdded(item="boom")])
    await hub.events.append("s-1", [PjAdded(item="after", qty=9)])
    (st,) = await hub.projections.catch_up("stock")
    assert (st.status, st.position, st.failed_position) == ("failed", 6, 7)
    assert st.error == "RuntimeError: cannot stock boom"
    assert st.lag == 2
    model = await read_model(hub, "stock")
    assert "after" not in model  # stopped at the failure: nothing after it
    assert {k: model[k] for k in model if k.startswith("x")} == {f"x{i}": i for i in range(6)}
    if hub.url.startswith(("sqlite", "postgres")):
        assert "half-written" not in model
    # stays stopped (visible) until retried
    await hub.events.append("s-1", [PjAdded(item="later", qty=1)])
    (st,) = await hub.projections.catch_up("stock")
    assert st.status == "failed" and st.position == 6
    assert (await hub.projections.status("stock")).status == "failed"


async def test_retry_resumes_at_the_failed_event(hub: tidings.Hub) -> None:
    broken = True
    seen: list[int] = []

    @hub.projection("fragile")
    async def fragile(rec: RecordedEvent, tx: Any) -> None:
        if broken and rec.version == 3:
            raise ValueError("bug")
        seen.append(rec.version)

    await hub.events.append("f-1", [PjAdded(item=str(i)) for i in range(5)])
    (st,) = await hub.projections.catch_up()
    assert st.status == "failed" and seen == [1, 2]
    broken = False
    st = await hub.projections.retry("fragile")
    assert st.status == "running" and st.error is None
    (st,) = await hub.projections.catch_up()
    assert st.status == "running" and seen == [1, 2, 3, 4, 5]


async def test_unknown_event_type_stops_the_projection_visibly(hub: tidings.Hub) -> None:
    @hub.projection("strict")
    async def strict(rec: RecordedEvent, tx: Any) -> None:
        rec.event  # noqa: B018

    await hub.events.append("q-1", [PjAdded(item="a"), NewEvent(type="PjMystery", data={})])
    (st,) = await hub.projections.catch_up()
    assert st.status == "failed" and st.failed_position == 2
    assert st.error is not None and "UnknownEventType" in st.error and "PjMystery" in st.error


@pytest.mark.durable
async def test_projection_resumes_after_restart(engine_url: str) -> None:
    seen: list[int] = []

    def register(hub: tidings.Hub) -> None:
        @hub.projection("counter")
        async def counter(rec: RecordedEvent, tx: Any) -> None:
            seen.append(rec.position)
            await put(tx, "count", rec.position)

    async with await tidings.connect(engine_url) as h1:
        register(h1)
        await h1.events.append("r-1", [PjAdded(item=str(i)) for i in range(5)])
        await h1.projections.catch_up()
    async with await tidings.connect(engine_url) as h2:
        await h2.events.append("r-1", [PjAdded(item="x"), PjAdded(item="y")])
        register(h2)
        (st,) = await h2.projections.catch_up()
        assert st.position == 7
        assert await read_model(h2, "counter") == {"count": 7}
    assert seen == [1, 2, 3, 4, 5, 6, 7]  # each event once, across the restart


async def test_rebuild_from_zero(hub: tidings.Hub) -> None:
    seen: list[int] = []
    resets = 0

    async def reset(tx: Any) -> None:
        nonlocal resets
        resets += 1
        if isinstance(tx, PostgresTx):
            await tx.execute(f"DELETE FROM {tx.table('rm')}")
        elif hasattr(tx, "execute"):
            tx.execute("DELETE FROM rm")
        else:
            tx.state.clear()

    @hub.projection("totals", reset=reset, batch=3)
    async def totals(ev: PjAdded, tx: Any) -> None:
        seen.append(ev.qty)
        await put(tx, ev.item, ev.qty)

    await hub.events.append("t-1", [PjAdded(item=f"k{i}", qty=i) for i in range(10)])
    await hub.projections.catch_up()
    progress: list[tuple[int, int]] = []
    st = await hub.projections.rebuild("totals", progress=lambda p, h: progress.append((p, h)))
    assert resets == 1
    assert seen == list(range(10)) * 2
    assert st.position == 10 and st.status == "running"
    assert progress[-1] == (10, 10) and len(progress) >= 3
    assert await read_model(hub, "totals") == {f"k{i}": i for i in range(10)}
    with pytest.raises(tidings.NotFound):
        await hub.projections.rebuild("nope")


async def test_run_projections_follows_live(hub: tidings.Hub) -> None:
    seen: list[int] = []

    @hub.projection("live")
    async def live(rec: RecordedEvent, tx: Any) -> None:
        seen.append(rec.position)

    await hub.events.append("l-1", [PjAdded(item="a")])
    runner = asyncio.create_task(hub.run_projections())

    async def got(n: int) -> bool:
        return len(seen) >= n

    await until(lambda: got(1), "catch-up")
    for i in range(5):
        await hub.events.append("l-1", [PjAdded(item=str(i))])
    await until(lambda: got(6), "live events")
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert seen == [1, 2, 3, 4, 5, 6]


async def test_messages_published_through_tx_commit_with_the_checkpoint(
        hub: tidings.Hub) -> None:
    @hub.projection("notifier")
    async def notifier(ev: PjAdded, tx: Any) -> None:
        if ev.item == "bad":
            tx.publish("notify.added", {"item": ev.item})
            raise RuntimeError("no")
        tx.publish("notify.added", {"item": ev.item}, key=ev.item)

    await hub.events.append("n-1", [PjAdded(item="a"), PjAdded(item="b"), PjAdded(item="bad")])
    (st,) = await hub.projections.catch_up()
    assert st.status == "failed"
    msgs = [m.decode() async for m in hub.read("notify.added")]
    assert msgs == [{"item": "a"}, {"item": "b"}]


async def test_writing_through_the_store_inside_a_handler_is_refused(engine_url: str) -> None:
    async with await tidings.connect(engine_url) as hub:
        @hub.projection("loop")
        async def loop(rec: RecordedEvent, tx: Any) -> None:
            await hub.events.append("other-1", [PjAdded(item="x")])

        await hub.events.append("o-1", [PjAdded(item="a")])
        (st,) = await asyncio.wait_for(hub.projections.catch_up(), GUARD)
        if hub.url.startswith(("sqlite", "postgres")):
            assert st.status == "failed" and "write through the handler's tx" in (st.error or "")
        else:  # memory has no writer to wait for: the append just happens
            assert st.status == "running"


async def test_publishing_through_the_hub_inside_a_handler_is_refused(engine_url: str) -> None:
    async with await tidings.connect(engine_url) as hub:
        @hub.projection("pub")
        async def pub(rec: RecordedEvent, tx: Any) -> None:
            tx.publish("notify.inside", {"ok": True})  # the way that commits with the event
            await hub.publish("notify.outside", b"x")  # the way that would wait for itself

        await hub.events.append("o-1", [PjAdded(item="a")])
        (st,) = await asyncio.wait_for(hub.projections.catch_up(), GUARD)
        if hub.url.startswith(("sqlite", "postgres")):
            assert st.status == "failed" and "through its tx" in (st.error or "")
            assert [m async for m in hub.read("notify.>")] == []  # undone with the event
        else:
            assert st.status == "running"


async def test_registration_errors(hub: tidings.Hub) -> None:
    @hub.projection("one")
    async def one(rec: RecordedEvent, tx: Any) -> None: ...

    with pytest.raises(tidings.InvalidArgument):
        hub.projection("one")(one)
    with pytest.raises(tidings.InvalidArgument):
        hub.projection("")(one)
    with pytest.raises(tidings.NotFound):
        await hub.projections.catch_up("two")
    statuses = await hub.projections.statuses()
    assert [s.name for s in statuses] == ["one"]


async def test_runner_ends_when_the_hub_closes(engine_url: str) -> None:
    hub = await tidings.connect(engine_url)
    seen: list[int] = []

    @hub.projection("short")
    async def short(rec: RecordedEvent, tx: Any) -> None:
        seen.append(rec.position)

    await hub.events.append("c-1", [PjAdded(item="a")])
    runner = asyncio.create_task(hub.run_projections())

    async def got() -> bool:
        return bool(seen)

    await until(got, "the first event")
    await hub.close()
    await asyncio.wait_for(runner, GUARD)  # returns, no error
    assert seen == [1]


async def test_a_handler_cannot_publish_to_tidings_own_topics(hub: tidings.Hub) -> None:
    """'$' topics (dead letters) are tidings' own: a handler's tx refuses them, and the
    projection stops there visibly, having stored nothing of that event."""
    @hub.projection("sys")
    async def sys(ev: PjAdded, tx: Any) -> None:
        tx.publish("$dlq.mine", {"item": ev.item})

    await hub.events.append("s-1", [PjAdded(item="a")])
    (st,) = await asyncio.wait_for(hub.projections.catch_up(), GUARD)
    assert st.status == "failed" and "'$'" in (st.error or "")
    assert [m async for m in hub.read("$dlq.>")] == []
