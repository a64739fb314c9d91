"""The e-commerce shop: order, customer and inventory services and the create-order saga.

`app(hub)` wires everything onto a hub and returns the sagas it serves (for
`tidings serve --app examples.shop:app`); `demo.run` is `tidings demo shop`.
"""

from __future__ import annotations

from typing import Any

import tidings

from .saga import CreateOrder, create_order
from .services import register_services, seed

__all__ = ["CreateOrder", "app", "create_order", "inline_app", "register_services", "seed"]


def app(hub: tidings.Hub, *, services: bool = True, coordinator: bool = True,
        seed_data: bool = True, inline: bool = False) -> Any:
    """Register the shop's services (run by `hub.run()`) and return its sagas by name.

    With `seed_data` (the default, as `tidings serve --app examples.shop:app` calls
    it) this returns an awaitable that first seeds customers c-1… and products p-1…
    (once: seeding again changes nothing); with `seed_data=False`, the mapping itself.
    `inline=True` runs the services' handlers inline in the coordinator's transactions
    (`examples.shop:inline_app` for `tidings serve`).
    """
    if services:
        register_services(hub, inline=inline)
    sagas = {create_order.name: hub.sagas(create_order)} if coordinator else {}
    if not seed_data:
        return sagas

    async def seeded() -> dict[str, Any]:
        await seed(hub)
        return sagas

    return seeded()


def inline_app(hub: tidings.Hub) -> Any:
    """The shop with its handlers inline (`tidings serve --app examples.shop:inline_app`)."""
    return app(hub, inline=True)
