"""The hub: one connection to an engine, and the entry point to every pattern."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

from . import redrive as _redrive
from . import topics as _topics
from .backpressure import Window
from .clock import Clock, SystemClock
from .engines.base import Engine, Retention
from .engines.delivery import SubscriptionSpec
from .engines.factory import engine_for
from .errors import (
    EngineUnavailable,
    InvalidArgument,
    PayloadTooLarge,
)
from .messages import (
    MAX_POSITION,
    OCTETS,
    Message,
    OutMessage,
    Published,
    check_headers,
    encode_data,
    new_id,
    new_ids,
)
from .metrics import Counters, MetricsSnapshot, snapshot
from .pubsub import Handler, Subscription, closed_error
from .util import parse_iso_time

if TYPE_CHECKING:
    from types import TracebackType

    from .asyncapi import PublishedTopic
    from .eventsourcing.aggregate import Aggregate
    from .eventsourcing.projections import HandlerT, Projections
    from .eventsourcing.repository import Repository
    from .eventsourcing.store import EventStore
    from .saga.coordinator import Coordinator
    from .saga.definition import Saga
    from .saga.handlers import CommandHandler
    from .saga.runner import SagaRunner
    from .telemetry import Telemetry

    A = TypeVar("A", bound=Aggregate)

__all__ = ["DEFAULT_URL", "Hub", "connect"]

DEFAULT_URL = "sqlite:///./tidings.db"
MAX_KEY_LENGTH = 255
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
X = TypeVar("X")
Start = str | int | datetime


async def connect(
    url: str | None = None,
    *,
    broker: str | None = None,
    max_payload: int = 1024 * 1024,
    max_pending: int = 10_000,
    trim_interval: float | None = 30.0,
    telemetry: Any = False,
    **options: Any,
) -> Hub:
    """Open a hub on the engine named by `url` (default: `sqlite:///./tidings.db`).

    `max_payload` caps one message's data (bytes); `max_pending` bounds the
    messages in flight to the engine, beyond which `publish` waits. Other
    options go to the engine (SQLite: `durability="full"|"normal"`,
    `dedup_window` seconds, `poll_interval` seconds). Retention limits are
    applied every `trim_interval` seconds (None: only on `hub.trim()`).

    `broker="nats://host:4222"` (or `?broker=nats://…` in a `sqlite:` or `postgresql:`
    URL) keeps the event store, projections and saga state in that database and sends
    every message through NATS JetStream (an outbox relay moves what transactions
    commit; see docs/architecture.md).

    `telemetry=True` traces with OpenTelemetry (the global tracer provider; or pass a
    TracerProvider): spans per publish, delivery and saga, the trace context carried
    in message headers (the `otel` extra; see tidings/telemetry.py).
    """
    tel = None
    if telemetry is not False and telemetry is not None:
        from .telemetry import telemetry_for

        tel = telemetry_for(telemetry)
    if url is None:
        import os

        url = os.environ.get("TIDINGS_URL", DEFAULT_URL)
    engine = engine_for(url, dict(options) if broker is None else {**options, "broker": broker})
    try:
        await engine.open()
    except Exception as exc:
        if isinstance(exc, (EngineUnavailable, InvalidArgument)):
            raise
        raise EngineUnavailable(f"cannot open {url!r}: {exc}") from exc
    hub = Hub(engine, max_payload=max_payload, max_pending=max_pending)
    hub.telemetry = tel
    if trim_interval:
        hub._background.add(asyncio.create_task(hub._trim_every(trim_interval)))
    return hub


def _positive_seconds(value: object) -> bool:
    """True for a finite number of seconds > 0 (not a bool, not NaN)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0 < value < math.inf)


#: More delays than any max_deliver needs would only be a mistake (or an attack).
MAX_BACKOFF_STEPS = 100
#: A day: a redelivery further away than this is better parked elsewhere.
MAX_BACKOFF_DELAY = 86_400.0


def _backoff(backoff: object) -> tuple[float, ...]:
    """`subscribe(backoff=...)` checked: a list of 1 to 100 delays, each 0 to a day."""
    if backoff is None:
        return ()
    if isinstance(backoff, (str, bytes)) or not isinstance(backoff, (list, tuple)):
        raise InvalidArgument(f"backoff must be a list of delays in seconds, like "
                              f"[1.0, 5.0, 30.0], got {backoff!r}")
    if not 1 <= len(backoff) <= MAX_BACKOFF_STEPS:
        raise InvalidArgument(f"backoff takes 1 to {MAX_BACKOFF_STEPS} delays, got "
                              f"{len(backoff)}; omit it for no backoff")
    for d in backoff:
        if (isinstance(d, bool) or not isinstance(d, (int, float))
                or not 0 <= d <= MAX_BACKOFF_DELAY):
            raise InvalidArgument(f"each backoff delay must be a number of seconds from 0 to "
                                  f"{MAX_BACKOFF_DELAY:.0f}, got {d!r}")
    return tuple(float(d) for d in backoff)


def _check_key(key: object) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidArgument(
            f"key must be a non-empty str of at most {MAX_KEY_LENGTH} characters, got {key!r}"
        )
    return key


class Hub:
    """A connection to one engine; publish, subscribe, replay, and the other patterns."""

    def __init__(self, engine: Engine, *, max_payload: int, max_pending: int) -> None:
        self.engine = engine
        self.max_payload = max_payload
        self._window = Window(max_pending)
        self._handlers: list[Handler] = []
        self._subs: set[Subscription] = set()
        self._closed = False
        self._extensions: dict[type[Any], Any] = {}  # see `extension`
        self._background: set[asyncio.Task[Any]] = set()
        self._command_handlers: list[CommandHandler] = []
        self._published: dict[str, PublishedTopic] = {}  # see `publishes`
        self._coordinator: Coordinator | None = None
        #: Where the hub reads time (leases, delays, retention, saga deadlines);
        #: `tidings.testing.TestHub` replaces it with a ManualClock.
        self.clock: Clock = SystemClock()
        #: OpenTelemetry tracing (None: off; see `connect(telemetry=...)`)
        self.telemetry: Telemetry | None = None
        #: What this hub did, counted as it happens (see tidings/metrics.py, `metrics()`)
        self.counters = Counters()

    @property
    def url(self) -> str:
        return self.engine.url

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        """Raise `ClosedError` if the hub is closed (every operation starts with it)."""
        if self._closed:
            raise closed_error()

    def extension(self, kind: type[X], make: Callable[[Hub], X]) -> X:
        """The hub's one `kind` object (the event store, its projections, …), made by
        `make(hub)` on first use. Lets a module keep per-hub state without the hub
        knowing it."""
        found = self._extensions.get(kind)
        if found is None:
            found = self._extensions[kind] = make(self)
        return cast("X", found)

    @property
    def subscribers(self) -> tuple[Handler, ...]:
        """The functions registered with `hub.subscriber`, in order."""
        return tuple(self._handlers)

    @property
    def saga_definitions(self) -> tuple[Saga, ...]:
        """The sagas registered with `hub.sagas` (each name's newest version)."""
        return () if self._coordinator is None else self._coordinator.definitions()

    @property
    def command_handlers(self) -> tuple[CommandHandler, ...]:
        """The command handlers registered with `hub.handler`, in order."""
        return tuple(self._command_handlers)

    @property
    def published_topics(self) -> tuple[PublishedTopic, ...]:
        """The topics declared with `hub.publishes`, in order."""
        return tuple(self._published.values())

    def publishes(self, topic: str, payload_type: type[Any] | None = None, *,
                  description: str | None = None) -> None:
        """Declare that the application publishes to `topic` (data of `payload_type`), for
        its AsyncAPI document (`hub.asyncapi()`). Changes nothing about publishing.

        Declaring a topic again with the same arguments changes nothing; with others it
        is an InvalidArgument, as is a pattern, or a type data cannot be decoded as.
        """
        from .asyncapi import declare

        decl = declare(topic, payload_type, description)
        known = self._published.get(decl.topic)
        if known is not None and known != decl:
            raise InvalidArgument(
                f"topic {decl.topic!r} is already declared with payload type "
                f"{known.payload_type!r} and description {known.description!r}; declare "
                "each topic once")
        self._published[decl.topic] = decl

    def asyncapi(self, *, title: str | None = None, version: str = "1.0.0",
                 servers: Mapping[str, str | Mapping[str, Any]] | None = None
                 ) -> dict[str, Any]:
        """The AsyncAPI 3.0 document (a JSON-ready dict) of what is registered on this hub:
        subscribers, command handlers, sagas and the topics declared with `publishes`.
        Reads nothing from the engine. `servers`: names to URLs (`nats://host:4222`; any
        password is left out) or AsyncAPI Server Objects."""
        from .asyncapi import document

        return document(subscribers=self.subscribers, handlers=self.command_handlers,
                        sagas=self.saga_definitions, published=self.published_topics,
                        title=title, version=version, servers=servers)

    # publishing ----------------------------------------------------------------
    def _out(
        self,
        topic: str,
        data: object,
        key: str | None,
        headers: Mapping[str, str] | None,
        id: str | None,
    ) -> OutMessage:
        _topics.validate_topic(topic)
        h = check_headers(headers)
        raw, content_type = encode_data(data)
        if len(raw) > self.max_payload:
            raise PayloadTooLarge(
                f"message data is {len(raw)} bytes, over the limit of {self.max_payload}; "
                "store large blobs elsewhere and publish a reference, or raise max_payload "
                "in tidings.connect()"
            )
        if "content-type" not in h:
            h["content-type"] = content_type
        if id is not None and (not isinstance(id, str) or not id or len(id) > 255):
            raise InvalidArgument(f"id must be a non-empty str of at most 255 characters, got {id!r}")
        if id is not None and id.startswith("$"):
            raise InvalidArgument(f"id {id[:40]!r}: ids starting with '$' are reserved for "
                                  "tidings itself (redrive); choose one that does not")
        return OutMessage(id or new_id(), topic, _check_key(key), raw, h, id is not None)

    async def publish(
        self,
        topic: str,
        data: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,
    ) -> Published:
        """Store one message durably; returns once it is committed.

        A message whose client-supplied `id` was stored within the dedup window
        is not stored again (`Published.duplicate` is True). Waits (does not
        fail) while the engine's pending window is full.
        """
        self.check_open()
        out = self._out(topic, data, key, headers, id)
        if self.telemetry is not None:
            with self.telemetry.send(topic, [out]) as span:
                return self.telemetry.sent(span, await self._append([out]))
        return await self._append([out])

    async def _append(self, batch: list[OutMessage]) -> Published:
        await self._window.acquire(1)
        try:
            return self.counters.on_publish(batch, await self.engine.append(batch))[0]
        finally:
            self._window.release(1)

    async def publish_many(
        self, topic: str, items: Iterable[object], *, key: str | None = None
    ) -> list[Published]:
        """Store a batch atomically: all of it or none of it.

        Items are payloads, or dicts `{"data": ..., "key"?, "headers"?, "id"?,
        "topic"?}` when wrapped with `tidings.envelope(...)`.
        """
        self.check_open()
        _topics.validate_topic(topic)
        key = _check_key(key)
        limit = self.max_payload
        shared: dict[str, dict[str, str]] = {}  # one headers dict per content type
        octets = {"content-type": OCTETS}
        items = items if isinstance(items, list) else list(items)
        batch: list[OutMessage] = []
        append = batch.append
        for item, mid in zip(items, new_ids(len(items)), strict=True):
            if type(item) is bytes:  # the common case, without the codec's dispatch
                if len(item) > limit:
                    self._out(topic, item, key, None, None)  # raises PayloadTooLarge
                append(OutMessage(mid, topic, key, item, octets, False))
                continue
            if isinstance(item, _Envelope):
                append(
                    self._out(item.topic or topic, item.data, item.key if item.key is not None
                              else key, item.headers, item.id)
                )
                continue
            raw, content_type = encode_data(item)
            if len(raw) > limit:
                self._out(topic, raw, key, None, None)  # raises PayloadTooLarge
            h = shared.get(content_type)
            if h is None:
                h = shared[content_type] = {"content-type": content_type}
            append(OutMessage(mid, topic, key, raw, h, False))
        if not batch:
            return []
        if self.telemetry is not None:
            with self.telemetry.send(topic, batch):
                return await self._append_many(batch)
        return await self._append_many(batch)

    async def _append_many(self, batch: list[OutMessage]) -> list[Published]:
        await self._window.acquire(len(batch))
        try:
            return self.counters.on_publish(batch, await self.engine.append(batch))
        finally:
            self._window.release(len(batch))

    # subscribing ---------------------------------------------------------------
    async def _resolve_start(self, start: Start) -> int:
        if isinstance(start, bool):
            raise InvalidArgument("start must be 'beginning', 'end', a position or a datetime")
        if isinstance(start, str) and start.isascii() and start.isdigit():  # ('²'.isdigit())
            start = int(start)
        if isinstance(start, int):
            if not 0 <= start <= MAX_POSITION:
                raise InvalidArgument(f"a start position must be from 0 to {MAX_POSITION}")
            return max(0, start - 1)
        if isinstance(start, datetime):
            return await self._position_before(start)
        if start == "beginning":
            return 0
        if start == "end":
            return await self.engine.last_position()
        if isinstance(start, str):
            when = parse_iso_time(start)
            if when is not None:
                return await self._position_before(when)
        raise InvalidArgument(
            f"start {start!r} is not understood; use 'beginning', 'end', a position (int) "
            "or a time (datetime or ISO 8601 string)"
        )

    async def _position_before(self, when: datetime) -> int:
        # Message.time is microsecond-precise: half a microsecond of slack makes
        # `start=msg.time` include `msg` whichever way the float was rounded.
        return await self.engine.position_before(when.timestamp() - 5e-7)

    async def subscribe(
        self,
        pattern: str,
        *,
        group: str,
        start: Start = "beginning",
        ack_wait: float = 30.0,
        max_deliver: int = 5,
        dead_letter: str | None = None,
        ordered: bool = False,
        max_in_flight: int = 100,
        batch: int | None = None,
        backoff: Sequence[float] | None = None,
    ) -> Subscription:
        """Attach a consumer to the durable subscription `group` over `pattern`.

        Every subscription gets every matching message; consumers of one
        subscription share them. `start` applies when the subscription is
        first created; afterwards it resumes where it was acked. The default
        dead-letter topic is `$dlq.<group>`. With `backoff=[1.0, 5.0, 30.0]` the
        n-th redelivery after a failure (a `nack()` without a delay, or a lease
        that ran out) waits the n-th delay, the last one repeating.
        """
        self.check_open()
        spec = self._spec(pattern, group, ack_wait, max_deliver, dead_letter, ordered,
                          max_in_flight, backoff)
        start_after = await self._resolve_start(start)
        handle = await self.engine.subscribe(spec, start_after)
        sub = Subscription(self.engine, handle, spec, batch or max_in_flight, self.clock,
                           counters=self.counters)
        sub.telemetry = self.telemetry  # (None: off) a settle span per ack, nack, term
        self._subs.add(sub)
        return sub

    @staticmethod
    def _spec(pattern: str, group: str, ack_wait: float, max_deliver: int,
              dead_letter: str | None, ordered: bool, max_in_flight: int,
              backoff: Sequence[float] | None = None) -> SubscriptionSpec:
        _topics.validate_pattern(pattern)
        if not isinstance(group, str) or not _topics.is_token(group):
            raise InvalidArgument(
                f"group {group!r} must be one token of letters, digits, '_' or '-'"
            )
        if not _positive_seconds(ack_wait):
            raise InvalidArgument(f"ack_wait must be a number of seconds > 0, got {ack_wait!r}")
        if not isinstance(max_deliver, int) or max_deliver < 1:
            raise InvalidArgument("max_deliver must be an int >= 1")
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise InvalidArgument("max_in_flight must be an int >= 1")
        if dead_letter is None:
            dead_letter = f"$dlq.{group}"
        _topics.validate_topic(dead_letter)
        if _topics.matches(pattern, dead_letter):
            raise InvalidArgument(
                f"dead-letter topic {dead_letter!r} matches the subscription's own pattern "
                f"{pattern!r}; choose a topic outside it"
            )
        return SubscriptionSpec(group, pattern, float(ack_wait), max_deliver, dead_letter,
                                bool(ordered), max_in_flight, _backoff(backoff))

    def subscriber(
        self,
        pattern: str,
        *,
        group: str,
        concurrency: int = 1,
        retry_backoff: float = 0.1,
        **options: Any,
    ) -> Callable[[F], F]:
        """Register an async handler run by `hub.run()`: acked on return, nacked on error.

        A failing message is retried with exponential backoff (`retry_backoff`
        doubled per attempt) until `max_deliver`, then dead-lettered. A function
        whose first parameter is annotated with a type (`order: OrderCreated`: a
        msgspec Struct, dataclass, pydantic model, ...) gets the data decoded as
        that type; a message that does not decode is dead-lettered at once with
        reason `decode-error` (no retry can fix it). At most
        `concurrency` messages are handled at once, so a slow handler is fed at
        its own pace.
        """
        self._spec(pattern, group, options.get("ack_wait", 30.0), options.get("max_deliver", 5),
                   options.get("dead_letter"), options.get("ordered", False),
                   options.get("max_in_flight", 100), options.get("backoff"))
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidArgument(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not (_positive_seconds(retry_backoff) or retry_backoff == 0):
            raise InvalidArgument(f"retry_backoff must be seconds >= 0, got {retry_backoff!r}")

        def register(fn: F) -> F:
            self._handlers.append(
                Handler.build(fn, pattern, group, options, concurrency, retry_backoff)
            )
            return fn

        return register

    async def run(self) -> None:
        """Run every registered subscriber and command handler until the hub closes or
        this task is cancelled."""
        self.check_open()
        if not self._handlers and not self._command_handlers:
            raise InvalidArgument(
                "no subscribers registered; decorate handlers with @hub.subscriber or @hub.handler"
            )
        tasks = [asyncio.create_task(c.run(), name=f"tidings:handler:{c.command}")
                 for c in self._command_handlers]
        for h in self._handlers:
            h.telemetry = self.telemetry
            opts = dict(h.options)
            opts.setdefault("max_in_flight", max(h.concurrency, 1))
            sub = await self.subscribe(h.pattern, group=h.group, **opts)
            tasks.append(asyncio.create_task(h.run(sub), name=f"tidings:{h.group}:{h.pattern}"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # dead letters ----------------------------------------------------------------
    async def dead_letters(self, group: str, *, topic: str | None = None,
                           ids: Iterable[str] | None = None, limit: int | None = None,
                           dead_letter: str | None = None, redriven: bool = False
                           ) -> list[Message]:
        """`group`'s dead letters not moved back yet (all with `redriven=True`), oldest
        first; `topic` (a pattern) filters by original topic, `ids` by the dead letter's
        id or its original message's. `dead_letter`: the subscription's own dead-letter
        topic, if it named one (default `$dlq.<group>`). NotFound for a group with no
        subscription and no dead letters, or an id that names none of its dead letters."""
        self.check_open()
        return await _redrive.dead_letters(self, group, topic=topic, ids=ids, limit=limit,
                                           dead_letter=dead_letter, redriven=redriven)

    async def redrive(self, group: str, *, topic: str | None = None,
                      ids: Iterable[str] | None = None, limit: int | None = None,
                      dead_letter: str | None = None) -> int:
        """Move `group`'s dead letters back to their original topics, exactly once;
        returns how many moved. Selects as `dead_letters` does.

        Each comes back as a new message (attempts from 1) with a `tidings-redriven`
        header, delivered again only to `group`'s subscription. Safe to run twice, at
        once, or again after a run was killed midway: a dead letter moves once.
        """
        self.check_open()
        return await _redrive.redrive(self, group, topic=topic, ids=ids, limit=limit,
                                      dead_letter=dead_letter)

    # replay ----------------------------------------------------------------------
    def read(
        self,
        pattern: str,
        *,
        start: Start = "beginning",
        stop: int | datetime | str | None = None,
        follow: bool = False,
        page: int = 1000,
    ) -> AsyncIterator[Message]:
        """Replay stored messages matching `pattern`, in position order, without a subscription.

        `start` is 'beginning', 'end', a position (inclusive) or a time.
        Ends at the last message stored when called, or at `stop` (a position,
        inclusive, or a time, exclusive); with `follow=True` it keeps tailing.
        """
        self.check_open()
        _topics.validate_pattern(pattern)
        if isinstance(page, bool) or not isinstance(page, int) or page < 1:
            raise InvalidArgument(f"page must be an int >= 1, got {page!r}")
        return self._read(pattern, start, stop, follow, page)

    async def _read(
        self, pattern: str, start: Start, stop: int | datetime | str | None, follow: bool,
        page: int,
    ) -> AsyncIterator[Message]:
        engine = self.engine
        after = await self._resolve_start(start)
        end: int | None
        if stop is None:
            end = None if follow else await engine.last_position()
        elif isinstance(stop, int) and not isinstance(stop, bool):
            end = min(stop, MAX_POSITION)  # (past the last position there is: up to it)
        elif isinstance(stop, str) and stop.isascii() and stop.isdigit():
            end = min(int(stop), MAX_POSITION)
        elif isinstance(stop, (str, datetime)):
            end = await self._resolve_start(stop)
        else:
            raise InvalidArgument("stop must be a position, a datetime or an ISO 8601 string")
        while True:
            self.check_open()
            changed = engine.changes(pattern)  # woken by what may match, not every commit
            batch = await engine.read(pattern, after, end, page)
            for m in batch:
                yield m
            if batch:
                after = batch[-1].position
                continue
            if not follow or (end is not None and after >= end):
                return
            await engine.wait(changed, 1.0)

    # retention ---------------------------------------------------------------------
    async def set_retention(
        self,
        topic: str,
        *,
        max_age: float | None = None,
        max_messages: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        """Keep at most this much of `topic`; older messages are trimmed by `trim()`.

        Messages still unacked in a subscription are never trimmed.
        """
        self.check_open()
        _topics.validate_topic(topic)
        for name, v in (("max_age", max_age), ("max_messages", max_messages),
                        ("max_bytes", max_bytes)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not 0 <= v < math.inf):
                raise InvalidArgument(f"{name} must be a number >= 0 or None, got {v!r}")
        await self.engine.set_retention(topic, Retention(max_age, max_messages, max_bytes))

    async def trim(self) -> int:
        """Apply retention limits now; returns how many messages were removed."""
        self.check_open()
        return await self.engine.trim(self.clock.now())

    async def _trim_every(self, interval: float) -> None:
        import logging

        while not self._closed:
            await self.clock.sleep_until(self.clock.now() + interval)
            try:
                await self.engine.trim(self.clock.now())
            except EngineUnavailable as exc:  # away for now: the next round tries again
                logging.getLogger("tidings").warning("retention trim skipped: %s", exc)
            except Exception:  # keep trimming later; the engine reports its own failures
                logging.getLogger("tidings").exception("retention trim failed")

    # introspection ---------------------------------------------------------------
    async def topics(self) -> list[dict[str, Any]]:
        """Topics with message counts, and subscriptions with their lag."""
        self.check_open()
        subs = await self.engine.subscriptions()
        out = []
        for t in await self.engine.topics():
            out.append({
                "topic": t.topic, "messages": t.messages, "bytes": t.bytes,
                "first_position": t.first_position, "last_position": t.last_position,
                "subscriptions": [
                    {"group": s.group, "pattern": s.pattern, "lag": s.lag,
                     "pending": s.pending, "in_flight": s.in_flight}
                    for s in subs if _topics.matches(s.pattern, t.topic)
                ],
            })
        return out

    async def metrics(self) -> MetricsSnapshot:
        """Messages, dead letters, events and saga outcomes counted by this hub, with lag,
        dead letters waiting and projection lag read from the engine now (a plain
        snapshot; the gateway serves it at /metrics; see tidings/metrics.py)."""
        self.check_open()
        return await snapshot(self)

    # lifecycle -------------------------------------------------------------------
    async def close(self) -> None:
        """Flush acks, stop consumers and close the engine; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._coordinator is not None:
            await self._coordinator.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for sub in list(self._subs):
            with contextlib.suppress(Exception):
                await sub.close()
        await self.engine.close()
        self.engine.wake_waiters()  # whoever still waits for a change (a projection) sees it closed

    async def __aenter__(self) -> Hub:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<tidings.Hub {self.url} {'closed' if self._closed else 'open'}>"

    # sagas ---------------------------------------------------------------------------
    def sagas(self, definition: Saga, *, clock: Clock | None = None) -> SagaRunner:
        """The sagas of `definition` on this hub: `start`, `get`, `wait`, `cancel`, `retry`.

        The first call starts this hub's coordinator, which resumes every
        unfinished saga of the definition (a killed coordinator loses nothing).
        `clock` (first call only) replaces the system clock, for tests.
        """
        self.check_open()
        from .saga.coordinator import Coordinator
        from .saga.definition import Saga
        from .saga.runner import SagaRunner

        if not isinstance(definition, Saga):
            raise InvalidArgument("hub.sagas() takes a tidings.Saga definition")
        if self._coordinator is None:
            self._coordinator = Coordinator(self, clock or self.clock)
        self._coordinator.register(definition)
        return SagaRunner(self._coordinator, definition)

    def handler(self, command: str, *, group: str | None = None,
                concurrency: int = 1, inline: bool = False,
                ack_wait: float = 60.0, input: type[Any] | None = None) -> Callable[[F], F]:
        """Register a service's command handler (run by `hub.run()`).

        The function gets a `Command` and returns the reply (a dict); raise
        `tidings.Rejected(reason)` for a business refusal. With an input type
        (`input=ReserveCredit`, a msgspec Struct, dataclass or pydantic model, or
        the parameter annotated `Command[ReserveCredit]`) `cmd.data` is an instance
        of it; a command that does not fit is rejected with the error (naming the
        field) and dead-lettered with reason `decode-error`, without calling the
        function. Aggregates enlisted
        with `cmd.save(agg)` commit with the inbox record and the reply, so a
        redelivered command changes nothing and gets the same reply.

        `inline=True`: a saga coordinator on this same hub runs the handler
        itself, and what it saves commits in one transaction with the step's
        outcome (no command or reply message, no inbox record: the saga's stream
        is the record). Commands arriving as messages are still handled as above.

        `ack_wait`: how long a delivery is leased to this process before another
        may take it (a process that dies holding a command gives it up then). A
        command that comes back after its saga compensated the step changes
        nothing (the compensation fenced it), so this only bounds how soon a
        crashed service's commands are retried.
        """
        from .saga.handlers import CommandHandler

        if not isinstance(inline, bool):
            raise InvalidArgument(f"inline must be True or False, got {inline!r}")
        if not _positive_seconds(ack_wait):
            raise InvalidArgument(f"ack_wait must be a number of seconds > 0, got {ack_wait!r}")

        def register(fn: F) -> F:
            self._command_handlers.append(
                CommandHandler(self, command, fn, group=group, concurrency=concurrency,
                               inline=inline, ack_wait=float(ack_wait), input=input))
            return fn

        return register

    # event sourcing ----------------------------------------------------------------
    @property
    def events(self) -> EventStore:
        """The event store: streams with optimistic concurrency, global order, subscriptions."""
        self.check_open()
        from .eventsourcing.store import store_for

        return store_for(self)

    def repository(self, cls: type[A], snapshot_every: int | None = None) -> Repository[A]:
        """Load and save aggregates of `cls`; snapshot every `snapshot_every` events if set."""
        store = self.events
        key: Any = (cls, snapshot_every, type(snapshot_every))  # (True == 1, but is refused)
        try:
            repo = store._repositories.get(key)
        except TypeError:  # unhashable arguments: the constructor says what is wrong
            repo = None
            key = None
        if repo is None:
            from .eventsourcing.repository import Repository

            repo = Repository(store, cls, snapshot_every=snapshot_every)
            if key is not None:
                store._repositories[key] = repo
        return cast("Repository[A]", repo)

    def projection(self, name: str, *, reset: Callable[[Any], Any] | None = None,
                   batch: int = 200) -> Callable[[HandlerT], HandlerT]:
        """Register `async def handler(event, tx)` as the projection `name` (run by `run_projections`).

        Events arrive in global order; the checkpoint commits with the writes
        made through `tx`. `reset(tx)` clears the read model for a rebuild.
        """
        def register(fn: HandlerT) -> HandlerT:
            self.projections.register(name, fn, reset=reset, batch=batch)
            return fn

        return register

    @property
    def projections(self) -> Projections:
        """The registered projections: `run`, `catch_up`, `status`, `rebuild`, `retry`."""
        from .eventsourcing.projections import projections_for

        return projections_for(self.events)

    async def run_projections(self) -> None:
        """Keep every registered projection up to date until the hub closes or this is cancelled."""
        await self.projections.run()


class _Envelope:
    """A message with its own key, headers, id or topic, for `publish_many`."""

    __slots__ = ("data", "headers", "id", "key", "topic")

    def __init__(self, data: object, *, key: str | None = None,
                 headers: Mapping[str, str] | None = None, id: str | None = None,
                 topic: str | None = None) -> None:
        self.data = data
        self.key = key
        self.headers = headers
        self.id = id
        self.topic = topic


def envelope(data: object, *, key: str | None = None, headers: Mapping[str, str] | None = None,
             id: str | None = None, topic: str | None = None) -> _Envelope:
    """Wrap a payload with per-message key/headers/id/topic for `hub.publish_many`."""
    return _Envelope(data, key=key, headers=headers, id=id, topic=topic)

