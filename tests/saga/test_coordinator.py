"""The saga coordinator at run time, on memory:// and SQLite, with a ManualClock.

Timeouts and backoff never wait for real: the tests move the clock. Every
wait on the coordinator has a (generous, real-time) timeout so that a broken
coordinator fails the test quickly instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import tidings
from tidings import ManualClock, Rejected, Saga, Step
from tidings.errors import EngineUnavailable
from tidings.saga import coordinator as coordinator_module

WAIT = 20.0  # real seconds: only reached when something is broken
DAY = 86_400.0


# test services: event-sourced aggregates ----------------------------------------------------
class SgReserved(tidings.Event):
    saga: str
    amount: int


class SgReleased(tidings.Event):
    saga: str


class SgStocked(tidings.Event):
    units: int


class SgLedger(tidings.Aggregate):
    """Credit or stock: `available` units; `held` by saga id."""

    available: int = 0
    held: dict[str, int] = {}
    released: list[str] = []
    low_water: int = 0  # the lowest `available` ever reached

    def apply(self, event: Any) -> None:
        match event:
            case SgStocked(units=u):
                self.available += u
            case SgReserved(saga=s, amount=a):
                self.available -= a
                self.held = {**self.held, s: a}
                self.low_water = min(self.low_water, self.available)
            case SgReleased(saga=s):
                self.available += self.held.get(s, 0)
                self.held = {k: v for k, v in self.held.items() if k != s}
                self.released = [*self.released, s]


# harness ---------------------------------------------------------------------------------
@pytest.fixture(params=["memory", "sqlite",
                        pytest.param("postgres", marks=pytest.mark.service),
                        pytest.param("sqlite+nats", marks=pytest.mark.service)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":  # a fresh schema (tests/pg_plugin.py)
        return str(request.getfixturevalue("postgres_server").new_url())
    if request.param == "sqlite+nats":  # state in SQLite, every message through NATS
        nats_url = request.getfixturevalue("nats_server").url_for(tmp_path)
        return f"sqlite:///{tmp_path}/x.db?broker={nats_url}"
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/x.db"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/x.db"


class Env:
    """Hubs opened by a test, their `hub.run()` tasks, and clean-up."""

    def __init__(self) -> None:
        self.hubs: list[tidings.Hub] = []
        self.runs: dict[tidings.Hub, asyncio.Task[None]] = {}

    async def hub(self, url: str) -> tidings.Hub:
        h = await tidings.connect(url)
        self.hubs.append(h)
        return h

    def serve(self, hub: tidings.Hub) -> None:
        """Run the hub's command handlers (register them first)."""
        self.runs[hub] = asyncio.create_task(hub.run())

    async def close(self, hub: tidings.Hub) -> None:
        task = self.runs.pop(hub, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await hub.close()

    async def aclose(self) -> None:
        for h in self.hubs:
            await self.close(h)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = Env()
    try:
        yield e
    finally:
        await e.aclose()


async def until(pred: Callable[[], Awaitable[bool] | bool], what: str = "condition",
                timeout: float = WAIT, clock: ManualClock | None = None,
                tick: float = 0.0) -> None:
    """Poll `pred` until true; with `clock` and `tick`, move the clock on each round."""
    async with asyncio.timeout(timeout):
        while True:
            r = pred()
            if not isinstance(r, bool):
                r = await r
            if r:
                return
            if clock is not None and tick:
                await clock.advance(tick)
            await asyncio.sleep(0.005)
    raise AssertionError(what)  # pragma: no cover


async def status_is(runner: Any, saga_id: str, *statuses: str, clock: ManualClock | None = None,
                    tick: float = 0.0) -> dict[str, Any]:
    async def check() -> bool:
        return (await runner.get(saga_id))["status"] in statuses
    try:
        await until(check, clock=clock, tick=tick)
    except TimeoutError:
        state = await runner.get(saga_id)
        raise AssertionError(f"saga {saga_id} is {state['status']}, expected {statuses}: "
                             f"{state}") from None
    return await runner.get(saga_id)


async def history(runner: Any, saga_id: str) -> list[dict[str, Any]]:
    return (await runner.get(saga_id))["steps"]


def events_of(steps: list[dict[str, Any]], name: str, **match: Any) -> list[dict[str, Any]]:
    return [s for s in steps if s["event"] == name
            and all(s.get(k) == v for k, v in match.items())]


async def has_event(runner: Any, saga_id: str, name: str, **match: Any) -> bool:
    return bool(events_of(await history(runner, saga_id), name, **match))


async def ledger(hub: tidings.Hub, lid: str) -> SgLedger:
    try:
        return await hub.repository(SgLedger).get(lid)
    except tidings.NotFound:
        return SgLedger(lid)


async def seed(hub: tidings.Hub, lid: str, units: int) -> None:
    led = SgLedger(lid)
    led.record(SgStocked(units=units))
    await hub.repository(SgLedger).save(led)


def ledger_service(hub: tidings.Hub, name: str, lid: str, *, concurrency: int = 1,
                   calls: list[str] | None = None, inline: bool = False,
                   before: Callable[[tidings.Command], Awaitable[None]] | None = None
                   ) -> None:
    """`svc.<name>.reserve` / `svc.<name>.release` on the ledger `lid` (`before`: run
    first by each reserve)."""

    @hub.handler(f"svc.{name}.reserve", concurrency=concurrency, inline=inline)
    async def reserve(cmd: tidings.Command) -> dict[str, Any]:
        if calls is not None:
            calls.append(cmd.data["saga_id"])
        if before is not None:
            await before(cmd)
        led = await ledger(hub, lid)
        amount = int(cmd.data.get("amount", 1))
        if led.available < amount:
            raise Rejected(f"only {led.available} {name} left")
        led.record(SgReserved(saga=cmd.data["saga_id"], amount=amount))
        cmd.save(led)
        return {f"{name}_reserved": amount}

    @hub.handler(f"svc.{name}.release", concurrency=concurrency, inline=inline)
    async def release(cmd: tidings.Command) -> dict[str, Any]:
        led = await ledger(hub, lid)
        if cmd.data["saga_id"] in led.held:
            led.record(SgReleased(saga=cmd.data["saga_id"]))
            cmd.save(led)
        return {}


class Gate:
    """An async step that waits to be released: lets a test act mid-saga."""

    def __init__(self, result: dict[str, Any] | None = None) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.calls: list[str] = []
        self.result = result

    async def __call__(self, data: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append(data["saga_id"])
        self.entered.set()
        await self.release.wait()
        return self.result


class Log:
    """Local actions that record what ran, in order."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, str]] = []

    def action(self, name: str, result: dict[str, Any] | None = None,
               fail: BaseException | None = None) -> Callable[..., Awaitable[Any]]:
        async def fn(data: dict[str, Any]) -> dict[str, Any] | None:
            self.ran.append((name, data["saga_id"]))
            if fail is not None:
                raise fail
            return result
        fn.__name__ = name
        return fn

    def names(self, saga_id: str | None = None) -> list[str]:
        return [n for n, s in self.ran if saga_id is None or s == saga_id]


async def read_all(hub: tidings.Hub, pattern: str) -> list[tidings.Message]:
    return [m async for m in hub.read(pattern)]


# the basics ------------------------------------------------------------------------------------
async def test_local_and_command_steps_complete(env: Env, url: str) -> None:
    hub = await env.hub(url)
    await seed(hub, "credit", 100)
    ledger_service(hub, "credit", "credit")
    env.serve(hub)
    log = Log()
    defn = Saga("basic", [
        Step("create", action=log.action("create", {"order": "o-1"}),
             compensation=log.action("reject")),
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release"),
        Step("approve", action=log.action("approve"), retriable=True),
    ])
    clock = ManualClock()
    runner = hub.sagas(defn, clock=clock)
    sid = await runner.start({"amount": 30})
    state = await runner.wait(sid, timeout=WAIT)
    assert state["status"] == "completed"
    assert state["data"] == {"amount": 30, "order": "o-1", "credit_reserved": 30}
    assert log.names(sid) == ["create", "approve"]
    assert (await ledger(hub, "credit")).available == 70
    assert [s["name"] for s in events_of(state["steps"], "StepCompleted")] == \
        ["create", "credit", "approve"]
    listed = [s async for s in runner.list()]
    assert [s["id"] for s in listed] == [sid]
    assert [s async for s in runner.list("stuck")] == []
    assert [s["id"] async for s in runner.list("completed")] == [sid]


async def test_start_with_the_same_id_twice_is_a_no_op(env: Env, url: str) -> None:
    hub = await env.hub(url)
    log = Log()
    defn = Saga("once", [Step("a", action=log.action("a"))])
    runner = hub.sagas(defn, clock=ManualClock())
    first = await runner.start({"n": 1}, id="order-7")
    second = await runner.start({"n": 2}, id="order-7")
    assert first == second == "order-7"
    state = await runner.wait("order-7", timeout=WAIT)
    assert state["status"] == "completed"
    assert state["data"] == {"n": 1}  # the second start changed nothing
    assert await runner.start({"n": 3}, id="order-7") == "order-7"  # also once finished
    assert log.names() == ["a"]
    assert len(events_of(await history(runner, "order-7"), "SagaStarted")) == 1
    assert len([s async for s in runner.list()]) == 1


async def test_bad_inputs(env: Env, url: str) -> None:
    hub = await env.hub(url)
    defn = Saga("bad", [Step("a", action=Log().action("a"))])
    runner = hub.sagas(defn, clock=ManualClock())
    for data in ("text", ["a"], 3, None, b"{}"):
        with pytest.raises(tidings.InvalidArgument, match="must be a dict"):
            await runner.start(data)  # type: ignore[arg-type]
    for bad_id in ("", "x" * 121, 42, "a\x00b"):
        with pytest.raises(tidings.InvalidArgument, match="saga id"):
            await runner.start({}, id=bad_id)  # type: ignore[arg-type]
        with pytest.raises(tidings.InvalidArgument, match="saga id"):
            await runner.get(bad_id)  # type: ignore[arg-type]
    assert [s async for s in runner.list()] == []  # nothing was stored
    with pytest.raises(tidings.NotFound):
        await runner.get("no-such-saga")
    with pytest.raises(tidings.NotFound):
        await runner.wait("no-such-saga", timeout=WAIT)
    with pytest.raises(tidings.NotFound):
        await runner.cancel("no-such-saga")
    with pytest.raises(tidings.InvalidArgument, match="reason is text"):
        await runner.cancel("no-such-saga", reason=5)  # type: ignore[arg-type]
    with pytest.raises(tidings.NotFound):
        await runner.retry("no-such-saga")
    with pytest.raises(tidings.InvalidArgument, match="takes a tidings.Saga"):
        hub.sagas("bad")
    sid = await runner.start({})
    assert (await runner.wait(sid, timeout=WAIT))["status"] == "completed"
    with pytest.raises(tidings.InvalidArgument, match="only a stuck saga"):
        await runner.retry(sid)
    with pytest.raises(tidings.InvalidArgument, match="only a running"):
        await runner.cancel(sid)
    # the same version registered with other steps
    with pytest.raises(tidings.InvalidArgument, match="new version"):
        hub.sagas(Saga("bad", [Step("b", action=Log().action("b"))]))
    await hub.close()
    with pytest.raises(tidings.ClosedError):
        await runner.start({})


# duplicates -------------------------------------------------------------------------------------
async def test_duplicate_command_delivery_changes_state_once(env: Env, url: str) -> None:
    """The same command delivered twice (a redelivery or a re-sent copy under a new
    message id, same idempotency key): the handler's change happens once and the
    same reply comes back each time."""
    hub = await env.hub(url)
    await seed(hub, "stock", 5)
    calls: list[str] = []
    ledger_service(hub, "stock", "stock", calls=calls)
    env.serve(hub)
    headers = {"idempotency-key": "order-1:reserve:action", "reply-to": "test.replies",
               "saga-id": "order-1", "saga-step": "0", "saga-kind": "action",
               "saga-attempt": "1"}
    data = {"saga_id": "order-1", "amount": 2}
    p1 = await hub.publish("svc.stock.reserve", data, key="order-1", headers=headers, id="m-1")
    p1_again = await hub.publish("svc.stock.reserve", data, key="order-1", headers=headers,
                                 id="m-1")
    assert p1_again.duplicate  # the engine keeps one copy of a message id
    await until(lambda: _count(hub, "test.replies", 1), "the first reply")
    # a redelivery: the stored command again, under another message id
    [sent] = [m async for m in hub.read("svc.stock.reserve")]
    assert sent.position == p1.position
    await hub.publish("svc.stock.reserve", sent.data, key=sent.key, headers=dict(sent.headers),
                      id="m-1-redelivered")
    await until(lambda: _count(hub, "test.replies", 2), "the second reply")
    replies = await read_all(hub, "test.replies")
    assert len(replies) == 2
    assert [r.decode() for r in replies] == [{"stock_reserved": 2}] * 2
    assert [r.headers["status"] for r in replies] == ["ok", "ok"]
    assert calls == ["order-1"]  # the second copy never reached the handler function
    led = await ledger(hub, "stock")
    assert led.available == 3 and led.held == {"order-1": 2}
    # one more, with another key: a different command, handled
    await hub.publish("svc.stock.reserve", {"saga_id": "order-2", "amount": 1},
                      headers={**headers, "idempotency-key": "order-2:reserve:action"})
    await until(lambda: _count(hub, "test.replies", 3), "the third reply")
    assert (await ledger(hub, "stock")).available == 2


async def _count(hub: tidings.Hub, pattern: str, n: int) -> bool:
    return len(await read_all(hub, pattern)) >= n


async def test_duplicate_command_in_a_saga_and_its_second_reply_is_ignored(
        env: Env, url: str) -> None:
    hub = await env.hub(url)
    await seed(hub, "credit", 100)
    calls: list[str] = []
    ledger_service(hub, "credit", "credit", calls=calls)
    env.serve(hub)
    hold = Gate()
    defn = Saga("dupcmd", [
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release"),
        Step("hold", action=hold),
    ])
    runner = hub.sagas(defn, clock=ManualClock())
    sid = await runner.start({"amount": 10})
    await asyncio.wait_for(hold.entered.wait(), WAIT)
    # the service gets the saga's command a second time
    [sent] = await read_all(hub, "svc.credit.reserve")
    await hub.publish("svc.credit.reserve", sent.data, key=sent.key,
                      headers=dict(sent.headers), id="copy-1")
    await until(lambda: _count(hub, "saga.dupcmd.replies.>", 2), "the replayed reply")
    hold.release.set()
    state = await runner.wait(sid, timeout=WAIT)
    assert state["status"] == "completed"
    await until(lambda: has_event(runner, sid, "ReplyIgnored"), "the duplicate reply recorded")
    steps = await history(runner, sid)
    assert len(events_of(steps, "StepCompleted", step=0)) == 1
    assert calls == [sid]
    led = await ledger(hub, "credit")
    assert led.available == 90 and led.held == {sid: 10}


async def test_duplicate_reply_is_recorded_and_ignored(env: Env, url: str) -> None:
    hub = await env.hub(url)
    await seed(hub, "credit", 100)
    ledger_service(hub, "credit", "credit")
    env.serve(hub)
    hold = Gate()
    log = Log()
    defn = Saga("dupreply", [
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release"),
        Step("hold", action=hold),
        Step("after", action=log.action("after")),
    ])
    runner = hub.sagas(defn, clock=ManualClock())
    sid = await runner.start({"amount": 10})
    await asyncio.wait_for(hold.entered.wait(), WAIT)
    # the reply came to this coordinator's own topic
    [reply] = await read_all(hub, "saga.dupreply.replies.>")
    assert reply.topic.startswith("saga.dupreply.replies.")
    # the same reply again (another copy on the wire), while the saga is at the next step
    await hub.publish(reply.topic, reply.data, key=reply.key,
                      headers=dict(reply.headers), id="reply-copy-1")
    hold.release.set()
    state = await runner.wait(sid, timeout=WAIT)
    assert state["status"] == "completed"
    await until(lambda: has_event(runner, sid, "ReplyIgnored"), "the duplicate recorded")
    # and once more after the saga finished, on the topic all coordinators share
    await hub.publish("saga.dupreply.replies", reply.data, key=reply.key,
                      headers=dict(reply.headers), id="reply-copy-2")
    await until(lambda: _ignored(runner, sid, 2), "the late duplicate recorded")
    steps = await history(runner, sid)
    assert len(events_of(steps, "StepCompleted", step=0)) == 1
    assert len(events_of(steps, "StepStarted", step=1)) == 1
    assert log.names(sid) == ["after"]
    ignored = events_of(steps, "ReplyIgnored")
    assert [(i["step"], i["kind"], i["attempt"]) for i in ignored] == [(0, "action", 1)] * 2
    assert "already completed" in ignored[1]["reason"]
    assert (await runner.get(sid))["status"] == "completed"
    assert (await ledger(hub, "credit")).available == 90


async def test_a_reply_that_is_not_a_json_object_is_a_failed_attempt(env: Env, url: str
                                                                       ) -> None:
    """A service that is not a tidings handler answers with a JSON list: the saga
    records a failed attempt (and stays loadable), it does not store the list."""
    hub = await env.hub(url)
    defn = Saga("foreign", [Step("ask", command="svc.foreign.ask", retries=0)])
    runner = hub.sagas(defn, clock=ManualClock())
    sid = await runner.start({})
    await until(lambda: _commands(hub), "the command sent")
    [cmd] = await read_all(hub, "svc.foreign.ask")
    h = {k: v for k, v in cmd.headers.items() if k.startswith("saga-")}
    await hub.publish(cmd.headers["reply-to"], [1, 2], key=cmd.key, headers={**h, "status": "ok"})
    state = await runner.wait(sid, timeout=WAIT)
    assert state["status"] == "compensated"
    [failed] = events_of(state["steps"], "StepFailed")
    assert "JSON object" in failed["error"]
    assert (await runner.get(sid))["status"] == "compensated"


async def _commands(hub: tidings.Hub) -> bool:
    return bool(await read_all(hub, "svc.foreign.ask"))


async def _ignored(runner: Any, sid: str, n: int) -> bool:
    return len(events_of(await history(runner, sid), "ReplyIgnored")) >= n


# timeouts ---------------------------------------------------------------------------------------
async def test_reply_after_timeout_is_ignored_and_does_not_revive_the_saga(
        env: Env, url: str) -> None:
    hub = await env.hub(url)
    log = Log()
    slow = Gate({"late": True})
    undo: list[str] = []

    @hub.handler("svc.slow.do")
    async def do(cmd: tidings.Command) -> dict[str, Any] | None:
        return await slow(cmd.data)

    @hub.handler("svc.slow.undo")
    async def undo_it(cmd: tidings.Command) -> dict[str, Any]:
        undo.append(cmd.data["saga_id"])
        return {}

    env.serve(hub)
    clock = ManualClock()
    defn = Saga("late", [
        Step("create", action=log.action("create"), compensation=log.action("reject")),
        Step("slow", command="svc.slow.do", compensation="svc.slow.undo", timeout=10.0),
        Step("after", action=log.action("after")),
    ])
    runner = hub.sagas(defn, clock=clock)
    sid = await runner.start({})
    await asyncio.wait_for(slow.entered.wait(), WAIT)  # the service got the command
    await clock.advance(10.0)  # the deadline passes: no reply
    state = await status_is(runner, sid, "compensated")
    [failed] = events_of(state["steps"], "StepFailed")
    assert failed["step"] == 1 and "no reply within 10.0s" in failed["error"]
    # the timed-out command may have taken effect: its compensation ran, then create's
    assert undo == [sid]
    assert log.names(sid) == ["create", "reject"]
    # now the late reply arrives
    slow.release.set()
    await until(lambda: has_event(runner, sid, "ReplyIgnored"), "the late reply recorded")
    state = await runner.get(sid)
    assert state["status"] == "compensated"
    [ignored] = events_of(state["steps"], "ReplyIgnored")
    assert (ignored["step"], ignored["kind"], ignored["attempt"]) == (1, "action", 1)
    assert not events_of(state["steps"], "StepCompleted", step=1)
    assert log.names(sid) == ["create", "reject"]  # nothing ran forward


async def test_retry_after_timeout_then_the_stale_reply_is_ignored(env: Env, url: str) -> None:
    """Attempt 1 times out, attempt 2 is sent; attempt 1's late reply does not settle it."""
    hub = await env.hub(url)
    got: list[int] = []
    replies: dict[int, asyncio.Event] = {1: asyncio.Event(), 2: asyncio.Event()}

    @hub.handler("svc.flaky.do", concurrency=2)
    async def do(cmd: tidings.Command) -> dict[str, Any]:
        got.append(cmd.attempt)
        await replies[cmd.attempt].wait()
        return {"attempt": cmd.attempt}

    env.serve(hub)
    clock = ManualClock()
    defn = Saga("stale", [Step("flaky", command="svc.flaky.do", timeout=5.0, retries=1,
                               backoff=1.0)])
    runner = hub.sagas(defn, clock=clock)
    sid = await runner.start({})
    await until(lambda: got == [1], "attempt 1 delivered")
    await clock.advance(5.0)  # attempt 1 times out
    await until(lambda: has_event(runner, sid, "StepFailed"), "attempt 1 failed")
    await clock.advance(1.0)  # backoff
    # attempt 2 shares attempt 1's idempotency key; the handler is still busy with 1,
    # so attempt 2 waits behind it (ordered per saga) - release 1: its reply is stale,
    # and the inbox answers attempt 2 with the stored result
    await until(lambda: has_event(runner, sid, "StepStarted", attempt=2), "attempt 2 sent")
    replies[1].set()
    replies[2].set()
    state = await status_is(runner, sid, "completed")
    [done] = events_of(state["steps"], "StepCompleted")
    assert done["attempt"] == 2
    assert state["data"]["attempt"] == 1  # one execution; the stored reply answered again
    await until(lambda: has_event(runner, sid, "ReplyIgnored"), "the stale reply recorded")
    [ignored] = events_of(await history(runner, sid), "ReplyIgnored")
    assert ignored["attempt"] == 1
    assert got == [1]


@pytest.mark.parametrize("kind", ["command", "local"])
async def test_a_30_day_deadline_under_the_manual_clock(env: Env, url: str, kind: str) -> None:
    hub = await env.hub(url)
    log = Log()
    never = Gate()
    step = (Step("approval", command="svc.human.approve", timeout=30 * DAY)
            if kind == "command" else Step("approval", action=never, timeout=30 * DAY))
    defn = Saga(f"month-{kind}", [
        Step("create", action=log.action("create"), compensation=log.action("reject")),
        step,
        Step("after", action=log.action("after")),
    ])
    clock = ManualClock()
    runner = hub.sagas(defn, clock=clock)
    sid = await runner.start({})
    await until(lambda: has_event(runner, sid, "StepStarted", step=1), "the step started")
    [started] = events_of(await history(runner, sid), "StepStarted", step=1)
    await clock.advance(30 * DAY - 1)
    await until(lambda: clock.sleepers > 0, "the coordinator waiting on the deadline")
    assert (await runner.get(sid))["status"] == "running"
    await clock.advance(1)
    state = await status_is(runner, sid, "compensated")
    [failed] = events_of(state["steps"], "StepFailed")
    assert failed["step"] == 1
    assert log.names(sid) == ["create", "reject"]
    assert started["name"] == "approval"


# compensation failure and manual retry ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["command", "local"])
async def test_compensation_failure_then_manual_retry(env: Env, url: str, kind: str) -> None:
    hub = await env.hub(url)
    await seed(hub, "credit", 100)
    broken = {"yes": True}
    undo_calls: list[int] = []

    @hub.handler("svc.credit.reserve")
    async def reserve(cmd: tidings.Command) -> dict[str, Any]:
        led = await ledger(hub, "credit")
        led.record(SgReserved(saga=cmd.data["saga_id"], amount=cmd.data["amount"]))
        cmd.save(led)
        return {}

    async def release(data: dict[str, Any]) -> None:
        undo_calls.append(1)
        if broken["yes"]:
            raise RuntimeError("credit service is down")
        led = await ledger(hub, "credit")
        if data["saga_id"] in led.held:
            led.record(SgReleased(saga=data["saga_id"]))
            await hub.repository(SgLedger).save(led)

    @hub.handler("svc.credit.release")
    async def release_cmd(cmd: tidings.Command) -> dict[str, Any]:
        await release(cmd.data)
        return {}

    env.serve(hub)
    clock = ManualClock()
    defn = Saga(f"stuck-{kind}", [
        Step("credit", command="svc.credit.reserve",
             compensation="svc.credit.release" if kind == "command" else release,
             compensation_retries=2, backoff=1.0,
             timeout=10 * DAY),  # the test moves the clock 1 s a round: no timeouts here
        Step("stock", action=Log().action("stock", fail=Rejected("out of stock"))),
    ])
    runner = hub.sagas(defn, clock=clock)
    sid = await runner.start({"amount": 25})
    state = await status_is(runner, sid, "stuck", clock=clock, tick=1.0)
    assert "compensation of step 'credit' failed after 3 attempts" in state["error"]
    assert "credit service is down" in state["error"]
    assert len(undo_calls) == 3
    assert (await ledger(hub, "credit")).available == 75  # not released yet
    assert [s["status"] async for s in runner.list("stuck")] == ["stuck"]

    broken["yes"] = False
    await runner.retry(sid)
    state = await status_is(runner, sid, "compensated", clock=clock, tick=1.0)
    assert state["error"] is None
    assert "out of stock" in state["reason"]
    assert (await ledger(hub, "credit")).available == 100
    names = [s["event"] for s in state["steps"]]
    assert names.count("SagaStuck") == 1 and names.count("SagaResumed") == 1
    attempts = [s["attempt"] for s in events_of(state["steps"], "CompensationStarted")]
    assert attempts == [1, 2, 3, 4]  # numbering continues across the resume
    assert len(undo_calls) == 4


# cancel ---------------------------------------------------------------------------------------------
async def test_cancel_mid_saga_compensates_even_when_the_caller_is_cancelled(
        env: Env, url: str) -> None:
    hub = await env.hub(url)
    await seed(hub, "credit", 100)
    ledger_service(hub, "credit", "credit")
    env.serve(hub)
    log = Log()
    working = Gate({"packed": True})
    undoing = Gate()

    async def unpack(data: dict[str, Any]) -> None:
        log.ran.append(("unpack", data["saga_id"]))
        await undoing(data)

    defn = Saga("cancel", [
        Step("create", action=log.action("create"), compensation=log.action("reject")),
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release"),
        Step("pack", action=working, compensation=unpack),
        Step("ship", action=log.action("ship")),
    ])
    clock = ManualClock()
    runner = hub.sagas(defn, clock=clock)
    sid = await runner.start({"amount": 40})
    await asyncio.wait_for(working.entered.wait(), WAIT)
    assert (await ledger(hub, "credit")).available == 60

    asked = asyncio.Event()

    async def caller() -> dict[str, Any]:
        await runner.cancel(sid, reason="customer changed their mind")
        asked.set()
        return await runner.wait(sid, timeout=WAIT)

    task = asyncio.create_task(caller())
    await asyncio.wait_for(asked.wait(), WAIT)
    working.release.set()  # "pack" finishes; the cancel takes effect before "ship"
    await asyncio.wait_for(undoing.entered.wait(), WAIT)
    task.cancel()  # the caller goes away mid-compensation
    with contextlib.suppress(asyncio.CancelledError):
        await task
    undoing.release.set()
    state = await status_is(runner, sid, "compensated")
    assert "customer changed their mind" in state["reason"]
    assert log.names(sid) == ["create", "unpack", "reject"]  # reverse order, ship never ran
    comp = [s["name"] for s in events_of(state["steps"], "CompensationCompleted")]
    assert comp == ["pack", "credit", "create"]
    assert (await ledger(hub, "credit")).available == 100
    with pytest.raises(tidings.InvalidArgument):
        await runner.cancel(sid)


async def test_cancel_while_waiting_for_a_retry(env: Env, url: str) -> None:
    hub = await env.hub(url)
    log = Log()
    fails = Log()
    defn = Saga("cancel-backoff", [
        Step("create", action=log.action("create"), compensation=log.action("reject")),
        Step("flaky", action=fails.action("flaky", fail=RuntimeError("nope")), retries=5,
             backoff=3600.0),
    ])
    clock = ManualClock()
    runner = hub.sagas(defn, clock=clock)
    sid = await runner.start({})
    await until(lambda: has_event(runner, sid, "StepFailed"), "the first failure")
    await runner.cancel(sid)
    state = await status_is(runner, sid, "compensated")  # the clock never moved
    assert log.names(sid) == ["create", "reject"]
    assert fails.names(sid) == ["flaky"]
    assert len(events_of(state["steps"], "StepStarted", step=1)) == 1
    assert state["reason"] == "step flaky failed: cancelled"


# restart ------------------------------------------------------------------------------------------
async def test_a_deadline_that_passed_while_the_coordinator_was_down_fires_on_restart(
        env: Env, sqlite_url: str) -> None:
    log = Log()
    defn = Saga("restart", [
        Step("create", action=log.action("create"), compensation=log.action("reject")),
        Step("ask", command="svc.nobody.answers", timeout=60.0),
        Step("after", action=log.action("after")),
    ])
    t0 = 1_000_000.0
    hub1 = await env.hub(sqlite_url)
    runner1 = hub1.sagas(defn, clock=ManualClock(t0))
    sid = await runner1.start({"k": "v"})
    await until(lambda: has_event(runner1, sid, "StepStarted", step=1), "the command sent")
    await env.close(hub1)  # the coordinator goes down while waiting for the reply
    assert log.names(sid) == ["create"]

    # an hour later (the deadline was t0 + 60)
    hub2 = await env.hub(sqlite_url)
    clock2 = ManualClock(t0 + 3600.0)
    runner2 = hub2.sagas(defn, clock=clock2)
    state = await status_is(runner2, sid, "compensated")  # clock2 never moves
    [failed] = events_of(state["steps"], "StepFailed")
    assert failed["step"] == 1 and "no reply within 60.0s" in failed["error"]
    assert log.names(sid) == ["create", "reject"]
    assert state["data"] == {"k": "v"}
    # the command was sent once: past its deadline, the restart does not ask it again
    assert len(await read_all(hub2, "svc.nobody.answers")) == 1


async def test_a_deadline_still_ahead_after_restart_is_waited_for(
        env: Env, sqlite_url: str) -> None:
    log = Log()
    defn = Saga("restart2", [
        Step("create", action=log.action("create"), compensation=log.action("reject")),
        Step("ask", command="svc.nobody.answers", timeout=60.0),
    ])
    t0 = 1_000_000.0
    hub1 = await env.hub(sqlite_url)
    runner1 = hub1.sagas(defn, clock=ManualClock(t0))
    sid = await runner1.start({})
    await until(lambda: has_event(runner1, sid, "StepStarted", step=1), "the command sent")
    await env.close(hub1)

    hub2 = await env.hub(sqlite_url)
    clock2 = ManualClock(t0 + 30.0)
    runner2 = hub2.sagas(defn, clock=clock2)
    await until(lambda: clock2.sleepers > 0, "the resumed saga waiting on its deadline")
    assert (await runner2.get(sid))["status"] == "running"
    await clock2.advance(30.0)
    await status_is(runner2, sid, "compensated")
    assert log.names(sid) == ["create", "reject"]


async def test_a_saga_finishes_after_restart_when_the_reply_comes(
        env: Env, sqlite_url: str) -> None:
    """Down mid-step; on restart the reply (answered while it was down) completes it."""
    log = Log()
    defn = Saga("restart3", [
        Step("create", action=log.action("create"), compensation=log.action("reject")),
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release"),
        Step("after", action=log.action("after")),
    ])
    hub1 = await env.hub(sqlite_url)
    await seed(hub1, "credit", 50)
    runner1 = hub1.sagas(defn, clock=ManualClock())
    sid = await runner1.start({"amount": 5})
    await until(lambda: has_event(runner1, sid, "StepStarted", step=1), "the command sent")
    await env.close(hub1)

    services = await env.hub(sqlite_url)  # the service answers while the coordinator is down
    ledger_service(services, "credit", "credit")
    env.serve(services)
    await until(lambda: _count(services, "saga.restart3.replies.>", 1), "the reply stored")

    hub2 = await env.hub(sqlite_url)
    runner2 = hub2.sagas(defn, clock=ManualClock())
    state = await status_is(runner2, sid, "completed")
    assert log.names(sid) == ["create", "after"]
    assert (await ledger(hub2, "credit")).available == 45
    assert len(events_of(state["steps"], "StepCompleted", step=1)) == 1


# versions ----------------------------------------------------------------------------------------
async def test_a_saga_in_flight_finishes_under_its_version(env: Env, url: str) -> None:
    hub = await env.hub(url)
    log = Log()
    gate = Gate()
    v1 = Saga("ver", [Step("a1", action=gate), Step("b1", action=log.action("b1"))], version=1)
    v2 = Saga("ver", [Step("x2", action=log.action("x2")), Step("y2", action=log.action("y2")),
                      Step("z2", action=log.action("z2"))], version=2)
    clock = ManualClock()
    r1 = hub.sagas(v1, clock=clock)
    old = await r1.start({})
    await asyncio.wait_for(gate.entered.wait(), WAIT)
    r2 = hub.sagas(v2)  # v2 deployed while `old` is in flight
    new = await r2.start({})
    s_new = await r2.wait(new, timeout=WAIT)
    assert s_new["version"] == 2 and s_new["status"] == "completed"
    assert log.names(new) == ["x2", "y2", "z2"]
    gate.release.set()
    s_old = await r2.wait(old, timeout=WAIT)
    assert s_old["version"] == 1 and s_old["status"] == "completed"
    assert [s["name"] for s in events_of(s_old["steps"], "StepCompleted")] == ["a1", "b1"]
    assert log.names(old) == ["b1"]


async def test_after_restart_each_version_resumes_under_its_own_definition(
        env: Env, sqlite_url: str) -> None:
    log = Log()
    never = Gate()
    v1_before = Saga("ver2", [Step("a1", action=never), Step("b1", action=log.action("b1"))],
                     version=1)
    hub1 = await env.hub(sqlite_url)
    r1 = hub1.sagas(v1_before, clock=ManualClock())
    old = await r1.start({})
    await asyncio.wait_for(never.entered.wait(), WAIT)
    await env.close(hub1)  # down mid-step (a local step is run again on resume)

    v1 = Saga("ver2", [Step("a1", action=log.action("a1")), Step("b1", action=log.action("b1"))],
              version=1)
    v2 = Saga("ver2", [Step("x2", action=log.action("x2"))], version=2)
    hub2 = await env.hub(sqlite_url)
    r2 = hub2.sagas(v2, clock=ManualClock())
    r2_v1 = hub2.sagas(v1)
    s_old = await r2_v1.wait(old, timeout=WAIT)
    assert s_old["status"] == "completed" and s_old["version"] == 1
    assert log.names(old) == ["a1", "b1"]
    new = await r2.start({})
    assert (await r2.wait(new, timeout=WAIT))["version"] == 2
    assert log.names(new) == ["x2"]


# the race -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("inline", [False, True], ids=["messages", "inline"])
async def test_50_sagas_race_for_the_last_unit_of_stock(env: Env, url: str, inline: bool
                                                        ) -> None:
    hub = await env.hub(url)
    await seed(hub, "stock", 1)
    await seed(hub, "credit", 1000)
    ledger_service(hub, "stock", "stock", concurrency=4, inline=inline)
    ledger_service(hub, "credit", "credit", concurrency=4, inline=inline)
    env.serve(hub)
    approved: list[str] = []

    async def approve(data: dict[str, Any]) -> None:
        approved.append(data["saga_id"])

    defn = Saga("race", [
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release"),
        Step("stock", command="svc.stock.reserve", compensation="svc.stock.release"),
        Step("approve", action=approve, retriable=True),
    ])
    runner = hub.sagas(defn, clock=ManualClock())  # no timeouts: the clock never moves
    ids = await asyncio.gather(*(runner.start({"amount": 1}, id=f"order-{i}")
                                 for i in range(50)))
    states = await asyncio.gather(*(runner.wait(i, timeout=60.0) for i in ids))
    by_status: dict[str, list[str]] = {}
    for s in states:
        by_status.setdefault(s["status"], []).append(s["id"])
    assert sorted(by_status) == ["compensated", "completed"], by_status
    [winner] = by_status["completed"]
    assert len(by_status["compensated"]) == 49
    assert approved == [winner]
    stock = await ledger(hub, "stock")
    assert stock.available == 0 and stock.low_water == 0  # never negative
    assert stock.held == {winner: 1}
    credit = await ledger(hub, "credit")
    assert credit.available == 999  # conserved: only the winner's unit is used
    assert credit.held == {winner: 1}
    assert sorted(credit.released) == sorted(by_status["compensated"])
    for s in states:
        if s["status"] == "compensated":
            assert "stock left" in s["reason"]
    if inline:  # no round trip: no command, reply or inbox record; each attempt is inline
        assert await read_all(hub, "svc.>") == []
        assert await read_all(hub, "saga.race.replies.>") == []
        assert await read_all(hub, "inbox") == []
        loser = by_status["compensated"][0]
        events = [rec.event async for rec in hub.events.read(f"saga-race-{loser}")]
        started = [e for e in events
                   if type(e).__name__ in ("StepStarted", "CompensationStarted")]
        assert started and all(e.inline for e in started if e.step < 2)


# the pivot ---------------------------------------------------------------------------------------
async def test_steps_after_the_pivot_retry_forward_and_a_rejection_there_is_stuck_until_retried(
        env: Env, url: str) -> None:
    hub = await env.hub(url)
    await seed(hub, "credit", 100)
    ledger_service(hub, "credit", "credit")
    state_of = {"approve": "reject", "notify": 0}

    @hub.handler("svc.order.approve")
    async def approve(cmd: tidings.Command) -> dict[str, Any]:
        if state_of["approve"] == "reject":
            raise Rejected("order is on hold")
        return {"approved": True}

    @hub.handler("svc.order.notify")
    async def notify(cmd: tidings.Command) -> dict[str, Any]:
        state_of["notify"] += 1
        if state_of["notify"] < 4:
            raise RuntimeError("mail server down")
        return {}

    env.serve(hub)
    clock = ManualClock()
    defn = Saga("pivot", [
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release"),
        Step("approve", command="svc.order.approve", retriable=True, timeout=10 * DAY),
        Step("notify", command="svc.order.notify", retriable=True, backoff=60.0,
             timeout=10 * DAY),  # the ticks below move 60 s a round: no timeouts here
    ])
    runner = hub.sagas(defn, clock=clock)
    sid = await runner.start({"amount": 10})
    state = await status_is(runner, sid, "stuck")
    assert "after the pivot was rejected: order is on hold" in state["error"]
    assert not events_of(state["steps"], "CompensationStarted")
    assert (await ledger(hub, "credit")).available == 90  # not undone: past the pivot

    state_of["approve"] = "ok"  # the cause is fixed; a person retries the saga
    await runner.retry(sid)
    # notify fails three times, each retried after its backoff (the clock moves)
    state = await status_is(runner, sid, "completed", clock=clock, tick=60.0)
    assert state_of["notify"] == 4
    assert len(events_of(state["steps"], "StepFailed", step=2)) == 3
    assert not events_of(state["steps"], "CompensationStarted")
    assert (await ledger(hub, "credit")).available == 90


# control requests are never lost or left waiting -----------------------------------------
async def test_a_cancel_that_meets_another_writer_is_applied_not_lost(env: Env, url: str
                                                                      ) -> None:
    from tidings.saga.definition import ReplyIgnored

    hub = await env.hub(url)
    gate = Gate()
    log = Log()
    defn = Saga("moved", [Step("a", action=gate, compensation=log.action("undo-a")),
                          Step("b", action=log.action("b"))])
    runner = hub.sagas(defn, clock=ManualClock())
    sid = await runner.start({})
    await asyncio.wait_for(gate.entered.wait(), WAIT)
    # another writer (a second coordinator, say) moves the saga's stream meanwhile: the
    # driver's next write conflicts
    stream = f"saga-moved-{sid}"
    version = len([r async for r in hub.events.read(stream)])
    await hub.events.append(stream, [ReplyIgnored(step=0, kind="action", attempt=99,
                                                  reason="someone else")],
                            expected_version=version)
    cancelling = asyncio.create_task(runner.cancel(sid, "changed my mind"))
    await asyncio.sleep(0.05)
    gate.release.set()
    await asyncio.wait_for(cancelling, WAIT)  # answered only once it is stored
    state = await runner.wait(sid, timeout=WAIT)
    assert state["status"] == "compensated" and "changed my mind" in state["reason"]
    assert "b" not in log.names(sid) and log.names(sid) == ["undo-a"]
    assert events_of(state["steps"], "SagaCancelRequested")


async def test_cancel_through_a_process_without_the_sagas_version_is_refused(
        env: Env, sqlite_url: str) -> None:
    first = await env.hub(sqlite_url)
    gate = Gate()
    v1 = Saga("vers", [Step("a", action=gate)], version=1)
    sid = await first.sagas(v1).start({})
    await asyncio.wait_for(gate.entered.wait(), WAIT)
    await env.close(first)
    second = await env.hub(sqlite_url)
    v2 = Saga("vers", [Step("a2", action=Gate())], version=2)
    with pytest.raises(tidings.InvalidArgument, match="version 1"):
        await asyncio.wait_for(second.sagas(v2).cancel(sid), WAIT)  # not a hang


async def test_a_coordinator_follows_on_after_the_engine_was_away_longer_than_it_rides_out(
        env: Env, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = await env.hub(url)
    await seed(hub, "credit", 100)
    ledger_service(hub, "credit", "credit")
    env.serve(hub)
    defn = Saga("away", [Step("one", command="svc.credit.reserve", timeout=60.0,
                              compensation="svc.credit.release"),
                         Step("two", command="svc.credit.reserve", timeout=60.0,
                              compensation="svc.credit.release")])
    read = type(hub.engine).read
    failed: list[str] = []
    followed = ("saga.away.replies.", "saga.away.started", "saga.away.ended")

    async def flaky(self: Any, pattern: str, *args: Any) -> Any:
        # each read the coordinator follows fails once: its replies, the sagas started
        # (at start-up and as the log grows) and the sagas ended
        what = next((f for f in followed if pattern.startswith(f)), None)
        if what is not None and failed.count(what) < (2 if "started" in what else 1):
            failed.append(what)
            raise EngineUnavailable("the database is restarting (for the test)")
        return await read(self, pattern, *args)

    monkeypatch.setattr(type(hub.engine), "read", flaky)
    monkeypatch.setattr(coordinator_module, "FOLLOW_RETRY", 0.05)
    runner = hub.sagas(defn, clock=ManualClock())  # (never moved: no deadline passes)
    sid = await runner.start({"amount": 1})
    state = await runner.wait(sid, timeout=WAIT)  # its replies still arrive
    assert state["status"] == "completed"
    assert (await ledger(hub, "credit")).available == 98
    await until(lambda: len(failed) == 4, "every follower failing")  # (started: twice)
    await asyncio.sleep(0.3)  # (their next look)
    assert sorted(set(failed)) == sorted(followed)
    tasks = {t.get_name() for t in asyncio.all_tasks() if not t.done()}
    for task in ("follow", "own-replies", "ends", "adopt"):
        assert f"tidings:saga:away:{task}" in tasks, f"the coordinator's {task} task ended"
