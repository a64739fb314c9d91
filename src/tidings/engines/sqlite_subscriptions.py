"""The SQLite engine's durable subscriptions and retention (see `sqlite.py` for the writer).

Each function runs its SQL through the engine's writer (`engine.transact`) or
a reader snapshot (`engine._read_op`); the decisions are the pure planners'
(`plan_fetch`, `plan_settle`, `plan_trim`): this module loads their inputs and
writes their plans back.
"""

from __future__ import annotations

import json
import sqlite3
import time as _time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..messages import Message
from .base import Retention, Settle, SubscriptionInfo, TopicInfo
from .delivery import (
    MAX_DELIVER,
    Dead,
    Pending,
    SettlePlan,
    SubscriptionSpec,
    dead_letter,
    plan_fetch,
    plan_settle,
    split_settles,
)
from .retention import LimitCuts, plan_trim, trim_floor

if TYPE_CHECKING:
    from .sqlite import SqliteEngine
    from .sqlite_tx import Tx

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


def _settle_tx(engine: SqliteEngine, tx: Tx, sub_id: int, spec: SubscriptionSpec,
               items: Sequence[Settle], now: float) -> None:
    """Settle `items` alone: acks and releases as conditional writes, then the rest
    planned on its rows (a range of the primary key)."""
    rest = _settle_simple(tx.conn, sub_id, items, now)
    if rest:
        rows = {r[0]: Pending(*r) for r in tx.conn.execute(
            "SELECT position, key, attempt, due FROM tidings_pending "
            "WHERE sub_id = ? AND position BETWEEN ? AND ?",
            (sub_id, min(s.position for s in rest), max(s.position for s in rest)))}
        _persist_settle(engine, tx, sub_id, spec, plan_settle(spec, rows, rest, now))


def _settle_simple(conn: sqlite3.Connection, sub_id: int, items: Sequence[Settle],
                   now: float) -> list[Settle]:
    """Apply the acks and releases of `items`; returns the rest (nacks and terms).

    The rows' part of `plan_settle` as conditional writes, as `split_settles`
    documents (an ack deletes its row, a release undoes its attempt and makes
    it due now, each only if the row is out): no need to read the rows of the
    batch's acks first, the hot path.
    """
    acks, releases, rest = split_settles(items)
    if acks:
        conn.executemany(
            "DELETE FROM tidings_pending WHERE sub_id = ? AND position = ? AND attempt > 0",
            [(sub_id, p) for p in acks],
        )
    if releases:
        conn.executemany(
            "UPDATE tidings_pending SET attempt = attempt - 1, due = ? "
            "WHERE sub_id = ? AND position = ? AND attempt > 0",
            [(now, sub_id, p) for p in releases],
        )
    return rest


def _persist_settle(engine: SqliteEngine, tx: Tx, sub_id: int, spec: SubscriptionSpec,
                    plan: SettlePlan) -> None:
    conn = tx.conn
    gone = [(sub_id, p) for p in plan.delete]
    gone += [(sub_id, d.row.position) for d in plan.dead]
    if gone:
        conn.executemany("DELETE FROM tidings_pending WHERE sub_id = ? AND position = ?", gone)
    if plan.update:
        conn.executemany(
            "UPDATE tidings_pending SET attempt = ?, due = ? WHERE sub_id = ? AND position = ?",
            [(p.attempt, p.due, sub_id, p.position) for p in plan.update],
        )
    if plan.dead:
        _dead_letter(engine, tx, spec, plan.dead)


def _dead_letter(engine: SqliteEngine, tx: Tx, spec: SubscriptionSpec,
                 dead: Sequence[Dead]) -> None:
    """Append the dead letters of rows already removed (a trimmed message has none)."""
    if spec.dead_letter is None:
        return
    found = {r[0]: r for r in tx.execute(
        f"SELECT {_MSG_COLS} FROM tidings_messages WHERE position IN "
        f"({','.join(str(int(d.row.position)) for d in dead)})")}
    if not found:
        return
    engine._refresh_topics(tx.conn)
    messages = {m.position: m for m in engine._messages(list(found.values()))}
    tx.append([dead_letter(spec, messages[d.row.position], d)
               for d in dead if d.row.position in messages])


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
        rest = _settle_simple(conn, sub_id, settles, now) if settles else ()
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
        if rest:  # nacks and terms, planned on the rows just read, which go on as they are now
            held = {p.position: p for p in pending}
            done = plan_settle(spec, held, rest, now)
            _persist_settle(engine, tx, sub_id, spec, done)
            for position in [*done.delete, *(d.row.position for d in done.dead)]:
                del held[position]
            for p in done.update:
                held[p.position] = p  # keeps its place: still in position order
            pending = list(held.values())
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
        if plan.dead:
            conn.executemany("DELETE FROM tidings_pending WHERE sub_id = ? AND position = ?",
                             [(sub_id, p.position) for p in plan.dead])
            _dead_letter(engine, tx, spec, [Dead(p, MAX_DELIVER) for p in plan.dead])
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


async def trim(engine: SqliteEngine, now: float) -> int:
    def op(tx: Tx) -> int:
        conn = tx.conn
        topics = conn.execute(
            "SELECT id, name, retention FROM tidings_topics WHERE retention IS NOT NULL"
        ).fetchall()
        if not topics:
            return 0
        subs = conn.execute(
            "SELECT s.pattern, s.cursor, (SELECT min(position) FROM tidings_pending p "
            "WHERE p.sub_id = s.id) FROM tidings_subscriptions s").fetchall()
        removed = 0
        for tid, name, text in topics:
            r = Retention(**json.loads(text))
            plan = plan_trim(r, _limit_cuts(conn, tid, r, now), trim_floor(name, subs))
            if plan.cut is not None:
                cur = conn.execute(
                    "DELETE FROM tidings_messages WHERE topic_id = ? AND position <= ?",
                    (tid, plan.cut),
                )
                removed += cur.rowcount
        return removed

    return await engine.transact(op, durable=False)


def _limit_cuts(conn: sqlite3.Connection, tid: int, r: Retention, now: float) -> LimitCuts:
    """`retention.limit_cuts`, asked of the topic's (topic_id, position) index instead of
    read row by row; the same definitions (tests/test_planners.py compares them)."""
    count = age = by_bytes = None
    if r.max_messages is not None:  # the (max_messages + 1)-th newest
        row = conn.execute(
            "SELECT position FROM tidings_messages WHERE topic_id = ? "
            "ORDER BY position DESC LIMIT 1 OFFSET ?", (tid, r.max_messages)
        ).fetchone()
        count = row[0] if row else None
    if r.max_age is not None:  # the newest stored before now - max_age
        age = conn.execute(
            "SELECT max(position) FROM tidings_messages WHERE topic_id = ? AND time < ?",
            (tid, now - r.max_age),
        ).fetchone()[0]
    if r.max_bytes is not None:  # the newest where the sizes from the newest down pass it
        row = conn.execute(
            "SELECT position FROM (SELECT position, sum(length(data)) OVER "
            "(ORDER BY position DESC) AS total FROM tidings_messages "
            "WHERE topic_id = ?) WHERE total > ? ORDER BY position DESC LIMIT 1",
            (tid, r.max_bytes),
        ).fetchone()
        by_bytes = row[0] if row else None
    return LimitCuts(count, age, by_bytes)


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
                                        int(s["max_in_flight"]), s.get("dead_letter")))
        return out

    return await engine._read_op(op)
