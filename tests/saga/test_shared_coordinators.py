"""Coordinators of several processes sharing one database (two hubs on one SQLite file).

A command's reply comes back to the coordinator that sent it (its own reply topic), so
each hub drives the sagas it started. A saga another hub started is left to its
starter: taken on here only if still unfinished `FOREIGN_GRACE` seconds later; the
attempt in flight is then asked again, its reply coming here. When another coordinator
ends a saga a driver here waits on, that driver ends too (it learns from the end
marker's stream version) rather than wait for a reply until the step's deadline.

Every coordinator runs on a ManualClock: a deadline or the grace passes only when
the test moves that clock.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import tidings
from tidings import ManualClock, Saga, Step
from tidings.saga.coordinator import FOREIGN_GRACE, REPLY_SLOTS, Coordinator
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


@pytest.mark.parametrize("slots", ["their own", "one for both"])
async def test_replies_come_back_to_the_coordinator_that_sent_the_command(
        env: Env, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, slots: str) -> None:
    hub_a = await env.hub(sqlite_url)
    hub_b = await env.hub(sqlite_url)
    driven: list[tuple[str, str]] = []  # (the hub that drove it, saga id)
    drive = Coordinator.drive

    def recorded(self: Coordinator, name: str, saga_id: str, *args: Any, **kw: Any) -> Any:
        if stream_id(name, saga_id) not in self._runs:
            driven.append(("a" if self.hub is hub_a else "b", saga_id))
        return drive(self, name, saga_id, *args, **kw)

    monkeypatch.setattr(Coordinator, "drive", recorded)
    for hub in (hub_a, hub_b):  # each hub serves the commands too: either may run one
        @hub.handler("svc.shared.do", concurrency=4)
        async def do(cmd: tidings.Command[Any]) -> dict[str, Any]:
            return {"n": cmd.data["n"]}

        env.serve(hub)
    defn = Saga("affine", [Step("one", command="svc.shared.do", timeout=60.0),
                           Step("two", command="svc.shared.do", timeout=60.0),
                           Step("three", command="svc.shared.do", timeout=60.0)])
    runner_a = hub_a.sagas(defn, clock=ManualClock(T0))  # (never moved: no grace passes)
    runner_b = hub_b.sagas(defn, clock=ManualClock(T0))
    if slots == "one for both":  # (as two coordinators' ids may choose): one reply topic
        coordinator(runner_a).slot = coordinator(runner_b).slot = 3
    else:
        coordinator(runner_b).slot = (coordinator(runner_a).slot + 1) % REPLY_SLOTS
    await until(lambda: following(defn.name), "the coordinators following started sagas")
    ids = {"a": [await runner_a.start({"n": i}) for i in range(10)],
           "b": [await runner_b.start({"n": i}) for i in range(10)]}
    for runner, mine in ((runner_a, ids["a"]), (runner_b, ids["b"])):
        for sid in mine:
            assert (await runner.wait(sid, timeout=WAIT))["status"] == "completed"
    # every saga driven only by its starter: no reply took it to the other hub
    assert sorted(driven) == sorted((h, sid) for h, mine in ids.items() for sid in mine)
    replies = await read_all(hub_a, "saga.affine.replies.>")
    assert len(replies) == 60  # three steps each, one reply per command: nothing asked again
    mine_a = set(ids["a"])
    senders = {("a" if r.headers["saga-id"] in mine_a else "b", r.headers["saga-coordinator"],
                r.topic) for r in replies}
    assert senders == {(h, coordinator(r).instance, coordinator(r).reply_topic("affine"))
                       for h, r in (("a", runner_a), ("b", runner_b))}


async def test_a_driver_whose_saga_another_coordinator_ended_ends_too(
        env: Env, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_a = await env.hub(sqlite_url)
    hub_b = await env.hub(sqlite_url)

    # A's coordinator hears no reply (a process too slow to read them): its driver waits
    # for one until the step's deadline, unless it hears that the saga moved on.
    take = Coordinator._take_reply

    async def deaf_a(self: Coordinator, *args: Any) -> bool:
        return True if self.hub is hub_a else await take(self, *args)

    monkeypatch.setattr(Coordinator, "_take_reply", deaf_a)
    served: list[str] = []

    @hub_b.handler("svc.shared.do")
    async def do(cmd: tidings.Command[Any]) -> dict[str, Any]:
        served.append(cmd.data["saga_id"])
        return {"done": True}

    env.serve(hub_b)
    log = Log()
    defn = Saga("shared", [
        Step("ask", command="svc.shared.do", timeout=60.0),
        Step("after", action=log.action("after")),
    ])
    clock_a, clock_b = ManualClock(T0), ManualClock(T0)  # A's never moves
    runner_b = hub_b.sagas(defn, clock=clock_b)
    await until(lambda: following(defn.name), "B's coordinator following started sagas")
    runner_a = hub_a.sagas(defn, clock=clock_a)
    sid = await runner_a.start({})
    sid_stream = stream_id(defn.name, sid)

    # A's driver waits for the reply until T0 + 60; B saw another hub's start and leaves
    # it to its starter for the grace
    await until(lambda: clock_a.sleepers == 1, "A's driver waiting for the reply")
    await until(lambda: clock_b.sleepers == 1, "B's coordinator waiting out the grace")
    await until(lambda: served == [sid], "the command handled (its reply unheard by A)")
    assert sid_stream in coordinator(runner_a)._runs
    assert sid_stream not in coordinator(runner_b)._runs

    # past the grace B takes the saga up: it asks the attempt again (the service's inbox
    # answers with the stored reply, to B) and drives the saga to its end
    await clock_b.advance(FOREIGN_GRACE + 1)
    try:
        state = await runner_a.wait(sid, timeout=WAIT)
    except TimeoutError:
        pytest.fail("A's driver still waits for a reply, after B ended the saga")
    assert state["status"] == "completed"
    assert state["data"] == {"done": True}
    assert clock_a.now() == T0  # no deadline passed
    assert sid_stream not in coordinator(runner_a)._runs  # A's driver ended
    assert served == [sid] and log.names(sid) == ["after"]  # the command ran once
    asked = await read_all(hub_a, "svc.shared.do")
    assert [m.id.count(":") for m in asked] == [3, 4]  # sent by A, then asked again by B
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


async def test_a_saga_another_hub_ended_within_the_grace_is_not_read_when_it_passes(
        env: Env, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_a = await env.hub(sqlite_url)
    hub_b = await env.hub(sqlite_url)
    loaded: list[str] = []
    load = Coordinator.load

    async def counted(self: Coordinator, name: str, saga_id: str) -> Any:
        if self.hub is hub_b:
            loaded.append(saga_id)
        return await load(self, name, saga_id)

    monkeypatch.setattr(Coordinator, "load", counted)
    gate = Gate()
    defn = Saga("brief", [Step("hold", action=gate)])
    clock_b = ManualClock(T0)
    runner_b = hub_b.sagas(defn, clock=clock_b)
    await until(lambda: following(defn.name), "B's coordinator following started sagas")
    runner_a = hub_a.sagas(defn, clock=ManualClock(T0))
    sid = await runner_a.start({})
    await until(lambda: clock_b.sleepers == 1, "B's coordinator waiting out the grace")
    gate.release.set()  # A ends its saga within the grace
    assert (await runner_a.wait(sid, timeout=WAIT))["status"] == "completed"
    await until(lambda: stream_id(defn.name, sid) not in coordinator(runner_b)._foreign,
                "B's coordinator seeing the end")
    await clock_b.advance(FOREIGN_GRACE + 1)
    await asyncio.sleep(0.1)  # (room for a wrong read)
    assert loaded == []  # B had seen it end: nothing to read when the grace passed
    assert stream_id(defn.name, sid) not in coordinator(runner_b)._runs


async def test_a_second_driver_gets_the_reply_when_the_first_is_gone(
        env: Env, sqlite_url: str) -> None:
    """A takes a saga up from B after the grace; both drive it. A step B sends after that
    is asked again by A, so when B goes away before its reply comes, A still gets one
    (the reply to B's command goes to B's topic, which nobody reads now)."""
    hub_a = await env.hub(sqlite_url)
    hub_b = await env.hub(sqlite_url)
    services = await env.hub(sqlite_url)
    one_done, two_done = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    @services.handler("svc.pas.one")
    async def one(cmd: tidings.Command[Any]) -> dict[str, Any]:
        ran.append("one")
        await one_done.wait()
        return {"one": 1}

    @services.handler("svc.pas.two")
    async def two(cmd: tidings.Command[Any]) -> dict[str, Any]:
        ran.append("two")
        await two_done.wait()
        return {"two": 2}

    env.serve(services)
    defn = Saga("pas", [Step("one", command="svc.pas.one", timeout=60.0),
                        Step("two", command="svc.pas.two", timeout=60.0)])
    clock_a = ManualClock(T0)
    runner_a = hub_a.sagas(defn, clock=clock_a)
    await until(lambda: following(defn.name), "A's coordinator following started sagas")
    runner_b = hub_b.sagas(defn, clock=ManualClock(T0))  # (never moved)
    sid = await runner_b.start({})
    sid_stream = stream_id(defn.name, sid)
    await until(lambda: ran == ["one"], "step one running (slowly)")
    await until(lambda: clock_a.sleepers == 1, "A's coordinator waiting out the grace")
    await clock_a.advance(FOREIGN_GRACE + 1)  # B is slow: A takes the saga up too
    await until(lambda: sid_stream in coordinator(runner_a)._runs, "A driving it")
    one_done.set()  # B or A records step one and sends step two; the other looks again
    await until(lambda: ran.count("two") >= 1, "step two running")
    await env.close(hub_b)  # B goes away before step two's reply
    two_done.set()
    state = await runner_a.wait(sid, timeout=WAIT)  # A's clock never reaches a deadline
    assert state["status"] == "completed", state.get("reason")
    assert state["data"] == {"one": 1, "two": 2}
    assert ran.count("one") == 1 or ran.count("one") == 2  # (asked again: the inbox answers)
    events = await stream_events(hub_a, defn.name, sid)
    assert sum(type(ev).__name__ == "StepCompleted" for ev in events) == 2
