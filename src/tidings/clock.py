"""Clocks: the system clock, and a manual one that moves only when a test says so.

The hub reads time through its clock (`hub.clock`): subscriptions (leases, nack
delays, backoff, idle waits), the memory engine's timestamps, retention and the
saga coordinator (step timeouts, retries). `tidings.testing.TestHub` swaps in a
`ManualClock`, so a test skips an hour of redeliveries and timeouts in
milliseconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .engines.base import Engine

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep_until(self, when: float) -> None:
        """Return once `now()` has reached `when`."""
        ...

    async def wait(self, engine: Engine, event: asyncio.Event, due: float | None,
                   cap: float | None) -> None:
        """Wait for `event` (`engine.wait`), until `due` on this clock at the latest, and
        at most `cap` real seconds."""
        ...


class SystemClock:
    """Wall-clock time (seconds since the epoch), so deadlines survive a restart."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, when: float) -> None:
        delay = when - time.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def wait(self, engine: Engine, event: asyncio.Event, due: float | None,
                   cap: float | None) -> None:
        if due is not None:
            left = max(0.0, due - time.time())
            cap = left if cap is None else min(cap, left)
        await engine.wait(event, cap)


class ManualClock:
    """A clock that moves only when the test says so: deadlines without real waiting.

    `advance(seconds)` (or `move_to(when)`) wakes every sleeper whose time has come.
    """

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep_until(self, when: float) -> None:
        if when <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (when, next(self._seq), fut))
        await fut

    async def wait(self, engine: Engine, event: asyncio.Event, due: float | None,
                   cap: float | None) -> None:
        # No sleeper without a due time: an idle consumer does not make `advance` stop
        # at every second (its real-time cap is only a safety net).
        if event.is_set() or (due is not None and due <= self._now):
            await asyncio.sleep(0)
            return
        waits = {asyncio.ensure_future(engine.wait(event, None))}
        if due is not None:
            waits.add(asyncio.ensure_future(self.sleep_until(due)))
        try:
            await asyncio.wait(waits, timeout=cap, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def move_to(self, when: float) -> None:
        """Set the time (never backwards) and wake the sleepers due by then; they run
        at the event loop's next turns."""
        self._now = max(self._now, when)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def next_wakeup(self) -> float | None:
        """When the earliest sleeper still waiting is due (None: nobody sleeps)."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)  # cancelled: nobody waits on it any more
        return self._sleepers[0][0] if self._sleepers else None

    async def advance(self, seconds: float) -> None:
        """Move time forward and let the woken tasks run."""
        self.move_to(self._now + seconds)
        for _ in range(5):
            await asyncio.sleep(0)

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())
