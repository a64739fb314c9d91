"""A coordinator SIGKILLed after taking a saga's reply but before storing what it did:
the reply is not lost. The restarted coordinator gets it once its lease ends (before the
step's timeout) and the saga completes; it does not compensate a step that succeeded."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.test_shop_crash import _kill
from tests.saga.test_coordinator import ledger, ledger_service

import tidings
from tidings import Saga, Step

ROOT = Path(__file__).resolve().parents[2]
#: the step's timeout: its reply's lease is half of it, so the reply comes back in time
DEFN = Saga("r", [Step("credit", command="svc.credit.reserve",
                       compensation="svc.credit.release", timeout=8.0)])


def _take_and_die(url: str) -> None:
    """Run the child coordinator until it holds the saga's reply, then SIGKILL it."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.integration._reply_child", url],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")])))
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "taken"
    finally:
        _kill(child)


async def test_a_reply_taken_by_a_killed_coordinator_is_not_lost(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    _take_and_die(url)
    async with await tidings.connect(url) as hub:
        ledger_service(hub, "credit", "credit")
        served = asyncio.create_task(hub.run())
        try:
            state = await hub.sagas(DEFN).wait("o-1", timeout=30)
        finally:
            served.cancel()
        assert state["status"] == "completed", state["reason"]
        assert (await ledger(hub, "credit")).held == {"o-1": 3}
