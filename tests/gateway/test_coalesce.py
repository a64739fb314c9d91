"""Group publishing: concurrent publishes share an append, yet each gets its own outcome."""

from __future__ import annotations

import asyncio

import pytest

import tidings
from tidings.gateway.coalesce import Coalescer


async def test_concurrent_publishes_share_a_batch_and_keep_their_own_results() -> None:
    async with await tidings.connect("memory://") as hub:
        c = Coalescer(hub)
        calls = 0
        publish_many = hub.publish_many

        async def counting(*args: object, **kw: object) -> object:
            nonlocal calls
            calls += 1
            return await publish_many(*args, **kw)  # type: ignore[arg-type]

        hub.publish_many = counting  # type: ignore[method-assign]
        out = await asyncio.gather(*(c.publish(f"t.{i % 3}", {"n": i}, None, None)
                                     for i in range(50)))
        assert calls == 1
        assert sorted(p.position for p in out) == [p.position for p in out]
        got = [m async for m in hub.read("t.*")]
        assert [(m.topic, m.decode()) for m in got] == [(f"t.{i % 3}", {"n": i})
                                                        for i in range(50)]


async def test_one_bad_message_fails_alone() -> None:
    async with await tidings.connect("memory://") as hub:
        c = Coalescer(hub)
        results = await asyncio.gather(
            *(c.publish("t", i, "k" * (300 if i == 3 else 1), None) for i in range(8)),
            return_exceptions=True)
        assert isinstance(results[3], tidings.InvalidArgument)
        assert all(isinstance(r, tidings.Published) for i, r in enumerate(results) if i != 3)
        assert len([m async for m in hub.read("t")]) == 7


async def test_a_closed_hub_fails_every_waiter() -> None:
    async with await tidings.connect("memory://") as hub:
        c = Coalescer(hub)
    with pytest.raises(tidings.ClosedError):
        await c.publish("t", 1, None, None)
