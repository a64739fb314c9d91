"""The create-order saga: create order → reserve credit → reserve stock → approve."""

from __future__ import annotations

import tidings

create_order = tidings.Saga("create-order", steps=[
    tidings.Step("create_order", command="order.create", compensation="order.reject",
                 timeout=10.0, retries=3),
    tidings.Step("reserve_credit", command="customer.reserve_credit",
                 compensation="customer.release_credit", timeout=10.0, retries=3),
    tidings.Step("reserve_stock", command="inventory.reserve",
                 compensation="inventory.release", timeout=10.0, retries=3),
    # the pivot: once stock and credit are held, the order is approved, never undone
    tidings.Step("approve", command="order.approve", timeout=10.0, retriable=True),
])
