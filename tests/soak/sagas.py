"""Sagas with their coordinator and a participant SIGKILLed in turn, over messages and with
the credit step inline: after restarts no saga is left running or stuck, each ledger holds
exactly what the completed sagas took, units are conserved and never go negative, no
command changed a ledger twice, and no reply a participant stored in time was lost (a step
that timed out although its reply was stored before the deadline must at least have
recorded that reply as `ReplyIgnored` once it came)."""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections import Counter
from pathlib import Path

from tests.integration._saga_child import amount, definition
from tests.integration.test_shop_crash import _kill
from tests.saga.test_coordinator import SgReserved, ledger, seed

import tidings

from .matrix import RowResult, Target, spawn, watchdog

#: Seconds the coordinator may take to finish the sagas once the kills are over.
GUARD = 240.0
#: Seconds to wait for replies leased to a killed coordinator to come back (their lease,
#: the coordinator's replies subscription's ack_wait, is at most 10 s).
LEASES = 20.0


def messages(kills: int, rng: random.Random, workdir: Path, target: Target) -> RowResult:
    return _run("messages", kills, rng, workdir, target)


def inline(kills: int, rng: random.Random, workdir: Path, target: Target) -> RowResult:
    return _run("inline", kills, rng, workdir, target)


class _Procs:
    """The coordinator and the participant; their stderr goes to files in the workdir."""

    def __init__(self, url: str, mode: str, n: int, workdir: Path) -> None:
        self.args = (url, mode, str(n))
        self.workdir = workdir
        self.spawned = 0
        self.coordinator_log = workdir / "coordinator.err"
        self.coordinator = self._coordinator()
        try:
            self.participant = self._participant()
        except BaseException:
            _kill(self.coordinator)
            raise

    def _log(self, role: str) -> Path:
        self.spawned += 1
        return self.workdir / f"{role}-{self.spawned}.err"

    def _coordinator(self) -> subprocess.Popen[str]:
        self.coordinator_log = self._log("coordinator")
        with self.coordinator_log.open("w") as err:
            return spawn("_saga_child", "coordinator", *self.args, stderr=err)

    def _participant(self) -> subprocess.Popen[str]:
        log = self._log("participant")
        with log.open("w") as err:
            p = spawn("_saga_child", "participant", self.args[0], stderr=err)
        assert p.stdout is not None
        with watchdog(p, 60.0):
            line = p.stdout.readline().strip()
        if line != "ready":
            _kill(p)
            raise RuntimeError(f"the participant did not start: {log.read_text()[-500:]}")
        return p

    def restart(self, victim: str) -> None:
        if victim == "coordinator":
            _kill(self.coordinator)
            self.coordinator = self._coordinator()
        else:
            _kill(self.participant)
            self.participant = self._participant()

    def close(self) -> None:
        for p in (self.coordinator, self.participant):
            _kill(p)


def _run(mode: str, kills: int, rng: random.Random, workdir: Path, target: Target
         ) -> RowResult:
    res = RowResult(f"sagas/{mode}")
    url = target.url(workdir, f"sagas-{mode}")
    n = 20 + 10 * kills
    total = sum(amount(i) for i in range(n))
    # short of both: some sagas compensate at the credit step, some at the stock step
    funds = {"credit": total * 4 // 5, "stock": total * 3 // 5}
    asyncio.run(_seed(url, funds))
    started: set[str] = set()
    ended: dict[str, str] = {}
    procs = _Procs(url, mode, n, workdir)
    try:
        victims = ["coordinator", "participant"]
        rng.shuffle(victims)
        state = "more"
        for k in range(kills):
            # a random number of sagas end, then the next victim dies at once
            state = _follow(procs.coordinator, started, ended, rng.randint(1, 8))
            if state != "more":
                break
            procs.restart(victims[k % 2])
            res.kills += 1
        stalled = False
        if state == "more":
            with watchdog(procs.coordinator, GUARD) as fired:
                state = _follow(procs.coordinator, started, ended, n + 1)
            stalled = fired.is_set()
            res.expect(not stalled, f"the sagas did not finish within {GUARD:.0f}s of the "
                                    f"last kill ({len(ended)} of {n} ended)")
        if state == "exited" and not stalled:
            res.violate(f"the coordinator exited by itself: "
                        f"{procs.coordinator_log.read_text()[-500:]}")
    finally:
        procs.close()
    res.acked = len(started)
    asyncio.run(_check(url, n, funds, started, ended, res))
    return res


async def _seed(url: str, funds: dict[str, int]) -> None:
    async with await tidings.connect(url) as hub:
        for name, units in funds.items():
            await seed(hub, name, units)


def _follow(coordinator: subprocess.Popen[str], started: set[str], ended: dict[str, str],
            endings: int) -> str:
    """Read the coordinator's lines until `endings` sagas ended that had not before
    ('more'), it printed 'all done' ('done'), or it died ('exited')."""
    assert coordinator.stdout is not None
    new = 0
    while new < endings:
        line = coordinator.stdout.readline().split()
        if not line:
            return "exited"
        if line == ["all", "done"]:
            return "done"
        if line[0] == "started":
            started.add(line[1])
        elif line[0] == "ended":
            new += line[1] not in ended
            ended[line[1]] = line[2]
    return "more"


async def _check(url: str, n: int, funds: dict[str, int], started: set[str],
                 ended: dict[str, str], res: RowResult) -> None:
    async with await tidings.connect(url) as hub:
        runner = hub.sagas(definition())
        took: dict[str, int] = {}
        statuses: Counter[str] = Counter()
        for i in range(n):
            sid = f"s-{i}"
            try:
                state = await runner.get(sid)
            except tidings.NotFound:
                if sid in started:
                    res.lose(f"saga {sid} was started (acknowledged) but does not exist")
                else:
                    res.violate(f"saga {sid} was never started")
                continue
            statuses[state["status"]] += 1
            res.expect(state["status"] in ("completed", "compensated"),
                       f"saga {sid} is {state['status']} after the restarts")
            res.expect(ended.get(sid, state["status"]) == state["status"],
                       f"saga {sid} ended {ended.get(sid)} but is {state['status']} now")
            if state["data"].get("amount") != amount(i):
                res.corrupted(f"saga {sid}: data {state['data']}")
            if state["status"] == "completed":
                took[sid] = amount(i)
        res.notes += [f"{s}={c}" for s, c in sorted(statuses.items())]
        for name, units in funds.items():
            led = await ledger(hub, name)
            res.expect(led.held == took, f"{name}: held by {sorted(set(led.held) ^ set(took))} "
                                         "differs from what completed sagas took")
            res.expect(led.available + sum(led.held.values()) == units,
                       f"{name}: {led.available} available + {sum(led.held.values())} held "
                       f"!= {units} seeded")
            res.expect(led.low_water >= 0, f"{name} went negative ({led.low_water})")
            reserved = Counter([rec.event.saga async for rec in hub.events.read(name)
                                if isinstance(rec.event, SgReserved)])
            for sid, times in reserved.items():
                if times > 1:
                    res.duplicate(f"{name} reserved for saga {sid} {times} times")
        await _check_replies(hub, n, res)
    res.checked += ["acked starts exist", "none running/stuck after restart", "outcomes final",
                    "ledgers hold exactly what completed sagas took", "units conserved",
                    "never negative", "no command applied twice", "no stored reply lost"]


#: (step, kind, attempt) of one saga
Attempt = tuple[int, str, int]


async def _check_replies(hub: tidings.Hub, n: int, res: RowResult) -> None:
    """No reply a participant stored in time is lost: a step that timed out although its
    reply was stored before the deadline must have that reply recorded as `ReplyIgnored`
    (it came late). A reply still leased to a killed coordinator (the replies' `ack_wait`
    is at most 10 s) may yet come: when there are suspects, wait for those leases to end first
    (`hub`'s own coordinator then takes such replies and records them).

    Replies come to the coordinator that sent the command (`saga.soak.replies.<C>`). One
    sent to a coordinator killed before it took it is taken by nobody: the saga's next
    driver asks the attempt again, or times it out when its deadline passed while nobody
    drove it (its retry then gets the stored outcome, its compensation is fenced). Not a
    loss: what the command did is checked by the ledgers; such steps are noted, not lost."""
    replies = await _replies(hub)
    suspects = await _suspects(hub, n, replies)
    leased = await _leased(hub)
    if suspects and leased:
        loop = asyncio.get_running_loop()
        began = loop.time()
        while leased and loop.time() - began < LEASES:
            await asyncio.sleep(0.5)
            leased = await _leased(hub)
        if LEASES:
            res.notes.append(f"waited {loop.time() - began:.0f}s for leased replies")
        suspects = await _suspects(hub, n, replies)
    for sid, (step, kind, attempt), early in suspects:
        what = (f"saga {sid}: the reply to {kind} {step} attempt {attempt} was stored "
                f"{early:.1f}s before its deadline, but the step timed out and the reply was "
                "never applied")
        if leased:
            res.notes.append(f"maybe late, its lease had not ended: {what}")
        elif (sid, (step, kind, attempt)) in replies.orphans:
            res.notes.append(f"its coordinator died before taking it: {what}")
        else:
            res.lose(what)


async def _leased(hub: tidings.Hub) -> int:
    """Replies the coordinators' subscription has not acked (leased or not yet taken)."""
    return sum(sub["in_flight"] + sub["lag"] for t in await hub.topics()
               if t["topic"] == "saga.soak.replies" for sub in t["subscriptions"])


class Replies(dict[str, dict[Attempt, float]]):
    """When the first reply to each attempt was stored, by saga id; `orphans`: the
    attempts whose replies all went to coordinators that are gone (not `hub`'s)."""

    orphans: set[tuple[str, Attempt]]


async def _replies(hub: tidings.Hub) -> Replies:
    out = Replies()
    # (this hub's own coordinator, if it has one, is alive: it takes its replies)
    alive = getattr(hub._coordinator, "instance", "")
    taken: set[tuple[str, Attempt]] = set()
    every: set[tuple[str, Attempt]] = set()
    for pattern in ("saga.soak.replies", "saga.soak.replies.>"):
        async for m in hub.read(pattern):
            h = m.headers
            key = (int(h["saga-step"]), h["saga-kind"], int(h["saga-attempt"]))
            out.setdefault(h["saga-id"], {}).setdefault(key, m.time.timestamp())
            every.add((h["saga-id"], key))
            if m.topic == "saga.soak.replies" or m.headers.get("saga-coordinator") == alive:
                taken.add((h["saga-id"], key))
    out.orphans = every - taken
    return out


async def _suspects(hub: tidings.Hub, n: int, replies: Replies) -> list[tuple[str, Attempt, float]]:
    """Attempts that timed out although a reply was stored before their deadline and was
    not recorded as ignored: (saga id, attempt, how long before the deadline)."""
    out = []
    for i in range(n):
        sid = f"s-{i}"
        deadlines: dict[Attempt, float] = {}
        timed_out: list[Attempt] = []
        ignored: set[Attempt] = set()
        async for rec in hub.events.read(f"saga-soak-{sid}", raw=True):
            e, name = rec.json(), rec.type.rsplit(".", 1)[-1]
            kind = "compensation" if name.startswith("Compensation") else "action"
            key = (e.get("step", -1), e.get("kind", kind), e.get("attempt", -1))
            if name in ("StepStarted", "CompensationStarted") and e.get("deadline"):
                deadlines[key] = e["deadline"]
            elif name in ("StepFailed", "CompensationFailed") and str(
                    e.get("error", "")).startswith("no reply within"):
                timed_out.append(key)
            elif name == "ReplyIgnored":
                ignored.add(key)
        for key in timed_out:
            stored = replies.get(sid, {}).get(key)
            if stored is not None and stored < deadlines.get(key, 0.0) and key not in ignored:
                out.append((sid, key, deadlines[key] - stored))
    return out
