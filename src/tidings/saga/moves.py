"""A saga's next moves as the events to store and the messages to send with them.

The saga's stream is its outbox: a command is published in the same transaction
as the event that decides to send it (`StepStarted`, `CompensationStarted`), and
the end marker (`saga.N.ended`) with the saga's last event. Every attempt of a
command goes out under an id and an idempotency key derived from the saga, the
step and the attempt, so a re-send is a duplicate the engine and the service's
inbox drop. Its `reply-to` and `saga-coordinator` headers send the reply back to the
coordinator that sent it (see coordinator.py); a coordinator taking an attempt up
from another one asks it again under its own (`SagaRun._ask_again`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, NamedTuple

import msgspec

from ..messages import OutMessage, encode_data, new_id
from .definition import (
    CompensationStarted,
    Saga,
    SagaCompensated,
    SagaCompleted,
    SagaState,
    StepStarted,
    advance,
    evolve,
)
from .handlers import FENCE_COMMAND, FENCE_KEY, CommandHandler

if TYPE_CHECKING:
    from ..eventsourcing.events import Event

__all__ = ["CommandMessage", "ReplyTo", "command_message", "forward_key", "next_moves",
           "stream_id"]

#: the inline handler of a command on this hub, if any (`Coordinator.inline_handler`)
InlineLookup = Callable[[str], CommandHandler | None]
Kind = Literal["action", "compensation"]
_LIFECYCLE_END = (SagaCompleted, SagaCompensated)


def stream_id(name: str, saga_id: str) -> str:
    """The stream of saga `saga_id` of definition `name` (ids are unique per name only)."""
    return f"saga-{name}-{saga_id}"


class ReplyTo(NamedTuple):
    """Where a command's reply goes: `topic` (its `reply-to`), shared by a few
    coordinators at most, and the `coordinator` that sent it (its `saga-coordinator`
    header, which the reply carries back: the one that takes the reply)."""

    topic: str
    coordinator: str


class CommandMessage(msgspec.Struct, frozen=True):
    """An attempt's command, as it goes out (or as an inline handler gets it)."""

    id: str  # the same every time one coordinator (re)sends it: the engine keeps one copy
    topic: str
    data: bytes
    headers: dict[str, str]


def next_moves(defn: Saga, state: SagaState, events: list[Event], now: float,
               inline: InlineLookup, *, then_advance: bool,
               reply_to: ReplyTo | None = None) -> tuple[list[Event], list[OutMessage]]:
    """Fold `events` into `state` and, when `then_advance`, the next move too if it is
    immediate; the events to store and the messages (commands, the end marker) to
    send with them; replies go to `reply_to` (by default the saga's shared
    `saga.N.replies`).

    (`then_advance` is False while something waits in the saga's inbox: a cancel or a
    reply that arrived meanwhile is applied first, so a cancel between steps stops the
    saga before the next step.)
    """
    batch = [_mark_inline(defn, state, ev, inline) for ev in events]
    for ev in batch:
        evolve(defn, state, ev, now)
    nxt = advance(defn, state, now) if then_advance else None
    if isinstance(nxt, list):
        nxt = [_mark_inline(defn, state, ev, inline) for ev in nxt]
        for ev in nxt:
            evolve(defn, state, ev, now)
        batch += nxt
    messages = []
    for ev in batch:
        if isinstance(ev, (StepStarted, CompensationStarted)):
            out = attempt_message(defn, state, ev, reply_to)
            if out is not None:
                messages.append(out)
        elif isinstance(ev, _LIFECYCLE_END):
            messages.append(OutMessage(new_id(), f"saga.{defn.name}.ended", state.id,
                                       b"{}", {"stream-id": stream_id(defn.name, state.id),
                                               "stream-version": str(state.stream_version),
                                               "status": state.status,
                                               "content-type": "application/json"}))
    return batch, messages


def _mark_inline(defn: Saga, state: SagaState, ev: Event, inline: InlineLookup) -> Event:
    """An attempt of a command with an inline handler here is run inline, unless an
    earlier attempt of it went out as a message (the service's inbox has that one:
    only the message path deduplicates against it)."""
    if (isinstance(ev, (StepStarted, CompensationStarted)) and not ev.inline
            and not state.messaged
            # a fencing compensation runs where the command's inbox is, as a message
            and not (isinstance(ev, CompensationStarted) and ev.step == state.fence)):
        step = defn.steps[ev.step]
        command = step.command if isinstance(ev, StepStarted) else step.compensation
        if isinstance(command, str) and inline(command) is not None:
            return msgspec.structs.replace(ev, inline=True)
    return ev


def attempt_message(defn: Saga, state: SagaState, ev: StepStarted | CompensationStarted,
                    reply_to: ReplyTo | None = None, again: bool = False
                    ) -> OutMessage | None:
    """The message the attempt `ev` starts sends; None when it
    sends none (an inline attempt, or a local function the driver runs). With `again`,
    the attempt asked again by a coordinator that did not send it (`SagaRun._ask_again`)."""
    if ev.inline:
        return None  # run by an inline handler in the driver's own transaction
    kind: Kind = "action" if isinstance(ev, StepStarted) else "compensation"
    built = command_message(defn, state, ev.step, kind, ev.attempt, reply_to, again)
    if built is None:
        return None
    return OutMessage(built.id, built.topic, state.id, built.data, built.headers, True)


def command_message(defn: Saga, state: SagaState, index: int, kind: Kind, attempt: int,
                    reply_to: ReplyTo | None = None, again: bool = False
                    ) -> CommandMessage | None:
    """The command attempt `attempt` of step `index` sends (`kind`: its action or its
    compensation), its reply going to `reply_to` (by default `saga.N.replies`); None
    when that is a local function. `again` makes it the same attempt asked again by
    `reply_to`'s coordinator: another message id, the same idempotency key."""
    step = defn.steps[index]
    command = step.command if kind == "action" else step.compensation
    if not isinstance(command, str):
        return None
    headers = {
        "saga-id": state.id, "saga-name": defn.name, "saga-version": str(defn.version),
        "saga-step": str(index), "saga-step-name": step.name, "saga-kind": kind,
        "saga-attempt": str(attempt),
        "reply-to": reply_to.topic if reply_to else f"saga.{defn.name}.replies",
        "idempotency-key": _idempotency_key(state, step.name, kind),
        "correlation-id": state.id, "content-type": "application/json",
    }
    if reply_to is not None:
        headers["saga-coordinator"] = reply_to.coordinator
    if state.trace is not None:  # the saga's trace (see SagaStarted.trace)
        headers["traceparent"] = state.trace
    payload = dict(state.data, saga_id=state.id)
    if kind == "compensation":
        payload["reason"] = state.reason or "compensated"
        if index == state.fence and isinstance(step.command, str):
            # the step's command may still arrive: the handler fences it
            headers[FENCE_COMMAND] = step.command
            headers[FENCE_KEY] = forward_key(state, step.name)
    data, _ = encode_data(payload)
    mid = message_id(state, step.name, kind, attempt)
    if again and reply_to is not None:
        mid = f"{mid}:{reply_to.coordinator}"
    return CommandMessage(mid, command, data, headers)


def message_id(state: SagaState, step: str, kind: str, attempt: int) -> str:
    """The id of the message attempt `attempt` of `step`'s `kind` goes out under (asked
    again by coordinator C: this id, then `:C`)."""
    return f"{state.id}:{step}:{kind}:{attempt}"


def forward_key(state: SagaState, step: str) -> str:
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
