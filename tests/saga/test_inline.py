"""Inline command handlers: `@hub.handler(..., inline=True)` run by a coordinator on the
same hub, their changes committed with the step's outcome (no command, reply or inbox).

What a user relies on: the same outcomes as over messages (exactly one saga wins the
last unit, credit conserved), an attempt that crashed before its commit is run again
exactly once (inline, or as a message by a service elsewhere), timeouts retry, a
cancel waits for the attempt in flight and then compensates.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import tidings
from tidings import ManualClock, Rejected, Saga, Step

from .test_coordinator import (
    WAIT,
    Env,
    SgReserved,
    ledger,
    ledger_service,
    read_all,
    seed,
    status_is,
)


def _race_saga(approved: list[str]) -> Saga:
    async def approve(data: dict[str, Any]) -> None:
        approved.append(data["saga_id"])

    return Saga("inline-race", [
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release"),
        Step("stock", command="svc.stock.reserve", compensation="svc.stock.release"),
        Step("approve", action=approve, retriable=True),
    ])


async def test_50_sagas_race_for_the_last_unit_with_inline_handlers(env: Env, url: str) -> None:
    hub = await env.hub(url)
    await seed(hub, "stock", 1)
    await seed(hub, "credit", 1000)
    ledger_service(hub, "stock", "stock", concurrency=4, inline=True)
    ledger_service(hub, "credit", "credit", concurrency=4, inline=True)
    approved: list[str] = []
    runner = hub.sagas(_race_saga(approved), clock=ManualClock())
    ids = await asyncio.gather(*(runner.start({"amount": 1}, id=f"order-{i}")
                                 for i in range(50)))
    states = await asyncio.gather(*(runner.wait(i, timeout=60.0) for i in ids))
    by_status: dict[str, list[str]] = {}
    for s in states:
        by_status.setdefault(s["status"], []).append(s["id"])
    assert sorted(by_status) == ["compensated", "completed"], by_status
    [winner] = by_status["completed"]
    assert approved == [winner]
    stock = await ledger(hub, "stock")
    assert stock.available == 0 and stock.low_water == 0 and stock.held == {winner: 1}
    credit = await ledger(hub, "credit")
    assert credit.available == 999 and credit.held == {winner: 1}
    assert sorted(credit.released) == sorted(by_status["compensated"])
    # no round trip: no command or reply message, no inbox record; the saga's own
    # stream records each attempt as inline
    assert await read_all(hub, "svc.>") == []
    assert await read_all(hub, "saga.inline-race.replies") == []
    assert await read_all(hub, "inbox") == []
    loser = by_status["compensated"][0]
    events = [rec.event async for rec in hub.events.read(f"saga-inline-race-{loser}")]
    started = [e for e in events if type(e).__name__ in ("StepStarted", "CompensationStarted")]
    assert started and all(e.inline for e in started)


async def test_inline_and_message_handlers_reach_the_same_state(env: Env, sqlite_url: str
                                                                ) -> None:
    # inline on one hub, over messages on another: the ledgers end the same
    results = []
    for inline in (True, False):
        hub = await env.hub(sqlite_url.replace("x.db", f"{inline}.db"))
        await seed(hub, "stock", 3)
        await seed(hub, "credit", 10)
        ledger_service(hub, "stock", "stock", inline=inline)
        ledger_service(hub, "credit", "credit", inline=inline)
        if not inline:
            env.serve(hub)
        runner = hub.sagas(_race_saga([]))
        ids = [await runner.start({"amount": 2}, id=f"o-{i}") for i in range(3)]
        states = [await runner.wait(i, timeout=WAIT) for i in ids]
        stock, credit = await ledger(hub, "stock"), await ledger(hub, "credit")
        results.append(([s["status"] for s in states], stock.available, credit.available,
                        sorted(credit.released)))
    assert results[0] == results[1] == (["completed", "compensated", "compensated"], 1, 8,
                                        ["o-1", "o-2"])


class _Blocking:
    """An inline reserve that blocks until released; records each run."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.runs = 0


def _blocking_service(hub: tidings.Hub, gate: _Blocking) -> None:
    @hub.handler("svc.credit.reserve", inline=True)
    async def reserve(cmd: tidings.Command) -> dict[str, Any]:
        gate.runs += 1
        led = await ledger(hub, "credit")
        led.record(SgReserved(saga=cmd.data["saga_id"], amount=1))
        cmd.save(led)
        gate.entered.set()
        await gate.release.wait()
        return {"reserved": 1}


_ONE_STEP = Saga("inline-one", [Step("credit", command="svc.credit.reserve")])


@pytest.mark.parametrize("resume", ["inline", "message"])
async def test_an_attempt_cut_off_before_its_commit_runs_again_exactly_once(
        env: Env, sqlite_url: str, resume: str) -> None:
    first = await env.hub(sqlite_url)
    await seed(first, "credit", 5)
    gate = _Blocking()
    _blocking_service(first, gate)
    sid = await first.sagas(_ONE_STEP).start({})
    await asyncio.wait_for(gate.entered.wait(), WAIT)
    await env.close(first)  # the coordinator goes away mid-attempt: nothing was committed
    assert (await ledger(await env.hub(sqlite_url), "credit")).held == {}

    second = await env.hub(sqlite_url)
    if resume == "inline":
        ledger_service(second, "credit", "credit", inline=True)
    else:  # resumed where the handler is a plain one: the attempt goes out as a message
        ledger_service(second, "credit", "credit")
        env.serve(second)
    runner = second.sagas(_ONE_STEP)
    state = await runner.wait(sid, timeout=WAIT)
    assert state["status"] == "completed"
    led = await ledger(second, "credit")
    assert led.held == {sid: 1} and led.available == 4  # once, not twice
    commands = await read_all(second, "svc.credit.reserve")
    assert len(commands) == (1 if resume == "message" else 0)


async def test_an_inline_handler_that_times_out_is_retried(env: Env, url: str) -> None:
    hub = await env.hub(url)
    await seed(hub, "credit", 5)
    calls: list[int] = []

    @hub.handler("svc.slow.reserve", inline=True)
    async def slow(cmd: tidings.Command) -> dict[str, Any]:
        calls.append(cmd.attempt)
        led = await ledger(hub, "credit")
        led.record(SgReserved(saga=cmd.data["saga_id"], amount=1))
        cmd.save(led)
        if len(calls) == 1:
            await asyncio.sleep(30)  # the first attempt hangs past its timeout
        return {"ok": True}

    defn = Saga("inline-slow", [Step("slow", command="svc.slow.reserve", timeout=0.2,
                                     retries=2, backoff=0.01)])
    runner = hub.sagas(defn)
    sid = await runner.start({})
    state = await runner.wait(sid, timeout=WAIT)
    assert state["status"] == "completed"
    assert calls == [1, 2]
    failed = [s for s in state["steps"] if s["event"] == "StepFailed"]
    assert len(failed) == 1 and "in time" in failed[0]["error"]
    led = await ledger(hub, "credit")
    assert led.available == 4  # the timed-out attempt stored nothing


async def test_a_rejection_inline_compensates_and_an_error_is_retried(env: Env, url: str
                                                                      ) -> None:
    hub = await env.hub(url)
    await seed(hub, "credit", 5)
    ledger_service(hub, "credit", "credit", inline=True)
    tries: list[int] = []

    @hub.handler("svc.flaky.do", inline=True)
    async def flaky(cmd: tidings.Command) -> dict[str, Any]:
        tries.append(cmd.attempt)
        if cmd.data.get("refuse"):
            raise Rejected("not today")
        if len(tries) < 3:
            raise RuntimeError("flaky")
        return {}

    defn = Saga("inline-flaky", [
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release"),
        Step("flaky", command="svc.flaky.do", retries=3, backoff=0.01),
    ])
    runner = hub.sagas(defn)
    ok = await runner.wait(await runner.start({"amount": 1}), timeout=WAIT)
    assert ok["status"] == "completed" and tries == [1, 2, 3]
    refused = await runner.wait(await runner.start({"amount": 1, "refuse": True}),
                                timeout=WAIT)
    assert refused["status"] == "compensated" and "not today" in refused["reason"]
    led = await ledger(hub, "credit")
    assert led.available == 4 and led.held == {ok["id"]: 1}


async def test_cancel_waits_for_the_inline_attempt_then_compensates(env: Env, url: str
                                                                    ) -> None:
    hub = await env.hub(url)
    await seed(hub, "credit", 5)
    gate = _Blocking()
    _blocking_service(hub, gate)

    @hub.handler("svc.credit.release", inline=True)
    async def release(cmd: tidings.Command) -> dict[str, Any]:
        led = await ledger(hub, "credit")
        if cmd.data["saga_id"] in led.held:
            from .test_coordinator import SgReleased
            led.record(SgReleased(saga=cmd.data["saga_id"]))
            cmd.save(led)
        return {}

    defn = Saga("inline-cancel", [
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release"),
        Step("never", command="svc.never.do"),
    ])
    runner = hub.sagas(defn)
    sid = await runner.start({})
    await asyncio.wait_for(gate.entered.wait(), WAIT)
    cancelling = asyncio.create_task(runner.cancel(sid, "changed my mind"))
    await asyncio.sleep(0.05)
    assert not cancelling.done()  # recorded only once the attempt in flight is
    gate.release.set()
    await asyncio.wait_for(cancelling, WAIT)
    state = await status_is(runner, sid, "compensated")
    assert "changed my mind" in state["reason"]
    led = await ledger(hub, "credit")
    assert led.available == 5 and led.held == {} and led.released == [sid]
    assert gate.runs == 1


async def test_inline_must_be_a_bool(env: Env) -> None:
    hub = await env.hub("memory://")
    with pytest.raises(tidings.InvalidArgument, match="inline"):
        hub.handler("svc.x.do", inline="yes")  # type: ignore[arg-type]
