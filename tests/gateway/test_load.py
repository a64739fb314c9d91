"""Load on the request-reply path: 50 clients post shop orders as fast as they can for a
bounded time. Every accepted request reaches a terminal status (none lost), and when the
clients outpace the sagas the server answers 429 instead of piling up work.

Set TIDINGS_LOAD_SECONDS to change the 8 s of load (longer runs: `make soak`-style, by hand).
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Callable

import httpx
import pytest

from .conftest import LiveServer
from .test_shop import start_shop

CLIENTS = 50
SIZE = 20  # customers and products
SECONDS = float(os.environ.get("TIDINGS_LOAD_SECONDS", "8"))
MAX_RUNNING = 10  # low, so that 50 eager clients certainly outpace the sagas


@pytest.mark.slow
def test_fifty_clients_under_sustained_load(start_server: Callable[..., LiveServer]) -> None:
    server = start_shop(start_server, size=SIZE, max_running=MAX_RUNNING)
    gw = server.gateway
    accepted: list[str] = []
    refused = 0
    peak_running = 0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB

    async def client(c: httpx.AsyncClient, n: int, stop_at: float) -> None:
        nonlocal refused, peak_running
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            order = {"customer_id": f"c-{(n + i) % SIZE + 1}",
                     "product_id": f"p-{(n * 7 + i) % SIZE + 1}", "quantity": 1}
            r = await c.post("/v1/commands/create-order", json=order)
            peak_running = max(peak_running, len(gw.requests.running))
            if r.status_code == 202:
                accepted.append(r.json()["request_id"])
            else:
                assert r.status_code == 429, r.text
                assert r.headers["retry-after"]
                refused += 1
                await asyncio.sleep(0.05)  # a polite client backs off

    async def load() -> None:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits,
                                     timeout=30) as c:
            stop_at = time.monotonic() + SECONDS
            await asyncio.gather(*(client(c, n, stop_at) for n in range(CLIENTS)))

    asyncio.run(load())
    assert accepted, "no command was accepted"
    assert len(set(accepted)) == len(accepted)
    assert peak_running <= MAX_RUNNING

    # every accepted request is known (none lost) and ends: completed, or compensated when
    # stock and credit run out
    with server.client(timeout=60) as c:
        sagas = {s["id"]: s["status"] for s in c.get("/v1/sagas").json()["sagas"]}
        statuses = {r: sagas.get(r, "unlisted") for r in accepted}
        for request_id, status in statuses.items():
            if status not in ("completed", "compensated"):  # ?wait answers when it ends
                r = c.get(f"/v1/requests/{request_id}", params={"wait": 30})
                assert r.status_code == 200, f"accepted request {request_id} was lost: {r.text}"
                statuses[request_id] = r.json()["status"]
    unfinished = [r for r, st in statuses.items() if st not in ("completed", "compensated")]
    assert not unfinished, f"{len(unfinished)} accepted requests never ended"
    assert "completed" in statuses.values()
    assert refused > 0, "the clients never outpaced the sagas; nothing was refused"
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 300, f"memory grew by {grown_mib:.0f} MiB under load"
