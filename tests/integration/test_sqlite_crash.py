"""An acknowledged publish survives `kill -9`; a batch is all or nothing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import tidings

from ._child import payload

ROOT = Path(__file__).resolve().parents[2]


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration._child", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )


def _kill_after(proc: subprocess.Popen[str], lines: int) -> list[str]:
    """Read `lines` acknowledged lines, then SIGKILL the child mid-flight."""
    assert proc.stdout is not None
    acked = []
    while len(acked) < lines:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"child exited early: {err}")
        acked.append(line.strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    # lines already in the pipe were acknowledged before the kill, too
    rest = proc.stdout.read()
    acked += [x.strip() for x in rest.splitlines() if x.strip()]
    proc.stdout.close()
    if proc.stderr is not None:
        proc.stderr.close()
    return acked


@pytest.mark.parametrize(("round_", "durability"),
                         [(0, "full"), (1, "full"), (2, "normal"), (3, "normal")])
async def test_acked_single_publishes_survive_sigkill(tmp_path: Path, round_: int,
                                                      durability: str) -> None:
    # `normal` skips the fsync per commit: it must still survive a process crash
    url = f"sqlite:///{tmp_path}/crash.db?durability={durability}"
    rng = random.Random(round_)
    acked = _kill_after(_spawn("publisher", url, "single"), rng.randint(20, 400))
    async with await tidings.connect(url) as hub:
        stored = [m async for m in hub.read("crash.single")]
    by_id = Counter(m.id for m in stored)
    assert all(n == 1 for n in by_id.values()), "a message was stored twice"
    data = {m.id: m.data for m in stored}
    positions = {m.id: m.position for m in stored}
    for line in acked:
        mid, pos = line.split()
        assert mid in data, f"acknowledged {mid} lost after SIGKILL"
        assert positions[mid] == int(pos)
        assert data[mid] == payload(int(mid.split("-")[1])), f"{mid} corrupted"


async def test_batches_are_all_or_nothing_across_sigkill(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/crash.db"
    acked = _kill_after(_spawn("publisher", url, "batch"), 60)
    async with await tidings.connect(url) as hub:
        stored = [m async for m in hub.read("crash.batch")]
    per_batch = Counter(m.key for m in stored)
    assert set(per_batch.values()) <= {10}, f"partial batch stored: {per_batch}"
    for tag in acked:
        assert per_batch[tag] == 10, f"acknowledged batch {tag} lost"
    # still writable and consistent after the crash
    async with await tidings.connect(url) as hub:
        p = await hub.publish("crash.batch", b"after")
        assert p.position > max(m.position for m in stored)
