"""The PostgreSQL engine's schema, migrations and statements (text only, no I/O).

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
from collections.abc import Sequence
from dataclasses import dataclass

from .. import topics as _topics
from ..errors import InvalidArgument

__all__ = ["LOG_MIGRATIONS", "Migration", "Statements", "channel_for", "check_schema",
           "pattern_regex"]

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
        """CREATE TABLE {s}.tidings_subscriptions (
            id serial PRIMARY KEY, grp text NOT NULL, pattern text NOT NULL,
            spec text NOT NULL, cursor bigint NOT NULL, UNIQUE (grp, pattern)
        ) WITH (fillfactor = 50)""",
        # Updated on every delivery: room on each page keeps the updates HOT.
        """CREATE TABLE {s}.tidings_pending (
            sub_id int NOT NULL, position bigint NOT NULL, key text,
            attempt int NOT NULL, due float8 NOT NULL,
            PRIMARY KEY (sub_id, position)
        ) WITH (fillfactor = 70)""",
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
]


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
            f"WHERE name = 'position' RETURNING value - $1 AS base, time, pg_notify($3, $4)"
        )
        self.remember_ids = (
            f"INSERT INTO {ids} (id, position, time) "
            "SELECT * FROM unnest($1::text[], $2::bigint[], $3::float8[]) "
            "ON CONFLICT (id) DO UPDATE SET position = excluded.position, time = excluded.time"
        )
        self.known_ids = f"SELECT id, position, time FROM {ids} WHERE id = ANY($1::text[])"
        self.prune_ids = f"DELETE FROM {ids} WHERE time < $1"
        self.notify = "SELECT pg_notify($1, $2)"

        # -- topics -----------------------------------------------------------------------
        self.create_topics = (
            f"WITH i AS (INSERT INTO {topics} (name) SELECT unnest($1::text[]) "
            "ON CONFLICT (name) DO NOTHING RETURNING id, name) "
            f"SELECT id, name FROM i UNION ALL SELECT id, name FROM {topics} "
            "WHERE name = ANY($1::text[])"
        )
        self.topic_names = f"SELECT id, name FROM {topics} WHERE id = ANY($1::int[])"
        self.all_topics = f"SELECT id, name FROM {topics}"
        self.set_retention = (
            f"INSERT INTO {topics} (name, retention) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET retention = excluded.retention"
        )

        # -- reading --------------------------------------------------------------------
        self.read = (
            f"SELECT {MSG_COLS} FROM {msgs} WHERE position > $1 AND position <= $2 "
            f"AND topic_id IN (SELECT id FROM {topics} WHERE name ~ $4) "
            "ORDER BY position LIMIT $3"
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
        # BEGIN, bookkeeping commits without waiting for the WAL flush (losing one to a
        # crash only means a redelivery), and the subscription row locked: competing
        # consumers of one subscription take turns; other subscriptions never wait.
        self.begin_claim = (
            "BEGIN; SET LOCAL synchronous_commit TO OFF; "
            f"SELECT FROM {subs} WHERE id = {{sub_id:d}} FOR UPDATE"
        )
        # One snapshot, taken after the lock: the cursor, the counter, the pending rows
        # and the next candidates. Every position <= the counter is visible in it
        # (commit order is position order), so the cursor may move up to the counter.
        # $1 sub, $2 pattern regex, $3 limit, $4 max_in_flight, $5 max_deliver, $6 now
        nul = "NULL::text, NULL::int, NULL::float8, NULL::int, NULL::text, NULL::float8, " \
              "NULL::bytea, NULL::bytea"
        self.claim_snapshot = (
            f"WITH s AS (SELECT cursor FROM {subs} WHERE id = $1), "
            f"l AS (SELECT value FROM {meta} WHERE name = 'position'), "
            f"p AS (SELECT position, key, attempt, due FROM {pending} WHERE sub_id = $1), "
            f"c AS (SELECT {MSG_COLS} FROM {msgs} "
            "WHERE position > (SELECT cursor FROM s) AND position <= (SELECT value FROM l) "
            f"AND topic_id IN (SELECT id FROM {topics} WHERE name ~ $2) "
            "ORDER BY position LIMIT greatest(0, least($3, $4 - "
            "(SELECT count(*) FROM p WHERE attempt < $5 OR due > $6)))) "
            f"SELECT 0 AS kind, (SELECT cursor FROM s) AS position, {nul} "
            f"UNION ALL SELECT 1, (SELECT value FROM l), {nul} "
            "UNION ALL SELECT 2, position, key, attempt, due, NULL, NULL, NULL, NULL, NULL "
            "FROM p "
            "UNION ALL SELECT 3, position, key, NULL, NULL, topic_id, id, time, headers, data "
            "FROM c"
        )
        # Write a plan back in one statement and return the rows of redelivered messages.
        self.claim_write = (
            f"WITH ins AS (INSERT INTO {pending} (sub_id, position, key, attempt, due) "
            "SELECT $1::int, * FROM unnest($2::bigint[], $3::text[], $4::int[], $5::float8[]) "
            "ON CONFLICT (sub_id, position) DO UPDATE SET key = excluded.key, "
            "attempt = excluded.attempt, due = excluded.due), "
            f"upd AS (UPDATE {pending} p SET attempt = u.attempt, due = u.due "
            "FROM unnest($6::bigint[], $7::int[], $8::float8[]) AS u(position, attempt, due) "
            "WHERE p.sub_id = $1 AND p.position = u.position), "
            f"cur AS (UPDATE {subs} SET cursor = $9 WHERE id = $1 AND cursor <> $9) "
            f"SELECT {MSG_COLS} FROM {msgs} WHERE position = ANY($10::bigint[])"
        )
        # Acks and releases in one statement, plus the wake-up for other consumers.
        self.settle_simple = (
            f"WITH a AS (DELETE FROM {pending} WHERE sub_id = $1 "
            "AND position = ANY($2::bigint[]) AND attempt > 0), "
            f"r AS (UPDATE {pending} SET attempt = attempt - 1, due = $4 "
            "WHERE sub_id = $1 AND position = ANY($3::bigint[]) AND attempt > 0) "
            "SELECT pg_notify($5, $6)"
        )
        self.pending_rows = (
            f"SELECT position, attempt FROM {pending} "
            "WHERE sub_id = $1 AND position = ANY($2::bigint[])"
        )
        self.set_due = (
            f"UPDATE {pending} p SET due = u.due "
            "FROM unnest($2::bigint[], $3::float8[]) AS u(position, due) "
            "WHERE p.sub_id = $1 AND p.position = u.position"
        )
        # Remove rows and return their messages (for dead letters).
        self.remove_pending = (
            f"WITH d AS (DELETE FROM {pending} WHERE sub_id = $1 "
            "AND position = ANY($2::bigint[])) "
            f"SELECT {MSG_COLS} FROM {msgs} WHERE position = ANY($2::bigint[])"
        )
        self.find_subscription = f"SELECT id FROM {subs} WHERE grp = $1 AND pattern = $2"
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
            f"(SELECT min(position) FROM {pending} p WHERE p.sub_id = s.id) FROM {subs} s"
        )
        self.trim = f"DELETE FROM {msgs} WHERE topic_id = $1 AND position <= $2"
        self.topic_stats = (
            "SELECT t.name, count(m.position), coalesce(sum(octet_length(m.data)), 0), "
            f"min(m.position), max(m.position) FROM {topics} t "
            f"LEFT JOIN {msgs} m ON m.topic_id = t.id GROUP BY t.id ORDER BY t.name"
        )
        self.subscription_rows = (
            f"SELECT id, grp, pattern, spec, cursor FROM {subs} ORDER BY grp, pattern"
        )
        self.subscription_counts = (
            "SELECT count(*), count(*) FILTER (WHERE attempt > 0 AND due > $2) "
            f"FROM {pending} WHERE sub_id = $1"
        )
        self.behind = (
            f"SELECT count(*) FROM {msgs} WHERE position > $1 "
            f"AND topic_id IN (SELECT id FROM {topics} WHERE name ~ $2)"
        )
