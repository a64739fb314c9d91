"""Saga processes for the crash matrix (tests/soak): `python -m tests.integration._saga_child
ROLE URL ...`.

- `coordinator URL MODE N`: starts sagas s-0 … s-N-1 (8 at a time; starting one again is a
  no-op, so a restarted coordinator just carries on), printing 'started ID' once a start
  returned and 'ended ID STATUS' once it ended, then 'all done'. With MODE `inline` it runs
  the credit service's handlers itself (inline); stock is always a separate service.
- `participant URL`: the services answering over messages (stock, and credit, which for an
  `inline` coordinator only serves commands that went out as messages).

The services are the saga tests' ledgers (tests/saga/test_coordinator.py); their handlers
are deliberately not idempotent, so a command applied twice shows in the ledger.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from tests.saga.test_coordinator import SgReleased, SgReserved, ledger

import tidings
from tidings import Rejected, Saga, Step

IN_FLIGHT = 8
ACK_WAIT = 2.0  # a killed participant's commands go to its successor after this
#: A step's command timeout: a saga whose reply never comes compensates after this (the
#: default, 30 s, would make every such saga cost half a minute of the run).
TIMEOUT = 5.0


def amount(i: int) -> int:
    return 1 + i % 3


async def _approve(data: dict[str, Any]) -> None:
    return None


def definition() -> Saga:
    return Saga("soak", [
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release",
             timeout=TIMEOUT),
        Step("stock", command="svc.stock.reserve", compensation="svc.stock.release",
             timeout=TIMEOUT),
        Step("approve", action=_approve, retriable=True),
    ])


def serve(hub: tidings.Hub, name: str, *, inline: bool) -> None:
    """`svc.<name>.reserve` / `.release` on the ledger `name`."""

    @hub.handler(f"svc.{name}.reserve", inline=inline, ack_wait=ACK_WAIT)
    async def reserve(cmd: tidings.Command) -> dict[str, Any]:
        led = await ledger(hub, name)
        units = int(cmd.data["amount"])
        if led.available < units:
            raise Rejected(f"only {led.available} {name} left")
        led.record(SgReserved(saga=cmd.data["saga_id"], amount=units))
        cmd.save(led)
        return {}

    @hub.handler(f"svc.{name}.release", inline=inline, ack_wait=ACK_WAIT)
    async def release(cmd: tidings.Command) -> dict[str, Any]:
        led = await ledger(hub, name)
        if cmd.data["saga_id"] in led.held:
            led.record(SgReleased(saga=cmd.data["saga_id"]))
            cmd.save(led)
        return {}


async def coordinator(url: str, mode: str, n: int) -> None:
    async with await tidings.connect(url) as hub:
        if mode == "inline":
            serve(hub, "credit", inline=True)
        runner = hub.sagas(definition())
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one(i: int) -> None:
            async with slots:
                sid = await runner.start({"amount": amount(i)}, id=f"s-{i}")
                print(f"started {sid}", flush=True)
                state = await runner.wait(sid)
                print(f"ended {sid} {state['status']}", flush=True)

        await asyncio.gather(*(one(i) for i in range(n)))
        print("all done", flush=True)


async def participant(url: str) -> None:
    async with await tidings.connect(url) as hub:
        serve(hub, "stock", inline=False)
        serve(hub, "credit", inline=False)
        print("ready", flush=True)
        await hub.run()


if __name__ == "__main__":
    role, url, *rest = sys.argv[1:]
    if role == "coordinator":
        asyncio.run(coordinator(url, rest[0], int(rest[1])))
    else:
        asyncio.run(participant(url))
