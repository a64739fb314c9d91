"""Prometheus metrics: HTTP traffic by route template, message and saga counters, and
gauges read from the hub at scrape time (topic sizes, subscription lag, dead letters).

Each app has its own registry, so several apps in one process (tests, an
embedding application) never collide. Label values are bounded: routes are
templates (`/v1/topics/{topic}/messages`), never raw paths, and message
counters carry no topic label (topic names come from clients).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ..hub import Hub

__all__ = ["CONTENT_TYPE", "GatewayMetrics", "HttpMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED = "<unmatched>"


class _HubCollector:
    """Gauges from the newest hub snapshot (taken just before each scrape)."""

    def __init__(self) -> None:
        self.topics: list[dict[str, Any]] = []
        self.subscriptions: list[Any] = []

    def collect(self) -> Iterable[Metric]:
        messages = GaugeMetricFamily("tidings_topic_messages", "Messages stored per topic.",
                                     labels=["topic"])
        size = GaugeMetricFamily("tidings_topic_bytes", "Bytes of data stored per topic.",
                                 labels=["topic"])
        dead = GaugeMetricFamily("tidings_dead_letters",
                                 "Messages stored on dead-letter topics ($dlq.*).",
                                 labels=["topic"])
        for t in self.topics:
            messages.add_metric([t["topic"]], t["messages"])
            size.add_metric([t["topic"]], t["bytes"])
            if t["topic"].startswith("$dlq."):
                dead.add_metric([t["topic"]], t["messages"])
        lag = GaugeMetricFamily("tidings_subscription_lag",
                                "Messages matching a subscription not yet taken by it.",
                                labels=["group", "pattern"])
        in_flight = GaugeMetricFamily("tidings_subscription_in_flight",
                                      "Messages delivered and not yet settled.",
                                      labels=["group", "pattern"])
        pending = GaugeMetricFamily("tidings_subscription_pending",
                                    "Messages taken by a subscription and not yet acked.",
                                    labels=["group", "pattern"])
        for s in self.subscriptions:
            lag.add_metric([s.group, s.pattern], s.lag)
            in_flight.add_metric([s.group, s.pattern], s.in_flight)
            pending.add_metric([s.group, s.pattern], s.pending)
        return [messages, size, dead, lag, in_flight, pending]


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
        self.published = Counter("tidings_messages_published",
                                 "Messages published through the gateway.", registry=r)
        self.delivered = Counter("tidings_messages_delivered",
                                 "Messages handed to HTTP pull consumers.", registry=r)
        self.acked = Counter("tidings_messages_acked", "Acks received from HTTP consumers.",
                             registry=r)
        self.nacked = Counter("tidings_messages_nacked", "Nacks received from HTTP consumers.",
                              registry=r)
        self.streamed = Counter("tidings_messages_streamed",
                                "Messages sent on Server-Sent Event streams.", registry=r)
        self.events_appended = Counter("tidings_events_appended",
                                       "Events appended through the gateway.", registry=r)
        self.overloaded = Counter("tidings_http_overloaded",
                                  "Requests refused with 429/503 to shed load.", ["route"],
                                  registry=r)
        self.commands = Counter("tidings_commands", "Commands accepted (sagas started).",
                                ["saga"], registry=r)
        # Saga outcomes and latency, from the lifecycle topics (`watch_sagas`), so sagas run
        # by any process sharing the engine count.
        self.saga_outcomes = Counter("tidings_saga_outcomes", "Sagas that reached an end state.",
                                     ["saga", "status"], registry=r)
        self.saga_seconds = Histogram("tidings_saga_duration_seconds",
                                      "Time from start to an end state.", ["saga"], registry=r,
                                      buckets=(.005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5, 10, 30,
                                               60))
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
                          on_end: Callable[[str], None] | None = None,
                          remembered: int = 100_000) -> None:
        """Count saga outcomes and time them, following `saga.<name>.started` / `.ended`.

        The coordinator publishes both (each with the saga's `stream-id` header;
        `.ended` also with `status`), so this sees sagas of every process on the
        engine.
        Runs until cancelled; `after` is the log position to follow from.
        `on_end(saga_id)` is called for each saga that ends.
        """
        started: dict[str, float] = {}  # saga id -> start time, bounded (oldest forgotten)

        async def starts() -> None:
            async for m in hub.read("saga.*.started", start=after + 1, follow=True):
                started[m.headers.get("stream-id", "")] = m.timestamp
                if len(started) > remembered:
                    del started[next(iter(started))]

        async def ends() -> None:
            async for m in hub.read("saga.*.ended", start=after + 1, follow=True):
                name = m.topic[len("saga."):-len(".ended")]
                stream = m.headers.get("stream-id", "")
                self.saga_outcomes.labels(name, m.headers.get("status", "unknown")).inc()
                t0 = started.pop(stream, None)
                if t0 is not None:
                    self.saga_seconds.labels(name).observe(max(0.0, m.timestamp - t0))
                prefix = f"saga-{name}-"  # the coordinator's stream ids: saga-<name>-<id>
                if on_end is not None and stream.startswith(prefix):
                    on_end(stream[len(prefix):])

        await asyncio.gather(starts(), ends())

    async def render(self, hub: Hub) -> bytes:
        """The text exposition, with the hub's gauges read now."""
        async with self._lock:
            self._hub.topics = await hub.topics()
            self._hub.subscriptions = await hub.engine.subscriptions()
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
