"""A writer for the outbox relay crash test (run with `python -m`): appends events through
a database + NATS broker hub from many tasks until it is killed."""

from __future__ import annotations

import asyncio
import sys

import tidings


class RelayTicked(tidings.Event):
    n: int


async def writer(url: str, tasks: int, tag: str) -> None:
    async with await tidings.connect(url) as hub:
        print("ready", flush=True)

        async def task(t: int) -> None:
            n = 0
            while True:
                await hub.events.append(f"{tag}-{t}", [RelayTicked(n=n)])
                n += 1
                print("ok", flush=True)

        await asyncio.gather(*(task(t) for t in range(tasks)))


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "writer":
        asyncio.run(writer(args[0], int(args[1]), args[2]))


if __name__ == "__main__":
    main()
