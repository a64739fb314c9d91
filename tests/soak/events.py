"""Event appends SIGKILLed mid-flight: two processes of three tasks each save to the same few
streams (optimistic-concurrency conflicts; a snapshot every 4 versions). Every acknowledged
save is stored once at the versions it was acknowledged with, versions have no gap, no save
is torn, and an aggregate loaded from its snapshot equals a full replay. Each of the `kills`
rounds SIGKILLs both processes (so the table shows twice as many kills)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import defaultdict
from pathlib import Path

from tests.integration._matrix_child import SoakCounter, SoakTicked, fold

import tidings

from .matrix import RowResult, Target, kill_after, spawn

STREAMS = 3
TASKS = 3

#: An acknowledged save: (stream, first version, last version, writer, seq).
Save = tuple[str, int, int, str, int]


def run(kills: int, rng: random.Random, workdir: Path, target: Target) -> RowResult:
    res = RowResult("events")
    url = target.url(workdir, "events")
    lines: list[str] = []
    for r in range(kills):
        procs = [spawn("_matrix_child", "appender", url, f"r{r}{p}", str(TASKS), str(STREAMS))
                 for p in "ab"]
        for proc in procs:  # the second dies a moment after the first
            lines += kill_after(proc, rng.randint(3, 150), res)
    acked = [parse(line) for line in lines if line.startswith("ok ")]
    res.notes.append(f"conflicts={sum(1 for line in lines if line == 'conflict')}")
    asyncio.run(_check(url, acked, rng, res))
    return res


def parse(line: str) -> Save:
    _, sid, first, last, writer, seq = line.split()
    return sid, int(first), int(last), writer, int(seq)


async def _check(url: str, acked: list[Save], rng: random.Random, res: RowResult) -> None:
    async with await tidings.connect(url) as hub:
        await check_streams(hub, [f"soak-{i}" for i in range(STREAMS)], acked, rng, res)


async def check_streams(hub: tidings.Hub, streams: list[str], acked: list[Save],
                        rng: random.Random, res: RowResult) -> None:
    """The invariants of `SoakCounter` streams written by `_matrix_child appender`."""
    saves: dict[tuple[str, int], list[tuple[str, int, SoakTicked]]] = defaultdict(list)
    repo = hub.repository(SoakCounter)
    for sid in streams:
        events: list[SoakTicked] = []
        positions: list[int] = []
        async for rec in hub.events.read(sid):
            res.expect(rec.version == len(events) + 1,
                       f"{sid}: version {rec.version} follows {len(events)}")
            ev = rec.event
            assert isinstance(ev, SoakTicked)
            if hashlib.sha256(ev.body.encode()).hexdigest() != ev.digest:
                res.corrupted(f"{sid} version {rec.version}: checksum")
            events.append(ev)
            positions.append(rec.position)
            saves[(ev.writer, ev.seq)].append((sid, rec.version, ev))
        res.expect(positions == sorted(positions), f"{sid}: global positions out of order")
        if not events:
            continue
        # loaded from the newest snapshot plus the events after it == a full replay
        chains = [fold("", events[0].digest)]
        for ev in events[1:]:
            chains.append(fold(chains[-1], ev.digest))
        agg = await repo.get(sid)
        if (agg.count, agg.chain) != (len(events), chains[-1]):
            res.corrupted(f"{sid}: loaded state {agg.count} events != replay {len(events)}")
        v = rng.randint(1, len(events))
        old = await repo.get(sid, version=v)
        if (old.count, old.chain) != (v, chains[v - 1]):
            res.corrupted(f"{sid}: state at version {v} != replay")
    for (writer, seq), parts in saves.items():
        first = parts[0][2]
        whole = (len(parts) == first.parts
                 and [e.part for _, _, e in parts] == list(range(first.parts))
                 and len({s for s, _, _ in parts}) == 1
                 and [v for _, v, _ in parts] == list(range(parts[0][1],
                                                            parts[0][1] + len(parts))))
        if len(parts) > first.parts and len(parts) % first.parts == 0:
            res.duplicate(f"save {writer}/{seq} stored {len(parts) // first.parts} times")
        elif not whole:
            res.violate(f"save {writer}/{seq} is torn: {[(s, v) for s, v, _ in parts]}")
    for sid, first_v, last_v, writer, seq in acked:
        stored = saves.get((writer, seq))
        if not stored:
            res.lose(f"acknowledged save {writer}/{seq} ({sid} v{first_v}-{last_v})")
        else:
            where = (stored[0][0], stored[0][1], stored[-1][1])
            res.expect(where == (sid, first_v, last_v),
                       f"save {writer}/{seq} acknowledged as {sid} v{first_v}-{last_v}, "
                       f"stored as {where}")
    res.acked += len(acked)
    res.checked += ["acked saves stored once at their versions", "versions contiguous",
                    "no torn save", "event checksums", "snapshot+tail == replay"]

