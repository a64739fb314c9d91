"""Coordinators of several processes sharing one database (two hubs on one SQLite file).

Replies go to the shared durable group `saga-coordinator`, so a coordinator may take a
reply for a saga another hub drives, drive that saga on and end it; the other hub's
driver must then end too (it learns from the end marker's stream version), not wait
for the reply until the step's deadline. A saga another hub started is left to its
starter: taken on here only if still unfinished `FOREIGN_GRACE` seconds later.

Every coordinator runs on a ManualClock: a deadline or the grace passes only when
the test moves that clock.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import tidings
from tidings import ManualClock, Saga, Step
from tidings.saga.coordinator import FOREIGN_GRACE, Coordinator
from tidings.saga.definition import SagaCompleted
from tidings.saga.moves import stream_id
from tidings.saga.runner import SagaRunner

from .test_coordinator import WAIT, Env, Gate, Log, read_all, until

T0 = 1_000_000.0


def coordinator(runner: SagaRunner) -> Coordinator:
    return runner._c


def following(name: str) -> bool:
    """Whether a coordinator follows `saga.<name>.started` past its start-up read (the
    task taking on other processes' sagas runs from then on): a start stored now is
    seen as another process's, not resumed as found unfinished at start-up."""
    return any(t.get_name() == f"tidings:saga:{name}:adopt" and not t.done()
               for t in asyncio.all_tasks())


async def stream_events(hub: tidings.Hub, name: str, saga_id: str) -> list[Any]:
    return [rec.event async for rec in hub.events.read(stream_id(name, saga_id))]


async def test_a_driver_whose_reply_another_coordinator_took_ends_when_that_one_ends_the_saga(
        env: Env, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_a = await env.hub(sqlite_url)
    hub_b = await env.hub(sqlite_url)

    # A's coordinator takes no reply: B's takes every one (as when it wins the race for
    # them in the shared group), so A's driver never gets the reply it waits for.
    replies = Coordinator._replies

    async def replies_not_on_a(self: Coordinator, name: str, lease: float) -> None:
        if self.hub is not hub_a:
            await replies(self, name, lease)

    monkeypatch.setattr(Coordinator, "_replies", replies_not_on_a)

    answer = asyncio.Event()
    served: list[str] = []

    @hub_b.handler("svc.shared.do")
    async def do(cmd: tidings.Command[Any]) -> dict[str, Any]:
        await answer.wait()  # until A's driver waits for the reply
        served.append(cmd.data["saga_id"])
        return {"done": True}

    env.serve(hub_b)
    log = Log()
    defn = Saga("shared", [
        Step("ask", command="svc.shared.do", timeout=60.0),
        Step("after", action=log.action("after")),
    ])
    clock_a, clock_b = ManualClock(T0), ManualClock(T0)  # never moved
    runner_b = hub_b.sagas(defn, clock=clock_b)
    await until(lambda: following(defn.name), "B's coordinator following started sagas")
    runner_a = hub_a.sagas(defn, clock=clock_a)
    sid = await runner_a.start({})
    sid_stream = stream_id(defn.name, sid)

    # A's driver waits for the reply until T0 + 60; B saw another hub's start and leaves
    # it to its starter for the grace (it never passes: B's clock does not move)
    await until(lambda: clock_a.sleepers == 1, "A's driver waiting for the reply")
    await until(lambda: clock_b.sleepers == 1, "B's coordinator waiting out the grace")
    assert sid_stream in coordinator(runner_a)._runs
    assert sid_stream not in coordinator(runner_b)._runs

    answer.set()  # the reply goes to B's coordinator, which drives the saga to its end
    try:
        state = await runner_a.wait(sid, timeout=WAIT)
    except TimeoutError:
        pytest.fail("A's driver still waits for the reply B's coordinator took and used")
    assert state["status"] == "completed"
    assert state["data"] == {"done": True}
    assert clock_a.now() == T0 and clock_b.now() == T0  # no deadline passed
    assert sid_stream not in coordinator(runner_a)._runs  # A's driver ended
    assert served == [sid] and log.names(sid) == ["after"]
    events = await stream_events(hub_a, defn.name, sid)
    assert sum(isinstance(ev, SagaCompleted) for ev in events) == 1
    assert type(events[-1]).__name__ == "SagaCompleted"  # nothing written after its end
    assert len(await read_all(hub_a, f"saga.{defn.name}.ended")) == 1
    assert (await runner_b.get(sid))["status"] == "completed"


async def test_a_saga_another_hub_started_is_driven_here_only_after_the_grace_if_unfinished(
        env: Env, sqlite_url: str) -> None:
    hub_a = await env.hub(sqlite_url)
    hub_b = await env.hub(sqlite_url)
    gate = Gate()
    log = Log()
    defn = Saga("adopted", [
        Step("hold", action=gate),
        Step("finish", action=log.action("finish")),
    ])
    clock_b = ManualClock(T0)
    runner_b = hub_b.sagas(defn, clock=clock_b)
    await until(lambda: following(defn.name), "B's coordinator following started sagas")
    runner_a = hub_a.sagas(defn, clock=ManualClock(T0))
    sid = await runner_a.start({})
    sid_stream = stream_id(defn.name, sid)
    await asyncio.wait_for(gate.entered.wait(), WAIT)
    await env.close(hub_a)  # its starter dies mid-step: nobody drives it now
    gate.release.set()  # the step passes when it is run again
    assert gate.calls == [sid]

    runs_b = coordinator(runner_b)._runs
    version = 2  # SagaStarted, StepStarted

    async def seen_by_b() -> bool:  # (or driven: then the assertions below say so)
        return (clock_b.sleepers == 1 or sid_stream in runs_b
                or len(await stream_events(hub_b, defn.name, sid)) != version)

    await until(seen_by_b, "B's coordinator seeing A's start")
    assert sid_stream not in runs_b  # not driven here at once
    assert len(await stream_events(hub_b, defn.name, sid)) == version
    assert clock_b.sleepers == 1  # B waits out the grace

    await clock_b.advance(FOREIGN_GRACE - 1)
    await asyncio.sleep(0.1)  # (room for a wrong driver to act)
    assert sid_stream not in runs_b  # not driven here within the grace
    assert len(await stream_events(hub_b, defn.name, sid)) == version  # its stream did not move
    assert gate.calls == [sid] and log.names(sid) == []
    assert (await runner_b.get(sid))["status"] == "running"
    assert clock_b.sleepers == 1  # still waiting out the grace

    await clock_b.advance(2.0)  # past the grace, still unfinished: B takes it on
    state = await runner_b.wait(sid, timeout=WAIT)
    assert state["status"] == "completed"
    assert gate.calls == [sid, sid]  # the step cut off on A ran again here
    assert log.names(sid) == ["finish"]
    events = await stream_events(hub_b, defn.name, sid)
    assert sum(isinstance(ev, SagaCompleted) for ev in events) == 1
    assert len(await read_all(hub_b, f"saga.{defn.name}.ended")) == 1
