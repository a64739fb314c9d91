"""Domain metrics: what this hub published, delivered, settled, dead-lettered, appended
and ended (sagas), plus gauges read from the engine when asked (lag, dead letters
waiting, projection lag).

Always on and cheap: counters are plain ints in dicts keyed by label tuples, bumped
by the code that does the work (at most a dict increment per message; batches are
counted once). `hub.metrics()` gives a plain snapshot; the gateway renders it for
Prometheus (gateway/metrics.py). No dependency: core tidings does not import
prometheus_client.

Counters count what *this process* did (sum them across instances in Prometheus);
the gauges are read from the engine, so they are right across processes sharing it.
Labels are bounded: topics starting with `$` (dead letters `$dlq.<group>`, redrive
markers `$rdv.<group>`) are counted under their first token (`$dlq`), and no
message, saga or stream id is ever a label.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engines.base import SubscriptionInfo, TopicInfo
    from .engines.delivery import SubscriptionSpec
    from .engines.store_base import AppendOutcome
    from .hub import Hub
    from .messages import Message, OutMessage, Published
    from .saga.definition import SagaState

__all__ = ["SAGA_BUCKETS", "Counters", "GroupCounts", "Histogram", "MetricsSnapshot", "snapshot"]

#: Upper bounds (seconds) of the saga duration histogram's buckets (+Inf is implied).
SAGA_BUCKETS = (.005, .01, .02, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

TopicGroup = tuple[str, str]


def topic_label(topic: str) -> str:
    """The label a topic is counted under: internal `$` topics by their first token."""
    return topic.split(".", 1)[0] if topic.startswith("$") else topic


@dataclass(slots=True)
class Histogram:
    """Observations in fixed buckets: `counts[i]` fell at or under `bounds[i]` and above
    the bound before; the last count is over the last bound."""

    bounds: tuple[float, ...]
    counts: list[int]
    sum: float = 0.0

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls(bounds, [0] * (len(bounds) + 1))

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or under it), ending with (inf, count)."""
        out, n = [], 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts, strict=True):
            n += c
            out.append((bound, n))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.sum)


class GroupCounts:
    """One subscription's (`group`'s) consumer counts here, by raw topic; shared by its
    consumers (`Counters.group`). Acks are counted inline by `Subscription._settle`."""

    __slots__ = ("acked", "dead", "delivered", "nacked", "redelivered", "terminated")

    def __init__(self) -> None:
        self.delivered: dict[str, int] = {}
        self.redelivered: dict[str, int] = {}
        self.acked: dict[str, int] = {}
        self.nacked: dict[str, int] = {}
        self.terminated: dict[str, int] = {}
        self.dead: dict[str, int] = {}  # dead-lettered by a settle made here

    def on_deliver(self, msgs: Iterable[Message]) -> None:
        """A consumer was handed `msgs` (attempt > 1: a redelivery)."""
        d, r = self.delivered, self.redelivered
        for m in msgs:
            t = m.topic
            d[t] = d.get(t, 0) + 1
            if m.attempt > 1:
                r[t] = r.get(t, 0) + 1

    def settled(self, msg: Message, spec: SubscriptionSpec, kind: str) -> dict[str, int]:
        """The counts (by topic) a nack or term of `msg` goes into; a term, or a nack of
        its last attempt, is also counted as dead-lettered (as this process decides it;
        leases that run out are dead-lettered by the engine and show in the dead letters
        waiting)."""
        if kind == "term" or (kind == "nack" and msg.attempt >= spec.max_deliver):
            self.dead[msg.topic] = self.dead.get(msg.topic, 0) + 1
        return self.terminated if kind == "term" else self.nacked


class Counters:
    """The hub's running totals (monotonic; never reset while the hub is open).

    Keys are raw topic names (a `$` topic is folded into its first token only in
    the snapshot, off the hot path).
    """

    __slots__ = ("appended", "groups", "published", "saga_outcomes", "saga_seconds")

    def __init__(self) -> None:
        self.published: dict[str, int] = {}
        self.groups: dict[str, GroupCounts] = {}
        self.appended: dict[str, int] = {}
        self.saga_outcomes: dict[TopicGroup, int] = {}  # (saga, status)
        self.saga_seconds: dict[TopicGroup, Histogram] = {}

    def on_publish(self, batch: Sequence[OutMessage], stored: list[Published] | None = None
                   ) -> list[Published]:
        """`batch` was stored (`stored`: what the engine said; duplicates of earlier ids
        are left out); returns `stored`."""
        d = self.published
        if stored is None or len(stored) != len(batch):
            for out in batch:
                d[out.topic] = d.get(out.topic, 0) + 1
            return stored or []
        topic, n = batch[0].topic, 0
        for out, p in zip(batch, stored, strict=True):
            if p.duplicate:
                continue
            if out.topic == topic:
                n += 1
            else:  # (an envelope naming another topic)
                d[out.topic] = d.get(out.topic, 0) + 1
        if n:
            d[topic] = d.get(topic, 0) + n
        return stored

    def group(self, group: str) -> GroupCounts:
        """The consumer counts of subscription `group` (made on first use)."""
        found = self.groups.get(group)
        if found is None:
            found = self.groups[group] = GroupCounts()
        return found

    def on_append(self, topic: str, n: int) -> None:
        """`n` events appended to streams whose messages go on `topic`."""
        if n:
            d = self.appended
            d[topic] = d.get(topic, 0) + n

    def on_commit(self, items: Sequence[tuple[str, Sequence[Any], Any, str]],
                  outcomes: Sequence[AppendOutcome], messages: Sequence[OutMessage]) -> None:
        """A transaction stored `items` (stream appends: their `outcomes`) and
        `messages` (counted as published)."""
        for (_, records, _, topic), out in zip(items, outcomes, strict=False):
            if not out.duplicate:
                self.on_append(topic, len(records))
        if messages:
            self.on_publish(messages)

    def on_saga_end(self, state: SagaState) -> None:
        """A saga driven here reached `state.status` (completed, compensated, or stuck:
        each time it gets stuck)."""
        k = (state.name, state.status)
        self.saga_outcomes[k] = self.saga_outcomes.get(k, 0) + 1
        if state.finished is not None and state.started:
            h = self.saga_seconds.get(k)
            if h is None:
                h = self.saga_seconds[k] = Histogram.empty(SAGA_BUCKETS)
            h.observe(max(0.0, state.finished - state.started))


@dataclass(frozen=True)
class MetricsSnapshot:
    """The hub's figures at one moment (see `Hub.metrics`).

    Counters (this process, since the hub opened), keyed by label values; a `$`
    topic appears as its first token (`$dlq`):

    - `published[topic]`, `delivered[(topic, group)]`, `redelivered[(topic, group)]`
      (attempt 2 or later), `acked`, `nacked`, `terminated` and `dead_lettered`
      (`term`, or a nack of the last attempt) by `(topic, group)`;
    - `events_appended[topic]` (the topic the events are published on);
    - `saga_outcomes[(saga, status)]` and `saga_seconds[(saga, status)]` (start to end).

    Gauges, read from the engine now (right across processes sharing it):
    `topics`, `subscriptions` (with `lag`, `pending`, `in_flight`),
    `dead_letters_waiting[group]` (in `$dlq.<group>`, not yet redriven) and
    `projection_lag[name]` / `projection_failed[name]` (events left to do; 1 if stopped
    on a failure). Those the engine cannot give (an event store on a broker-only
    engine) are empty.
    """

    published: dict[str, int]
    delivered: dict[TopicGroup, int]
    redelivered: dict[TopicGroup, int]
    acked: dict[TopicGroup, int]
    nacked: dict[TopicGroup, int]
    terminated: dict[TopicGroup, int]
    dead_lettered: dict[TopicGroup, int]
    events_appended: dict[str, int]
    saga_outcomes: dict[TopicGroup, int]
    saga_seconds: dict[TopicGroup, Histogram]
    topics: list[TopicInfo] = field(default_factory=list)
    subscriptions: list[SubscriptionInfo] = field(default_factory=list)
    dead_letters_waiting: dict[str, int] = field(default_factory=dict)
    projection_lag: dict[str, int] = field(default_factory=dict)
    projection_failed: dict[str, int] = field(default_factory=dict)


def _fold(d: dict[Any, int], label: Any) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for k, n in list(d.items()):
        k = label(k)
        out[k] = out.get(k, 0) + n
    return out


def counted(c: Counters) -> MetricsSnapshot:
    """The counters alone (no engine reads), `$` topics folded."""
    kinds = ("delivered", "redelivered", "acked", "nacked", "terminated", "dead")
    by_kind: dict[str, dict[TopicGroup, int]] = {k: {} for k in kinds}
    for group, g in list(c.groups.items()):
        for kind in kinds:
            d = by_kind[kind]
            for topic, n in list(getattr(g, kind).items()):
                k = (topic_label(topic), group)
                d[k] = d.get(k, 0) + n
    return MetricsSnapshot(
        published=_fold(c.published, topic_label),
        delivered=by_kind["delivered"], redelivered=by_kind["redelivered"],
        acked=by_kind["acked"], nacked=by_kind["nacked"], terminated=by_kind["terminated"],
        dead_lettered=by_kind["dead"],
        events_appended=_fold(c.appended, topic_label),
        saga_outcomes=dict(c.saga_outcomes),
        saga_seconds={k: h.copy() for k, h in list(c.saga_seconds.items())},
    )


def waiting_dead_letters(sizes: Mapping[str, int]) -> dict[str, int]:
    """Per group: messages in `$dlq.<group>` less those redriven (one marker each in
    `redrive.marker_topic(group)`), from the messages per topic."""
    from .redrive import marker_topic

    dlq = "$dlq."
    return {topic[len(dlq):]: max(0, n - sizes.get(marker_topic(topic[len(dlq):]), 0))
            for topic, n in sizes.items() if topic.startswith(dlq)}


async def snapshot(hub: Hub) -> MetricsSnapshot:
    """The hub's counters, and the gauges read from its engine now."""
    from .errors import TidingsError

    snap = counted(hub.counters)
    topics = await hub.engine.topics()
    subs = await hub.engine.subscriptions()
    snap.topics.extend(topics)
    snap.subscriptions.extend(subs)
    snap.dead_letters_waiting.update(waiting_dead_letters({t.topic: t.messages
                                                           for t in topics}))
    try:
        statuses = await hub.projections.statuses()
    except TidingsError:  # no event store on this engine
        statuses = []
    for s in statuses:
        snap.projection_lag[s.name] = s.lag
        snap.projection_failed[s.name] = int(s.status == "failed")
    return snap
