"""The outbox relay under SIGKILL: what a database transaction committed reaches NATS
exactly once, however often the process holding unrelayed rows dies.

A child process appends events (each one's message goes into the SQLite outbox in the
same transaction) from many tasks through `sqlite:///…?broker=nats://…` and is
SIGKILLed at random moments, over and over; every kill can land between a commit and
its relay. Then one more hub relays what is left, and the broker's log must hold every
message the database committed, each once (JetStream drops a re-relayed copy by its
`Nats-Msg-Id`, the message id).
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
from typing import Any

import pytest

import tidings

ROOT = Path(__file__).resolve().parents[2]
KILLS = 6

pytestmark = [pytest.mark.service, pytest.mark.slow]


def _spawn(url: str, tag: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration._relay_child", "writer", url, "16", tag],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)


def _run_until_killed(url: str, tag: str, rng: random.Random) -> int:
    """Start a writer, let it commit a random number of appends, SIGKILL it."""
    proc = _spawn(url, tag)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", "the writer did not start"
        want, seen = rng.randint(20, 300), 0
        for line in proc.stdout:
            seen += line.strip() == "ok"
            if seen >= want:
                break
        os.kill(proc.pid, signal.SIGKILL)
        return seen
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def _ids(url: str) -> list[str]:
    async with await tidings.connect(url) as hub:
        return [m.id async for m in hub.read(">")]


async def test_every_committed_message_reaches_nats_once(tmp_path: Path, nats_server: Any
                                                         ) -> None:
    rng = random.Random(int(os.environ.get("TIDINGS_SEED", "7")))
    db = f"sqlite:///{tmp_path}/shop.db"
    broker = nats_server.url_for(tmp_path)
    url = f"{db}?broker={broker}"
    acked = 0
    gaps = []
    for k in range(KILLS):
        acked += await asyncio.to_thread(_run_until_killed, url, f"w{k}", rng)
        # how much the dead writer left committed but not relayed (its own relay is gone)
        async with await tidings.connect(broker) as bus:
            relayed = await bus.engine.last_position()
        gaps.append((len(await _ids(db)), relayed))
    async with await tidings.connect(url) as hub:  # one more relay moves the rest
        engine: Any = hub.engine
        assert await engine.relayed(30.0), "the relay did not catch up"
    committed = await _ids(db)
    delivered = await _ids(broker)
    print(f"{KILLS} kills, {acked} acknowledged appends, {len(committed)} committed "
          f"messages, (committed, on NATS) after each kill: {gaps}")
    assert len(committed) >= acked  # every acknowledged append is in the database
    twice = [i for i, n in Counter(delivered).items() if n > 1]
    assert not twice, f"{len(twice)} messages reached NATS twice, e.g. {twice[:3]}"
    missing = set(committed) - set(delivered)
    assert not missing, f"{len(missing)} committed messages never reached NATS"
    assert len(delivered) == len(committed)
    # the kills did land between commits and their relay (else this proved nothing)
    assert any(on_nats < committed_then for committed_then, on_nats in gaps)
