"""The order, customer and inventory services: command handlers on a hub.

Each handler loads its aggregate, runs the command, and enlists the aggregate
with `cmd.save`: the new events, the inbox record and the reply commit in one
transaction, so a redelivered command changes nothing. Each declares what its
command carries (`tidings.Command[ReserveCredit]`): a command without those
fields is rejected before the handler runs, and the saga compensates.
"""

from __future__ import annotations

from typing import Any

import msgspec

import tidings

from .domain import Customer, Order, Product


# What the commands carry: the saga's data (and its id), of which each service reads its part.
class OrderRef(msgspec.Struct):
    saga_id: str
    reason: str = "rejected"  # why a compensation rejects the order


class PlaceOrder(msgspec.Struct):
    saga_id: str
    customer_id: str
    product_id: str
    quantity: int


class ReserveCredit(msgspec.Struct):
    saga_id: str
    customer_id: str
    total: int


class ReleaseCredit(msgspec.Struct):
    saga_id: str
    customer_id: str


class ReserveStock(msgspec.Struct):
    saga_id: str
    product_id: str
    quantity: int


class ReleaseStock(msgspec.Struct):
    saga_id: str
    product_id: str

# The order service's price list (the catalogue it sells from).
PRICES: dict[str, int] = {}
SNAPSHOT_EVERY = 25


def register_services(hub: tidings.Hub, *, concurrency: int = 8, inline: bool = False) -> None:
    # Customers and products take a reservation per order: snapshots keep their loads short.
    customers = hub.repository(Customer, snapshot_every=SNAPSHOT_EVERY)
    products = hub.repository(Product, snapshot_every=SNAPSHOT_EVERY)
    orders = hub.repository(Order)

    async def order_of(order_id: str) -> Order:
        try:
            return await orders.get(order_id)
        except tidings.NotFound:
            return Order(order_id)

    @hub.handler("order.create", concurrency=concurrency, inline=inline)
    async def create_order(cmd: tidings.Command[PlaceOrder]) -> dict[str, Any]:
        d = cmd.data
        price = PRICES.get(d.product_id)
        if price is None:  # not in this process's price list yet: read the catalogue
            try:
                price = PRICES[d.product_id] = (await products.get(d.product_id)).price
            except tidings.NotFound:
                raise tidings.Rejected(f"unknown product {d.product_id!r}") from None
        order = await order_of(d.saga_id)
        order.create(d.customer_id, d.product_id, d.quantity, d.quantity * price)
        cmd.save(order)
        return {"order_id": order.id, "total": order.total}

    @hub.handler("order.approve", concurrency=concurrency, inline=inline)
    async def approve_order(cmd: tidings.Command[OrderRef]) -> dict[str, Any]:
        order = await order_of(cmd.data.saga_id)
        order.approve()
        cmd.save(order)
        return {"status": order.status}

    @hub.handler("order.reject", concurrency=concurrency, inline=inline)
    async def reject_order(cmd: tidings.Command[OrderRef]) -> dict[str, Any]:
        order = await order_of(cmd.data.saga_id)
        order.reject(cmd.data.reason or "rejected")
        cmd.save(order)
        return {"status": order.status}

    @hub.handler("customer.reserve_credit", concurrency=concurrency, inline=inline)
    async def reserve_credit(cmd: tidings.Command[ReserveCredit]) -> dict[str, Any]:
        d = cmd.data
        try:
            customer = await customers.get(d.customer_id)
        except tidings.NotFound:
            raise tidings.Rejected(f"unknown customer {d.customer_id!r}") from None
        customer.reserve(d.saga_id, d.total)
        cmd.save(customer)
        return {"credit_reserved": d.total}

    @hub.handler("customer.release_credit", concurrency=concurrency, inline=inline)
    async def release_credit(cmd: tidings.Command[ReleaseCredit]) -> dict[str, Any]:
        try:
            customer = await customers.get(cmd.data.customer_id)
        except tidings.NotFound:
            return {}
        customer.release(cmd.data.saga_id)
        cmd.save(customer)
        return {}

    @hub.handler("inventory.reserve", concurrency=concurrency, inline=inline)
    async def reserve_stock(cmd: tidings.Command[ReserveStock]) -> dict[str, Any]:
        d = cmd.data
        try:
            product = await products.get(d.product_id)
        except tidings.NotFound:
            raise tidings.Rejected(f"unknown product {d.product_id!r}") from None
        product.reserve(d.saga_id, d.quantity)
        cmd.save(product)
        return {"stock_reserved": d.quantity}

    @hub.handler("inventory.release", concurrency=concurrency, inline=inline)
    async def release_stock(cmd: tidings.Command[ReleaseStock]) -> dict[str, Any]:
        try:
            product = await products.get(cmd.data.product_id)
        except tidings.NotFound:
            return {}
        product.release(cmd.data.saga_id)
        cmd.save(product)
        return {}


async def seed(hub: tidings.Hub, *, customers: int = 20, products: int = 20,
               seed: int = 0) -> None:
    """Create customers c-1… (credit limits) and products p-1… (stock, price), once."""
    import random

    rng = random.Random(seed)
    crepo = hub.repository(Customer)
    prepo = hub.repository(Product)
    for i in range(1, customers + 1):
        limit = rng.randint(5, 30) * 100
        try:
            await crepo.get(f"c-{i}")
        except tidings.NotFound:
            c = Customer(f"c-{i}")
            c.register(limit)
            await crepo.save(c)
    for i in range(1, products + 1):
        stock, price = rng.randint(5, 30), rng.randint(1, 10) * 10
        try:
            p = await prepo.get(f"p-{i}")
        except tidings.NotFound:
            p = Product(f"p-{i}")
            p.add(stock, price)
            await prepo.save(p)
        PRICES[p.id] = p.price
