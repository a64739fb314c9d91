"""`memory://`: the whole engine in one process's memory, for tests and demos.

Same guarantees as the durable engines except durability itself: the log,
subscriptions and streams are gone when the process ends.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .. import topics as _topics
from ..messages import Message, OutMessage, Published
from .base import Engine, Retention, Settle, SubscriptionInfo, TopicInfo
from .delivery import (
    MAX_DELIVER,
    Dead,
    Pending,
    SubscriptionSpec,
    dead_letter,
    plan_fetch,
    plan_settle,
)
from .retention import limit_cuts, plan_trim, trim_floor
from .store_base import StoreBackend, headers_of_event

__all__ = ["MemoryEngine"]

class EventHeaders(msgspec.Struct, gc=False):
    """The headers of an event's message, as parts: the event store appends one per
    event instead of a dict, and the dict is built when the message is first read
    (most event messages never are). Not counted by the garbage collector either."""

    own: bytes | None  # the event's own headers, JSON
    type: str
    type_version: int
    stream_version: int
    position: int  # the event's position in the event store


class _Rec(msgspec.Struct, gc=False):
    """A stored message. Not tracked by the garbage collector: the log can hold millions,
    and a tracked tuple per message made every full collection walk all of them."""

    position: int
    id: str
    topic: str
    key: str | None
    data: bytes
    headers: dict[str, str] | EventHeaders
    time: float


def _headers(rec: _Rec) -> dict[str, str]:
    h = rec.headers
    if type(h) is EventHeaders:
        h = rec.headers = headers_of_event(
            _dec_headers(h.own) if h.own else {}, h.type, h.type_version, rec.key or "",
            h.stream_version, h.position)
    return h  # type: ignore[return-value]


_dec_headers = msgspec.json.Decoder(dict[str, str]).decode


@dataclass(slots=True)
class _Sub:
    spec: SubscriptionSpec
    cursor: int
    #: In position order without sorting: rows are only ever added above the cursor (so
    #: above every row already there), and a changed row keeps its key's place.
    pending: dict[int, Pending] = field(default_factory=dict)


class MemoryEngine(Engine):
    """An in-process engine (no durability); state lives as long as the object."""

    def __init__(self, url: str = "memory://", **options: Any) -> None:
        super().__init__()
        self.url = url
        self.dedup_window = float(options.pop("dedup_window", 120.0))
        if options:
            from ..errors import InvalidArgument

            raise InvalidArgument(
                f"memory:// does not take {', '.join(sorted(options))}; its only option is "
                "dedup_window (seconds)"
            )
        self._recs: dict[int, _Rec] = {}
        self._by_topic: dict[str, list[int]] = {}
        self._bytes: dict[str, int] = {}
        self._last = 0
        self._last_time = 0.0
        #: The time source for stored messages (a test's ManualClock may replace it).
        self.now: Callable[[], float] = _time.time
        self._ids: dict[str, tuple[int, float]] = {}
        self._subs: dict[tuple[str, str], _Sub] = {}
        self._retention: dict[str, Retention] = {}
        self.state: dict[str, Any] = {}  # other modules' in-memory tables (event store, …)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def event_store(self) -> StoreBackend:
        from .memory_store import MemoryStore  # (it imports this module)

        return MemoryStore(self)

    # the log -----------------------------------------------------------------
    def _store(self, batch: Sequence[OutMessage], now: float, results: bool = True
               ) -> list[Published]:
        """Synchronous append (also used by the event store inside one 'transaction');
        what each message became, unless `results` is False (then [])."""
        # Microseconds, as Message.time shows them: `start=msg.time` must include msg, and a
        # finer stored time could round up past it.
        now = round(max(now, self._last_time), 6)
        out: list[Published] = []
        seen: dict[str, int] = {}
        if len(self._ids) > 10_000:
            horizon = now - self.dedup_window
            self._ids = {k: v for k, v in self._ids.items() if v[1] >= horizon}
        recs, by_topic, sizes, ids = self._recs, self._by_topic, self._bytes, self._ids
        pos = self._last
        topic: str | None = None
        positions: list[int] = []
        append = out.append
        for m in batch:
            if m.client_id:
                known = ids.get(m.id)
                if known is not None and known[1] >= now - self.dedup_window:
                    if results:
                        append(Published(known[0], m.id, True))
                    continue
                if m.id in seen:
                    if results:
                        append(Published(seen[m.id], m.id, True))
                    continue
                ids[m.id] = (pos + 1, now)
                seen[m.id] = pos + 1
            pos += 1
            if m.topic != topic:  # batches are mostly one topic: look its list up once
                topic = m.topic
                positions = by_topic.setdefault(topic, [])
            recs[pos] = _Rec(pos, m.id, topic, m.key, m.data, m.headers or {}, now)
            positions.append(pos)
            sizes[topic] = sizes.get(topic, 0) + len(m.data)
            if results:
                append(Published(pos, m.id, False))
        self._last = pos
        self._last_time = now
        return out

    async def append(self, messages: Sequence[OutMessage]) -> list[Published]:
        out = self._store(messages, round(self.now(), 6))
        self._notify({m.topic for m in messages})
        return out

    def _matching(self, pattern: str) -> list[list[int]]:
        rx = _topics.matcher(pattern)
        return [ps for t, ps in self._by_topic.items() if rx.match(t)]

    def _scan(self, pattern: str, after: int, stop: int | None, limit: int) -> list[int]:
        streams = []
        for ps in self._matching(pattern):
            i = bisect.bisect_right(ps, after)
            j = len(ps) if stop is None else bisect.bisect_right(ps, stop)
            streams.append(ps[i : min(j, i + limit)])
        return list(itertools.islice(heapq.merge(*streams), limit))

    @staticmethod
    def _message(rec: _Rec, attempt: int = 0, sub: Any = None) -> Message:
        return Message(rec.id, rec.topic, rec.key, rec.data, _headers(rec), rec.time,
                       rec.position, attempt, sub)

    def stored(self, pattern: str) -> list[Message]:
        """Every stored message matching `pattern`, in position order (no await: for
        tests that inspect what an application published)."""
        recs = self._recs
        return [self._message(recs[p]) for p in self._scan(pattern, 0, None, len(recs))]

    async def read(self, pattern: str, after: int, stop: int | None, limit: int) -> list[Message]:
        return [self._message(self._recs[p]) for p in self._scan(pattern, after, stop, limit)]

    async def last_position(self) -> int:
        return self._last

    async def position_before(self, timestamp: float) -> int:
        best = 0
        for ps in self._by_topic.values():
            times = [self._recs[p].time for p in ps]
            i = bisect.bisect_left(times, timestamp)
            if i:
                best = max(best, ps[i - 1])
        return best

    # subscriptions -----------------------------------------------------------
    async def subscribe(self, spec: SubscriptionSpec, start_after: int | None) -> Any:
        key = (spec.group, spec.pattern)
        sub = self._subs.get(key)
        if sub is None:
            self._subs[key] = _Sub(spec, start_after or 0)
        else:
            sub.spec = spec
        return key

    async def fetch(
        self, handle: Any, limit: int, now: float, settles: Sequence[Settle] = ()
    ) -> tuple[list[Message], float | None]:
        if settles:
            self._settle(handle, settles, now)
        sub = self._subs.get(handle)
        if sub is None:
            return [], None
        pending = list(sub.pending.values())  # in position order (see _Sub)
        want = min(limit, sub.spec.max_in_flight)
        found = self._scan(sub.spec.pattern, sub.cursor, None, want)
        cands = [(p, self._recs[p].key) for p in found]
        plan = plan_fetch(sub.spec, pending, cands, cursor=sub.cursor, now=now, limit=limit)
        if len(found) < want and len(plan.added) == len(found):
            plan.cursor = max(plan.cursor, self._last)  # nothing more matches up to here
        for p in plan.dead:
            del sub.pending[p.position]
        if plan.dead:
            self._dead_letter(sub.spec, [Dead(p, MAX_DELIVER) for p in plan.dead], now)
        for p in plan.added:
            sub.pending[p.position] = p
        sub.cursor = plan.cursor
        msgs = []
        recs = self._recs
        for p in plan.deliver:
            rec = recs.get(p.position)
            if rec is None:  # removed underneath (cannot happen: trim respects pending)
                sub.pending.pop(p.position, None)
                continue
            msgs.append(Message(rec.id, rec.topic, rec.key, rec.data, _headers(rec), rec.time,
                                rec.position, p.attempt))
        if plan.dead:
            self._notify()
        return msgs, plan.next_due

    def _dead_letter(self, spec: SubscriptionSpec, dead: Sequence[Dead], now: float) -> None:
        """Append the dead letters of rows already removed (a trimmed message has none)."""
        if spec.dead_letter is None:
            return
        recs = self._recs
        out = [dead_letter(spec, self._message(recs[d.row.position]), d)
               for d in dead if d.row.position in recs]
        if out:
            self._store(out, now, results=False)

    async def settle(self, handle: Any, items: Sequence[Settle], now: float) -> None:
        self._settle(handle, items, now)

    def _settle(self, handle: Any, items: Sequence[Settle], now: float) -> None:
        sub = self._subs.get(handle)
        if sub is None:
            return
        pending = sub.pending
        plan = plan_settle(sub.spec, pending, items, now)
        for position in plan.delete:
            del pending[position]
        for row in plan.update:
            pending[row.position] = row
        if plan.dead:
            for d in plan.dead:
                del pending[d.row.position]
            self._dead_letter(sub.spec, plan.dead, now)
        # its own waiters (room, a redelivery) and, for a dead letter, the dead-letter topic's
        self._notify((sub.spec.dead_letter,) if sub.spec.dead_letter else (),
                     (sub.spec.pattern,))

    async def delete_subscription(self, group: str, pattern: str) -> bool:
        return self._subs.pop((group, pattern), None) is not None

    # retention ---------------------------------------------------------------
    async def set_retention(self, topic: str, retention: Retention) -> None:
        self._retention[topic] = retention

    async def trim(self, now: float) -> int:
        removed = 0
        subs = [(sub.spec.pattern, sub.cursor, min(sub.pending, default=None))
                for sub in self._subs.values()]
        recs = self._recs
        for topic, r in self._retention.items():
            ps = self._by_topic.get(topic)
            if not ps:
                continue
            newest_first = ((p, recs[p].time, len(recs[p].data)) for p in reversed(ps))
            cut = plan_trim(r, limit_cuts(r, newest_first, now), trim_floor(topic, subs)).cut
            if cut is None:
                continue
            n = bisect.bisect_right(ps, cut)
            for p in ps[:n]:
                self._bytes[topic] -= len(recs.pop(p).data)
            del ps[:n]
            removed += n
        return removed

    async def topics(self) -> list[TopicInfo]:
        return [
            TopicInfo(t, len(ps), self._bytes.get(t, 0), ps[0] if ps else None,
                      ps[-1] if ps else None)
            for t, ps in sorted(self._by_topic.items())
        ]

    async def subscriptions(self) -> list[SubscriptionInfo]:
        out = []
        for (group, pattern), sub in sorted(self._subs.items()):
            lag = len(self._scan(pattern, sub.cursor, None, 10**12))
            out.append(
                SubscriptionInfo(
                    group, pattern, sub.cursor, len(sub.pending),
                    sum(1 for p in sub.pending.values() if p.attempt and p.due > self.now()),
                    lag + len(sub.pending), sub.spec.ordered, sub.spec.max_in_flight,
                    sub.spec.dead_letter,
                )
            )
        return out
