"""Event streams for `postgresql://…`: tables next to the message log, in the same schema.

The same guarantees as the SQLite store:

- global positions a reader can trust: an append takes the log's
  commit-order lock (`PgTx.lock_log`) before it reads the last position, so
  appends take turns until they commit and commit order is position order
  (docs/architecture.md, "Positions a reader can trust");
- optimistic concurrency per stream and the same duplicate-id rules: the
  stream's version and the first id are read under that lock;
- the store is its own outbox: each event is also stored as a pub/sub
  message, in the same transaction (`PgTx.append`);
- stored events are immutable for every client, not just this library:
  triggers call `tidings_refuse_change()` on UPDATE, DELETE and TRUNCATE.

The tables are created by the "eventstore" component's migrations
(`PostgresEngine.apply_migrations`) the first time the store is used.

Projection handlers get a `PostgresTx`: `tx.conn` (asyncpg, in the
projection's transaction), `await tx.execute(sql, *args)`, `tx.table(name)`
for schema-qualified names, and `tx.publish(…)`. Each event runs in a
savepoint, so a failing handler's writes are undone alone.
"""

from __future__ import annotations

import time as _time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from ..errors import (
    ConcurrencyError,
    EngineUnavailable,
    EventIdConflict,
    InvalidArgument,
    InvalidEvent,
)
from ..messages import OutMessage
from .base import HOLDING_WRITER
from .postgres import PgTx, PostgresEngine
from .postgres_conn import Attempt, Batched
from .postgres_sql import MSG_COLS, Migration
from .store_base import (
    EVENT_COLUMNS,
    AppendOutcome,
    EventRow,
    LoadRow,
    NewRecord,
    ProjectionState,
    SnapshotRow,
    StoreBackend,
    StoreTx,
    StreamAppend,
    StreamLoad,
    event_headers_open,
)

__all__ = ["EVENTSTORE_MIGRATIONS", "PostgresStore", "PostgresTx"]

T = TypeVar("T")
_enc = msgspec.json.Encoder().encode
_FAR = 2**62

#: Set while a `transaction` function runs. Its transaction may hold the log's lock (once
#: a handler publishes), so an append through the store would wait for itself.
_HOLDING = HOLDING_WRITER  # shared with the engine, which refuses hub writes meanwhile

# An append in one round trip. First the log's commit-order lock (the counter row that
# every appender of messages or events updates or locks until it commits); only then the
# checks and the insert. In a VOLATILE function each query takes a fresh snapshot (READ
# COMMITTED), so they see every append committed before the lock was granted (one plain
# statement would keep the snapshot it took before waiting). Returns (0, last position
# before ours, stream version before ours, time), or (1, position of the first id, stored
# already), or (2, NULL, the stream's current version) when `p_expected` is not it.
_APPEND_FUNCTION = (
    "CREATE FUNCTION {s}.tidings_append_events(p_stream text, p_expected bigint, "
    "p_now float8, p_ids text[], p_types text[], p_tvs int[], p_headers bytea[], "
    "p_data bytea[]) RETURNS TABLE (o_kind int, o_position bigint, o_version bigint, "
    "o_time float8) LANGUAGE plpgsql VOLATILE AS $fn$\n"
    "DECLARE v_known bigint; v_current bigint; v_last bigint; v_time float8;\n"
    "BEGIN\n"
    "  PERFORM FROM {s}.tidings_meta WHERE name = 'position' FOR UPDATE;\n"
    "  SELECT position INTO v_known FROM {s}.tidings_events WHERE id = p_ids[1];\n"
    "  IF v_known IS NOT NULL THEN\n"
    "    RETURN QUERY SELECT 1, v_known, NULL::bigint, NULL::float8; RETURN;\n"
    "  END IF;\n"
    "  SELECT coalesce(max(version), 0) INTO v_current FROM {s}.tidings_events "
    "WHERE stream_id = p_stream;\n"
    "  IF p_expected IS NOT NULL AND p_expected <> v_current THEN\n"
    "    RETURN QUERY SELECT 2, NULL::bigint, v_current, NULL::float8; RETURN;\n"
    "  END IF;\n"
    "  SELECT position, time INTO v_last, v_time FROM {s}.tidings_events "
    "ORDER BY position DESC LIMIT 1;\n"
    "  v_last := coalesce(v_last, 0);\n"
    "  v_time := greatest(p_now, coalesce(v_time, 0));  -- never decreasing with position\n"
    f"  INSERT INTO {{s}}.tidings_events ({EVENT_COLUMNS}) "
    "SELECT v_last + u.n, p_stream, v_current + u.n, u.id, u.type, u.tv, v_time, u.headers, "
    "u.data FROM unnest(p_ids, p_types, p_tvs, p_headers, p_data) "
    "WITH ORDINALITY AS u(id, type, tv, headers, data, n);\n"
    "  RETURN QUERY SELECT 0, v_last, v_current, v_time;\n"
    "END $fn$"
)

# A whole group commit in one statement (so one round trip and, outside a transaction,
# one commit): every queued `append_batch` (and `append`) of this process, in order.
# First the log's commit-order lock (the counter row, held to the commit). Then what is
# stored already, for all the group's streams at once: whether each append's first
# event id is (a repeat of a stored append, answered with its positions), each stream's
# version, which client-chosen message ids were seen inside the dedup window. Then the
# decisions, in memory, batch by batch: a batch whose expected version is not the
# stream's (counting the group's earlier appends to it) or whose repeat does not match
# fails alone and writes nothing. Then the writes, one statement per table for the whole
# group: events, the messages that publish them (their headers end with the version and
# position, known only here), snapshots, the batches' own messages and their ids.
# No subtransactions (more than 64 in a transaction slow every other backend's
# snapshots): anything the checks do not foresee (an event id stored already, other than
# a repeat; refused data) raises, and the caller commits the batches one at a time.
# Custom plans: the group's size and the tables' sizes decide each plan, never a plan
# cached when the tables were empty.
# Rows: (batch, item, kind, a, b, time): kind 0 stored (a: the last event position
# before it, b: the stream's version before it), 1 a repeat (a: its first position, b:
# its last version), 2 a version conflict (b: the current version), 3 a repeat that does
# not match (the batch failed); finally (0, 0, 9, how many messages were stored).
_COMMIT_FUNCTION = (
    "CREATE FUNCTION {s}.tidings_commit(p_now float8, p_sync text, p_channel text, "
    "p_origin text, p_horizon float8, p_batches int, s_batch int[], s_stream text[], "
    "s_first text[], s_prev int[], s_expected bigint[], s_topic int[], s_n int[], "
    "e_item int[], e_k int[], e_id text[], e_type text[], e_tv int[], e_headers bytea[], "
    "e_data bytea[], e_prefix bytea[], n_version bigint[], n_schema text[], "
    "n_time float8[], n_data bytea[], m_batch int[], m_topic int[], m_id text[], "
    "m_key text[], m_headers bytea[], m_data bytea[], m_client bool[]) "
    "RETURNS TABLE (o_batch int, o_item int, o_kind int, o_a bigint, o_b bigint, "
    "o_time float8) LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_custom_plan "
    "AS $fn$\n"
    "DECLARE\n"
    "  v_pos bigint; v_mtime float8; v_epos bigint; v_etime float8;\n"
    "  v_ns int := coalesce(array_length(s_batch, 1), 0);\n"
    "  v_nm int := coalesce(array_length(m_batch, 1), 0);\n"
    "  v_known bigint[]; v_pre bigint[]; v_seen text[]; v_new text[] := '{}';\n"
    "  v_kind int[] := array_fill(0, ARRAY[v_ns]); v_cur bigint[] := array_fill(0::bigint, "
    "ARRAY[v_ns]);\n"
    "  v_dup bigint[] := array_fill(0::bigint, ARRAY[v_ns]);\n"
    "  v_first bigint[] := array_fill(0::bigint, ARRAY[v_ns]);\n"
    "  v_mfirst bigint[] := array_fill(0::bigint, ARRAY[v_ns]);\n"
    "  v_mpos bigint[] := array_fill(0::bigint, ARRAY[v_nm]);\n"
    "  v_i int := 1; v_m int := 1; v_e int := 1; v_stored int := 0;\n"
    "  v_b int; v_s0 int; v_k int; v_p int; v_n int; v_fail int; v_item int; v_cnt int;\n"
    "  v_ver bigint;\n"
    "BEGIN\n"
    "  PERFORM set_config('synchronous_commit', p_sync, true);\n"
    "  SELECT value, time INTO v_pos, v_mtime FROM {s}.tidings_meta "
    "WHERE name = 'position' FOR UPDATE;\n"
    "  v_mtime := greatest(v_mtime, p_now);\n"
    "  SELECT position, time INTO v_epos, v_etime FROM {s}.tidings_events "
    "ORDER BY position DESC LIMIT 1;\n"
    "  v_epos := coalesce(v_epos, 0);\n"
    "  v_etime := greatest(p_now, coalesce(v_etime, 0));  -- never decreasing with position\n"
    "  IF v_ns > 0 THEN\n"
    "    SELECT array_agg(f.position ORDER BY u.k), array_agg(coalesce(c.version, 0) "
    "ORDER BY u.k) INTO v_known, v_pre FROM unnest(s_stream, s_first) WITH ORDINALITY "
    "AS u(stream, first, k) LEFT JOIN {s}.tidings_events f ON f.id = u.first "
    "LEFT JOIN LATERAL (SELECT max(version) AS version FROM {s}.tidings_events "
    "WHERE stream_id = u.stream) c ON true;\n"
    "  END IF;\n"
    "  SELECT coalesce(array_agg(id), '{}') INTO v_seen FROM {s}.tidings_message_ids "
    "WHERE id IN (SELECT u.id FROM unnest(m_id, m_client) AS u(id, client) WHERE u.client) "
    "AND time >= p_horizon;\n"
    "  FOR v_b IN 1 .. p_batches LOOP\n"
    "    v_s0 := v_i; v_fail := 0;\n"
    "    WHILE v_i <= v_ns AND s_batch[v_i] = v_b LOOP  -- decide its appends\n"
    "      v_n := s_n[v_i]; v_p := s_prev[v_i];\n"
    "      IF v_p = 0 THEN v_cur[v_i] := v_pre[v_i];\n"
    "      ELSIF v_kind[v_p] = 0 THEN v_cur[v_i] := v_cur[v_p] + s_n[v_p];\n"
    "      ELSE v_cur[v_i] := v_cur[v_p];\n"
    "      END IF;\n"
    "      IF v_fail <> 0 THEN\n"
    "        v_kind[v_i] := 4;  -- its batch failed already\n"
    "      ELSIF v_known[v_i] IS NOT NULL THEN  -- a repeat of a stored append, or a conflict\n"
    "        SELECT count(*), max(ev.version) INTO v_cnt, v_ver FROM {s}.tidings_events ev, "
    "unnest(e_id[v_e:v_e + v_n - 1]) WITH ORDINALITY AS u(id, k) "
    "WHERE ev.position = v_known[v_i] + u.k - 1 AND ev.id = u.id "
    "AND ev.stream_id = s_stream[v_i];\n"
    "        IF v_cnt = v_n THEN v_kind[v_i] := 1; v_dup[v_i] := v_ver;\n"
    "        ELSE v_fail := 3; v_item := v_i; v_kind[v_i] := 4;\n"
    "        END IF;\n"
    "      ELSIF s_expected[v_i] IS NOT NULL AND s_expected[v_i] <> v_cur[v_i] THEN\n"
    "        v_fail := 2; v_item := v_i; v_kind[v_i] := 4;\n"
    "      ELSE\n"
    "        v_kind[v_i] := 0;\n"
    "      END IF;\n"
    "      v_e := v_e + v_n; v_i := v_i + 1;\n"
    "    END LOOP;\n"
    "    IF v_fail <> 0 THEN  -- nothing of it is written: undo what its appends counted on\n"
    "      FOR v_k IN v_s0 .. v_i - 1 LOOP\n"
    "        v_kind[v_k] := 4; v_p := s_prev[v_k];\n"
    "        IF v_p = 0 THEN v_cur[v_k] := v_pre[v_k];\n"
    "        ELSIF v_kind[v_p] = 0 THEN v_cur[v_k] := v_cur[v_p] + s_n[v_p];\n"
    "        ELSE v_cur[v_k] := v_cur[v_p];\n"
    "        END IF;\n"
    "      END LOOP;\n"
    "      o_batch := v_b; o_item := v_item; o_kind := v_fail; o_a := NULL;\n"
    "      o_b := v_cur[v_item]; o_time := NULL; RETURN NEXT;\n"
    "      WHILE v_m <= v_nm AND m_batch[v_m] = v_b LOOP v_m := v_m + 1; END LOOP;\n"
    "      CONTINUE;\n"
    "    END IF;\n"
    "    FOR v_k IN v_s0 .. v_i - 1 LOOP  -- positions: its events' messages, then its own\n"
    "      o_batch := v_b; o_item := v_k; o_kind := v_kind[v_k];\n"
    "      IF v_kind[v_k] = 0 THEN\n"
    "        v_first[v_k] := v_epos; v_mfirst[v_k] := v_pos;\n"
    "        o_a := v_epos; o_b := v_cur[v_k]; o_time := v_etime;\n"
    "        v_epos := v_epos + s_n[v_k]; v_pos := v_pos + s_n[v_k];\n"
    "        v_stored := v_stored + s_n[v_k];\n"
    "      ELSE\n"
    "        o_a := v_known[v_k]; o_b := v_dup[v_k]; o_time := NULL;\n"
    "      END IF;\n"
    "      RETURN NEXT;\n"
    "    END LOOP;\n"
    "    WHILE v_m <= v_nm AND m_batch[v_m] = v_b LOOP\n"
    "      IF NOT m_client[v_m] OR NOT (m_id[v_m] = ANY(v_seen) OR m_id[v_m] = ANY(v_new)) "
    "THEN\n"
    "        v_pos := v_pos + 1; v_mpos[v_m] := v_pos; v_stored := v_stored + 1;\n"
    "        IF m_client[v_m] THEN v_new := v_new || m_id[v_m]; END IF;\n"
    "      END IF;\n"
    "      v_m := v_m + 1;\n"
    "    END LOOP;\n"
    "  END LOOP;\n"
    "  o_batch := 0; o_item := 0; o_kind := 9; o_a := v_stored; RETURN NEXT;\n"
    "  IF v_stored = 0 THEN RETURN; END IF;\n"
    f"  INSERT INTO {{s}}.tidings_events ({EVENT_COLUMNS}) "
    "SELECT v_first[e.item] + e.k, s_stream[e.item], v_cur[e.item] + e.k, e.id, e.type, "
    "e.tv, v_etime, e.headers, e.data FROM unnest(e_item, e_k, e_id, e_type, e_tv, "
    "e_headers, e_data) AS e(item, k, id, type, tv, headers, data) "
    "WHERE v_kind[e.item] = 0;\n"
    f"  INSERT INTO {{s}}.tidings_messages ({MSG_COLS}) "
    "SELECT v_mfirst[e.item] + e.k, s_topic[e.item], e.id, s_stream[e.item], v_mtime, "
    "e.prefix || convert_to('\"stream-version\":\"' || (v_cur[e.item] + e.k) || "
    "'\",\"event-position\":\"' || (v_first[e.item] + e.k) || '\"}', 'UTF8'), e.data "
    "FROM unnest(e_item, e_k, e_id, e_prefix, e_data) AS e(item, k, id, prefix, data) "
    "WHERE v_kind[e.item] = 0;\n"
    "  INSERT INTO {s}.tidings_snapshots (stream_id, version, schema, time, data) "
    "SELECT u.stream, u.version, u.schema, u.time, u.data FROM unnest(s_stream, n_version, "
    "n_schema, n_time, n_data) WITH ORDINALITY AS u(stream, version, schema, time, data, k) "
    "WHERE u.version IS NOT NULL AND v_kind[u.k] = 0 "
    "ON CONFLICT (stream_id, version) DO UPDATE SET schema = excluded.schema, "
    "time = excluded.time, data = excluded.data;\n"
    f"  INSERT INTO {{s}}.tidings_messages ({MSG_COLS}) "
    "SELECT v_mpos[u.k], u.topic, u.id, u.key, v_mtime, u.headers, u.data "
    "FROM unnest(m_topic, m_id, m_key, m_headers, m_data) WITH ORDINALITY "
    "AS u(topic, id, key, headers, data, k) WHERE v_mpos[u.k] > 0;\n"
    "  INSERT INTO {s}.tidings_message_ids (id, position, time) "
    "SELECT u.id, v_mpos[u.k], v_mtime FROM unnest(m_id, m_client) WITH ORDINALITY "
    "AS u(id, client, k) WHERE u.client AND v_mpos[u.k] > 0 "
    "ON CONFLICT (id) DO UPDATE SET position = excluded.position, time = excluded.time;\n"
    "  UPDATE {s}.tidings_meta SET value = v_pos, time = v_mtime WHERE name = 'position';\n"
    "  PERFORM pg_notify(p_channel, p_origin);\n"
    "END $fn$"
)


EVENTSTORE_MIGRATIONS: list[Migration] = [
    Migration(1, "events, snapshots, projections", [
        # `position` is assigned under the log's commit-order lock (see `_append_in_tx`),
        # never by a sequence: a sequence hands out numbers in call order, not commit order.
        """CREATE TABLE {s}.tidings_events (
            position bigint PRIMARY KEY,
            stream_id text NOT NULL,
            version bigint NOT NULL,
            id text NOT NULL,
            type text NOT NULL,
            type_version int NOT NULL,
            time float8 NOT NULL,
            headers bytea,
            data bytea NOT NULL,
            CONSTRAINT tidings_events_stream UNIQUE (stream_id, version),
            CONSTRAINT tidings_events_id UNIQUE (id))""",
        _APPEND_FUNCTION,
        "CREATE TRIGGER tidings_events_immutable BEFORE UPDATE OR DELETE ON {s}.tidings_events "
        "FOR EACH ROW EXECUTE FUNCTION {s}.tidings_refuse_change()",
        "CREATE TRIGGER tidings_events_no_truncate BEFORE TRUNCATE ON {s}.tidings_events "
        "FOR EACH STATEMENT EXECUTE FUNCTION {s}.tidings_refuse_change()",
        """CREATE TABLE {s}.tidings_snapshots (
            stream_id text NOT NULL, version bigint NOT NULL, schema text NOT NULL,
            time float8 NOT NULL, data bytea NOT NULL,
            PRIMARY KEY (stream_id, version))""",
        """CREATE TABLE {s}.tidings_projections (
            name text PRIMARY KEY, position bigint NOT NULL, status text NOT NULL,
            error text, failed_position bigint, updated float8 NOT NULL)""",
    ]),
    # (tidings_append_events stays for processes of earlier versions sharing the schema)
    Migration(2, "group commit in one statement", [_COMMIT_FUNCTION]),
]


class _Sql:
    """The store's statements, with the schema filled in once."""

    def __init__(self, schema: str) -> None:
        ev, snaps = f"{schema}.tidings_events", f"{schema}.tidings_snapshots"
        proj = f"{schema}.tidings_projections"
        self.lock_key = f"tidings.projection.{schema}."
        select = f"SELECT {EVENT_COLUMNS} FROM {ev}"
        # A group commit in one statement (see `_COMMIT_FUNCTION`).
        self.commit = f"SELECT * FROM {schema}.tidings_commit(" + ", ".join(
            f"${i}" for i in range(1, 33)) + ")"
        self.duplicate = (
            f"SELECT position, stream_id, version, id FROM {ev} "
            "WHERE position >= $1 ORDER BY position LIMIT $2"
        )
        self.read_stream = (
            f"{select} WHERE stream_id = $1 AND version >= $2 AND version <= $3 "
            "ORDER BY version LIMIT $4"
        )
        # Many streams' reads in one statement (see `PostgresStore.read_stream`).
        self.read_streams = (
            f"SELECT q.k, e.* FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::int[]) "
            "WITH ORDINALITY AS q(sid, lo, hi, lim, k) CROSS JOIN LATERAL "
            f"({select} WHERE stream_id = q.sid AND version >= q.lo AND version <= q.hi "
            "ORDER BY version LIMIT q.lim) e ORDER BY q.k, e.version"
        )
        self.read_all = f"{select} WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3"
        self.stream_version = f"SELECT max(version) FROM {ev} WHERE stream_id = $1"
        self.last_position = f"SELECT max(position) FROM {ev}"
        self.version_at = f"SELECT max(version) FROM {ev} WHERE stream_id = $1 AND time <= $2"
        self.snapshot = (
            f"SELECT version, schema, time, data FROM {snaps} WHERE stream_id = $1 "
            "AND schema = $2 AND version <= $3 ORDER BY version DESC LIMIT 1"
        )
        self.tail = (
            f"SELECT version, type, type_version, data FROM {ev} "
            "WHERE stream_id = $1 AND version > $2 AND version <= $3 ORDER BY version"
        )
        # A load in one statement (one snapshot, one round trip): rows (0, current, target),
        # (1, the snapshot: version, schema, data, time), (2, an event: version, type,
        # type_version, data), in version order.
        self.load = (
            f"WITH cur AS (SELECT coalesce(max(version), 0) AS v FROM {ev} "
            "WHERE stream_id = $1), "
            "tgt AS (SELECT least(cur.v, coalesce($3, cur.v), CASE WHEN $4::float8 IS NULL "
            f"THEN cur.v ELSE (SELECT coalesce(max(version), 0) FROM {ev} WHERE stream_id = $1 "
            "AND time <= $4::float8) END) AS t FROM cur), "
            f"snap AS (SELECT version, schema, time, data FROM {snaps} WHERE stream_id = $1 "
            "AND schema = $2 AND version <= (SELECT t FROM tgt) ORDER BY version DESC LIMIT 1) "
            "SELECT 0, (SELECT v FROM cur), (SELECT t FROM tgt), NULL::text, NULL::int, "
            "NULL::bytea, NULL::float8 "
            "UNION ALL SELECT 1, version, NULL, schema, NULL, data, time FROM snap "
            "UNION ALL (SELECT 2, version, NULL, type, type_version, data, NULL "
            f"FROM {ev} WHERE stream_id = $1 AND version > coalesce((SELECT version FROM snap), "
            "0) AND version <= (SELECT t FROM tgt) ORDER BY version)"
        )
        # Many loads in one statement: the same rows, each with its request's number first,
        # in (number, kind, version) order.
        self.loads = (
            "WITH q AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], "
            "$4::float8[]) WITH ORDINALITY AS q(sid, schema, tov, asof, k)), "
            "c AS (SELECT q.k, q.sid, q.schema, cur.v, least(cur.v, coalesce(q.tov, cur.v), "
            "CASE WHEN q.asof IS NULL THEN cur.v ELSE (SELECT coalesce(max(version), 0) "
            f"FROM {ev} WHERE stream_id = q.sid AND time <= q.asof) END) AS t "
            "FROM q CROSS JOIN LATERAL (SELECT coalesce(max(version), 0) AS v "
            f"FROM {ev} WHERE stream_id = q.sid) cur), "
            "s AS (SELECT c.k, sn.* FROM c CROSS JOIN LATERAL (SELECT version, schema, time, "
            f"data FROM {snaps} WHERE stream_id = c.sid AND schema = c.schema "
            "AND version <= c.t ORDER BY version DESC LIMIT 1) sn) "
            "SELECT c.k, 0 AS kind, c.v AS version, c.t, NULL::text, NULL::int, NULL::bytea, "
            "NULL::float8 FROM c "
            "UNION ALL SELECT s.k, 1, s.version, NULL, s.schema, NULL, s.data, s.time FROM s "
            "UNION ALL SELECT c.k, 2, e.version, NULL, e.type, e.type_version, e.data, NULL "
            "FROM c CROSS JOIN LATERAL (SELECT version, type, type_version, data "
            f"FROM {ev} WHERE stream_id = c.sid AND version > coalesce((SELECT s.version "
            "FROM s WHERE s.k = c.k), 0) AND version <= c.t) e "
            "ORDER BY 1, 2, 3"
        )
        self.put_snapshot = (
            f"INSERT INTO {snaps} (stream_id, version, schema, time, data) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (stream_id, version) DO UPDATE SET "
            "schema = excluded.schema, time = excluded.time, data = excluded.data"
        )
        cols = "name, position, status, error, failed_position, updated"
        self.projections = f"SELECT {cols} FROM {proj} ORDER BY name"
        self.projection = f"SELECT {cols} FROM {proj} WHERE name = $1"
        # one runner of a projection at a time, across processes (until commit)
        self.lock_projection = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
        self.save_projection = (
            f"INSERT INTO {proj} ({cols}) VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (name) DO UPDATE SET position = excluded.position, "
            "status = excluded.status, error = excluded.error, "
            "failed_position = excluded.failed_position, updated = excluded.updated"
        )


class PostgresTx(StoreTx):
    """The projection's PostgreSQL transaction, lent to its handlers.

    `conn` and `execute` act on the transaction that will store the
    projection's checkpoint. Messages published through it are stored when
    the event's handler succeeds (with the log lock taken then).
    """

    def __init__(self, sql: _Sql, tx: PgTx) -> None:
        self._sql = sql
        self._tx = tx
        self.conn: Any = tx.conn
        self._outbox: list[OutMessage] = []

    @property
    def now(self) -> float:
        return self._tx.now

    def table(self, name: str) -> str:
        """`name` qualified with the engine's schema."""
        return self._tx.table(name)

    async def execute(self, sql: str, *args: Any) -> str:
        return str(await self.conn.execute(sql, *args))

    def publish_messages(self, messages: Sequence[OutMessage]) -> None:
        self._outbox.extend(messages)

    async def _flush(self) -> None:
        if self._outbox:
            messages, self._outbox = self._outbox, []
            await self._tx.append(messages)

    async def events_after(self, position: int, limit: int) -> list[EventRow]:
        rows = await self.conn.fetch(self._sql.read_all, position, _FAR, limit)
        return [tuple(r) for r in rows]

    async def projection(self, name: str) -> ProjectionState | None:
        await self.conn.execute(self._sql.lock_projection, self._sql.lock_key + name)
        row = await self.conn.fetchrow(self._sql.projection, name)
        return ProjectionState(*row) if row else None

    async def save_projection(self, state: ProjectionState, now: float) -> None:
        state.updated = now
        await self.conn.execute(self._sql.save_projection, state.name, state.position,
                                state.status, state.error, state.failed_position, now)

    async def begin_event(self) -> None:
        await self._flush()  # published outside any event's handler: keep
        await self.conn.execute("SAVEPOINT tidings_event")

    async def end_event(self, ok: bool) -> None:
        if ok:
            await self._flush()
        else:
            self._outbox.clear()
            await self.conn.execute("ROLLBACK TO SAVEPOINT tidings_event")
        await self.conn.execute("RELEASE SAVEPOINT tidings_event")


#: at most this many appends share one commit
_GROUP = 200



_STOPPED = ("the event store stopped during the append; its outcome is unknown: retry it "
            "(its event ids make a retry safe)")


class PostgresStore(StoreBackend):
    engine: PostgresEngine

    def __init__(self, engine: PostgresEngine) -> None:
        super().__init__(engine)
        self._sql = _Sql(engine.sql.schema)
        self._created = False
        # Group commit: appends and batches queued while a commit is under way share the
        # next one (never repeated: a lost connection leaves its outcome unknown). The
        # same for stream reads and loads: those asked for meanwhile share a round trip.
        self._commits = Batched(engine.conns, "appending events", self._run_commits,
                                limit=_GROUP, retry=False, stopped=_STOPPED)
        self._read_streams = Batched(engine.conns, "reading streams", self._run_reads)
        self._loads = Batched(engine.conns, "loading streams", self._run_loads)

    async def _ready(self) -> None:
        if not self._created:  # idempotent: concurrent first calls just both look
            if self.engine._auto_migrate:
                await self.engine.apply_migrations("eventstore", EVENTSTORE_MIGRATIONS)
            else:  # migrate=false: create nothing, say what to run
                await self.engine._run(self._check_tables, "checking the event store")
            self._created = True

    async def _check_tables(self, conn: Any, attempt: Attempt) -> None:
        schema = self.engine.sql.schema
        if await conn.fetchval("SELECT to_regclass($1)", f"{schema}.tidings_events") is None:
            raise EngineUnavailable(
                f"schema {self.engine.schema!r} has no event-store tables and this hub was "
                "opened with migrate=false; run `tidings migrate` (or connect once without "
                "migrate=false)")

    async def _read(self, fn: Callable[[Any], Awaitable[T]], what: str) -> T:
        await self._ready()

        async def op(conn: Any, attempt: Attempt) -> T:
            return await fn(conn)

        return await self.engine._run(op, what)

    @staticmethod
    def _check_not_holding() -> None:
        if _HOLDING.get():
            raise InvalidArgument(
                "cannot append events from inside a projection handler: its transaction may "
                "hold the log's lock and would wait for itself; write through the handler's "
                "tx instead"
            )

    async def append(
        self,
        stream_id: str,
        records: Sequence[NewRecord],
        expected: int | None,
        topic: str,
        snapshot: SnapshotRow | None = None,
    ) -> AppendOutcome:
        out = await self.append_batch([(stream_id, records, expected, topic)], (),
                                      None if snapshot is None else {stream_id: snapshot})
        return out[0]

    async def append_batch(
        self,
        items: Sequence[StreamAppend],
        messages: Sequence[OutMessage] = (),
        snapshots: Mapping[str, SnapshotRow] | None = None,
    ) -> list[AppendOutcome]:
        """Queued and committed together with the other batches (and appends) queued
        meanwhile: group commit in one statement (`tidings_commit`), so the log's lock, the
        round trip and the WAL flush are paid once for all of them; a conflict or a reused
        id fails its own batch alone."""
        self._check_not_holding()
        await self._ready()
        out: list[AppendOutcome] = await self._commits(items, messages, snapshots or {})
        return out

    async def _run_commits(self, conn: Any, attempt: Attempt, calls: list[tuple[Any, ...]]
                           ) -> list[Any]:
        """Up to `_GROUP` queued batches in one `tidings_commit`; when the database refused
        the statement on data the checks did not foresee, each batch alone, so that only
        the offender fails."""
        try:
            return await self._commit(conn, attempt, calls)
        except _Refused as refused:
            if len(calls) == 1:
                return [refused.error(calls[0][0])]
        results: list[Any] = []
        for call in calls:
            try:
                results.extend(await self._commit(conn, attempt, [call]))
            except _Refused as refused:
                results.append(refused.error(call[0]))
        return results

    async def _commit(self, conn: Any, attempt: Attempt, group: Sequence[tuple[Any, ...]]
                      ) -> list[Any]:
        """One `tidings_commit` call for `group`; per batch its outcomes or its error."""
        engine = self.engine
        streams: list[StreamAppend] = []
        s_batch: list[int] = []
        s_prev: list[int] = []  # the group's previous append to the same stream (0: none)
        last: dict[str, int] = {}
        e_item: list[int] = []
        e_k: list[int] = []
        e_id: list[str] = []
        e_type: list[str] = []
        e_tv: list[int] = []
        e_headers: list[bytes | None] = []
        e_data: list[bytes] = []
        e_prefix: list[bytes] = []
        n_version: list[int | None] = []
        n_schema: list[str | None] = []
        n_time: list[float | None] = []
        n_data: list[bytes | None] = []
        m_batch: list[int] = []
        plain: list[OutMessage] = []
        for b, (items, msgs, snaps) in enumerate(group, 1):
            for item in items:
                sid, recs, _, _ = item
                streams.append(item)
                s_batch.append(b)
                s_prev.append(last.get(sid, 0))
                last[sid] = len(streams)
                for k, r in enumerate(recs, 1):
                    e_item.append(len(streams))
                    e_k.append(k)
                    e_id.append(r.id)
                    e_type.append(r.type)
                    e_tv.append(r.type_version)
                    e_headers.append(_enc(r.headers) if r.headers else None)
                    e_data.append(r.data)
                    e_prefix.append(event_headers_open(r.headers, r.type, r.type_version,
                                                       sid))
                snap = snaps.get(sid)
                n_version.append(None if snap is None else snap.version)
                n_schema.append(None if snap is None else snap.schema)
                n_time.append(None if snap is None else snap.time)
                n_data.append(None if snap is None else snap.data)
            for m in msgs:
                m_batch.append(b)
                plain.append(m)
        names = {item[3] for item in streams} | {m.topic for m in plain}
        now = round(_time.time(), 6)
        horizon = now - engine.dedup_window

        tids = await engine._resolve_topics(conn, names, None)
        attempt.sent = True
        try:
            rows = await conn.fetch(
                self._sql.commit, now, engine._sync, engine._channel, engine.payload(names),
                horizon, len(group), s_batch, [i[0] for i in streams],
                [i[1][0].id if i[1] else None for i in streams], s_prev,
                [i[2] for i in streams], [tids[i[3]] for i in streams],
                [len(i[1]) for i in streams], e_item, e_k, e_id, e_type, e_tv, e_headers,
                e_data, e_prefix, n_version, n_schema, n_time, n_data, m_batch,
                [tids[m.topic] for m in plain], [m.id for m in plain],
                [m.key for m in plain],
                [_enc(m.headers) if m.headers else None for m in plain],
                [m.data for m in plain], [m.client_id for m in plain])
        except Exception as exc:
            if _refusal(exc):
                raise _Refused(exc) from None
            raise
        if now - engine._last_prune > 10.0:  # forget client ids past the dedup window
            engine._last_prune = now
            await conn.execute(engine.sql.prune_ids, horizon)
        results: list[Any] = [[] for _ in group]
        stored = False
        for b, item, kind, a, v, t in rows:
            if kind == 9:
                stored = bool(a)
                continue
            sid, recs, expected, _ = streams[item - 1]
            n = len(recs)
            if kind == 0:
                results[b - 1].append(AppendOutcome(int(v) + n, list(range(a + 1, a + n + 1)),
                                                    time=float(t)))
            elif kind == 1:
                results[b - 1].append(AppendOutcome(int(v), list(range(a, a + n)),
                                                    duplicate=True))
            elif kind == 2:
                results[b - 1] = ConcurrencyError(sid, expected, int(v))
            else:
                results[b - 1] = EventIdConflict(
                    f"an event id in this append to stream {sid!r} is already stored (and "
                    "not as the start of this same append), or repeated in it; give every "
                    "new event a new id")
        if stored:
            engine._notify(names)
        return results

    async def read_stream(
        self, stream_id: str, from_version: int, to_version: int | None, limit: int
    ) -> list[EventRow]:
        """Read with the other reads asked for meanwhile, in one statement: every saga step
        and command handler reads a stream (an inbox, a kept aggregate's news), and with
        many in flight a round trip each was most of what they waited for. One statement
        is one snapshot, taken after each of them asked: each sees what was committed
        before it asked."""
        await self._ready()
        stop = to_version if to_version is not None else _FAR
        rows: list[EventRow] = await self._read_streams(stream_id, from_version, stop, limit)
        return rows

    async def _run_reads(self, conn: Any, attempt: Attempt, calls: list[tuple[Any, ...]]
                         ) -> list[Any]:
        if len(calls) == 1:
            return [[tuple(r) for r in await conn.fetch(self._sql.read_stream, *calls[0])]]
        out: list[list[EventRow]] = [[] for _ in calls]
        sids, los, his, lims = (list(c) for c in zip(*calls, strict=True))
        for r in await conn.fetch(self._sql.read_streams, sids, los, his, lims):
            out[r[0] - 1].append(tuple(r)[1:])
        return out

    async def newer(self, stream_id: str, version: int, limit: int
                    ) -> tuple[int, list[EventRow]] | None:
        """One read (so one snapshot, one round trip, shared): the events from `version` on,
        its own included (to tell a stream that is behind) and one more than `limit` (to
        tell one too far ahead)."""
        start = max(version, 1)
        rows = await self.read_stream(stream_id, start, None, limit + 1 + (start == version))
        if version:
            if not rows or rows[0][2] != version:
                return None  # behind `version`
            rows = rows[1:]
        if len(rows) > limit or any(r[2] != version + i for i, r in enumerate(rows, 1)):
            return None
        return (rows[-1][2] if rows else version), rows

    async def read_all(self, after: int, stop: int | None, limit: int) -> list[EventRow]:
        end = stop if stop is not None else _FAR

        async def op(conn: Any) -> list[EventRow]:
            rows = await conn.fetch(self._sql.read_all, after, end, limit)
            return [tuple(r) for r in rows]

        return await self._read(op, "reading events")

    async def stream_version(self, stream_id: str) -> int:
        async def op(conn: Any) -> int:
            return int(await conn.fetchval(self._sql.stream_version, stream_id) or 0)

        return await self._read(op, "reading a stream's version")

    async def last_position(self) -> int:
        async def op(conn: Any) -> int:
            return int(await conn.fetchval(self._sql.last_position) or 0)

        return await self._read(op, "reading the last event position")

    async def load(
        self, stream_id: str, schema: str | None, to_version: int | None, as_of: float | None
    ) -> StreamLoad:
        """In one statement (one snapshot), shared with the loads asked for meanwhile."""
        await self._ready()
        loaded: StreamLoad = await self._loads(stream_id, schema, to_version, as_of)
        return loaded

    async def _run_loads(self, conn: Any, attempt: Attempt, calls: list[tuple[Any, ...]]
                         ) -> list[Any]:
        if len(calls) == 1:
            return [_stream_load(await conn.fetch(self._sql.load, *calls[0]))]
        sids, schemas, tos, asofs = (list(c) for c in zip(*calls, strict=True))
        parts: list[list[Any]] = [[] for _ in calls]
        for r in await conn.fetch(self._sql.loads, sids, schemas, tos, asofs):
            parts[r[0] - 1].append(tuple(r)[1:])
        return [_stream_load(rows) for rows in parts]

    async def save_snapshot(self, stream_id: str, snapshot: SnapshotRow) -> None:
        self._check_not_holding()
        await self._ready()

        async def op(conn: Any) -> None:
            await _put_snapshot(self._sql, conn, stream_id, snapshot)

        await self._read(op, "saving a snapshot")  # one statement: safe to repeat

    async def projections(self) -> list[ProjectionState]:
        async def op(conn: Any) -> list[ProjectionState]:
            return [ProjectionState(*r) for r in await conn.fetch(self._sql.projections)]

        return await self._read(op, "reading projections")

    async def transaction(self, fn: Callable[[StoreTx], Awaitable[T]]) -> T:
        self._check_not_holding()
        await self._ready()

        async def body(tx: PgTx) -> T:
            stx = PostgresTx(self._sql, tx)
            token = _HOLDING.set(True)
            try:
                result = await fn(stx)
                await stx._flush()
            finally:
                _HOLDING.reset(token)
            return result

        # Not durable: a checkpoint and its read model commit together, so losing a recent
        # commit to a crash loses both and the projection replays those events.
        return await self.engine.transact(body, durable=False)


async def _put_snapshot(sql: _Sql, conn: Any, stream_id: str, s: SnapshotRow) -> None:
    await conn.execute(sql.put_snapshot, stream_id, s.version, s.schema, s.time, s.data)


def _refusal(exc: BaseException) -> bool:
    """True when the database (or the driver) refused the statement's data, not itself."""
    names = {c.__name__ for c in type(exc).__mro__}
    return "UniqueViolationError" in names or "DataError" in names


class _Refused(Exception):
    """The group's statement was refused on its data (see `_refusal`)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exc = exc

    def error(self, items: Sequence[StreamAppend]) -> Exception:
        """What to tell the appender of `items`, when they were alone in the statement."""
        where = f"stream {items[0][0]!r}" if items else "this batch"
        if "UniqueViolationError" in {c.__name__ for c in type(self.exc).__mro__}:
            return EventIdConflict(f"an event id in this append to {where} is already stored; "
                                   "give every new event a new id")
        return InvalidEvent(f"the database refused this append to {where}: {self.exc}; fix "
                            "what it names")


def _stream_load(rows: Sequence[Any]) -> StreamLoad:
    """A `StreamLoad` from the load statement's rows: (0, current, target), (1, the
    snapshot's version, schema, data, time), (2, an event's version, type, type_version,
    data), in that order."""
    current = target = 0
    snap = None
    events: list[LoadRow] = []
    for kind, version, t, text, type_version, data, time in rows:
        if kind == 0:
            current, target = int(version), int(t)
        elif kind == 1:
            snap = SnapshotRow(int(version), text, float(time), data)
        else:
            events.append((int(version), text, int(type_version), data))
    return StreamLoad(current, target, snap, events)
