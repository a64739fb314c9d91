"""An inline handler runs in the coordinator's task, and gets a timer only once it
waits for something (`saga.inline._eager`). Whatever it awaits must behave exactly as
under a plain `await`: results, exceptions, cancellation and the step's deadline."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tidings.saga.clock import SystemClock
from tidings.saga.definition import Outcome
from tidings.saga.inbox import Inbox, Reply
from tidings.saga.inline import _eager


class _Coord:
    clock = SystemClock()


COORD: Any = _Coord()


async def test_a_handler_that_never_waits_returns_at_once() -> None:
    async def quick() -> dict[str, int]:
        return {"n": 1}

    assert await _eager(quick(), COORD, COORD.clock.now() - 10) == {"n": 1}  # past deadline


async def test_a_handler_that_waits_gets_what_it_awaited() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    loop.call_later(0.01, fut.set_result, 41)

    async def waits() -> int:
        await asyncio.sleep(0)  # a bare yield
        got = await fut  # a future
        await asyncio.sleep(0.001)  # a timer
        return got + 1

    assert await _eager(waits(), COORD, COORD.clock.now() + 5) == 42
    assert await _eager(waits(), COORD, None) == 42  # (fut is done: no wait at all)


async def test_exceptions_come_out_as_raised() -> None:
    async def fails_at_once() -> None:
        raise KeyError("a")

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise ValueError("b")

    with pytest.raises(KeyError):
        await _eager(fails_at_once(), COORD, None)
    with pytest.raises(ValueError, match="b"):
        await _eager(fails_later(), COORD, None)


async def test_the_deadline_interrupts_a_wait_and_the_handler_cleans_up() -> None:
    cleaned = []

    async def hangs() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append("hangs")

    with pytest.raises(TimeoutError):
        await _eager(hangs(), COORD, COORD.clock.now() + 0.05)
    assert cleaned == ["hangs"]


async def test_cancelling_the_task_cancels_the_handler_where_it_waits() -> None:
    seen = []

    async def handler() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = asyncio.create_task(_eager(handler(), COORD, None))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]


async def test_a_handler_may_catch_a_cancellation_and_answer() -> None:
    async def stubborn() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "cleaned up"
        return "slept"

    task = asyncio.create_task(_eager(stubborn(), COORD, None))
    await asyncio.sleep(0.01)
    task.cancel()
    assert await task == "cleaned up"  # as with a plain await


# a saga driver's inbox ----------------------------------------------------------------
A = Reply(0, "action", 1, Outcome("ok"))
B = Reply(1, "action", 1, Outcome("ok"))


async def test_the_inbox_keeps_order_and_wakes_a_waiting_getter() -> None:
    box = Inbox()
    assert box.empty()
    with pytest.raises(asyncio.QueueEmpty):
        box.get_nowait()
    getter = asyncio.ensure_future(box.get())
    await asyncio.sleep(0)
    assert not getter.done()
    box.put_nowait(A)
    box.put_nowait(B)
    assert await getter is A
    assert box.get_nowait() is B and box.empty()


async def test_a_cancelled_getter_leaves_the_item_for_the_next() -> None:
    box = Inbox()
    first = asyncio.ensure_future(box.get())
    second = asyncio.ensure_future(box.get())
    await asyncio.sleep(0)
    box.put_nowait(A)
    first.cancel()  # woken, but cancelled before it ran: the item stays
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second is A
    assert box.empty() and not box._waiters


async def test_a_message_put_back_comes_first_and_wakes_a_waiting_getter() -> None:
    box = Inbox()
    box.put_nowait(B)
    assert box.get_nowait() is B
    getter = asyncio.ensure_future(box.get())
    await asyncio.sleep(0)
    box.put_nowait(A)
    box.put_back(B)  # (taken only to learn that something arrived)
    assert await getter is B
    assert box.take_all() == [A] and box.empty()
