"""Subscription bookkeeping, with no I/O: what to deliver, park or dead-letter next.

Every engine keeps, per durable subscription, a cursor (the highest position
taken from the log) and a bounded set of pending rows (taken but not yet
acked). `plan_fetch` is the whole delivery policy — at-least-once with
`ack_wait` leases, `max_deliver`, `max_in_flight`, per-key ordering — as a
pure function, so it is tested exhaustively and engines only move bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

__all__ = ["Pending", "Plan", "SubscriptionSpec", "dead_letter_headers", "plan_fetch"]

_NO_KEY = object()  # ordered subscriptions treat keyless messages as one sequence


@dataclass(slots=True)
class SubscriptionSpec:
    """A durable subscription's settings, as stored by the engine."""

    group: str
    pattern: str
    ack_wait: float = 30.0
    max_deliver: int = 5
    dead_letter: str | None = None
    ordered: bool = False
    max_in_flight: int = 100


class Pending(msgspec.Struct, gc=False):
    """A message taken from the log by a subscription and not yet settled.

    `attempt` is how many times it was delivered (0: parked behind an earlier
    message with the same key); `due` is when it may be delivered (again).
    (A msgspec Struct without GC tracking: thousands are made per second.)
    """

    position: int
    key: str | None
    attempt: int
    due: float


@dataclass(slots=True)
class Plan:
    """What one fetch does: rows to (re)deliver, rows to add, rows to dead-letter."""

    deliver: list[Pending] = field(default_factory=list)
    added: list[Pending] = field(default_factory=list)
    dead: list[Pending] = field(default_factory=list)
    cursor: int = 0
    #: The earliest time a pending row becomes due again (None: nothing waits on a timer).
    next_due: float | None = None


def plan_fetch(
    spec: SubscriptionSpec,
    pending: Sequence[Pending],
    candidates: Iterable[tuple[int, str | None]],
    *,
    cursor: int,
    now: float,
    limit: int,
) -> Plan:
    """Decide one fetch of at most `limit` deliveries.

    `pending` must be sorted by position; `candidates` are the next log
    messages after `cursor` that match the subscription, in position order.
    Rows in `plan.deliver` and `plan.added` are already updated (attempt,
    due); the engine writes them back and hands the delivered ones out.
    """
    plan = Plan(cursor=cursor)
    live: list[Pending] = []
    for p in pending:
        if p.attempt >= spec.max_deliver and p.due <= now:
            plan.dead.append(p)
        else:
            live.append(p)

    lease = now + spec.ack_wait
    seen: set[object] = set()
    next_due: float | None = None
    for p in live:
        if spec.ordered:
            k = _NO_KEY if p.key is None else p.key
            if k in seen:
                continue  # not the head of its key: waits for the one before it
            seen.add(k)
        if p.attempt == 0 or p.due <= now:
            if len(plan.deliver) < limit:
                p.attempt += 1
                p.due = lease
                plan.deliver.append(p)
            else:
                next_due = now  # ready, but over this fetch's limit
        elif next_due is None or p.due < next_due:
            next_due = p.due

    room = spec.max_in_flight - len(live)
    for position, key in candidates:
        if room <= 0 or len(plan.deliver) >= limit:
            break
        row = Pending(position, key, 0, 0.0)
        k = _NO_KEY if key is None else key
        if spec.ordered and k in seen:
            pass  # parked: delivered when the earlier message of its key is settled
        else:
            if spec.ordered:
                seen.add(k)
            row.attempt = 1
            row.due = lease
            plan.deliver.append(row)
        plan.added.append(row)
        plan.cursor = position
        room -= 1
    if plan.deliver:
        next_due = lease if next_due is None else min(next_due, lease)
    plan.next_due = next_due
    return plan


def dead_letter_headers(
    headers: dict[str, str] | None,
    *,
    topic: str,
    id: str,
    position: int,
    group: str,
    reason: str,
    attempts: int,
) -> dict[str, str]:
    """The headers of a dead letter: the original ones plus where it came from and why."""
    out = dict(headers or {})
    out.update(
        {
            "tidings-original-topic": topic,
            "tidings-original-id": id,
            "tidings-original-position": str(position),
            "tidings-group": group,
            "tidings-reason": reason,
            "tidings-attempts": str(attempts),
        }
    )
    return out
