"""The live dashboard: a static page, and the snapshot it receives every second over SSE.

The page (gateway/static/) has no build step; it opens
`/v1/dashboard/stream` and redraws from each JSON snapshot: topics with counts
and rates, subscriptions with lag and in-flight counts, dead letters, saga
instances (newest first) with live counts, recent requests, and the points of
the last minutes for its charts (gateway/history.py), plus a form that posts a
command. The engine is sampled about once a second while the server runs
(`Dashboard.run`), so a page opened now shows the minutes before it too; the
stream sends all the points in its first snapshot and only the new ones after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..engines.base import Engine, SubscriptionInfo
from ..errors import ClosedError
from ..metrics import waiting_dead_letters
from ..saga.runner import SagaRunner
from .commands import TERMINAL, listing, lookup, outcome
from .history import LATENCY_BUCKETS, Figures, History
from .http import json_response
from .replay import newest
from .sse import EventStream, frame

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["Dashboard", "routes"]

log = logging.getLogger("tidings.gateway")

STATIC = Path(__file__).resolve().parent / "static"
#: Snapshots younger than this are shared by every open dashboard.
FRESH = 0.5
#: Saga instances shown, newest first. (A command target other than `hub.sagas(...)`
#: is listed through its `list()`: at most SAGAS_SCANNED of them are read.)
SAGAS_SCANNED = 200
SAGAS_SHOWN = 20
#: How far back the charts go.
HISTORY_SECONDS = 600.0
#: How far back the start times of sagas are read when the server starts, so that those
#: ending later are timed (older ones still count, untimed).
STARTS_FOR = 3600.0
#: Lifecycle messages read per sample at most (a first sample of a long history
#: catches up over several).
LIFECYCLE_PAGE = 5000
LIFECYCLE_PAGES = 10


@dataclass
class Sample:
    """One look at the engine: when (monotonic), what it held, and its chart point."""

    at: float
    topics: list[dict[str, Any]]
    subscriptions: list[SubscriptionInfo]
    point: dict[str, Any]


class SagasSeen:
    """Sagas that ended, by name and status, and how long they took: read from the
    coordinator's lifecycle topics (`saga.<name>.started` / `.ended`) as they grow, so
    the sagas of every process on the engine count, whenever they started."""

    def __init__(self, remembered: int = 100_000) -> None:
        self.ended: dict[str, dict[str, int]] = {}
        self._starts: OrderedDict[str, float] = OrderedDict()  # stream id -> start time
        self._remembered = remembered
        self._after_started: int | None = None
        self._after_ended = 0

    async def read(self, engine: Engine, upto: int, now: float, recent: float
                   ) -> list[tuple[str, float | None]]:
        """Read what was stored up to position `upto`; returns `(status, seconds)` of the
        sagas that ended after `now - recent`."""
        if self._after_started is None:
            self._after_started = await engine.position_before(now - STARTS_FOR)
        caught_up = True
        for _ in range(LIFECYCLE_PAGES):
            batch = await engine.read("saga.*.started", self._after_started, upto,
                                      LIFECYCLE_PAGE)
            for m in batch:
                self._starts[m.headers.get("stream-id", "")] = m.timestamp
                if len(self._starts) > self._remembered:
                    self._starts.popitem(last=False)
            if batch:
                self._after_started = batch[-1].position
            caught_up = len(batch) < LIFECYCLE_PAGE
            if caught_up:
                break
        # ends only as far as the starts were read, so every end finds its start
        last = upto if caught_up else self._after_started
        out: list[tuple[str, float | None]] = []
        for _ in range(LIFECYCLE_PAGES):
            batch = await engine.read("saga.*.ended", self._after_ended, last, LIFECYCLE_PAGE)
            for m in batch:
                name = m.topic[len("saga."):-len(".ended")]
                status = m.headers.get("status", "unknown")
                by_status = self.ended.setdefault(name, {})
                by_status[status] = by_status.get(status, 0) + 1
                t0 = self._starts.pop(m.headers.get("stream-id", ""), None)
                if m.timestamp >= now - recent:
                    out.append((status, None if t0 is None else max(0.0, m.timestamp - t0)))
            if batch:
                self._after_ended = batch[-1].position
            if len(batch) < LIFECYCLE_PAGE:
                break
        return out


class Dashboard:
    """Builds snapshots, sharing one per interval among all viewers."""

    def __init__(self, gw: Gateway, interval: float = 1.0) -> None:
        self.gw = gw
        self.interval = interval
        self._lock = asyncio.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._sample: Sample | None = None
        self.history = History(HISTORY_SECONDS)
        self.sagas_seen = SagasSeen()

    async def snapshot(self) -> dict[str, Any]:
        """What the page shows now, without the chart points (`history.since(t)` has
        those)."""
        async with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < FRESH:
                return self._cached[1]
            snap = await self._build(await self._sampled(now, fresh=0.0))  # as of now
            self._cached = (now, snap)
            return snap

    async def run(self) -> None:
        """Sample every `interval` until cancelled (or the hub closes), for the charts."""
        while True:
            began = time.monotonic()
            try:
                async with self._lock:
                    await self._sampled(began, fresh=self.interval * 0.9)
            except ClosedError:
                return
            except Exception:  # the engine is away for now: the next round tries again
                log.warning("dashboard sample failed", exc_info=True)
            took = time.monotonic() - began
            # a slow engine is sampled less often: a tenth of the time at most goes to it
            await asyncio.sleep(max(self.interval - took, took * 9))

    async def _sampled(self, now: float, fresh: float) -> Sample:
        """The latest sample, taken now unless it is younger than `fresh` seconds (hold
        the lock)."""
        if self._sample is not None and now - self._sample.at < fresh:
            return self._sample
        hub = self.gw.hub
        upto = await hub.engine.last_position()
        topics = await hub.topics()
        subs = await hub.engine.subscriptions()
        wall = time.time()
        ended = await self.sagas_seen.read(hub.engine, upto, wall, HISTORY_SECONDS)
        point = self.history.add(Figures(
            wall, {t["topic"]: t["messages"] for t in topics},
            {(s.group, s.pattern): s.lag for s in subs}, ended))
        self._sample = Sample(now, topics, subs, point)
        return self._sample

    async def _build(self, sample: Sample) -> dict[str, Any]:
        gw = self.gw
        topics, subs, point = sample.topics, sample.subscriptions, sample.point
        counts = {t["topic"]: t["messages"] for t in topics}
        dt = point["dt"] or 1.0
        shown = [{"topic": t["topic"], "messages": t["messages"], "bytes": t["bytes"],
                  "last_position": t["last_position"],
                  "rate": round(point["published"].get(t["topic"], 0) / dt, 1)}
                 for t in topics if not t["topic"].startswith("$")]
        # per group: its dead letters less those redriven (the figure /metrics shows)
        dead = [{"topic": f"$dlq.{group}", "group": group, "messages": n}
                for group, n in waiting_dead_letters(counts).items()]
        return {
            "time": time.time(),
            "topics": shown,
            "subscriptions": [{"group": s.group, "pattern": s.pattern, "lag": s.lag,
                               "pending": s.pending, "in_flight": s.in_flight} for s in subs],
            "dead_letters": dead,
            "dead_letter_total": sum(d["messages"] for d in dead),
            "commands": sorted(gw.commands),
            "sagas": await self._sagas(counts),
            "requests": await self._requests(),
            "latency_buckets": LATENCY_BUCKETS,
        }

    async def _sagas(self, counts: dict[str, int]) -> dict[str, Any] | None:
        """Saga instances, newest first, and how many there are by status, when a command
        target can list them (None: nothing to show).

        For `hub.sagas(...)` targets the counts are live for every saga (started: the
        messages on `saga.<name>.started`; completed and compensated: those seen on
        `.ended`; the rest, compensating and stuck too, count as running) and the
        newest are found by reading `.started` backwards."""
        engine = self.gw.hub.engine
        instances: list[dict[str, Any]] = []
        by_status: dict[str, int] = {}
        listed = False
        newest_first: list[tuple[int, str, str]] = []  # (position, saga name, saga id)
        for name, t in self.gw.commands.items():
            if isinstance(t, SagaRunner):
                listed = True
                ended = self.sagas_seen.ended.get(name, {})
                for st, n in ended.items():
                    by_status[st] = by_status.get(st, 0) + n
                running = counts.get(f"saga.{name}.started", 0) - sum(ended.values())
                if running > 0:
                    by_status["running"] = by_status.get("running", 0) + running
                got, _ = await newest(engine, f"saga.{name}.started", 0,
                                      await engine.last_position(), SAGAS_SHOWN)
                prefix = f"saga-{name}-"  # the coordinator's stream ids: saga-<name>-<id>
                newest_first += [(m.position, name, sid[len(prefix):]) for m in got
                                 if (sid := m.headers.get("stream-id", "")).startswith(prefix)]
                continue
            listed_here = await listing(t, None, SAGAS_SCANNED)
            if listed_here is None:
                continue
            listed = True
            for s in listed_here:
                st = str(s.get("status", "?"))
                by_status[st] = by_status.get(st, 0) + 1
            instances.extend({**s, "saga": name} for s in listed_here[-SAGAS_SHOWN:][::-1])
        if not listed:
            return None
        for _, name, saga_id in sorted(newest_first, reverse=True)[:SAGAS_SHOWN]:
            state = await lookup(self.gw.commands[name], saga_id)
            if state is not None:
                instances.append({**state, "saga": name})
        instances.sort(key=lambda s: -s["started"] if isinstance(s.get("started"), (int, float))
                       else 0.0)
        return {"by_status": by_status, "instances": instances[:SAGAS_SHOWN]}

    async def _requests(self) -> list[dict[str, Any]]:
        gw = self.gw
        for r in gw.requests.recent:
            if r["status"] in TERMINAL:
                continue
            t = gw.commands.get(r["saga"])
            if t is None:
                continue
            state = await lookup(t, r["request_id"])
            if state is not None:
                r.update(outcome(state))
        return [dict(r) for r in gw.requests.recent]


def routes(gw: Gateway) -> list[BaseRoute]:
    dash = gw.dashboard
    index = (STATIC / "index.html").read_bytes()

    async def page(request: Request) -> Response:
        return Response(index, media_type="text/html; charset=utf-8",
                        headers={"cache-control": "no-cache"})

    async def snapshot(request: Request) -> Response:
        return json_response({**await dash.snapshot(), "history": dash.history.since(None)})

    async def stream(request: Request) -> EventStream:
        async def frames() -> AsyncIterator[bytes]:
            sent: float | None = None  # the time of the last chart point sent
            while True:
                snap = await dash.snapshot()
                points = dash.history.since(sent)
                if points:
                    sent = points[-1]["t"]
                yield frame({**snap, "history": points}, event="snapshot")
                await asyncio.sleep(dash.interval)

        return gw.event_stream(frames())

    return [
        Route("/", page, methods=["GET"]),
        Route("/v1/dashboard", snapshot, methods=["GET"]),
        Route("/v1/dashboard/stream", stream, methods=["GET"]),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
