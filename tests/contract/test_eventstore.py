"""The engine contract for the event store, through `hub.events` (every engine in conftest.ENGINES).

Waits are bounded by `asyncio.wait_for`; no test asserts that something
happened *within* a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from contextlib import aclosing
from typing import Any

import pydantic
import pytest

import tidings
from tidings import ANY, NO_STREAM, NewEvent, RecordedEvent
from tidings.eventsourcing import CaughtUp, audit

#: Event streams: every engine that holds them (nats:// carries messages only).
pytestmark = pytest.mark.events

GUARD = 10.0




class CtOpened(tidings.Event):
    owner: str


class CtDeposited(tidings.Event):
    amount: int
    note: str = ""


@dataclasses.dataclass
class CtClosed:
    reason: str


tidings.register_event(CtClosed)


async def stream(hub: tidings.Hub, stream_id: str, **kw: Any) -> list[RecordedEvent]:
    return [r async for r in hub.events.read(stream_id, **kw)]


async def everything(hub: tidings.Hub, **kw: Any) -> list[RecordedEvent]:
    return [r async for r in hub.events.read_all(**kw)]


# append and read ---------------------------------------------------------------------


async def test_append_assigns_versions_and_global_positions(hub: tidings.Hub) -> None:
    a1 = await hub.events.append("acct-1", [CtOpened(owner="ann"), CtDeposited(amount=5)],
                                 expected_version=NO_STREAM)
    b1 = await hub.events.append("acct-2", [CtOpened(owner="bob")], expected_version=NO_STREAM)
    a2 = await hub.events.append("acct-1", [CtClosed(reason="done")], expected_version=2)
    assert (a1.stream_id, a1.version, a1.duplicate) == ("acct-1", 2, False)
    assert a1.positions == [1, 2] and b1.positions == [3] and a2.positions == [4]
    assert a2.version == 3

    recs = await stream(hub, "acct-1")
    assert [r.version for r in recs] == [1, 2, 3]
    assert [r.position for r in recs] == [1, 2, 4]
    assert [r.type for r in recs] == ["CtOpened", "CtDeposited", "CtClosed"]
    assert recs[0].event == CtOpened(owner="ann")
    assert recs[1].event == CtDeposited(amount=5)
    assert recs[2].event == CtClosed(reason="done")
    assert recs[0].time <= recs[1].time <= recs[2].time
    assert recs[0].time.utcoffset() is not None
    assert all(r.stream_id == "acct-1" and r.type_version == 1 for r in recs)
    assert len({r.id for r in recs}) == 3
    assert await hub.events.stream_version("acct-1") == 3
    assert await hub.events.stream_version("nobody") == 0
    assert await hub.events.last_position() == 4


async def test_read_ranges(hub: tidings.Hub) -> None:
    await hub.events.append("r-1", [CtDeposited(amount=i) for i in range(1, 11)])
    assert [r.version for r in await stream(hub, "r-1", from_version=4)] == list(range(4, 11))
    assert [r.version for r in await stream(hub, "r-1", from_version=3, to_version=5)] == [3, 4, 5]
    assert await stream(hub, "r-1", from_version=11) == []
    assert await stream(hub, "nope") == []
    with pytest.raises(tidings.InvalidArgument):
        await stream(hub, "r-1", from_version=0)


async def test_read_all_in_global_order(hub: tidings.Hub) -> None:
    for i in range(30):
        await hub.events.append(f"s-{i % 4}", [CtDeposited(amount=i)])
    recs = await everything(hub)
    assert [r.position for r in recs] == list(range(1, 31))
    assert [r.event.amount for r in recs] == list(range(30))
    assert [r.position for r in await everything(hub, from_position=25)] == list(range(25, 31))
    assert [r.position for r in await everything(hub, from_position=5, to_position=7)] == [5, 6, 7]
    paged = await everything(hub, page=7, raw=True)
    assert [r.position for r in paged] == list(range(1, 31))


async def test_long_stream_reads_in_pages(hub: tidings.Hub) -> None:
    for _ in range(3):
        await hub.events.append("long-1", [CtDeposited(amount=j) for j in range(1000)])
    recs = await stream(hub, "long-1", raw=True)
    assert [r.version for r in recs] == list(range(1, 3001))


# optimistic concurrency -------------------------------------------------------------


async def test_expected_version_mismatch_raises_and_stores_nothing(hub: tidings.Hub) -> None:
    await hub.events.append("c-1", [CtOpened(owner="x")], expected_version=NO_STREAM)
    with pytest.raises(tidings.ConcurrencyError) as info:
        await hub.events.append("c-1", [CtDeposited(amount=1)], expected_version=NO_STREAM)
    err = info.value
    assert (err.stream_id, err.expected, err.actual) == ("c-1", 0, 1)
    assert "'c-1'" in str(err) and "version 1" in str(err) and "expected 0" in str(err)
    with pytest.raises(tidings.ConcurrencyError) as info:
        await hub.events.append("c-1", [CtDeposited(amount=1), CtDeposited(amount=2)],
                                expected_version=5)
    assert (info.value.expected, info.value.actual) == (5, 1)
    with pytest.raises(tidings.ConcurrencyError):
        await hub.events.append("c-2", [CtDeposited(amount=1)], expected_version=1)
    assert [r.version for r in await stream(hub, "c-1")] == [1]
    assert await stream(hub, "c-2") == []
    # ANY never conflicts; NO_STREAM is version 0
    assert NO_STREAM == 0
    await hub.events.append("c-1", [CtDeposited(amount=3)], expected_version=ANY)
    await hub.events.append("c-1", [CtDeposited(amount=4)])
    assert await hub.events.stream_version("c-1") == 3
    # nothing published for the refused appends
    msgs = [m async for m in hub.read("c")]
    assert len(msgs) == 3


async def test_batch_is_atomic(hub: tidings.Hub) -> None:
    await hub.events.append("b-1", [CtOpened(owner="x")])
    bad = CtDeposited(amount="lots")  # type: ignore[arg-type]
    with pytest.raises(tidings.InvalidEvent):
        await hub.events.append("b-1", [CtDeposited(amount=1), bad])
    assert [r.version for r in await stream(hub, "b-1")] == [1]
    assert await hub.events.last_position() == 1


async def test_concurrent_appends_one_winner_per_version(hub: tidings.Hub) -> None:
    wins: list[int] = []
    conflicts = 0

    async def writer(n: int) -> None:
        nonlocal conflicts
        done = 0
        while done < 5:
            v = await hub.events.stream_version("hot-1")
            try:
                out = await hub.events.append("hot-1", [CtDeposited(amount=n)],
                                              expected_version=v)
            except tidings.ConcurrencyError as e:
                assert e.expected == v and e.actual > v
                conflicts += 1
                continue
            wins.append(out.version)
            done += 1

    await asyncio.wait_for(asyncio.gather(*(writer(n) for n in range(20))), 60)
    recs = await stream(hub, "hot-1")
    assert [r.version for r in recs] == list(range(1, 101))
    assert sorted(wins) == list(range(1, 101))  # exactly one winner per version
    assert sorted(r.position for r in recs) == [r.position for r in recs]


# idempotency ------------------------------------------------------------------------


async def test_same_event_id_twice_is_idempotent(hub: tidings.Hub) -> None:
    batch = [NewEvent(CtDeposited(amount=1), id="ev-1"), NewEvent(CtDeposited(amount=2), id="ev-2")]
    first = await hub.events.append("i-1", batch, expected_version=NO_STREAM)
    again = await hub.events.append("i-1", batch, expected_version=NO_STREAM)
    assert again.duplicate and not first.duplicate
    assert (again.positions, again.version) == (first.positions, first.version)
    assert [r.id for r in await stream(hub, "i-1")] == ["ev-1", "ev-2"]
    assert len([m async for m in hub.read("i")]) == 2  # published once
    # reusing an id for something else is refused, nothing stored
    with pytest.raises(tidings.EventIdConflict):
        await hub.events.append("i-2", [NewEvent(CtDeposited(amount=1), id="ev-1")])
    with pytest.raises(tidings.EventIdConflict):
        await hub.events.append("i-1", [NewEvent(CtDeposited(amount=9), id="new"),
                                        NewEvent(CtDeposited(amount=9), id="ev-2")])
    with pytest.raises(tidings.EventIdConflict):  # (a 409 over HTTP, like any id reuse)
        await hub.events.append("i-3", [NewEvent(CtDeposited(amount=9), id="x"),
                                        NewEvent(CtDeposited(amount=9), id="x")])
    assert await hub.events.last_position() == 2


# the outbox: every event is a message -------------------------------------------------


async def test_every_event_is_published_in_the_same_transaction(hub: tidings.Hub) -> None:
    sub = await hub.subscribe("order", group="watch")
    out = await hub.events.append("order-7", [CtOpened(owner="o"), CtDeposited(amount=3)],
                                  headers={"actor": "ann"})
    await hub.events.append("order-8", [CtDeposited(amount=4)], topic="billing.events")
    await hub.events.append("weird id!", [CtDeposited(amount=5)])
    msgs = await asyncio.wait_for(sub.fetch(10, wait=1.0), GUARD)
    assert [m.key for m in msgs] == ["order-7", "order-7"]
    recs = await stream(hub, "order-7")
    for m, r in zip(msgs, recs, strict=True):
        assert m.id == r.id
        assert m.decode() == r.json()
        assert m.headers["event-type"] == r.type
        assert m.headers["stream-id"] == "order-7"
        assert m.headers["stream-version"] == str(r.version)
        assert m.headers["event-position"] == str(r.position)
        assert m.headers["actor"] == "ann"
        assert m.decode(type(r.event)) == r.event
        # exactly the event's own headers plus where it is, on every engine
        assert m.headers == {**r.headers, "content-type": "application/json",
                             "event-type": r.type, "event-version": str(r.type_version),
                             "stream-id": "order-7", "stream-version": str(r.version),
                             "event-position": str(r.position)}
    read = [m async for m in hub.read("order")]  # read again: the same headers
    assert [m.headers for m in read] == [m.headers for m in msgs]
    assert out.positions == [r.position for r in recs]
    assert [m.key async for m in hub.read("billing.events")] == ["order-8"]
    assert [m.key async for m in hub.read("events")] == ["weird id!"]
    await sub.close()


# subscribe_all ----------------------------------------------------------------------


async def test_subscribe_all_catches_up_then_follows_without_gap(hub: tidings.Hub) -> None:
    for i in range(25):
        await hub.events.append(f"sub-{i % 3}", [CtDeposited(amount=i)])
    got: list[int] = []
    marker: list[int] = []

    async def consume() -> None:
        async with aclosing(hub.events.subscribe_all(markers=True, page=10)) as sub:
            async for item in sub:
                if isinstance(item, CaughtUp):
                    marker.append(item.position)
                    continue
                got.append(item.position)
                if len(got) == 60:
                    return

    task = asyncio.create_task(consume())

    async def produce() -> None:
        for i in range(35):
            await hub.events.append(f"sub-{i % 5}", [CtDeposited(amount=100 + i)])
            if i % 7 == 0:
                await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(task, produce()), GUARD * 3)
    assert got == list(range(1, 61))
    assert len(marker) == 1 and 25 <= marker[0] <= 60


async def test_subscribe_all_from_position_and_caught_up_event(hub: tidings.Hub) -> None:
    for i in range(5):
        await hub.events.append("p-1", [CtDeposited(amount=i)])
    sub = hub.events.subscribe_all(from_position=4)
    first = await asyncio.wait_for(sub.__anext__(), GUARD)
    second = await asyncio.wait_for(sub.__anext__(), GUARD)
    assert (first.position, second.position) == (4, 5)
    assert not sub.caught_up.is_set()
    nxt = asyncio.ensure_future(sub.__anext__())
    await asyncio.wait_for(sub.caught_up.wait(), GUARD)
    await hub.events.append("p-1", [CtDeposited(amount=99)])
    live = await asyncio.wait_for(nxt, GUARD)
    assert live.position == 6 and live.event.amount == 99
    await sub.close()


async def test_positions_are_never_filled_in_late(hub: tidings.Hub) -> None:
    """A reader that has seen position N never later finds a new event below N."""
    stop = asyncio.Event()
    seen: list[int] = []

    async def reader() -> None:
        last = 0
        while not stop.is_set() or last < await hub.events.last_position():
            async for r in hub.events.read_all(from_position=1, raw=True):
                if r.position > last:
                    assert r.position == last + 1, f"gap after {last}: {r.position}"
                    seen.append(r.position)
                    last = r.position
            await asyncio.sleep(0)

    async def writer(n: int) -> None:
        for i in range(20):
            await hub.events.append(f"w-{n}", [CtDeposited(amount=i), CtDeposited(amount=-i)])

    r = asyncio.create_task(reader())
    await asyncio.wait_for(asyncio.gather(*(writer(n) for n in range(8))), 60)
    stop.set()
    await asyncio.wait_for(r, 60)
    assert seen == list(range(1, 321))


# audit -------------------------------------------------------------------------------


async def test_audit_headers(hub: tidings.Hub) -> None:
    await hub.events.append("au-1", [CtOpened(owner="a"), CtDeposited(amount=1)])
    recs = await stream(hub, "au-1")
    assert recs[0].correlation_id == recs[0].id == recs[1].correlation_id  # one command
    assert recs[0].causation_id is None and recs[0].actor is None
    with audit(actor="ann", correlation_id="req-9"):
        caused = recs[1].caused(actor="bob")
        await hub.events.append("au-2", [NewEvent(CtDeposited(amount=2), headers=caused)])
        await hub.events.append("au-3", [CtDeposited(amount=3)])
    r2 = (await stream(hub, "au-2"))[0]
    assert (r2.actor, r2.causation_id, r2.correlation_id) == ("bob", recs[1].id, recs[0].id)
    r3 = (await stream(hub, "au-3"))[0]
    assert (r3.actor, r3.correlation_id, r3.causation_id) == ("ann", "req-9", None)
    assert r3.to_dict()["headers"]["actor"] == "ann"


# bad input -------------------------------------------------------------------------------


async def test_unknown_event_type_on_read(hub: tidings.Hub) -> None:
    await hub.events.append("u-1", [NewEvent(type="NeverDefinedAnywhere", data={"x": 1})])
    with pytest.raises(tidings.UnknownEventType) as info:
        await stream(hub, "u-1")
    assert isinstance(info.value, tidings.TidingsError)
    assert "NeverDefinedAnywhere" in str(info.value) and "'u-1'" in str(info.value)
    assert info.value.type_name == "NeverDefinedAnywhere"  # type: ignore[attr-defined]
    assert info.value.stream_id == "u-1"  # type: ignore[attr-defined]
    (raw,) = await stream(hub, "u-1", raw=True)  # the escape hatch
    assert raw.type == "NeverDefinedAnywhere" and raw.json() == {"x": 1}
    assert raw.data == b'{"x":1}'
    with pytest.raises(tidings.UnknownEventType):
        raw.event  # noqa: B018


@pytest.mark.parametrize("bad_id", ["", "x" * 256, 42, None, "a\x00b"])
async def test_bad_stream_ids_are_refused(hub: tidings.Hub, bad_id: Any) -> None:
    with pytest.raises(tidings.InvalidStreamId):
        await hub.events.append(bad_id, [CtDeposited(amount=1)])
    with pytest.raises(tidings.InvalidStreamId):
        await stream(hub, bad_id)
    assert await hub.events.last_position() == 0


async def test_payload_not_matching_its_type_is_refused(hub: tidings.Hub) -> None:
    cases: list[list[Any]] = [
        [CtDeposited(amount="ten")],  # type: ignore[arg-type]
        [NewEvent(type="CtDeposited", data={"amount": "ten"})],
        [NewEvent(type="CtDeposited", data={})],
        [NewEvent(type="CtDeposited", data=b"not json")],
        [NewEvent(type="Unregistered", data=b"[1, 2]")],  # unknown types must be objects
        [{"amount": 1}],
        ["CtDeposited"],
        [NewEvent(type="", data={})],
    ]
    for events in cases:
        with pytest.raises(tidings.InvalidEvent):
            await hub.events.append("bad-1", events)
    bad: Any
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(tidings.InvalidArgument):
            await hub.events.append("bad-1", [CtDeposited(amount=1)], expected_version=bad)
    with pytest.raises(tidings.InvalidArgument):
        await hub.events.append("bad-1", [])
    with pytest.raises(tidings.PayloadTooLarge):
        await hub.events.append("bad-1", [CtDeposited(amount=1, note="x" * (2 << 20))])
    with pytest.raises(tidings.InvalidTopic):
        await hub.events.append("bad-1", [CtDeposited(amount=1)], topic="no spaces")
    assert await hub.events.last_position() == 0
    assert [m async for m in hub.read(">")] == []
    # valid raw appends of a registered type are checked and decoded like typed ones
    await hub.events.append("ok-1", [NewEvent(type="CtDeposited", data={"amount": 7})])
    assert (await stream(hub, "ok-1"))[0].event == CtDeposited(amount=7)


async def test_no_update_or_delete_api(hub: tidings.Hub) -> None:
    public = {n for n in dir(hub.events) if not n.startswith("_")}
    assert not {n for n in public if any(w in n for w in ("update", "delete", "remove",
                                                           "truncate", "edit", "rewrite"))}


@pytest.mark.sql_engine
async def test_database_refuses_update_and_delete(hub: tidings.Hub,
                                                  engine: Any) -> None:
    await hub.events.append("imm-1", [CtDeposited(amount=1)])
    if engine.id == "postgres":
        import asyncpg  # type: ignore[import-untyped]

        async def tamper(tx: Any) -> list[str]:
            errors = []
            events = tx.table("tidings_events")
            for sql in (f"UPDATE {events} SET data = '\\x00'", f"DELETE FROM {events}",
                        f"TRUNCATE {events}"):
                try:
                    async with tx.conn.transaction():  # a savepoint
                        await tx.conn.execute(sql)
                except asyncpg.PostgresError as exc:
                    errors.append(str(exc))
            return errors

        errors = await hub.engine.transact(tamper)  # type: ignore[attr-defined]
        assert len(errors) == 3 and all("refused" in e for e in errors), errors
        assert (await stream(hub, "imm-1"))[0].event == CtDeposited(amount=1)
        return
    path = hub.url.split("///", 1)[1].split("?")[0]
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE tidings_events SET data = x'00'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM tidings_events")
        conn.rollback()
    finally:
        conn.close()
    assert (await stream(hub, "imm-1"))[0].event == CtDeposited(amount=1)


@pytest.mark.durable
async def test_events_survive_reconnect(engine_url: str) -> None:
    async with await tidings.connect(engine_url) as h1:
        await h1.events.append("d-1", [CtOpened(owner="z"), CtDeposited(amount=2)])
    async with await tidings.connect(engine_url) as h2:
        recs = await stream(h2, "d-1")
        assert [r.event for r in recs] == [CtOpened(owner="z"), CtDeposited(amount=2)]
        out = await h2.events.append("d-1", [CtDeposited(amount=3)], expected_version=2)
        assert out.positions == [3]


async def test_closed_hub_refuses(engine_url: str) -> None:
    h = await tidings.connect(engine_url)
    events = h.events
    await h.close()
    with pytest.raises(tidings.ClosedError):
        await events.append("x-1", [CtDeposited(amount=1)])
    with pytest.raises(tidings.ClosedError):
        h.events  # noqa: B018


class CtRenamed(pydantic.BaseModel):
    name: str
    at: int


async def test_pydantic_events(hub: tidings.Hub) -> None:
    tidings.register_event(CtRenamed)
    await hub.events.append("pd-1", [CtRenamed(name="x", at=1)])
    with pytest.raises(tidings.InvalidEvent):
        await hub.events.append("pd-1", [NewEvent(type="CtRenamed", data={"name": "x"})])
    (rec,) = await stream(hub, "pd-1")
    assert rec.event == CtRenamed(name="x", at=1) and rec.type == "CtRenamed"
