"""Inline command handlers: `@hub.handler(..., inline=True)` run by a coordinator on the
same hub, their changes committed with the step's outcome (no command, reply or inbox).

What a user relies on: the same outcomes as over messages (exactly one saga wins the
last unit, credit conserved), an attempt that crashed before its commit is run again
exactly once (inline, or as a message by a service elsewhere), timeouts retry, a
cancel waits for the attempt in flight and then compensates.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

import tidings
from tidings import ManualClock, Rejected, Saga, Step
from tidings.saga.unit import StreamLocks

from .test_coordinator import (
    WAIT,
    Env,
    SgReserved,
    ledger,
    ledger_service,
    read_all,
    seed,
    status_is,
    until,
)


async def _replied(hub: tidings.Hub, pattern: str) -> bool:
    return bool([m async for m in hub.read(pattern)])


async def _available(hub: tidings.Hub, n: int) -> bool:
    hub.events.drop_cached()
    return (await ledger(hub, "credit")).available == n


def _race_saga(approved: list[str]) -> Saga:
    async def approve(data: dict[str, Any]) -> None:
        approved.append(data["saga_id"])

    return Saga("inline-race", [
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release"),
        Step("stock", command="svc.stock.reserve", compensation="svc.stock.release"),
        Step("approve", action=approve, retriable=True),
    ])


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


_ONE_STEP = Saga("inline-one", [Step("credit", command="svc.credit.reserve", timeout=1.0,
                                       retries=2, backoff=0.01)])


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
    else:  # resumed where the handler is a plain one: the inline attempt is not sent (an
        # inline coordinator may still be running it); after its deadline, the next
        # attempt goes out as a message
        ledger_service(second, "credit", "credit")
        env.serve(second)
    runner = second.sagas(_ONE_STEP)
    state = await runner.wait(sid, timeout=WAIT)
    assert state["status"] == "completed"
    led = await ledger(second, "credit")
    assert led.held == {sid: 1} and led.available == 4  # once, not twice
    commands = await read_all(second, "svc.credit.reserve")
    if resume == "message":
        assert [m.headers["saga-attempt"] for m in commands] == ["2"]
        [failed] = [s for s in state["steps"] if s["event"] == "StepFailed"]
        assert failed["attempt"] == 1 and "no reply" in failed["error"]
    else:
        assert commands == []


async def test_a_coordinator_without_the_inline_handler_never_runs_the_step_twice(
        env: Env, sqlite_url: str) -> None:
    # W runs the step inline (slowly); G, a coordinator of the same saga without the
    # handler (a gateway process, say), must not send it as a message meanwhile
    w = await env.hub(sqlite_url)
    await seed(w, "credit", 10)
    gate = _Blocking()
    _blocking_service(w, gate)
    env.serve(w)  # W also handles the command should it arrive as a message
    g = await env.hub(sqlite_url)
    g.sagas(_ONE_STEP)
    runner = w.sagas(_ONE_STEP)
    sid = await runner.start({})
    await asyncio.wait_for(gate.entered.wait(), WAIT)
    await asyncio.sleep(0.3)  # G has seen the saga start and is driving it
    gate.release.set()
    state = await runner.wait(sid, timeout=WAIT)
    assert state["status"] == "completed"
    assert gate.runs == 1
    assert await read_all(w, "svc.credit.reserve") == []
    w.events.drop_cached()
    led = await ledger(w, "credit")
    assert led.available == 9 and led.held == {sid: 1}


async def test_after_an_attempt_went_out_as_a_message_the_step_stays_on_messages(
        env: Env, sqlite_url: str) -> None:
    # attempt 1 goes out as a message (no inline handler yet) and takes effect, but its
    # reply is late; a coordinator with the inline handler then retries: the retry must
    # meet the service's inbox (same idempotency key), not run inline a second time
    first = await env.hub(sqlite_url)
    await seed(first, "credit", 10)
    defn = Saga("inline-late", [Step("credit", command="svc.credit.reserve", timeout=0.5,
                                     retries=3, backoff=0.01)])
    sid = await first.sagas(defn).start({})
    await env.close(first)  # the command is stored; nobody has handled it yet
    svc = await env.hub(sqlite_url)  # the service alone handles it...
    ledger_service(svc, "credit", "credit")
    env.serve(svc)
    await until(lambda: _available(svc, 9))
    # ...and its reply goes to the first coordinator's own topic, which nobody reads now
    await until(lambda: _replied(svc, "saga.inline-late.replies.>"))
    await env.close(svc)
    await asyncio.sleep(0.5)  # attempt 1's deadline passes
    assert (await ledger(await env.hub(sqlite_url), "credit")).available == 9
    second = await env.hub(sqlite_url)
    ledger_service(second, "credit", "credit", inline=True)
    env.serve(second)
    state = await second.sagas(defn).wait(sid, timeout=WAIT)
    assert state["status"] == "completed"
    second.events.drop_cached()
    led = await ledger(second, "credit")
    assert led.available == 9 and led.held == {sid: 1}  # once, not twice
    events = [rec.event async for rec in second.events.read(f"saga-inline-late-{sid}")]
    started = [e for e in events if type(e).__name__ == "StepStarted"]
    assert len(started) >= 2 and not any(e.inline for e in started)  # retried as messages


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


async def test_a_unit_never_waits_for_a_handler_slot_while_holding_a_stream(
        env: Env, url: str) -> None:
    # saga 1 holds X (step a) and needs handler b next; saga 2 holds b's only slot and
    # needs X: saga 1 must commit and let X go instead of waiting for the slot
    hub = await env.hub(url)
    await seed(hub, "X", 100)
    entered = asyncio.Event()

    @hub.handler("svc.a", inline=True)
    async def a(cmd: tidings.Command) -> dict[str, Any]:
        led = await ledger(hub, "X")
        led.record(SgReserved(saga=cmd.data["saga_id"] + ":a", amount=1))
        cmd.save(led)
        entered.set()
        await asyncio.sleep(0.1)  # saga 2 takes b's slot meanwhile
        return {}

    @hub.handler("svc.b", inline=True)  # concurrency 1
    async def b(cmd: tidings.Command) -> dict[str, Any]:
        led = await ledger(hub, "X")
        led.record(SgReserved(saga=cmd.data["saga_id"] + ":b", amount=1))
        cmd.save(led)
        return {}

    one = hub.sagas(Saga("slot-1", [Step("a", command="svc.a", timeout=10),
                                     Step("b", command="svc.b", timeout=10)]))
    two = hub.sagas(Saga("slot-2", [Step("b", command="svc.b", timeout=10)]))
    id1 = await one.start({})
    await asyncio.wait_for(entered.wait(), WAIT)
    id2 = await two.start({})
    r1, r2 = await asyncio.gather(one.wait(id1, timeout=5.0), two.wait(id2, timeout=5.0))
    assert r1["status"] == r2["status"] == "completed"  # not a timeout, not compensated
    assert not [s for s in r1["steps"] + r2["steps"] if s["event"] == "StepFailed"]
    assert (await ledger(hub, "X")).available == 97


async def test_a_task_started_by_an_inline_handler_takes_no_lock_after_the_unit(
        env: Env) -> None:
    hub = await env.hub("memory://")
    await seed(hub, "X", 100)
    await seed(hub, "Y", 100)
    background: list[asyncio.Task[None]] = []

    @hub.handler("svc.r", inline=True, concurrency=8)
    async def r(cmd: tidings.Command) -> dict[str, Any]:
        led = await ledger(hub, cmd.data["lid"])
        led.record(SgReserved(saga=cmd.data["saga_id"], amount=1))
        cmd.save(led)

        async def later() -> None:  # a fire-and-forget refresh, after the unit committed
            await asyncio.sleep(0.05)
            await ledger(hub, "Y")
            await asyncio.sleep(30)

        background.append(asyncio.create_task(later()))
        return {}

    runner = hub.sagas(Saga("leak", [Step("r", command="svc.r", timeout=10)]))
    first = await runner.wait(await runner.start({"lid": "X"}), timeout=WAIT)
    assert first["status"] == "completed"
    await asyncio.sleep(0.2)
    # nothing held, nobody waiting: no lock left behind
    assert not hub.extension(StreamLocks, StreamLocks).by_id
    second = await runner.wait(await runner.start({"lid": "Y"}), timeout=5.0)
    assert second["status"] == "completed"
    for t in background:
        t.cancel()
    await asyncio.gather(*background, return_exceptions=True)


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "messages"])
async def test_wait_and_get_tell_the_same_story(env: Env, url: str, inline: bool) -> None:
    # wait() answers from the driver's own state (no read): it must be what get() loads,
    # times included, whatever the coordinator's clock says
    hub = await env.hub(url)
    await seed(hub, "credit", 5)
    await seed(hub, "stock", 1)
    ledger_service(hub, "credit", "credit", inline=inline)
    ledger_service(hub, "stock", "stock", inline=inline)
    env.serve(hub)
    runner = hub.sagas(_race_saga([]), clock=ManualClock())
    for expected in ("completed", "compensated"):  # the second finds no stock left
        sid = await runner.start({"amount": 1})
        waited = await runner.wait(sid, timeout=WAIT)
        assert waited["status"] == expected
        assert waited == await runner.get(sid)
        assert waited["started"] > 1e9  # the store's time, not the manual clock's


async def test_contention_is_not_a_failure_a_handler_can_catch(env: Env, url: str) -> None:
    # a handler that turns every Exception into a rejection must not compensate a saga
    # just because another saga held a stream for a moment
    hub = await env.hub(url)
    await seed(hub, "X", 100)
    await seed(hub, "Y", 100)

    @hub.handler("svc.both", inline=True)
    async def both(cmd: tidings.Command) -> dict[str, Any]:
        try:
            first, second = ("X", "Y") if cmd.data["order"] == "xy" else ("Y", "X")
            a = await ledger(hub, first)
            await asyncio.sleep(0.03)  # long enough for the other saga to take its first
            b = await ledger(hub, second)
        except Exception as exc:  # noqa: BLE001 - the point of the test
            raise Rejected(f"could not load: {exc!r}") from None
        for led in (a, b):
            led.record(SgReserved(saga=cmd.data["saga_id"], amount=1))
        cmd.save(a, b)
        return {}

    runner = hub.sagas(Saga("contend", [Step("both", command="svc.both", timeout=10)]))
    ids = [await runner.start({"order": o}) for o in ("xy", "yx", "xy", "yx")]
    states = await asyncio.gather(*(runner.wait(i, timeout=WAIT) for i in ids))
    assert [s["status"] for s in states] == ["completed"] * 4
    assert (await ledger(hub, "X")).available == (await ledger(hub, "Y")).available == 96


# a saga's start runs its first inline steps itself ----------------------------------------
async def test_inline_steps_that_never_wait_finish_within_start(env: Env, url: str) -> None:
    hub = await env.hub(url)
    await seed(hub, "credit", 10)
    await seed(hub, "stock", 10)
    calls: list[str] = []
    ledger_service(hub, "credit", "credit", inline=True, calls=calls)
    ledger_service(hub, "stock", "stock", inline=True)
    runner = hub.sagas(_race_saga([]))
    sid = await runner.start({"amount": 2})
    if not url.startswith("postgresql"):  # (there every load waits for the server)
        # start() itself ran both steps and committed them with the start (the last, a
        # local action, is the driver's)
        state = await runner.get(sid)
        done = [s["step"] for s in state["steps"] if s["event"] == "StepCompleted"]
        assert done[:2] == [0, 1] and calls == [sid]
        assert len({s["time"] for s in state["steps"][:5]}) == 1  # one transaction
    final = await runner.wait(sid, timeout=WAIT)
    assert final["status"] == "completed" and final == await runner.get(sid)
    assert (await ledger(hub, "credit")).available == 8
    # started again under its id: a no-op that runs no handler
    assert await runner.start({"amount": 2}, id=sid) == sid
    assert calls == [sid]


async def test_a_handler_that_waits_is_finished_by_the_driver_and_runs_once(
        env: Env, url: str) -> None:
    hub = await env.hub(url)
    await seed(hub, "credit", 10)
    runs: list[str] = []
    release = asyncio.Event()

    @hub.handler("svc.slow.reserve", inline=True)
    async def reserve(cmd: tidings.Command) -> dict[str, Any]:
        runs.append("began")
        led = await ledger(hub, "credit")
        led.record(SgReserved(saga=cmd.data["saga_id"], amount=1))
        cmd.save(led)
        await release.wait()  # waits: start() must not wait for it
        runs.append("ended")
        return {"slow": True}

    runner = hub.sagas(Saga("inline-slow-start", [
        Step("slow", command="svc.slow.reserve", timeout=30)]))
    sid = await asyncio.wait_for(runner.start({}), WAIT)  # returns while it waits
    await asyncio.sleep(0.05)
    assert runs == ["began"]
    state = await runner.get(sid)
    assert state["status"] == "running"
    assert [s["event"] for s in state["steps"]] == ["SagaStarted", "StepStarted"]
    release.set()
    final = await runner.wait(sid, timeout=WAIT)
    assert final["status"] == "completed" and final["data"]["slow"] is True
    assert runs == ["began", "ended"]  # the one run, finished by the driver: not run twice
    assert (await ledger(hub, "credit")).available == 9


async def test_a_begun_handler_cut_off_by_a_close_runs_again_after_restart(
        env: Env, sqlite_url: str) -> None:
    first = await env.hub(sqlite_url)
    await seed(first, "credit", 5)
    seen: list[str] = []

    @first.handler("svc.credit.reserve", inline=True)
    async def stuck(cmd: tidings.Command) -> dict[str, Any]:
        led = await ledger(first, "credit")
        led.record(SgReserved(saga=cmd.data["saga_id"], amount=1))
        cmd.save(led)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("called off")
            raise
        return {}

    sid = await first.sagas(_ONE_STEP).start({})
    await env.close(first)  # its driver goes away with the handler still waiting
    assert seen == ["called off"]
    second = await env.hub(sqlite_url)
    ledger_service(second, "credit", "credit", inline=True)
    state = await second.sagas(_ONE_STEP).wait(sid, timeout=WAIT)
    assert state["status"] == "completed"
    led = await ledger(second, "credit")
    assert led.held == {sid: 1} and led.available == 4  # once: the cut-off run stored nothing


async def test_a_start_waiting_for_a_held_aggregate_still_commits_in_one_go(
        env: Env, sqlite_url: str) -> None:
    # Ten sagas on one ledger at once: each start's unit waits for the one before it to
    # commit (the ledger is held meanwhile) — a wait start() sits out, so each saga is
    # still one transaction: its start and its steps.
    hub = await env.hub(sqlite_url)
    await seed(hub, "credit", 100)
    await seed(hub, "stock", 100)
    ledger_service(hub, "credit", "credit", inline=True)
    ledger_service(hub, "stock", "stock", inline=True)
    runner = hub.sagas(_race_saga([]))
    ids = await asyncio.gather(*(runner.start({"amount": 1}) for _ in range(10)))
    for sid in ids:
        state = await runner.wait(sid, timeout=WAIT)
        assert state["status"] == "completed"
        steps = state["steps"]
        assert [s["event"] for s in steps[:5]] == [
            "SagaStarted", "StepStarted", "StepCompleted", "StepStarted", "StepCompleted"]
        assert len({s["time"] for s in steps[:5]}) == 1, steps  # one transaction
    assert (await ledger(hub, "credit")).available == 90


# a start's first unit: the edges a review found ---------------------------------------------
async def test_a_unit_meeting_another_writer_on_an_aggregate_runs_again(
        env: Env, sqlite_url: str) -> None:
    # Five sagas create the same (missing) ledger at once: streams that do not exist are
    # not held, so all but one unit meet a conflict on commit. That is not "started
    # before": each start is stored, and its step runs again.
    hub = await env.hub(sqlite_url)
    ledger_service(hub, "credit", "credit", inline=True)  # loads or creates the ledger
    runner = hub.sagas(Saga("create-race", [
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release")]))
    ids = await asyncio.gather(*(runner.start({"amount": 0}, id=f"o-{i}") for i in range(5)))
    for sid in ids:
        assert (await runner.wait(sid, timeout=WAIT))["status"] == "completed"


async def test_the_same_id_in_two_sagas_is_two_sagas(env: Env, url: str) -> None:
    hub = await env.hub(url)
    await seed(hub, "credit", 10)
    ledger_service(hub, "credit", "credit", inline=True)
    steps = [Step("credit", command="svc.credit.reserve", compensation="svc.credit.release")]
    a, b = hub.sagas(Saga("two-a", steps)), hub.sagas(Saga("two-b", steps))
    await a.start({"amount": 1}, id="order-1")
    assert (await a.wait("order-1", timeout=WAIT))["status"] == "completed"
    await b.start({"amount": 20}, id="order-1")  # more than is left: compensated
    waited = await b.wait("order-1", timeout=WAIT)
    assert waited["status"] == "compensated" and waited["saga"] == "two-b"
    assert waited == await b.get("order-1")


async def test_a_saga_started_from_inside_an_inline_handler_does_not_wait_for_it(
        env: Env) -> None:
    # The parent's unit holds the ledger; the child it starts needs the same ledger. The
    # child's start must not sit out that wait (the parent waits for the start).
    hub = await env.hub("memory://")
    await seed(hub, "credit", 10)
    ledger_service(hub, "credit", "credit", inline=True)
    child = hub.sagas(Saga("child", [
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release")]))

    @hub.handler("svc.parent.do", inline=True)
    async def do(cmd: tidings.Command) -> dict[str, Any]:
        led = await ledger(hub, "credit")  # held by this unit from here on
        led.record(SgReserved(saga=cmd.data["saga_id"], amount=1))
        cmd.save(led)
        return {"child": await child.start({"amount": 1})}

    parent = hub.sagas(Saga("parent", [Step("do", command="svc.parent.do", timeout=30)]))
    state = await parent.wait(await parent.start({}), timeout=WAIT)
    assert state["status"] == "completed"
    kid = await child.wait(state["data"]["child"], timeout=WAIT)
    assert kid["status"] == "completed"
    assert (await ledger(hub, "credit")).available == 8


async def test_a_start_retried_after_its_caller_gave_up_is_stored_and_driven(
        env: Env) -> None:
    hub = await env.hub("memory://")
    runs: list[int] = []

    @hub.handler("svc.slow", inline=True)
    async def slow(cmd: tidings.Command) -> dict[str, Any]:
        runs.append(1)
        await asyncio.sleep(0.1)
        return {}

    runner = hub.sagas(Saga("retried", [Step("x", command="svc.slow", timeout=30)]))
    first = asyncio.create_task(runner.start({}, id="dup"))
    await asyncio.sleep(0)  # inside start(), its driver's handler waiting
    first.cancel()  # the caller timed out
    await asyncio.gather(first, return_exceptions=True)
    assert await runner.start({}, id="dup") == "dup"  # the retry
    assert (await runner.wait("dup", timeout=WAIT))["status"] == "completed"


@pytest.mark.parametrize("seed_", [1, 2])
async def test_racing_and_abandoned_starts_never_lose_a_saga(
        env: Env, url: str, seed_: int) -> None:
    # Starts under a few ids at once, their handlers waiting or not, rejecting or
    # failing, their callers giving up at random moments: every start that returned is
    # stored and ends; every one stored ends; the ledgers hold exactly what the
    # completed sagas took. (Two review rounds found lost sagas here.)
    import random

    rnd = random.Random(seed_)
    hub = await env.hub(url)
    await seed(hub, "credit", 1000)
    await seed(hub, "stock", 20)
    modes = ["plain", "plain", "yield", "sleep", "reject", "raise"]

    async def chaos(cmd: tidings.Command) -> None:
        mode = cmd.data[cmd.name.split(".")[1]]  # this service's mode for this saga
        if mode == "yield":
            await asyncio.sleep(0)
        elif mode == "sleep":
            await asyncio.sleep(rnd.random() * 0.01)
        elif mode == "raise":
            raise RuntimeError("boom")
        elif mode == "reject":
            raise Rejected("no")

    ledger_service(hub, "credit", "credit", inline=True, before=chaos)
    ledger_service(hub, "stock", "stock", inline=True, before=chaos)
    runner = hub.sagas(Saga("fuzz", [
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release",
             timeout=30, retries=1, backoff=0.01),
        Step("stock", command="svc.stock.reserve", compensation="svc.stock.release",
             timeout=30, retries=1, backoff=0.01)]))
    returned: set[str] = set()

    async def one() -> None:
        sid = f"s{rnd.randrange(40)}"
        data = {"credit": rnd.choice(modes), "stock": rnd.choice(modes)}
        task = asyncio.create_task(runner.start(data, id=sid))
        if rnd.random() < 0.4:  # the caller gives up
            for _ in range(rnd.randrange(4)):
                await asyncio.sleep(0)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
            returned.add(sid)

    await asyncio.gather(*(one() for _ in range(80)))
    completed = set()
    for i in range(40):
        sid = f"s{i}"
        if not await hub.events.backend.stream_version(f"saga-fuzz-{sid}"):
            assert sid not in returned, f"{sid}: start() returned, nothing stored"
            continue
        state = await runner.wait(sid, timeout=WAIT)
        assert state["status"] in ("completed", "compensated"), (sid, state["status"])
        if state["status"] == "completed":
            completed.add(sid)
    hub.events.drop_cached()
    for name, units in (("credit", 1000), ("stock", 20)):
        led = await ledger(hub, name)
        assert set(led.held) == completed and led.available + len(led.held) == units
