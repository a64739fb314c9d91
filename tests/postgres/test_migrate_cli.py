"""`tidings migrate` creates the schema on a fresh PostgreSQL schema, then has nothing to do."""

from __future__ import annotations

import subprocess
import sys

import tidings


def _migrate(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tidings", "--url", url, "migrate"],
                          capture_output=True, text=True, timeout=60)


async def test_migrate_then_use(postgres_url: str) -> None:
    first = _migrate(postgres_url)
    assert first.returncode == 0, first.stderr
    applied = int(first.stdout.split()[0])
    assert applied >= 1
    again = _migrate(postgres_url)
    assert again.returncode == 0 and again.stdout.split()[0] == "0"
    async with await tidings.connect(postgres_url) as hub:
        p = await hub.publish("mig.ok", b"x")
        assert [m.position async for m in hub.read("mig.ok")] == [p.position]
