"""Which of another process's acks wake a hub's waiting consumers (NOTIFY payloads).

A consumer waits for news (a message stored on its pattern, one handed back) or, when
a fetch found the subscription's `max_in_flight` rows out, for room: acks. An ack wakes
other processes' consumers only when the subscription had no room before it (woken by
every ack, each process's idle consumers fetched nothing after each of another's). Acks
are stored by a settle of their own (`ack(wait=True)`, a flush) or with the consumer's
next fetch: both are checked. The consumers never look again on their own here
(`no_idle_poll`): only a notification wakes them within the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tidings

pytestmark = [pytest.mark.service, pytest.mark.usefixtures("no_idle_poll")]

GUARD = 20.0
ACKS = ["settle", "with the next fetch"]


def counting_fetches(hub: tidings.Hub, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    calls: list[float] = []
    fetch = hub.engine.fetch

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        return await fetch(*args, **kwargs)

    monkeypatch.setattr(hub.engine, "fetch", counted)
    return calls


async def ack_all(sub: tidings.Subscription, msgs: list[tidings.Message], how: str) -> None:
    if how == "settle":
        for m in msgs:
            await m.ack(wait=True)
    else:
        for m in msgs:
            await m.ack()
        await sub.fetch(1, wait=0)  # (carries them)


@contextlib.asynccontextmanager
async def two_hubs(url: str, pattern: str, published: int, key: str | None = None,
                   **spec: Any) -> AsyncIterator[tuple[tidings.Hub, tidings.Hub,
                                                       tidings.Subscription,
                                                       tidings.Subscription]]:
    """Two hubs ("processes") A and B consuming one subscription (`spec`) of `pattern`
    ('<prefix>.>'), `published` messages (0, 1, …) stored by A on <prefix>.x with `key`:
    (A, B, A's consumer, B's consumer)."""
    async with await tidings.connect(url) as a, await tidings.connect(url) as b:
        sub_a = await a.subscribe(pattern, group="g", **spec)
        sub_b = await b.subscribe(pattern, group="g", **spec)
        for i in range(published):
            await a.publish(pattern.replace(">", "x"), i, key=key)
        yield a, b, sub_a, sub_b


async def until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("how", ACKS)
async def test_a_consumer_waiting_for_room_is_woken_by_another_processes_ack(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    async with two_hubs(postgres_url, "room.>", 3, max_in_flight=2) as (_, b, sub_a, sub_b):
        fetches_b = counting_fetches(b, monkeypatch)
        got = await sub_a.fetch(2, wait=GUARD)
        assert [m.decode() for m in got] == [0, 1]  # the subscription is full
        waiting = asyncio.create_task(sub_b.fetch(1, wait=GUARD))
        await until(lambda: len(fetches_b) == 1, "B looking")
        await asyncio.sleep(0.3)
        assert len(fetches_b) == 1 and not waiting.done()  # no room: B waits for acks
        await ack_all(sub_a, got[:1], how)
        await until(lambda: len(fetches_b) >= 2, "B's consumer woken by A's ack")
        if how == "settle":  # room for one: B takes the third message
            assert [m.decode() for m in await waiting] == [2]
        else:  # A's own fetch that carried the ack took it
            waiting.cancel()


@pytest.mark.parametrize("how", ACKS)
async def test_acks_with_room_to_spare_do_not_wake_another_processes_consumers(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    async with two_hubs(postgres_url, "spare.>", 3, max_in_flight=100) as (a, b, sub_a,
                                                                           sub_b):
        taken = await sub_a.fetch(3, wait=GUARD)
        assert [m.decode() for m in taken] == [0, 1, 2]
        fetches_b = counting_fetches(b, monkeypatch)
        waiting = asyncio.create_task(sub_b.fetch(10, wait=GUARD))
        await until(lambda: len(fetches_b) == 1, "B looking")
        await ack_all(sub_a, taken, how)  # 97 rows of room before them
        await asyncio.sleep(0.5)
        assert len(fetches_b) == 1, "an ack with room to spare woke B's consumer"
        await a.publish("spare.x", 3)  # news does wake it
        assert [m.decode() for m in await asyncio.wait_for(waiting, GUARD)] == [3]


@pytest.mark.parametrize("how", ["settle", "flush"])
async def test_an_ack_that_lets_a_parked_message_go_wakes_another_processes_consumer(
        postgres_url: str, how: str) -> None:
    # (with the next fetch, A's own fetch would take the message the ack lets go)
    async with two_hubs(postgres_url, "keyed.>", 2, key="k", ordered=True,
                        max_in_flight=100) as (_, _, sub_a, sub_b):
        head = await sub_a.fetch(10, wait=GUARD)
        assert [m.decode() for m in head] == [0]  # the second waits behind the first
        waiting = asyncio.create_task(sub_b.fetch(10, wait=GUARD))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # room to spare, but nothing B may take
        if how == "settle":
            await head[0].ack(wait=True)
        else:
            await head[0].ack()
            await sub_a.flush()
        assert [m.decode() for m in await asyncio.wait_for(waiting, GUARD)] == [1]
