"""A database for state, NATS JetStream for messages: `connect(db_url, broker="nats://…")`.

The database engine (SQLite or PostgreSQL) keeps what needs its transactions: the event
store, projections, saga state, inboxes. Every message travels through JetStream:

- `hub.publish` and everything else that publishes outside a database transaction goes
  straight to JetStream (its position is the stream sequence, as on `nats://`).
- A message written *inside* a database transaction (an event's message, a saga's
  command or reply, a projection's `tx.publish`) lands in the database's own log, which
  is the outbox: it commits with the state it belongs to, or not at all.
- A relay in every process moves committed outbox rows to JetStream in the database's
  order, each with `Nats-Msg-Id` = its message id, and then records how far it got (a
  checkpoint, compare-and-set in the JetStream state stream). A relay killed between
  the publish and the checkpoint publishes those rows again on restart and JetStream
  drops the copies (within its duplicate window, `dedup_window`, 120 s by default);
  several relays at once publish the same ids and the copies are dropped the same way.
  Nothing committed is lost: a row is behind the checkpoint only once JetStream stored it.
- Subscriptions, reads, retention and introspection are JetStream's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from ..errors import InvalidArgument, PayloadTooLarge
from ..messages import Message, OutMessage, Published
from .base import (
    HOLDING_MESSAGE,
    HOLDING_WRITER,
    Engine,
    Retention,
    Settle,
    SubscriptionInfo,
    TopicInfo,
)
from .delivery import SubscriptionSpec
from .jetstream import Conflict, JetStreamEngine
from .store_base import (
    AppendOutcome,
    EventRow,
    NewRecord,
    ProjectionState,
    SnapshotRow,
    StoreBackend,
    StoreTx,
    StreamAppend,
    StreamLoad,
)

T = TypeVar("T")

__all__ = ["BrokeredEngine"]

log = logging.getLogger("tidings.relay")

#: How long a write through the event store waits for the relay to have moved its
#: messages to JetStream (so a reader of the broker sees them at once); past it the write
#: returns anyway (it is committed) and the relay delivers when it can.
RELAY_WAIT = 5.0
#: Room left for an event's headers when its size is checked against the broker's limit.
HEADROOM = 16 * 1024
#: Outbox rows one relay pass moves (published pipelined, then one checkpoint).
RELAY_BATCH = 500
_dec_cp = msgspec.json.Decoder(int).decode


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:16]


class BrokeredEngine(Engine):
    """`db` for state and the outbox, `bus` (JetStream) for every message."""

    def __init__(self, db: Engine, bus: JetStreamEngine) -> None:
        super().__init__()
        self.db, self.bus = db, bus
        # connect(hub.url) opens the same pair again
        self.url = f"{db.url}{'&' if '?' in db.url else '?'}broker={bus.url}"
        self.dedup_window = bus.dedup_window
        self._relay: asyncio.Task[None] | None = None
        self._relayed = 0  # the outbox position this process knows JetStream holds
        self._relayed_changed = asyncio.Event()
        self._cp_rev = -1  # the checkpoint's revision as last seen (-1: read it first)
        self._closing = False
        self.relay_errors = 0
        self.relay_skipped = 0  # outbox rows too large for the broker (logged)

    # lifecycle ---------------------------------------------------------------
    async def open(self) -> None:
        await self.db.open()
        try:
            await self.bus.open()
        except BaseException:
            await self.db.close()
            raise
        self.migrations_applied = self.db.migrations_applied
        self._relay = asyncio.get_running_loop().create_task(self._relay_forever())

    async def close(self) -> None:
        self._closing = True
        if self._relay is not None:
            self._relay.cancel()
            with contextlib.suppress(BaseException):
                await self._relay
            self._relay = None
        try:
            await self.bus.close()
        finally:
            await self.db.close()

    async def migrate(self) -> int:
        return await self.db.migrate()

    def event_store(self) -> StoreBackend:
        return RelayedStore(self, self.db.event_store())

    # the relay ---------------------------------------------------------------
    @property
    def _cp_subject(self) -> str:
        """One checkpoint per database (by its URL, as every process names it): services
        with databases of their own may share one broker."""
        return f"{self.bus.state_stream}.relay.{_digest(self.db.url)}"

    async def _checkpoint(self) -> tuple[int, int]:
        """(position, revision) of the shared checkpoint (0, 0 when there is none)."""
        got = await self.bus._last(self._cp_subject)
        if got is None:
            return 0, 0
        return _dec_cp(got[0]), got[1]

    async def _advance(self, position: int, reset: bool = False) -> int:
        """Move the shared checkpoint up to `position` (never down, unless `reset`); where
        it is now. Tries the revision it last saw first: with one relay busy, one request."""
        for _ in range(50):
            if self._cp_rev < 0:
                stored, self._cp_rev = await self._checkpoint()
                if stored >= position and not reset:
                    return stored
            try:
                self._cp_rev = await self.bus.put_if(self._cp_subject, str(position).encode(),
                                                     self._cp_rev)
                return position
            except Conflict:
                self._cp_rev = -1  # another relay moved it: read it again
        return position

    async def relay_once(self) -> int:
        """Move what the outbox holds past the checkpoint to JetStream; how many rows."""
        # Taken first: nothing commits below it later, so once the rows up to it are
        # published everything up to it is (positions a rolled-back write took leave gaps
        # the relay must not wait for).
        end = await self.db.last_position()
        if self._cp_rev < 0:
            stored, self._cp_rev = await self._checkpoint()
            if stored > end:  # a database made again under the same URL: start over
                log.warning("outbox relay: the checkpoint (%d) is past %s's last position "
                            "(%d); relaying from its start", stored, self.db.url, end)
                stored = await self._advance(0, reset=True)
            self._set_relayed(stored)
        after = self._relayed
        if end <= after:
            return 0
        rows = await self.db.read(">", after, end, RELAY_BATCH)
        out = []
        for m in rows:
            o = OutMessage(m.id, m.topic, m.key, m.data, dict(m.headers), client_id=True)
            if self.bus.fits(o):
                out.append(o)
            else:  # it can never be sent: say so, and do not hold every later row back
                self.relay_skipped += 1
                log.error("outbox relay: message %s on %r (position %d, %d bytes) is larger "
                          "than the NATS server takes (its max_payload); it stays in the "
                          "database only. Raise the server's max_payload, or connect with "
                          "a smaller max_payload so that such writes are refused",
                          m.id, m.topic, m.position, len(m.data))
        if out:
            await self.bus.publish_relayed(out)
        upto = rows[-1].position if len(rows) == RELAY_BATCH else end
        self._set_relayed(await self._advance(upto))
        return len(rows)

    def _set_relayed(self, position: int) -> None:
        if position > self._relayed:
            self._relayed = position
            self._relayed_changed.set()
            self._relayed_changed = asyncio.Event()

    async def _relay_forever(self) -> None:
        delay = 0.05
        while not self._closing:
            changed = self.db.changes()  # taken before looking: no commit is missed
            try:
                moved = await self.relay_once()
                delay = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database or NATS is away: try again soon
                self.relay_errors += 1
                self._cp_rev = -1
                log.warning("outbox relay: %s; retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if not moved:
                await self.db.wait(changed, 1.0)

    async def relayed(self, timeout: float | None = None) -> bool:
        """Wait until everything committed to the outbox so far is in JetStream (False:
        `timeout` seconds passed first; the relay still moves it when it can)."""
        target = await self.db.last_position()
        try:
            async with asyncio.timeout(timeout):
                while self._relayed < target:
                    await self._relayed_changed.wait()
        except TimeoutError:
            return False
        return True

    # the log: JetStream ------------------------------------------------------
    async def append(self, messages: Sequence[OutMessage]) -> list[Published]:
        if HOLDING_WRITER.get():
            # Not a deadlock here, but a message sent now would not be undone with the
            # handler's transaction: the same refusal as the database alone gives.
            raise InvalidArgument(HOLDING_MESSAGE)
        return await self.bus.append(messages)

    async def read(self, pattern: str, after: int, stop: int | None, limit: int
                   ) -> list[Message]:
        return await self.bus.read(pattern, after, stop, limit)

    async def last_position(self) -> int:
        return await self.bus.last_position()

    async def position_before(self, timestamp: float) -> int:
        return await self.bus.position_before(timestamp)

    async def subscribe(self, spec: SubscriptionSpec, start_after: int | None) -> Any:
        return await self.bus.subscribe(spec, start_after)

    async def fetch(self, handle: Any, limit: int, now: float, settles: Sequence[Settle] = ()
                    ) -> tuple[list[Message], float | None]:
        return await self.bus.fetch(handle, limit, now, settles)

    async def settle(self, handle: Any, items: Sequence[Settle], now: float) -> None:
        await self.bus.settle(handle, items, now)

    async def delete_subscription(self, group: str, pattern: str) -> bool:
        return await self.bus.delete_subscription(group, pattern)

    async def set_retention(self, topic: str, retention: Retention) -> None:
        await self.bus.set_retention(topic, retention)

    async def trim(self, now: float) -> int:
        return await self.bus.trim(now)

    async def topics(self) -> list[TopicInfo]:
        return await self.bus.topics()

    async def subscriptions(self) -> list[SubscriptionInfo]:
        return await self.bus.subscriptions()

    # wake-ups: the database's for "anything changed", JetStream's per pattern -------
    def changes(self, pattern: str | None = None) -> asyncio.Event:
        return self.db.changes() if pattern is None else self.bus.changes(pattern)

    async def wait(self, event: asyncio.Event, timeout: float | None) -> None:
        if event is self.db.changes():
            await self.db.wait(event, timeout)
        else:
            await self.bus.wait(event, timeout)


class RelayedStore(StoreBackend):
    """The database's event store; each write returns once the relay has moved the
    messages it committed to JetStream (or after `RELAY_WAIT`), so what a process saved
    it can read from the broker at once, as on every engine."""

    def __init__(self, brokered: BrokeredEngine, inner: StoreBackend) -> None:
        super().__init__(brokered)
        self._brokered, self._inner = brokered, inner

    def _check_sizes(self, sizes: Iterable[int]) -> None:
        """PayloadTooLarge, before anything is stored, for an event or message the broker
        would refuse: committed, it could never be relayed."""
        limit = self._brokered.bus.max_message()
        if not limit:
            return
        for size in sizes:
            if size + HEADROOM > limit:
                raise PayloadTooLarge(
                    f"{size} bytes: with its headers that is more than the NATS broker "
                    f"takes ({limit} bytes, its max_payload, less {HEADROOM} for headers); "
                    "send less, or raise max_payload in the server's configuration")

    async def append(self, stream_id: str, records: Sequence[NewRecord], expected: int | None,
                     topic: str, snapshot: SnapshotRow | None = None) -> AppendOutcome:
        self._check_sizes(len(r.data) for r in records)
        out = await self._inner.append(stream_id, records, expected, topic, snapshot)
        await self._brokered.relayed(RELAY_WAIT)
        return out

    async def append_batch(self, items: Sequence[StreamAppend],
                           messages: Sequence[OutMessage] = (),
                           snapshots: Mapping[str, SnapshotRow] | None = None
                           ) -> list[AppendOutcome]:
        self._check_sizes([*(len(r.data) for item in items for r in item[1]),
                           *(len(m.data) for m in messages)])
        out = await self._inner.append_batch(items, messages, snapshots)
        await self._brokered.relayed(RELAY_WAIT)
        return out

    async def transaction(self, fn: Callable[[StoreTx], Awaitable[T]]) -> T:
        out = await self._inner.transaction(fn)
        await self._brokered.relayed(RELAY_WAIT)
        return out

    async def read_stream(self, stream_id: str, from_version: int, to_version: int | None,
                          limit: int) -> list[EventRow]:
        return await self._inner.read_stream(stream_id, from_version, to_version, limit)

    async def read_all(self, after: int, stop: int | None, limit: int) -> list[EventRow]:
        return await self._inner.read_all(after, stop, limit)

    async def stream_version(self, stream_id: str) -> int:
        return await self._inner.stream_version(stream_id)

    async def newer(self, stream_id: str, version: int, limit: int
                    ) -> tuple[int, list[EventRow]] | None:
        return await self._inner.newer(stream_id, version, limit)

    async def last_position(self) -> int:
        return await self._inner.last_position()

    async def load(self, stream_id: str, schema: str | None, to_version: int | None,
                   as_of: float | None) -> StreamLoad:
        return await self._inner.load(stream_id, schema, to_version, as_of)

    async def save_snapshot(self, stream_id: str, snapshot: SnapshotRow) -> None:
        await self._inner.save_snapshot(stream_id, snapshot)

    async def projections(self) -> list[ProjectionState]:
        return await self._inner.projections()
