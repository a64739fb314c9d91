"""Competing consumers on several connections and processes never share a leased message."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import tidings

pytestmark = [pytest.mark.service, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
GUARD = 60.0


def spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.postgres._child", *args], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )


async def test_four_connections_share_without_doubles(postgres_url: str) -> None:
    n = 2000
    async with await tidings.connect(postgres_url) as pub:
        hubs = [await tidings.connect(postgres_url) for _ in range(4)]
        try:
            # ack_wait far beyond the test: any second delivery would be a double claim
            subs = [await h.subscribe("pg.>", group="workers", ack_wait=600, max_in_flight=50,
                                      batch=10) for h in hubs]
            got: list[tuple[int, int]] = []

            async def work(i: int, sub: tidings.Subscription) -> None:
                while len(got) < n:
                    for msg in await sub.fetch(10, wait=0.1):
                        got.append((msg.position, i))
                        await asyncio.sleep(0)  # let the others claim meanwhile
                        await msg.ack()

            async def produce() -> None:
                for start in range(0, n, 100):
                    await pub.publish_many("pg.jobs", [f"job-{j}" for j in range(start,
                                                                                 start + 100)])

            await asyncio.wait_for(
                asyncio.gather(produce(), *(work(i, s) for i, s in enumerate(subs))), GUARD)
        finally:
            for h in hubs:
                await h.close()
    counts = Counter(p for p, _ in got)
    assert [p for p, c in counts.items() if c > 1] == [], "a message was claimed twice"
    assert len(counts) == n
    assert len({i for _, i in got}) == 4, "every connection took part"


def test_two_processes_four_connections_share_without_doubles(postgres_url: str) -> None:
    n = 600
    children = [spawn("consumer", postgres_url, "workers", "2", "600") for _ in range(2)]
    outputs: list[list[str]] = [[], []]
    readers = []
    try:
        for c in children:
            assert c.stdout is not None
            line = c.stdout.readline()
            assert line.strip() == "ready", (line, c.stderr.read() if c.stderr else "")
        for c, out in zip(children, outputs, strict=True):
            t = threading.Thread(target=lambda c=c, out=out: out.extend(c.stdout), daemon=True)
            t.start()
            readers.append(t)
        producers = [spawn("publish", postgres_url, f"pg.p{k}", str(n // 2)) for k in range(2)]
        for p in producers:
            out, err = p.communicate(timeout=GUARD)
            assert p.returncode == 0, err
            assert out.split() == ["done"]
        deadline = time.monotonic() + GUARD
        while len({x.split()[0] for o in outputs for x in list(o)}) < n:
            assert time.monotonic() < deadline, "not every message was delivered"
            time.sleep(0.05)
    finally:
        for c in children:
            assert c.stdin is not None
            c.stdin.close()  # EOF: stop consuming
        for t in readers:
            t.join(timeout=GUARD)
        for c in children:
            c.wait(timeout=GUARD)
            err = c.stderr.read() if c.stderr else ""
            for stream in (c.stdout, c.stderr):
                if stream is not None:
                    stream.close()
            assert c.returncode == 0, err
    delivered = Counter(x.split()[0] for o in outputs for x in o)
    assert [p for p, c in delivered.items() if c > 1] == [], "a message was claimed twice"
    assert len(delivered) == n
    assert all(outputs), "both processes took part"


async def test_late_acks_racing_redeliveries_never_fail(postgres_url: str) -> None:
    """Acks of expired leases while other consumers reclaim them: no deadlock, no error."""
    n = 400
    async with await tidings.connect(postgres_url) as pub:
        hubs = [await tidings.connect(postgres_url) for _ in range(4)]
        try:
            subs = [await h.subscribe("pg.>", group="slow", ack_wait=0.05, max_deliver=10_000,
                                      max_in_flight=40,
                                      batch=20) for h in hubs]
            done: set[int] = set()
            await pub.publish_many("pg.jobs", list(range(n)))

            async def work(sub: tidings.Subscription) -> None:
                k = 0
                while len(done) < n:
                    for msg in await sub.fetch(20, wait=0.05):
                        k += 1
                        if k % 3 == 0:
                            await asyncio.sleep(0.06)  # past ack_wait: another takes it
                        if k % 5 == 0:
                            await msg.nack()
                        else:
                            done.add(msg.position)
                            await msg.ack()
                    await sub.flush()

            await asyncio.wait_for(asyncio.gather(*(work(s) for s in subs)), GUARD)
        finally:
            for h in hubs:
                await h.close()
    assert len(done) == n
