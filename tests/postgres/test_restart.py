"""PostgreSQL restarted mid-burst: nothing acknowledged is lost, consumers carry on.

Each test runs its own throwaway server (restarting the session's would cut every
other test's connections), so these need the PostgreSQL binaries, not just a URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from tests.pg_plugin import unavailable
from tests.pgserver import FAST, PgServer, PgServerUnavailable

import tidings

pytestmark = [pytest.mark.service, pytest.mark.slow]

GUARD = 90.0
PUBLISHERS = 4


@pytest.fixture
def server() -> Iterator[PgServer]:
    try:
        pg = PgServer(settings=dict(FAST))
        pg.start()
    except (PgServerUnavailable, OSError) as exc:
        unavailable(f"needs the PostgreSQL server binaries to restart a server: {exc}")
    try:
        yield pg
    finally:
        pg.stop()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart_mid_burst_loses_nothing_acknowledged(server: PgServer, mode: str) -> None:
    url = server.url() + "?schema=burst&reconnect_timeout=20"
    acked: set[str] = set()
    failures: list[BaseException] = []
    delivered: set[str] = set()
    restarted = asyncio.Event()
    under_way = asyncio.Event()  # enough acknowledged: restart now
    stop_consuming = asyncio.Event()

    async with await tidings.connect(url) as hub, await tidings.connect(url) as consumer_hub:
        sub = await consumer_hub.subscribe("burst.>", group="g", ack_wait=60)

        async def publisher(k: int) -> None:
            i = 0
            while not restarted.is_set() or i < 300:
                msg_id = f"p{k}-{i}"
                try:
                    if i % 10 == 9:  # some batches too: all or nothing
                        ids = [f"{msg_id}-{j}" for j in range(5)]
                        await hub.publish_many("burst.batch", [
                            tidings.envelope(x, id=x) for x in ids])
                        acked.update(ids)
                    else:
                        await hub.publish("burst.one", msg_id, id=msg_id)
                        acked.add(msg_id)
                except tidings.EngineUnavailable as exc:  # the only failure allowed
                    failures.append(exc)
                if len(acked) >= 200:
                    under_way.set()
                i += 1

        async def consume() -> None:
            while not (stop_consuming.is_set() and acked <= delivered):
                try:
                    for msg in await sub.fetch(50, wait=0.1):
                        delivered.add(msg.data.decode())
                        await msg.ack()
                except tidings.EngineUnavailable as exc:  # only if the outage outlasts retries
                    failures.append(exc)

        async def restart() -> None:
            await under_way.wait()
            if mode == "fast":
                await asyncio.to_thread(server.restart, "fast")
            else:  # a crash: no shutdown checkpoint, the server recovers from its WAL
                await asyncio.to_thread(server.stop_server, "immediate")
                await asyncio.to_thread(server.start_server)
            restarted.set()

        consuming = asyncio.create_task(consume())
        await asyncio.wait_for(
            asyncio.gather(restart(), *(publisher(k) for k in range(PUBLISHERS))), GUARD)
        stop_consuming.set()
        await asyncio.wait_for(consuming, GUARD)
        await sub.close()

        stored = {m.data.decode() async for m in hub.read("burst.>")}

    assert not [f for f in failures if not isinstance(f, tidings.EngineUnavailable)]
    assert acked <= stored, f"acknowledged but lost: {sorted(acked - stored)[:10]}"
    assert acked <= delivered, "the consumer did not carry on after the restart"
    # a batch is all or nothing, even when its outcome was unknown to the publisher
    batches: dict[str, int] = {}
    for x in stored:
        if x.count("-") == 2:
            head = x.rsplit("-", 1)[0]
            batches[head] = batches.get(head, 0) + 1
    assert set(batches.values()) <= {5}
