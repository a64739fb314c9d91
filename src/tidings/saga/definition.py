"""Saga definitions, the saga's events, and its decision function (pure, no I/O).

A saga is a sequence of steps, each a local action or a command to a
service, each with a compensation. Forward steps run in order; when one fails
for good, the compensations of the completed steps run in reverse order. Steps
from the first `retriable` step on (the pivot) are retried until they succeed
and never compensated.

The coordinator stores a saga as a stream of the events below; `evolve` folds
them into a `SagaState`, and `advance` / `on_outcome` decide the next events.
Both are pure functions of (definition, state, outcome, now), so every
decision, timeout and backoff is tested without I/O or real waiting.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from ..errors import InvalidArgument
from ..eventsourcing.events import Event, trust_events
from ..inputs import check_input_type, to_plain, validate

__all__ = [
    "Outcome",
    "Saga",
    "SagaState",
    "Step",
    "Wait",
    "advance",
    "evolve",
    "on_outcome",
    "stamp",
]

Action = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_COMMAND = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
#: how long a command (or a command compensation) waits for its reply unless told
DEFAULT_COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class Step:
    """One step: a local `action` or a service `command`, with its compensation.

    `retries` extra attempts (exponential `backoff`, doubling, capped at
    `max_backoff`) follow an error or a timeout; `Rejected` is never retried.
    `retriable=True` marks a step that is only ever retried forward (the pivot
    and every step after it): it has no compensation and is never undone.
    """

    name: str
    action: Action | None = None
    command: str | None = None
    compensation: Action | str | None = None
    timeout: float | None = None
    retries: int = 0
    backoff: float = 0.1
    max_backoff: float = 60.0
    compensation_retries: int = 5
    retriable: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InvalidArgument(
                f"step name {self.name!r} must be letters, digits, '_' or '-'"
            )
        if (self.action is None) == (self.command is None):
            raise InvalidArgument(
                f"step {self.name!r} needs exactly one of action= (an async function) or "
                "command= (a command topic such as 'customer.reserve_credit')"
            )
        for what in (self.command, self.compensation):
            if isinstance(what, str) and not _COMMAND.match(what):
                raise InvalidArgument(f"step {self.name!r}: {what!r} is not a valid command name")
        for role, fn in (("action", self.action), ("compensation", self.compensation)):
            if fn is not None and not isinstance(fn, str) and not (callable(fn) and (
                    inspect.iscoroutinefunction(fn)
                    or inspect.iscoroutinefunction(type(fn).__call__))):
                raise InvalidArgument(
                    f"step {self.name!r}: {role}= must be an async function "
                    "(async def f(data: dict) -> dict | None)"
                    + (" or a command name" if role == "compensation" else "")
                )
        if self.command is not None and self.timeout is None:
            object.__setattr__(self, "timeout", DEFAULT_COMMAND_TIMEOUT)
        if self.timeout is not None and not self.timeout > 0:
            raise InvalidArgument(f"step {self.name!r}: timeout must be > 0 seconds")
        if self.retries < 0 or self.compensation_retries < 0:
            raise InvalidArgument(f"step {self.name!r}: retries must be >= 0")
        if not self.backoff >= 0 or not self.max_backoff >= 0:
            raise InvalidArgument(f"step {self.name!r}: backoff and max_backoff must be >= 0")
        if self.retriable and self.compensation is not None:
            raise InvalidArgument(
                f"step {self.name!r} is retriable (after the pivot: never undone), so it "
                "cannot have a compensation"
            )

    def delay(self, attempt: int) -> float:
        """Backoff before attempt `attempt + 1`."""
        # float powers, exponent capped: a step retried forever (after the pivot) must
        # not overflow int -> float once `attempt` passes ~1024
        return float(min(self.max_backoff, self.backoff * 2.0 ** min(max(0, attempt - 1), 1023)))


class Saga:
    """A named, versioned sequence of steps run by the saga coordinator.

    Sagas in flight keep the version they started with; register every version
    still running (`hub.sagas(v1)`, `hub.sagas(v2)`) while they drain.

    `input`: a msgspec Struct, dataclass or pydantic model class the data must
    fit; `start()` refuses data that does not (an `InvalidArgument` naming the
    field) before anything is stored, and stores the validated value as plain
    data, defaults filled in.
    """

    def __init__(self, name: str, steps: Sequence[Step], *, version: int = 1,
                 input: type[Any] | None = None) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgument(f"saga name {name!r} must be letters, digits, '_' or '-'")
        if input is not None:
            check_input_type(input, f"saga {name!r}")
        if not steps:
            raise InvalidArgument(f"saga {name!r} needs at least one step")
        for s in steps:
            if not isinstance(s, Step):
                raise InvalidArgument(f"saga {name!r}: steps must be tidings Step objects, "
                                      f"not {type(s).__name__}")
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"saga {name!r} has duplicate step names: {names}")
        if not isinstance(version, int) or version < 1:
            raise InvalidArgument("saga version must be an int >= 1")
        self.name = name
        self.steps = tuple(steps)
        self.version = version
        self.input = input
        pivots = [i for i, s in enumerate(steps) if s.retriable]
        #: index of the first retriable-only step (len(steps) when there is none)
        self.pivot = pivots[0] if pivots else len(steps)
        for s in steps[self.pivot:]:
            if s.compensation is not None:
                raise InvalidArgument(
                    f"saga {name!r}: step {s.name!r} comes after the pivot "
                    f"{steps[self.pivot].name!r}, so it is never undone and cannot have a "
                    "compensation"
                )

    def forward_only(self, index: int) -> bool:
        return index >= self.pivot

    def check_data(self, data: object) -> dict[str, Any]:
        """The data a saga starts with: checked against `input` (when set) and returned
        as plain data, defaults filled in; InvalidArgument naming the field otherwise."""
        if self.input is None:
            if not isinstance(data, dict):
                raise InvalidArgument("saga data must be a dict (JSON object)")
            return data
        plain = to_plain(validate(self.input, data, f"saga {self.name!r} input"))
        assert isinstance(plain, dict)  # an input type's instances are JSON objects
        return plain

    def __repr__(self) -> str:
        return f"Saga({self.name!r}, version={self.version}, steps={[s.name for s in self.steps]})"


# events --------------------------------------------------------------------------
class SagaStarted(Event):
    event_type = "tidings.saga.SagaStarted"
    saga: str
    version: int
    data: dict[str, Any]
    #: the trace the saga belongs to (a W3C traceparent; None: not traced): every
    #: step's command carries it, whoever sends it and however much later
    trace: str | None = None


class StepStarted(Event):
    event_type = "tidings.saga.StepStarted"
    step: int
    attempt: int
    deadline: float | None = None
    #: run by an inline handler in the coordinator's own transaction (no command message)
    inline: bool = False


class StepCompleted(Event):
    event_type = "tidings.saga.StepCompleted"
    step: int
    attempt: int
    result: dict[str, Any] | None = None


class StepFailed(Event):
    event_type = "tidings.saga.StepFailed"
    step: int
    attempt: int
    error: str
    rejected: bool = False
    retry_at: float | None = None  # None: final, compensate (or stuck after the pivot)
    compensate_self: bool = False  # a timed-out command may have taken effect


class CompensationStarted(Event):
    event_type = "tidings.saga.CompensationStarted"
    step: int
    attempt: int
    deadline: float | None = None
    inline: bool = False


class CompensationCompleted(Event):
    event_type = "tidings.saga.CompensationCompleted"
    step: int
    attempt: int


class CompensationFailed(Event):
    event_type = "tidings.saga.CompensationFailed"
    step: int
    attempt: int
    error: str
    retry_at: float | None = None


class SagaCompleted(Event):
    event_type = "tidings.saga.SagaCompleted"
    data: dict[str, Any]


class SagaCompensated(Event):
    event_type = "tidings.saga.SagaCompensated"
    reason: str


class SagaStuck(Event):
    event_type = "tidings.saga.SagaStuck"
    error: str


class SagaCancelRequested(Event):
    event_type = "tidings.saga.SagaCancelRequested"
    reason: str = "cancelled"


class SagaResumed(Event):
    event_type = "tidings.saga.SagaResumed"


class ReplyIgnored(Event):
    event_type = "tidings.saga.ReplyIgnored"
    step: int
    kind: str
    attempt: int
    reason: str


SAGA_EVENTS: tuple[type[Event], ...] = (
    SagaStarted, StepStarted, StepCompleted, StepFailed, CompensationStarted,
    CompensationCompleted, CompensationFailed, SagaCompleted, SagaCompensated, SagaStuck,
    SagaCancelRequested, SagaResumed, ReplyIgnored,
)
# built by the coordinator from checked values: stored without a validating round trip
trust_events(*SAGA_EVENTS)

Status = Literal["running", "completed", "compensating", "compensated", "stuck"]


# state ----------------------------------------------------------------------------
class Pending(msgspec.Struct):
    """The attempt in flight: which step, forward or compensation, which attempt, until when."""

    step: int
    kind: Literal["action", "compensation"]
    attempt: int
    deadline: float | None
    inline: bool = False


class SagaState(msgspec.Struct):
    """Everything the coordinator knows about one saga (folded from its events)."""

    id: str
    name: str = ""
    version: int = 0
    status: Status = "running"
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    step: int = 0  # next forward step
    attempt: int = 0  # attempts made of the current step (forward or compensation)
    #: attempts of the current step made before the last SagaResumed: attempt numbers keep
    #: growing across a resume (so a stale reply or a resent command never matches a new
    #: attempt), while the retry budget counts from here
    base: int = 0
    #: an attempt of the current forward step timed out, so it may have taken effect:
    #: if the saga compensates before the step completes, the step is compensated too
    uncertain: bool = False
    #: the step the saga gave up on while a delivery of its command may still be in
    #: flight (an attempt went out as a message and timed out or failed): its
    #: compensation fences the command, so a late delivery changes nothing
    fence: int | None = None
    pending: Pending | None = None
    completed: list[int] = msgspec.field(default_factory=list)
    to_compensate: list[int] = msgspec.field(default_factory=list)
    retry_at: float | None = None
    trace: str | None = None  # see SagaStarted.trace
    reason: str | None = None  # why it compensated
    error: str | None = None  # why it is stuck
    cancel_requested: bool = False
    stuck_from: Status = "running"
    #: an attempt of the current step (or compensation) went out as a message: the
    #: service's inbox knows it by its idempotency key, so later attempts go that way too
    messaged: bool = False
    stream_version: int = 0
    started: float = 0.0
    finished: float | None = None
    history: list[dict[str, Any]] = msgspec.field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status in ("completed", "compensated")


def _compensable(defn: Saga, steps: list[int]) -> list[int]:
    return [i for i in reversed(steps) if defn.steps[i].compensation is not None]


def evolve(defn: Saga | None, state: SagaState, event: Event, time: float) -> None:
    """Apply one stored event to `state` (in place): the only way state changes."""
    state.stream_version += 1
    entry: dict[str, Any] = {"event": type(event).__name__, "time": time}
    apply = _APPLY.get(type(event))
    if apply is not None:
        apply(defn, state, event, time, entry)
    if "step" in entry and defn is not None and entry["step"] < len(defn.steps):
        entry["name"] = defn.steps[entry["step"]].name
    state.history.append(entry)


def _saga_started(defn: Saga | None, s: SagaState, e: SagaStarted, time: float,
                  entry: dict[str, Any]) -> None:
    s.name, s.version, s.data, s.started = e.saga, e.version, dict(e.data), time
    s.trace = e.trace


def _step_started(defn: Saga | None, s: SagaState, e: StepStarted, time: float,
                  entry: dict[str, Any]) -> None:
    s.pending = Pending(e.step, "action", e.attempt, e.deadline, e.inline)
    s.attempt, s.retry_at = e.attempt, None
    s.messaged = s.messaged or not e.inline
    entry["step"], entry["attempt"] = e.step, e.attempt


def _step_completed(defn: Saga | None, s: SagaState, e: StepCompleted, time: float,
                    entry: dict[str, Any]) -> None:
    s.pending = None
    if e.result:
        s.data.update(e.result)
    s.completed.append(e.step)
    s.step, s.attempt, s.base, s.uncertain = e.step + 1, 0, 0, False
    s.messaged = False
    entry["step"], entry["attempt"] = e.step, e.attempt


def _step_failed(defn: Saga | None, s: SagaState, e: StepFailed, time: float,
                 entry: dict[str, Any]) -> None:
    i = e.step
    s.pending = None
    entry.update(step=i, attempt=e.attempt, error=e.error, rejected=e.rejected)
    if e.compensate_self:
        s.uncertain = True
    if e.retry_at is not None:
        s.retry_at = e.retry_at
    elif defn is None or not defn.forward_only(i):
        s.status = "compensating"
        s.reason = f"step {defn.steps[i].name if defn else i} failed: {e.error}"
        done = list(s.completed) + ([i] if s.uncertain else [])
        s.to_compensate = _compensable(defn, done) if defn else []
        if s.uncertain and s.messaged and defn and isinstance(defn.steps[i].command, str):
            s.fence = i
        s.attempt, s.base, s.retry_at, s.uncertain = 0, 0, None, False
        s.messaged = False


def _compensation_started(defn: Saga | None, s: SagaState, e: CompensationStarted,
                          time: float, entry: dict[str, Any]) -> None:
    s.pending = Pending(e.step, "compensation", e.attempt, e.deadline, e.inline)
    s.attempt, s.retry_at = e.attempt, None
    s.messaged = s.messaged or not e.inline
    entry["step"], entry["attempt"] = e.step, e.attempt


def _compensation_completed(defn: Saga | None, s: SagaState, e: CompensationCompleted,
                            time: float, entry: dict[str, Any]) -> None:
    s.pending = None
    if s.to_compensate and s.to_compensate[0] == e.step:
        s.to_compensate.pop(0)
    s.attempt, s.base, s.messaged = 0, 0, False
    entry["step"], entry["attempt"] = e.step, e.attempt


def _compensation_failed(defn: Saga | None, s: SagaState, e: CompensationFailed,
                         time: float, entry: dict[str, Any]) -> None:
    s.pending = None
    s.retry_at = e.retry_at
    entry.update(step=e.step, attempt=e.attempt, error=e.error)


def _saga_completed(defn: Saga | None, s: SagaState, e: SagaCompleted, time: float,
                    entry: dict[str, Any]) -> None:
    s.status, s.finished = "completed", time


def _saga_compensated(defn: Saga | None, s: SagaState, e: SagaCompensated, time: float,
                      entry: dict[str, Any]) -> None:
    s.status, s.finished, s.reason = "compensated", time, e.reason


def _saga_stuck(defn: Saga | None, s: SagaState, e: SagaStuck, time: float,
                entry: dict[str, Any]) -> None:
    s.stuck_from = "compensating" if s.status == "compensating" else "running"
    s.status, s.error = "stuck", e.error
    entry["error"] = e.error


def _cancel_requested(defn: Saga | None, s: SagaState, e: SagaCancelRequested,
                      time: float, entry: dict[str, Any]) -> None:
    s.cancel_requested = True
    s.reason = e.reason


def _saga_resumed(defn: Saga | None, s: SagaState, e: SagaResumed, time: float,
                  entry: dict[str, Any]) -> None:
    if s.status == "stuck":
        s.status = s.stuck_from
    # keep counting attempts (a resent attempt 1 would reuse the first one's message
    # id, dropped as a duplicate, and match its stale replies); fresh retry budget
    s.error, s.base, s.retry_at = None, s.attempt, None


def _reply_ignored(defn: Saga | None, s: SagaState, e: ReplyIgnored, time: float,
                   entry: dict[str, Any]) -> None:
    entry.update(step=e.step, kind=e.kind, attempt=e.attempt, reason=e.reason)


#: how each saga event changes the state (and what its history entry shows)
_APPLY: dict[type, Callable[..., None]] = {
    SagaStarted: _saga_started, StepStarted: _step_started, StepCompleted: _step_completed,
    StepFailed: _step_failed, CompensationStarted: _compensation_started,
    CompensationCompleted: _compensation_completed,
    CompensationFailed: _compensation_failed, SagaCompleted: _saga_completed,
    SagaCompensated: _saga_compensated, SagaStuck: _saga_stuck,
    SagaCancelRequested: _cancel_requested, SagaResumed: _saga_resumed,
    ReplyIgnored: _reply_ignored,
}


def stamp(state: SagaState, n: int, time: float) -> None:
    """Give the last `n` events folded into `state` the time the store gave them, so the
    state a driver holds is the one a reader loads (evolve ran before the commit)."""
    if n:  # (0 or no time: a duplicate, whose stored times are the first append's)
        _stamp(state, state.history[-n:], time)


def stamp_first(state: SagaState, n: int, time: float) -> None:
    """`stamp` for the first `n` events folded into `state` (a saga's start, stored
    while its driver was already folding what came next)."""
    _stamp(state, state.history[:n], time)


def _stamp(state: SagaState, entries: list[dict[str, Any]], time: float) -> None:
    if not time:
        return
    for entry in entries:
        entry["time"] = time
        if entry["event"] == "SagaStarted":
            state.started = time
        elif entry["event"] in ("SagaCompleted", "SagaCompensated"):
            state.finished = time


@dataclass(frozen=True)
class Wait:
    """Nothing to do until `until` (a retry's backoff)."""

    until: float


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: ok (with a result), rejected, error or timeout."""

    kind: Literal["ok", "rejected", "error", "timeout"]
    result: dict[str, Any] | None = None
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def advance(defn: Saga, state: SagaState, now: float) -> list[Event] | Wait | None:
    """What to do next when no attempt is in flight: events to append, a wait, or nothing."""
    s = state
    if s.status in ("completed", "compensated", "stuck") or s.pending is not None:
        return None
    if s.status == "running" and s.cancel_requested and s.step < defn.pivot:
        return _cancel(defn, s)  # at once, even during a retry's backoff
    if s.retry_at is not None and now < s.retry_at:
        return Wait(s.retry_at)
    if s.status == "running":
        if s.step >= len(defn.steps):
            return [SagaCompleted(data=s.data)]
        step = defn.steps[s.step]
        deadline = now + step.timeout if step.timeout is not None else None
        return [StepStarted(step=s.step, attempt=s.attempt + 1, deadline=deadline)]
    # compensating
    if not s.to_compensate:
        return [SagaCompensated(reason=s.reason or "compensated")]
    i = s.to_compensate[0]
    step = defn.steps[i]
    timeout = ((step.timeout or DEFAULT_COMMAND_TIMEOUT) if isinstance(step.compensation, str)
               else None)
    deadline = now + timeout if timeout is not None else None
    return [CompensationStarted(step=i, attempt=s.attempt + 1, deadline=deadline)]


def _cancel(defn: Saga, s: SagaState) -> list[Event]:
    # Cancelling between steps: undo what completed. Modelled as the next step
    # failing for good, so the history says where the saga stopped and why.
    # A timed-out attempt of this step may have taken effect: undo it too.
    return [StepFailed(step=s.step, attempt=0, error=s.reason or "cancelled",
                       compensate_self=s.uncertain)]


def on_outcome(defn: Saga, state: SagaState, outcome: Outcome, now: float) -> list[Event]:
    """The events that record how the attempt in flight ended, and what follows from it."""
    p = state.pending
    if p is None:
        return []
    step = defn.steps[p.step]
    n = p.attempt - state.base  # attempts since the start, or since the last resume
    if p.kind == "action":
        if outcome.kind == "ok":
            return [StepCompleted(step=p.step, attempt=p.attempt, result=outcome.result)]
        err = outcome.error or outcome.kind
        if defn.forward_only(p.step):
            if outcome.kind == "rejected":
                return [StepFailed(step=p.step, attempt=p.attempt, error=err, rejected=True),
                        SagaStuck(error=f"step {step.name!r} after the pivot was rejected: "
                                        f"{err}; fix the cause, then retry the saga")]
            # forward-only: retried until it succeeds
            return [StepFailed(step=p.step, attempt=p.attempt, error=err,
                               retry_at=now + step.delay(n))]
        if outcome.kind == "rejected":
            return [StepFailed(step=p.step, attempt=p.attempt, error=err, rejected=True)]
        # A timed-out attempt may still take effect, and so may a command message whose
        # handler failed (its delivery can come back, e.g. after a crash before its ack):
        # remember it (compensate_self), so the step is compensated and its command fenced
        uncertain = outcome.kind == "timeout" or (
            outcome.kind == "error" and not p.inline and step.command is not None)
        if n <= step.retries:
            return [StepFailed(step=p.step, attempt=p.attempt, error=err,
                               retry_at=now + step.delay(n), compensate_self=uncertain)]
        # out of retries: an uncertain attempt is undone too
        return [StepFailed(step=p.step, attempt=p.attempt, error=err,
                           compensate_self=uncertain)]
    if outcome.kind == "ok":
        return [CompensationCompleted(step=p.step, attempt=p.attempt)]
    err = outcome.error or outcome.kind
    if n <= step.compensation_retries:
        return [CompensationFailed(step=p.step, attempt=p.attempt, error=err,
                                   retry_at=now + step.delay(n))]
    return [CompensationFailed(step=p.step, attempt=p.attempt, error=err),
            SagaStuck(error=f"compensation of step {step.name!r} failed after "
                            f"{n} attempts: {err}")]
