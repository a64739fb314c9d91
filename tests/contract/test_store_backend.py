"""The event-store protocol's own promises, called directly on each engine's store.

`append_batch` is what every command handler's and saga's commit runs;
`StoreTx.begin_event` / `end_event` are what undo one projection event's
writes alone. Both are checked here as `store_base.py` documents them.
"""

from __future__ import annotations

import asyncio

import pytest

import tidings
from tidings.engines.store_base import (
    NewRecord,
    ProjectionState,
    SnapshotRow,
    StoreBackend,
    StoreTx,
)
from tidings.messages import OutMessage, new_id

#: Event streams: every engine that holds them (nats:// carries messages only).
pytestmark = pytest.mark.events


def rec(eid: str | None = None) -> NewRecord:
    return NewRecord(eid or new_id(), "SbHappened", 1, b'{"n": 1}', {})


def msg(topic: str) -> OutMessage:
    return OutMessage(new_id(), topic, None, b"{}", {"content-type": "application/json"}, False)


async def topics(hub: tidings.Hub) -> list[str]:
    return [m.topic async for m in hub.read(">")]


def backend(hub: tidings.Hub) -> StoreBackend:
    return hub.events.backend


async def test_append_batch_stores_every_stream_and_message_together(hub: tidings.Hub) -> None:
    out = await backend(hub).append_batch(
        [("sb-1", [rec(), rec()], 0, "sb.a"), ("sb-2", [rec()], None, "sb.b")],
        [msg("sb.reply")])
    assert [(o.version, o.positions, o.duplicate) for o in out] == [
        (2, [1, 2], False), (1, [3], False)]
    assert await topics(hub) == ["sb.a", "sb.a", "sb.b", "sb.reply"]  # events' first
    assert [await backend(hub).stream_version(s) for s in ("sb-1", "sb-2")] == [2, 1]


async def test_append_batch_checks_a_stream_given_twice_against_its_first_part(
        hub: tidings.Hub) -> None:
    b = backend(hub)
    out = await b.append_batch([("sb-1", [rec()], 0, "sb"), ("sb-1", [rec()], 1, "sb")])
    assert [o.version for o in out] == [1, 2]
    with pytest.raises(tidings.ConcurrencyError):
        await b.append_batch([("sb-2", [rec()], 0, "sb"), ("sb-2", [rec()], 0, "sb")])
    assert await b.stream_version("sb-2") == 0


async def test_append_batch_stores_nothing_on_a_conflict(hub: tidings.Hub) -> None:
    b = backend(hub)
    first = rec()
    await b.append_batch([("sb-1", [first], 0, "sb")])
    before = await topics(hub)
    with pytest.raises(tidings.ConcurrencyError):  # the last item is behind
        await b.append_batch([("sb-2", [rec()], 0, "sb"), ("sb-1", [rec()], 0, "sb")],
                             [msg("sb.reply")], {"sb-2": SnapshotRow(1, "s", 1.0, b"{}")})
    with pytest.raises(tidings.EventIdConflict):  # an id stored already, elsewhere
        await b.append_batch([("sb-2", [rec()], 0, "sb"), ("sb-3", [rec(), first], 0, "sb")],
                             [msg("sb.reply")])
    assert await b.stream_version("sb-2") == 0 and await b.last_position() == 1
    assert await topics(hub) == before
    assert (await b.load("sb-2", "s", None, None)).snapshot is None


async def test_concurrent_batches_fail_alone(hub: tidings.Hub) -> None:
    """Many commits at once (an engine may group them into one transaction): a batch
    that conflicts or reuses an id fails alone and leaves nothing, every other one is
    stored whole, and positions follow the order they were stored in."""
    b = backend(hub)
    first = rec()
    await b.append_batch([("cc-0", [first], 0, "cc")])
    calls = []
    for i in range(1, 31):
        if i == 7:  # behind its stream
            calls.append(b.append_batch([(f"cc-{i}", [rec()], 0, "cc"),
                                         ("cc-0", [rec()], 0, "cc")], [msg("cc.bad")]))
        elif i == 19:  # an id stored already
            calls.append(b.append_batch([(f"cc-{i}", [rec(), first], 0, "cc")],
                                        [msg("cc.bad")]))
        else:
            calls.append(b.append_batch([(f"cc-{i}", [rec(), rec()], 0, "cc")],
                                        [msg("cc.ok")]))
    out = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(out[6], tidings.ConcurrencyError)
    assert isinstance(out[18], tidings.EventIdConflict)
    good = [o for i, o in enumerate(out) if i not in (6, 18)]
    assert all(isinstance(o, list) and o[0].version == 2 for o in good), out
    assert await b.stream_version("cc-7") == 0 and await b.stream_version("cc-19") == 0
    assert await b.stream_version("cc-0") == 1
    stored = [m async for m in hub.read(">")]
    assert [m.topic for m in stored].count("cc.ok") == 28 and "cc.bad" not in {
        m.topic for m in stored}
    positions = [m.position for m in stored]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


async def test_append_batch_repeated_appends_nothing_again(hub: tidings.Hub) -> None:
    b = backend(hub)
    again = [rec(), rec()]
    first = await b.append_batch([("sb-1", again, 0, "sb")])
    snap = SnapshotRow(2, "s", 1.0, b"{}")
    out = await b.append_batch([("sb-1", again, 0, "sb"), ("sb-2", [rec()], 0, "sb")],
                               (), {"sb-1": snap, "sb-2": SnapshotRow(1, "s", 1.0, b"{}")})
    assert (out[0].version, out[0].positions, out[0].duplicate) == (
        2, first[0].positions, True)
    assert (out[1].positions, out[1].duplicate) == ([3], False)
    assert (await b.load("sb-1", "s", None, None)).snapshot is None  # nothing appended: none
    assert (await b.load("sb-2", "s", None, None)).snapshot is not None
    with pytest.raises(tidings.EventIdConflict):  # the same first id, another append
        await b.append_batch([("sb-3", again[:1], 0, "sb")])


async def test_a_tx_undoes_one_event_alone_and_keeps_the_rest(hub: tidings.Hub) -> None:
    async def work(tx: StoreTx) -> None:
        tx.publish("tx.before", {"n": 0})  # outside any event: commits with the transaction
        await tx.begin_event()
        tx.publish("tx.undone", {"n": 1})
        await tx.end_event(False)
        await tx.begin_event()
        tx.publish("tx.kept", {"n": 2})
        await tx.end_event(True)

    await backend(hub).transaction(work)
    assert await topics(hub) == ["tx.before", "tx.kept"]


async def test_a_tx_whose_function_fails_stores_nothing(hub: tidings.Hub) -> None:
    async def work(tx: StoreTx) -> None:
        tx.publish("tx.before", {"n": 0})
        await tx.begin_event()
        tx.publish("tx.kept", {"n": 2})
        await tx.end_event(True)
        await tx.save_projection(await tx.projection("p") or ProjectionState("p"), tx.now)
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        await backend(hub).transaction(work)
    if hub.url.startswith("memory"):
        return  # memory keeps no undo log for what a failed function wrote through its tx
    assert await topics(hub) == [] and await backend(hub).projections() == []


async def test_newer_reads_what_a_kept_state_missed(hub: tidings.Hub) -> None:
    """`newer` is what refreshing an aggregate kept at a version needs: the events after
    it and the stream's version, or None when the stream is behind it or too far ahead."""
    b = backend(hub)
    assert await b.newer("nw-1", 0, 5) == (0, [])  # no stream yet
    await b.append_batch([("nw-1", [rec(), rec(), rec()], 0, "nw")])
    current, rows = await b.newer("nw-1", 1, 5) or (None, None)
    assert current == 3 and [r[2] for r in rows or []] == [2, 3]
    assert await b.newer("nw-1", 3, 5) == (3, [])
    assert await b.newer("nw-1", 0, 2) is None  # three newer: more than the limit
    assert await b.newer("nw-1", 4, 5) is None  # the stream is behind the kept version
    got = await b.newer("nw-1", 0, 3)
    assert got is not None and got[0] == 3 and [r[2] for r in got[1]] == [1, 2, 3]


async def test_group_commit_keeps_each_batch_apart(hub: tidings.Hub) -> None:
    """Batches queued together (one group commit where the engine has one) still succeed
    or fail alone: a stale expected version or a reused event id fails its own batch,
    and a later batch on the same stream counts the earlier ones' events."""
    b = backend(hub)
    taken = rec()
    await b.append_batch([("gc-0", [taken], 0, "gc")])
    results = await asyncio.gather(
        b.append_batch([("gc-1", [rec()], 0, "gc")], [msg("gc.cmd")]),
        b.append_batch([("gc-1", [rec()], 0, "gc")]),  # stale: the first took version 1
        b.append_batch([("gc-2", [rec(), rec(taken.id)], 0, "gc")]),  # reuses an id
        b.append_batch([("gc-1", [rec()], None, "gc"), ("gc-3", [rec()], 0, "gc")]),
        return_exceptions=True)
    assert [o.version for o in results[0]] == [1]  # type: ignore[union-attr]
    assert isinstance(results[1], tidings.ConcurrencyError)
    assert isinstance(results[2], tidings.TidingsError)
    assert [o.version for o in results[3]] == [2, 1]  # type: ignore[union-attr]
    assert await b.stream_version("gc-1") == 2
    assert await b.stream_version("gc-2") == 0  # nothing of the failed batch
    published = sorted(t for t in await topics(hub) if t.startswith("gc"))
    assert published == ["gc"] * 4 + ["gc.cmd"]  # gc-0, gc-1 twice, gc-3; one command
