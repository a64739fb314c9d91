"""Atomic writes across several streams (and messages): all of them or none.

Used by command handlers: the aggregates a handler changed, its inbox
record and its reply commit together, so a crash never leaves a state change
without its inbox record (which would apply a redelivered command twice).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from ..engines.store_base import AppendOutcome, SnapshotRow, StreamAppend
from ..errors import InvalidArgument
from ..messages import OutMessage, check_headers
from .aggregate import Aggregate
from .records import _Any
from .store import default_topic

if TYPE_CHECKING:
    from ..hub import Hub

__all__ = ["commit"]


async def commit(
    hub: Hub,
    aggregates: Sequence[Aggregate],
    appends: Iterable[tuple[str, Sequence[object], int | _Any, str | None]],
    messages: Sequence[OutMessage] = (),
    *,
    headers: Mapping[str, str] | None = None,
) -> list[AppendOutcome]:
    """Save `aggregates` (optimistic concurrency from their loaded versions), append
    `(stream_id, events, expected_version, topic)` items and store `messages`,
    atomically (one `StoreBackend.append_batch`). Raises `ConcurrencyError` (nothing
    stored) on any conflict. Returns each append's outcome (aggregates with new events
    first, then `appends`, in order).
    """
    store = hub.events
    items: list[StreamAppend] = []
    snapshots: dict[str, SnapshotRow] = {}
    audit = store.audit_headers()
    given = check_headers(headers, "append")
    for agg in aggregates:
        pending = agg._pending
        if not pending:
            continue
        # the repository the aggregate was loaded with: its topic and snapshot policy
        repo = getattr(agg, "_repository", None) or hub.repository(type(agg))
        h = {**audit, "aggregate-type": type(agg).__name__, **given}
        loaded = agg.version - len(pending)
        items.append((agg.id, store._records_with(pending, h), loaded, repo.topic))
        snap = repo._due_snapshot(agg, loaded)
        if snap is not None:
            snapshots[agg.id] = snap
    for stream_id, events, expected, topic in appends:
        if not events:
            raise InvalidArgument(f"nothing to append to {stream_id!r}: give it events")
        exp = None if isinstance(expected, _Any) else int(expected)
        items.append((stream_id, store._records_with(events, {**audit, **given}), exp,
                      topic or default_topic(stream_id)))
    if hub.telemetry is not None and messages:  # a saga's commands, replies, end marker
        with hub.telemetry.sending(messages):
            outcomes = await store.backend.append_batch(items, messages, snapshots)
    else:
        outcomes = await store.backend.append_batch(items, messages, snapshots)
    hub.counters.on_commit(items, outcomes, messages)
    for agg in aggregates:
        if agg._pending:
            agg._pending = []
            store.cache(agg)
    return outcomes
