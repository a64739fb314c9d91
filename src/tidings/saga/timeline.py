"""A saga's timeline: each step's attempts with their times, commands and replies.

Pure: folds the saga's stored events (with their times) the way the
coordinator does (`evolve`), and rebuilds each attempt's command with the
function that built it when it was sent (`command_message`), so the payload
shown is the one the service got, not a guess.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import msgspec

from ..eventsourcing.events import Event
from .definition import (
    CompensationCompleted,
    CompensationFailed,
    CompensationStarted,
    ReplyIgnored,
    Saga,
    SagaState,
    StepCompleted,
    StepFailed,
    StepStarted,
    evolve,
)
from .moves import command_message

__all__ = ["fold_timeline"]


def fold_timeline(defn: Saga | None, saga_id: str, events: Iterable[tuple[Event, float]]
                  ) -> tuple[SagaState, list[dict[str, Any]]]:
    """The saga's state, and one row per step and kind (action, compensation) in the
    order they began: `{step, name, kind, command, status, started, finished,
    duration, attempts: [{attempt, started, finished, duration, outcome, command,
    reply, error, inline}]}`. Times are seconds since the epoch; `command` is None
    for a local function, and for every attempt when `defn` (the saga's version
    of the definition) is not known here."""
    state = SagaState(id=saga_id)
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for ev, t in events:
        evolve(defn, state, ev, t)
        if isinstance(ev, (StepStarted, CompensationStarted)):
            kind: Literal["action", "compensation"] = \
                "action" if isinstance(ev, StepStarted) else "compensation"
            row = rows.get((ev.step, kind))
            if row is None:
                row = rows[(ev.step, kind)] = _row(defn, ev.step, kind, t)
            row["status"] = "running"
            built = command_message(defn, state, ev.step, kind, ev.attempt) \
                if defn is not None and ev.step < len(defn.steps) else None
            row["attempts"].append({
                "attempt": ev.attempt, "started": t, "finished": None, "duration": None,
                "outcome": "running", "inline": ev.inline, "deadline": ev.deadline,
                "command": None if built is None else {
                    "topic": built.topic, "id": built.id, "headers": built.headers,
                    "data": msgspec.json.decode(built.data)},
                "reply": None, "error": None})
        elif isinstance(ev, (StepCompleted, CompensationCompleted, StepFailed,
                             CompensationFailed)):
            kind = "action" if isinstance(ev, (StepCompleted, StepFailed)) else "compensation"
            row = rows.get((ev.step, kind))
            if row is None:  # (an outcome without its start: a stream cut short)
                row = rows[(ev.step, kind)] = _row(defn, ev.step, kind, t)
            attempt = _attempt(row, ev.attempt, t)
            attempt["finished"] = t
            attempt["duration"] = max(0.0, t - attempt["started"])
            if isinstance(ev, (StepFailed, CompensationFailed)):
                attempt["error"] = ev.error
                rejected = isinstance(ev, StepFailed) and ev.rejected
                attempt["outcome"] = "rejected" if rejected else "failed"
                row["status"] = "retrying" if ev.retry_at is not None else attempt["outcome"]
                if ev.retry_at is not None:
                    attempt["retry_at"] = ev.retry_at
            else:
                attempt["outcome"] = "ok"
                attempt["reply"] = ev.result if isinstance(ev, StepCompleted) else None
                row["status"] = "completed" if kind == "action" else "compensated"
            row["finished"] = t
            row["duration"] = max(0.0, t - row["started"])
        elif isinstance(ev, ReplyIgnored):
            kind = "action" if ev.kind == "action" else "compensation"
            row = rows.get((ev.step, kind))
            if row is not None:
                row.setdefault("ignored", []).append(
                    {"attempt": ev.attempt, "time": t, "reason": ev.reason})
    return state, list(rows.values())


def _row(defn: Saga | None, index: int, kind: str, t: float) -> dict[str, Any]:
    step = defn.steps[index] if defn is not None and index < len(defn.steps) else None
    if step is None:
        name, command = f"step {index}", None
    else:
        name = step.name
        target = step.command if kind == "action" else step.compensation
        command = target if isinstance(target, str) else None
    return {"step": index, "name": name, "kind": kind, "command": command,
            "status": "running", "started": t, "finished": None, "duration": None,
            "attempts": []}


def _attempt(row: dict[str, Any], number: int, t: float) -> dict[str, Any]:
    attempts: list[dict[str, Any]] = row["attempts"]
    for i in range(len(attempts) - 1, -1, -1):
        if attempts[i]["attempt"] == number:
            return attempts[i]
    new: dict[str, Any] = {"attempt": number, "started": t, "finished": None,
                           "duration": None, "outcome": "running", "inline": False,
                           "deadline": None, "command": None, "reply": None, "error": None}
    attempts.append(new)
    return new
