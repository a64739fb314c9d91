"""Completed create-order sagas per second: the shop's three services and the coordinator in
one process, on SQLite (durability full) and on memory://; then the latency (median, p99)
when orders arrive at half that rate."""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import tidings

from . import paced, percentile, progress, row, scratch_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.shop.domain import Customer, Product  # noqa: E402
from examples.shop.saga import create_order  # noqa: E402
from examples.shop.services import PRICES, register_services  # noqa: E402

TARGETS = {"sqlite": 500.0, "memory": 2000.0}


async def seed_shop(hub: tidings.Hub) -> None:
    """20 customers and 20 products with ample credit and stock: every saga runs all four
    steps."""
    for i in range(1, 21):
        c = Customer(f"c-{i}")
        c.register(10**9)
        await hub.repository(Customer).save(c)
        p = Product(f"p-{i}")
        p.add(10**9, 10)
        await hub.repository(Product).save(p)
        PRICES[p.id] = 10


async def setup_shop(hub: tidings.Hub, inline: bool) -> Any:
    """The shop on `hub`, seeded (`seed_shop`); returns the create-order saga runner."""
    register_services(hub, inline=inline)
    await seed_shop(hub)
    return hub.sagas(create_order)


def order(i: int) -> dict[str, Any]:
    return {"customer_id": f"c-{i % 20 + 1}", "product_id": f"p-{i % 20 + 1}", "quantity": 1}


async def _throughput(url: str, n: int, in_flight: int, inline: bool = False,
                      **options: Any) -> float:
    async with await tidings.connect(url, **options) as hub:
        sagas = await setup_shop(hub, inline)
        runner = asyncio.create_task(hub.run())
        todo = iter(range(n))

        async def client() -> None:  # one of `in_flight` clients, each a saga at a time
            for i in todo:
                sid = await sagas.start(order(i))
                st = await sagas.wait(sid, timeout=300)
                assert st["status"] == "completed", st

        gc.collect()  # start from a settled heap: the setup's objects are not young garbage
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(in_flight)))
        rate = n / (time.perf_counter() - t0)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return rate


async def _latency(url: str, rate: float, seconds: float, inline: bool = False
                   ) -> tuple[float, float]:
    async with await tidings.connect(url) as hub:
        sagas = await setup_shop(hub, inline)
        runner = asyncio.create_task(hub.run())
        async def one(i: int) -> float:
            t0 = time.perf_counter()
            await sagas.wait(await sagas.start(order(i)), timeout=300)
            return time.perf_counter() - t0

        try:
            ms = await paced(rate, seconds, one)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        return statistics.median(ms), percentile(ms, 0.99)


MODES = {"inline": True, "messages": False}


async def run(quick: bool) -> list[dict[str, Any]]:
    """Both ways of running the services: `inline` (handlers run by the coordinator in
    its own transactions) and `messages` (each step a command and a reply through
    durable subscriptions, as when the services run in other processes)."""
    rows = []
    n = 100 if quick else 1500
    for engine in ("sqlite", "memory"):
        for mode, inline in MODES.items():
            label = f"{engine}, {mode}"
            with scratch_dir(f"saga-{engine}") as d:
                url = f"sqlite:///{d}/saga.db" if engine == "sqlite" else "memory://"
                rate = await _throughput(url, n, 200, inline)
                progress(f"saga {label}: {rate:,.0f} completed sagas/s")
            with scratch_dir(f"saga-lat-{engine}") as d:
                url = f"sqlite:///{d}/lat.db" if engine == "sqlite" else "memory://"
                p50, p99 = await _latency(url, rate / 2, 1.0 if quick else 4.0, inline)
                progress(f"saga {label} at {rate / 2:,.0f}/s: median {p50:.1f} ms, "
                         f"p99 {p99:.1f} ms")
            target = TARGETS[engine]
            rows.append(row(f"create-order sagas ({label})", rate, "none", None, "sagas/s",
                            1.0, ratio=rate / target, target_label=f"≥ {target:,.0f}/s"))
            rows.append({"name": f"median saga latency at {rate / 2:,.0f}/s ({label})",
                         "tidings": p50, "peer_name": "p99", "peer": p99, "unit": "ms",
                         "ratio": None, "target": None, "target_label": "report"})
    return rows
