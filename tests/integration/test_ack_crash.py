"""When is an ack stored? `await msg.ack(wait=True)` returns once it is: a consumer
SIGKILLed right after never sees that message again. A plain `await msg.ack()` is
batched into the consumer's next write, so a kill may deliver an acked message
once more (at least once) — but never loses one."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.integration.test_sqlite_crash import _kill_after, _spawn

import tidings

MESSAGES = 1500


async def _redelivered(url: str) -> list[int]:
    """Consume what the killed consumer left (its leases expire after 1 s)."""
    async with await tidings.connect(url) as hub:
        sub = await hub.subscribe("acks.t", group="g", ack_wait=30.0, max_in_flight=500)
        got: list[int] = []
        while batch := await sub.fetch(500, wait=3.0):
            for m in batch:
                got.append(m.position)
                await m.ack()
        await sub.close()
        return got


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres",
                                                           marks=pytest.mark.service)])
@pytest.mark.parametrize("wait", [True, False], ids=["wait", "batched"])
async def test_an_ack_that_returned_survives_sigkill(
        tmp_path: Path, engine: str, wait: bool, request: pytest.FixtureRequest) -> None:
    url = (f"sqlite:///{tmp_path}/acks.db" if engine == "sqlite"
           else request.getfixturevalue("postgres_url"))
    async with await tidings.connect(url) as hub:
        published = [p.position for p in
                     await hub.publish_many("acks.t", [b"x"] * MESSAGES)]
    acked = [int(line) for line in
             _kill_after(_spawn("acker", url, "wait" if wait else "batched"), 400)]
    assert len(set(acked)) == len(acked)
    again = await _redelivered(url)
    # at least once: every message was acked before the kill or comes back after it
    assert set(acked) | set(again) == set(published)
    if wait:
        assert not set(acked) & set(again), "a message whose ack(wait=True) returned came back"
