"""The live dashboard: a static page, and the snapshot it receives every second over SSE.

The page (gateway/static/) has no build step; it opens
`/v1/dashboard/stream` and redraws from each JSON snapshot: topics with counts
and rates, subscriptions with lag and in-flight counts, dead letters, saga
instances and recent requests, plus a form that posts a command.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..redrive import marker_topic
from .commands import TERMINAL, listing, lookup, outcome
from .http import json_response
from .sse import EventStream, frame

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["Dashboard", "routes"]

STATIC = Path(__file__).resolve().parent / "static"
#: Snapshots younger than this are shared by every open dashboard.
FRESH = 0.5
#: The dashboard reads at most this many saga instances per snapshot, and shows the newest
#: of them (`list()` yields oldest first, so past this many the newest are not seen).
SAGAS_SCANNED = 200
SAGAS_SHOWN = 20


class Dashboard:
    """Builds snapshots, sharing one per interval among all viewers."""

    def __init__(self, gw: Gateway, interval: float = 1.0) -> None:
        self.gw = gw
        self.interval = interval
        self._lock = asyncio.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._previous: tuple[float, dict[str, int]] | None = None

    async def snapshot(self) -> dict[str, Any]:
        async with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < FRESH:
                return self._cached[1]
            snap = await self._build(now)
            self._cached = (now, snap)
            return snap

    async def _build(self, now: float) -> dict[str, Any]:
        gw = self.gw
        hub = gw.hub
        topics = await hub.topics()
        subs = await hub.engine.subscriptions()
        counts = {t["topic"]: t["messages"] for t in topics}
        rates: dict[str, float] = {}
        if self._previous is not None:
            then, before = self._previous
            elapsed = max(now - then, 1e-6)
            for topic, n in counts.items():
                rates[topic] = max(0, n - before.get(topic, 0)) / elapsed
        self._previous = (now, counts)
        shown = [{"topic": t["topic"], "messages": t["messages"], "bytes": t["bytes"],
                  "last_position": t["last_position"], "rate": round(rates.get(t["topic"], 0.0), 1)}
                 for t in topics if not t["topic"].startswith("$")]
        # per group: its dead letters less those redriven (one marker each, see redrive.py)
        dead = [{"topic": t["topic"], "group": t["topic"][len("$dlq."):],
                 "messages": max(0, t["messages"] - counts.get(
                     marker_topic(t["topic"][len("$dlq."):]), 0))}
                for t in topics if t["topic"].startswith("$dlq.")]
        return {
            "time": time.time(),
            "topics": shown,
            "subscriptions": [{"group": s.group, "pattern": s.pattern, "lag": s.lag,
                               "pending": s.pending, "in_flight": s.in_flight} for s in subs],
            "dead_letters": dead,
            "dead_letter_total": sum(d["messages"] for d in dead),
            "commands": sorted(gw.commands),
            "sagas": await self._sagas(),
            "requests": await self._requests(),
        }

    async def _sagas(self) -> dict[str, Any] | None:
        """Saga instances, when a command target can list them (None: nothing to show)."""
        instances: list[dict[str, Any]] = []
        listed = False
        for name, t in self.gw.commands.items():
            got = await listing(t, None, SAGAS_SCANNED)
            if got is None:
                continue
            listed = True
            instances.extend({**s, "saga": name} for s in got)
        if not listed:
            return None
        by_status: dict[str, int] = {}
        for s in instances:
            st = str(s.get("status", "?"))
            by_status[st] = by_status.get(st, 0) + 1
        return {"by_status": by_status, "instances": instances[-SAGAS_SHOWN:][::-1]}

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
        return json_response(await dash.snapshot())

    async def stream(request: Request) -> EventStream:
        async def frames() -> AsyncIterator[bytes]:
            while True:
                yield frame(await dash.snapshot(), event="snapshot")
                await asyncio.sleep(dash.interval)

        return gw.event_stream(frames())

    return [
        Route("/", page, methods=["GET"]),
        Route("/v1/dashboard", snapshot, methods=["GET"]),
        Route("/v1/dashboard/stream", stream, methods=["GET"]),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
