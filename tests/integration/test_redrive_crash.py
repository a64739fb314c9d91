"""Redrive under SIGKILL: processes moving dead letters back, killed at random moments
(two at once at times), never move one twice or lose one.

Each dead letter moves in one atomic append with its marker, so a kill leaves it moved
and marked or neither; a later run skips the marked ones, and two runs racing store one
copy (ids derived from the dead letter's). At the end every dead letter is back on its
topic exactly once.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import tidings

ROOT = Path(__file__).resolve().parents[2]
DEAD = 300
KILLS = 6

pytestmark = pytest.mark.slow


def _spawn(url: str, limit: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration._redrive_child", url, str(limit)],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)


def _kill_after(procs: list[subprocess.Popen[str]], rng: random.Random) -> None:
    """Let the redrivers make a random number of moves, then SIGKILL them all."""
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready", "the redriver did not start"
        first = procs[0]
        assert first.stdout is not None
        for _ in range(rng.randint(0, 6)):
            if not first.stdout.readline().startswith("moved"):
                break
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()


async def _dead_letter_all(url: str) -> list[str]:
    async with await tidings.connect(url) as hub:
        await hub.publish_many("orders.created", [{"n": i} for i in range(DEAD)])
        sub = await hub.subscribe("orders.*", group="billing", max_in_flight=DEAD)
        got: list[tidings.Message] = []
        while len(got) < DEAD:
            got += await sub.fetch(DEAD - len(got), wait=1.0)
        for m in got:
            await m.term()
        await sub.close()  # flushes the terms: their dead letters commit with them
        dls = await hub.dead_letters("billing")
        assert len(dls) == DEAD
        return [d.id for d in dls]


async def test_redrive_killed_midway_moves_each_dead_letter_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'redrive.db'}"
    ids = await _dead_letter_all(url)
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    for k in range(KILLS):
        limit = rng.choice([1, 3, 7])
        procs = [_spawn(url, limit) for _ in range(1 + k % 2)]  # every other round: two
        await asyncio.to_thread(_kill_after, procs, rng)
    async with await tidings.connect(url) as hub:
        left = len(await hub.dead_letters("billing"))
        assert left < DEAD, "the killed redrivers moved some"
        print(f"{DEAD - left} moved by killed redrivers")
        await hub.redrive("billing")  # what is left
        assert await hub.dead_letters("billing") == []
        moved = Counter([m.headers.get("tidings-redriven") async for m in
                         hub.read("orders.created") if "tidings-redriven" in m.headers])
        assert set(moved) == set(ids), "every dead letter is back"
        assert max(moved.values()) == 1, "none twice"
        assert sorted(d.id for d in await hub.dead_letters("billing", redriven=True)) == sorted(ids)
