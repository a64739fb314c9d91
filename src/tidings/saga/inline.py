"""Inline command handlers: run by the coordinator itself, committed with the step.

`@hub.handler(..., inline=True)` marks a handler the saga coordinator on the
same hub runs in its own task. What the handler saves commits in ONE
transaction with the step's outcome, so the saga's stream is the inbox: an
attempt took effect with its outcome recorded, or not at all (then it runs
again). Consecutive inline steps of a saga form a unit of work, committed
together; the streams their handlers load are held in this process until the
commit (see `saga.unit`: wait-die, so never a deadlock).
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Coroutine, Generator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import InvalidArgument, Rejected
from ..eventsourcing.repository import CURRENT_UNIT
from ..messages import Message, OutMessage
from .definition import (
    Outcome,
    Pending,
    Saga,
    SagaState,
    on_outcome,
)
from .handlers import Command, CommandHandler
from .moves import InlineLookup, command_message
from .unit import Contended, Unit

if TYPE_CHECKING:
    from ..eventsourcing.aggregate import Aggregate
    from ..eventsourcing.events import Event
    from .clock import Clock
    from .inbox import Inbox

__all__ = ["InlineDriver", "commit_unit", "inline_for", "run_inline_steps", "run_unit"]

log = logging.getLogger("tidings.saga")

_UNIT_EVENTS = 64  # events of inline steps committed together at most


class InlineDriver(Protocol):
    """What running a saga's inline steps needs from its driver (`run.SagaRun`)."""

    @property
    def clock(self) -> Clock: ...

    @property
    def inbox(self) -> Inbox: ...

    def inline_handler(self, command: str) -> CommandHandler | None: ...

    def new_unit(self, state: SagaState) -> Unit:
        """A unit of work for the saga's next inline steps (older sagas have priority)."""
        ...

    def next_moves(self, defn: Saga, state: SagaState, events: list[Event], now: float
                   ) -> tuple[list[Event], list[OutMessage]]:
        """Fold `events` (and the next move, when it is immediate) into `state`: the
        events to commit and the messages to send with them (see `moves.next_moves`)."""
        ...

    async def commit_steps(self, defn: Saga, state: SagaState, expected: int,
                           batch: list[Event], saves: Sequence[Aggregate],
                           messages: list[OutMessage], headers: dict[str, str] | None
                           ) -> None:
        """Commit events folded into `state` (its stream at `expected`), the aggregates
        saved with them and the messages they send; then stamp their times."""
        ...


def inline_for(inline: InlineLookup, defn: Saga, p: Pending) -> CommandHandler | None:
    """The inline handler (looked up with `inline`) that runs attempt `p` here, if it
    is an inline attempt."""
    if not p.inline:
        return None
    step = defn.steps[p.step]
    command = step.command if p.kind == "action" else step.compensation
    return inline(command) if isinstance(command, str) else None


async def run_inline_steps(driver: InlineDriver, defn: Saga, state: SagaState) -> None:
    """Run inline attempts back to back and commit them, and all they changed, at once.

    The saga's stream is the inbox: an attempt either took effect with its outcome
    recorded, or not at all (and is run again after a crash). Consecutive inline
    steps share one transaction (a unit of work: a later step sees the aggregates an
    earlier one saved); the unit ends before anything that must be durable first — a
    step that is not inline, a wait, the end of the saga, a control message.
    """
    unit = driver.new_unit(state)
    expected = state.stream_version
    try:
        batch, messages = await run_unit(driver, defn, state, unit)
        await commit_unit(driver, defn, state, unit, expected, batch, messages)
    finally:
        unit.close()


async def commit_unit(driver: InlineDriver, defn: Saga, state: SagaState, unit: Unit,
                      expected: int, batch: list[Event], messages: list[OutMessage]) -> None:
    """Commit what a unit did: its events on the saga's stream (from `expected`), what
    its handlers saved, and the messages its moves send."""
    if batch:  # (none: it backed off before any step ended, nothing to record)
        await driver.commit_steps(defn, state, expected, batch,
                                  list(unit.aggregates.values()), messages,
                                  {"correlation-id": state.id})


async def run_unit(driver: InlineDriver, defn: Saga, state: SagaState, unit: Unit
                   ) -> tuple[list[Event], list[OutMessage]]:
    """Run the inline attempts in flight back to back in `unit` (folding their
    outcomes into `state`); the events and messages to commit with what the unit's
    handlers saved."""
    batch: list[Event] = []
    messages: list[OutMessage] = []
    inbox = driver.inbox
    while len(batch) < _UNIT_EVENTS:
        p = state.pending
        handler = inline_for(driver.inline_handler, defn, p) if p is not None else None
        if p is None or handler is None:
            break
        tel = handler.hub.telemetry
        if tel is None:
            outcome = await _run_inline(driver, handler, defn, state, unit)
        else:  # a `process` span, as if the command had come as a message
            with tel.inline(handler.command, handler.group, defn.name, state.id,
                            defn.steps[p.step].name, p.kind, p.attempt) as span:
                outcome = await _run_inline(driver, handler, defn, state, unit)
                tel.outcome(span, outcome)
        if outcome is None:
            break  # contended: commit what the unit did; the step runs again
        now = driver.clock.now()
        events, out = driver.next_moves(defn, state, on_outcome(defn, state, outcome, now),
                                        now)
        batch += events
        messages += out
        if not inbox.empty():
            break  # a cancel or a retry is applied once this much is recorded
    return batch, messages


async def _run_inline(driver: InlineDriver, handler: CommandHandler, defn: Saga,
                      state: SagaState, unit: Unit) -> Outcome | None:
    """Run a command's inline handler for the attempt in flight; what it saved joins
    `unit` when it succeeds. None: contended (it did not run)."""
    p = state.pending
    assert p is not None
    built = command_message(defn, state, p.step, p.kind, p.attempt)
    assert built is not None
    command, headers = built.topic, built.headers
    msg = Message(built.id, command, state.id, built.data, headers, time.time(), 0, 1)
    try:
        data = handler.decode(msg)
    except InvalidArgument as invalid:  # does not fit the handler's input type: never runs
        error = str(invalid)
        if p.kind == "compensation":  # never refused for good (see below)
            return Outcome("error", error=f"compensation rejected: {error}")
        return Outcome("rejected", error=error)
    cmd: Command[Any] = Command(command, data, headers["idempotency-key"], headers, msg)
    # Run in this task: a cancel arriving meanwhile waits in the queue until the
    # attempt is recorded. Not bounded by the handler's `concurrency` (that is for
    # deliveries): a saga runs one step at a time, and waiting for a slot while the
    # unit holds streams could deadlock with a unit holding the slot.
    outcome: Outcome
    token = CURRENT_UNIT.set(unit)  # the handler's loads join the unit
    try:
        result = await _eager(handler.fn(cmd), driver, p.deadline)
    except Contended:
        if unit.aggregates or unit.holding:
            return None  # not run: the unit ends here, the step starts the next one
        raise  # pragma: no cover - a unit's first stream is always waited for
    except TimeoutError:
        # not "timeout": that means "may have taken effect", and an inline attempt
        # that did not finish stored nothing
        outcome = Outcome("error", error="the inline handler did not finish in time")
    except Rejected as exc:
        outcome = Outcome("rejected", error=exc.reason)
    except Exception as exc:
        log.warning("saga %s: inline handler for %s failed: %r", state.id, command, exc)
        outcome = Outcome("error", error=f"{type(exc).__name__}: {exc}")
    else:
        if result is not None and not isinstance(result, dict):
            outcome = Outcome("error", error="a command handler must return a dict or None")
        else:
            outcome = Outcome("ok", result=result)
    finally:
        CURRENT_UNIT.reset(token)
    if outcome.kind == "ok":
        unit.add_saved(cmd._saves)
    elif outcome.kind == "rejected" and p.kind == "compensation":
        # as over messages: a compensation is never refused for good (see handlers.py)
        outcome = Outcome("error", error=f"compensation rejected: {outcome.error}")
    return outcome


async def _eager(coro: Coroutine[Any, Any, Any], driver: InlineDriver,
                 deadline: float | None) -> Any:
    """Run a handler's coroutine in this task; bounded by `deadline` (on the
    coordinator's clock) only once it waits for something.

    A handler whose loads and saves complete without waiting — the common case, on
    memory:// and with SQLite's inline reads — then costs no timer. This is what
    asyncio.timeout_at would do for such a handler anyway: a deadline can only
    interrupt an await.
    """
    try:
        waiting = coro.send(None)
    except StopIteration as done:
        return done.value
    loop = asyncio.get_running_loop()
    when = None if deadline is None else loop.time() + max(0.0, deadline - driver.clock.now())
    async with asyncio.timeout_at(when):
        return await _resume(coro, waiting)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting: Any) -> Generator[Any, None, Any]:
    """Go on with a coroutine that yielded `waiting` to its task: pass what it waits
    for up to this task, and the wake-up (or a cancellation) back down."""
    while True:
        try:
            yield waiting
        except BaseException as exc:  # cancelled (or thrown into) while it waits
            try:
                waiting = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting = coro.send(None)
            except StopIteration as done:
                return done.value
