"""The saga coordinator: drives each saga by its definition, durably.

Every decision is an event appended to the saga's stream before it is acted
on, so a coordinator killed at any moment resumes each unfinished saga from
its stream: an attempt in flight is re-sent under the same message id and
idempotency key (the engine and the handler's inbox drop the duplicate), a
deadline that passed while it was down fires at once.

Topics, per saga name N: `saga.N.started` / `saga.N.ended` (lifecycle, read
on start-up to find unfinished sagas), `saga.N.steps` (the rest), and
`saga.N.replies` (services' replies to its commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import (
    ClosedError,
    ConcurrencyError,
    EngineUnavailable,
    InvalidArgument,
    NotFound,
    Rejected,
    TidingsError,
)
from ..eventsourcing.records import NO_STREAM
from ..eventsourcing.repository import UNIT, Unit
from ..eventsourcing.transaction import commit
from ..messages import OutMessage, encode_data, new_id
from .clock import Clock, SystemClock
from .definition import (
    CompensationStarted,
    Outcome,
    ReplyIgnored,
    Saga,
    SagaCancelRequested,
    SagaCompensated,
    SagaCompleted,
    SagaResumed,
    SagaStarted,
    SagaState,
    StepFailed,
    StepStarted,
    Wait,
    advance,
    evolve,
    on_outcome,
    stamp,
    stamp_first,
)
from .handlers import FENCE_COMMAND, FENCE_KEY, CommandHandler, fence_append
from .inline import commit_unit, inline_for, run_inline_steps, run_unit

if TYPE_CHECKING:
    from ..eventsourcing.aggregate import Aggregate
    from ..eventsourcing.events import Event
    from ..hub import Hub

__all__ = ["Coordinator"]

log = logging.getLogger("tidings.saga")

_SIT_OUT = 0.25  # how long start() waits for an aggregate another saga holds, at most
_ENDED_KEPT = 1000  # final states of the sagas that ended here last, for wait()
_LIFECYCLE_START = (SagaStarted,)
_LIFECYCLE_END = (SagaCompleted, SagaCompensated)


def stream_id(name: str, saga_id: str) -> str:
    return f"saga-{name}-{saga_id}"


def _check_id(saga_id: object) -> str:
    if not isinstance(saga_id, str) or not saga_id or len(saga_id) > 120 or "\x00" in saga_id:
        raise InvalidArgument(
            f"saga id {saga_id!r} must be a non-empty str of at most 120 characters"
        )
    return saga_id


class _Reply:
    __slots__ = ("attempt", "kind", "outcome", "step")

    def __init__(self, step: int, kind: str, attempt: int, outcome: Outcome) -> None:
        self.step = step
        self.kind = kind
        self.attempt = attempt
        self.outcome = outcome


class Coordinator:
    """Runs the sagas of every definition registered on one hub."""

    def __init__(self, hub: Hub, clock: Clock | None = None) -> None:
        self.hub = hub
        self.clock: Clock = clock or SystemClock()
        self.defs: dict[str, dict[int, Saga]] = {}
        # (all keyed by the saga's stream id: ids are unique per saga name only)
        self._drivers: dict[str, asyncio.Task[SagaState | None]] = {}
        self._inbox: dict[str, _Inbox] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watching: set[str] = set()
        # saga id -> resolved with its final state when its driver here ends
        self._finished: dict[str, asyncio.Future[SagaState | None]] = {}
        self._local_starts: set[str] = set()  # started here, not yet seen by _follow
        # the final states of the sagas that ended here last (a saga often ends before
        # its starter calls wait(): no need to read it back)
        self._ended: OrderedDict[str, SagaState] = OrderedDict()
        # -> its start() waiting for its driver's first unit (see start)
        self._launches: dict[str, _Launch] = {}
        self._again: set[str] = set()  # to drive again once their ending driver is done
        self._inline: dict[str, CommandHandler] = {}  # command -> its inline handler here
        self._inline_seen = -1
        self._sent: dict[str, set[str]] = {}  # -> command ids this process sent

    # registration ---------------------------------------------------------------
    def register(self, defn: Saga) -> None:
        versions = self.defs.setdefault(defn.name, {})
        known = versions.get(defn.version)
        if known is not None and known is not defn:
            if [s.name for s in known.steps] != [s.name for s in defn.steps]:
                raise InvalidArgument(
                    f"saga {defn.name!r} version {defn.version} is registered with other "
                    "steps; give the changed definition a new version"
                )
        versions[defn.version] = defn
        if defn.name not in self._watching:
            self._watching.add(defn.name)
            self._spawn(self._follow(defn.name), f"tidings:saga:{defn.name}:follow")
            self._spawn(self._replies(defn.name), f"tidings:saga:{defn.name}:replies")

    def latest(self, name: str) -> Saga:
        return self.defs[name][max(self.defs[name])]

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_crash)
        return task

    async def close(self) -> None:
        tasks = list(self._tasks) + list(self._drivers.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # state ------------------------------------------------------------------------
    async def load(self, name: str, saga_id: str) -> SagaState:
        state = SagaState(id=saga_id)
        defn: Saga | None = None
        async for rec in self.hub.events.read(stream_id(name, saga_id)):
            ev = rec.event
            if isinstance(ev, SagaStarted):
                defn = self.defs.get(name, {}).get(ev.version)
            evolve(defn, state, ev, rec.timestamp)
        return state

    # starting ---------------------------------------------------------------------
    async def start(self, defn: Saga, data: dict[str, Any], saga_id: str | None) -> str:
        if not isinstance(data, dict):
            raise InvalidArgument("saga data must be a dict (JSON object)")
        given = saga_id is not None
        saga_id = _check_id(saga_id) if saga_id is not None else new_id()
        # The start and the first step's command commit together; the driver begins
        # from this state instead of reading the stream back.
        sid = stream_id(defn.name, saga_id)
        if given and await self.hub.events.backend.stream_version(sid):
            return saga_id  # started before: starting again is a no-op (and runs nothing)
        state, started, batch, messages = self._starting(defn, saga_id, data)
        appends: list[tuple[str, list[Event], int | Any, str]] = [
            (sid, [started], NO_STREAM, f"saga.{defn.name}.started")]
        if batch:
            appends.append((sid, batch, 1, f"saga.{defn.name}.steps"))
        launch: _Launch | None = None
        if (state.pending is not None and inline_for(self, defn, state.pending) is not None
                and sid not in self._drivers):  # (else: see _commit_launch)
            # The first steps are inline: the saga's driver runs them right away, in its
            # own task. If they finish without waiting (a wait for an aggregate another
            # saga holds is sat out), it commits them with the start: one transaction,
            # often the whole saga. If a handler waits for anything else (I/O), the start
            # is committed here, alone, and the driver commits the unit when it is done.
            launch = _Launch(appends, messages, sit_out=UNIT.get() is None)
            self._local_starts.add(sid)
            self._drive(defn.name, saga_id, state, launch)
            asyncio.get_running_loop().call_soon(launch.look)  # right after its first step
            try:
                done = await launch.ready
            except asyncio.CancelledError:
                launch.failed(stored=False)  # start() stores nothing: the driver looks
                raise
            if done is not None:  # the driver committed the start, with the unit
                if done is True or isinstance(done, ConcurrencyError):
                    return saga_id  # (a ConcurrencyError: started before, a no-op)
                if isinstance(done, asyncio.CancelledError):  # (the hub is closing)
                    raise ClosedError(
                        f"saga {saga_id!r} was starting as its hub closed; it may or may not "
                        "be stored: start it again with the same id on an open hub")
                assert isinstance(done, BaseException)
                raise done
        self._local_starts.add(sid)
        try:
            outcomes = await commit(self.hub, [], appends, messages,
                                    headers={"correlation-id": saga_id})
        except BaseException as exc:
            if launch is not None:  # its driver looks at what is stored, and goes on
                launch.failed(stored=False if isinstance(exc, ConcurrencyError) else None)
            self._local_starts.discard(sid)
            if isinstance(exc, ConcurrencyError):
                return saga_id  # started before: starting again is a no-op
            # the commit may have landed before the failure: whoever drives it looks
            if sid in self._drivers:
                self._again.add(sid)
            elif not self.hub.closed:
                self._drive(defn.name, saga_id)
            raise
        if launch is not None:
            launch.stored(outcomes[-1].time)  # its driver commits its unit next
            if sid not in self._drivers and not self.hub.closed:
                self._drive(defn.name, saga_id)  # (its driver went away meanwhile)
            return saga_id
        stamp(state, 1 + len(batch), outcomes[-1].time)
        if sid in self._drivers:  # a driver of an earlier start with this id is ending:
            self._again.add(sid)  # this saga is driven once it is gone
        self._drive(defn.name, saga_id, state)
        return saga_id

    def _starting(self, defn: Saga, saga_id: str, data: dict[str, Any]
                  ) -> tuple[SagaState, SagaStarted, list[Event], list[OutMessage]]:
        """A new saga's state, its SagaStarted, and its first move (events, messages)."""
        state = SagaState(id=saga_id)
        now = self.clock.now()
        started = SagaStarted(saga=defn.name, version=defn.version, data=data)
        evolve(defn, state, started, now)
        batch, messages = self._next_moves(defn, state, [], now)
        return state, started, batch, messages

    def _drive(self, name: str, saga_id: str, state: SagaState | None = None,
               launch: _Launch | None = None) -> None:
        key = stream_id(name, saga_id)
        if key in self._drivers:
            return
        if key not in self._inbox:
            self._inbox[key] = _Inbox()
        if key not in self._finished:
            self._finished[key] = asyncio.get_running_loop().create_future()
        if launch is not None:
            self._launches[key] = launch
        task = asyncio.get_running_loop().create_task(
            self._driver(name, saga_id, state), name=f"tidings:saga:{saga_id}"
        )
        self._drivers[key] = task
        task.add_done_callback(functools.partial(self._driver_done, name, saga_id))
        task.add_done_callback(_log_crash)

    def _driver_done(self, name: str, saga_id: str,
                     task: asyncio.Task[SagaState | None]) -> None:
        key = stream_id(name, saga_id)
        self._drivers.pop(key, None)
        launch = self._launches.pop(key, None)
        if launch is not None:
            launch.abandon()  # (it went away first: the start goes on without it)
        queue = self._inbox.pop(key, None)
        fut = self._finished.pop(key, None)
        final = None if task.cancelled() or task.exception() else task.result()
        if fut is not None and not fut.done():
            fut.set_result(final)
        again = key in self._again  # asked for while it was ending (a start stored meanwhile)
        self._again.discard(key)
        waiting = queue is not None and not queue.empty()
        if not self.hub.closed and (again or (waiting and final is not None)):
            # look again; a reply or a retry that arrived as it finished goes along
            self._drive(name, saga_id)
            if queue is not None:
                fresh = self._inbox[key]
                while not queue.empty():
                    fresh.put_nowait(queue.get_nowait())
            return
        if queue is None:
            return
        # nobody drives it here any more: a waiting cancel or retry must not wait forever
        while not queue.empty():
            item = queue.get_nowait()
            if not isinstance(item, _Reply) and not item[2].done():
                item[2].set_exception(EngineUnavailable(
                    f"saga {saga_id!r} is not driven by this process any more (it closed, "
                    "or the driver failed); ask again"))

    # the driver ---------------------------------------------------------------------
    async def _driver(self, name: str, saga_id: str, state: SagaState | None
                      ) -> SagaState | None:
        """Drive one saga until it is finished or stuck; its final state when it got
        there (for wait(): no need to read the stream back), else None.

        A saga's first inline unit runs here while its start() waits (`_launched`).
        """
        key = stream_id(name, saga_id)
        queue = self._inbox[key]
        if state is None:
            state = await self.load(name, saga_id)
        if not state.version:
            return None
        defn = self.defs.get(name, {}).get(state.version)
        if defn is None:
            log.warning("saga %s needs %s version %d, which this process does not have; "
                        "leaving it to a coordinator that registers it", saga_id, name,
                        state.version)
            return None
        sid = stream_id(name, saga_id)
        # A finished or stuck saga still settles its inbox: a late or duplicate reply is
        # recorded as ignored, and a retry resumes a stuck saga (whose driver starts here).
        while not (state.done or state.status == "stuck") or not queue.empty():
            try:
                launch = self._launches.pop(key, None)
                if launch is not None:
                    going_on = await self._launched(defn, state, sid, queue, launch)
                    if going_on is None:
                        return None  # the start was not stored: nothing to drive
                    state = going_on
                elif state.done or state.status == "stuck":
                    await self._handle_item(defn, state, sid, queue.get_nowait())
                else:
                    await self._pump(defn, state, sid, queue)
            except ConcurrencyError:
                state = await self.load(name, saga_id)  # someone else wrote: look again
            except (asyncio.CancelledError, ClosedError):
                raise
            except TidingsError as exc:  # the engine is unavailable for a moment
                log.warning("saga %s: %s; retrying in a second", saga_id, exc)
                await asyncio.sleep(1.0)
                state = await self.load(name, saga_id)
        self._sent.pop(key, None)
        if state.done:  # for a wait() that comes after its end, too
            ended = self._ended
            ended[key] = state
            if len(ended) > _ENDED_KEPT:
                ended.popitem(last=False)
        return state

    async def _launched(self, defn: Saga, state: SagaState, sid: str, queue: _Inbox,
                        launch: _Launch) -> SagaState | None:
        """A new saga's first unit, run while its start() waits (see start); the state
        to go on from, or None when the start was not stored."""
        unit = launch.unit = Unit((state.started, state.id))
        expected = state.stream_version
        try:
            batch, messages = await run_unit(self, defn, state, unit, queue)
            if not launch.ready.done():  # no handler waited: commit it all, here and now
                launch.claimed = True
                return await self._commit_launch(defn, state, sid, unit, launch, batch,
                                                 messages)
            stored = await launch.outcome()  # start() stores the start alone
            if stored is None:  # its commit failed late: was it stored?
                fresh = await self.load(defn.name, state.id)
                if not fresh.version:
                    return None
                stamp_first(state, expected, fresh.started)
            elif not stored:  # (another start stored it, or none did): as stored
                return await self._go_on(defn, state.id)
            else:
                stamp_first(state, expected, launch.time)
            await commit_unit(self, defn, state, sid, unit, expected, batch, messages)
            return state
        finally:
            unit.close()

    async def _go_on(self, defn: Saga, saga_id: str) -> SagaState | None:
        """After a launch that did not store what its driver did: the saga as stored,
        to drive on (another start of this id may have stored it), or None."""
        fresh = await self.load(defn.name, saga_id)
        return fresh if fresh.version and not fresh.done else None

    async def _commit_launch(self, defn: Saga, state: SagaState, sid: str, unit: Unit,
                             launch: _Launch, batch: list[Event],
                             messages: list[OutMessage]) -> SagaState | None:
        """Commit a saga's start with its first unit (for its start(), which waits)."""
        # the start's two appends (its SagaStarted, its first move), the unit's events
        # joining the second
        appends = list(launch.appends)
        _, (_, first, version, topic) = appends
        appends[1] = (sid, [*first, *batch], version, topic)
        try:
            outcomes = await commit(self.hub, list(unit.aggregates.values()), appends,
                                    [*launch.messages, *messages],
                                    headers={"correlation-id": state.id})
        except ConcurrencyError as exc:
            if exc.stream_id != sid:
                # one of the unit's aggregates moved meanwhile (another writer): the unit
                # is void; start() stores the start alone, and the step runs again
                launch.claimed = False
                launch.answer(None)
                await launch.outcome()
            else:  # started before (another start with this id): start() is a no-op
                self._local_starts.discard(sid)
                launch.answer(exc)
            return await self._go_on(defn, state.id)
        except BaseException as exc:
            launch.answer(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._local_starts.discard(sid)  # (so _follow drives it if stored)
            return await self._go_on(defn, state.id)  # did it land before it failed?
        stamp(state, sum(len(a[1]) for a in appends), outcomes[-1].time)
        launch.answer(True)
        return state

    async def _append(self, defn: Saga, state: SagaState, sid: str,
                      events: list[Event], saves: Sequence[Aggregate] = (),
                      headers: dict[str, str] | None = None) -> None:
        """Record `events` and, folded into the same commit, the next move when it is
        immediate; commands to send and the end marker go in the same transaction.

        The saga's stream is its outbox: a command is published exactly when the
        event that decides to send it is stored.
        """
        expected = state.stream_version
        batch, messages = self._next_moves(defn, state, events, self.clock.now())
        await self._commit_steps(defn, state, sid, expected, batch, saves, messages, headers)

    async def _commit_steps(self, defn: Saga, state: SagaState, sid: str, expected: int,
                            batch: list[Event], saves: Sequence[Aggregate],
                            messages: list[OutMessage],
                            headers: dict[str, str] | None) -> None:
        """Commit events already folded into `state` (the stream at `expected`), the
        aggregates saved with them and the messages they send; then stamp their times."""
        fence = await self._fence(defn, state, batch)
        appends: list[Any] = [] if fence is None else [fence]
        appends.append((sid, batch, expected, f"saga.{defn.name}.steps"))  # (last: stamped)
        outcomes = await commit(self.hub, saves, appends, messages, headers=headers)
        stamp(state, len(batch), outcomes[-1].time)

    async def _fence(self, defn: Saga, state: SagaState, batch: list[Event]
                     ) -> tuple[str, list[Event], int, str] | None:
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
                                  _forward_key(state, defn.steps[i].name))

    def _next_moves(self, defn: Saga, state: SagaState, events: list[Event], now: float
                    ) -> tuple[list[Event], list[OutMessage]]:
        """Apply `events` and the next move when it is immediate; the commands and end
        marker they call for."""
        batch = [self._mark_inline(defn, state, ev) for ev in events]
        for ev in batch:
            evolve(defn, state, ev, now)
        # Fold in the next move only when nothing waits in the saga's inbox: a cancel (or
        # a reply) that arrived meanwhile is applied first, so a cancel between steps
        # stops the saga before the next step.
        queue = self._inbox.get(stream_id(defn.name, state.id))
        nxt = advance(defn, state, now) if queue is None or queue.empty() else None
        if isinstance(nxt, list):
            nxt = [self._mark_inline(defn, state, ev) for ev in nxt]
            for ev in nxt:
                evolve(defn, state, ev, now)
            batch += nxt
        messages = []
        for ev in batch:
            if isinstance(ev, (StepStarted, CompensationStarted)):
                out = self._command(defn, state, ev)
                if out is not None:
                    messages.append(out)
            elif isinstance(ev, _LIFECYCLE_END):
                messages.append(OutMessage(new_id(), f"saga.{defn.name}.ended", state.id,
                                           b"{}", {"stream-id": stream_id(defn.name, state.id),
                                                   "status": state.status,
                                                   "content-type": "application/json"}))
        return batch, messages

    def _mark_inline(self, defn: Saga, state: SagaState, ev: Event) -> Event:
        """An attempt of a command with an inline handler here is run inline, unless an
        earlier attempt of it went out as a message (the service's inbox has that one:
        only the message path deduplicates against it)."""
        if (isinstance(ev, (StepStarted, CompensationStarted)) and not ev.inline
                and not state.messaged
                # a fencing compensation runs where the command's inbox is, as a message
                and not (isinstance(ev, CompensationStarted) and ev.step == state.fence)):
            step = defn.steps[ev.step]
            command = step.command if isinstance(ev, StepStarted) else step.compensation
            if isinstance(command, str) and self._inline_handler(command) is not None:
                return msgspec.structs.replace(ev, inline=True)
        return ev

    def _inline_handler(self, command: str) -> CommandHandler | None:
        handlers = self.hub.command_handlers
        if len(handlers) != self._inline_seen:
            self._inline_seen = len(handlers)
            self._inline = {h.command: h for h in handlers if h.inline}
        return self._inline.get(command)

    def _command(self, defn: Saga, state: SagaState, ev: StepStarted | CompensationStarted
                 ) -> OutMessage | None:
        if ev.inline:
            return None  # run by an inline handler in the driver's own transaction
        built = self._command_parts(
            defn, state, ev.step, "action" if isinstance(ev, StepStarted) else "compensation",
            ev.attempt)
        if built is None:
            return None  # a local function: run by the driver
        msg_id, command, data, headers = built
        self._sent.setdefault(stream_id(defn.name, state.id), set()).add(msg_id)
        return OutMessage(msg_id, command, state.id, data, headers, True)

    def _command_parts(self, defn: Saga, state: SagaState, index: int, kind: str,
                       attempt: int) -> tuple[str, str, bytes, dict[str, str]] | None:
        """(message id, command, payload, headers) of the command attempt `attempt` of
        step `index` sends (`kind`: its action or its compensation)."""
        step = defn.steps[index]
        command = step.command if kind == "action" else step.compensation
        if not isinstance(command, str):
            return None
        headers = {
            "saga-id": state.id, "saga-name": defn.name, "saga-version": str(defn.version),
            "saga-step": str(index), "saga-step-name": step.name, "saga-kind": kind,
            "saga-attempt": str(attempt), "reply-to": f"saga.{defn.name}.replies",
            "idempotency-key": _idempotency_key(state, step.name, kind),
            "correlation-id": state.id, "content-type": "application/json",
        }
        payload = dict(state.data, saga_id=state.id)
        if kind == "compensation":
            payload["reason"] = state.reason or "compensated"
            if index == state.fence and isinstance(step.command, str):
                # the step's command may still arrive: the handler fences it
                headers[FENCE_COMMAND] = step.command
                headers[FENCE_KEY] = _forward_key(state, step.name)
        data, _ = encode_data(payload)
        # The same id every time this attempt is (re)sent: the engine keeps one copy.
        return f"{state.id}:{step.name}:{kind}:{attempt}", command, data, headers

    async def _pump(self, defn: Saga, state: SagaState, sid: str,
                    queue: _Inbox) -> None:
        # control messages (cancel / retry) first
        while not queue.empty():
            item = queue.get_nowait()
            await self._handle_item(defn, state, sid, item)
        if state.pending is None:
            move = advance(defn, state, self.clock.now())
            if move is None:
                return
            if isinstance(move, Wait):
                await self._wait(queue, move.until)
                return
            await self._append(defn, state, sid, move)
            return
        p = state.pending
        step = defn.steps[p.step]
        target = (step.action if p.kind == "action" else step.compensation)
        outcome: Outcome | None
        if isinstance(target, str) or (p.kind == "action" and step.command is not None):
            if inline_for(self, defn, p) is not None:
                await run_inline_steps(self, defn, state, sid, queue)
                return
            else:
                # An inline attempt is never sent from here: a coordinator with the inline
                # handler may be running it. Its outcome moves the saga's stream (this
                # driver's next write then conflicts and it looks again); otherwise its
                # deadline passes here and the next attempt goes out as a message.
                sent = f"{state.id}:{step.name}:{p.kind}:{p.attempt}"
                if not p.inline and sent not in self._sent.get(sid, ()):
                    await self._send(defn, state)  # resuming: this process has not sent it
                outcome = await self._await_reply(defn, state, sid, queue)
        else:
            outcome = await self._run_local(target, defn, state, sid, queue)
        if outcome is None:
            return  # interrupted by a control message; look again
        if state.pending is p:
            await self._append(defn, state, sid, on_outcome(defn, state, outcome,
                                                            self.clock.now()))

    async def _handle_item(self, defn: Saga, state: SagaState, sid: str, item: Any) -> bool:
        """Apply a control message or a reply; True when it settled the pending attempt.

        When recording it fails (another writer moved the stream, the engine is away for a
        moment), the item goes back to the front of the saga's queue before the error
        propagates: the driver reloads and applies it then. Nothing taken is dropped.
        """
        try:
            return await self._apply_item(defn, state, sid, item)
        except BaseException:
            queue = self._inbox.get(sid)
            if queue is not None:
                _requeue(queue, item)
            raise

    async def _apply_item(self, defn: Saga, state: SagaState, sid: str, item: Any) -> bool:
        if isinstance(item, _Reply):
            p = state.pending
            if p is not None and (item.step, item.kind, item.attempt) == (p.step, p.kind,
                                                                          p.attempt):
                await self._append(defn, state, sid, on_outcome(defn, state, item.outcome,
                                                                self.clock.now()))
                return True
            reason = (f"saga already {state.status}" if state.done or state.status == "stuck"
                      else "stale reply for an earlier attempt or after its timeout")
            await self._append(defn, state, sid, [ReplyIgnored(
                step=item.step, kind=item.kind, attempt=item.attempt, reason=reason)])
            return False
        kind, arg, recorded = item
        if kind == "cancel" and not state.cancel_requested and state.status == "running":
            await self._append(defn, state, sid, [SagaCancelRequested(reason=arg)])
        elif kind == "retry" and state.status == "stuck":
            await self._append(defn, state, sid, [SagaResumed()])
        if not recorded.done():
            recorded.set_result(None)  # the caller may return: it is in the stream
        return False

    async def _wait(self, queue: _Inbox, until: float | None) -> None:
        """Wait for a queue item (left in the queue) or until `until`."""
        getter = asyncio.ensure_future(queue.get())
        sleeper = asyncio.ensure_future(self.clock.sleep_until(until)) if until else None
        waits = {getter} | ({sleeper} if sleeper else set())
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            if getter.done() and not getter.cancelled():
                _requeue(queue, getter.result())

    async def _await_reply(self, defn: Saga, state: SagaState, sid: str,
                           queue: _Inbox) -> Outcome | None:
        p = state.pending
        assert p is not None
        while True:
            if p.deadline is not None and self.clock.now() >= p.deadline:
                return Outcome("timeout", error=f"no reply within {defn.steps[p.step].timeout}s")
            await self._wait(queue, p.deadline)
            while not queue.empty():
                item = queue.get_nowait()
                if await self._handle_item(defn, state, sid, item):
                    return None  # the reply settled the attempt (events appended)
            if state.pending is not p:
                return None

    async def _run_local(self, fn: Any, defn: Saga, state: SagaState, sid: str,
                         queue: _Inbox) -> Outcome:
        p = state.pending
        assert p is not None
        deadline = p.deadline
        call = asyncio.ensure_future(fn(dict(state.data, saga_id=state.id)))
        sleeper = (asyncio.ensure_future(self.clock.sleep_until(deadline))
                   if deadline is not None else None)
        recording = True  # record what arrives while the action runs (a cancel, a reply)
        try:
            while not call.done() and not (sleeper is not None and sleeper.done()):
                getter = asyncio.ensure_future(queue.get()) if recording else None
                waits = {call} | ({getter} if getter else set()) | ({sleeper} if sleeper
                                                                     else set())
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if getter is not None:
                        getter.cancel()
                if getter is not None and getter.done() and not getter.cancelled():
                    try:
                        await self._handle_item(defn, state, sid, getter.result())
                    except (ConcurrencyError, TidingsError):
                        # back in the queue (see _handle_item): settle the action first,
                        # the driver looks again afterwards
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

    async def _send(self, defn: Saga, state: SagaState) -> None:
        """Re-send the attempt in flight (after a restart); the engine drops a duplicate."""
        p = state.pending
        assert p is not None
        ev: StepStarted | CompensationStarted = (
            StepStarted(step=p.step, attempt=p.attempt, deadline=p.deadline)
            if p.kind == "action" else
            CompensationStarted(step=p.step, attempt=p.attempt, deadline=p.deadline))
        out = self._command(defn, state, ev)
        if out is not None:
            await self.hub.engine.append([out])

    # replies and discovery ----------------------------------------------------------------
    async def _replies(self, name: str) -> None:
        sub = await self.hub.subscribe(f"saga.{name}.replies", group="saga-coordinator",
                                       max_in_flight=1000, ack_wait=60.0, max_deliver=1000)
        async for msg in sub:
            h = msg.headers
            try:
                result = msg.decode() or None
                outcome = Outcome(h.get("status", "ok"),  # type: ignore[arg-type]
                                  result=result, error=h.get("error", ""))
                if result is not None and not isinstance(result, dict):
                    # (a reply not from hub.handler) the saga's data is JSON objects
                    outcome = Outcome("error", error="a reply must be a JSON object or empty")
                reply = _Reply(int(h["saga-step"]), h["saga-kind"], int(h["saga-attempt"]),
                               outcome)
                saga_id = h["saga-id"]
            except (KeyError, ValueError, TidingsError):
                log.warning("dropping a malformed saga reply at position %d", msg.position)
                await msg.term()
                continue
            await self._deliver(name, saga_id, reply)
            await msg.ack()

    async def _deliver(self, name: str, saga_id: str, item: Any) -> None:
        key = stream_id(name, saga_id)
        queue = self._inbox.get(key)
        if queue is None:
            state = await self.load(name, saga_id)
            if not state.version:
                return
            if state.done or state.status == "stuck":
                if isinstance(item, _Reply):
                    with contextlib.suppress(ConcurrencyError):
                        await self.hub.events.append(
                            stream_id(name, saga_id),
                            [ReplyIgnored(step=item.step, kind=item.kind, attempt=item.attempt,
                                          reason=f"saga already {state.status}")],
                            expected_version=state.stream_version, topic=f"saga.{name}.steps")
                    return
            self._drive(name, saga_id)
            queue = self._inbox[key]
        queue.put_nowait(item)

    async def _follow(self, name: str) -> None:
        """Resume unfinished sagas at start-up, then pick up sagas other processes start."""
        ended: set[str] = set()
        started: list[str] = []
        async for m in self.hub.read(f"saga.{name}.ended"):
            ended.add(m.headers.get("stream-id", ""))
        last = 0
        async for m in self.hub.read(f"saga.{name}.started"):
            started.append(m.headers.get("stream-id", ""))
            last = m.position
        prefix = f"saga-{name}-"
        for sid in started:  # driven from their start here already, or resumed just below
            self._local_starts.discard(sid)
        for sid in started:
            if sid not in ended and sid.startswith(prefix):
                self._drive(name, sid[len(prefix):])
        async for m in self.hub.read(f"saga.{name}.started", start=last + 1, follow=True):
            sid = m.headers.get("stream-id", "")
            if sid.startswith(prefix):
                saga_id = sid[len(prefix):]
                if sid in self._local_starts:
                    self._local_starts.discard(sid)  # driven here from its start
                    continue
                if sid not in self._drivers:
                    state = await self.load(name, saga_id)
                    if not state.done:
                        self._drive(name, saga_id)

    async def control(self, name: str, saga_id: str, kind: str, arg: Any) -> None:
        state = await self.load(name, saga_id)
        if not state.version:
            raise NotFound(f"no saga {saga_id!r} of {name!r}")
        if kind == "retry" and state.status != "stuck":
            raise InvalidArgument(f"saga {saga_id!r} is {state.status}, not stuck; "
                                  "only a stuck saga can be retried")
        if kind == "cancel" and state.status != "running":
            raise InvalidArgument(f"saga {saga_id!r} is {state.status}; only a running "
                                  "saga can be cancelled")
        if state.version not in self.defs.get(name, {}):
            raise InvalidArgument(
                f"saga {saga_id!r} runs version {state.version} of {name!r}, which this "
                "process does not register; do this where that version is registered")
        self._drive(name, saga_id)
        queue = self._inbox.get(stream_id(name, saga_id))
        if queue is not None:
            # Returns once the driver has stored the request in the saga's stream, so a
            # crash after this call cannot lose it. Shielded: cancelling the caller does
            # not withdraw the request, and compensation runs to completion regardless.
            recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue.put_nowait((kind, arg, recorded))
            await asyncio.shield(recorded)

    async def wait(self, name: str, saga_id: str, timeout: float | None) -> SagaState:
        """Wait until the saga is completed, compensated or stuck."""
        key = stream_id(name, saga_id)
        ended = self._ended.get(key)
        if ended is not None:
            return ended  # as stored: stamped with the store's times

        async def until_done() -> SagaState:
            while True:
                fut = self._finished.get(key)
                if fut is not None:  # driven here: its end is the signal, no polling
                    if not fut.done():
                        await asyncio.shield(fut)  # (shared: one waiter's timeout is its own)
                    final = fut.result()
                    if final is not None and (final.done or final.status == "stuck"):
                        return final  # as stored: stamped with the store's times
                # taken before loading, so a driver finishing in between is not missed
                fut = self._finished.get(key)
                changed = self.hub.engine.changes()
                state = await self.load(name, saga_id)
                if state.done or state.status == "stuck" or not state.version:
                    return state
                if fut is None:  # driven by another process: look again when the log changes
                    await self.hub.engine.wait(changed, 0.5)

        async with asyncio.timeout(timeout):
            return await until_done()


def _forward_key(state: SagaState, step: str) -> str:
    """The idempotency key a step's command went out under, before the saga gave up
    on it (a step that is compensated is before the pivot, so never resumed)."""
    return f"{state.id}:{step}:action"


def _idempotency_key(state: SagaState, step: str, kind: str) -> str:
    key = f"{state.id}:{step}:{kind}"
    if kind == "action" and state.base:
        # A forward step retried by hand after a rejection past the pivot: the service's
        # inbox holds that rejection under the old key (and nothing else: a rejection
        # stores no change), so the retry is a new command, not a duplicate.
        key += f":resumed-{state.base}"
    return key


class _Launch:
    """A saga's start() and its driver running the first inline unit (see start)."""

    __slots__ = ("_stored", "appends", "claimed", "messages", "ready", "sit_out", "time",
                 "unit")

    def __init__(self, appends: list[tuple[str, list[Event], int | Any, str]],
                 messages: list[OutMessage], *, sit_out: bool) -> None:
        loop = asyncio.get_running_loop()
        #: whether start() sits out waits for held aggregates (not when it is called
        #: from inside a unit, which may hold them itself): for _SIT_OUT at most
        self.sit_out = loop.time() + _SIT_OUT if sit_out else 0.0
        self.appends = appends  # the start's events
        self.messages = messages  # and messages
        #: the driver committed the start with its unit: True, or the exception; None:
        #: a handler waits (or the driver went away), start() commits the start alone
        self.ready: asyncio.Future[bool | BaseException | None] = loop.create_future()
        self._stored: asyncio.Future[bool | None] = loop.create_future()
        self.time = 0.0  # when start() stored the start
        self.claimed = False  # the driver is committing the start (with its unit)
        self.unit: Unit | None = None  # the driver's unit

    def look(self) -> None:
        """Called right after the driver's first step: if its unit has not ended by
        then, one of its handlers waits (and start() stores the start alone). A wait
        for an aggregate another saga holds (until that one commits) is waited out:
        look again once it ends."""
        if self.claimed or self.ready.done():
            return
        unit = self.unit
        if unit is not None and unit.waiting and not unit.closed:
            loop = asyncio.get_running_loop()
            left = self.sit_out - loop.time()
            if left > 0:
                if unit.after_wait is None:
                    loop.call_later(left, self._enough)
                unit.after_wait = self.look
                return
        self.ready.set_result(None)

    def _enough(self) -> None:
        unit = self.unit
        if unit is not None and unit.waiting:
            self.sit_out = 0.0
            self.look()

    def answer(self, done: bool | BaseException | None) -> None:
        """The driver committed the start (True), failed to (the exception), or leaves
        it to start() (None)."""
        if not self.ready.done():  # (start() may have been cancelled meanwhile)
            self.ready.set_result(done)

    def abandon(self) -> None:
        """The driver went away: start() must not wait for it any longer."""
        if not self.ready.done():
            self.ready.set_result(None)

    def stored(self, time: float) -> None:
        self.time = time
        if not self._stored.done():
            self._stored.set_result(True)

    def failed(self, stored: bool | None) -> None:
        """start()'s commit failed: the saga is not stored (False), or it is not known
        (None: the commit may have happened before the failure)."""
        if not self._stored.done():
            self._stored.set_result(stored)

    async def outcome(self) -> bool | None:
        """Whether start() stored the start (None: not known, look)."""
        return await self._stored


class _Inbox:
    """What arrives for one saga's driver (replies, cancel and retry requests), in
    order: the part of asyncio.Queue the driver uses, at a fraction of its objects."""

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiters: list[asyncio.Future[None]] = []

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop(0)

    async def get(self) -> Any:
        while not self._items:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        return self._items.pop(0)


def _requeue(queue: _Inbox, item: Any) -> None:
    # put it back at the front: it was taken only to learn that something arrived
    items = [item]
    while not queue.empty():
        items.append(queue.get_nowait())
    for it in items:
        queue.put_nowait(it)


def _log_crash(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, asyncio.CancelledError):
        from ..errors import ClosedError, EngineUnavailable

        if isinstance(exc, (ClosedError, EngineUnavailable)):
            return
        log.error("saga task %s crashed", task.get_name(), exc_info=exc)
