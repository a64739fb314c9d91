"""Shop processes for the crash test: `services` (all three) or `coordinator`."""

from __future__ import annotations

import asyncio
import sys

from examples.shop import create_order, register_services, seed
from examples.shop.demo import make_orders

import tidings


async def services(url: str, only: str) -> None:
    async with await tidings.connect(url) as hub:
        register_services(hub)
        if only != "all":  # keep only the handlers of one service (e.g. inventory)
            hub._command_handlers = [h for h in hub._command_handlers
                                     if h.command.startswith(only)]
        else:
            hub._command_handlers = [h for h in hub._command_handlers
                                     if not h.command.startswith("inventory")]
        print("ready", flush=True)
        await hub.run()


async def coordinator(url: str, n: int) -> None:
    async with await tidings.connect(url) as hub:
        await seed(hub)  # idempotent: creates customers/products once, loads prices
        sagas = hub.sagas(create_order)
        print("ready", flush=True)
        ids = []
        for i, data in enumerate(make_orders(n, 11)):
            ids.append(await sagas.start(data, id=f"o-{i}"))  # same id again: a no-op
            print(f"started o-{i}", flush=True)
        for sid in ids:
            state = await sagas.wait(sid, timeout=300)
            print(f"done {sid} {state['status']}", flush=True)
        print("all done", flush=True)


if __name__ == "__main__":
    role, url, arg = sys.argv[1:]
    if role == "services":
        asyncio.run(services(url, arg))
    else:
        asyncio.run(coordinator(url, int(arg)))
