"""`TestHub`: test a tidings application fast, on `memory://`, with a clock you move.

    from tidings.testing import TestHub

    async def test_credit_limit() -> None:
        async with TestHub() as t:
            app(t.hub)                       # register subscribers, handlers, sagas
            sid = await t.hub.sagas(create_order).start({...})
            await t.settle()                 # run until nothing more is due now
            assert (await t.saga(sid))["status"] == "compensated"
            await t.advance(60)              # a minute passes: timeouts, redeliveries,
                                             # nack delays and backoff fire, in order

The hub is a real `memory://` hub (groups, acks, leases, redelivery, dead letters,
sagas, the event store: the same code as on every engine) whose clock is a
`ManualClock`: nothing waits on the wall clock. `advance(seconds)` steps from one
due time to the next (a 1 s, then 5 s, then 30 s backoff all fire within
`advance(40)`), letting the application run to rest at each; `settle()` runs it to
rest without moving time. Registered subscribers and command handlers run by
themselves (`hub.run()` starts at the first `settle`/`advance`), and projections
are caught up at each rest.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol, cast

from .clock import ManualClock
from .errors import InvalidArgument, NotFound, TidingsError, Unsupported
from .hub import Hub, connect
from .messages import Message
from .redrive import REDRIVEN, dead_letter_topic, marker_topic

__all__ = ["TestHub"]


class _Memory(Protocol):
    """What a TestHub uses of the memory engine beyond the protocol (engines/memory.py)."""

    now: Callable[[], float]

    def stored(self, pattern: str) -> list[Message]: ...

#: 2023-11-14T22:13:20Z: a fixed, recognizable start, so test output is repeatable.
START = 1_700_000_000.0
#: Real seconds one rest may take before `settle` decides the application never rests.
MAX_BUSY = 120.0
#: Consecutive idle turns that count as "at rest".
_CALM = 3


class TestHub:
    """A `memory://` hub on a time-skipping clock, with ways to look inside."""

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, *, start: float = START, **options: Any) -> None:
        """`start`: the clock's first time (seconds since the epoch); `options` go to
        `tidings.connect` (max_payload, …)."""
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not (
                0 <= start < 2**40):
            raise InvalidArgument(f"start is seconds since the epoch, got {start!r}")
        self.clock = ManualClock(float(start))
        # retention is trimmed at each step of `advance` instead of a timer every 30 s
        # of test time (a month's advance would stop 86,000 times)
        self._options = {"trim_interval": None, **options}
        self._hub: Hub | None = None
        self._runner: asyncio.Task[None] | None = None
        self._running: tuple[int, int] = (0, 0)  # subscribers, handlers the runner runs
        self._names: dict[int, str] = {}  # subscriber -> its function's name before a fake

    # lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> TestHub:
        hub = await connect("memory://", **self._options)
        cast(_Memory, hub.engine).now = self.clock.now
        hub.clock = self.clock
        self._hub = hub
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._stop_runner()
        if self._hub is not None:
            await self._hub.close()

    @property
    def hub(self) -> Hub:
        """The hub to register the application on (`app(t.hub)`)."""
        if self._hub is None:
            raise InvalidArgument("use the TestHub in `async with TestHub() as t:`")
        return self._hub

    @property
    def now(self) -> float:
        """The clock's time (seconds since the epoch)."""
        return self.clock.now()

    # time ----------------------------------------------------------------------------
    async def settle(self) -> None:
        """Run the application until it rests: every delivery handled, every saga step
        that can go on now gone on, projections caught up. Time does not move."""
        await self._ensure_running()
        for _ in range(1000):
            await self._rest()
            if not await self._catch_up_projections():
                return
        raise TidingsError("the application never rests: a projection keeps changing")

    async def advance(self, seconds: float) -> None:
        """Let `seconds` pass: whatever falls due on the way (ack_wait leases, nack
        delays, backoff, saga step timeouts and retries, retention) fires in time
        order, the application settling after each."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
                0 <= seconds < math.inf):
            raise InvalidArgument(f"advance takes seconds >= 0, got {seconds!r}")
        await self.settle()
        target = self.clock.now() + seconds
        while (due := self.clock.next_wakeup()) is not None and due <= target:
            self.clock.move_to(due)
            await self.hub.trim()  # retention, at this step's time
            await self.settle()
        self.clock.move_to(target)
        await self.hub.trim()
        await self.settle()

    async def _rest(self) -> None:
        """Turn the event loop until no task is ready to run."""
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)  # asyncio's run queue (CPython's loops)
        if ready is None:
            raise Unsupported(
                f"TestHub needs asyncio's own event loop (it watches the loop's run queue "
                f"to know when the application rests); this one is {type(loop).__name__} "
                "(uvloop?): run the tests on asyncio's default loop")
        calm = 0
        busy_until = time.monotonic() + MAX_BUSY
        while True:
            await asyncio.sleep(0)
            if time.monotonic() > busy_until:
                raise TidingsError(f"the application is still busy after {MAX_BUSY:.0f} s at "
                                   "one test time: something loops without waiting")
            due = self.clock.next_wakeup()
            if due is not None and due <= self.now:
                self.clock.move_to(self.now)  # a sleeper due now (slept 0 s)
                calm = 0
                continue
            calm = calm + 1 if not ready else 0
            if calm >= _CALM:
                if self._runner is not None and self._runner.done():
                    self._runner.result()  # the handlers' runner failed: say why
                return

    async def _catch_up_projections(self) -> bool:
        """Bring every registered projection up to date; True if any moved."""
        projections = self.hub.projections
        if not projections.names:
            return False
        before = [s.position for s in await projections.statuses()]
        await projections.catch_up()
        return before != [s.position for s in await projections.statuses()]

    async def _ensure_running(self) -> None:
        """Run the registered subscribers and command handlers (again when more were
        registered since)."""
        hub = self.hub
        registered = (len(hub.subscribers), len(hub.command_handlers))
        if registered == self._running or registered == (0, 0):
            return
        await self._stop_runner()
        self._running = registered
        self._runner = asyncio.create_task(hub.run(), name="tidings:testhub:run")
        await asyncio.sleep(0)

    async def _stop_runner(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    # inspection ----------------------------------------------------------------------
    def published(self, topic: str) -> list[Message]:
        """Every message stored on `topic` (a pattern works too), oldest first."""
        from . import topics as _topics

        _topics.validate_pattern(topic)
        return cast(_Memory, self.hub.engine).stored(topic)

    def dead_letters(self, group: str, *, dead_letter: str | None = None) -> list[Message]:
        """`group`'s dead letters not redriven yet, oldest first (headers say why:
        `tidings-reason`, `tidings-attempts`, `tidings-original-topic`, …)."""
        if dead_letter is None:  # where its subscribers send them, if they chose
            named = {h.options["dead_letter"] for h in self.hub.subscribers
                     if h.group == group and h.options.get("dead_letter")}
            if len(named) == 1:
                dead_letter = named.pop()
        source = dead_letter_topic(group, dead_letter)
        done = {m.headers.get(REDRIVEN) for m in self.published(marker_topic(group))}
        return [m for m in self.published(source)
                if m.headers.get("tidings-group") == group and m.id not in done]

    async def saga(self, saga_id: str) -> dict[str, Any]:
        """A saga by id, whichever registered definition it belongs to: its status,
        data and timeline (`steps`: every step started, completed, failed, …)."""
        for definition in self.hub.saga_definitions:
            try:
                return await self.hub.sagas(definition).get(saga_id)
            except NotFound:
                continue
        raise NotFound(f"no saga {saga_id!r} in this TestHub; start one with "
                       "`await t.hub.sagas(definition).start(data)`")

    # fakes ---------------------------------------------------------------------------
    def handler(self, name: str) -> Callable[[Any], Awaitable[Any]]:
        """The function that runs now for a command (or a subscriber, by its function's
        name or group): keep it to put it back after a `fake`."""
        for c in self.hub.command_handlers:
            if c.command == name:
                return c.fn
        for h in self.hub.subscribers:
            if self._names.setdefault(id(h), getattr(h.fn, "__name__", h.group)) == name or (
                    h.group == name):
                return h.fn
        raise NotFound(f"no command handler or subscriber named {name!r}")

    def fake(self, name: str, fn: Callable[[Any], Awaitable[Any]]) -> None:
        """Replace a registered command handler (by command name) or subscriber (by its
        function's name, or its group) with `fn`, an async function of the same shape."""
        if not inspect.iscoroutinefunction(fn):
            raise InvalidArgument(f"a fake must be an async function, got {fn!r}")
        found = False
        for c in self.hub.command_handlers:
            if c.command == name:
                c.fn = fn
                found = True
        for h in self.hub.subscribers:
            own = self._names.setdefault(id(h), getattr(h.fn, "__name__", h.group))
            if own == name or h.group == name:
                h.fn = fn
                found = True
        if not found:
            known = sorted({c.command for c in self.hub.command_handlers}
                           | {self._names[id(h)] for h in self.hub.subscribers})
            raise NotFound(f"no command handler or subscriber named {name!r}; registered: "
                           f"{', '.join(known) or 'none'}")
