"""Backpressure primitives: `Buffer` (bounded, with an overflow policy) and `Window`."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tidings
from tidings import Buffer, BufferFull, Overflow
from tidings.backpressure import Window

GUARD = 10.0


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(10):
        await asyncio.sleep(0)


# construction ------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1, 1.5, "3", None, True], ids=repr)
def test_capacity_must_be_a_positive_int(capacity: Any) -> None:
    with pytest.raises(tidings.InvalidArgument, match="capacity"):
        Buffer(capacity)


def test_overflow_must_be_a_policy() -> None:
    with pytest.raises(tidings.InvalidArgument, match="Overflow"):
        Buffer(3, overflow="drop_oldest")  # type: ignore[arg-type]


def test_defaults() -> None:
    buf: Buffer[int] = Buffer(2)
    assert buf.overflow is Overflow.BLOCK
    assert (len(buf), buf.capacity, buf.dropped, buf.full()) == (0, 2, 0, False)


# policies ----------------------------------------------------------------------------------


async def test_block_waits_for_room_and_resumes() -> None:
    buf: Buffer[int] = Buffer(2)
    assert await buf.put(1) and await buf.put(2)
    putter = asyncio.create_task(buf.put(3))
    await settle()
    assert not putter.done(), "put on a full BLOCK buffer must wait"
    assert buf.statistics().waiting_putters == 1
    assert len(buf) == 2
    assert await buf.get() == 1
    assert await asyncio.wait_for(putter, GUARD) is True
    assert [await buf.get(), await buf.get()] == [2, 3]
    assert buf.dropped == 0


async def test_block_wakes_putters_in_order() -> None:
    buf: Buffer[int] = Buffer(1)
    await buf.put(0)
    putters = [asyncio.create_task(buf.put(i)) for i in (1, 2, 3)]
    await settle()
    got = []
    for _ in range(4):
        got.append(await asyncio.wait_for(buf.get(), GUARD))
    await asyncio.wait_for(asyncio.gather(*putters), GUARD)
    assert got == [0, 1, 2, 3]


async def test_drop_oldest_evicts_and_counts() -> None:
    buf: Buffer[int] = Buffer(3, overflow=Overflow.DROP_OLDEST)
    results = [await buf.put(i) for i in range(5)]
    assert results == [True] * 5  # the new item is always kept
    assert buf.dropped == 2
    assert len(buf) == 3
    assert [await buf.get() for _ in range(3)] == [2, 3, 4]


async def test_drop_newest_discards_the_incoming_and_counts() -> None:
    buf: Buffer[int] = Buffer(3, overflow=Overflow.DROP_NEWEST)
    results = [await buf.put(i) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert buf.dropped == 2
    assert [await buf.get() for _ in range(3)] == [0, 1, 2]


async def test_fail_raises_buffer_full() -> None:
    buf: Buffer[int] = Buffer(2, overflow=Overflow.FAIL)
    await buf.put(1)
    await buf.put(2)
    with pytest.raises(BufferFull, match="full"):
        await buf.put(3)
    assert len(buf) == 2 and buf.dropped == 0
    assert await buf.get() == 1
    assert await buf.put(3)


def test_put_nowait_applies_the_policy_without_waiting() -> None:
    block: Buffer[int] = Buffer(1)
    assert block.put_nowait(1)
    with pytest.raises(BufferFull):
        block.put_nowait(2)
    newest: Buffer[int] = Buffer(1, Overflow.DROP_NEWEST)
    newest.put_nowait(1)
    assert newest.put_nowait(2) is False and newest.dropped == 1
    with pytest.raises(IndexError):
        Buffer[int](1).get_nowait()


async def test_put_nowait_wakes_a_waiting_getter() -> None:
    buf: Buffer[str] = Buffer(2)
    getter = asyncio.create_task(buf.get())
    await settle()
    buf.put_nowait("x")
    assert await asyncio.wait_for(getter, GUARD) == "x"


async def test_get_nowait_wakes_a_waiting_putter() -> None:
    buf: Buffer[int] = Buffer(1)
    buf.put_nowait(1)
    putter = asyncio.create_task(buf.put(2))
    await settle()
    assert buf.get_nowait() == 1
    assert await asyncio.wait_for(putter, GUARD) is True
    assert buf.get_nowait() == 2


async def test_get_waits_for_an_item() -> None:
    buf: Buffer[int] = Buffer(2)
    getter = asyncio.create_task(buf.get())
    await settle()
    assert not getter.done()
    assert buf.statistics().waiting_getters == 1
    await buf.put(7)
    assert await asyncio.wait_for(getter, GUARD) == 7


async def test_cancelled_waiters_do_not_swallow_wakeups() -> None:
    buf: Buffer[int] = Buffer(2)
    cancelled = asyncio.create_task(buf.get())
    waiting = asyncio.create_task(buf.get())
    await settle()
    buf.put_nowait(1)  # wakes the first getter...
    cancelled.cancel()  # ...which is cancelled before it runs: the item must not be stranded
    assert await asyncio.wait_for(waiting, GUARD) == 1
    assert cancelled.cancelled()
    assert buf.statistics().waiting_getters == 0


async def test_async_iteration_drains_then_stops_on_close() -> None:
    buf: Buffer[int] = Buffer(10)
    for i in range(3):
        await buf.put(i)
    got: list[int] = []

    async def consume() -> None:
        async for item in buf:
            got.append(item)

    task = asyncio.create_task(consume())
    await settle()
    await buf.put(3)
    await buf.close()
    await asyncio.wait_for(task, GUARD)
    assert got == [0, 1, 2, 3]


async def test_close_lets_getters_drain_and_stops_puts() -> None:
    buf: Buffer[int] = Buffer(3)
    await buf.put(1)
    await buf.close()
    with pytest.raises(BufferFull, match="closed"):
        await buf.put(2)
    assert await buf.get() == 1
    with pytest.raises(EOFError):
        await buf.get()


async def test_close_wakes_blocked_getters_and_putters() -> None:
    empty: Buffer[int] = Buffer(1)
    getter = asyncio.create_task(empty.get())
    full: Buffer[int] = Buffer(1)
    await full.put(1)
    putter = asyncio.create_task(full.put(2))
    await settle()
    await empty.close()
    await full.close()
    with pytest.raises(EOFError):
        await asyncio.wait_for(getter, GUARD)
    with pytest.raises(BufferFull):
        await asyncio.wait_for(putter, GUARD)
    assert len(full) == 1


async def test_statistics_count_everything() -> None:
    buf: Buffer[int] = Buffer(2, Overflow.DROP_OLDEST)
    for i in range(5):
        await buf.put(i)
    await buf.get()
    st_ = buf.statistics()
    assert (st_.size, st_.capacity, st_.dropped, st_.put, st_.got) == (1, 2, 3, 5, 1)
    assert (st_.waiting_putters, st_.waiting_getters) == (0, 0)


async def test_many_producers_and_consumers_lose_nothing_under_block() -> None:
    buf: Buffer[int] = Buffer(3)
    n, producers, consumers = 200, 4, 3
    got: list[int] = []
    biggest = 0

    async def produce(k: int) -> None:
        for i in range(k, n, producers):
            await buf.put(i)

    async def consume() -> None:
        nonlocal biggest
        async for item in buf:
            biggest = max(biggest, len(buf))
            got.append(item)
            await asyncio.sleep(0)

    readers = [asyncio.create_task(consume()) for _ in range(consumers)]
    await asyncio.wait_for(asyncio.gather(*(produce(k) for k in range(producers))), GUARD)
    await buf.close()
    await asyncio.wait_for(asyncio.gather(*readers), GUARD)
    assert sorted(got) == list(range(n))
    assert biggest <= 3 and buf.dropped == 0


# a model of the buffer ---------------------------------------------------------------------

ops = st.lists(st.one_of(st.tuples(st.just("put"), st.integers(0, 999)),
                         st.tuples(st.just("get"), st.just(0))), max_size=60)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5), st.sampled_from([Overflow.DROP_OLDEST, Overflow.DROP_NEWEST,
                                           Overflow.FAIL, Overflow.BLOCK]), ops)
def test_buffer_matches_a_model(capacity: int, overflow: Overflow,
                                operations: list[tuple[str, int]]) -> None:
    async def run() -> None:
        buf: Buffer[int] = Buffer(capacity, overflow)
        model: deque[int] = deque()
        dropped = 0
        for op, value in operations:
            if op == "put":
                full = len(model) >= capacity
                if overflow is Overflow.BLOCK and full:
                    putter = asyncio.create_task(buf.put(value))
                    await settle()
                    assert not putter.done()
                    assert await buf.get() == model.popleft()
                    assert await asyncio.wait_for(putter, GUARD) is True
                    model.append(value)
                elif overflow is Overflow.FAIL and full:
                    with pytest.raises(BufferFull):
                        await buf.put(value)
                elif overflow is Overflow.DROP_NEWEST and full:
                    assert await buf.put(value) is False
                    dropped += 1
                else:
                    if full:  # DROP_OLDEST
                        model.popleft()
                        dropped += 1
                    assert await buf.put(value) is True
                    model.append(value)
            elif model:
                assert await buf.get() == model.popleft()
            else:
                with pytest.raises(IndexError):
                    buf.get_nowait()
            assert len(buf) == len(model) <= capacity
            assert buf.dropped == dropped
            assert buf.full() == (len(model) >= capacity)
        await buf.close()
        assert [item async for item in buf] == list(model)

    asyncio.run(run())


# Window ------------------------------------------------------------------------------------


def test_window_limit_must_be_positive() -> None:
    with pytest.raises(tidings.InvalidArgument):
        Window(0)


async def test_window_admits_up_to_the_limit_then_waits() -> None:
    w = Window(3)
    await w.acquire(2)
    await w.acquire(1)
    assert w.used == 3 and w.waits == 0
    waiter = asyncio.create_task(w.acquire(2))
    await settle()
    assert not waiter.done() and w.waits == 1
    w.release(1)
    await settle()
    assert not waiter.done(), "2 more would exceed the limit of 3"
    w.release(2)
    await asyncio.wait_for(waiter, GUARD)
    assert w.used == 2


async def test_window_admits_an_oversized_batch_when_empty() -> None:
    w = Window(2)
    await asyncio.wait_for(w.acquire(5), GUARD)
    assert w.used == 5
    small = asyncio.create_task(w.acquire(1))
    await settle()
    assert not small.done()
    w.release(5)
    await asyncio.wait_for(small, GUARD)
    assert w.used == 1


async def test_window_wakes_every_waiter_that_fits() -> None:
    w = Window(2)
    await w.acquire(2)
    waiters = [asyncio.create_task(w.acquire(1)) for _ in range(2)]
    await settle()
    w.release(2)
    await asyncio.wait_for(asyncio.gather(*waiters), GUARD)
    assert w.used == 2


async def test_publish_waits_while_the_pending_window_is_full() -> None:
    hub = await tidings.connect("memory://", max_pending=1)
    try:
        await hub._window.acquire(1)  # as if one publish were in flight
        publishing = asyncio.create_task(hub.publish("a.b", b"x"))
        await settle()
        assert not publishing.done(), "publish must wait, not fail, when the window is full"
        hub._window.release(1)
        assert (await asyncio.wait_for(publishing, GUARD)).position == 1
    finally:
        await hub.close()


async def test_many_publishers_through_a_small_window_all_finish() -> None:
    hub = await tidings.connect("memory://", max_pending=3)
    try:
        seen: list[int] = []
        real = hub.engine.append

        async def slow_append(batch: Any) -> Any:
            seen.append(hub._window.used)
            await asyncio.sleep(0)
            return await real(batch)

        hub.engine.append = slow_append  # type: ignore[method-assign]
        done = await asyncio.wait_for(
            asyncio.gather(*(hub.publish("a.b", b"x") for _ in range(50))), GUARD)
        assert len({p.position for p in done}) == 50
        assert max(seen) <= 3 and hub._window.used == 0
    finally:
        await hub.close()


async def test_a_window_waiter_cancelled_as_room_frees_is_simply_cancelled() -> None:
    w = Window(1)
    await w.acquire(1)
    waiter = asyncio.create_task(w.acquire(1))
    await asyncio.sleep(0)  # it waits for room
    waiter.cancel()
    w.release(1)  # in the same turn, before the waiter's own clean-up runs
    with pytest.raises(asyncio.CancelledError):
        await waiter  # a cancellation, not a ValueError from the waiter queue
    assert w.used == 0
    await asyncio.wait_for(w.acquire(1), 1.0)  # and the room is really free
