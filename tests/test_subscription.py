"""The consumer side of pub/sub (`Subscription`, wake-ups), independent of the engine.

These use the memory engine, sometimes wrapped to make a race deterministic
(a settle that blocks until the test lets it through).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import tidings
from tidings.engines.base import Settle
from tidings.engines.memory import MemoryEngine

GUARD = 10.0


class GatedSettleEngine(MemoryEngine):
    """A memory engine whose `settle` waits at a gate, like a slow disk or network."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def settle(self, handle: Any, items: Sequence[Settle], now: float) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().settle(handle, items, now)


def _hub(engine: MemoryEngine) -> tidings.Hub:
    return tidings.Hub(engine, max_payload=1024 * 1024, max_pending=100)


async def _pending(hub: tidings.Hub) -> int:
    return sum(s.pending for s in await hub.engine.subscriptions())


async def test_fetch_with_zero_wait_claims_what_is_there() -> None:
    async with await tidings.connect("memory://") as hub:
        await hub.publish_many("a.b", [b"1", b"2"])
        sub = await hub.subscribe("a.b", group="g")
        got = await sub.fetch(10, wait=0)
        assert [m.data for m in got] == [b"1", b"2"], "fetch(wait=0) must still look once"
        assert await sub.fetch(10, wait=0) == []


async def test_flush_waits_for_a_settle_already_on_its_way() -> None:
    engine = GatedSettleEngine()
    hub = _hub(engine)
    await hub.publish("a.b", b"x")
    sub = await hub.subscribe("a.b", group="g")
    [m] = await sub.fetch(1, wait=1)
    await m.ack()  # schedules the background flush
    await asyncio.wait_for(engine.entered.wait(), GUARD)  # ... which is now inside settle
    flushing = asyncio.create_task(sub.flush())
    try:
        for _ in range(5):
            await asyncio.sleep(0)
        assert not flushing.done(), "flush() returned while an ack was still on its way"
    finally:
        engine.gate.set()
        await asyncio.wait_for(flushing, GUARD)
        await hub.close()
    assert await _pending(hub) == 0


async def test_closing_the_hub_delivers_acks_made_before() -> None:
    engine = GatedSettleEngine()
    hub = _hub(engine)
    await hub.publish("a.b", b"x")
    sub = await hub.subscribe("a.b", group="g")
    [m] = await sub.fetch(1, wait=1)
    await m.ack()
    await asyncio.wait_for(engine.entered.wait(), GUARD)
    closing = asyncio.create_task(hub.close())
    try:
        for _ in range(5):
            await asyncio.sleep(0)
        assert not closing.done(), "hub.close() finished before the ack reached the engine"
    finally:
        engine.gate.set()
        await asyncio.wait_for(closing, GUARD)
        await asyncio.sleep(0)
    assert await _pending(hub) == 0


async def test_engine_wait_can_be_cancelled_as_the_change_arrives() -> None:
    engine = MemoryEngine()
    changed = engine.changes()
    waiter = asyncio.create_task(engine.wait(changed, 10))
    await asyncio.sleep(0)
    engine._notify()  # the change and the cancellation land in the same loop iteration
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, GUARD)


async def test_engine_wait_returns_on_change_or_timeout() -> None:
    engine = MemoryEngine()
    changed = engine.changes()
    waiter = asyncio.create_task(engine.wait(changed, 10))
    await asyncio.sleep(0)
    engine._notify()
    await asyncio.wait_for(waiter, GUARD)
    await asyncio.wait_for(engine.wait(engine.changes(), 0.01), GUARD)  # times out quietly


async def test_cancelling_a_waiting_consumer_stops_it() -> None:
    async with await tidings.connect("memory://") as hub:
        sub = await hub.subscribe("a.b", group="g")

        async def consume() -> None:
            async for _ in sub:
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=GUARD)
        assert task in done and task.cancelled()


async def test_closing_a_consumer_hands_back_what_it_prefetched() -> None:
    async with await tidings.connect("memory://") as hub:
        await hub.publish_many("a.b", [b"1", b"2", b"3", b"4"])
        first = await hub.subscribe("a.b", group="g", ack_wait=30, batch=4)
        seen = await asyncio.wait_for(first.__anext__(), GUARD)  # prefetches all four
        assert seen.data == b"1"
        await first.close()  # 2-4 were never seen: released now, not after ack_wait
        second = await hub.subscribe("a.b", group="g", ack_wait=30)
        got = await second.fetch(10, wait=1)
        assert [(m.data, m.attempt) for m in got] == [(b"2", 1), (b"3", 1), (b"4", 1)]


async def test_flush_says_when_acks_could_not_be_recorded(tmp_path: Path) -> None:
    hub = await tidings.connect(f"sqlite:///{tmp_path}/f.db")
    try:
        sub = await hub.subscribe("f.*", group="g")
        await hub.publish("f.one", {"n": 1})
        [msg] = await sub.fetch(1, wait=5)
        await msg.ack()
        await hub.engine.close()  # the engine goes away before the ack is written
        with pytest.raises(tidings.EngineUnavailable):
            await sub.flush()  # not "recorded": the caller is told
        with pytest.raises(tidings.EngineUnavailable):
            await sub.flush()  # and the ack is still there to try again
    finally:
        await hub.close()


@pytest.mark.parametrize("engine", ["memory", "sqlite"])
async def test_a_handler_stopped_mid_message_hands_it_back_unspent(
        tmp_path: Path, engine: str) -> None:
    """Stopping `hub.run()` while a subscriber handles a message on its last attempt
    neither spends the attempt nor dead-letters it: the message is handed back and the
    next run handles it."""
    url = "memory://" if engine == "memory" else f"sqlite:///{tmp_path}/stop.db"
    async with await tidings.connect(url) as hub:
        started, done = asyncio.Event(), asyncio.Event()
        seen: list[int] = []

        @hub.subscriber("w.x", group="w", max_deliver=1, dead_letter="$dlq.w")
        async def handle(msg: tidings.Message) -> None:
            seen.append(msg.attempt)
            if len(seen) == 1:
                started.set()
                await asyncio.Event().wait()  # the first time: until stopped
            done.set()

        await hub.publish("w.x", b"job")
        run = asyncio.create_task(hub.run())
        await asyncio.wait_for(started.wait(), GUARD)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        assert [m async for m in hub.read("$dlq.w")] == []
        run = asyncio.create_task(hub.run())
        await asyncio.wait_for(done.wait(), GUARD)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        assert seen == [1, 1]  # the stopped attempt was not counted
        assert [m async for m in hub.read("$dlq.w")] == []
