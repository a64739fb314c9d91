"""A saga's start and its first inline unit, committed together when they can be.

When a saga's first step is inline, `start()` has the saga's driver run the
first unit of work at once, in the driver's own task, and waits for it — but only
through the driver's first step:

- the unit ends without waiting for anything (a wait for an aggregate another saga
  holds is sat out, for `_SIT_OUT` at most: that saga is committing): the driver
  commits the start with the unit, one transaction, often the whole saga;
- a handler waits for anything else (I/O, a timer): `start()` stores the start
  alone and returns; the driver commits the unit once the handler is done.

`Launch` is what the two tasks share; `run_first_unit` is the driver's side.
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING

from ..errors import ClosedError, ConcurrencyError
from ..eventsourcing.transaction import commit
from ..messages import OutMessage
from .definition import Saga, SagaState, stamp, stamp_first
from .inline import commit_unit, run_unit

if TYPE_CHECKING:
    from ..eventsourcing.events import Event
    from ..eventsourcing.records import _Any
    from .run import SagaRun
    from .unit import Unit

    StartAppend = tuple[str, list[Event], int | _Any, str]

__all__ = ["Launch", "StartBy", "StartStored", "run_first_unit"]

_SIT_OUT = 0.25  # how long start() waits for an aggregate another saga holds, at most


class StartBy(enum.Enum):
    """Who stores a launched saga's start (the answer start() waits for)."""

    DRIVER = "the driver stored the start with its first unit"
    STARTED_BEFORE = "another start of this id stored it: this start is a no-op"
    CALLER = "start() stores the start alone; the driver commits its unit after it"


class StartStored(enum.Enum):
    """What start()'s own commit of the start did (the driver waits for it)."""

    YES = "stored"
    NO = "not stored (another start stored this id, or start() gave up)"
    UNKNOWN = "the commit failed late: it may have landed, look"


class Launch:
    """A saga's start() and its driver running the first inline unit (see the module)."""

    __slots__ = ("_by", "_stored", "appends", "committing", "messages", "sit_out_until",
                 "start_time", "unit")

    def __init__(self, appends: list[StartAppend], messages: list[OutMessage], *,
                 sit_out: bool) -> None:
        loop = asyncio.get_running_loop()
        #: whether start() sits out waits for held aggregates (not when it is called
        #: from inside a unit, which may hold them itself): for _SIT_OUT at most
        self.sit_out_until = loop.time() + _SIT_OUT if sit_out else 0.0
        self.appends = appends  # the start's events
        self.messages = messages  # and messages
        self._by: asyncio.Future[StartBy] = loop.create_future()
        self._stored: asyncio.Future[StartStored] = loop.create_future()
        self.start_time = 0.0  # when start() stored the start
        self.committing = False  # the driver is committing the start (with its unit)
        self.unit: Unit | None = None  # the driver's first unit

    # start()'s side ------------------------------------------------------------------
    async def stored_by(self) -> StartBy:
        """Wait for the driver's first step: who stores the start. Raises what the
        driver's commit of the start with its unit raised."""
        asyncio.get_running_loop().call_soon(self._after_first_step)
        try:
            return await self._by
        except asyncio.CancelledError:
            self.start_not_stored()  # start() stores nothing: the driver looks
            raise

    def start_stored(self, time: float) -> None:
        self.start_time = time
        self._set_stored(StartStored.YES)

    def start_not_stored(self) -> None:
        self._set_stored(StartStored.NO)

    def start_maybe_stored(self) -> None:
        self._set_stored(StartStored.UNKNOWN)

    def _set_stored(self, what: StartStored) -> None:
        if not self._stored.done():
            self._stored.set_result(what)

    def _after_first_step(self) -> None:
        """Runs right after the driver's first step: if its unit has not ended by then,
        one of its handlers waits, and start() stores the start alone. A wait for an
        aggregate another saga holds (until that one commits) is sat out: decide again
        when it ends."""
        if self.committing or self._by.done():
            return
        unit = self.unit
        if unit is not None and unit.waiting_for_stream and not unit.closed:
            loop = asyncio.get_running_loop()
            left = self.sit_out_until - loop.time()
            if left > 0:
                if unit.on_wait_end is None:
                    loop.call_later(left, self._stop_sitting_out)
                unit.on_wait_end = self._after_first_step
                return
        self._by.set_result(StartBy.CALLER)

    def _stop_sitting_out(self) -> None:
        unit = self.unit
        if unit is not None and unit.waiting_for_stream:
            self.sit_out_until = 0.0
            self._after_first_step()

    # the driver's side -----------------------------------------------------------------
    @property
    def decided(self) -> bool:
        """Whether it is decided who stores the start (or start() gave up waiting)."""
        return self._by.done()

    def tell_start(self, by: StartBy) -> None:
        if not self._by.done():  # (start() may have been cancelled meanwhile)
            self._by.set_result(by)

    def tell_start_failed(self, exc: BaseException) -> None:
        """The driver's commit of the start with its unit failed with `exc`."""
        if not self._by.done():
            self._by.set_exception(exc)

    async def start_outcome(self) -> StartStored:
        """Wait for start()'s own commit of the start."""
        return await self._stored


async def run_first_unit(run: SagaRun, defn: Saga, state: SagaState, launch: Launch
                         ) -> SagaState | None:
    """A new saga's first unit, run while its start() waits (see the module); the
    state to go on from, or None when the start was not stored."""
    unit = launch.unit = run.new_unit(state)
    expected = state.stream_version
    try:
        batch, messages = await run_unit(run, defn, state, unit)
        if not launch.decided:  # no handler waited: commit it all, here and now
            launch.committing = True
            return await _commit_with_start(run, defn, state, unit, launch, batch, messages)
        stored = await launch.start_outcome()  # start() stores the start alone
        if stored is StartStored.UNKNOWN:  # its commit failed late: was it stored?
            fresh = await run.coord.load(defn.name, state.id)
            if not fresh.version:
                return None
            stamp_first(state, expected, fresh.started)
        elif stored is StartStored.NO:  # (another start stored it, or none did): as stored
            return await _as_stored(run, defn, state.id)
        else:
            stamp_first(state, expected, launch.start_time)
        await commit_unit(run, defn, state, unit, expected, batch, messages)
        return state
    finally:
        unit.close()


async def _as_stored(run: SagaRun, defn: Saga, saga_id: str) -> SagaState | None:
    """After a launch that did not store what its driver did: the saga as stored, to
    drive on (another start of this id may have stored it), or None."""
    fresh = await run.coord.load(defn.name, saga_id)
    return fresh if fresh.version and not fresh.done else None


async def _commit_with_start(run: SagaRun, defn: Saga, state: SagaState, unit: Unit,
                             launch: Launch, batch: list[Event], messages: list[OutMessage]
                             ) -> SagaState | None:
    """Commit a saga's start with its first unit (for its start(), which waits)."""
    # the start's two appends (its SagaStarted, its first move), the unit's events
    # joining the second
    appends = list(launch.appends)
    _, (sid, first, version, topic) = appends
    appends[1] = (sid, [*first, *batch], version, topic)
    try:
        outcomes = await commit(run.hub, list(unit.aggregates.values()), appends,
                                [*launch.messages, *messages],
                                headers={"correlation-id": state.id})
        run.sent.update(m.id for m in [*launch.messages, *messages])  # (see commit_steps)
    except ConcurrencyError as exc:
        if exc.stream_id != sid:
            # one of the unit's aggregates moved meanwhile (another writer): the unit
            # is void; start() stores the start alone, and the step runs again
            launch.committing = False
            launch.tell_start(StartBy.CALLER)
            await launch.start_outcome()
        else:  # started before (another start with this id): start() is a no-op
            run.coord.follow_may_drive(sid)
            launch.tell_start(StartBy.STARTED_BEFORE)
        return await _as_stored(run, defn, state.id)
    except asyncio.CancelledError:
        launch.tell_start_failed(ClosedError(
            f"saga {state.id!r} was starting as its hub closed; it may or may not be "
            "stored: start it again with the same id on an open hub"))
        raise
    except BaseException as exc:
        launch.tell_start_failed(exc)
        run.coord.follow_may_drive(sid)
        return await _as_stored(run, defn, state.id)  # did it land before it failed?
    stamp(state, sum(len(a[1]) for a in appends), outcomes[-1].time)
    launch.tell_start(StartBy.DRIVER)
    return state
