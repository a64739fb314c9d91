"""A participant SIGKILLed while it holds a saga command: the saga times out and
compensates before the dead process's lease expires; when the command comes back
to the restarted service, it changes nothing (the compensation fenced it)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.integration.test_shop_crash import _kill
from tests.saga.test_coordinator import events_of, ledger, seed, until

import tidings
from tidings import Saga, Step

ROOT = Path(__file__).resolve().parents[2]
ACK_WAIT = 6.0  # the participants' lease: longer than the saga takes to give up


def _spawn(url: str, hold: bool) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen(
        [sys.executable, "-m", "tests.integration._fence_child", url, "1" if hold else "0",
         str(ACK_WAIT)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


async def _line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    return (await asyncio.to_thread(p.stdout.readline)).strip()


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres",
                                                           marks=pytest.mark.service)])
async def test_a_command_held_by_a_killed_participant_changes_nothing_after_compensation(
        tmp_path: Path, engine: str, request: pytest.FixtureRequest) -> None:
    url = (f"sqlite:///{tmp_path}/fence.db" if engine == "sqlite"
           else request.getfixturevalue("postgres_url"))
    defn = Saga("fence-crash", [
        # retried once: the second attempt queues behind the held one (ordered per saga)
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release",
             timeout=1.0, retries=1),
        Step("after", action=_noop),
    ])
    procs: list[subprocess.Popen[str]] = []
    async with await tidings.connect(url) as hub:
        await seed(hub, "credit", 100)
        runner = hub.sagas(defn)
        procs.append(_spawn(url, hold=True))
        try:
            sid = await runner.start({"amount": 30})
            assert await asyncio.wait_for(_line(procs[0]), 20) == f"holding {sid}"
            _kill(procs[0])  # dies holding the command: its lease runs for ACK_WAIT
            procs.append(_spawn(url, hold=False))
            state = await runner.wait(sid, timeout=ACK_WAIT)  # gives up before the lease ends
            assert state["status"] == "compensated", state
            assert not events_of(state["steps"], "ReplyIgnored")  # nothing came back yet
            # the lease expires; the command comes back to the restarted service
            await until(lambda: _ignored(runner, sid, 2), "the late commands' replies",
                        timeout=ACK_WAIT * 4)
            state = await runner.get(sid)
            ignored = events_of(state["steps"], "ReplyIgnored")
            assert {(e["step"], e["kind"], e["attempt"]) for e in ignored} == \
                {(0, "action", 1), (0, "action", 2)}  # both attempts came back, refused
            led = await ledger(hub, "credit")
            assert led.available == 100 and led.held == {}, "the late command kept its credit"
            assert state["status"] == "compensated"
        finally:
            for p in procs:
                _kill(p)


async def _ignored(runner: Any, sid: str, n: int) -> bool:
    return len(events_of((await runner.get(sid))["steps"], "ReplyIgnored")) >= n


async def _noop(data: dict[str, Any]) -> None:
    return None
