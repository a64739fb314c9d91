"""A three-node JetStream cluster losing the leader of the stream mid-burst.

What a user relies on with `replicas=3`: a publish that returned is stored on a quorum,
so it survives the SIGKILL of the node that led the stream and is delivered once a new
leader is elected; a publish that raised `EngineUnavailable` meanwhile can be retried
with the same id without storing it twice; consumers carry on by themselves; and the
killed node, started again, catches up with what it missed.

Reads (direct gets) may be answered by a follower a moment behind the leader, so
nothing here expects one node to see another's write at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from tests.jetstream._traffic import Traffic, nats_or_skip, report, until
from tests.natsserver import NatsCluster, NatsServerUnavailable
from tests.pg_plugin import unavailable

import tidings

pytestmark = [pytest.mark.service, pytest.mark.slow]

PUBLISHES = 1000  # publishes that must return in all
KILL_AT = 300  # ... of which this many before the leader is killed
GUARD = 60.0  # seconds before a wait that should succeed is declared a failure


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    nats_or_skip()
    c = NatsCluster(3)
    try:
        c.start()
    except (NatsServerUnavailable, OSError) as exc:
        c.stop()
        unavailable(f"cannot start a NATS cluster: {exc}")
    try:
        yield c
    finally:
        c.stop()


async def connect(url: str, **options: Any) -> tidings.Hub:
    """A hub on the cluster, once it has elected its JetStream meta leader (a fresh
    cluster answers 'JetStream not ready' for a moment)."""
    deadline = time.monotonic() + GUARD
    while True:
        try:
            return await tidings.connect(url, trim_interval=None, **options)
        except tidings.EngineUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def stream_info(hub: tidings.Hub, stream: str) -> dict[str, Any]:
    engine: Any = hub.engine
    info: dict[str, Any] = await engine._api(f"STREAM.INFO.{stream}", None)
    return info


async def caught_up(hub: tidings.Hub, stream: str, node: str) -> dict[str, Any]:
    """Wait until `stream` has a leader and two replicas, `node` among the three, every
    replica current and not lagging; its last STREAM.INFO."""
    last: Any = None

    async def loop() -> dict[str, Any]:
        nonlocal last
        while True:
            try:
                last = await stream_info(hub, stream)
            except tidings.EngineUnavailable as exc:
                last = exc
            else:
                c = last.get("cluster", {})
                replicas = c.get("replicas") or []
                names = {c.get("leader")} | {r["name"] for r in replicas}
                if (c.get("leader") and len(replicas) == 2 and node in names
                        and all(r.get("current") and not r.get("offline")
                                and r.get("lag", 0) == 0 for r in replicas)):
                    return dict(last)
            await asyncio.sleep(0.1)

    try:
        return await asyncio.wait_for(loop(), GUARD)
    except TimeoutError:
        pytest.fail(f"{stream}: {node} did not catch up in {GUARD:g} s; last: {last}")


async def test_a_killed_leader_loses_no_published_message(cluster: NatsCluster) -> None:
    stream = f"c{uuid.uuid4().hex[:12]}"
    url = f"{cluster.url}?stream={stream}"
    hub = await connect(url, replicas=3)
    t = Traffic()
    stop = asyncio.Event()
    consumers = [asyncio.create_task(t.consumer(url, n, stop, replicas=3)) for n in (1, 2)]
    publisher = asyncio.create_task(
        t.publisher(hub, "m", lambda: len(t.returned) >= PUBLISHES))
    try:
        await until(lambda: len(t.returned) >= KILL_AT or publisher.done(),
                    f"{KILL_AT} publishes", GUARD)
        leader = (await stream_info(hub, stream))["cluster"]["leader"]
        killed = int(leader.removeprefix("n")) - 1
        cluster.kill(killed)
        t.mark = time.monotonic()
        await asyncio.wait_for(publisher, GUARD)
        assert t.recovered is not None
        report(f"leader election took {t.recovered - t.mark:.2f}s")

        await t.all_acked(GUARD, consumers)
        await t.consuming_since(t.mark, consumers, GUARD)
        t.check()
        stop.set()
        await asyncio.gather(*consumers)

        # the killed node, started again, catches up with the stream and the
        # subscriptions' state
        cluster.start(killed)
        info = await caught_up(hub, stream, leader)
        await caught_up(hub, f"{stream}_state", leader)
        # each id once: every publish was retried until it returned, with the same id
        assert info["state"]["messages"] == len(t.returned), info["state"]
        print(t.summary())
    finally:
        stop.set()
        for task in (*consumers, publisher):
            task.cancel()
        await asyncio.gather(*consumers, publisher, return_exceptions=True)
        await hub.close()
