"""A single JetStream server restarted under load: gracefully, and by SIGKILL.

What a user relies on: while the server is away a publish either returns (and then the
message is stored and delivered) or raises `EngineUnavailable` (and then retrying it
with the same id stores it once); consumers reconnect by themselves, a fetch or an ack
meanwhile raising `EngineUnavailable` at worst; and a message whose `ack(wait=True)`
returned is never delivered again (at least once redelivers only what was not acked).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from tests.jetstream._traffic import Traffic, nats_or_skip, until
from tests.natsserver import NatsServer, NatsServerUnavailable
from tests.pg_plugin import unavailable

import tidings

pytestmark = [pytest.mark.service, pytest.mark.slow]

BEFORE = 300  # publishes that return before the restart
AFTER = 300  # ... and after it
OUTAGE = 1.0  # seconds the server is away
GUARD = 30.0  # seconds before a wait that should succeed is declared a failure


@pytest.fixture
def server() -> Iterator[NatsServer]:
    """A server of this test's own: the session's one is not to be restarted."""
    nats_or_skip()
    s = NatsServer()
    try:
        s.start()
    except (NatsServerUnavailable, OSError) as exc:
        s.stop()
        unavailable(f"cannot start nats-server: {exc}")
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("kill", [False, True], ids=["graceful", "sigkill"])
async def test_a_restart_under_load_loses_and_repeats_nothing(
        server: NatsServer, kill: bool) -> None:
    url = f"{server.url}?stream=r{uuid.uuid4().hex[:12]}"
    hub = await tidings.connect(url, trim_interval=None)
    t = Traffic()
    stop = asyncio.Event()
    target: list[int] = []  # publishes to return in all, known once the server is back

    def done() -> bool:
        return bool(target) and len(t.returned) >= target[0]

    consumers = [asyncio.create_task(t.consumer(url, n, stop)) for n in (1, 2)]
    publishers = [asyncio.create_task(t.publisher(hub, p, done)) for p in ("a", "b")]
    tasks = [*consumers, *publishers]
    try:
        await until(lambda: len(t.returned) >= BEFORE or any(p.done() for p in publishers),
                    f"{BEFORE} publishes", GUARD)
        # server.restart(kill=kill), with the server away for OUTAGE s in between (a
        # restart on loopback takes a few ms: too short for clients to notice); the
        # clients keep running, and failing, meanwhile
        await asyncio.to_thread(server.node.kill if kill else server.node.stop)
        t.mark = time.monotonic()
        await asyncio.sleep(OUTAGE)
        await asyncio.to_thread(server.node.start)
        back = time.monotonic()
        target.append(len(t.returned) + AFTER)
        await asyncio.wait_for(asyncio.gather(*publishers), GUARD)

        await t.all_acked(GUARD, consumers)
        await t.consuming_since(back, consumers, GUARD)
        t.check()
        stop.set()
        await asyncio.gather(*consumers)
        # each id once: every publish was retried until it returned, with the same id
        engine: Any = hub.engine
        state = (await engine._api(f"STREAM.INFO.{engine.stream}", None))["state"]
        assert state["messages"] == len(t.returned), state
        assert t.recovered is not None
        print(f"server away {back - t.mark:.2f}s, publishing again after "
              f"{t.recovered - t.mark:.2f}s;", t.summary())
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await hub.close()
