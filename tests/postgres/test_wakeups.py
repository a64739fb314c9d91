"""Wake-ups through LISTEN/NOTIFY: a waiting consumer hears of another process's publish."""

from __future__ import annotations

import asyncio

import pytest
from tests.pg_plugin import needs

import tidings

from ._child import publish_elsewhere

asyncpg = needs("asyncpg")
pytestmark = [pytest.mark.service]

GUARD = 30.0


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
