"""The SQLite writer's transaction (`Tx`): what a function run by
`SqliteEngine.transact` writes with, on the writer thread, inside the group commit."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from ..messages import OutMessage, Published

if TYPE_CHECKING:
    from .sqlite import SqliteEngine

__all__ = ["INSERT_MESSAGES", "MSG_COLS", "Tx", "insert_rows", "insert_values"]

_enc_headers = msgspec.json.Encoder().encode

MSG_COLS = "position, topic_id, id, key, time, headers, data"
INSERT_MESSAGES = f"INSERT INTO tidings_messages ({MSG_COLS}) VALUES "
_ROWS_PER_INSERT = 64
_insert_sql: dict[tuple[str, int, int], str] = {}


def insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]]) -> None:
    """`head` ("INSERT INTO t (cols) VALUES ") for every row, in as few statements as
    possible: one multi-row statement per 64 rows instead of one step per row.

    Each statement is one trip into SQLite, which lets go of the GIL and must win it
    back; with the event loop busy on another thread, those trips are what a commit
    waits for, so fewer is faster.
    """
    if rows:
        insert_values(conn, head, len(rows[0]), [v for row in rows for v in row])


def insert_values(conn: sqlite3.Connection, head: str, width: int, values: list[Any]) -> None:
    """`insert_rows` of rows given one after the other in one flat list, `width` values
    each (what a caller that builds rows for SQLite alone can hand over directly)."""
    step = width * _ROWS_PER_INSERT
    for i in range(0, len(values), step):
        chunk = values[i:i + step] if len(values) > step else values
        key = (head, width, len(chunk))
        sql = _insert_sql.get(key)
        if sql is None:
            one = "(" + ", ".join("?" * width) + ")"
            sql = _insert_sql[key] = head + ", ".join([one] * (len(chunk) // width))
        conn.execute(sql, chunk)


class Tx:
    """One writer transaction, handed to functions run by `SqliteEngine.transact`.

    Functions run on the writer thread inside the group commit (each in a
    savepoint); they may call `append` to publish messages atomically with
    their own writes, and `execute` for their own tables.
    """

    def __init__(self, engine: SqliteEngine, conn: sqlite3.Connection, now: float) -> None:
        self.engine = engine
        self.conn = conn
        self.now = now
        self._position: int | None = None
        self._dirty = False  # positions were taken: new messages to wake readers for
        self.topics: set[str] = set()  # the topics of what was stored

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def _next_positions(self, n: int) -> int:
        """Reserve `n` positions; returns the first."""
        if self._position is None:
            self._position = self.engine._head(self.conn)
        first = self._position + 1
        self._position += n
        self._dirty = True
        return first

    def _finish(self) -> None:
        if self._dirty:
            self.conn.execute(
                "INSERT INTO tidings_meta (name, value) VALUES ('position', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (self._position,),
            )

    def _known_ids(self, ids: list[str]) -> dict[str, tuple[int, float]]:
        """Client ids already stored, with their position and time (one query per 500)."""
        found: dict[str, tuple[int, float]] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            for id_, position, time_ in self.conn.execute(
                "SELECT id, position, time FROM tidings_message_ids WHERE id IN "
                f"({','.join('?' * len(chunk))})", chunk,
            ):
                found[id_] = (position, time_)
        return found

    def topic_id(self, topic: str) -> int:
        """The id of `topic` (created in this transaction if it is new), for a caller that
        writes message rows itself at positions it took with `_next_positions`."""
        self.topics.add(topic)
        return self.engine._topic_id(self.conn, topic)

    def append(self, messages: Sequence[OutMessage]) -> list[Published]:
        """Store messages in this transaction (deduplicating client ids)."""
        engine = self.engine
        conn = self.conn
        now = self.now
        out: list[Published] = []
        rows: list[tuple[Any, ...]] = []
        id_rows: list[tuple[str, int, float]] = []
        seen: dict[str, int] = {}
        horizon = now - engine.dedup_window
        todo = []
        stored = self._known_ids([m.id for m in messages if m.client_id])
        for m in messages:
            if m.client_id:
                if m.id in seen:
                    out.append(Published(seen[m.id], m.id, True))
                    continue
                known = stored.get(m.id)
                if known is not None and known[1] >= horizon:
                    out.append(Published(known[0], m.id, True))
                    continue
                seen[m.id] = -1
            todo.append(m)
            out.append(None)  # type: ignore[arg-type]
        if todo:
            pos = self._next_positions(len(todo))
            topic_id = engine._topic_id
            last_topic, last_tid = None, 0
            last_h: object = None
            last_enc: bytes | None = None
            i = 0
            for j, p in enumerate(out):
                if p is not None:
                    continue
                m = todo[i]
                i += 1
                if m.topic != last_topic:
                    last_topic, last_tid = m.topic, topic_id(conn, m.topic)
                    self.topics.add(m.topic)
                h = m.headers
                if h is not last_h:  # batches share one headers dict: encode it once
                    last_h, last_enc = h, (_enc_headers(h) if h else None)
                rows.append((pos, last_tid, m.id, m.key, now, last_enc, m.data))
                if m.client_id:
                    id_rows.append((m.id, pos, now))
                    seen[m.id] = pos
                out[j] = Published(pos, m.id, False)
                pos += 1
            insert_rows(conn, INSERT_MESSAGES, rows)
            if id_rows:
                conn.executemany(
                    "INSERT OR REPLACE INTO tidings_message_ids (id, position, time) "
                    "VALUES (?, ?, ?)",
                    id_rows,
                )
            # duplicates inside this very batch point at the first copy
            for j, p in enumerate(out):
                if p.duplicate and p.position == -1:
                    out[j] = Published(seen[p.id], p.id, True)
        return out
