"""Commit-ordered, gap-free positions under many concurrent writers and readers.

Writers on their own connections publish single messages, atomic batches and event
appends (some of them failing a version check, so their transactions roll back) while
readers on other connections page through the log as fast as they can. What a reader
saw must never be contradicted later:

- each reader sees positions strictly increasing, and never a message appear below
  the highest position it had already read (a late commit filled in below it);
- at the end, the log holds positions 1..N with no gap (a rolled-back write takes no
  position), and every message a reader saw is there, at the position it saw it at.

The random mix of operations and their timing comes from a seed (three seeds run).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

import tidings

pytestmark = [pytest.mark.service, pytest.mark.slow]

WRITERS = 6
READERS = 4
OPS = 60  # per writer


class PosNoted(tidings.Event):
    n: int


async def _writer(url: str, w: int, rng: random.Random, acked: dict[str, int]) -> None:
    async with await tidings.connect(url) as hub:
        for i in range(OPS):
            roll = rng.random()
            if roll < 0.4:
                p = await hub.publish(f"pos.w{w}", b"x", id=f"w{w}-{i}")
                acked[p.id] = p.position
            elif roll < 0.7:
                ps = await hub.publish_many(f"pos.b{w}", [
                    tidings.envelope(b"y", id=f"w{w}-{i}-{j}") for j in range(rng.randint(2, 9))])
                acked.update((p.id, p.position) for p in ps)
            else:
                stream = f"s{rng.randrange(4)}"
                version = await hub.events.stream_version(stream)
                if rng.random() < 0.3:
                    version += 1  # stale on purpose: the append fails and rolls back
                try:
                    await hub.events.append(stream, [PosNoted(n=i)], expected_version=version)
                except tidings.ConcurrencyError:
                    pass
            if rng.random() < 0.3:
                await asyncio.sleep(rng.random() / 200)


async def _reader(url: str, done: asyncio.Event, rng: random.Random,
                  problems: list[str]) -> dict[int, str]:
    seen: dict[int, str] = {}
    high = 0
    async with await tidings.connect(url) as hub:
        engine: Any = hub.engine
        while True:
            finished = done.is_set()
            # a full re-read below what was seen, now and then: nothing new may appear
            if seen and rng.random() < 0.2:
                below = await engine.read(">", 0, high, 100_000)
                extra = [m.position for m in below if m.position not in seen]
                if extra:
                    problems.append(f"positions {extra[:5]} appeared below {high} after "
                                    "the reader had passed them")
            batch = await engine.read(">", high, None, rng.randint(1, 50))
            for m in batch:
                if m.position <= high:
                    problems.append(f"position {m.position} after {high}")
                high = m.position
                seen[m.position] = m.id
            if finished and not batch:
                return seen
            if not batch:
                await asyncio.sleep(0.001)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_readers_are_never_contradicted(postgres_url: str, seed: int) -> None:
    rng = random.Random(seed)
    acked: dict[str, int] = {}
    problems: list[str] = []
    done = asyncio.Event()
    readers = [asyncio.create_task(_reader(postgres_url, done, random.Random(seed * 10 + r),
                                           problems)) for r in range(READERS)]
    await asyncio.gather(*(_writer(postgres_url, w, random.Random(rng.random()), acked)
                           for w in range(WRITERS)))
    done.set()
    views = await asyncio.wait_for(asyncio.gather(*readers), 60)
    assert problems == []
    async with await tidings.connect(postgres_url) as hub:
        final = {m.position: m.id async for m in hub.read(">")}
    assert sorted(final) == list(range(1, len(final) + 1)), "a gap in the positions"
    for view in views:
        assert view == final, "a reader saw the log differently from what it holds"
    for mid, position in acked.items():
        assert final.get(position) == mid, f"{mid} acknowledged at {position}"
