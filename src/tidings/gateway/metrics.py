"""Prometheus metrics: HTTP traffic by route template and what passed through the
gateway (`tidings_http_*`), and the hub's own figures (tidings/metrics.py: messages
by topic and group, dead letters, event appends, saga outcomes, lag), read from
`hub.metrics()` at each scrape.

Each app has its own registry, so several apps in one process (tests, an
embedding application) never collide. Label values are bounded: routes are
templates (`/v1/topics/{topic}/messages`), never raw paths; the gateway's own
message counters carry no topic label (topic names come from clients); the hub's
fold internal `$` topics into one label each and never use ids.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ..hub import Hub
    from ..metrics import MetricsSnapshot

__all__ = ["CONTENT_TYPE", "GatewayMetrics", "HttpMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED = "<unmatched>"


class _HubCollector:
    """The hub's figures from its newest snapshot (taken just before each scrape)."""

    def __init__(self) -> None:
        self.snapshot: MetricsSnapshot | None = None

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot
        if snap is None:
            return []
        out: list[Metric] = []

        def counter(name: str, doc: str, labels: list[str], values: dict[Any, int]) -> None:
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, n in sorted(values.items()):
                family.add_metric(list(key) if isinstance(key, tuple) else [key], n)
            out.append(family)

        def gauge(name: str, doc: str, labels: list[str], values: Iterable[Any]) -> None:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for *key, n in values:
                family.add_metric(key, n)
            out.append(family)

        tg = ["topic", "group"]
        counter("tidings_messages_published", "Messages this process stored on a topic "
                "(publish, saga commands and replies, redrives).", ["topic"], snap.published)
        counter("tidings_messages_delivered", "Messages handed to consumers here.", tg,
                snap.delivered)
        counter("tidings_messages_redelivered", "Deliveries here of a message's second or "
                "later attempt.", tg, snap.redelivered)
        counter("tidings_messages_acked", "Acks by consumers here.", tg, snap.acked)
        counter("tidings_messages_nacked", "Nacks by consumers here.", tg, snap.nacked)
        counter("tidings_messages_terminated", "Terms by consumers here.", tg, snap.terminated)
        counter("tidings_messages_dead_lettered", "Messages this process dead-lettered (a "
                "term, or a nack of the last attempt).", tg, snap.dead_lettered)
        counter("tidings_events_appended", "Events this process appended, by the topic they "
                "are published on.", ["topic"], snap.events_appended)
        counter("tidings_saga_outcomes", "Sagas driven here that reached an end state.",
                ["saga", "status"], snap.saga_outcomes)
        seconds = HistogramMetricFamily("tidings_saga_duration_seconds",
                                        "Time from a saga's start to its end state.",
                                        labels=["saga", "status"])
        for (saga, status), h in sorted(snap.saga_seconds.items()):
            seconds.add_metric([saga, status],
                               [(_le(b), n) for b, n in h.cumulative()], h.sum)
        out.append(seconds)
        gauge("tidings_topic_messages", "Messages stored per topic.", ["topic"],
              ((t.topic, t.messages) for t in snap.topics))
        gauge("tidings_topic_bytes", "Bytes of data stored per topic.", ["topic"],
              ((t.topic, t.bytes) for t in snap.topics))
        gauge("tidings_dead_letters", "Messages stored on dead-letter topics ($dlq.*).",
              ["topic"], ((t.topic, t.messages) for t in snap.topics
                          if t.topic.startswith("$dlq.")))
        gauge("tidings_dead_letters_waiting", "Dead letters of a subscription not yet "
              "redriven (all processes).", ["group"], sorted(snap.dead_letters_waiting.items()))
        sg = ["group", "pattern"]
        subs = snap.subscriptions
        gauge("tidings_subscription_lag",
              "Messages matching a subscription not yet taken by it.", sg,
              ((s.group, s.pattern, s.lag) for s in subs))
        gauge("tidings_subscription_in_flight", "Messages delivered and not yet settled.", sg,
              ((s.group, s.pattern, s.in_flight) for s in subs))
        gauge("tidings_subscription_pending",
              "Messages taken by a subscription and not yet acked.", sg,
              ((s.group, s.pattern, s.pending) for s in subs))
        gauge("tidings_projection_lag", "Events a projection has still to process.",
              ["projection"], sorted(snap.projection_lag.items()))
        gauge("tidings_projection_failed", "1 if a projection stopped on a failing event.",
              ["projection"], sorted(snap.projection_failed.items()))
        return out


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class GatewayMetrics:
    """The counters the gateway (and, for sagas, its command targets) update."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.http_requests = Counter("tidings_http_requests", "HTTP requests handled.",
                                     ["method", "route", "status"], registry=r)
        self.http_seconds = Histogram("tidings_http_request_duration_seconds",
                                      "Time to the end of the response (SSE: the whole stream).",
                                      ["route"], registry=r,
                                      buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25,
                                               .5, 1, 2.5, 10, 60))
        # (the hub counts all messages by topic and group: tidings_messages_*)
        self.published = Counter("tidings_http_messages_published",
                                 "Messages published through the gateway.", registry=r)
        self.delivered = Counter("tidings_http_messages_delivered",
                                 "Messages handed to HTTP pull consumers.", registry=r)
        self.acked = Counter("tidings_http_messages_acked", "Acks received from HTTP consumers.",
                             registry=r)
        self.nacked = Counter("tidings_http_messages_nacked",
                              "Nacks received from HTTP consumers.", registry=r)
        self.streamed = Counter("tidings_messages_streamed",
                                "Messages sent on Server-Sent Event streams.", registry=r)
        self.events_appended = Counter("tidings_http_events_appended",
                                       "Events appended through the gateway.", registry=r)
        self.overloaded = Counter("tidings_http_overloaded",
                                  "Requests refused with 429/503 to shed load.", ["route"],
                                  registry=r)
        self.commands = Counter("tidings_commands", "Commands accepted (sagas started).",
                                ["saga"], registry=r)
        self._hub = _HubCollector()
        r.register(self._hub)
        self._lock = asyncio.Lock()
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (
                self.http_requests.labels(method, route, str(status)),
                self.http_seconds.labels(route),
            )
        pair[0].inc()
        pair[1].observe(seconds)

    async def watch_sagas(self, hub: Hub, after: int, *,
                          on_end: Callable[[str], None] | None = None) -> None:
        """Call `on_end(saga_id)` for each saga that ends, following `saga.<name>.ended`
        (the coordinator publishes it with the saga's `stream-id` header), so sagas of
        every process on the engine are seen. Runs until cancelled; `after` is the log
        position to follow from. (Saga outcomes are counted by the hub that drives
        them: tidings_saga_outcomes_total.)
        """
        async for m in hub.read("saga.*.ended", start=after + 1, follow=True):
            name = m.topic[len("saga."):-len(".ended")]
            stream = m.headers.get("stream-id", "")
            prefix = f"saga-{name}-"  # the coordinator's stream ids: saga-<name>-<id>
            if on_end is not None and stream.startswith(prefix):
                on_end(stream[len(prefix):])

    async def render(self, hub: Hub) -> bytes:
        """The text exposition, with the hub's gauges read now."""
        async with self._lock:
            self._hub.snapshot = await hub.metrics()
            return generate_latest(self.registry)


class HttpMetrics:
    """ASGI middleware: count every response by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            self.metrics.observe_http(scope["method"], template, status,
                                      time.perf_counter() - started)
