"""Child processes for the event-store multi-process tests (run with `python -m`)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import tidings


class MpTicked(tidings.Event):
    writer: str
    n: int


async def appender(url: str, stream_id: str, tasks: int, wins_each: int, tag: str) -> None:
    """`tasks` tasks each win `wins_each` appends with expected versions; print 'win VERSION'."""
    async with await tidings.connect(url) as hub:
        print("ready", flush=True)
        sys.stdin.readline()  # start together

        async def task(t: int) -> None:
            won = 0
            while won < wins_each:
                v = await hub.events.stream_version(stream_id)
                try:
                    out = await hub.events.append(
                        stream_id, [MpTicked(writer=f"{tag}{t}", n=won)], expected_version=v)
                except tidings.ConcurrencyError:
                    print("conflict", flush=True)
                    continue
                print(f"win {out.version}", flush=True)
                won += 1

        await asyncio.gather(*(task(t) for t in range(tasks)))


async def projector(url: str, until: int) -> None:
    """Run the 'mp-count' projection until it has reached position `until`; print positions."""
    async with await tidings.connect(url) as hub:
        @hub.projection("mp-count", batch=7)
        async def count(rec: tidings.RecordedEvent, tx: Any) -> None:
            print(f"saw {rec.position}", flush=True)

        print("ready", flush=True)
        while True:
            (st,) = await hub.projections.catch_up()
            if st.position >= until:
                return
            await asyncio.sleep(0.01)


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "appender":
        asyncio.run(appender(args[0], args[1], int(args[2]), int(args[3]), args[4]))
    elif cmd == "projector":
        asyncio.run(projector(args[0], int(args[1])))
    print("done", flush=True)


if __name__ == "__main__":
    main()
