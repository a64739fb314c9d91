"""A redriver for the redrive crash test (run with `python -m`): moves dead letters back
a few at a time, printing each count, until none are left or it is killed."""

from __future__ import annotations

import asyncio
import sys

import tidings


async def redriver(url: str, limit: int) -> None:
    async with await tidings.connect(url) as hub:
        print("ready", flush=True)
        while True:
            moved = await hub.redrive("billing", limit=limit)
            print(f"moved {moved}", flush=True)
            if not await hub.dead_letters("billing", limit=1):
                break
        print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(redriver(sys.argv[1], int(sys.argv[2])))
