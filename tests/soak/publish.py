"""Publishers SIGKILLed mid-burst: every acknowledged message is stored once, intact, at the
position it was acknowledged with, and a batch is stored whole or not at all."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from pathlib import Path

from tests.integration._child import payload
from tests.integration._matrix_child import BATCH, intact

import tidings

from .matrix import RowResult, Target, kill_after, spawn

SINGLES = "soak.single"
BATCHES = "soak.batch"


def single(kills: int, rng: random.Random, workdir: Path, target: Target) -> RowResult:
    return _run("single", kills, rng, workdir, target)


def batch(kills: int, rng: random.Random, workdir: Path, target: Target) -> RowResult:
    return _run("batch", kills, rng, workdir, target)


def tasks(kills: int, rng: random.Random, workdir: Path, target: Target) -> RowResult:
    return _run("tasks", kills, rng, workdir, target)


def _run(mode: str, kills: int, rng: random.Random, workdir: Path, target: Target
         ) -> RowResult:
    res = RowResult(f"publish/{mode}")
    base = target.url(workdir, f"publish-{mode}")
    acked: list[str] = []
    for r in range(kills):
        url = base
        if target.engine == "sqlite":  # `normal` skips the fsync: a process crash loses nothing
            url = f"{base}?durability={rng.choice(['full', 'normal'])}"
        proc = spawn("_matrix_child", "publisher", url, mode, f"r{r}")
        acked += kill_after(proc, rng.randint(5, 400 if mode != "batch" else 60), res)
    asyncio.run(_check(base, mode, acked, res))
    return res


async def _check(url: str, mode: str, acked: list[str], res: RowResult) -> None:
    async with await tidings.connect(url) as hub:
        if mode == "batch":
            await check_batches(hub, acked, res)
        else:
            await check_singles(hub, [tuple(line.split()) for line in acked], res)
        # still writable and in order after the crashes
        last = await hub.publish("soak.after", b"after")
        stored = [m.position async for m in hub.read(">")]
        res.expect(last.position == max(stored), "a publish after the crashes is not last")
    res.checked.append("writable after the crashes")


async def check_singles(hub: tidings.Hub, acked: list[tuple[str, ...]], res: RowResult,
                        topic: str = SINGLES) -> None:
    """`acked`: (id, position) per acknowledged publish of `payload(i)` with id '...-i'."""
    stored = [m async for m in hub.read(topic)]
    by_id = {m.id: m for m in stored}
    for mid, n in Counter(m.id for m in stored).items():
        if n > 1:
            res.duplicate(f"{mid} stored {n} times")
    for m in stored:
        if m.data != payload(int(m.id.rsplit("-", 1)[1])) or not intact(m.data):
            res.corrupted(f"{m.id} at {m.position}")
    for line in acked:
        found = by_id.get(line[0])
        if found is None:
            res.lose(f"acknowledged {line[0]} is not stored")
        else:
            res.expect(found.position == int(line[1]),
                       f"{line[0]} acknowledged at {line[1]}, stored at {found.position}")
    res.acked += len(acked)
    res.checked += ["acked stored", "exactly once", "at its acked position",
                    "payload checksums"]


async def check_batches(hub: tidings.Hub, acked: list[str], res: RowResult,
                        topic: str = BATCHES, size: int = BATCH) -> None:
    """`acked`: the key of each acknowledged batch of `size` messages, ids 'KEY-j'."""
    stored = [m async for m in hub.read(topic)]
    by_key: dict[str, list[tidings.Message]] = defaultdict(list)
    for m in stored:
        by_key[str(m.key)].append(m)
    for key, msgs in by_key.items():
        ids = Counter(m.id for m in msgs)
        if any(n > 1 for n in ids.values()):
            res.duplicate(f"batch {key} stored more than once")
        if set(ids) != {f"{key}-{j}" for j in range(size)}:
            res.violate(f"batch {key} is torn: {len(ids)} of {size} messages stored")
        for m in msgs:
            if m.data != payload(int(m.id.rsplit("-", 1)[1])) or not intact(m.data):
                res.corrupted(f"{m.id} at {m.position}")
    for key in acked:
        if key not in by_key:
            res.lose(f"acknowledged batch {key} is not stored")
    res.acked += len(acked)
    res.checked += ["acked batches stored", "whole (all-or-nothing)", "once",
                    "payload checksums"]
