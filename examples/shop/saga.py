"""The create-order saga: create order → reserve credit → reserve stock → approve."""

from __future__ import annotations

from typing import Annotated

import msgspec

import tidings

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


class CreateOrder(msgspec.Struct):
    """An order to place: the create-order saga's input (`POST /v1/commands/create-order`)."""

    customer_id: Id
    product_id: Id
    quantity: Annotated[int, msgspec.Meta(gt=0)]


create_order = tidings.Saga("create-order", input=CreateOrder, steps=[
    tidings.Step("create_order", command="order.create", compensation="order.reject",
                 timeout=10.0, retries=3),
    tidings.Step("reserve_credit", command="customer.reserve_credit",
                 compensation="customer.release_credit", timeout=10.0, retries=3),
    tidings.Step("reserve_stock", command="inventory.reserve",
                 compensation="inventory.release", timeout=10.0, retries=3),
    # the pivot: once stock and credit are held, the order is approved, never undone
    tidings.Step("approve", command="order.approve", timeout=10.0, retriable=True),
])
