"""Subscription bookkeeping, with no I/O: what to deliver, park, settle or dead-letter next.

Every engine keeps, per durable subscription, a cursor (the highest position
taken from the log) and a bounded set of pending rows (taken but not yet
acked). The whole delivery policy is two pure functions, tested exhaustively,
whose plans the engines only persist:

- `plan_fetch`: at-least-once with `ack_wait` leases, `max_deliver`,
  `max_in_flight`, per-key ordering;
- `plan_settle`: what a batch of acks, nacks, terms and releases does to the
  pending rows (`split_settles` says which of them an engine may apply as
  conditional writes without reading the rows first).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from ..messages import Message, OutMessage, new_id

if TYPE_CHECKING:
    from .base import Settle

__all__ = [
    "MAX_DELIVER",
    "TERMINATED",
    "Dead",
    "Pending",
    "Plan",
    "SettlePlan",
    "SubscriptionSpec",
    "dead_letter",
    "dead_letter_headers",
    "plan_fetch",
    "plan_settle",
    "split_settles",
]

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
    #: Redelivery delays: the n-th redelivery after a failure (a nack without a delay, or a
    #: lease that ran out) waits `backoff[n-1]` (the last repeats); empty: no wait.
    backoff: tuple[float, ...] = ()

    def retry_delay(self, attempt: int) -> float:
        """How long a message whose attempt `attempt` failed waits before the next."""
        backoff = self.backoff
        if not backoff:
            return 0.0
        return backoff[min(attempt, len(backoff)) - 1] if attempt > 0 else 0.0


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
    """What one fetch does: rows to (re)deliver, rows to add, rows to dead-letter
    (reason `MAX_DELIVER`: their last attempt's lease ran out)."""

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
    # With a backoff, a lease that runs out is redelivered `retry_delay` later: the row
    # stays due at the end of both (no wait after the last attempt: it is dead-lettered).
    backoff = spec.backoff and spec.max_deliver > 1
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
                if backoff and p.attempt < spec.max_deliver:
                    p.due += spec.retry_delay(p.attempt)
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
            row.due = lease + spec.retry_delay(1) if backoff else lease
            plan.deliver.append(row)
        plan.added.append(row)
        plan.cursor = position
        room -= 1
    if plan.deliver:
        next_due = lease if next_due is None else min(next_due, lease)
    plan.next_due = next_due
    return plan


#: Why a message was dead-lettered (its `tidings-reason` header): one of these, or the
#: reason a consumer gave `term(reason=...)` (for example "decode-error").
MAX_DELIVER = "max_deliver"  # its last attempt failed (nacked, or its lease ran out)
TERMINATED = "terminated"  # the consumer called term()


class Dead(NamedTuple):
    """A pending row to remove and dead-letter, and why (its attempts go in the headers;
    `error`, when the consumer gave one, in `tidings-error`)."""

    row: Pending
    reason: str
    error: str | None = None


@dataclass(slots=True)
class SettlePlan:
    """What one batch of settles does to a subscription's pending rows."""

    #: Acked: remove these rows.
    delete: list[int] = field(default_factory=list)
    #: Store these rows as they are now: nacked (a new `due`) or released (the attempt
    #: undone, due at once).
    update: list[Pending] = field(default_factory=list)
    #: Remove these rows and dead-letter their messages, in this order.
    dead: list[Dead] = field(default_factory=list)


def plan_settle(spec: SubscriptionSpec, rows: Mapping[int, Pending], items: Sequence[Settle],
                now: float) -> SettlePlan:
    """Decide a batch of settles, in order; the first decision per position stands.

    `rows` holds (at least) the pending rows of the settled positions. A
    position with no row (already acked or dead-lettered, never taken) or with
    a row that is not out (attempt 0: parked behind its key, or its only
    delivery released) is ignored, and so is any later settle of a position
    already settled in this batch.

    - ack: the row is deleted;
    - nack: due again at `now + delay` (no delay given: the spec's `retry_delay`), or,
      if that was its last attempt (`attempt >= max_deliver`), dead-lettered
      (`MAX_DELIVER`);
    - term: dead-lettered (its reason, or `TERMINATED`);
    - release (handed back unseen): the delivery is not an attempt, so
      `attempt - 1`, due at once.

    The rows given are not changed; updated rows are new ones.
    """
    plan = _decide(spec, rows, items, now)
    n = len(plan.delete) + len(plan.update) + len(plan.dead)
    if n > 1 and len(_positions(plan.delete, plan.update, plan.dead)) < n:
        plan = _decide(spec, rows, _first_per_position(items), now)  # (rare) a repeat
    return plan


def _decide(spec: SubscriptionSpec, rows: Mapping[int, Pending], items: Iterable[Settle],
            now: float) -> SettlePlan:
    """`plan_settle` for items that settle each position at most once."""
    plan = SettlePlan()
    update, dead = plan.update, plan.dead
    get, acked = rows.get, plan.delete.append
    for s in items:
        position = s.position
        row = get(position)
        if row is None or not row.attempt:
            continue
        kind = s.kind
        if kind == "ack":
            acked(position)
        elif kind == "release":
            update.append(Pending(position, row.key, row.attempt - 1, now))
        elif kind == "term":
            dead.append(Dead(row, s.reason or TERMINATED, s.error))
        elif row.attempt >= spec.max_deliver:
            dead.append(Dead(row, MAX_DELIVER))
        else:
            delay = s.delay
            if delay is None:
                delay = spec.retry_delay(row.attempt)
            update.append(Pending(position, row.key, row.attempt, now + delay))
    return plan


def _positions(positions: list[int], rows: list[Pending], dead: list[Dead]) -> set[int]:
    """The distinct positions among a plan's parts (a set built in C for the usual
    all-acks batch: checking for repeats after the fact costs less than per item)."""
    out = set(positions)
    if rows or dead:
        out.update([r.position for r in rows], [d.row.position for d in dead])
    return out


def _first_per_position(items: Iterable[Settle]) -> list[Settle]:
    first: dict[int, Settle] = {}
    for s in items:
        first.setdefault(s.position, s)
    return list(first.values())


def split_settles(items: Sequence[Settle]) -> tuple[list[int], list[int], list[Settle]]:
    """The first settle per position, as (acked positions, released positions, the rest).

    Acks and releases depend on their row only through "is it out"
    (`attempt > 0`), so an engine may apply them as conditional writes without
    reading the rows ("delete where attempt > 0"; "attempt - 1 and due now
    where attempt > 0") and plan the rest (nacks, terms) with `plan_settle`:
    together that is exactly `plan_settle` over all the items
    (tests/test_planners.py checks it). The three parts never share a
    position, so they may be applied in any order.
    """
    acks = [s.position for s in items if s.kind == "ack"]
    releases = [s.position for s in items if s.kind == "release"]
    rest = [s for s in items if s.kind != "ack" and s.kind != "release"]
    n = len(items)
    if n > 1 and len(set(acks).union(releases, [s.position for s in rest])) < n:
        return split_settles(_first_per_position(items))  # (rare) a repeat
    return acks, releases, rest


def dead_letter(spec: SubscriptionSpec, message: Message, dead: Dead) -> OutMessage:
    """The dead letter of `message` for `spec.dead_letter` (which must be set): the same
    key and data, with `dead_letter_headers`."""
    assert spec.dead_letter is not None
    headers = dead_letter_headers(
        message.headers, topic=message.topic, id=message.id, position=message.position,
        group=spec.group, reason=dead.reason, attempts=dead.row.attempt, error=dead.error,
    )
    return OutMessage(new_id(), spec.dead_letter, message.key, message.data, headers)


def dead_letter_headers(
    headers: Mapping[str, str] | None,
    *,
    topic: str,
    id: str,
    position: int,
    group: str,
    reason: str,
    attempts: int,
    error: str | None = None,
) -> dict[str, str]:
    """The headers of a dead letter: the original ones plus where it came from and why."""
    out = dict(headers or {})
    # a redriven message failing again: its new dead letter is an ordinary one (every
    # subscriber of the dead-letter topic gets it)
    out.pop("tidings-redrive-group", None)
    out.pop("tidings-redriven", None)
    if error:
        out["tidings-error"] = error
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
