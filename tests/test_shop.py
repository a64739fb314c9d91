"""The shop's own tests, written the way docs/testing.md tells a tidings user to: on a
`TestHub`, where timeouts, retries and backoff happen on a clock the test moves.

A credit-limit rejection, a race for the last item in stock, a step timeout and its
retry, and a compensation that fails until the saga is stuck and then completes on a
manual retry. None waits on the wall clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from examples.shop import app, create_order
from examples.shop.domain import Customer, Product

import tidings
from tidings.testing import TestHub


@pytest.fixture
async def shop() -> AsyncIterator[TestHub]:
    """A TestHub with the shop on it: customers c-rich (credit 10,000) and c-poor (100),
    product p-1 (price 50, one in stock) and p-many (price 10, 100 in stock)."""
    async with TestHub() as t:
        app(t.hub, seed_data=False)
        customers, products = t.hub.repository(Customer), t.hub.repository(Product)
        for cid, limit in (("c-rich", 10_000), ("c-rich-2", 10_000), ("c-poor", 100)):
            c = Customer(cid)
            c.register(limit)
            await customers.save(c)
        for pid, stock, price in (("p-1", 1, 50), ("p-many", 100, 10)):
            p = Product(pid)
            p.add(stock, price)
            await products.save(p)
        yield t


def order(customer: str, product: str, quantity: int) -> dict[str, Any]:
    return {"customer_id": customer, "product_id": product, "quantity": quantity}


async def credit_used(t: TestHub, customer: str) -> int:
    return (await t.hub.repository(Customer).get(customer)).credit_used


async def stock(t: TestHub, product: str) -> int:
    return (await t.hub.repository(Product).get(product)).stock


async def test_an_order_over_the_credit_limit_is_compensated(shop: TestHub) -> None:
    sid = await shop.hub.sagas(create_order).start(order("c-poor", "p-many", 3))  # 30 <= 100
    big = await shop.hub.sagas(create_order).start(order("c-poor", "p-many", 20))  # 200 > 100
    await shop.settle()
    assert (await shop.saga(sid))["status"] == "completed"
    refused = await shop.saga(big)
    assert refused["status"] == "compensated"
    assert "credit limit exceeded" in refused["reason"]
    assert await credit_used(shop, "c-poor") == 30  # the refused order holds nothing
    assert await stock(shop, "p-many") == 97
    events = [s["event"] for s in refused["steps"]]
    assert "StepCompensated" in events or "compensated" in str(refused["steps"]).lower()


async def test_two_orders_race_for_the_last_item(shop: TestHub) -> None:
    sagas = shop.hub.sagas(create_order)
    a, b = await asyncio.gather(sagas.start(order("c-rich", "p-1", 1)),
                                sagas.start(order("c-rich-2", "p-1", 1)))
    await shop.settle()
    outcomes = sorted([(await shop.saga(a))["status"], (await shop.saga(b))["status"]])
    assert outcomes == ["compensated", "completed"]
    assert await stock(shop, "p-1") == 0
    # the loser's credit is released: exactly one customer pays for the one item
    assert sorted([await credit_used(shop, "c-rich"), await credit_used(shop, "c-rich-2")]) == [
        0, 50]


async def test_a_step_that_times_out_is_retried(shop: TestHub) -> None:
    real = shop.handler("inventory.reserve")
    calls = 0

    async def slow_once(cmd: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # the inventory service answers after 15 s, past the step's 10 s
            await shop.clock.sleep_until(shop.now + 15)
        return await real(cmd)

    shop.fake("inventory.reserve", slow_once)
    sid = await shop.hub.sagas(create_order).start(order("c-rich", "p-many", 2))
    await shop.settle()
    assert (await shop.saga(sid))["status"] == "running"  # waiting for inventory
    await shop.advance(9.9)
    assert (await shop.saga(sid))["status"] == "running"  # its 10 s timeout is not up
    await shop.advance(60)
    saga = await shop.saga(sid)
    assert saga["status"] == "completed"
    failed = [s for s in saga["steps"] if s["event"] == "StepFailed"]
    assert [(s["name"], s["attempt"], s["error"]) for s in failed] == [
        ("reserve_stock", 1, "no reply within 10.0s")]
    # The retry queued behind the slow command (same key) and was answered from the
    # inventory's inbox: the service ran once, and reserved once.
    assert calls == 1
    assert await stock(shop, "p-many") == 98
    assert await credit_used(shop, "c-rich") == 20


async def test_a_failing_compensation_gets_stuck_then_a_retry_completes_it(
        shop: TestHub) -> None:
    real = shop.handler("customer.release_credit")

    async def down(cmd: Any) -> Any:
        raise RuntimeError("the customer service is down")

    shop.fake("customer.release_credit", down)
    sid = await shop.hub.sagas(create_order).start(order("c-rich", "p-1", 5))  # 1 in stock
    await shop.advance(3600)  # every retry of the compensation fails
    stuck = await shop.saga(sid)
    assert stuck["status"] == "stuck"
    assert "customer service is down" in (stuck["error"] or "")
    assert await credit_used(shop, "c-rich") == 250  # still held: nothing released it
    assert (await shop.hub.metrics()).saga_outcomes[("create-order", "stuck")] == 1

    shop.fake("customer.release_credit", real)  # the service is back
    await shop.hub.sagas(create_order).retry(sid)
    await shop.settle()
    done = await shop.saga(sid)
    assert done["status"] == "compensated"
    outcomes = (await shop.hub.metrics()).saga_outcomes
    assert outcomes[("create-order", "compensated")] == 1  # (and the stuck one stays counted)
    assert await credit_used(shop, "c-rich") == 0
    assert await stock(shop, "p-1") == 1


async def test_a_malformed_order_is_refused_before_anything_starts(shop: TestHub) -> None:
    with pytest.raises(tidings.InvalidArgument, match="product_id"):
        await shop.hub.sagas(create_order).start({"customer_id": "c-1"})
    await shop.settle()
    assert shop.published("saga.>") == []

