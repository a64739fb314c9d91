"""The engine protocol: what every storage engine implements.

An engine stores one ordered log of messages (positions increase across all
topics), the durable subscriptions over it, and (see `eventsourcing`) event
streams. The hub above it validates, encodes and applies backpressure; the
engine only stores and moves bytes. Nothing here is SQL-shaped: a PostgreSQL
engine or a NATS JetStream broker implements the same methods (see
docs/architecture.md for the mapping).
"""

from __future__ import annotations

import asyncio
import contextvars
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from .. import topics as _topics
from ..messages import Message, OutMessage, Published
from .delivery import SubscriptionSpec

if TYPE_CHECKING:
    from .store_base import StoreBackend

__all__ = [
    "Engine",
    "Retention",
    "Settle",
    "SubscriptionInfo",
    "TopicInfo",
]

#: "release" returns a prefetched message that never reached the application
#: (its delivery is not counted as an attempt).
#: Set while an async function holds the engine's open write transaction (a projection
#: handler's `tx`): any other write from that task would wait for itself forever, so
#: engines refuse it with a clear error instead.
HOLDING_WRITER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tidings_holding_writer", default=False)

HOLDING_MESSAGE = (
    "cannot write through the hub from inside a projection handler: it holds the engine's "
    "write transaction and would wait for itself; write (and publish) through its tx instead"
)

SettleKind = Literal["ack", "nack", "term", "release"]


@dataclass(slots=True, frozen=True)
class Retention:
    """Per-topic limits; the oldest messages beyond any limit are trimmed.

    A message still unacked in (or not yet reached by) a subscription whose
    pattern matches its topic is never trimmed.
    """

    max_age: float | None = None
    max_messages: int | None = None
    max_bytes: int | None = None


class Settle(msgspec.Struct, frozen=True, gc=False):
    """One ack, nack (with its redelivery delay), term or release of a delivered message.

    A nack's `delay` of None follows the subscription's `backoff` (no backoff: at once);
    a term's `reason` and `error` go in its dead letter's `tidings-reason` and
    `tidings-error` headers.
    """

    position: int
    kind: SettleKind
    delay: float | None = None
    reason: str | None = None
    error: str | None = None


@dataclass(slots=True)
class TopicInfo:
    topic: str
    messages: int
    bytes: int
    first_position: int | None
    last_position: int | None


@dataclass(slots=True)
class SubscriptionInfo:
    group: str
    pattern: str
    cursor: int
    pending: int
    in_flight: int
    lag: int
    ordered: bool
    max_in_flight: int
    #: where its dead letters go (None: not known to this engine's records)
    dead_letter: str | None = None


class _Changes(asyncio.Event):
    """An asyncio.Event plus one shared future that waiters can wait on with a timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.future: asyncio.Future[None] | None = None


def _fire(ev: _Changes) -> None:
    ev.set()
    if ev.future is not None and not ev.future.done():
        ev.future.set_result(None)


class Engine(ABC):
    """Storage for the log, subscriptions and event streams.

    Implementations must make `append` atomic per call, give positions that
    a reader never sees filled in late (a reader that saw N never later finds
    a new message below N), and serialize `fetch` per subscription so that
    competing consumers never hold the same message at once within its lease.
    """

    url: str = ""
    #: How long a client-supplied message id is remembered for deduplication.
    dedup_window: float = 120.0

    def __init__(self) -> None:
        self._changed = _Changes()
        self._by_pattern: dict[str, _Changes] = {}  # waiters for one topic pattern
        self._patterns_seen: set[str] = set()
        self._topic_patterns: dict[str, set[str]] = {}  # topic -> seen patterns matching it
        self._waiters = 0

    # lifecycle ---------------------------------------------------------------
    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    # schema ----------------------------------------------------------------------
    #: How many schema migrations `open()` applied (an engine without a schema: none).
    migrations_applied: int = 0

    async def migrate(self) -> int:
        """Create or upgrade the engine's schema; how many migrations ran. Engines that
        keep no schema (memory; SQLite creates its tables as it opens) have none."""
        return 0

    # event streams -------------------------------------------------------------
    @abstractmethod
    def event_store(self) -> StoreBackend:
        """A new event-store backend on this engine (`hub.events` keeps the one it uses).

        Its streams live next to this engine's log, and each event is also stored as a
        message on it in the same transaction. An engine that cannot hold event streams
        raises `Unsupported`, saying where to keep them.
        """

    # the log -----------------------------------------------------------------
    @abstractmethod
    async def append(self, messages: Sequence[OutMessage]) -> list[Published]:
        """Store all messages or none; a known client id yields its first position."""

    @abstractmethod
    async def read(
        self, pattern: str, after: int, stop: int | None, limit: int
    ) -> list[Message]:
        """Up to `limit` stored messages matching `pattern` with `after < position <= stop`."""

    @abstractmethod
    async def last_position(self) -> int:
        """The highest position stored so far (0 when the log is empty)."""

    @abstractmethod
    async def position_before(self, timestamp: float) -> int:
        """The highest position stored before `timestamp` (0 if none)."""

    # subscriptions -----------------------------------------------------------
    @abstractmethod
    async def subscribe(self, spec: SubscriptionSpec, start_after: int | None) -> Any:
        """Create the durable subscription (cursor at `start_after`) or update its settings.

        Returns an engine handle passed back to `fetch` and `settle`. An
        existing subscription keeps its cursor; `start_after` is for new ones.
        """

    @abstractmethod
    async def fetch(
        self, handle: Any, limit: int, now: float, settles: Sequence[Settle] = ()
    ) -> tuple[list[Message], float | None]:
        """Apply `settles`, then claim up to `limit` messages for one consumer.

        Also returns the next time a pending message falls due (None: no timer).
        Doing both in one call lets an engine settle and claim in one transaction.
        """

    @abstractmethod
    async def settle(self, handle: Any, items: Sequence[Settle], now: float) -> None:
        """Apply acks, nacks and terms (a dead letter is appended atomically with its removal)."""

    @abstractmethod
    async def delete_subscription(self, group: str, pattern: str) -> bool: ...

    # retention and introspection ---------------------------------------------
    @abstractmethod
    async def set_retention(self, topic: str, retention: Retention) -> None: ...

    @abstractmethod
    async def trim(self, now: float) -> int:
        """Apply retention limits now; returns how many messages were removed."""

    @abstractmethod
    async def topics(self) -> list[TopicInfo]: ...

    @abstractmethod
    async def subscriptions(self) -> list[SubscriptionInfo]: ...

    # wake-ups ----------------------------------------------------------------
    def wake_waiters(self) -> None:
        """Wake everyone waiting for a change (the hub closing: they look and stop)."""
        self._notify()

    def _notify(self, topics: Iterable[str] | None = None,
                patterns: Iterable[str] = ()) -> None:
        """Wake waiters: something was stored or settled.

        With `topics` (what was stored), only the waiters for patterns matching one of
        them, plus those for `patterns` (subscriptions whose deliveries were settled),
        and every waiter for any change; without, everyone. Many subscriptions on one
        hub then do not all look after every commit.
        """
        _fire(self._changed)
        self._changed = _Changes()
        by_pattern = self._by_pattern
        if not by_pattern:
            return
        if topics is None:
            self._by_pattern = {}
            for ev in by_pattern.values():
                _fire(ev)
            return
        woken = set(patterns)
        for t in set(topics):
            woken |= self._patterns_of(t, by_pattern)
        for pattern in woken:
            if pattern in by_pattern:
                _fire(by_pattern.pop(pattern))

    def _patterns_of(self, topic: str, by_pattern: dict[str, _Changes]) -> set[str]:
        """The waited-for patterns `topic` matches (remembered per topic until a pattern
        not seen before is waited for)."""
        if not by_pattern.keys() <= self._patterns_seen:
            if len(self._patterns_seen) > 1024:  # many short-lived patterns: start afresh
                self._patterns_seen = set()
            self._patterns_seen |= by_pattern.keys()
            self._topic_patterns.clear()
        found = self._topic_patterns.get(topic)
        if found is None:
            found = {p for p in self._patterns_seen if _topics.matcher(p).match(topic)}
            if len(self._topic_patterns) > 10_000:
                self._topic_patterns.clear()
            self._topic_patterns[topic] = found
        return found & by_pattern.keys()

    def changes(self, pattern: str | None = None) -> asyncio.Event:
        """An event set at the next change (with `pattern`: the next that may concern a
        subscription to it); take it *before* looking, then wait on it."""
        if pattern is None:
            return self._changed
        ev = self._by_pattern.get(pattern)
        if ev is None:
            ev = self._by_pattern[pattern] = _Changes()
        return ev

    def _watch(self) -> None:
        """Someone waits now, where nobody did: an engine shared across processes
        starts looking for outside changes (see SqliteEngine)."""
        return None

    async def wait(self, event: asyncio.Event, timeout: float | None) -> None:
        """Wait for `event` (from `changes()`) or `timeout` seconds, whichever is first.

        Engines shared across processes poll for outside changes while anyone waits.
        """
        if event.is_set():
            return
        fut = getattr(event, "future", None)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            if isinstance(event, _Changes):
                event.future = fut
        self._waiters += 1
        if self._waiters == 1:
            self._watch()
        try:
            # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that races with the event firing, leaving a consumer that never stops.
            await asyncio.wait({fut}, timeout=timeout)
        finally:
            self._waiters -= 1
