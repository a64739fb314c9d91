"""A saga command that arrives after its saga gave up on the step changes nothing.

The money leak these tests pin: a service holds a command (slow, or its process
died holding it), the saga times out and compensates (nothing to release yet),
then the command runs anyway — and the credit stays reserved for ever. The
compensation (or, for a step without a command compensation, the coordinator)
fences the command's inbox, so whichever of the two commits second loses.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import tidings
from tidings import ManualClock, Saga, Step
from tidings.saga.handlers import InboxRecorded

from .test_coordinator import (
    WAIT,
    Env,
    SgReleased,
    SgReserved,
    events_of,
    has_event,
    history,
    ledger,
    ledger_service,
    seed,
    status_is,
    until,
)


async def inbox_of(hub: tidings.Hub, command: str, key: str) -> InboxRecorded | None:
    async for rec in hub.events.read(f"inbox-{command}-{key}"):  # the service's inbox
        assert isinstance(rec.event, InboxRecorded)
        return rec.event
    return None


def credit_saga(name: str, undo: str, undone: list[str], *, retries: int = 0) -> Saga:
    """One command step on the credit ledger, undone by a command, a local action or
    nothing; then a step that always fails, so the saga compensates."""

    async def release_here(data: dict[str, Any]) -> None:
        undone.append(data["saga_id"])

    async def fail(data: dict[str, Any]) -> None:
        raise tidings.Rejected("the order is refused")

    compensation: Any = {"command": "svc.credit.release", "local": release_here,
                         "none": None}[undo]
    return Saga(name, [
        Step("credit", command="svc.credit.reserve", compensation=compensation,
             timeout=5.0, retries=retries),
        Step("refuse", action=fail),
    ])


@pytest.mark.parametrize("undo", ["command", "local", "none"])
async def test_a_command_still_running_when_its_saga_compensates_changes_nothing(
        env: Env, url: str, undo: str) -> None:
    """The handler is inside the command when the step times out and the saga
    compensates; when it finishes, its commit meets the fence and is void."""
    hub = await env.hub(url)
    await seed(hub, "credit", 100)
    entered, go_on = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    async def hold_first(cmd: tidings.Command) -> None:
        runs.append(cmd.data["saga_id"])
        if len(runs) == 1:
            entered.set()
            await go_on.wait()

    ledger_service(hub, "credit", "credit", concurrency=2, before=hold_first)
    env.serve(hub)
    clock = ManualClock()
    undone: list[str] = []
    runner = hub.sagas(credit_saga(f"late-{undo}", undo, undone), clock=clock)
    sid = await runner.start({"amount": 30})
    await asyncio.wait_for(entered.wait(), WAIT)
    await clock.advance(5.0)  # no reply in time: the step may yet take effect
    state = await status_is(runner, sid, "compensated")
    assert events_of(state["steps"], "StepFailed", step=0)
    if undo == "local":
        assert undone == [sid]
    fence = await inbox_of(hub, "svc.credit.reserve", f"{sid}:credit:action")
    assert fence is not None and fence.status == "fenced"
    go_on.set()  # the command finishes now: too late
    await until(lambda: has_event(runner, sid, "ReplyIgnored"), "the late reply")
    [ignored] = events_of(await history(runner, sid), "ReplyIgnored")
    assert (ignored["step"], ignored["kind"]) == (0, "action")
    led = await ledger(hub, "credit")
    assert led.available == 100 and led.held == {}, "a late command kept its credit"
    assert runs == [sid]  # it ran once; its commit lost to the fence, so it did not run again
    assert (await runner.get(sid))["status"] == "compensated"


async def test_a_command_delivered_after_its_saga_compensated_never_runs(
        env: Env, sqlite_url: str) -> None:
    """The service was down until after the saga compensated (a process that died
    holding the command, its lease expired): the command is refused unrun."""
    coordinator = await env.hub(sqlite_url)
    await seed(coordinator, "credit", 100)
    ran: list[str] = []

    @coordinator.handler("svc.credit.release")
    async def release(cmd: tidings.Command) -> dict[str, Any]:
        led = await ledger(coordinator, "credit")
        assert cmd.data["saga_id"] not in led.held  # the command has not run
        return {}

    env.serve(coordinator)
    clock = ManualClock()
    runner = coordinator.sagas(credit_saga("down", "command", []), clock=clock)
    sid = await runner.start({"amount": 30})
    await until(lambda: has_event(runner, sid, "StepStarted"), "the command sent")
    await clock.advance(5.0)
    await status_is(runner, sid, "compensated")
    # the service comes back and gets the command now
    service = await env.hub(sqlite_url)

    async def count(cmd: tidings.Command) -> None:
        ran.append(cmd.data["saga_id"])

    ledger_service(service, "credit", "credit", before=count)
    env.serve(service)
    await until(lambda: has_event(runner, sid, "ReplyIgnored"), "the refused command's reply")
    assert ran == []  # the handler function never ran
    led = await ledger(service, "credit")
    assert led.available == 100 and led.held == {}
    replies = [m async for m in coordinator.read("saga.down.replies.>")]
    assert [r.headers["status"] for r in replies] == ["ok", "rejected"]  # release; refused
    assert "fenced" in replies[-1].headers["error"]


async def test_a_command_that_commits_while_its_compensation_runs_is_undone(
        env: Env, url: str) -> None:
    """The other order: the late command commits after the compensation looked (and
    found nothing) but before it committed. The compensation's fence conflicts, so it
    runs again, finds the reservation and releases it."""
    hub = await env.hub(url)
    await seed(hub, "credit", 100)
    reserve_in, reserve_go = asyncio.Event(), asyncio.Event()
    release_in, release_go = asyncio.Event(), asyncio.Event()
    releases: list[bool] = []

    @hub.handler("svc.credit.reserve")
    async def reserve(cmd: tidings.Command) -> dict[str, Any]:
        reserve_in.set()
        await reserve_go.wait()
        led = await ledger(hub, "credit")
        led.record(SgReserved(saga=cmd.data["saga_id"], amount=30))
        cmd.save(led)
        return {}

    @hub.handler("svc.credit.release")
    async def release(cmd: tidings.Command) -> dict[str, Any]:
        led = await ledger(hub, "credit")  # looked: nothing to release yet
        release_in.set()
        await release_go.wait()
        releases.append(cmd.data["saga_id"] in led.held)
        if cmd.data["saga_id"] in led.held:
            led.record(SgReleased(saga=cmd.data["saga_id"]))
            cmd.save(led)
        return {}

    env.serve(hub)
    clock = ManualClock()
    runner = hub.sagas(credit_saga("race", "command", []), clock=clock)
    sid = await runner.start({})
    await asyncio.wait_for(reserve_in.wait(), WAIT)
    await clock.advance(5.0)  # timed out: compensating
    await asyncio.wait_for(release_in.wait(), WAIT)  # the release looked: nothing ran yet
    reserve_go.set()  # the late command commits first
    stored = f"{sid}:credit:action"
    await until(lambda: _is_ok(hub, stored), "the late command committed")
    assert (await ledger(hub, "credit")).held == {sid: 30}
    release_go.set()
    await status_is(runner, sid, "compensated")
    led = await ledger(hub, "credit")
    assert led.available == 100 and led.held == {}
    assert releases == [False, True]  # its first run met the fence's conflict; ran again


async def _is_ok(hub: tidings.Hub, key: str) -> bool:
    rec = await inbox_of(hub, "svc.credit.reserve", key)
    return rec is not None and rec.status == "ok"
