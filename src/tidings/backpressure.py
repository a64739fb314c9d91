"""Backpressure primitives: bounded buffers with an explicit overflow policy.

Every queue in tidings is bounded, every bound has a policy, and every drop is
counted. `Buffer` is the in-process one; `Window` bounds work in flight (the
hub uses it so that `publish` waits instead of growing memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import BufferFull, InvalidArgument

__all__ = ["Buffer", "BufferStatistics", "Overflow", "Window"]

T = TypeVar("T")


class Overflow(enum.Enum):
    """What `Buffer.put` does when the buffer is full."""

    BLOCK = "block"  #: wait for room
    DROP_OLDEST = "drop_oldest"  #: evict the oldest buffered item, keep the new one
    DROP_NEWEST = "drop_newest"  #: discard the incoming item
    FAIL = "fail"  #: raise BufferFull


@dataclass(frozen=True, slots=True)
class BufferStatistics:
    size: int
    capacity: int
    dropped: int
    put: int
    got: int
    waiting_putters: int
    waiting_getters: int


class Buffer(Generic[T]):
    """A bounded FIFO between a producer and a consumer; never holds more than `capacity`.

    Items dropped by the overflow policy are counted in `dropped`.
    """

    def __init__(self, capacity: int, overflow: Overflow = Overflow.BLOCK) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise InvalidArgument(f"Buffer capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(overflow, Overflow):
            raise InvalidArgument(
                f"overflow must be a tidings.Overflow member, got {overflow!r}"
            )
        self.capacity = capacity
        self.overflow = overflow
        self._items: deque[T] = deque()
        # One future per waiting task (as asyncio.Queue does), so the synchronous
        # put_nowait/get_nowait can wake waiters too: a Condition needs its lock.
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        self.dropped = 0
        self._put = 0
        self._got = 0
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.capacity

    @staticmethod
    def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    @staticmethod
    def _wake_all(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self, waiters: deque[asyncio.Future[None]]) -> None:
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            waiter.cancel()
            try:
                waiters.remove(waiter)
            except ValueError:  # already woken: pass the wake-up on so it is not lost
                self._wake_one(waiters)
            raise

    def put_nowait(self, item: T) -> bool:
        """Apply the policy without waiting; False when the item was dropped.

        With BLOCK and no room, raises `BufferFull` (use `await put` to wait).
        """
        if self._closed:
            raise BufferFull("buffer is closed; no more items can be put")
        if len(self._items) >= self.capacity:
            if self.overflow is Overflow.DROP_NEWEST:
                self.dropped += 1
                return False
            if self.overflow is Overflow.DROP_OLDEST:
                self._items.popleft()
                self.dropped += 1
            else:
                raise BufferFull(
                    f"buffer is full ({self.capacity} items); consume faster, raise the "
                    "capacity, or choose another Overflow policy"
                )
        self._items.append(item)
        self._put += 1
        self._wake_one(self._getters)
        return True

    async def put(self, item: T) -> bool:
        """Add an item per the overflow policy; True if it was kept, False if dropped."""
        if self.overflow is Overflow.BLOCK:
            while not self._closed and self.full():
                await self._wait(self._putters)
        kept = self.put_nowait(item)
        if not self.full():
            self._wake_one(self._putters)  # a woken putter that found no room passed its turn
        return kept

    def get_nowait(self) -> T:
        """Take the oldest item; raises IndexError when the buffer is empty."""
        if not self._items:
            raise IndexError("buffer is empty")
        item = self._items.popleft()
        self._got += 1
        self._wake_one(self._putters)
        return item

    async def get(self) -> T:
        """Take the oldest item, waiting for one (raises EOFError when closed and empty)."""
        while not self._items:
            if self._closed:
                raise EOFError("buffer is closed and drained")
            await self._wait(self._getters)
        item = self.get_nowait()
        if self._items:
            self._wake_one(self._getters)  # more left: do not strand the next getter
        return item

    async def close(self) -> None:
        """No more puts; getters drain what is left, then stop."""
        self._closed = True
        self._wake_all(self._getters)
        self._wake_all(self._putters)

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[T]:
        while True:
            try:
                yield await self.get()
            except EOFError:
                return

    def statistics(self) -> BufferStatistics:
        return BufferStatistics(
            len(self._items), self.capacity, self.dropped, self._put, self._got,
            sum(not w.done() for w in self._putters), sum(not w.done() for w in self._getters),
        )


class Window:
    """Counts units of work in flight and makes producers wait above `limit`.

    Waiters are admitted in arrival order. A single acquisition larger than the
    limit is admitted when nothing else is in flight, so an oversized batch
    waits instead of failing forever.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise InvalidArgument("window limit must be >= 1")
        self.limit = limit
        self.used = 0
        self.waits = 0  # how often a producer had to wait (visible in metrics)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def try_acquire(self, n: int) -> bool:
        if not self._waiters and self._fits(n):
            self.used += n
            return True
        return False

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    async def acquire(self, n: int) -> None:
        if self.try_acquire(n):
            return
        self.waits += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await fut  # release() counted us in before waking us
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # admitted, then cancelled: give the room back
            else:
                # a release in the same loop turn may have dropped our entry already
                with contextlib.suppress(ValueError):
                    self._waiters.remove((n, fut))
                self._admit()
            raise

    def release(self, n: int) -> None:
        self.used -= n
        self._admit()

    def _admit(self) -> None:
        # Synchronous, so no wake-up can be lost between a release and a waiter.
        while self._waiters and self._fits(self._waiters[0][0]):
            n, fut = self._waiters.popleft()
            if not fut.done():
                self.used += n
                fut.set_result(None)
