"""Several processes share one SQLite file: they see each other's work, never a double delivery."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tidings

ROOT = Path(__file__).resolve().parents[2]


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration._child", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")


def _lines(proc: subprocess.Popen[str]) -> list[str]:
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    return [x for x in out.splitlines() if x]


def test_publisher_and_subscriber_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    consumer = _spawn("consumer", url, "one", "200")
    _wait_ready(consumer)
    producer = _spawn("produce", url, "200")
    assert _lines(producer) == ["done"]
    got = _lines(consumer)
    assert [x.split(" ", 1)[1] for x in got] == [f"item-{i}" for i in range(200)]


def test_competing_consumer_processes_share_without_doubles(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    a = _spawn("consumer", url, "workers", "150")
    b = _spawn("consumer", url, "workers", "150")
    _wait_ready(a)
    _wait_ready(b)
    producer = _spawn("produce", url, "300")
    assert _lines(producer) == ["done"]
    got_a = {x.split(" ", 1)[0] for x in _lines(a)}
    got_b = {x.split(" ", 1)[0] for x in _lines(b)}
    assert not got_a & got_b, "a message went to both competing consumers"
    assert len(got_a | got_b) == 300


async def test_subscription_resumes_in_a_new_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    async with await tidings.connect(url) as hub:
        for i in range(10):
            await hub.publish("mp.items", f"item-{i}")
    first = _spawn("consumer", url, "resume", "4")
    _wait_ready(first)
    assert len(_lines(first)) == 4
    second = _spawn("consumer", url, "resume", "6")
    _wait_ready(second)
    assert [x.split(" ", 1)[1] for x in _lines(second)] == [f"item-{i}" for i in range(4, 10)]


async def test_processes_opening_a_new_file_at_once_all_open_it(tmp_path: Path) -> None:
    # Switching a new file to WAL answers "database is locked" at once (SQLite does not
    # wait there) while another process is creating it: open takes turns instead.
    url = f"sqlite:///{tmp_path}/new.db"
    _all_done([_spawn("produce", url, "20") for _ in range(6)])
    async with await tidings.connect(url) as hub:
        assert len([m async for m in hub.read(">")]) == 120


def _all_done(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        assert _lines(p) == ["done"]
