"""The saga coordinator: drives each saga by its definition, durably.

Every decision is an event appended to the saga's stream before it is acted
on, so a coordinator killed at any moment resumes each unfinished saga from
its stream: an attempt in flight is asked again under the same idempotency key
(the handler's inbox answers the repeat with the stored outcome), a deadline
that passed while it was down fires at once.

The coordinator starts sagas, finds the ones to drive (unfinished at start-up,
started by other processes), routes replies and requests to them, and keeps one
`SagaRun` (saga/run.py: a driver task and its inbox) per saga it drives.

Topics, per saga name N: `saga.N.started` / `saga.N.ended` (lifecycle, read
on start-up to find unfinished sagas), `saga.N.steps` (the rest), and
`saga.N.replies.<slot>` (services' replies to the commands of the coordinators
in that slot, 0 to REPLY_SLOTS - 1).

Replies come back to the coordinator that sent the command, not to whichever
coordinator sharing the database takes them first: a command's `reply-to` names
its sender's slot and its `saga-coordinator` header its sender, and each
coordinator reads its slot's topic as the log grows and takes its own replies
(a plain read: no subscription, nothing stored per coordinator). Shared, replies
moved half the sagas of two coordinators to the other process at every step. A
coordinator's id is new each run; its slot is one of a fixed few, so restarts
and scaling add no topics (a topic each would have piled up for ever). A reply
the sender did not live to record is not lost: whoever takes the saga up (a
coordinator starting, or one adopting a saga its starter left, see
FOREIGN_GRACE) asks the attempt in flight again under its own reply topic, and
the service's inbox answers with the stored outcome, or runs the command if it
never ran. `saga.N.replies` itself is still consumed, by one durable group for
all coordinators: replies to commands that named it (sent before this design,
or by hand).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import (
    ClosedError,
    ConcurrencyError,
    EngineUnavailable,
    InvalidArgument,
    NotFound,
    TidingsError,
)
from ..eventsourcing.records import NO_STREAM
from ..eventsourcing.repository import CURRENT_UNIT
from ..eventsourcing.transaction import commit
from ..messages import Message, new_id
from ..util import Recent
from .clock import Clock, SystemClock
from .definition import Outcome, ReplyIgnored, Saga, SagaStarted, SagaState, evolve, stamp
from .handlers import CommandHandler
from .inbox import CancelRequest, Inbox, Moved, Reply, RetryRequest
from .inline import inline_for
from .launch import Launch, StartBy
from .moves import ReplyTo, next_moves, stream_id
from .run import SagaRun, ended_or_stuck
from .unit import StreamLocks

if TYPE_CHECKING:
    from ..hub import Hub
    from ..messages import OutMessage
    from .launch import StartAppend

__all__ = ["Coordinator", "check_saga_id"]

log = logging.getLogger("tidings.saga")

T = TypeVar("T")
#: Seconds a reply stays leased to the coordinator that took it, at most: a reply is acked
#: once its outcome is stored, so one a coordinator took and died with comes back after its
#: lease. Half the saga's shortest command timeout (at least 2 s), so that it comes back
#: before the step times out, and at most this.
REPLY_LEASE = 10.0


def reply_lease(defn: Saga) -> float:
    """How long a reply to `defn`'s commands stays leased to the coordinator that took it."""
    timeouts = [s.timeout for s in defn.steps if s.command is not None and s.timeout]
    return min(REPLY_LEASE, max(2.0, min(timeouts, default=REPLY_LEASE) / 2))
_ENDED_KEPT = 1000  # final states of the sagas that ended here last, for wait()
#: Seconds after another process started a saga (as this one saw it) before this one
#: drives it too, if it is unfinished then: its starter drives it, unless it died.
FOREIGN_GRACE = 10.0
_ASKED_KEPT = 100_000  # the starts asked for here that _follow tells from foreign ones
#: How many reply topics a saga has (`saga.N.replies.0` …): each coordinator reads one,
#: chosen by its id, and passes over the replies of others that chose the same
REPLY_SLOTS = 32
#: Messages per read of the topics followed as the log grows (replies, starts, ends): a
#: few arrive per wake-up, and a small read runs on the event loop where an engine can
#: (SQLite: a page of 1,000, the default, went to a worker thread at every wake-up)
FOLLOW_PAGE = 256
#: Seconds before a follower looks again after the engine was away for longer than the
#: engine itself rides out
FOLLOW_RETRY = 1.0


def check_saga_id(saga_id: object) -> str:
    if not isinstance(saga_id, str) or not saga_id or len(saga_id) > 120 or "\x00" in saga_id:
        raise InvalidArgument(
            f"saga id {saga_id!r} must be a non-empty str of at most 120 characters"
        )
    return saga_id


class Coordinator:
    """Runs the sagas of every definition registered on one hub."""

    def __init__(self, hub: Hub, clock: Clock | None = None) -> None:
        self.hub = hub
        self.clock: Clock = clock or SystemClock()
        #: this coordinator's name among those sharing the database, in the commands
        #: it sends and so in their replies (new each run: a restarted process asks its
        #: attempts again), and its slot: its reply topics' last token
        self.instance = os.urandom(6).hex()
        self.slot = int(self.instance, 16) % REPLY_SLOTS
        # per saga name: resolved once its replies are read from a position before any
        # command this coordinator sends (see replies_ready)
        self._replies_from: dict[str, asyncio.Future[None]] = {}
        self._defs: dict[str, dict[int, Saga]] = {}  # name -> version -> definition
        #: every task of the coordinator: a driver per saga driven here, and per saga
        #: name its discovery (`_follow`) and its replies (`_replies`)
        self.tasks = TaskOwner()
        #: the streams inline units of this hub hold (see saga/unit.py)
        self.stream_locks = hub.extension(StreamLocks, StreamLocks)
        self._runs: dict[str, SagaRun] = {}  # stream id -> the saga driven here
        # stream ids of sagas started here whose `saga.N.started` _follow has not seen
        # yet: it does not drive them (they are driven from their start)
        self._started_here: set[str] = set()
        # stream ids of the sagas start() was asked for here lately: their start, seen by
        # _follow, is this process's own (driven at once if nothing drives it, as when
        # its caller gave up mid-start), not another process's (see FOREIGN_GRACE)
        self._asked_here: Recent[str, bool] = Recent(_ASKED_KEPT)
        # the final states of the sagas that ended here last (a saga often ends before
        # its starter calls wait(): no need to read it back)
        self._ended: Recent[str, SagaState] = Recent(_ENDED_KEPT)
        # stream ids of the sagas other processes started that _adopt will look at when
        # their grace ends, unless _ends sees them end first (then nothing to look at)
        self._foreign: set[str] = set()
        self._inline: dict[str, CommandHandler] = {}  # command -> its inline handler here
        self._inline_seen = -1  # how many command handlers `_inline` was made from

    # registration ---------------------------------------------------------------
    def register(self, defn: Saga) -> None:
        versions = self._defs.get(defn.name)
        if versions is None:
            versions = self._defs[defn.name] = {}
            self.tasks.spawn(self._follow(defn.name), f"tidings:saga:{defn.name}:follow")
            self.tasks.spawn(self._replies(defn.name, reply_lease(defn)),
                             f"tidings:saga:{defn.name}:replies")
            self._replies_from[defn.name] = asyncio.get_running_loop().create_future()
            self.tasks.spawn(self._own_replies(defn.name),
                             f"tidings:saga:{defn.name}:own-replies")
            self.tasks.spawn(self._ends(defn.name), f"tidings:saga:{defn.name}:ends")
        known = versions.get(defn.version)
        if known is not None and known is not defn:
            if [s.name for s in known.steps] != [s.name for s in defn.steps]:
                raise InvalidArgument(
                    f"saga {defn.name!r} version {defn.version} is registered with other "
                    "steps; give the changed definition a new version"
                )
        versions[defn.version] = defn

    def reply_topic(self, name: str) -> str:
        """Where replies to the commands this coordinator sends for saga `name` go."""
        return f"saga.{name}.replies.{self.slot}"

    def reply_to(self, name: str) -> ReplyTo:
        """The reply-to of the commands this coordinator sends for saga `name`."""
        return ReplyTo(self.reply_topic(name), self.instance)

    async def replies_ready(self, name: str) -> None:
        """Return once this coordinator reads saga `name`'s replies from a position
        before any command it sends from now on (at once, but for its first moments):
        its slot's topic holds others' replies, so it is not read from its beginning."""
        fut = self._replies_from.get(name)
        if fut is not None and not fut.done():
            await asyncio.shield(fut)

    def definitions(self) -> tuple[Saga, ...]:
        """Each registered saga's newest version, in the order first registered."""
        return tuple(v[max(v)] for v in self._defs.values())

    def definition(self, name: str, version: int) -> Saga | None:
        """Version `version` of saga `name`, if this process registers it."""
        return self._defs.get(name, {}).get(version)

    def inline_handler(self, command: str) -> CommandHandler | None:
        """The handler registered with `inline=True` for `command` on this hub, if any."""
        handlers = self.hub.command_handlers
        if len(handlers) != self._inline_seen:
            self._inline_seen = len(handlers)
            self._inline = {h.command: h for h in handlers if h.inline}
        return self._inline.get(command)

    async def close(self) -> None:
        await self.tasks.close()

    # state ------------------------------------------------------------------------
    async def load(self, name: str, saga_id: str) -> SagaState:
        state = SagaState(id=saga_id)
        defn: Saga | None = None
        async for rec in self.hub.events.read(stream_id(name, saga_id)):
            ev = rec.event
            if isinstance(ev, SagaStarted):
                defn = self.definition(name, ev.version)
            evolve(defn, state, ev, rec.timestamp)
        return state

    # starting ---------------------------------------------------------------------
    async def start(self, defn: Saga, data: object, saga_id: str | None) -> str:
        data = defn.check_data(data)  # before anything is looked up or stored
        given = saga_id is not None
        saga_id = check_saga_id(saga_id) if saga_id is not None else new_id()
        sid = stream_id(defn.name, saga_id)
        self._asked_here.put(sid, True)
        if given and await self.hub.events.backend.stream_version(sid):
            return saga_id  # started before: starting again is a no-op (and runs nothing)
        # The start and the first step's command commit together; the driver begins
        # from this state instead of reading the stream back.
        state = SagaState(id=saga_id)
        now = self.clock.now()
        tel = self.hub.telemetry
        trace = None if tel is None else tel.saga_started(defn.name, saga_id)
        started = SagaStarted(saga=defn.name, version=defn.version, data=data, trace=trace)
        evolve(defn, state, started, now)
        await self.replies_ready(defn.name)
        batch, messages = next_moves(defn, state, [], now, self.inline_handler,
                                     then_advance=True,
                                     reply_to=self.reply_to(defn.name))
        appends: list[StartAppend] = [(sid, [started], NO_STREAM, f"saga.{defn.name}.started")]
        if batch:
            appends.append((sid, batch, 1, f"saga.{defn.name}.steps"))
        launch: Launch | None = None
        if (state.pending is not None and sid not in self._runs
                and inline_for(self.inline_handler, defn, state.pending) is not None):
            # The first steps are inline: the saga's driver runs them right away, in its
            # own task, and commits them with the start when it can (see launch.py).
            # Not from inside a unit (a handler starting a saga): that unit may hold what
            # the new saga's steps wait for, so start() does not sit out their waits.
            launch = Launch(appends, messages, sit_out=CURRENT_UNIT.get() is None)
            self._started_here.add(sid)
            self.drive(defn.name, saga_id, state, launch=launch)
            if await launch.stored_by() is not StartBy.CALLER:
                return saga_id
        await self._store_start(defn, state, appends, messages, launch)
        return saga_id

    async def _store_start(self, defn: Saga, state: SagaState, appends: list[StartAppend],
                           messages: list[OutMessage], launch: Launch | None) -> None:
        """Commit a new saga's start (and its first move), then have it driven; with a
        `launch`, its driver commits its first unit after it."""
        saga_id = state.id
        sid = stream_id(defn.name, saga_id)
        self._started_here.add(sid)
        try:
            outcomes = await commit(self.hub, [], appends, messages,
                                    headers={"correlation-id": saga_id})
        except BaseException as exc:
            self._started_here.discard(sid)
            if isinstance(exc, ConcurrencyError):
                if launch is not None:
                    launch.start_not_stored()  # its driver looks at what is stored
                return  # started before: starting again is a no-op
            if launch is not None:
                launch.start_maybe_stored()  # its driver looks at what is stored
            # the commit may have landed before the failure: whoever drives it looks
            run = self._runs.get(sid)
            if run is not None:
                run.drive_again = True
            elif not self.hub.closed:
                self.drive(defn.name, saga_id)
            raise
        if launch is not None:
            launch.start_stored(outcomes[-1].time)  # its driver commits its unit next
            if sid not in self._runs and not self.hub.closed:
                self.drive(defn.name, saga_id)  # (its driver went away meanwhile)
            return
        stamp(state, sum(len(a[1]) for a in appends), outcomes[-1].time)
        sent = {m.id for m in messages}  # (its commands, now stored: see SagaRun.sent)
        run = self._runs.get(sid)
        if run is not None:  # the driver of an earlier start with this id is ending:
            run.drive_again = True  # this saga is driven once it is gone
            run.sent.update(sent)
        else:
            self.drive(defn.name, saga_id, state, sent=sent)

    # the sagas driven here ----------------------------------------------------------
    def drive(self, name: str, saga_id: str, state: SagaState | None = None, *,
              launch: Launch | None = None, inbox: Inbox | None = None,
              sent: set[str] | None = None) -> SagaRun:
        """The saga's run here: the one driving it, or a new one (from `state`, or its
        stream) with the given launch, inbox and sent command ids."""
        sid = stream_id(name, saga_id)
        run = self._runs.get(sid)
        if run is None:
            run = self._runs[sid] = SagaRun(self, name, saga_id, launch=launch, inbox=inbox,
                                            sent=sent)
            run.task = self.tasks.spawn(run.drive(state), f"tidings:saga:{saga_id}",
                                        then=functools.partial(self._run_ended, run))
        return run

    def _run_ended(self, run: SagaRun, task: asyncio.Task[SagaState | None]) -> None:
        """Drop a run whose driver ended; drive the saga again if there is a reason to."""
        del self._runs[run.sid]
        if run.launch is not None:  # (it went away before its first step)
            run.launch.tell_start(StartBy.CALLER)
        final = None if task.cancelled() or task.exception() is not None else task.result()
        run.finished.set_result(final)
        if not run.inbox.empty():  # news of another process's writes: moot now
            for msg in run.inbox.take_all():
                if not isinstance(msg, Moved):
                    run.inbox.put_nowait(msg)
        if not self.hub.closed and (
                run.drive_again  # (a start stored while it was ending)
                or (final is not None and not run.inbox.empty())):
            # look again; a reply or a retry that arrived as it finished goes along
            self.drive(run.name, run.saga_id, inbox=run.inbox, sent=run.sent)
            return
        # nobody drives it here any more: a waiting cancel or retry must not wait forever
        for msg in run.inbox.take_all() if not run.inbox.empty() else ():
            if isinstance(msg, (CancelRequest, RetryRequest)) and not msg.recorded.done():
                msg.recorded.set_exception(EngineUnavailable(
                    f"saga {run.saga_id!r} is not driven by this process any more (it "
                    "closed, or the driver failed); ask again"))

    def ended_here(self, sid: str, final: SagaState) -> None:
        """A saga driven here has ended: its final state, for a wait() that comes after
        (its driver tells it before it returns, so a start() it unblocked finds it)."""
        self._ended.put(sid, final)

    def follow_may_drive(self, sid: str) -> None:
        """A start of `sid` here failed: when `_follow` sees it stored, it drives it."""
        self._started_here.discard(sid)

    # replies and discovery ----------------------------------------------------------------
    async def _replies(self, name: str, lease: float) -> None:
        """Replies sent to the saga's shared topic (see the module docstring)."""
        sub = await self.hub.subscribe(f"saga.{name}.replies", group="saga-coordinator",
                                       max_in_flight=1000, ack_wait=lease,
                                       max_deliver=1000)
        async for msg in sub:
            # Acked once the saga's stream holds what it did (by its driver, or here when
            # no driver takes it): acked earlier, a coordinator killed before its driver
            # stored the outcome would lose the reply and time a step out that succeeded.
            got = self._reply(msg, delivered=True)
            if got is None:
                await msg.term()
            elif not await self._take_reply(name, msg, *got):
                await msg.ack()

    async def _own_replies(self, name: str) -> None:
        """Replies to the commands this coordinator sent: its slot's topic, read as the
        log grows from before its first command, the others' replies passed over.
        Nothing to ack: a reply whose outcome this process did not live to store is
        asked for again by whoever takes its saga up (see the module docstring)."""
        ready = self._replies_from[name]
        try:
            while True:
                try:
                    start = await self.hub.engine.last_position() + 1
                    break
                except EngineUnavailable as exc:  # (as `_following` does)
                    log.warning("saga %s: reading its replies: %s; again in a second",
                                name, exc)
                    await asyncio.sleep(FOLLOW_RETRY)
            ready.set_result(None)
        finally:
            if not ready.done():  # (closing meanwhile: a start() waiting must not hang)
                ready.set_exception(ClosedError("the hub closed; start the saga on an "
                                                "open hub"))
                ready.exception()  # (retrieved: nobody may be waiting)
        me = self.instance

        async def take(msg: Message) -> None:
            if msg.headers.get("saga-coordinator") != me:
                return  # another coordinator's, of this slot
            got = self._reply(msg, delivered=False)
            if got is not None:
                await self._take_reply(name, msg, *got)

        await self._following(self.reply_topic(name), start, take)

    async def _following(self, topic: str, start: int | str,
                         take: Callable[[Message], Awaitable[None]]) -> None:
        """Hand each message of `topic` from `start` (a position, 'beginning' or 'end')
        on to `take`, as the log grows, until the hub closes.

        The engine away for longer than it rides out (a database restarting) does not
        end it: it reads on a second later from the message it was handing over. A
        coordinator that stopped following its replies, or the sagas started and ended,
        would leave the sagas it drives waiting."""
        while True:
            try:
                if start == "end":  # (resolved once: what is stored during an outage counts)
                    start = await self.hub.engine.last_position() + 1
                async for msg in self.hub.read(topic, start=start, follow=True,
                                               page=FOLLOW_PAGE):
                    start = msg.position  # (again from here if handing it over fails)
                    await take(msg)
                    start = msg.position + 1
                return  # (a read that follows ends only with the hub)
            except EngineUnavailable as exc:
                log.warning("saga coordinator: following %s: %s; again in a second",
                            topic, exc)
                await asyncio.sleep(FOLLOW_RETRY)

    @staticmethod
    def _reply(msg: Message, delivered: bool) -> tuple[str, Reply] | None:
        """The saga and the reply `msg` carries (None, logged, when it is malformed);
        `delivered`: it came by a subscription, to be acked once its outcome is stored."""
        h = msg.headers
        try:
            result = msg.decode() or None
            outcome = Outcome(h.get("status", "ok"),  # type: ignore[arg-type]
                              result=result, error=h.get("error", ""))
            if result is not None and not isinstance(result, dict):
                # (a reply not from hub.handler) the saga's data is JSON objects
                outcome = Outcome("error", error="a reply must be a JSON object or empty")
            return h["saga-id"], Reply(int(h["saga-step"]), h["saga-kind"],
                                       int(h["saga-attempt"]), outcome,
                                       delivered=msg if delivered else None)
        except (KeyError, ValueError, TidingsError):
            log.warning("dropping a malformed saga reply at position %d", msg.position)
            return None

    async def _take_reply(self, name: str, msg: Message, saga_id: str, reply: Reply) -> bool:
        """Hand `reply` to its saga (see `_deliver`), in the trace of the handler that
        sent it when tracing is on."""
        tel = self.hub.telemetry
        if tel is None:
            return await self._deliver(name, saga_id, reply)
        with tel.process(msg, "saga-coordinator"):  # (the reply's receipt)
            return await self._deliver(name, saga_id, reply)

    async def _deliver(self, name: str, saga_id: str, reply: Reply) -> bool:
        """Hand `reply` to its saga's driver (True: the driver acks it), or record it as
        ignored when the saga has ended (False: nothing drives it)."""
        run = self._runs.get(stream_id(name, saga_id))
        if run is None:
            state = await self.load(name, saga_id)
            if not state.version:
                return False
            if ended_or_stuck(state):
                with contextlib.suppress(ConcurrencyError):
                    await self.hub.events.append(
                        stream_id(name, saga_id),
                        [ReplyIgnored(step=reply.step, kind=reply.kind, attempt=reply.attempt,
                                      reason=f"saga already {state.status}")],
                        expected_version=state.stream_version, topic=f"saga.{name}.steps")
                return False
            run = self.drive(name, saga_id, state)  # (from the state just read)
        run.inbox.put_nowait(reply)
        return True

    async def _follow(self, name: str) -> None:
        """Resume unfinished sagas at start-up, then pick up sagas other processes start."""
        while True:
            try:
                ended: set[str] = set()
                started: list[str] = []
                async for m in self.hub.read(f"saga.{name}.ended"):
                    ended.add(m.headers.get("stream-id", ""))
                last = 0
                async for m in self.hub.read(f"saga.{name}.started"):
                    started.append(m.headers.get("stream-id", ""))
                    last = m.position
                break
            except EngineUnavailable as exc:  # (as `_following` does)
                log.warning("saga %s: reading the sagas started: %s; again in a second",
                            name, exc)
                await asyncio.sleep(FOLLOW_RETRY)
        prefix = f"saga-{name}-"
        for sid in started:  # driven from their start here already, or resumed just below
            self._started_here.discard(sid)
        for sid in started:
            if sid not in ended and sid.startswith(prefix):
                self.drive(name, sid[len(prefix):])
        # A saga another process started is driven there (its starter drives it): taken
        # on here only if it is still unfinished a while later (its starter died).
        # Driving it here at once too doubled every saga's work when coordinators share
        # a database, each driver answering the other's writes.
        foreign: deque[tuple[float, str]] = deque()
        wake = asyncio.Event()
        self.tasks.spawn(self._adopt(name, foreign, wake), f"tidings:saga:{name}:adopt")

        async def take(m: Message) -> None:
            sid = m.headers.get("stream-id", "")
            if not sid.startswith(prefix):
                return
            if sid in self._started_here:
                self._started_here.discard(sid)  # driven here from its start
            elif sid in self._runs:
                return
            elif self._asked_here.get(sid):  # this process's own start, driven by none
                await self._take_on(name, sid[len(prefix):])
            else:
                foreign.append((self.clock.now() + FOREIGN_GRACE, sid[len(prefix):]))
                self._foreign.add(sid)
                wake.set()

        await self._following(f"saga.{name}.started", last + 1, take)

    async def _adopt(self, name: str, foreign: deque[tuple[float, str]],
                     wake: asyncio.Event) -> None:
        """Drive the sagas other processes started that are unfinished `FOREIGN_GRACE`
        seconds after their start was seen (in that order: the grace is one for all)."""
        while True:
            if not foreign:
                wake.clear()
                await wake.wait()
                continue
            due, saga_id = foreign[0]
            if self.clock.now() < due:
                await self.clock.sleep_until(due)
                continue
            foreign.popleft()
            sid = stream_id(name, saga_id)
            if sid in self._foreign:  # (else it ended meanwhile: seen by _ends)
                self._foreign.discard(sid)
                await self._take_on(name, saga_id)

    async def _take_on(self, name: str, saga_id: str) -> None:
        """Drive the saga here, from its stored state, unless it is done or driven here."""
        if stream_id(name, saga_id) in self._runs:
            return
        state = await self.load(name, saga_id)
        if not state.done and stream_id(name, saga_id) not in self._runs:
            self.drive(name, saga_id, state)

    async def _ends(self, name: str) -> None:
        """Tell this process's driver of a saga that another process ended (and _adopt
        that it need not look at it).

        Two coordinators may drive one saga (one took it up from the other, which was
        only slow), and the other may end it. The driver here would wait for a reply
        until the step's deadline; its starter's `wait()` with it. The end marker
        carries the stream's version: a driver behind it looks again (its own end is
        not behind, so costs nothing)."""
        async def take(m: Message) -> None:
            sid = m.headers.get("stream-id", "")
            self._foreign.discard(sid)  # ended: nothing for _adopt to look at
            run = self._runs.get(sid)
            version = m.headers.get("stream-version", "")
            if run is not None and version.isdigit():
                run.inbox.put_nowait(Moved(int(version)))

        await self._following(f"saga.{name}.ended", "end", take)

    # requests ------------------------------------------------------------------------
    async def cancel(self, name: str, saga_id: str, reason: str) -> None:
        """Store a request to cancel the running saga (see SagaRunner.cancel)."""
        state = await self._existing(name, saga_id)
        if state.status != "running":
            raise InvalidArgument(f"saga {saga_id!r} is {state.status}; only a running "
                                  "saga can be cancelled")
        await self._request(name, state, lambda recorded: CancelRequest(reason, recorded))

    async def retry(self, name: str, saga_id: str) -> None:
        """Store a request to resume the stuck saga (see SagaRunner.retry)."""
        state = await self._existing(name, saga_id)
        if state.status != "stuck":
            raise InvalidArgument(f"saga {saga_id!r} is {state.status}, not stuck; "
                                  "only a stuck saga can be retried")
        await self._request(name, state, RetryRequest)

    async def _existing(self, name: str, saga_id: str) -> SagaState:
        state = await self.load(name, saga_id)
        if not state.version:
            raise NotFound(f"no saga {saga_id!r} of {name!r}")
        return state

    async def _request(self, name: str, state: SagaState,
                       make: Callable[[asyncio.Future[None]], CancelRequest | RetryRequest]
                       ) -> None:
        """Hand a request to the saga's driver here; return once it is stored in the
        saga's stream, so a crash after this call cannot lose it. Shielded: cancelling
        the caller does not withdraw the request, and compensation runs to completion
        regardless."""
        if self.definition(name, state.version) is None:
            raise InvalidArgument(
                f"saga {state.id!r} runs version {state.version} of {name!r}, which this "
                "process does not register; do this where that version is registered")
        recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.drive(name, state.id).inbox.put_nowait(make(recorded))
        await asyncio.shield(recorded)

    async def wait(self, name: str, saga_id: str, timeout: float | None) -> SagaState:
        """Wait until the saga is completed, compensated or stuck."""
        key = stream_id(name, saga_id)
        ended = self._ended.get(key)
        if ended is not None:
            return ended  # as stored: stamped with the store's times

        async def until_done() -> SagaState:
            while True:
                run = self._runs.get(key)
                if run is not None:  # driven here: its end is the signal, no polling
                    fut = run.finished
                    if not fut.done():
                        await asyncio.shield(fut)  # (shared: one waiter's timeout is its own)
                    final = fut.result()
                    if final is not None and ended_or_stuck(final):
                        return final  # as stored: stamped with the store's times
                # taken before loading, so a driver finishing in between is not missed
                run = self._runs.get(key)
                changed = self.hub.engine.changes()
                state = await self.load(name, saga_id)
                if ended_or_stuck(state) or not state.version:
                    return state
                if run is None:  # driven by another process: look again when the log changes
                    await self.hub.engine.wait(changed, 0.5)

        async with asyncio.timeout(timeout):
            return await until_done()


class TaskOwner:
    """Tasks that live until their owner closes: `close()` cancels them and waits
    until every one has ended. (Not an asyncio.TaskGroup: one task failing must not
    cancel the others — a saga's driver crashing leaves every other saga running.)"""

    __slots__ = ("_closed", "_tasks")

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, T], name: str,
              then: Callable[[asyncio.Task[T]], None] | None = None) -> asyncio.Task[T]:
        """Run `coro` in a task of its own; `then(task)` once it has ended. (A task
        spawned after close is cancelled at once; `then` still runs.)"""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        # one done callback (each costs a turn of the event loop): this, then `then`
        task.add_done_callback(self._ended if then is None
                               else functools.partial(self._ended, then=then))
        if self._closed:
            task.cancel()
        return task

    def _ended(self, task: asyncio.Task[T], then: Callable[[asyncio.Task[T]], None] | None
               = None) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(exc, (ClosedError, EngineUnavailable)):
                log.error("saga task %s crashed", task.get_name(), exc_info=exc)
        if then is not None:
            then(task)

    async def close(self) -> None:
        self._closed = True
        while self._tasks:
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
