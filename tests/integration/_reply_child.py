"""A coordinator that takes a saga's reply and is SIGKILLed before it stores what the
reply did (tests/integration/test_reply_crash.py): `python -m
tests.integration._reply_child URL`. Prints 'taken' once the reply is stored (on the
coordinator's own reply topic, which it reads as the log grows) and has had time to be
taken."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from tests.integration.test_reply_crash import DEFN
from tests.saga.test_coordinator import ledger_service, seed

import tidings
from tidings.saga.run import SagaRun


async def _never(*args: Any, **kwargs: Any) -> bool:
    await asyncio.Event().wait()  # the moment between taking a reply and storing it
    return False


async def main(url: str) -> None:
    SagaRun._apply = _never  # type: ignore[method-assign]
    async with await tidings.connect(url) as hub:
        await seed(hub, "credit", 10)
        ledger_service(hub, "credit", "credit")
        served = asyncio.create_task(hub.run())
        await hub.sagas(DEFN).start({"amount": 3}, id="o-1")
        while True:  # until the reply is stored and taken by this coordinator
            if [m async for m in hub.read("saga.r.replies.>")]:
                await asyncio.sleep(0.3)  # (time for the coordinator to read it)
                print("taken", flush=True)
                break
            await asyncio.sleep(0.02)
        await served  # SIGKILLed here


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
