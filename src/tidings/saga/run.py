"""`SagaRun`: one saga driven by this process, its driver task and all it works from."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ClosedError, ConcurrencyError, Rejected, TidingsError
from ..eventsourcing.transaction import commit
from ..messages import OutMessage
from .definition import (
    Action,
    CompensationStarted,
    Outcome,
    ReplyIgnored,
    Saga,
    SagaCancelRequested,
    SagaResumed,
    SagaState,
    StepFailed,
    StepStarted,
    Wait,
    advance,
    on_outcome,
    stamp,
)
from .handlers import InboxAppend, fence_append
from .inbox import CancelRequest, Inbox, InboxMessage, Moved, Reply, RetryRequest
from .inline import inline_for, run_inline_steps
from .launch import Launch, run_first_unit
from .moves import attempt_message, forward_key, message_id, next_moves, stream_id
from .unit import Unit

if TYPE_CHECKING:
    from ..eventsourcing.aggregate import Aggregate
    from ..eventsourcing.events import Event
    from .coordinator import Coordinator
    from .handlers import CommandHandler

__all__ = ["SagaRun", "ended_or_stuck"]

log = logging.getLogger("tidings.saga")


def ended_or_stuck(state: SagaState) -> bool:
    """Whether the saga waits for nothing more (but a retry, if it is stuck)."""
    return state.done or state.status == "stuck"


class SagaRun:
    """One saga driven here: made when the coordinator starts driving it
    (`Coordinator.drive`), dropped when its driver task ends (`Coordinator._run_ended`).

    The driver loads the saga (or starts from the state `start()` hands it), then
    loops: apply what arrived in its inbox (replies, cancel and retry requests),
    make the definition's next move (`advance`), see the attempt in flight to its
    outcome — a command's reply, a local function, inline handlers — and record it
    (`on_outcome`). Every decision is stored before it is acted on. The driver ends
    when the saga is completed, compensated or stuck and its inbox is empty.
    """

    __slots__ = ("clock", "coord", "drive_again", "finished", "hub", "inbox", "launch", "name",
                 "saga_id", "sent", "sid", "task")

    def __init__(self, coord: Coordinator, name: str, saga_id: str, *, launch: Launch | None,
                 inbox: Inbox | None, sent: set[str] | None) -> None:
        self.coord = coord
        self.hub = coord.hub
        self.clock = coord.clock
        self.name = name
        self.saga_id = saga_id
        self.sid = stream_id(name, saga_id)
        self.inbox = inbox if inbox is not None else Inbox()
        #: its start() waiting for the driver's first unit (see launch.py), until taken
        self.launch = launch
        #: the ids of the command messages this driver committed or asked again (an
        #: attempt in flight that was not sent here is asked again: see _step)
        self.sent: set[str] = sent if sent is not None else set()
        #: a start of this id was stored while the driver was ending: drive it again
        self.drive_again = False
        #: resolved when the driver ends: the saga's final state, or None (see `drive`)
        self.finished: asyncio.Future[SagaState | None] = (
            asyncio.get_running_loop().create_future())
        #: its driver, running `drive` (started by Coordinator.drive)
        self.task: asyncio.Task[SagaState | None]

    # what inline units use (see inline.InlineDriver) -----------------------------------
    def inline_handler(self, command: str) -> CommandHandler | None:
        return self.coord.inline_handler(command)

    def new_unit(self, state: SagaState) -> Unit:
        return Unit(self.coord.stream_locks, (state.started, state.id))

    def next_moves(self, defn: Saga, state: SagaState, events: list[Event], now: float
                   ) -> tuple[list[Event], list[OutMessage]]:
        # (the commands count as sent here once committed: see commit_steps)
        return next_moves(defn, state, events, now, self.coord.inline_handler,
                          then_advance=self.inbox.empty(),
                          reply_to=self.coord.reply_to(self.name))

    async def commit_steps(self, defn: Saga, state: SagaState, expected: int,
                           batch: list[Event], saves: Sequence[Aggregate],
                           messages: list[OutMessage], headers: dict[str, str] | None
                           ) -> None:
        """Commit events already folded into `state` (the stream at `expected`), the
        aggregates saved with them and the messages they send; then stamp their times."""
        fence = await self._fence(defn, state, batch)
        appends: list[InboxAppend] = [] if fence is None else [fence]
        appends.append((self.sid, batch, expected, f"saga.{defn.name}.steps"))  # (last: stamped)
        outcomes = await commit(self.hub, saves, appends, messages, headers=headers)
        # Sent here only now: a commit that failed (the stream moved: another driver
        # wrote the same step, under the same message id) sent nothing, and the
        # other's reply does not come here; this driver asks again.
        self.sent.update(m.id for m in messages)
        stamp(state, len(batch), outcomes[-1].time)

    # the driver ----------------------------------------------------------------------------
    async def drive(self, state: SagaState | None) -> SagaState | None:
        """Drive the saga (from `state`, or as stored) until it is ended or stuck and its
        inbox is settled; its final state then (for wait(): no need to read the stream
        back), else None."""
        load = self.coord.load
        await self.coord.replies_ready(self.name)  # (before it sends a command)
        if state is None:
            state = await load(self.name, self.saga_id)
        if not state.version:
            return None
        if self.hub.telemetry is not None:  # (this task's) appends and spans join its trace
            self.hub.telemetry.adopt(state.trace)
        defn = self.coord.definition(self.name, state.version)
        if defn is None:
            log.warning("saga %s needs %s version %d, which this process does not have; "
                        "leaving it to a coordinator that registers it", self.saga_id,
                        self.name, state.version)
            return None
        inbox = self.inbox
        ended_before = state.done  # (counted by whoever ended it)
        stuck_before = state.status == "stuck"
        # An ended or stuck saga still settles its inbox: a late or duplicate reply is
        # recorded as ignored, and a retry resumes a stuck saga.
        while not ended_or_stuck(state) or not inbox.empty():
            try:
                launch, self.launch = self.launch, None
                if launch is not None:
                    going_on = await run_first_unit(self, defn, state, launch)
                    if going_on is None:
                        return None  # the start was not stored: nothing to drive
                    state = going_on
                elif ended_or_stuck(state):
                    await self._take(defn, state, inbox.get_nowait())
                else:
                    await self._step(defn, state)
            except ConcurrencyError:
                state = await load(self.name, self.saga_id)  # someone else wrote: look again
            except (asyncio.CancelledError, ClosedError):
                raise
            except TidingsError as exc:  # the engine is unavailable for a moment
                log.warning("saga %s: %s; retrying in a second", self.saga_id, exc)
                await asyncio.sleep(1.0)
                state = await load(self.name, self.saga_id)
        if state.done:
            self.coord.ended_here(self.sid, state)
            if not ended_before:
                self.hub.counters.on_saga_end(state)
        elif state.status == "stuck" and not stuck_before:  # an outcome too, until retried
            self.hub.counters.on_saga_end(state)
        return state

    async def _step(self, defn: Saga, state: SagaState) -> None:
        """Apply what arrived, then make the next move, or see the attempt in flight to
        its outcome and record it."""
        inbox = self.inbox
        while not inbox.empty():  # cancel and retry requests (and replies) first
            await self._take(defn, state, inbox.get_nowait())
        if state.pending is None:
            move = advance(defn, state, self.clock.now())
            if move is None:
                return
            if isinstance(move, Wait):
                await self._wait(move.until)
                return
            await self._append(defn, state, move)
            return
        p = state.pending
        step = defn.steps[p.step]
        target = step.action if p.kind == "action" else step.compensation
        outcome: Outcome | None
        if isinstance(target, str) or (p.kind == "action" and step.command is not None):
            if inline_for(self.coord.inline_handler, defn, p) is not None:
                await run_inline_steps(self, defn, state)
                return
            # An inline attempt is never sent from here: a coordinator with the inline
            # handler may be running it. Its outcome moves the saga's stream (this
            # driver's next write then conflicts and it looks again); otherwise its
            # deadline passes here and the next attempt goes out as a message.
            if not p.inline:
                mid = message_id(state, step.name, p.kind, p.attempt)
                if mid not in self.sent:  # sent elsewhere (its reply goes there)
                    # Asked again, its reply coming here: its sender may be gone (a
                    # restart, an adoption), or go before the reply comes. Past its
                    # deadline it is not: it times out now.
                    if p.deadline is None or p.deadline > self.clock.now():
                        await self._ask_again(defn, state)
                    else:
                        self.sent.add(mid)
            outcome = await self._await_reply(defn, state)
        else:
            assert target is not None  # (a local action, or a local compensation)
            outcome = await self._run_local(target, defn, state)
        if outcome is None:
            return  # interrupted by what arrived; look again
        if state.pending is p:
            await self._append(defn, state, on_outcome(defn, state, outcome, self.clock.now()))

    # the inbox ---------------------------------------------------------------------------
    async def _take(self, defn: Saga, state: SagaState, msg: InboxMessage) -> bool:
        """Apply an inbox message; True when it settled the attempt in flight.

        When recording it fails (another writer moved the stream, the engine is away for a
        moment), the message goes back to the front of the inbox before the error
        propagates: the driver reloads and applies it then. Nothing taken is dropped.
        """
        if isinstance(msg, Moved):  # written elsewhere: look again if behind it
            if msg.version > state.stream_version:
                raise ConcurrencyError(self.sid, state.stream_version, msg.version)
            return False
        try:
            return await self._apply(defn, state, msg)
        except BaseException:
            self.inbox.put_back(msg)
            raise

    async def _apply(self, defn: Saga, state: SagaState, msg: InboxMessage) -> bool:
        match msg:
            case Reply(step=step, kind=kind, attempt=attempt):
                p = state.pending
                settles = p is not None and (step, kind, attempt) == (p.step, p.kind,
                                                                      p.attempt)
                if settles:
                    await self._append(defn, state, on_outcome(defn, state, msg.outcome,
                                                               self.clock.now()))
                else:
                    reason = (f"saga already {state.status}" if ended_or_stuck(state)
                              else "stale reply for an earlier attempt or after its timeout")
                    await self._append(defn, state, [ReplyIgnored(
                        step=step, kind=kind, attempt=attempt, reason=reason)])
                if msg.delivered is not None:
                    await msg.delivered.ack()  # only now: the stream holds what it did
                return settles
            case CancelRequest(reason=reason):
                if not state.cancel_requested and state.status == "running":
                    await self._append(defn, state, [SagaCancelRequested(reason=reason)])
            case RetryRequest():
                if state.status == "stuck":
                    await self._append(defn, state, [SagaResumed()])
            case Moved():
                return False  # (taken by `_take`)
        if not msg.recorded.done():
            msg.recorded.set_result(None)  # the caller may return: it is in the stream
        return False

    async def _wait(self, until: float | None) -> None:
        """Wait for an inbox message (left in the inbox) or until `until`."""
        inbox = self.inbox
        getter = asyncio.ensure_future(inbox.get())
        sleeper = asyncio.ensure_future(self.clock.sleep_until(until)) if until else None
        waits = {getter} | ({sleeper} if sleeper else set())
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            if getter.done() and not getter.cancelled():
                inbox.put_back(getter.result())

    # attempts ----------------------------------------------------------------------------
    async def _await_reply(self, defn: Saga, state: SagaState) -> Outcome | None:
        p = state.pending
        assert p is not None
        inbox = self.inbox
        while True:
            if p.deadline is not None and self.clock.now() >= p.deadline:
                return Outcome("timeout", error=f"no reply within {defn.steps[p.step].timeout}s")
            await self._wait(p.deadline)
            while not inbox.empty():
                if await self._take(defn, state, inbox.get_nowait()):
                    return None  # the reply settled the attempt (events appended)
            if state.pending is not p:
                return None

    async def _run_local(self, fn: Action, defn: Saga, state: SagaState) -> Outcome:
        p = state.pending
        assert p is not None
        deadline = p.deadline
        inbox = self.inbox
        call = asyncio.ensure_future(fn(dict(state.data, saga_id=state.id)))
        sleeper = (asyncio.ensure_future(self.clock.sleep_until(deadline))
                   if deadline is not None else None)
        recording = True  # record what arrives while the action runs (a cancel, a reply)
        try:
            while not call.done() and not (sleeper is not None and sleeper.done()):
                getter = asyncio.ensure_future(inbox.get()) if recording else None
                waits: set[asyncio.Future[Any]] = {call}
                if getter is not None:
                    waits.add(getter)
                if sleeper is not None:
                    waits.add(sleeper)
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if getter is not None:
                        getter.cancel()
                if getter is not None and getter.done() and not getter.cancelled():
                    try:
                        await self._take(defn, state, getter.result())
                    except (ConcurrencyError, TidingsError):
                        # back in the inbox (see _take): settle the action first, the
                        # driver looks again afterwards
                        recording = False
        except BaseException:
            call.cancel()  # the driver is going away: do not leave the action running
            raise
        finally:
            if sleeper is not None:
                sleeper.cancel()
        if not call.done():
            call.cancel()
            return Outcome("timeout", error="the local action did not finish in time")
        exc = call.exception()
        if isinstance(exc, Rejected):
            return Outcome("rejected", error=exc.reason)
        if exc is not None:
            log.warning("saga %s: local step failed: %r", state.id, exc)
            return Outcome("error", error=f"{type(exc).__name__}: {exc}")
        result = call.result()
        if result is not None and not isinstance(result, dict):
            return Outcome("error", error="a step must return a dict or None")
        return Outcome("ok", result=result)

    async def _ask_again(self, defn: Saga, state: SagaState) -> None:
        """Ask the attempt in flight again, its reply coming here: it was sent by another
        coordinator, or by this process before it restarted, which may not be there to
        take the reply. The same idempotency key: the service runs the command once and
        answers a repeat with the stored outcome. Both ids count as sent here then."""
        p = state.pending
        assert p is not None
        ev: StepStarted | CompensationStarted = (
            StepStarted(step=p.step, attempt=p.attempt, deadline=p.deadline)
            if p.kind == "action" else
            CompensationStarted(step=p.step, attempt=p.attempt, deadline=p.deadline))
        coord = self.coord
        out = attempt_message(defn, state, ev, coord.reply_to(self.name),
                              again=True)
        if out is None:
            return
        tel = self.hub.telemetry
        if tel is None:
            self.hub.counters.on_publish([out], await self.hub.engine.append([out]))
        else:
            with tel.sending([out]):  # (a `send` span in the saga's trace, as the first had)
                self.hub.counters.on_publish([out], await self.hub.engine.append([out]))
        self.sent.update((out.id, message_id(state, defn.steps[p.step].name, p.kind,
                                              p.attempt)))

    # recording ---------------------------------------------------------------------------
    async def _append(self, defn: Saga, state: SagaState, events: list[Event]) -> None:
        """Record `events` and, folded into the same commit, the next move when it is
        immediate; commands to send and the end marker go in the same transaction."""
        expected = state.stream_version
        batch, messages = self.next_moves(defn, state, events, self.clock.now())
        await self.commit_steps(defn, state, expected, batch, (), messages, None)

    async def _fence(self, defn: Saga, state: SagaState, batch: list[Event]
                     ) -> InboxAppend | None:
        """The fence of a step given up on here whose compensation is not a command
        (a command compensation fences in the service, with its own effects): its
        command, if it has not run, must never run now."""
        i = state.fence
        if i is None or isinstance(defn.steps[i].compensation, str):
            return None
        if not any(isinstance(ev, StepFailed) and ev.step == i and ev.retry_at is None
                   for ev in batch):
            return None
        return await fence_append(self.hub, str(defn.steps[i].command),
                                  forward_key(state, defn.steps[i].name))
