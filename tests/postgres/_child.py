"""Child processes for the PostgreSQL tests (run with `python -m tests.postgres._child`),
and `publish_elsewhere`, which runs one (for any engine's cross-process tests)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import tidings


async def consumer(url: str, group: str, hubs: int, ack_wait: float) -> None:
    """Consume 'pg.>' in `group` on `hubs` hubs (connections) until stdin closes.

    Prints 'ready' once subscribed, then 'position hub' for every delivery.
    """
    opened = [await tidings.connect(url) for _ in range(hubs)]
    subs = [await h.subscribe("pg.>", group=group, ack_wait=ack_wait, max_in_flight=20)
            for h in opened]
    print("ready", flush=True)
    stop = asyncio.Event()

    async def work(i: int, sub: tidings.Subscription) -> None:
        while not stop.is_set():
            for msg in await sub.fetch(20, wait=0.2):
                print(f"{msg.position} {i}", flush=True)
                await asyncio.sleep(0.001)  # hold it a moment: overlaps the others' claims
                await msg.ack()

    async def until_eof() -> None:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        stop.set()

    await asyncio.gather(until_eof(), *(work(i, s) for i, s in enumerate(subs)))
    for s in subs:
        await s.close()
    for h in opened:
        await h.close()


async def publish(url: str, topic: str, count: int) -> None:
    """Publish `count` messages to `topic`, then print 'done'."""
    async with await tidings.connect(url) as hub:
        for i in range(count):
            await hub.publish(topic, f"item-{i}")
        print("done", flush=True)


def publish_elsewhere(url: str, topic: str, count: int = 1, guard: float = 30.0) -> None:
    """Publish from another process: `count` messages 'item-0'… on `topic`."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.postgres._child", "publish", url, topic, str(count)],
        capture_output=True, text=True, cwd=root, env=env, timeout=guard, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["done"]


if __name__ == "__main__":
    role, url, *rest = sys.argv[1:]
    if role == "consumer":
        asyncio.run(consumer(url, rest[0], int(rest[1]), float(rest[2])))
    elif role == "publish":
        asyncio.run(publish(url, rest[0], int(rest[1])))
