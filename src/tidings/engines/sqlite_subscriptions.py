"""The SQLite engine's durable subscriptions and retention (see `sqlite.py` for the writer).

Each function runs its SQL through the engine's writer (`engine.transact`) or
a reader snapshot (`engine._read_op`); the delivery policy itself is the pure
`plan_fetch`.
"""

from __future__ import annotations

import json
import sqlite3
import time as _time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .. import topics as _topics
from ..messages import Message, OutMessage, new_id
from .base import Retention, Settle, SubscriptionInfo, TopicInfo
from .delivery import Pending, SubscriptionSpec, dead_letter_headers, plan_fetch

if TYPE_CHECKING:
    from .sqlite import SqliteEngine, Tx

_MSG_COLS = "position, topic_id, id, key, time, headers, data"


# subscriptions -------------------------------------------------------------
async def subscribe(engine: SqliteEngine, spec: SubscriptionSpec, start_after: int | None) -> Any:
    text = json.dumps(asdict(spec))

    def op(tx: Tx) -> int:
        row = tx.execute(
            "SELECT id FROM tidings_subscriptions WHERE grp = ? AND pattern = ?",
            (spec.group, spec.pattern),
        ).fetchone()
        if row is not None:
            tx.execute("UPDATE tidings_subscriptions SET spec = ? WHERE id = ?",
                       (text, row[0]))
            return int(row[0])
        cur = tx.execute(
            "INSERT INTO tidings_subscriptions (grp, pattern, spec, cursor) "
            "VALUES (?, ?, ?, ?)",
            (spec.group, spec.pattern, text, start_after or 0),
        )
        return int(cur.lastrowid or 0)

    sub_id = await engine.transact(op, durable=True)
    return (sub_id, spec)


def _settle_tx(engine: SqliteEngine, tx: Tx, sub_id: int, spec: SubscriptionSpec, items: Sequence[Settle],
               now: float) -> None:
    conn = tx.conn
    acks = []
    for s in items:
        if s.kind == "ack":
            acks.append((sub_id, s.position))
            continue
        if s.kind == "release":
            conn.execute(
                "UPDATE tidings_pending SET attempt = attempt - 1, due = ? "
                "WHERE sub_id = ? AND position = ? AND attempt > 0",
                (now, sub_id, s.position),
            )
            continue
        row = conn.execute(
            "SELECT attempt, key FROM tidings_pending WHERE sub_id = ? AND position = ?",
            (sub_id, s.position),
        ).fetchone()
        if row is None or row[0] == 0:
            continue
        if s.kind == "term" or row[0] >= spec.max_deliver:
            conn.execute("DELETE FROM tidings_pending WHERE sub_id = ? AND position = ?",
                         (sub_id, s.position))
            reason = "terminated" if s.kind == "term" else "max_deliver"
            _dead_letter(engine, tx, spec, s.position, reason, row[0])
        else:
            conn.execute(
                "UPDATE tidings_pending SET due = ? WHERE sub_id = ? AND position = ?",
                (now + s.delay, sub_id, s.position),
            )
    if acks:
        conn.executemany(
            "DELETE FROM tidings_pending WHERE sub_id = ? AND position = ? AND attempt > 0",
            acks,
        )


def _dead_letter(engine: SqliteEngine, tx: Tx, spec: SubscriptionSpec, position: int, reason: str,
                 attempts: int) -> None:
    if spec.dead_letter is None:
        return
    row = tx.execute(
        f"SELECT {_MSG_COLS} FROM tidings_messages WHERE position = ?", (position,)
    ).fetchone()
    if row is None:
        return
    engine._refresh_topics(tx.conn)
    (m,) = engine._messages([row])
    h = dead_letter_headers(
        dict(m.headers), topic=m.topic, id=m.id, position=position, group=spec.group,
        reason=reason, attempts=attempts,
    )
    tx.append([OutMessage(new_id(), spec.dead_letter, m.key, m.data, h)])


async def fetch(
    engine: SqliteEngine, handle: Any, limit: int, now: float, settles: Sequence[Settle] = ()
) -> tuple[list[Message], float | None]:
    sub_id, spec = handle
    if not settles:
        # Most wake-ups are for other topics: look first (a read on the loop's own
        # connection), and take the writer only when there is something to claim.
        idle = await engine._read_op(lambda conn: _idle(engine, conn, sub_id, spec, now),
                                     inline=True, atomic=False)
        if idle is not _BUSY:
            return [], idle  # type: ignore[return-value]

    def op(tx: Tx) -> tuple[list[Message], float | None]:
        conn = tx.conn
        if settles:
            _settle_tx(engine, tx, sub_id, spec, settles, now)
        row = conn.execute(
            "SELECT cursor FROM tidings_subscriptions WHERE id = ?", (sub_id,)
        ).fetchone()
        if row is None:
            return [], None
        cursor = int(row[0])
        pending = [
            Pending(*r) for r in conn.execute(
                "SELECT position, key, attempt, due FROM tidings_pending "
                "WHERE sub_id = ? ORDER BY position", (sub_id,)
            )
        ]
        room = spec.max_in_flight - len(pending)
        want = max(0, min(limit, room + sum(1 for p in pending
                                            if p.attempt >= spec.max_deliver)))
        rows = engine._scan(conn, spec.pattern, cursor, None, want) if want else []
        by_pos = {r[0]: r for r in rows}
        plan = plan_fetch(spec, pending, [(r[0], r[3]) for r in rows], cursor=cursor,
                          now=now, limit=limit)
        if want and len(rows) < want and len(plan.added) == len(rows):
            last = conn.execute(
                "SELECT value FROM tidings_meta WHERE name = 'position'").fetchone()
            plan.cursor = max(plan.cursor, int(last[0]) if last else 0)
        for p in plan.dead:
            conn.execute("DELETE FROM tidings_pending WHERE sub_id = ? AND position = ?",
                         (sub_id, p.position))
            _dead_letter(engine, tx, spec, p.position, "max_deliver", p.attempt)
        if plan.added:
            conn.executemany(
                "INSERT INTO tidings_pending (sub_id, position, key, attempt, due) "
                "VALUES (?, ?, ?, ?, ?)",
                [(sub_id, p.position, p.key, p.attempt, p.due) for p in plan.added],
            )
        added = {p.position for p in plan.added}
        again = [p for p in plan.deliver if p.position not in added]
        if again:
            conn.executemany(
                "UPDATE tidings_pending SET attempt = ?, due = ? "
                "WHERE sub_id = ? AND position = ?",
                [(p.attempt, p.due, sub_id, p.position) for p in again],
            )
            need = [p.position for p in again if p.position not in by_pos]
            if need:
                for r in conn.execute(
                    f"SELECT {_MSG_COLS} FROM tidings_messages WHERE position IN "
                    f"({','.join(map(str, need))})"
                ):
                    by_pos[r[0]] = r
        if plan.cursor != cursor:
            conn.execute("UPDATE tidings_subscriptions SET cursor = ? WHERE id = ?",
                         (plan.cursor, sub_id))
        attempts = {p.position: p.attempt for p in plan.deliver}
        rows_out = [by_pos[p.position] for p in plan.deliver if p.position in by_pos]
        return engine._messages(rows_out, attempts), plan.next_due

    # A fetch wakes nobody unless it stored messages (dead letters): waking the
    # waiting consumers after every empty look would make them spin.
    return await engine.transact(op, durable=False, notify=spec.pattern if settles else False)


_BUSY = object()  # _idle: there may be work, claim it on the writer
_PEEK_TOPICS = 16  # patterns matching more topics than this skip the look


def _idle(engine: SqliteEngine, conn: sqlite3.Connection, sub_id: int,
          spec: SubscriptionSpec, now: float) -> float | None | object:
    """When the subscription has nothing to deliver now: the next due time (or None);
    otherwise _BUSY."""
    row = conn.execute("SELECT cursor FROM tidings_subscriptions WHERE id = ?",
                       (sub_id,)).fetchone()
    if row is None:
        return _BUSY
    cursor = int(row[0])
    ids = engine._matching_ids(conn, spec.pattern)
    if len(ids) > _PEEK_TOPICS:
        return _BUSY
    for tid in ids:
        last = conn.execute("SELECT max(position) FROM tidings_messages WHERE topic_id = ?",
                            (tid,)).fetchone()[0]
        if last is not None and last > cursor:
            return _BUSY
    due = conn.execute("SELECT min(due) FROM tidings_pending WHERE sub_id = ?",
                       (sub_id,)).fetchone()[0]
    if due is not None and due <= now:
        return _BUSY
    return None if due is None else float(due)


async def settle(engine: SqliteEngine, handle: Any, items: Sequence[Settle], now: float) -> None:
    sub_id, spec = handle
    await engine.transact(lambda tx: _settle_tx(engine, tx, sub_id, spec, items, now),
                          durable=False, notify=spec.pattern)


async def delete_subscription(engine: SqliteEngine, group: str, pattern: str) -> bool:
    def op(tx: Tx) -> bool:
        row = tx.execute("SELECT id FROM tidings_subscriptions WHERE grp = ? AND pattern = ?",
                         (group, pattern)).fetchone()
        if row is None:
            return False
        tx.execute("DELETE FROM tidings_pending WHERE sub_id = ?", (row[0],))
        tx.execute("DELETE FROM tidings_subscriptions WHERE id = ?", (row[0],))
        return True

    return await engine.transact(op, durable=True)


# retention -----------------------------------------------------------------
async def set_retention(engine: SqliteEngine, topic: str, retention: Retention) -> None:
    text = json.dumps(asdict(retention))

    def op(tx: Tx) -> None:
        tid = engine._topic_id(tx.conn, topic)
        tx.execute("UPDATE tidings_topics SET retention = ? WHERE id = ?", (text, tid))

    await engine.transact(op, durable=True)


def _floor(engine: SqliteEngine, conn: sqlite3.Connection, topic: str) -> int:
    floor: int | None = None
    for sub_id, pattern, cursor in conn.execute(
        "SELECT id, pattern, cursor FROM tidings_subscriptions"
    ).fetchall():
        if not _topics.matches(pattern, topic):
            continue
        low = conn.execute("SELECT min(position) FROM tidings_pending WHERE sub_id = ?",
                           (sub_id,)).fetchone()[0]
        mark = cursor + 1 if low is None else min(low, cursor + 1)
        floor = mark if floor is None else min(floor, mark)
    return floor if floor is not None else 2**62


async def trim(engine: SqliteEngine, now: float) -> int:
    def op(tx: Tx) -> int:
        conn = tx.conn
        removed = 0
        for tid, name, text in conn.execute(
            "SELECT id, name, retention FROM tidings_topics WHERE retention IS NOT NULL"
        ).fetchall():
            r = Retention(**json.loads(text))
            cut = 0
            if r.max_messages is not None:
                row = conn.execute(
                    "SELECT position FROM tidings_messages WHERE topic_id = ? "
                    "ORDER BY position DESC LIMIT 1 OFFSET ?", (tid, r.max_messages)
                ).fetchone()
                if row:
                    cut = max(cut, row[0])
            if r.max_age is not None:
                row = conn.execute(
                    "SELECT max(position) FROM tidings_messages WHERE topic_id = ? "
                    "AND time < ?", (tid, now - r.max_age)
                ).fetchone()
                if row and row[0] is not None:
                    cut = max(cut, row[0])
            if r.max_bytes is not None:
                row = conn.execute(
                    "SELECT position FROM (SELECT position, sum(length(data)) OVER "
                    "(ORDER BY position DESC) AS total FROM tidings_messages "
                    "WHERE topic_id = ?) WHERE total > ? LIMIT 1", (tid, r.max_bytes)
                ).fetchone()
                if row:
                    cut = max(cut, row[0])
            cut = min(cut, _floor(engine, conn, name) - 1)
            if cut > 0:
                cur = conn.execute(
                    "DELETE FROM tidings_messages WHERE topic_id = ? AND position <= ?",
                    (tid, cut),
                )
                removed += cur.rowcount
        return removed

    return await engine.transact(op, durable=False)


# introspection -------------------------------------------------------------
async def topics(engine: SqliteEngine) -> list[TopicInfo]:
    def op(conn: sqlite3.Connection) -> list[TopicInfo]:
        rows = conn.execute(
            "SELECT t.name, count(m.position), coalesce(sum(length(m.data)), 0), "
            "min(m.position), max(m.position) FROM tidings_topics t "
            "LEFT JOIN tidings_messages m ON m.topic_id = t.id GROUP BY t.id ORDER BY t.name"
        ).fetchall()
        return [TopicInfo(*r) for r in rows]

    return await engine._read_op(op)


async def subscriptions(engine: SqliteEngine) -> list[SubscriptionInfo]:
    now = _time.time()

    def op(conn: sqlite3.Connection) -> list[SubscriptionInfo]:
        out = []
        for sub_id, grp, pattern, spec, cursor in conn.execute(
            "SELECT id, grp, pattern, spec, cursor FROM tidings_subscriptions "
            "ORDER BY grp, pattern"
        ).fetchall():
            s = json.loads(spec)
            pending, in_flight = conn.execute(
                "SELECT count(*), coalesce(sum(attempt > 0 AND due > ?), 0) "
                "FROM tidings_pending WHERE sub_id = ?", (now, sub_id)
            ).fetchone()
            ids = engine._matching_ids(conn, pattern)
            behind = 0
            if ids:
                behind = conn.execute(
                    "SELECT count(*) FROM tidings_messages WHERE position > ? AND "
                    f"topic_id IN ({','.join(map(str, ids))})", (cursor,)
                ).fetchone()[0]
            out.append(SubscriptionInfo(grp, pattern, cursor, pending, in_flight,
                                        behind + pending, bool(s["ordered"]),
                                        int(s["max_in_flight"])))
        return out

    return await engine._read_op(op)
