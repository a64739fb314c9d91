"""Wake-ups through LISTEN/NOTIFY: a waiting consumer hears of another process's publish."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tidings
import tidings.pubsub

asyncpg = pytest.importorskip("asyncpg")
pytestmark = [pytest.mark.service]

ROOT = Path(__file__).resolve().parents[2]
GUARD = 30.0


def publish_elsewhere(url: str, topic: str, count: int = 1) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.postgres._child", "publish", url, topic, str(count)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=GUARD, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["done"]


@pytest.fixture
def no_idle_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consumers never look again on their own: only a wake-up can make them fetch."""
    monkeypatch.setattr(tidings.pubsub, "IDLE_CHECK", 3600.0)


async def test_waiting_consumer_gets_another_process_publish(
    postgres_url: str, no_idle_poll: None
) -> None:
    async with await tidings.connect(postgres_url) as hub:
        sub = await hub.subscribe("pg.>", group="g")
        assert await sub.fetch(10, wait=0.05) == []
        waiting = asyncio.create_task(sub.fetch(1, wait=3600))
        await asyncio.sleep(0.1)  # it is asleep now (either way, it must get the message)
        await asyncio.to_thread(publish_elsewhere, postgres_url, "pg.x")
        got = await asyncio.wait_for(waiting, GUARD)
        assert [m.data for m in got] == [b"item-0"]


async def test_listener_reconnects_after_its_connection_is_killed(
    postgres_url: str, no_idle_poll: None
) -> None:
    async with await tidings.connect(postgres_url) as hub:
        sub = await hub.subscribe("pg.>", group="g")
        admin = await asyncpg.connect(postgres_url.split("?", 1)[0])
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'tidings-listen' AND pid <> pg_backend_pid()")
            assert killed >= 1
        finally:
            await admin.close()
        waiting = asyncio.create_task(sub.fetch(1, wait=3600))
        await asyncio.to_thread(publish_elsewhere, postgres_url, "pg.z")
        got = await asyncio.wait_for(waiting, GUARD)
        assert [m.data for m in got] == [b"item-0"]
        # and it keeps working for the next one
        waiting = asyncio.create_task(sub.fetch(1, wait=3600))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(publish_elsewhere, postgres_url, "pg.z")
        got = await asyncio.wait_for(waiting, GUARD)
        assert [m.data for m in got] == [b"item-0"]
