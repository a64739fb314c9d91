"""`tidings demo shop`: N orders through the create-order saga, a summary, and the invariants.

All three services and the coordinator run in this process on the engine of
the URL (default: the embedded SQLite file). The order mix is seeded so that
both failure paths (credit limit, out of stock) happen.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from typing import Any

import tidings

from .domain import Customer, Order, Product
from .saga import create_order
from .services import register_services, seed

CUSTOMERS = 20
PRODUCTS = 20


async def check_invariants(hub: tidings.Hub, order_ids: list[str]) -> list[str]:
    """Every broken invariant, as a sentence (empty: all hold)."""
    problems: list[str] = []
    orders = hub.repository(Order)
    approved_total: dict[str, int] = {}
    approved_qty: dict[str, dict[str, int]] = {}
    for oid in order_ids:
        try:
            o = await orders.get(oid)
        except tidings.NotFound:
            continue  # rejected before the order existed (cannot happen with this saga)
        if o.status == "pending":
            problems.append(f"order {oid} is still pending")
        if o.status == "approved":
            approved_total[o.customer_id] = approved_total.get(o.customer_id, 0) + o.total
            approved_qty.setdefault(o.product_id, {})[oid] = o.quantity
    approved = {oid for qs in approved_qty.values() for oid in qs}
    for i in range(1, CUSTOMERS + 1):
        c = await hub.repository(Customer).get(f"c-{i}")
        mine = {k: v for k, v in c.reservations.items() if k in set(order_ids)}
        if sum(mine.values()) != approved_total.get(c.id, 0):
            problems.append(f"customer {c.id}: credit used {sum(mine.values())} != approved "
                            f"orders {approved_total.get(c.id, 0)}")
        if c.credit_used > c.credit_limit:
            problems.append(f"customer {c.id} is over its credit limit")
        if set(mine) - approved:
            problems.append(f"customer {c.id} holds credit for orders not approved")
    for i in range(1, PRODUCTS + 1):
        p = await hub.repository(Product).get(f"p-{i}")
        sold = sum(p.reservations.values())
        if p.stock < 0:
            problems.append(f"product {p.id} has negative stock {p.stock}")
        if p.stock + sold != p.initial:
            problems.append(f"product {p.id}: stock {p.stock} + sold {sold} != {p.initial}")
        held = {k for k in p.reservations if k in set(order_ids)}
        if held - approved:
            problems.append(f"product {p.id} holds stock for orders not approved")
    return problems


def make_orders(n: int, seed_: int) -> list[dict[str, Any]]:
    rng = random.Random(seed_)
    return [{"customer_id": f"c-{rng.randint(1, CUSTOMERS)}",
             "product_id": f"p-{rng.randint(1, PRODUCTS)}",
             "quantity": rng.randint(1, 6)} for _ in range(n)]


async def run(url: str | None = None, *, orders: int = 200, seed_: int = 7,
              in_flight: int = 50, quiet: bool = False, inline: bool = False) -> int:
    out = print if not quiet else (lambda *a, **k: None)
    async with await tidings.connect(url) as hub:
        register_services(hub, inline=inline)
        await seed(hub, customers=CUSTOMERS, products=PRODUCTS, seed=seed_)
        sagas = hub.sagas(create_order)
        runner = asyncio.create_task(hub.run())
        slots = asyncio.Semaphore(in_flight)
        latencies: list[float] = []
        results: dict[str, dict[str, Any]] = {}
        done = 0
        progress = _Progress(orders, enabled=not quiet and sys.stdout.isatty())

        async def one(data: dict[str, Any]) -> None:
            nonlocal done
            async with slots:
                t0 = time.perf_counter()
                sid = await sagas.start(data)
                results[sid] = await sagas.wait(sid, timeout=120)
                latencies.append(time.perf_counter() - t0)
            done += 1
            progress.update(done)

        t0 = time.perf_counter()
        how = "inline handlers" if inline else "commands and replies as messages"
        out(f"tidings shop demo on {hub.url}: {orders} orders, {in_flight} in flight, {how}")
        await asyncio.gather(*(one(d) for d in make_orders(orders, seed_)))
        elapsed = time.perf_counter() - t0
        progress.close()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        by = {"approved": 0, "credit": 0, "stock": 0, "other": 0}
        for r in results.values():
            if r["status"] == "completed":
                by["approved"] += 1
            elif "credit" in (r["reason"] or ""):
                by["credit"] += 1
            elif "stock" in (r["reason"] or ""):
                by["stock"] += 1
            else:
                by["other"] += 1
        lat = sorted(latencies)
        p50 = statistics.median(lat) * 1000 if lat else 0.0
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else 0.0
        rows = [("approved", by["approved"]), ("rejected: credit limit", by["credit"]),
                ("rejected: out of stock", by["stock"]), ("other outcome", by["other"]),
                ("sagas per second", f"{orders / elapsed:.0f}"),
                ("median saga latency", f"{p50:.1f} ms"), ("p99 saga latency", f"{p99:.1f} ms")]
        _table(rows, out)
        problems = await check_invariants(hub, list(results))
        if problems:
            out("INVARIANTS BROKEN:")
            for p in problems:
                out(f"  - {p}")
            return 1
        out("invariants hold: credit used = approved orders per customer; "
            "stock + sold = initial per product; no order left pending")
        return 0


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self._p: Any = None
        if enabled:
            try:
                from rich.progress import Progress

                self._p = Progress(transient=True)
                self._p.start()
                self._task = self._p.add_task("orders", total=total)
            except ImportError:
                self.enabled = False

    def update(self, n: int) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=n)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


def _table(rows: list[tuple[str, Any]], out: Any) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for k, v in rows:
            out(f"{k:>24}  {v}")
        return
    t = Table(title="create-order sagas")
    t.add_column("outcome")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, str(v))
    Console().print(t)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default=None)
    ap.add_argument("--orders", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--inline", action="store_true")
    a = ap.parse_args()
    sys.exit(asyncio.run(run(a.url, orders=a.orders, seed_=a.seed, inline=a.inline)))
