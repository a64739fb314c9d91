"""Two processes append to one stream on one SQLite file: one winner per version, no gap."""

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
        [sys.executable, "-m", "tests.integration._es_child", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT, env=env,
    )


def _ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")


def _finish(proc: subprocess.Popen[str]) -> list[str]:
    out, err = proc.communicate(timeout=100)
    assert proc.returncode == 0, err
    lines = [x for x in out.splitlines() if x]
    assert lines[-1] == "done", lines[-5:]
    return lines[:-1]


async def test_two_processes_append_to_one_stream(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    async with await tidings.connect(url) as hub:  # create the tables up front
        await hub.events.append("other-1", [tidings.NewEvent(type="Seed", data={})])
    procs = [_spawn("appender", url, "hot-1", "10", "5", tag) for tag in "ab"]
    for p in procs:
        _ready(p)
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [_finish(p) for p in procs]
    wins = [int(x.split()[1]) for lines in results for x in lines if x.startswith("win")]
    assert sorted(wins) == list(range(1, 101)), "each version must have exactly one winner"
    async with await tidings.connect(url) as hub:
        recs = [r async for r in hub.events.read("hot-1", raw=True)]
        assert [r.version for r in recs] == list(range(1, 101))
        positions = [r.position for r in recs]
        assert positions == sorted(positions) and len(set(positions)) == 100
        assert [r.position async for r in hub.events.read_all(raw=True)] == list(range(1, 102))
        writers = {r.json()["writer"][0] for r in recs}
        assert writers == {"a", "b"}  # both processes won some versions


async def test_two_processes_share_one_projection_without_doubles(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    async with await tidings.connect(url) as hub:
        for i in range(20):
            await hub.events.append(f"p-{i}", [tidings.NewEvent(type="Seed", data={"i": j})
                                               for j in range(10)])
    procs = [_spawn("projector", url, "200") for _ in range(2)]
    seen = [int(x.split()[1]) for p in procs for x in _finish(p) if x.startswith("saw")]
    assert sorted(seen) == list(range(1, 201)), "each event handled once across both processes"
