"""The e-commerce shop: order, customer and inventory services and the create-order saga.

`app(hub)` wires everything onto a hub and returns the sagas it serves (for
`tidings serve --app examples.shop:app`); `demo.run` is `tidings demo shop`.
"""

from __future__ import annotations

from typing import Any

import tidings

from .saga import create_order
from .services import register_services, seed

__all__ = ["app", "create_order", "register_services", "seed"]


def app(hub: tidings.Hub, *, services: bool = True, coordinator: bool = True) -> dict[str, Any]:
    """Register the shop's services (run by `hub.run()`) and return its sagas by name."""
    if services:
        register_services(hub)
    return {create_order.name: hub.sagas(create_order)} if coordinator else {}
