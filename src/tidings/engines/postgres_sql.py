"""The PostgreSQL engine's schema, migrations and statements.

Text only, except `apply_migrations`, which runs migrations on a connection
it is given.

Every table lives in one schema the user chooses (`?schema=name`, default
`tidings`), so several applications can share a database. Migrations are
numbered per component ("log" here; the event store adds its own) and
recorded in `tidings_migrations`; `PostgresEngine.migrate()` applies the
missing ones in one transaction under an advisory lock, so processes that
start together do not race.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import topics as _topics
from ..errors import InvalidArgument

__all__ = ["LOG_MIGRATIONS", "Migration", "Statements", "apply_migrations", "channel_for",
           "check_schema", "pattern_regex"]

_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")

#: Column order of a message row everywhere in the engine.
MSG_COLS = "position, topic_id, id, key, time, headers, data"


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema change; `{s}` in a statement is replaced by the quoted schema name."""

    version: int
    description: str
    statements: Sequence[str]


def check_schema(name: str) -> str:
    """`name` if it is a plain identifier PostgreSQL will not fold or need quoted oddly."""
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise InvalidArgument(
            f"schema {name!r} must be letters, digits and '_' (not starting with a digit), "
            "at most 63 characters; e.g. 'postgresql://host/db?schema=tidings'"
        )
    return name


def channel_for(schema: str) -> str:
    """The LISTEN/NOTIFY channel of a schema (channel names are at most 63 bytes)."""
    name = f"tidings.{schema}"
    if len(name) > 63:
        name = "tidings." + hashlib.sha1(schema.encode()).hexdigest()[:20]
    return name


def pattern_regex(pattern: str) -> str:
    """A PostgreSQL regular expression (for `~`) matching exactly the topics of `pattern`.

    Mirrors `topics.matcher`: `*` is one token, `>` one or more, and a
    leading wildcard does not match system topics (`$dlq.…`).
    """
    _topics.validate_pattern(pattern)
    parts = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(r"[^.]+")
        elif token == ">":
            parts.append(r"[^.]+(\.[^.]+)*")
        else:  # tokens are [A-Za-z0-9_-$]: only '$' means something in a regex
            parts.append(token.replace("$", r"\$"))
    body = r"\.".join(parts)
    lead = r"(?!\$)" if pattern[0] in "*>" else ""
    return f"^{lead}{body}$"


def _scan(after: str, stop: str, regex: str, limit: str) -> str:
    """Messages of the topics matching `regex` with after < position <= stop, in order.

    Per topic, its (topic_id, position) index yields rows already in order and stops
    after `limit`; the merge takes the first `limit` overall. (Whatever the planner's
    statistics say: a plain `topic_id IN (…) ORDER BY position` can sort a whole topic.)
    """
    cols = ", ".join(f"m.{c}" for c in MSG_COLS.split(", "))
    return (
        f"SELECT {cols} FROM (SELECT id FROM {{s}}.tidings_topics WHERE name ~ {regex}) t, "
        f"LATERAL (SELECT {MSG_COLS} FROM {{s}}.tidings_messages WHERE topic_id = t.id "
        f"AND position > {after} AND position <= {stop} ORDER BY position LIMIT {limit}) m "
        f"ORDER BY m.position LIMIT {limit}"
    )


#: No pending row lies past the cursor, as always (new rows are the only ones past it):
#: new rows then take a plain insert, which costs half an `ON CONFLICT` one (speculative);
#: else (never, but) they take `_OVERWRITE`, as the planning path's writes do.
_NONE_PAST_CURSOR = ("NOT EXISTS (SELECT FROM {s}.tidings_pending WHERE sub_id = p_sub "
                     "AND position > v_cursor)")
_OVERWRITE = ("ON CONFLICT (sub_id, position) DO UPDATE SET attempt = excluded.attempt, "
              "due = excluded.due")


def _add_rows(conflict: str) -> str:
    """An ordered fetch's new pending rows (`v_add`: delivered, or parked behind their
    key with attempt 0); `conflict`: what a row already there does."""
    return ("INSERT INTO {s}.tidings_pending (sub_id, position, attempt, due) "
            "SELECT p_sub, u.position, u.attempt, CASE WHEN u.attempt = 0 THEN 0 "
            "ELSE v_lease + v_first END FROM unnest(v_add, v_add_att) AS u(position, attempt) "
            + conflict)


def _take_new(conflict: str) -> str:
    """An unordered fetch's new messages (up to `v_take` past the cursor): their pending
    rows inserted (`conflict`: what a row already there does), the messages returned."""
    return (
        "WITH c AS (" + _scan("v_cursor", "v_last", "p_regex", "v_take") + "), "
        "ins AS (INSERT INTO {s}.tidings_pending (sub_id, position, attempt, due) "
        f"SELECT p_sub, c.position, 1, v_lease + v_first FROM c {conflict}) "
        "SELECT 1, c.position, 1, NULL::float8, c.topic_id, c.id, c.key, c.time, c.headers, "
        "c.data FROM c ORDER BY c.position"
    )


#: A pending row's key, looked up by its message's position (the primary key) row by row:
#: a join left to the planner hashed the whole log when its statistics were stale.
_KEY_OF_ROW = "(SELECT m.key FROM {s}.tidings_messages m WHERE m.position = pp.position)"
#: The claiming functions' planner settings. The log grows from empty faster than
#: autovacuum's statistics follow (and its newest positions, the ones claims read, lie
#: past their histogram): a plan made from them reads every message between the cursor
#: and the counter into a bitmap and sorts it to take the first `limit`, where the index
#: on (topic, position) yields them in order and stops. Every access here has an index.
_PLANS = "SET enable_bitmapscan = off"


def _claim_snapshot(pending: str) -> str:
    return (
        "WITH s AS (SELECT cursor, floor FROM {s}.tidings_subscriptions WHERE id = p_sub), "
        "l AS (SELECT value FROM {s}.tidings_meta WHERE name = 'position'), "
        f"p AS ({pending}), "
        "n AS (SELECT greatest(0, least(p_limit, p_max_in_flight - "
        "(SELECT count(*) FROM p WHERE attempt < p_max_deliver OR due > p_now)))::int AS n), "
        "c AS (" + _scan("(SELECT cursor FROM s)", "(SELECT value FROM l)", "p_regex",
                         "(SELECT n FROM n)") + ") "
        f"SELECT 0, (SELECT cursor FROM s), {_NUL} "
        f"UNION ALL SELECT 4, (SELECT floor FROM s), {_NUL} "
        "UNION ALL SELECT 1, (SELECT value FROM l), NULL, (SELECT n FROM n), NULL, NULL, "
        "NULL, NULL, NULL, NULL "
        "UNION ALL SELECT 2, position, key, attempt, due, NULL, NULL, NULL, NULL, NULL FROM p "
        "UNION ALL SELECT 3, position, key, NULL, NULL, topic_id, id, time, headers, data "
        "FROM c"
    )


_NUL = ("NULL::text, NULL::int, NULL::float8, NULL::int, NULL::text, NULL::float8, "
        "NULL::bytea, NULL::bytea")

# A fetch's view of its subscription, as one function so that one round trip both waits
# for the subscription row lock and reads *after* it: in a VOLATILE function each query
# takes a fresh snapshot (READ COMMITTED), so competing consumers see each other's
# committed claims. The rows: (0, cursor), (1, counter, how many new messages may be
# taken), (2, pending row…), (3, candidate message…), (4, floor). Every position up to
# the counter is visible (commit order is position order), so a cursor may move up to
# it. Ordered subscriptions read each pending row's key from its message. "How many may
# be taken" is `plan_fetch`'s own room, computed here to read no more candidates than it
# can take: min(limit, max_in_flight - live rows), a live row being one not due for its
# dead letter (attempt < max_deliver or due > now); `plan_fetch` still decides.
_CLAIM_FUNCTION = (
    "CREATE FUNCTION {s}.tidings_claim(p_sub int, p_regex text, p_limit int, "
    "p_max_in_flight int, p_max_deliver int, p_now float8, p_ordered bool) "
    "RETURNS TABLE (o_kind int, o_position bigint, o_key text, o_attempt int, o_due float8, "
    "o_topic_id int, o_id text, o_time float8, o_headers bytea, o_data bytea) "
    "LANGUAGE plpgsql VOLATILE " + _PLANS + " AS $fn$\n"
    "BEGIN\n"
    "  PERFORM FROM {s}.tidings_subscriptions WHERE id = p_sub FOR UPDATE;\n"
    "  IF NOT FOUND THEN RETURN; END IF;\n"
    "  IF p_ordered THEN\n"
    "    RETURN QUERY " + _claim_snapshot(
        "SELECT pp.position, " + _KEY_OF_ROW + " AS key, pp.attempt, pp.due "
        "FROM {s}.tidings_pending pp "
        "WHERE pp.sub_id = p_sub AND pp.position >= (SELECT floor FROM s)") + ";\n"
    "  ELSE\n"
    "    RETURN QUERY " + _claim_snapshot(
        "SELECT position, NULL::text AS key, attempt, due FROM {s}.tidings_pending "
        "WHERE sub_id = p_sub AND position >= (SELECT floor FROM s)") + ";\n"
    "  END IF;\n"
    "END $fn$"
)


# A fetch in one statement (so one round trip, and the subscription's lock held only
# while the server runs it, never across a client round trip): `plan_fetch` in SQL. It
# locks the subscription row, applies the acks and releases that came with it
# (`split_settles`: conditional writes, after the lock, as every writer of a
# subscription's rows takes them), then plans exactly as `plan_fetch` does: ready rows
# (attempt 0 or due; for an ordered subscription only the first pending row of each key)
# are redelivered in position order up to the limit; new messages are taken up to the
# room and the limit, each delivered or, ordered, parked (attempt 0) behind a pending row
# of its key; the cursor jumps to the counter when fewer matched than it could take; the
# floor follows; and the plan is written back. A row due for its dead letter needs a
# message Python builds: then nothing is written, one row (8) says so, and the engine
# plans this fetch in Python. Rows: (1, message, attempt) per delivery, in
# `plan.deliver`'s order (a new message straight from the scan that found it), then
# (0, next due). No rows: the subscription is gone.
# tests/postgres/test_fetch_plan.py checks it against the Python planning on random states.
_FETCH_FUNCTION = (
    "CREATE FUNCTION {s}.tidings_fetch(p_sub int, p_regex text, p_limit int, "
    "p_max_in_flight int, p_max_deliver int, p_now float8, p_ack_wait float8, "
    "p_backoff float8[], p_ordered bool, p_acks bigint[], p_releases bigint[], "
    "p_channel text, p_origin text) "
    "RETURNS TABLE (o_kind int, o_position bigint, o_attempt int, o_due float8, "
    "o_topic_id int, o_id text, o_key text, o_time float8, o_headers bytea, o_data bytea) "
    "LANGUAGE plpgsql VOLATILE " + _PLANS + " AS $fn$\n"
    "DECLARE\n"
    "  v_cursor bigint; v_floor bigint; v_last bigint; v_live int; v_want int; v_room int;\n"
    "  v_lease float8 := p_now + p_ack_wait; v_nb int := coalesce(cardinality(p_backoff), 0);\n"
    "  v_first float8; v_redo bigint[]; v_redo_att int[]; v_found int := 0; v_added int := 0;\n"
    "  v_add bigint[] := '{}'; v_add_att int[] := '{}'; v_out bigint[] := '{}';\n"
    "  v_seen text[] := '{}'; v_nokey bool := false; v_next float8; v_new bigint;\n"
    "  v_lowest bigint; v_low bigint; v_settled bigint[] := p_acks || p_releases; v_c record;\n"
    "  v_take int; v_delivered int := 0; v_dead bool; v_gone int := 0; v_ready bool;\n"
    "  v_due float8;\n"
    "BEGIN\n"
    "  PERFORM set_config('synchronous_commit', 'off', true);  -- losing it: a redelivery\n"
    "  SELECT cursor, floor INTO v_cursor, v_floor FROM {s}.tidings_subscriptions "
    "WHERE id = p_sub FOR UPDATE;\n"
    "  IF NOT FOUND THEN RETURN; END IF;\n"
    "  SELECT count(*), coalesce(bool_or(attempt >= p_max_deliver AND due <= p_now "
    "AND position <> ALL(v_settled)), false), coalesce(bool_or(attempt = 0 OR due <= p_now), "
    "false), min(due) INTO v_live, v_dead, v_ready, v_due "
    "FROM {s}.tidings_pending WHERE sub_id = p_sub AND position >= v_floor;\n"
    "  IF v_dead THEN\n"
    "    RETURN QUERY SELECT 8, NULL::bigint, NULL::int, NULL::float8, NULL::int, NULL::text, "
    "NULL::text, NULL::float8, NULL::bytea, NULL::bytea;\n"
    "    RETURN;\n"
    "  END IF;\n"
    "  IF cardinality(p_acks) > 0 THEN\n"
    "    DELETE FROM {s}.tidings_pending p USING unnest(p_acks) AS u(position) "
    "WHERE p.sub_id = p_sub AND p.position BETWEEN (SELECT min(x) FROM unnest(p_acks) x) "
    "AND (SELECT max(x) FROM unnest(p_acks) x) AND p.position = u.position "
    "AND p.attempt > 0;\n"
    "    GET DIAGNOSTICS v_gone = ROW_COUNT;\n"
    "    v_live := v_live - v_gone;  -- (one pass over the rows counted them and the dead)\n"
    "  END IF;\n"
    "  IF cardinality(p_releases) > 0 THEN\n"
    "    UPDATE {s}.tidings_pending p SET attempt = p.attempt - 1, due = p_now "
    "FROM unnest(p_releases) AS u(position) WHERE p.sub_id = p_sub "
    "AND p.position BETWEEN (SELECT min(x) FROM unnest(p_releases) x) "
    "AND (SELECT max(x) FROM unnest(p_releases) x) AND p.position = u.position "
    "AND p.attempt > 0;\n"
    "  END IF;\n"
    "  IF cardinality(p_releases) > 0 OR v_gone > 0 AND (v_live + v_gone >= p_max_in_flight "
    "OR p_ordered AND EXISTS (SELECT FROM {s}.tidings_pending WHERE sub_id = p_sub "
    "AND position >= v_floor AND attempt = 0)) THEN  -- (see Statements.settle_simple)\n"
    "    PERFORM pg_notify(p_channel, p_origin);\n"
    "  END IF;\n"
    "  SELECT value INTO v_last FROM {s}.tidings_meta WHERE name = 'position';\n"

    "  v_first := CASE WHEN v_nb > 0 AND p_max_deliver > 1 THEN p_backoff[1] ELSE 0 END;\n"
    "  IF p_ordered THEN  -- the keys of pending rows: a new message of one of them parks\n"
    "    SELECT coalesce(array_agg(DISTINCT k.key) FILTER (WHERE k.key IS NOT NULL), '{}'), "
    "coalesce(bool_or(k.key IS NULL), false) INTO v_seen, v_nokey "
    "FROM (SELECT " + _KEY_OF_ROW + " AS key FROM {s}.tidings_pending pp "
    "WHERE pp.sub_id = p_sub AND pp.position >= v_floor) k;\n"
    "  END IF;\n"
    "  IF NOT p_ordered AND NOT v_ready AND cardinality(v_settled) = 0 THEN\n"
    "    -- (the common case: nothing to redeliver, the rows as the count saw them)\n"
    "    v_redo := '{}'; v_redo_att := '{}'; v_next := v_due;\n"
    "  ELSE\n"
    "  WITH pk AS (SELECT pp.position, pp.attempt, pp.due, CASE WHEN p_ordered THEN "
    + _KEY_OF_ROW + " END AS key FROM {s}.tidings_pending pp "
    "WHERE pp.sub_id = p_sub AND pp.position >= v_floor), "
    "p AS (SELECT position, attempt, due, CASE WHEN p_ordered THEN row_number() OVER "
    "(PARTITION BY key IS NULL, key ORDER BY position) ELSE 1 END AS rn FROM pk), "
    "ready AS (SELECT position FROM p WHERE rn = 1 AND (attempt = 0 OR due <= p_now) "
    "ORDER BY position LIMIT p_limit), "
    "upd AS (UPDATE {s}.tidings_pending p SET attempt = p.attempt + 1, due = v_lease + "
    "CASE WHEN v_nb > 0 AND p_max_deliver > 1 AND p.attempt + 1 < p_max_deliver "
    "THEN p_backoff[least(p.attempt + 1, v_nb)] ELSE 0 END FROM ready r "
    "WHERE p.sub_id = p_sub AND p.position = r.position RETURNING p.position, p.attempt), "
    "nxt AS (SELECT CASE WHEN bool_or(attempt = 0 OR due <= p_now) THEN p_now "
    "ELSE min(due) END AS due FROM p WHERE rn = 1 "
    "AND position NOT IN (SELECT position FROM ready)) "
    "SELECT coalesce((SELECT array_agg(position ORDER BY position) FROM upd), '{}'), "
    "coalesce((SELECT array_agg(attempt ORDER BY position) FROM upd), '{}'), "
    "(SELECT due FROM nxt) INTO v_redo, v_redo_att, v_next;\n"
    "  END IF;\n"
    "  RETURN QUERY SELECT 1, m.position, d.attempt, NULL::float8, m.topic_id, m.id, m.key, "
    "m.time, m.headers, m.data FROM unnest(v_redo, v_redo_att) WITH ORDINALITY "
    "AS d(position, attempt, k) CROSS JOIN LATERAL (SELECT * FROM {s}.tidings_messages mm "
    "WHERE mm.position = d.position LIMIT 1) m ORDER BY d.k;\n"
    "  v_want := greatest(0, least(p_limit, p_max_in_flight - v_live));\n"
    "  v_room := p_max_in_flight - v_live;\n"
    "  v_new := v_cursor;\n"
    "  v_take := greatest(0, least(v_room, p_limit - cardinality(v_redo)));\n"
    "  IF v_want > 0 AND NOT p_ordered THEN  -- every new one is delivered: set-based\n"
    "    IF v_take > 0 AND " + _NONE_PAST_CURSOR + " THEN\n"
    "      RETURN QUERY " + _take_new("") + ";\n"
    "      GET DIAGNOSTICS v_added = ROW_COUNT;\n"
    "    ELSIF v_take > 0 THEN\n"
    "      RETURN QUERY " + _take_new(_OVERWRITE) + ";\n"
    "      GET DIAGNOSTICS v_added = ROW_COUNT;\n"
    "    END IF;\n"
    "    v_delivered := v_added;\n"
    "    IF v_added > 0 THEN  -- the last taken: new rows are the only ones past the cursor\n"
    "      SELECT max(position) INTO v_new FROM {s}.tidings_pending "
    "WHERE sub_id = p_sub AND position > v_cursor;\n"
    "    END IF;\n"
    "    v_found := v_added;\n"
    "    IF v_added = v_take AND v_take < v_want THEN  -- were there more than it took?\n"
    "      SELECT count(*) INTO v_found FROM (" + _scan(
        "v_cursor", "v_last", "p_regex", "v_want") + ") x;\n"
    "    END IF;\n"
    "  ELSIF v_want > 0 THEN\n"
    "    FOR v_c IN " + _scan("v_cursor", "v_last", "p_regex", "v_want") + " LOOP\n"
    "      v_found := v_found + 1;\n"
    "      CONTINUE WHEN v_room <= 0 OR cardinality(v_redo) + cardinality(v_out) >= p_limit;\n"
    "      IF p_ordered AND (CASE WHEN v_c.key IS NULL THEN v_nokey ELSE v_c.key = ANY(v_seen) "
    "END) THEN\n"
    "        v_add_att := v_add_att || 0;  -- parked behind its key\n"
    "      ELSE\n"
    "        IF p_ordered THEN\n"
    "          IF v_c.key IS NULL THEN v_nokey := true; ELSE v_seen := v_seen || v_c.key; END IF;\n"
    "        END IF;\n"
    "        v_add_att := v_add_att || 1; v_out := v_out || v_c.position;\n"
    "        o_kind := 1; o_position := v_c.position; o_attempt := 1; o_due := NULL;\n"
    "        o_topic_id := v_c.topic_id; o_id := v_c.id; o_key := v_c.key; "
    "o_time := v_c.time;\n"
    "        o_headers := v_c.headers; o_data := v_c.data; RETURN NEXT;\n"
    "      END IF;\n"
    "      v_add := v_add || v_c.position; v_added := v_added + 1; v_room := v_room - 1;\n"
    "      v_new := v_c.position;\n"
    "    END LOOP;\n"
    "  END IF;\n"
    "  IF p_ordered AND v_added > 0 THEN\n"
    "    v_delivered := cardinality(v_out);\n"
    "    IF " + _NONE_PAST_CURSOR + " THEN\n"
    "      " + _add_rows("") + ";\n"
    "    ELSE\n"
    "      " + _add_rows(_OVERWRITE) + ";\n"
    "    END IF;\n"
    "  END IF;\n"
    "  IF v_want > 0 AND v_found < v_want AND v_added = v_found THEN\n"
    "    v_new := greatest(v_new, v_last);  -- nothing else matches up to the counter\n"
    "  END IF;\n"
    "  SELECT min(position) INTO v_lowest FROM {s}.tidings_pending "
    "WHERE sub_id = p_sub AND position >= v_floor;\n"
    "  v_low := CASE WHEN v_lowest IS NULL OR v_lowest > v_new THEN v_new + 1 "
    "ELSE v_lowest END;\n"
    "  IF v_new <> v_cursor OR v_low <> v_floor THEN\n"
    "    UPDATE {s}.tidings_subscriptions SET cursor = v_new, floor = v_low WHERE id = p_sub;\n"
    "  END IF;\n"
    "  IF cardinality(v_redo) + v_delivered > 0 THEN\n"
    "    v_next := least(coalesce(v_next, v_lease), v_lease);\n"
    "  END IF;\n"
    "  RETURN QUERY SELECT 0, NULL::bigint, NULL::int, v_next, NULL::int, NULL::text, "
    "NULL::text, NULL::float8, NULL::bytea, NULL::bytea;\n"
    "END $fn$"
)

LOG_MIGRATIONS: list[Migration] = [
    Migration(1, "log, topics, subscriptions", [
        # The position counter. Appends update this row in their own transaction,
        # so its row lock (held until commit) serializes them: commit order is
        # position order. `time` keeps stored times non-decreasing with position.
        """CREATE TABLE {s}.tidings_meta (
            name text PRIMARY KEY, value bigint NOT NULL, time float8 NOT NULL DEFAULT 0
        ) WITH (fillfactor = 50)""",
        "INSERT INTO {s}.tidings_meta (name, value) VALUES ('position', 0)",
        """CREATE TABLE {s}.tidings_topics (
            id serial PRIMARY KEY, name text NOT NULL UNIQUE, retention text)""",
        """CREATE TABLE {s}.tidings_messages (
            position bigint PRIMARY KEY,
            topic_id int NOT NULL,
            id text NOT NULL,
            key text,
            time float8 NOT NULL,
            headers bytea,
            data bytea NOT NULL)""",
        "CREATE INDEX tidings_messages_topic ON {s}.tidings_messages (topic_id, position)",
        """CREATE TABLE {s}.tidings_message_ids (
            id text PRIMARY KEY, position bigint NOT NULL, time float8 NOT NULL)""",
        "CREATE INDEX tidings_message_ids_time ON {s}.tidings_message_ids (time)",
        # `floor`: no pending row of the subscription lies below it. Acks delete pending
        # rows, and until VACUUM comes their dead index entries stay; reading from the
        # floor up skips all those below it (a queue's whole history).
        """CREATE TABLE {s}.tidings_subscriptions (
            id serial PRIMARY KEY, grp text NOT NULL, pattern text NOT NULL,
            spec text NOT NULL, cursor bigint NOT NULL, floor bigint NOT NULL DEFAULT 0,
            UNIQUE (grp, pattern)
        ) WITH (fillfactor = 50)""",
        # Updated on every delivery: room on each page keeps the updates HOT. (A row's
        # key is its message's: ordered subscriptions join for it.)
        """CREATE TABLE {s}.tidings_pending (
            sub_id int NOT NULL, position bigint NOT NULL,
            attempt int NOT NULL, due float8 NOT NULL,
            PRIMARY KEY (sub_id, position)
        ) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0,
                autovacuum_vacuum_threshold = 5000)""",
        _CLAIM_FUNCTION,
        # For append-only tables of other components (the event store):
        #   CREATE TRIGGER … BEFORE UPDATE OR DELETE ON {s}.t
        #       FOR EACH ROW EXECUTE FUNCTION {s}.tidings_refuse_change();
        #   CREATE TRIGGER … BEFORE TRUNCATE ON {s}.t
        #       FOR EACH STATEMENT EXECUTE FUNCTION {s}.tidings_refuse_change();
        """CREATE FUNCTION {s}.tidings_refuse_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'tidings: % on %.% refused: its rows are immutable',
                TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
                USING ERRCODE = 'integrity_constraint_violation',
                      HINT = 'append new rows instead of changing stored ones';
        END $$""",
    ]),
    Migration(2, "fetch in one statement", [_FETCH_FUNCTION]),
    Migration(3, "claims look messages up by position, whatever the statistics; "
                 "acks wake other processes only when room was short", [
        _CLAIM_FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1),
        _FETCH_FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)]),
]


_MIGRATE_LOCK = 0x7469_6469  # "tidi": the advisory lock key for migrations


async def apply_migrations(conn: Any, schema: str, component: str,
                           migrations: Sequence[Migration]) -> int:
    """Apply `component`'s unrecorded migrations in version order, in `conn`'s transaction.

    `schema` is the quoted schema name. Returns how many ran.
    """
    # one migrator at a time per database (processes may start together)
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {schema}.tidings_migrations ("
        "component text NOT NULL, version int NOT NULL, description text NOT NULL, "
        "applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (component, version))"
    )
    done = {r[0] for r in await conn.fetch(
        f"SELECT version FROM {schema}.tidings_migrations WHERE component = $1", component)}
    ran = 0
    for m in sorted(migrations, key=lambda m: m.version):
        if m.version in done:
            continue
        for ddl in m.statements:
            await conn.execute(ddl.replace("{s}", schema))
        await conn.execute(
            f"INSERT INTO {schema}.tidings_migrations (component, version, description) "
            "VALUES ($1, $2, $3)", component, m.version, m.description)
        ran += 1
    return ran


class Statements:
    """The engine's SQL, with the schema filled in once."""

    def __init__(self, schema: str) -> None:
        s = f'"{schema}"'
        self.schema = s
        meta, topics, msgs = f"{s}.tidings_meta", f"{s}.tidings_topics", f"{s}.tidings_messages"
        ids, subs, pending = (f"{s}.tidings_message_ids", f"{s}.tidings_subscriptions",
                              f"{s}.tidings_pending")
        self.messages_table = "tidings_messages"

        # -- appending ------------------------------------------------------------------
        # Takes the log's commit-order lock (the counter row) without moving the counter.
        self.lock_log = f"SELECT FROM {meta} WHERE name = 'position' FOR UPDATE"
        # One statement (so, outside a transaction, one round trip and one commit):
        # reserve n positions under the counter row's lock, insert the rows, notify.
        # $1 n, $2 now, $3..$7 per-row arrays, $8 channel, $9 payload, $10 sync setting
        unnest = ("unnest($3::int[], $4::text[], $5::text[], $6::bytea[], $7::bytea[]) "
                  "WITH ORDINALITY AS u(topic_id, id, key, headers, data, n)")
        head = (
            f"WITH c AS (UPDATE {meta} SET value = value + $1, time = greatest(time, $2) "
            f"WHERE name = 'position' AND set_config('synchronous_commit', $10, true) <> '' "
            "RETURNING value - $1 AS base, time), "
            f"ins AS (INSERT INTO {msgs} ({MSG_COLS}) "
            f"SELECT c.base + u.n, u.topic_id, u.id, u.key, c.time, u.headers, u.data "
            f"FROM c, {unnest}) "
        )
        tail = "SELECT base, time, pg_notify($8, $9) FROM c"
        self.append = head + tail
        # The same, also remembering client-supplied ids ($11: which rows have one).
        self.append_ids = (
            head[:-1] + ", "
            f"rid AS (INSERT INTO {ids} (id, position, time) "
            f"SELECT u.id, c.base + u.n, c.time FROM c, "
            "unnest($4::text[], $11::bool[]) WITH ORDINALITY AS u(id, client, n) "
            "WHERE u.client ON CONFLICT (id) DO UPDATE SET position = excluded.position, "
            "time = excluded.time) " + tail
        )
        # Big batches: reserve positions here, then COPY the rows.
        self.reserve = (
            f"UPDATE {meta} SET value = value + $1, time = greatest(time, $2) "
            "WHERE name = 'position' AND set_config('synchronous_commit', $5, true) <> '' "
            "RETURNING value - $1 AS base, time, pg_notify($3, $4)"
        )
        self.remember_ids = (
            f"INSERT INTO {ids} (id, position, time) "
            "SELECT * FROM unnest($1::text[], $2::bigint[], $3::float8[]) "
            "ON CONFLICT (id) DO UPDATE SET position = excluded.position, time = excluded.time"
        )
        self.known_ids = f"SELECT id, position, time FROM {ids} WHERE id = ANY($1::text[])"
        self.prune_ids = f"DELETE FROM {ids} WHERE time < $1"

        # -- topics -----------------------------------------------------------------------
        self.create_topics = (
            f"WITH i AS (INSERT INTO {topics} (name) SELECT unnest($1::text[]) "
            "ON CONFLICT (name) DO NOTHING RETURNING id, name) "
            f"SELECT id, name FROM i UNION ALL SELECT id, name FROM {topics} "
            "WHERE name = ANY($1::text[])"
        )
        self.topic_names = f"SELECT id, name FROM {topics} WHERE id = ANY($1::int[])"
        self.set_retention = (
            f"INSERT INTO {topics} (name, retention) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET retention = excluded.retention"
        )

        # -- reading --------------------------------------------------------------------
        self.read = _scan("$1", "$2", "$4", "$3").replace("{s}", s)
        # Several reads in one statement: each read's rows, numbered, in order.
        self.read_many = (
            "SELECT q.k, r.* FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::int[]) "
            "WITH ORDINALITY AS q(regex, after, stop, lim, k) CROSS JOIN LATERAL ("
            + _scan("q.after", "q.stop", "q.regex", "q.lim").replace("{s}", s)
            + ") r ORDER BY q.k, r.position"
        )
        self.last_position = f"SELECT value FROM {meta} WHERE name = 'position'"
        self.bounds = f"SELECT min(position), max(position) FROM {msgs}"
        self.first_at_or_after = (
            f"SELECT position, time FROM {msgs} WHERE position >= $1 ORDER BY position LIMIT 1"
        )
        self.by_position = f"SELECT {MSG_COLS} FROM {msgs} WHERE position = ANY($1::bigint[])"

        # -- subscriptions ----------------------------------------------------------------
        self.subscribe = (
            f"INSERT INTO {subs} (grp, pattern, spec, cursor) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (grp, pattern) DO UPDATE SET spec = excluded.spec RETURNING id"
        )
        self._subs, self._pending = subs, pending
        self.claim = f"SELECT * FROM {s}.tidings_claim($1, $2, $3, $4, $5, $6, $7)"
        self.fetch = (f"SELECT * FROM {s}.tidings_fetch($1, $2, $3, $4, $5, $6, $7, $8, $9, "
                      "$10, $11, $12, $13)")
        # Several fetches in one statement, in the given order; each one's backoff, acks
        # and releases are its slices of three flat arrays.
        self.fetch_many = (
            "SELECT q.k, f.* FROM unnest($1::int[], $2::text[], $3::int[], $4::int[], "
            "$5::int[], $6::float8[], $7::float8[], $8::int[], $9::int[], $10::bool[], "
            "$11::int[], $12::int[], $13::int[], $14::int[], $15::text[]) WITH ORDINALITY "
            "AS q(sub, regex, lim, mif, md, now, aw, b0, b1, ord, a0, a1, r0, r1, payload, k) "
            f"CROSS JOIN LATERAL {s}.tidings_fetch(q.sub, q.regex, q.lim, q.mif, q.md, q.now, "
            "q.aw, ($16::float8[])[q.b0:q.b1], q.ord, ($17::bigint[])[q.a0:q.a1], "
            "($18::bigint[])[q.r0:q.r1], $19, q.payload) WITH ORDINALITY AS f "
            "ORDER BY q.k, f.ordinality"
        )
        # Rows by position, bounded by the positions' range (see `_rows`).
        between = ("p.sub_id = $1 AND p.position BETWEEN (SELECT min(x) FROM unnest($2) x) "
                   "AND (SELECT max(x) FROM unnest($2) x)")
        self.pending_rows = (
            f"SELECT p.position, p.attempt FROM {pending} p "
            "JOIN unnest($2::bigint[]) AS u(position) ON p.position = u.position "
            f"WHERE {between}"
        )
        self.set_due = (
            f"UPDATE {pending} p SET due = u.due "
            "FROM unnest($2::bigint[], $3::float8[]) AS u(position, due) "
            f"WHERE {between} AND p.position = u.position"
        )
        # Remove rows and return their messages (for dead letters).
        self.remove_pending = (
            f"WITH d AS (DELETE FROM {pending} p USING unnest($2::bigint[]) AS u(position) "
            f"WHERE {between} AND p.position = u.position) "
            f"SELECT {MSG_COLS} FROM {msgs} WHERE position = ANY($2::bigint[])"
        )
        # locked first, like every writer of a subscription (then pending rows, then the log)
        self.find_subscription = (
            f"SELECT id FROM {subs} WHERE grp = $1 AND pattern = $2 FOR UPDATE")
        # Trim reads every subscription's floor and deletes below it: new subscriptions and
        # cursor moves wait until it commits (row locks alone would let one slip past).
        self.freeze_subscriptions = f"LOCK TABLE {subs} IN SHARE MODE"
        self.delete_pending = f"DELETE FROM {pending} WHERE sub_id = $1"
        self.delete_subscription = f"DELETE FROM {subs} WHERE id = $1"

        # -- retention and introspection --------------------------------------------------
        self.retained_topics = (
            f"SELECT id, name, retention FROM {topics} WHERE retention IS NOT NULL"
        )
        self.cut_count = (
            f"SELECT position FROM {msgs} WHERE topic_id = $1 "
            "ORDER BY position DESC LIMIT 1 OFFSET $2"
        )
        self.cut_age = f"SELECT max(position) FROM {msgs} WHERE topic_id = $1 AND time < $2"
        self.cut_bytes = (
            "SELECT position FROM (SELECT position, sum(octet_length(data)) OVER "
            f"(ORDER BY position DESC) AS total FROM {msgs} WHERE topic_id = $1) t "
            "WHERE total > $2 ORDER BY position DESC LIMIT 1"
        )
        self.sub_floors = (
            "SELECT s.pattern, s.cursor, "
            f"(SELECT min(position) FROM {pending} p WHERE p.sub_id = s.id "
            f"AND p.position >= s.floor) FROM {subs} s"
        )
        self.trim = f"DELETE FROM {msgs} WHERE topic_id = $1 AND position <= $2"
        self.topic_stats = (
            "SELECT t.name, count(m.position), coalesce(sum(octet_length(m.data)), 0), "
            f"min(m.position), max(m.position) FROM {topics} t "
            f"LEFT JOIN {msgs} m ON m.topic_id = t.id GROUP BY t.id ORDER BY t.name"
        )
        self.subscription_rows = (
            f"SELECT id, grp, pattern, spec, cursor, floor FROM {subs} ORDER BY grp, pattern"
        )
        self.subscription_counts = (
            "SELECT count(*), count(*) FILTER (WHERE attempt > 0 AND due > $2) "
            f"FROM {pending} WHERE sub_id = $1 AND position >= $3"
        )
        self.behind = (
            f"SELECT count(*) FROM {msgs} WHERE position > $1 "
            f"AND topic_id IN (SELECT id FROM {topics} WHERE name ~ $2)"
        )

    # Statements sent with the simple query protocol, so that several go in one round
    # trip. Only numbers (formatted here) and the channel and origin (identifier-safe by
    # construction) are spliced in; nothing a user typed.
    def begin_claim(self, sub_id: int, *, lock: bool,
                    notify: tuple[str, str] | None = None) -> str:
        """BEGIN (bookkeeping), with `lock` the subscription row locked, and a NOTIFY."""
        # Bookkeeping commits without waiting for the WAL flush: losing one to a crash only
        # means a redelivery. The lock makes competing consumers of one subscription take
        # turns (other subscriptions never wait); it is always taken before pending rows.
        out = ["BEGIN", "SET LOCAL synchronous_commit TO OFF"]
        if lock:
            out.append(f"SELECT FROM {self._subs} WHERE id = {int(sub_id)} FOR UPDATE")
        if notify is not None:  # sent at commit
            out.append(f"SELECT pg_notify('{notify[0]}', '{notify[1]}')")
        return "; ".join(out)

    def settle_simple(self, sub_id: int, acks: Sequence[int], releases: Sequence[int],
                      now: float, notify: tuple[str, str], max_in_flight: int,
                      ordered: bool) -> str:
        """Acks and releases in a transaction of their own, then COMMIT.

        The rows' part of `plan_settle` in SQL: an ack deletes its row, a release
        undoes its attempt and makes it due now, each only if the row is out
        (`attempt > 0`), as `split_settles` documents; positions come deduplicated
        from it (one decision per position).

        They need no subscription lock (they only delete or postpone their rows), and
        committing them before a claim takes the lock keeps the lock order: a claim that
        holds the lock may wait for these rows, never the other way round.

        Other processes' consumers of the pattern are woken (`notify`) by a release (a
        message due again), and by acks only when the subscription had no room before
        them (`max_in_flight` rows out) or, `ordered`, has messages parked behind their
        keys (an ack may let one go): a consumer waits for acks only when a fetch found
        no room or only parked messages, and the first ack after that wakes it. Woken by
        every ack, each process's idle consumers fetched nothing after each of another's.
        """
        sub = int(sub_id)
        out = ["BEGIN", "SET LOCAL synchronous_commit TO OFF"]
        wake = f"pg_notify('{notify[0]}', '{notify[1]}')"
        if acks:
            delete = (f"DELETE FROM {self._pending} p USING unnest({_ints(acks)}::bigint[]) "
                      f"AS u(position) WHERE {_rows(sub, acks)} AND p.position = u.position "
                      "AND p.attempt > 0")
            if releases:
                out.append(delete)
            else:  # (the count sees the rows as they were before the delete)
                rows = (f"FROM {self._pending} p WHERE p.sub_id = {sub} AND p.position >= "
                        f"(SELECT floor FROM {self._subs} WHERE id = {sub})")
                parked = f" OR EXISTS (SELECT {rows} AND p.attempt = 0)" if ordered else ""
                out.append(
                    f"WITH d AS ({delete} RETURNING 1) SELECT {wake} WHERE EXISTS "
                    f"(SELECT FROM d) AND ((SELECT count(*) {rows}) >= {int(max_in_flight)}"
                    f"{parked})")
        if releases:
            out.append(f"UPDATE {self._pending} p SET attempt = p.attempt - 1, "
                       f"due = {_float(now)} FROM unnest({_ints(releases)}::bigint[]) "
                       f"AS u(position) WHERE {_rows(sub, releases)} "
                       "AND p.position = u.position AND p.attempt > 0")
            out.append(f"SELECT {wake}")
        out.append("COMMIT")
        return "; ".join(out)

    def claim_commit(self, sub_id: int, added: Sequence[Any], again: Sequence[Any],
                     cursor: int | None, floor: int | None) -> str:
        """Write a plan back (new pending rows, redeliveries, cursor, floor); then COMMIT."""
        sub = int(sub_id)
        out = []
        if added:
            out.append(
                f"INSERT INTO {self._pending} (sub_id, position, attempt, due) "
                f"SELECT {sub}, * FROM unnest({_ints(p.position for p in added)}::bigint[], "
                f"{_ints(p.attempt for p in added)}::int[], "
                f"{_floats(p.due for p in added)}::float8[]) "
                "ON CONFLICT (sub_id, position) DO UPDATE SET attempt = excluded.attempt, "
                "due = excluded.due")
        if again:
            out.append(
                f"UPDATE {self._pending} p SET attempt = u.attempt, due = u.due FROM unnest("
                f"{_ints(p.position for p in again)}::bigint[], "
                f"{_ints(p.attempt for p in again)}::int[], "
                f"{_floats(p.due for p in again)}::float8[]) AS u(position, attempt, due) "
                f"WHERE {_rows(sub, [p.position for p in again])} "
                "AND p.position = u.position")
        moves = []
        if cursor is not None:
            moves.append(f"cursor = {int(cursor)}")
        if floor is not None:
            moves.append(f"floor = {int(floor)}")
        if moves:
            out.append(f"UPDATE {self._subs} SET {', '.join(moves)} WHERE id = {sub}")
        out.append("COMMIT")
        return "; ".join(out)


def _rows(sub: int, positions: Sequence[int]) -> str:
    """Pending rows of `sub` within the positions' range: an index range scan whatever the
    planner's statistics (a plain `sub_id =` scan would visit every dead entry as well)."""
    return (f"p.sub_id = {int(sub)} AND p.position BETWEEN {int(min(positions))} "
            f"AND {int(max(positions))}")


def _ints(values: Iterable[int]) -> str:
    return "'{" + ",".join(str(int(v)) for v in values) + "}'"


def _float(value: float) -> str:
    return repr(float(value))


def _floats(values: Iterable[float]) -> str:
    return "'{" + ",".join(repr(float(v)) for v in values) + "}'"
