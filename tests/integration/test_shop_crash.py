"""The shop across processes on one SQLite file (and on PostgreSQL, and on either with
every message through NATS JetStream), with the coordinator and the inventory
service killed (SIGKILL) at random moments: every saga ends completed or compensated
and the invariants hold."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from examples.shop import create_order
from examples.shop.demo import check_invariants

import tidings

ROOT = Path(__file__).resolve().parents[2]
ORDERS = 100


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration._shop_child", *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env,
    )


def _ready(p: subprocess.Popen[str]) -> None:
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"


def _kill(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    if p.stdout is not None:
        p.stdout.close()


def _read_until(p: subprocess.Popen[str], lines: int) -> bool:
    """Read `lines` lines of progress; False if the process finished first."""
    assert p.stdout is not None
    for _ in range(lines):
        line = p.stdout.readline()
        if not line or line.strip() == "all done":
            return False
    return True


@pytest.mark.parametrize(("engine", "victim"), [
    ("sqlite", "coordinator"), ("sqlite", "inventory"), ("postgres", "coordinator"),
    # state in the database, every command and reply through NATS JetStream
    # (the brokered SQLite row kills the coordinator: killing a participant there waits
    # out its command's 60 s lease, 40 s of the suite for what the sqlite row shows)
    ("postgres+nats", "coordinator"), ("sqlite+nats", "coordinator"),
])
async def test_shop_survives_sigkill(tmp_path: Path, engine: str, victim: str,
                                     request: pytest.FixtureRequest) -> None:
    url = (f"sqlite:///{tmp_path}/shop.db" if engine.startswith("sqlite")
           else request.getfixturevalue("postgres_url"))
    if engine.endswith("+nats"):
        broker = request.getfixturevalue("nats_server").url_for(tmp_path)
        url += f"{'&' if '?' in url else '?'}broker={broker}"
    rng = random.Random(victim)
    services = _spawn("services", url, "all")
    inventory = _spawn("services", url, "inventory")
    coord = _spawn("coordinator", url, str(ORDERS))
    procs = [services, inventory, coord]
    try:
        for p in procs:
            _ready(p)
        for _ in range(3):  # kill the victim at a random moment, three times
            running = _read_until(coord, rng.randint(10, 60))
            if victim == "coordinator":
                _kill(coord)
                coord = _spawn("coordinator", url, str(ORDERS))
                _ready(coord)
            else:
                _kill(inventory)
                inventory = _spawn("services", url, "inventory")
                _ready(inventory)
            if not running:
                break
        deadline = time.monotonic() + 240
        assert coord.stdout is not None
        while time.monotonic() < deadline:
            line = coord.stdout.readline()
            if not line:
                pytest.fail("coordinator exited before finishing")
            if line.strip() == "all done":
                break
        else:
            pytest.fail("sagas did not finish")
    finally:
        for p in (services, inventory, coord):
            _kill(p)
    async with await tidings.connect(url) as hub:
        runner = hub.sagas(create_order)
        ids = [f"o-{i}" for i in range(ORDERS)]
        statuses = [(await runner.get(i))["status"] for i in ids]
        assert set(statuses) <= {"completed", "compensated"}, statuses
        assert "completed" in statuses and "compensated" in statuses
        assert await check_invariants(hub, ids) == []
