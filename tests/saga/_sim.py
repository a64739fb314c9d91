"""A pure driver for the saga decision functions (no I/O, no real time).

`Sim` plays the coordinator's part: it asks `advance` what to do, records the
events with `evolve`, feeds outcomes to `on_outcome`, and jumps its clock to
each `Wait`. Tests script the outcomes and look at the events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from tidings.eventsourcing.events import Event
from tidings.saga.definition import (
    Outcome,
    Saga,
    SagaCancelRequested,
    SagaResumed,
    SagaStarted,
    SagaState,
    Step,
    Wait,
    advance,
    evolve,
    on_outcome,
)

T0 = 1_000.0


async def noop(data: dict[str, Any]) -> dict[str, Any] | None:
    return None


def local(name: str, *, comp: bool = True, **kw: Any) -> Step:
    """A local step (with a local compensation unless `comp=False`)."""
    return Step(name, action=noop, compensation=noop if comp else None, **kw)


def cmd(name: str, *, comp: bool = True, **kw: Any) -> Step:
    """A command step (with a command compensation unless `comp=False`)."""
    return Step(name, command=f"svc.{name}", compensation=f"svc.undo_{name}" if comp else None,
                **kw)


OK = Outcome("ok")


def rejected(why: str = "no") -> Outcome:
    return Outcome("rejected", error=why)


def error(why: str = "boom") -> Outcome:
    return Outcome("error", error=why)


TIMEOUT = Outcome("timeout", error="no reply")


class Sim:
    def __init__(self, defn: Saga, data: dict[str, Any] | None = None, now: float = T0) -> None:
        self.defn = defn
        self.now = now
        self.state = SagaState(id="s-1")
        self.events: list[Event] = []
        self.times: list[float] = []  # when each event was recorded
        self.record([SagaStarted(saga=defn.name, version=defn.version, data=data or {})])

    def record(self, events: Iterable[Event]) -> None:
        for ev in events:
            self.events.append(ev)
            self.times.append(self.now)
            evolve(self.defn, self.state, ev, self.now)

    @property
    def terminal(self) -> bool:
        return self.state.status in ("completed", "compensated", "stuck")

    def step(self, outcome: Outcome | None = None) -> Any:
        """One move: settle the pending attempt with `outcome`, or advance."""
        s = self.state
        if s.pending is not None:
            assert outcome is not None, f"an attempt is pending: {s.pending}"
            evs = on_outcome(self.defn, s, outcome, self.now)
            self.record(evs)
            return evs
        move = advance(self.defn, s, self.now)
        if isinstance(move, Wait):
            assert move.until > self.now
            self.now = move.until
            return move
        if move:
            self.record(move)
        return move

    def run(self, outcomes: Iterable[Outcome] | Callable[[], Outcome], *,
            cancel_at: int | None = None, limit: int = 10_000) -> SagaState:
        """Run to a terminal status, settling each attempt with the next outcome."""
        source = outcomes if callable(outcomes) else iter(outcomes).__next__
        for _ in range(limit):
            if self.terminal:
                return self.state
            if (cancel_at is not None and self.state.pending is None
                    and self.state.step == cancel_at and not self.state.cancel_requested
                    and self.state.status == "running"):
                self.record([SagaCancelRequested(reason="user cancelled")])
            if self.state.pending is not None:
                self.step(source())
            else:
                self.step()
        raise AssertionError(f"saga did not finish in {limit} moves: {self.state}")

    def resume(self) -> None:
        assert self.state.status == "stuck"
        self.record([SagaResumed()])

    def names(self) -> list[str]:
        return [type(e).__name__ for e in self.events]

    def of(self, cls: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]

    def replay(self) -> SagaState:
        """The state folded again from the recorded events (what a restart sees)."""
        st = SagaState(id="s-1")
        for ev in self.events:
            evolve(self.defn, st, ev, self.now)
        return st
