"""SQLite wake-ups across processes: the writer thread looks at `PRAGMA data_version`
on its own connection (idle: every poll_interval; busy: at each transaction), which
counts only other connections' commits. A waiting consumer must hear of another
process's publish whether this process is idle or busy writing, and this process's
own writes must never wake every consumer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from tests.postgres._child import publish_elsewhere

import tidings

GUARD = 30.0
WOKEN = 10.0  # poll_interval is 5 ms: heard long before this, however busy the machine


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
async def test_a_process_hears_of_another_process_publish(
        tmp_path: Path, no_idle_poll: None, busy: bool) -> None:
    # idle: the writer looks every poll_interval; busy (it never idles): at each
    # transaction
    url = f"sqlite:///{tmp_path}/w.db"
    async with await tidings.connect(url) as hub:
        sub = await hub.subscribe("x.>", group="g")
        assert await sub.fetch(10, wait=0.05) == []
        stop = asyncio.Event()

        async def work() -> None:
            while busy and not stop.is_set():
                await hub.publish("busy.y", b"work")

        writer = asyncio.create_task(work())
        try:
            await asyncio.sleep(0.05)  # (idle: nobody waits, the writer sleeps until work)
            waiting = asyncio.create_task(sub.fetch(1, wait=3600))  # a waiter wakes it
            await asyncio.sleep(0.1)  # asleep now
            await asyncio.to_thread(publish_elsewhere, url, "x.a")
            # a liveness bound, not a speed one: without the wake-up, the next look would
            # come only with the next write of this process (30 s here)
            got = await asyncio.wait_for(waiting, WOKEN)
            assert [m.data for m in got] == [b"item-0"]
        finally:
            stop.set()
            await writer


async def test_own_writes_wake_only_the_consumers_they_concern(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/w.db"
    async with await tidings.connect(url) as hub:
        engine: Any = hub.engine
        everyone = 0
        notify = engine._notify

        def counting(topics: Any = None, patterns: Any = ()) -> None:
            nonlocal everyone
            if topics is None:
                everyone += 1
            notify(topics, patterns)

        engine._notify = counting
        sub = await hub.subscribe("quiet.>", group="g")
        waiting = asyncio.create_task(sub.fetch(1, wait=3600))
        for i in range(50):
            await hub.publish("busy.z", f"{i}".encode())
            await asyncio.sleep(engine.poll_interval / 5)  # let idle looks happen too
        assert everyone == 0  # nothing from another connection: nobody woken wholesale
        await hub.publish("quiet.a", b"q")
        got = await asyncio.wait_for(waiting, GUARD)
        assert [m.data for m in got] == [b"q"]
