"""Pub/sub: durable subscriptions, competing consumers, handlers and their runner.

Delivered at least once: a message comes back after `ack_wait` until it is
acked, and goes to the dead-letter topic after `max_deliver` attempts.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .clock import Clock, SystemClock
from .engines.base import Engine, Settle
from .engines.delivery import SubscriptionSpec
from .errors import ClosedError, DecodeError, InvalidArgument
from .inputs import decodable, parameter_type
from .messages import MAX_POSITION, Message
from .metrics import Counters
from .redrive import REDRIVE_GROUP, REDRIVEN, moved_id

if TYPE_CHECKING:
    from types import TracebackType

    from .telemetry import Telemetry

__all__ = ["Handler", "Subscription"]

log = logging.getLogger("tidings.pubsub")

#: The dead-letter reason of a message that does not decode as its handler's input type.
DECODE_ERROR = "decode-error"
#: How long an idle consumer sleeps at most between looks (a safety net under wake-ups).
IDLE_CHECK = 1.0


class Subscription:
    """One consumer attached to a durable subscription (`group` + pattern).

    Consumers of the same subscription share its messages; every subscription
    gets every message. Never holds more than `max_in_flight` unacked messages.
    """

    #: the hub's OpenTelemetry tracing, set by `hub.subscribe` (None: off)
    telemetry: Telemetry | None = None

    def __init__(self, engine: Engine, handle: Any, spec: SubscriptionSpec, batch: int,
                 clock: Clock | None = None, *, counters: Counters | None = None) -> None:
        self._counts = (counters if counters is not None else Counters()).group(spec.group)
        self._engine = engine
        self._clock: Clock = clock or SystemClock()
        self._handle = handle
        self.spec = spec
        self._batch = max(1, min(batch, spec.max_in_flight))
        self._buf: deque[Message] = deque()
        self._settles: list[Settle] = []
        self._waiters: list[asyncio.Future[None]] = []  # ack(wait=True) callers of _settles
        self._flushing: asyncio.Task[None] | None = None  # scheduled, gathering acks
        self._inflight: set[asyncio.Task[None]] = set()  # flushes not yet committed
        self._closed = False
        self._skipped = False  # the last look found only others' redriven messages

    @property
    def group(self) -> str:
        return self.spec.group

    @property
    def pattern(self) -> str:
        return self.spec.pattern

    def _settle(self, msg: Message, kind: str, delay: float | None, wait: bool,
                reason: str | None = None, error: str | None = None
                ) -> asyncio.Future[None] | None:
        position = msg.position
        if not 0 <= position <= MAX_POSITION:
            # Refused alone: a settle the engine cannot store would be queued again and
            # fail every later fetch of this consumer.
            raise InvalidArgument(f"message position must be from 0 to "
                                  f"{MAX_POSITION}, got {position!r}; settle messages as "
                                  "a subscription delivered them")
        self._settles.append(Settle(position, kind, delay, reason,  # type: ignore[arg-type]
                                    error))
        if kind != "release":  # (a message handed back was not settled by the application)
            n = (self._counts.acked if kind == "ack"
                 else self._counts.settled(msg, self.spec, kind))
            n[msg.topic] = n.get(msg.topic, 0) + 1  # (metrics: a dict increment per ack)
        if self.telemetry is not None:
            self.telemetry.settle(msg, self.spec.group, kind)
        waiter: asyncio.Future[None] | None = None
        if wait:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
        if self._flushing is None:
            task = asyncio.get_running_loop().create_task(self._flush())
            self._flushing = task
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        return waiter

    def _take_settles(self) -> tuple[list[Settle], list[asyncio.Future[None]]]:
        taken = self._settles, self._waiters
        self._settles, self._waiters = [], []
        return taken

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let a burst of acks gather into one write
        self._flushing = None
        await self._settle_now()

    async def _settle_now(self) -> None:
        items, waiters = self._take_settles()
        if items:
            try:
                await self._engine.settle(self._handle, items, self._clock.now())
            except BaseException as exc:
                self._settles[:0] = items  # not recorded: the next flush or fetch carries them
                _answer(waiters, exc)
                raise
            _answer(waiters, None)

    async def flush(self) -> None:
        """Wait until every ack/nack/term made so far has reached the engine (raises the
        engine's error if they could not be recorded; they are kept for the next try)."""
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self._settle_now()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        while True:
            if self._buf:
                return self._buf.popleft()
            if self._closed:
                raise StopAsyncIteration
            await self._fill()

    async def fetch(self, max: int = 100, wait: float | None = None) -> list[Message]:
        """Claim up to `max` messages now, waiting up to `wait` seconds for the first.

        (`wait` is real time, whatever the hub's clock: in a TestHub, deliveries come
        without the test clock moving.)
        """
        deadline = None if wait is None else time.monotonic() + wait
        look = True
        while not self._buf and not self._closed:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0 and not look:
                break
            # always look once, even with wait=0; and again at once after a look that
            # only found messages redriven for other subscriptions (acked unseen)
            look = await self._fill(
                None if remaining is None else (remaining if remaining > 0 else 0.0), limit=max)
        out: list[Message] = []
        while self._buf and len(out) < max:
            out.append(self._buf.popleft())
        return out

    async def _fill(self, timeout: float | None = None, limit: int | None = None) -> bool:
        """Fetch into the buffer, or wait for a change; True if the fetch brought
        messages that were all skipped (worth looking again at once)."""
        engine = self._engine
        changed = engine.changes(self.spec.pattern)
        settles, waiters = self._take_settles()
        n = self._batch if limit is None or self._skipped else max(1, min(limit, self._batch))
        now = self._clock.now()
        fetching = asyncio.ensure_future(engine.fetch(self._handle, n, now, settles))
        if waiters:  # the fetch commits the settles it carries, or none of them
            fetching.add_done_callback(
                lambda f: _answer(waiters, f.exception() if not f.cancelled()
                                  else asyncio.CancelledError()))
        try:
            msgs, next_due = await asyncio.shield(fetching)
        except asyncio.CancelledError:
            # The claim may still commit: hand whatever it took straight back.
            fetching.add_done_callback(self._release_claimed)
            raise
        except Exception:
            self._settles[:0] = settles  # the fetch (and its settles) did not commit
            raise
        if msgs:
            group = self.spec.group
            for m in msgs:
                m._sub = self
                target = m.headers.get(REDRIVE_GROUP)
                if target is not None and target != group and _redriven_here(m):
                    # redriven for another subscription: this one handled it already
                    m._settled = True
                    self._settles.append(Settle(m.position, "ack"))
                else:
                    self._buf.append(m)
            self._skipped = False
            if self._buf:
                self._counts.on_deliver(self._buf)  # (_fill starts with _buf empty)
                return False
            self._skipped = True  # look again with a whole batch (what is left stays buffered)
            await self._settle_now()
            return True
        # until a change, the next due row (on the hub's clock), or at most `cap` seconds
        cap = IDLE_CHECK if timeout is None else min(IDLE_CHECK, timeout)
        await self._clock.wait(engine, changed, next_due, cap)
        return False

    def _release_claimed(self, fetching: asyncio.Future[tuple[list[Message], float | None]]
                         ) -> None:
        if fetching.cancelled() or fetching.exception() is not None:
            return
        msgs, _ = fetching.result()
        if msgs:
            items = [Settle(m.position, "release") for m in msgs]
            task = asyncio.ensure_future(self._engine.settle(self._handle, items,
                                                             self._clock.now()))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def close(self) -> None:
        """Stop consuming: settles are flushed, prefetched messages handed back at once."""
        if self._closed:
            return
        self._closed = True
        for msg in self._buf:  # prefetched, never seen by the application: hand them back
            self._settles.append(Settle(msg.position, "release"))
        self._buf.clear()
        await self.flush()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _answer(waiters: list[asyncio.Future[None]], exc: BaseException | None) -> None:
    """Tell `ack(wait=True)` callers whether the write carrying their settles committed."""
    for w in waiters:
        if w.done():
            continue  # the caller stopped waiting
        if exc is None:
            w.set_result(None)
        elif isinstance(exc, asyncio.CancelledError):
            w.cancel()
        else:
            w.set_exception(exc)


async def feed(sub: Subscription,
               one: Callable[[Message, asyncio.Semaphore], Coroutine[Any, Any, None]],
               concurrency: int) -> None:
    """Run `one(msg, slots)` for each message, at most `concurrency` at once.

    `one` releases its slot when done; the subscription's `max_in_flight`
    bounds what is prefetched, so a slow handler holds a bounded amount.
    """
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    try:
        async for msg in sub:
            await slots.acquire()
            t = asyncio.create_task(one(msg, slots))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
    except asyncio.CancelledError:
        # stopped: the handlers running stop too (their messages come back), instead of
        # a shutdown that waits for ever on one that hangs
        for t in tasks:
            t.cancel()
        raise
    finally:
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(slots=True)
class Handler:
    """A function registered with `hub.subscriber`, run by `hub.run()`."""

    fn: Callable[[Any], Awaitable[Any]]
    pattern: str
    group: str
    options: dict[str, Any]
    concurrency: int
    retry_backoff: float
    decode_as: Any = None
    #: the hub's OpenTelemetry tracing, set by `hub.run()` (None: off)
    telemetry: Telemetry | None = None

    @classmethod
    def build(cls, fn: Callable[[Any], Awaitable[Any]], pattern: str, group: str,
              options: dict[str, Any], concurrency: int, retry_backoff: float) -> Handler:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"subscriber {fn.__name__!r} must be an async function")
        decode_as = None
        what = f"subscriber {getattr(fn, '__name__', fn)!r}"
        hint = parameter_type(fn, what)
        if hint is not None and hint is not Message and hint is not Any:
            if not decodable(hint):
                raise InvalidArgument(
                    f"{what}: messages cannot be decoded as {hint!r}; annotate its first "
                    "parameter with a msgspec Struct, a dataclass, a pydantic model, a JSON "
                    "type (dict, list, int, ...), str or bytes, or tidings.Message")
            decode_as = hint
        return cls(fn, pattern, group, options, concurrency, retry_backoff, decode_as)

    def backoff(self, attempt: int) -> float | None:
        """The wait after failed attempt `attempt`: None when the subscription has its own
        `backoff=` steps (the delivery planner applies them), else exponential
        `retry_backoff` (capped at a minute)."""
        if self.options.get("backoff"):
            return None
        return float(min(60.0, self.retry_backoff * (2 ** max(0, attempt - 1))))

    async def run(self, sub: Subscription) -> None:
        """Feed the handler at its own pace: at most `concurrency` messages at once."""
        await feed(sub, self._one, self.concurrency)

    async def _one(self, msg: Message, slots: asyncio.Semaphore) -> None:
        tel = self.telemetry
        if tel is None:
            await self._handle(msg, slots, None)
        else:
            with tel.process(msg, self.group) as span:
                await self._handle(msg, slots, span)

    async def _handle(self, msg: Message, slots: asyncio.Semaphore, span: Any) -> None:
        try:
            arg: Any = msg
            if self.decode_as is not None:
                try:
                    arg = msg.decode(self.decode_as)
                except DecodeError as exc:  # no retry can fix it: dead-lettered at once
                    log.warning("subscriber %s: %s position %d does not decode; "
                                "dead-lettered: %s", getattr(self.fn, "__name__", self.fn),
                                msg.topic, msg.position, exc)
                    await msg.term(reason=DECODE_ERROR, error=str(exc))
                    return
            await self.fn(arg)
        except asyncio.CancelledError:
            msg._hand_back()  # stopped, not failed: no attempt spent, never dead-lettered
            raise
        except Exception as exc:
            if span is not None and self.telemetry is not None:
                self.telemetry.failed(span, exc)
            delay = self.backoff(msg.attempt)
            log.exception(
                "subscriber %s failed on %s position %d (attempt %d); retrying %s",
                getattr(self.fn, "__name__", self.fn), msg.topic, msg.position, msg.attempt,
                "after its backoff step" if delay is None else f"in {delay:.2f}s",
            )
            await msg.nack(delay)
        else:
            await msg.ack()
        finally:
            slots.release()


def _redriven_here(m: Message) -> bool:
    """A message `hub.redrive` moved (its id is derived from the dead letter's): the only
    kind whose redrive-group header is honoured, so a header copied or set by hand never
    hides a message."""
    return m.id == moved_id(m.headers.get(REDRIVEN, ""))


def closed_error() -> ClosedError:
    return ClosedError("this hub is closed; open a new one with `await tidings.connect(url)`")
