"""Consumers SIGKILLed mid-stream, settling with `wait=True` (ack, nack, term): at least
once (every message is delivered before a kill or after it, a stored nack brings it back),
and never again once an `ack(wait=True)` or `term(wait=True)` returned."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from pathlib import Path

from tests.integration._child import payload
from tests.integration._matrix_child import CONSUMED, intact, settle_by

import tidings

from .matrix import RowResult, Target, kill_after, spawn

#: Idle fetches in a row that end the drain (each waits a second: longer than the leases).
IDLE = 3
DRAIN_GUARD = 60.0


def run(kills: int, rng: random.Random, workdir: Path, target: Target) -> RowResult:
    res = RowResult("consumers")
    url = target.url(workdir, "consumers")
    # position -> what happened to it, in order: ('got', good) / ('acked'|'termed'|'nacked',)
    log: dict[int, list[tuple[str, ...]]] = defaultdict(list)
    published: list[int] = []
    for _ in range(kills):
        count = rng.randint(100, 400)
        published += asyncio.run(_publish(url, len(published), count))
        # each new message prints at least two lines: the kill lands before they run out
        for line in kill_after(spawn("_matrix_child", "consumer", url),
                               rng.randint(1, 2 * count), res):
            kind, position, *rest = line.split()
            log[int(position)].append((kind, *rest))
    res.acked = sum(1 for events in log.values() for e in events if e[0] != "got")
    asyncio.run(_drain(url, log, res))
    _check(published, log, res)
    return res


async def _publish(url: str, start: int, count: int) -> list[int]:
    async with await tidings.connect(url) as hub:
        out = await hub.publish_many(CONSUMED, [payload(start + i) for i in range(count)])
        return [p.position for p in out]


async def _drain(url: str, log: dict[int, list[tuple[str, ...]]], res: RowResult) -> None:
    """Consume what the killed consumers left, settling as they would."""
    async with await tidings.connect(url) as hub:
        sub = await hub.subscribe(CONSUMED, group="g", ack_wait=1.0, max_in_flight=100,
                                  max_deliver=1000)
        idle = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_GUARD
        # until quiet, and every stored nack has come back (or the guard is reached)
        while (idle < IDLE or _owed(log)) and loop.time() < deadline:
            batch = await sub.fetch(100, wait=1.0)
            idle = 0 if batch else idle + 1
            for m in batch:
                log[m.position].append(("got", str(int(intact(m.data)))))
                how = settle_by(m.position, m.attempt)
                if how == "nacked":
                    await m.nack(0.1, wait=True)
                elif how == "termed":
                    await m.term(wait=True)
                else:
                    await m.ack(wait=True)
                log[m.position].append((how,))
        await sub.close()
        res.notes.append(f"dead-lettered={len([m async for m in hub.read('$dlq.g')])}")


def _owed(log: dict[int, list[tuple[str, ...]]]) -> bool:
    return any(events[-1][0] == "nacked" for events in log.values())


def _check(published: list[int], log: dict[int, list[tuple[str, ...]]],
           res: RowResult) -> None:
    for p in published:
        events = log.get(p, [])
        if not any(e[0] == "got" for e in events):
            res.lose(f"message {p} was never delivered")
            continue
        if events[-1][0] == "nacked":
            res.lose(f"message {p} was nacked (stored) and never came back")
        settled = False
        for e in events:
            if e[0] == "got" and settled:
                res.duplicate(f"message {p} came back after its ack/term(wait=True) returned: "
                              f"{[x[0] for x in events]}")
                break
            if e[0] == "got" and e[1] != "1":
                res.corrupted(f"message {p} delivered with a bad checksum")
            settled = settled or e[0] in ("acked", "termed")
    res.checked += ["every message delivered (at least once)", "a stored nack comes back",
                    "never again after ack/term(wait=True)", "payload checksums"]
