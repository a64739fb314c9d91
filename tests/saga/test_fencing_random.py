"""Randomized: kills, timeouts, late and duplicate commands and replies never leak.

Hypothesis draws a run of sagas on one SQLite file. Each saga reserves credit
with a command, then a local step that may refuse the order (the saga then
compensates with a release command). A saga's reserve command may be held by
the service until after the saga timed out and compensated; the service process
may then die holding it (its lease expires and the command comes back to a new
service), or it may finish late. The coordinator may restart; commands and
replies may be delivered again at any time. When every command has been
answered, every ended saga's participant must hold exactly what the completed
sagas took.
"""

from __future__ import annotations

import asyncio
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tidings
from tidings import ManualClock, Rejected, Saga, Step

from .test_coordinator import SgReleased, SgReserved, ledger, seed, until

TIMEOUT = 5.0  # the reserve step's timeout, on the manual clock
LEASE = 0.5  # the reserve handler's ack_wait (real seconds): a dead holder's commands return
CREDIT = 1_000


@dataclass(frozen=True)
class Order:
    amount: int
    refused: bool  # the second step refuses: compensate a completed reserve
    late: bool  # the service holds its reserve command until the saga gave up


@dataclass(frozen=True)
class Run:
    orders: list[Order]
    retries: int
    kill_holder: bool  # the service dies holding the late commands
    restart_coordinator: bool
    duplicate_commands: bool
    duplicate_replies: bool


runs = st.builds(
    Run,
    orders=st.lists(st.builds(Order, amount=st.integers(1, 50), refused=st.booleans(),
                              late=st.booleans()), min_size=1, max_size=6),
    retries=st.integers(0, 1),
    kill_holder=st.booleans(),
    restart_coordinator=st.booleans(),
    duplicate_commands=st.booleans(),
    duplicate_replies=st.booleans(),
)


def definition(refused: set[str], retries: int) -> Saga:
    async def check(data: dict[str, Any]) -> None:
        if data["saga_id"] in refused:
            raise Rejected("the order is refused")

    return Saga("fuzz", [
        Step("credit", command="svc.credit.reserve", compensation="svc.credit.release",
             timeout=TIMEOUT, retries=retries),
        Step("check", action=check),
    ])


class Service:
    """The credit service's process: a hub of its own serving the reserve command."""

    def __init__(self, url: str, hold: set[str]) -> None:
        self.url, self.hold = url, hold
        self.gate = asyncio.Event()  # set: the held commands go on (late)
        self.hub: tidings.Hub | None = None
        self.task: asyncio.Task[None] | None = None
        self.holding: set[str] = set()
        self.held: set[asyncio.Task[Any]] = set()  # the handler runs waiting on the gate

    async def start(self) -> None:
        hub = self.hub = await tidings.connect(self.url)

        @hub.handler("svc.credit.reserve", concurrency=8, ack_wait=LEASE)
        async def reserve(cmd: tidings.Command) -> dict[str, Any]:
            sid = cmd.data["saga_id"]
            if sid in self.hold:
                self.holding.add(sid)
                me = asyncio.current_task()
                assert me is not None
                self.held.add(me)
                try:
                    await self.gate.wait()
                finally:
                    self.held.discard(me)
            led = await ledger(hub, "credit")
            led.record(SgReserved(saga=sid, amount=int(cmd.data["amount"])))
            cmd.save(led)
            return {"reserved": cmd.data["amount"]}

        self.task = asyncio.create_task(hub.run())

    def kill(self) -> None:
        """Die holding the late commands: nothing it holds is ever acked, nacked or
        committed (its handlers stay blocked, its consumer never fetches or settles
        again), so what it claimed comes back only when the leases expire."""
        assert self.task is not None
        self.task.cancel()  # the consumer stops; its clean-up waits on the held handlers

    async def stop(self) -> None:
        assert self.task is not None and self.hub is not None
        for t in self.held:
            t.cancel()
        await stop(self.hub, self.task)


async def coordinator(url: str, clock: ManualClock, refused: set[str], retries: int
                      ) -> tuple[tidings.Hub, asyncio.Task[None], Any]:
    hub = await tidings.connect(url)

    @hub.handler("svc.credit.release", concurrency=4)
    async def release(cmd: tidings.Command) -> dict[str, Any]:
        led = await ledger(hub, "credit")
        if cmd.data["saga_id"] in led.held:
            led.record(SgReleased(saga=cmd.data["saga_id"]))
            cmd.save(led)
        return {}

    runner = hub.sagas(definition(refused, retries), clock=clock)
    return hub, asyncio.create_task(hub.run()), runner


async def stop(hub: tidings.Hub, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait([task])  # (not `await task`: that would swallow our own cancellation)
    await hub.close()


async def answered(hub: tidings.Hub) -> bool:
    """Every command message (original, retry, redelivered copy) has a reply."""
    commands = [m.id async for m in hub.read("svc.credit.>")]
    causes = {m.headers.get("causation-id") async for m in hub.read("saga.fuzz.replies.>")}
    return all(c in causes for c in commands)


ENDED = ("completed", "compensated")
#: A saga whose last move is one of these waits for the clock (a step's timeout or a
#: retry's backoff); after CompensationStarted it waits for the release's reply.
WAITS_FOR_CLOCK = {"StepStarted", "StepFailed", "CompensationFailed"}


def moves(state: dict[str, Any]) -> list[str]:
    return [e["event"] for e in state["steps"] if e["event"] != "ReplyIgnored"]


async def ended(runner: Any, ids: list[str]) -> bool:
    for sid in ids:
        if (await runner.get(sid))["status"] not in ENDED:
            return False
    return True


async def drive(runner: Any, clock: ManualClock, ids: list[str]) -> None:
    """Move the clock one step timeout at a time until every saga ends.

    The clock moves only when every live saga waits for it, and the next move
    waits until each of them reacted: a compensation is never timed out by a
    clock that runs ahead of the release command's (real, prompt) reply.
    """
    async with asyncio.timeout(60):
        while True:
            live = {sid: state for sid in ids
                    if (state := await runner.get(sid))["status"] not in ENDED}
            if not live:
                return
            if any(moves(state)[-1] not in WAITS_FOR_CLOCK for state in live.values()):
                await asyncio.sleep(0.005)
                continue
            before = {sid: len(moves(state)) for sid, state in live.items()}
            await clock.advance(TIMEOUT)
            await until(functools.partial(reacted, runner, before), "every waiting saga reacts")


async def reacted(runner: Any, before: dict[str, int]) -> bool:
    """Every saga in `before` ended or made a move since it had that many."""
    for sid, n in before.items():
        state = await runner.get(sid)
        if state["status"] not in ENDED and len(moves(state)) == n:
            return False
    return True


async def resend(hub: tidings.Hub, pattern: str, tag: str) -> None:
    """Deliver every message on `pattern` once more, as a broker redelivery would."""
    async for m in hub.read(pattern):
        await hub.publish(m.topic, m.data, key=m.key, headers=dict(m.headers),
                          id=f"{m.id}-{tag}")


async def scenario(run: Run, directory: Path) -> None:
    url = f"sqlite:///{directory}/fuzz.db"
    clock = ManualClock()
    refused: set[str] = set()
    hold: set[str] = set()
    hub, task, runner = await coordinator(url, clock, refused, run.retries)
    await seed(hub, "credit", CREDIT)
    service = Service(url, hold)
    await service.start()
    ids = [f"o{i}" for i in range(len(run.orders))]
    for sid, order in zip(ids, run.orders, strict=True):
        if order.refused:
            refused.add(sid)
        if order.late:
            hold.add(sid)
    services = [service]
    try:
        for sid, order in zip(ids, run.orders, strict=True):
            await runner.start({"amount": order.amount}, id=sid)
        on_time = [sid for sid, o in zip(ids, run.orders, strict=True) if not o.late]
        await until(lambda: ended(runner, on_time), "the sagas nobody holds end")
        await until(lambda: hold <= service.holding, "the late commands are held")
        if run.duplicate_replies:
            await resend(hub, "saga.fuzz.replies.>", "dup1")
        if run.restart_coordinator:
            await stop(hub, task)
            clock = ManualClock(clock.now())
            hub, task, runner = await coordinator(url, clock, refused, run.retries)
        if run.kill_holder:
            service.kill()
            service = Service(url, set())
            await service.start()
            services.append(service)
        # the held steps time out (and retry, and time out) until their sagas give up
        await drive(runner, clock, ids)
        service.gate.set()  # a holder still alive finishes its commands now: too late
        if run.duplicate_commands:
            await resend(hub, "svc.credit.>", "dup2")
        if run.duplicate_replies:
            await resend(hub, "saga.fuzz.replies.>", "dup3")
        await until(lambda: answered(hub), "every command answered")
        statuses = {sid: (await runner.get(sid))["status"] for sid in ids}
        completed = {sid: o.amount for sid, o in zip(ids, run.orders, strict=True)
                     if statuses[sid] == "completed"}
        for sid, order in zip(ids, run.orders, strict=True):
            # a killed holder's command comes back to the new service after its lease
            # and may still make it in time
            allowed = ({"compensated"} if order.refused or (order.late and not run.kill_holder)
                       else {"completed", "compensated"} if order.late else {"completed"})
            assert statuses[sid] in allowed, (sid, order, statuses[sid])
        led = await ledger(hub, "credit")
        assert led.held == completed, f"credit kept by ended sagas: {led.held} vs {completed}"
        assert led.available == CREDIT - sum(completed.values())
    finally:
        for s in services:
            if s.hub is not None and not s.hub.closed:
                await s.stop()
        await stop(hub, task)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run=runs)
def test_kills_timeouts_and_duplicates_never_leak_credit(run: Run) -> None:
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(asyncio.wait_for(scenario(run, Path(d)), 120))
