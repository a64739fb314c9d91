"""A credit service process for the fencing crash test: `participant URL HOLD ACK_WAIT`.

With HOLD=1 its reserve handler announces the command it got and holds it for
ever (the test SIGKILLs the process there); with HOLD=0 it serves normally.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from tests.saga.test_coordinator import SgReleased, SgReserved, ledger

import tidings


async def participant(url: str, hold: bool, ack_wait: float) -> None:
    async with await tidings.connect(url) as hub:

        @hub.handler("svc.credit.reserve", ack_wait=ack_wait)
        async def reserve(cmd: tidings.Command) -> dict[str, Any]:
            if hold:
                print(f"holding {cmd.data['saga_id']}", flush=True)
                await asyncio.Event().wait()
            led = await ledger(hub, "credit")
            led.record(SgReserved(saga=cmd.data["saga_id"], amount=int(cmd.data["amount"])))
            cmd.save(led)
            print(f"reserved {cmd.data['saga_id']}", flush=True)
            return {}

        @hub.handler("svc.credit.release", ack_wait=ack_wait)
        async def release(cmd: tidings.Command) -> dict[str, Any]:
            led = await ledger(hub, "credit")
            if cmd.data["saga_id"] in led.held:
                led.record(SgReleased(saga=cmd.data["saga_id"]))
                cmd.save(led)
            return {}

        print("ready", flush=True)
        await hub.run()


if __name__ == "__main__":
    url, hold, ack_wait = sys.argv[1:]
    asyncio.run(participant(url, hold == "1", float(ack_wait)))
