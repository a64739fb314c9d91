"""`tidings.testing.TestHub`: a memory:// hub whose clock a test moves. Every wait
here is virtual: hours of leases, backoff and timeouts pass in milliseconds."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

import tidings
from tidings import Message
from tidings.testing import TestHub


class Shipped(msgspec.Struct):
    order_id: str


async def test_backoff_and_dead_letters_without_waiting() -> None:
    wall = time.monotonic()
    async with TestHub() as t:
        attempts: list[float] = []

        @t.hub.subscriber("orders.*", group="billing", backoff=[1, 5, 30], max_deliver=4)
        async def bill(msg: Message) -> None:
            attempts.append(t.now)
            raise RuntimeError("the payment service is down")

        start = t.now
        await t.hub.publish("orders.created", {"id": "o-1"})
        await t.settle()
        assert attempts == [start]
        await t.advance(0.99)
        assert len(attempts) == 1  # backoff[0] is 1 s
        await t.advance(0.01)
        await t.advance(5)
        assert [a - start for a in attempts] == [0, 1, 6]
        assert t.dead_letters("billing") == []
        await t.advance(3600)
        assert [a - start for a in attempts] == [0, 1, 6, 36]  # the last step repeats
        [dl] = t.dead_letters("billing")
        assert dl.headers["tidings-reason"] == "max_deliver"
        assert dl.headers["tidings-attempts"] == "4"

        assert await t.hub.redrive("billing") == 1
        assert t.dead_letters("billing") == []
        await t.settle()
        assert len(attempts) == 5  # back, from attempt 1
    assert time.monotonic() - wall < 30  # (a loose guard against real sleeping)


async def test_ack_wait_lease_runs_out_on_the_test_clock() -> None:
    async with TestHub() as t:
        await t.hub.publish("jobs.run", b"x")
        sub = await t.hub.subscribe("jobs.run", group="workers", ack_wait=30)
        [m] = await sub.fetch(1, wait=0)
        assert await sub.fetch(1, wait=0) == []
        await t.advance(29)
        assert await sub.fetch(1, wait=0) == []
        await t.advance(1)
        [again] = await sub.fetch(1, wait=0)
        assert (again.position, again.attempt) == (m.position, 2)
        assert again.time == m.time  # stored once, at the test clock's time
        assert m.time.timestamp() == pytest.approx(t.clock.now() - 30)


async def test_fetch_wait_is_real_time_and_idle_consumers_do_not_slow_advance() -> None:
    wall = time.monotonic()
    async with TestHub() as t:
        sub = await t.hub.subscribe("jobs.run", group="workers")
        for g in range(5):  # idle subscribers: nothing is due, so nothing to step through
            @t.hub.subscriber("idle.x", group=f"idle-{g}")
            async def idle(msg: Message) -> None: ...
        assert await sub.fetch(1, wait=0.05) == []  # returns (real time), never hangs
        start = t.now
        await t.advance(7 * 86_400)  # a week
        assert t.now - start == 7 * 86_400
    assert time.monotonic() - wall < 10  # (loose: a week is not stepped second by second)


async def test_nack_delay_and_fetch_wait_use_the_test_clock() -> None:
    async with TestHub() as t:
        await t.hub.publish("jobs.run", b"x")
        sub = await t.hub.subscribe("jobs.run", group="workers")
        [m] = await sub.fetch(1, wait=0)
        await m.nack(delay=600)
        assert await sub.fetch(1, wait=0) == []
        await t.advance(600)
        [again] = await sub.fetch(1, wait=0)
        assert again.attempt == 2


async def test_typed_subscriber_and_published() -> None:
    async with TestHub() as t:
        seen: list[Shipped] = []

        @t.hub.subscriber("orders.shipped", group="mail")
        async def mail(event: Shipped) -> None:
            seen.append(event)
            await t.hub.publish("mail.sent", {"order_id": event.order_id})

        await t.hub.publish("orders.shipped", Shipped(order_id="o-1"))
        await t.hub.publish("orders.shipped", {"nope": 1})  # does not decode
        await t.settle()
        assert seen == [Shipped(order_id="o-1")]
        assert [m.decode() for m in t.published("mail.sent")] == [{"order_id": "o-1"}]
        assert [m.topic for m in t.published("orders.>")] == ["orders.shipped"] * 2
        [dl] = t.dead_letters("mail")
        assert dl.headers["tidings-reason"] == "decode-error"
        assert "order_id" in dl.headers["tidings-error"]  # what did not fit, and where


async def test_fake_replaces_a_handler_by_name() -> None:
    async with TestHub() as t:
        calls: list[str] = []

        @t.hub.subscriber("a.b", group="g")
        async def real(msg: Message) -> None:
            calls.append("real")

        async def fake(msg: Message) -> None:
            calls.append("fake")

        t.fake("real", fake)
        await t.hub.publish("a.b", b"1")
        await t.settle()
        assert calls == ["fake"]
        with pytest.raises(tidings.NotFound, match="real"):
            t.fake("missing", fake)
        with pytest.raises(tidings.InvalidArgument, match="async"):
            t.fake("real", lambda m: None)  # type: ignore[arg-type,return-value]


async def test_projections_are_caught_up_when_settled() -> None:
    class Jotted(tidings.Event):
        text: str

    async with TestHub() as t:
        texts: list[str] = []

        @t.hub.projection("texts")
        async def project(rec: tidings.RecordedEvent, tx: Any) -> None:
            if isinstance(rec.event, Jotted):
                texts.append(rec.event.text)

        await t.hub.events.append("note-1", [Jotted(text="a"), Jotted(text="b")])
        await t.settle()
        assert texts == ["a", "b"]


async def test_bad_arguments() -> None:
    with pytest.raises(tidings.InvalidArgument, match="start"):
        TestHub(start=-1)
    async with TestHub() as t:
        for bad in (-1, float("nan"), float("inf"), "1", True):
            with pytest.raises(tidings.InvalidArgument, match="advance"):
                await t.advance(bad)  # type: ignore[arg-type]
        with pytest.raises(tidings.NotFound, match="no saga"):
            await t.saga("s-1")
    with pytest.raises(tidings.InvalidArgument, match="async with"):
        _ = TestHub().hub


async def test_a_handler_that_never_returns_does_not_hang_the_exit() -> None:
    async with TestHub() as t:
        @t.hub.subscriber("a.b", group="g")
        async def hangs(msg: Message) -> None:
            await asyncio.Event().wait()

        await t.hub.publish("a.b", b"x")
        await t.settle()
    # (reaching here is the test: leaving the block cancelled the hung handler)


async def test_dead_letters_of_a_subscriber_with_its_own_dead_letter_topic() -> None:
    async with TestHub() as t:
        @t.hub.subscriber("a.b", group="g", dead_letter="g.failed", max_deliver=1)
        async def fails(msg: Message) -> None:
            raise RuntimeError("no")

        await t.hub.publish("a.b", b"x")
        await t.settle()
        [dl] = t.dead_letters("g")
        assert dl.topic == "g.failed"
