"""`nats://host:4222`: the log and its subscriptions on a NATS JetStream server or cluster.

How the protocol maps onto JetStream (docs/architecture.md has the why):

- The log is one stream (`stream=` option, default `tidings`). A topic `a.b` is the
  subject `<stream>.u.a.b`; tidings' own topics (`$dlq.g`) live under `<stream>.s.`,
  so a leading wildcard never matches them, as on every engine. A message's position is
  its stream sequence; its id, key and headers travel as one NATS header, `Tidings`
  (JSON). A message some other NATS client published there reads with its own headers. A client-chosen id is also the `Nats-Msg-Id`: the server deduplicates it
  within `dedup_window` (the stream's duplicate window).
- `publish_many` is one atomic batch (`allow_atomic`, nats-server 2.12 or later): all
  messages are stored, with consecutive positions, or none.
- Reads are batched direct gets (`allow_direct`): one request, up to `limit` messages.
- A durable subscription is a small document (its settings, cursor and pending rows) in a
  second stream, `<stream>_state`, one subject per subscription holding only its last
  revision. Every fetch and settle reads the candidates, asks the same pure planner as
  every other engine (`plan_fetch`, `plan_settle`: per-key order, `max_in_flight`,
  leases, dead letters) and writes the new document back with
  `Nats-Expected-Last-Subject-Sequence`: a compare-and-set, so consumers in any number
  of processes never hold the same message within its lease. A dead-letter decision is
  stored in the document with the row's removal, then its letter is published under a
  deterministic `Nats-Msg-Id`, then the decision is cleared: a crash or a lost race in
  between publishes it again and the server drops the copy, and a consumer working from
  a stale copy can never dead-letter what another has acked (its write would conflict).
- Other processes hear of appends and settles through a core NATS subject (not stored).
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import contextlib
import functools
import hashlib
import itertools
import time as _time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from .. import topics as _topics
from ..errors import EngineUnavailable, InvalidArgument, PayloadTooLarge, Unsupported
from ..messages import MAX_POSITION, Message, OutMessage, Published, new_id
from .base import Engine, Retention, Settle, SubscriptionInfo, TopicInfo
from .delivery import (
    MAX_DELIVER,
    Dead,
    Pending,
    SubscriptionSpec,
    dead_letter_headers,
    plan_fetch,
    plan_settle,
)
from .retention import limit_cuts, plan_trim, trim_floor
from .store_base import StoreBackend

__all__ = ["JetStreamEngine"]

#: The most messages one atomic batch may hold (the server's default `max_msgs`).
MAX_BATCH = 1000
#: The one NATS header tidings adds: its envelope (id, key, the application's headers)
#: as JSON. One header, not one per field: NATS clients check and parse headers
#: character by character, and JSON carries any value (line breaks included).
_META = "Tidings"
_NS = 1_000_000_000
#: How long `open` waits for JetStream to answer (a cluster elects its leaders first).
OPEN_WAIT = 30.0
#: How long a fetch or settle keeps retrying a compare-and-set that others keep winning.
CAS_PATIENCE = 30.0


async def _backoff(tries: int) -> None:
    """A random pause that grows with the lost races (up to 50 ms): consumers in several
    processes that collide once do not collide again in lockstep."""
    import random

    await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2 ** min(tries, 6))))


class _Doc(msgspec.Struct, array_like=True, gc=False):
    """A subscription's stored state (see the module docstring)."""

    group: str
    pattern: str
    ack_wait: float
    max_deliver: int
    dead_letter: str | None
    ordered: bool
    max_in_flight: int
    cursor: int
    pending: list[tuple[int, str | None, int, float]]
    #: Rows decided dead whose dead letters may not be published yet: (position,
    #: attempts, reason). Recorded with the decision, published after, then cleared;
    #: whoever loads a document with some publishes them (their ids make that safe).
    dying: list[tuple[int, int, str]] = []


class _Meta(msgspec.Struct, array_like=True, gc=False):
    id: str
    key: str | None
    headers: dict[str, str] | None


_enc = msgspec.json.Encoder().encode


def _dec_meta(raw: str) -> tuple[str, str | None, dict[str, str] | None]:
    m = _meta_decoder(raw)
    return m.id, m.key, m.headers


_meta_decoder = msgspec.json.Decoder(_Meta).decode
_dec_doc = msgspec.json.Decoder(_Doc).decode
_dec_ret = msgspec.json.Decoder(dict[str, Any]).decode
_dec = msgspec.json.Decoder().decode


@dataclass(slots=True)
class _Sub:
    """This process's view of one durable subscription: its document and revision."""

    subject: str  # where its document lives
    spec: SubscriptionSpec
    cursor: int = 0
    pending: dict[int, Pending] | None = None  # None: not loaded
    rev: int = 0  # the document's sequence in the state stream (0: none stored)
    next_due: float | None = None  # the last fetch's plan: when a pending row is due
    lock: asyncio.Lock | None = None
    dying: list[tuple[int, int, str]] = field(default_factory=list)

    def doc(self) -> bytes:
        s = self.spec
        rows = [(p.position, p.key, p.attempt, p.due) for p in (self.pending or {}).values()]
        return _enc(_Doc(s.group, s.pattern, s.ack_wait, s.max_deliver, s.dead_letter,
                         s.ordered, s.max_in_flight, self.cursor, rows, self.dying))


class Conflict(Exception):
    """Someone else wrote a state-stream subject since we read it (`put_if`)."""


class _Deleted(Exception):
    """The subscription's document is gone (`delete_subscription`)."""


def _description(msg: Any) -> str:
    """A status message's description, without the headers nats-py leaves on it."""
    return str((msg.headers or {}).get("Description", "")).split("\n", 1)[0].strip()


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _parse_time(stamp: str) -> float:
    """A server time stamp (RFC 3339, nanoseconds) as seconds, cut to microseconds: the
    precision `Message.time` shows, so `start=msg.time` never starts after `msg`."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return _epoch(head) + int((frac + "000000")[:6]) / 1e6


@functools.lru_cache(maxsize=256)
def _epoch(head: str) -> int:
    """'2026-12-05T20:39:06' as seconds (cached: a read's messages share their seconds)."""
    return calendar.timegm(datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").timetuple())


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_server(version: str, servers: Sequence[str]) -> bool:
    """Whether the server takes atomic batches (2.12+); `Unsupported` below 2.11, which
    has no batched direct get for reads."""
    try:
        major, minor = (int(x) for x in version.lstrip("v").split(".")[:2])
    except ValueError:
        return True  # a build with an odd version string: assume it is current
    if (major, minor) < (2, 11):
        raise Unsupported(f"nats:// needs nats-server 2.11 or later (batched reads); "
                          f"{', '.join(servers)} runs {version}: upgrade it")
    return (major, minor) >= (2, 12)


def parse_servers(url: str) -> tuple[list[str], dict[str, str]]:
    """`nats://h1:4222,h2?opt=v` -> (["nats://h1:4222", "nats://h2:4222"], {"opt": "v"})."""
    from urllib.parse import parse_qsl

    scheme, _, rest = url.partition("://")
    hosts, _, query = rest.partition("?")
    hosts = hosts.rstrip("/")
    if not hosts:
        raise InvalidArgument(f"{url!r} names no server; use 'nats://host:4222' "
                              "(several: 'nats://h1:4222,h2:4222')")
    servers = []
    for h in hosts.split(","):
        h = h.strip()
        if not h:
            raise InvalidArgument(f"{url!r} has an empty server name between commas")
        if ":" not in h.rpartition("@")[2]:
            h += ":4222"
        servers.append(f"{scheme}://{h}")
    return servers, dict(parse_qsl(query))


class JetStreamEngine(Engine):
    """The log and durable subscriptions on NATS JetStream (see the module docstring)."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__()
        self.url = url
        self.servers, query = parse_servers(url)
        merged = {**query, **options}
        known = {"stream", "replicas", "dedup_window", "timeout", "connect_timeout"}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise InvalidArgument(f"nats:// does not take {', '.join(unknown)}; its options "
                                  f"are {', '.join(sorted(known))}")
        self.stream = str(merged.get("stream", "tidings"))
        if not _topics.is_token(self.stream) or len(self.stream) > 64:
            raise InvalidArgument(f"stream name {self.stream!r} must be one token of letters, "
                                  "digits, '_' or '-' (at most 64 characters)")
        self._replicas_given = "replicas" in merged
        self.replicas = int(merged.get("replicas", 1))
        if not 1 <= self.replicas <= 5:
            raise InvalidArgument(f"replicas must be from 1 to 5, got {self.replicas}")
        self.dedup_window = float(merged.get("dedup_window", 120.0))
        self.timeout = float(merged.get("timeout", 5.0))
        self.connect_timeout = float(merged.get("connect_timeout", 5.0))
        if not (self.dedup_window > 0 and self.timeout > 0 and self.connect_timeout > 0):
            raise InvalidArgument("dedup_window, timeout and connect_timeout must be > 0")
        self.state_stream = f"{self.stream}_state"
        self._token = new_id()
        self._nc: Any = None
        self._subs: dict[tuple[str, str], _Sub] = {}
        self._replies: dict[str, asyncio.Queue[Any]] = {}
        self._inbox = ""
        self._seq = itertools.count(1)
        #: The server takes atomic batches (nats-server 2.12+): `publish_many` needs them.
        self.atomic = True

    # subjects ----------------------------------------------------------------
    def subject(self, topic: str) -> str:
        return f"{self.stream}.{'s' if topic[0] == '$' else 'u'}.{topic}"

    def _filter(self, pattern: str) -> str:
        return f"{self.stream}.{'s' if pattern[0] == '$' else 'u'}.{pattern}"

    def _topic(self, subject: str) -> str:
        return subject[len(self.stream) + 3:]

    # lifecycle ---------------------------------------------------------------
    async def open(self) -> None:
        try:
            import nats
        except ImportError:  # pragma: no cover - an install without the extra
            raise Unsupported("nats:// needs the nats-py package: pip install "
                              "'tidings[nats]'") from None
        try:
            self._nc = await nats.connect(
                servers=self.servers, connect_timeout=self.connect_timeout,
                max_reconnect_attempts=2, reconnect_time_wait=0.25, name="tidings",
                allow_reconnect=True, error_cb=self._on_error,
            )
            # A few tries to connect at all (nats-py would try forever), then reconnect
            # for as long as it takes: requests meanwhile raise EngineUnavailable.
            self._nc.options["max_reconnect_attempts"] = -1
        except Exception as exc:
            raise EngineUnavailable(f"cannot reach NATS at {', '.join(self.servers)}: "
                                    f"{exc or type(exc).__name__}; is nats-server running "
                                    "with JetStream (-js)?") from None
        try:
            version = str(self._nc.connected_server_version)
            self.atomic = check_server(version, self.servers)
            self._inbox = self._nc.new_inbox()
            await self._nc.subscribe(self._inbox + ".*", cb=self._on_reply)
            await self._nc.subscribe(f"_tidings.{self.stream}.changed", cb=self._on_change)
            # A cluster just started (or between leaders) has no JetStream for a moment.
            deadline = _time.monotonic() + max(OPEN_WAIT, self.connect_timeout)
            while True:
                try:
                    await self._ensure_streams()
                    break
                except EngineUnavailable:
                    if _time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.25)
        except BaseException:
            await self.close()
            raise

    async def _ensure_streams(self) -> None:
        log_config: dict[str, Any] = {
            "subjects": [f"{self.stream}.>"], "allow_direct": True,
            "duplicate_window": int(self.dedup_window * _NS)}
        if self.atomic:
            log_config["allow_atomic"] = True
        await self._ensure_stream(self.stream, log_config)
        await self._ensure_stream(self.state_stream, {
            "subjects": [f"{self.state_stream}.>"], "allow_direct": True,
            "max_msgs_per_subject": 1,
        })

    async def _on_error(self, exc: Exception) -> None:
        return None  # reconnects are nats-py's; requests that fail raise EngineUnavailable

    async def _ensure_stream(self, name: str, config: dict[str, Any]) -> None:
        body = {"name": name, "storage": "file", "num_replicas": self.replicas,
                "retention": "limits", "discard": "old", **config}
        info = await self._api(f"STREAM.INFO.{name}", None, missing_ok=True)
        if info is None:
            await self._api(f"STREAM.CREATE.{name}", body)
            return
        have = info["config"]
        if not self._replicas_given:  # keep what the stream has (R3 stays R3)
            body["num_replicas"] = have.get("num_replicas", self.replicas)
        if any(have.get(k) != v for k, v in body.items() if k != "storage"):
            await self._api(f"STREAM.UPDATE.{name}", {**have, **body})

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
            with contextlib.suppress(Exception):
                await nc.close()

    def event_store(self) -> StoreBackend:
        raise Unsupported(
            "nats:// carries messages only; keep event streams, projections and sagas in a "
            "database and send their messages through NATS: "
            "connect('postgresql://…', broker='nats://…') or 'sqlite:///app.db?broker=nats://…'"
        )

    # requests ----------------------------------------------------------------
    def _conn(self) -> Any:
        if self._nc is None:
            raise EngineUnavailable("the NATS connection is closed")
        return self._nc

    async def _request(self, subject: str, data: bytes, headers: dict[str, str] | None = None
                       ) -> Any:
        import nats.errors

        try:
            return await self._conn().request(subject, data, timeout=self.timeout,
                                              headers=headers)
        except nats.errors.MaxPayloadError as exc:
            raise PayloadTooLarge(f"message too large for this NATS server ({exc}); raise the "
                                  "server's max_payload or send less") from None
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError,
                nats.errors.StaleConnectionError) as exc:
            raise EngineUnavailable(f"NATS did not answer {subject!r}: "
                                    f"{type(exc).__name__}; is the server (and JetStream) "
                                    "up?") from None

    async def _api(self, op: str, body: dict[str, Any] | None, missing_ok: bool = False
                   ) -> Any:
        msg = await self._request(f"$JS.API.{op}", _enc(body) if body is not None else b"")
        out = _dec(msg.data)
        err = out.get("error")
        if err:
            if missing_ok and err.get("code") == 404:
                return None
            raise EngineUnavailable(f"JetStream refused {op}: {err.get('description')} "
                                    f"(code {err.get('err_code')})")
        return out

    async def _on_reply(self, msg: Any) -> None:
        q = self._replies.get(msg.subject)
        if q is not None:
            q.put_nowait(msg)

    async def _on_change(self, msg: Any) -> None:
        try:
            who, topics, patterns = _dec(msg.data)
        except Exception:
            return
        if who != self._token:
            self._notify(topics, patterns)

    def _tell(self, topics: Sequence[str], patterns: Sequence[str] = ()) -> None:
        """Let other processes' waiters know (core NATS: fire and forget)."""
        nc = self._nc
        if nc is None:
            return
        data = _enc([self._token, list(topics), list(patterns)])
        task = asyncio.ensure_future(nc.publish(f"_tidings.{self.stream}.changed", data))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _get(self, stream: str, body: dict[str, Any]) -> list[Any]:
        """A (batched) direct get: the messages it returns, in order."""
        reply = f"{self._inbox}.{next(self._seq)}"
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._replies[reply] = q
        try:
            await self._conn().publish(f"$JS.API.DIRECT.GET.{stream}", _enc(body), reply=reply)
            out = []
            while True:
                try:
                    # (asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                    # cancellation that races with the answer, and the caller never stops)
                    async with asyncio.timeout(self.timeout):
                        msg = await q.get()
                except TimeoutError:
                    raise EngineUnavailable(f"NATS did not answer a read of {stream!r} in "
                                            f"{self.timeout:g} s; is the server up?") from None
                status = (msg.headers or {}).get("Status")
                if status is None:
                    out.append(msg)
                    if "batch" not in body:
                        return out
                elif status in ("204", "404"):
                    return out
                else:
                    raise EngineUnavailable(f"JetStream refused a read of {stream!r}: "
                                            f"{status} {_description(msg)}")
        finally:
            del self._replies[reply]

    def _message(self, m: Any, attempt: int = 0) -> Message:
        h = m.headers
        meta = h.get(_META)
        if meta is not None:
            mid, key, headers = _dec_meta(meta)
        else:  # published by something else than tidings: its own headers, lower-cased
            seq = h["Nats-Sequence"]
            mid, key = h.get("Nats-Msg-Id") or f"nats-{seq}", None
            headers = {k.lower(): v for k, v in h.items() if not k.startswith("Nats-")}
        return Message(mid, self._topic(h["Nats-Subject"]), key, m.data, headers or {},
                       _parse_time(h["Nats-Time-Stamp"]), int(h["Nats-Sequence"]), attempt)

    # the log -----------------------------------------------------------------
    def _headers(self, m: OutMessage) -> dict[str, str]:
        h = {_META: _enc(_Meta(m.id, m.key, m.headers or None)).decode()}
        if m.client_id:
            h["Nats-Msg-Id"] = m.id
        self._fits(m, h)
        return h

    async def append(self, messages: Sequence[OutMessage]) -> list[Published]:
        if not messages:
            return []
        if len(messages) == 1:
            out = [await self._publish_one(messages[0])]
        else:
            out = await self._publish_batch(messages)
        self._notify({m.topic for m in messages})
        self._tell(sorted({m.topic for m in messages}))
        return out

    async def publish_relayed(self, messages: Sequence[OutMessage]) -> None:
        """Store `messages` in this order, each once (every one has a client id): the
        outbox relay's way. One atomic batch (one round trip) when none of them is stored
        yet; when some are (a relay died before its checkpoint, or another relay got
        there first), one at a time in order, and the server drops the copies."""
        try:
            if self.atomic and 1 < len(messages) <= MAX_BATCH:
                await self._atomic(messages)
            else:
                raise Conflict
        except Conflict:  # one at a time, in order: a failure leaves no later one stored
            for m in messages:
                await self._publish_one(m)
        topics = sorted({m.topic for m in messages})
        self._notify(topics)
        self._tell(topics)

    def _ack(self, msg: Any, what: str) -> dict[str, Any]:
        out: dict[str, Any] = _dec(msg.data)
        err = out.get("error")
        if err:
            raise EngineUnavailable(f"JetStream refused {what}: {err.get('description')} "
                                    f"(code {err.get('err_code')})")
        return out

    def max_message(self) -> int:
        """The largest message the server takes, headers included (0: not connected)."""
        return int(getattr(self._nc, "max_payload", 0) or 0)

    def fits(self, m: OutMessage) -> bool:
        """Whether the server takes `m` (its data and tidings' header, together). Most
        messages are far below the limit: a bound on their size answers without encoding
        the header (JSON escapes a character into at most 6)."""
        limit = self.max_message()
        parts = sum(len(k) + len(v) + 6 for k, v in (m.headers or {}).items())
        if not limit or len(m.data) + 6 * (parts + len(m.id) + len(m.key or "")) + 256 <= limit:
            return True
        try:
            self._headers(m)
        except PayloadTooLarge:
            return False
        return True

    def _fits(self, m: OutMessage, headers: dict[str, str]) -> None:
        """PayloadTooLarge for a message the server would refuse (it would also drop the
        connection): its max_payload counts the data and the headers together."""
        limit = self.max_message()
        size = len(m.data) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 12
        if limit and size > limit:
            raise PayloadTooLarge(
                f"a message of {len(m.data)} bytes plus headers is more than this NATS "
                f"server takes ({limit} bytes, its max_payload); raise max_payload in the "
                "server's configuration (e.g. 'max_payload: 8MB') or send less")

    async def _publish_one(self, m: OutMessage) -> Published:
        ack = self._ack(await self._request(self.subject(m.topic), m.data, self._headers(m)),
                        "a publish")
        return Published(int(ack["seq"]), m.id, bool(ack.get("duplicate")))

    async def _publish_batch(self, messages: Sequence[OutMessage]) -> list[Published]:
        if not self.atomic:
            raise Unsupported(
                "publish_many is atomic, and atomic batches need nats-server 2.12 or later "
                "(this one is older); upgrade the server, or publish one at a time")
        if len(messages) > MAX_BATCH:
            raise InvalidArgument(f"publish_many on nats:// stores at most {MAX_BATCH} "
                                  f"messages atomically, got {len(messages)}; split the batch")
        # A client id seen earlier in this batch is a duplicate of that one.
        first: dict[str, int] = {}
        send: list[OutMessage] = []
        index: list[int] = []  # for each message: its place in `send`, or -1 - earlier
        for m in messages:
            if m.client_id and m.id in first:
                index.append(-1 - first[m.id])
                continue
            if m.client_id:
                first[m.id] = len(send)
            index.append(len(send))
            send.append(m)
        known: dict[str, int] = {}
        positions: dict[str, int] = {}
        for _ in range(3):
            todo = [m for m in send if m.id not in known]
            if not todo:
                break
            try:
                last = await self._atomic(todo)
            except Conflict:  # a client id the server has seen: find where it went
                known = await self._known_ids(send)
                continue
            base = last - len(todo) + 1
            for i, m in enumerate(todo):
                positions[m.id] = base + i
            break
        else:
            raise EngineUnavailable("JetStream kept refusing a batch as a duplicate; retry")
        out = []
        for m, at in zip(messages, index, strict=True):
            if at < 0:
                p = send[-1 - at]
                pos = known.get(p.id) or positions[p.id]
                out.append(Published(pos, m.id, True))
            elif m.id in known:
                out.append(Published(known[m.id], m.id, True))
            else:
                out.append(Published(positions[m.id], m.id, False))
        return out

    async def _atomic(self, todo: Sequence[OutMessage]) -> int:
        """Publish `todo` as one atomic batch; the last message's position."""
        nc = self._conn()
        batch = new_id()
        n = len(todo)
        for i, m in enumerate(todo[:-1], 1):
            h = self._headers(m)
            h["Nats-Batch-Id"], h["Nats-Batch-Sequence"] = batch, str(i)
            await nc.publish(self.subject(m.topic), m.data, headers=h)
        m = todo[-1]
        h = self._headers(m)
        h["Nats-Batch-Id"], h["Nats-Batch-Sequence"] = batch, str(n)
        h["Nats-Batch-Commit"] = "1"
        out = _dec((await self._request(self.subject(m.topic), m.data, h)).data)
        err = out.get("error")
        if err:
            if err.get("err_code") == 10201:  # a duplicate message id
                raise Conflict
            raise EngineUnavailable(f"JetStream refused an atomic batch: "
                                    f"{err.get('description')} (code {err.get('err_code')}); "
                                    "nothing of it was stored")
        return int(out["seq"])

    async def _known_ids(self, send: Sequence[OutMessage]) -> dict[str, int]:
        """Where the client ids of `send` already stored within the window went (a scan of
        the window: only a retried batch gets here)."""
        wanted = {m.id for m in send if m.client_id}
        found: dict[str, int] = {}
        # The server deduplicates across the whole stream: look at every topic. A minute
        # more than the window covers clocks that differ between here and the server.
        every = f"{self.stream}.>"
        body: dict[str, Any] = {"start_time": _iso(_time.time() - self.dedup_window - 60),
                                "next_by_subj": every, "batch": 1000}
        while True:
            got = await self._get(self.stream, body)
            for g in got:
                i = g.headers.get("Nats-Msg-Id")
                if i in wanted and i not in found:
                    found[i] = int(g.headers["Nats-Sequence"])
            if len(got) < 1000 or len(found) == len(wanted):
                return found
            body = {"seq": int(got[-1].headers["Nats-Sequence"]) + 1, "next_by_subj": every,
                    "batch": 1000}

    async def read(self, pattern: str, after: int, stop: int | None, limit: int
                   ) -> list[Message]:
        if limit <= 0 or (stop is not None and stop <= after):
            return []
        got = await self._get(self.stream, {"seq": after + 1, "next_by_subj":
                                            self._filter(pattern), "batch": min(limit, 10_000)})
        out = [self._message(m) for m in got]
        rx = _topics.matcher(pattern)
        return [m for m in out if (stop is None or m.position <= stop) and rx.match(m.topic)]

    async def last_position(self) -> int:
        info = await self._api(f"STREAM.INFO.{self.stream}", None)
        return int(info["state"]["last_seq"])

    async def position_before(self, timestamp: float) -> int:
        if timestamp <= 0:
            return 0
        try:
            stamp = _iso(timestamp)
        except (OverflowError, OSError, ValueError):
            return await self.last_position()
        got = await self._get(self.stream, {"start_time": stamp,
                                            "next_by_subj": f"{self.stream}.>", "batch": 1})
        if not got:
            return await self.last_position()
        return int(got[0].headers["Nats-Sequence"]) - 1

    # subscriptions -----------------------------------------------------------
    def _sub_subject(self, group: str, pattern: str) -> str:
        return f"{self.state_stream}.sub.{_b64(group)}.{_b64(pattern)}"

    async def _last(self, subject: str) -> tuple[bytes, int] | None:
        """The last message on `subject` of the state stream and its sequence, as the
        stream's leader has it (a direct get may be answered by a follower a moment
        behind, and a compare-and-set on what it said would only fail)."""
        out = await self._api(f"STREAM.MSG.GET.{self.state_stream}",
                              {"last_by_subj": subject}, missing_ok=True)
        if out is None:
            return None
        m = out["message"]
        return base64.b64decode(m.get("data") or b""), int(m["seq"])

    async def _load(self, sub: _Sub) -> None:
        got = await self._last(sub.subject)
        if got is None:
            if sub.rev > 0:  # it existed and is gone: deleted, and not ours to bring back
                raise _Deleted
            sub.pending, sub.rev = {}, 0
            return
        d = _dec_doc(got[0])
        sub.rev = got[1]
        sub.cursor = d.cursor
        sub.dying = list(d.dying)
        sub.pending = {p[0]: Pending(p[0], p[1], p[2], p[3]) for p in d.pending}

    async def put_if(self, subject: str, data: bytes, rev: int) -> int:
        """Write `data` as the one message of `subject` in the state stream if its last
        revision is still `rev` (0: none yet): a compare-and-set. The new revision, or
        `Conflict` when someone wrote it since."""
        msg = await self._request(subject, data,
                                  {"Nats-Expected-Last-Subject-Sequence": str(rev)})
        out = _dec(msg.data)
        err = out.get("error")
        if err:
            if err.get("err_code") in (10071, 10164):  # wrong last sequence (a cluster: 10164)
                raise Conflict
            raise EngineUnavailable(f"JetStream refused a write of {subject!r}: "
                                    f"{err.get('description')} (code {err.get('err_code')})")
        return int(out["seq"])

    async def _store(self, sub: _Sub) -> None:
        """Write the document if nobody did since we read it (else `Conflict`)."""
        sub.rev = await self.put_if(sub.subject, sub.doc(), sub.rev)

    async def subscribe(self, spec: SubscriptionSpec, start_after: int | None) -> Any:
        key = (spec.group, spec.pattern)
        sub = self._subs.get(key)
        if sub is None:
            sub = self._subs[key] = _Sub(self._sub_subject(*key), spec, lock=asyncio.Lock())
        assert sub.lock is not None
        async with sub.lock:
            deadline = _time.monotonic() + CAS_PATIENCE
            for tries in itertools.count():
                await self._load(sub)
                sub.spec = spec
                if sub.rev == 0:
                    sub.cursor = start_after or 0
                try:
                    await self._store(sub)
                    return key
                except Conflict:
                    if _time.monotonic() > deadline:
                        break
                    await _backoff(tries)
        raise EngineUnavailable("could not store the subscription: others kept changing it")

    async def _change(self, handle: Any, settles: Sequence[Settle], now: float,
                      limit: int) -> list[Message]:
        """Apply `settles` and (with `limit`) claim messages, as one compare-and-set."""
        sub = self._subs.get(handle)
        if sub is None:
            return []
        assert sub.lock is not None
        async with sub.lock:
            deadline = _time.monotonic() + CAS_PATIENCE
            for tries in itertools.count():
                try:
                    if sub.pending is None:
                        await self._load(sub)
                except _Deleted:
                    self._subs.pop(handle, None)
                    return []  # as on every engine: a deleted subscription gives nothing
                try:
                    return await self._try(sub, settles, now, limit)
                except Conflict:
                    sub.pending = None  # somebody else moved it: read it again
                if _time.monotonic() > deadline:
                    break
                await _backoff(tries)
        raise EngineUnavailable(f"subscription {sub.spec.group!r} was changed by others on "
                                f"every try for {CAS_PATIENCE:g} s; retry")

    async def _try(self, sub: _Sub, settles: Sequence[Settle], now: float, limit: int
                   ) -> list[Message]:
        spec = sub.spec
        pending = dict(sub.pending or {})
        cursor = sub.cursor
        dead: list[Dead] = []
        if settles:
            sp = plan_settle(spec, pending, settles, now)
            for position in sp.delete:
                del pending[position]
            for row in sp.update:
                pending[row.position] = row
            for d in sp.dead:
                del pending[d.row.position]
            dead.extend(sp.dead)
        found: list[Message] = []
        plan = None
        if limit > 0:
            rows = [Pending(p.position, p.key, p.attempt, p.due) for p in pending.values()]
            want = min(limit, spec.max_in_flight)
            dying = sum(1 for p in rows if p.attempt >= spec.max_deliver and p.due <= now)
            if len(rows) - dying < spec.max_in_flight:  # room: look at the log
                found = await self.read(spec.pattern, cursor, None, want)
            plan = plan_fetch(spec, rows, [(m.position, m.key) for m in found],
                              cursor=cursor, now=now, limit=limit)
            for p in plan.dead:
                del pending[p.position]
                dead.append(Dead(p, MAX_DELIVER))
            for p in plan.added:
                pending[p.position] = p
            for p in plan.deliver:
                pending[p.position] = p
            cursor = plan.cursor
        if plan is not None:
            sub.next_due = plan.next_due
        if not settles and not sub.dying and (plan is None or (
                not plan.deliver and not plan.added and not plan.dead)):
            return []  # nothing changed: nothing to write
        old = sub.pending, sub.cursor, sub.dying
        sub.pending, sub.cursor = pending, cursor
        if dead and spec.dead_letter is not None:  # the decision first, with the rows
            # (a reason is one label without "\n": an error rides after it, and documents
            # written before errors existed read the same)
            sub.dying = [*sub.dying, *((d.row.position, d.row.attempt,
                                        d.reason if not d.error else f"{d.reason}\n{d.error}")
                                       for d in dead)]
        try:
            await self._store(sub)
        except BaseException:
            sub.pending, sub.cursor, sub.dying = old
            raise
        if sub.dying:  # then the letters (whoever wrote the decision), then forget them
            await self._dead_letters(spec, sub.dying, {m.position: m for m in found})
            sub.dying = []
            try:
                await self._store(sub)
            except Conflict:
                sub.pending = None  # the next change reads it again (and publishes again)
        if settles or dead:
            self._notify((spec.dead_letter,) if dead and spec.dead_letter else (),
                         (spec.pattern,))
            self._tell((spec.dead_letter,) if dead and spec.dead_letter else (),
                       (spec.pattern,))
        if plan is None or not plan.deliver:
            return []
        by_pos = {m.position: m for m in found}
        missing = [p.position for p in plan.deliver if p.position not in by_pos]
        for position in missing:  # redeliveries: read them back, one request each
            got = await self._get(self.stream, {"seq": position})
            if got:
                by_pos[position] = self._message(got[0])
        out = []
        for p in plan.deliver:
            m = by_pos.get(p.position)
            if m is not None:
                m.attempt = p.attempt
                out.append(m)
        return out

    async def _dead_letters(self, spec: SubscriptionSpec,
                            dying: Sequence[tuple[int, int, str]],
                            known: dict[int, Message]) -> None:
        """Publish the dead letters of decisions already stored, each under an id derived
        from its subscription, position and attempt: publishing one again (a retry, or
        another process that loaded the decision) is deduplicated by the server."""
        if spec.dead_letter is None:
            return
        tag = hashlib.sha1(f"{spec.group}\0{spec.pattern}".encode()).hexdigest()[:16]
        for position, attempts, why in dying:
            reason, _, error = why.partition("\n")
            m = known.get(position)
            if m is None:
                got = await self._get(self.stream, {"seq": position})
                if not got:
                    continue  # trimmed: nothing to dead-letter
                m = self._message(got[0])
            headers = dead_letter_headers(
                m.headers, topic=m.topic, id=m.id, position=m.position, group=spec.group,
                reason=reason, attempts=attempts, error=error or None)
            out = OutMessage(f"dl-{tag}-{m.position}-{attempts}", spec.dead_letter,
                             m.key, m.data, headers, client_id=True)
            await self._publish_one(out)

    async def fetch(self, handle: Any, limit: int, now: float, settles: Sequence[Settle] = ()
                    ) -> tuple[list[Message], float | None]:
        msgs = await self._change(handle, settles, now, max(1, limit))
        sub = self._subs.get(handle)
        return msgs, (sub.next_due if sub is not None else None)

    async def settle(self, handle: Any, items: Sequence[Settle], now: float) -> None:
        for s in items:
            if not 0 <= s.position <= MAX_POSITION:
                raise InvalidArgument(f"position {s.position} is out of range")
        if items:
            await self._change(handle, items, now, 0)

    async def delete_subscription(self, group: str, pattern: str) -> bool:
        subject = self._sub_subject(group, pattern)
        self._subs.pop((group, pattern), None)
        got = await self._get(self.state_stream, {"last_by_subj": subject})
        if not got:
            return False
        await self._api(f"STREAM.PURGE.{self.state_stream}", {"filter": subject})
        return True

    async def _docs(self) -> list[_Doc]:
        info = await self._api(f"STREAM.INFO.{self.state_stream}",
                               {"subjects_filter": f"{self.state_stream}.sub.>"})
        subjects = sorted(info["state"].get("subjects") or {})
        out = []
        for s in subjects:
            got = await self._get(self.state_stream, {"last_by_subj": s})
            if got:
                out.append(_dec_doc(got[0].data))
        return out

    # retention ---------------------------------------------------------------
    def _ret_subject(self, topic: str) -> str:
        return f"{self.state_stream}.ret.{_b64(topic)}"

    async def set_retention(self, topic: str, retention: Retention) -> None:
        body = _enc({"topic": topic, "max_age": retention.max_age,
                     "max_messages": retention.max_messages, "max_bytes": retention.max_bytes})
        self._ack(await self._request(self._ret_subject(topic), body), "a retention setting")

    async def _retentions(self) -> dict[str, Retention]:
        info = await self._api(f"STREAM.INFO.{self.state_stream}",
                               {"subjects_filter": f"{self.state_stream}.ret.>"})
        out = {}
        for s in sorted(info["state"].get("subjects") or {}):
            got = await self._get(self.state_stream, {"last_by_subj": s})
            if got:
                d = _dec_ret(got[0].data)
                out[d["topic"]] = Retention(d["max_age"], d["max_messages"], d["max_bytes"])
        return out

    async def _scan(self, topic: str) -> list[tuple[int, float, int]]:
        """(position, time, size) of every stored message of `topic`, oldest first."""
        out: list[tuple[int, float, int]] = []
        seq = 1
        while True:
            got = await self._get(self.stream, {"seq": seq, "next_by_subj": self.subject(topic),
                                                "batch": 1000})
            for g in got:
                h = g.headers
                out.append((int(h["Nats-Sequence"]), _parse_time(h["Nats-Time-Stamp"]),
                            len(g.data)))
            if len(got) < 1000:
                return out
            seq = out[-1][0] + 1

    async def trim(self, now: float) -> int:
        retentions = await self._retentions()
        if not retentions:
            return 0
        subs = [(d.pattern, d.cursor, min((p[0] for p in d.pending), default=None))
                for d in await self._docs()]
        removed = 0
        for topic, r in retentions.items():
            rows = await self._scan(topic)
            if not rows:
                continue
            cut = plan_trim(r, limit_cuts(r, reversed(rows), now), trim_floor(topic, subs)).cut
            if cut is None:
                continue
            out = await self._api(f"STREAM.PURGE.{self.stream}",
                                  {"filter": self.subject(topic), "seq": cut + 1})
            removed += int(out.get("purged", 0))
        return removed

    async def topics(self) -> list[TopicInfo]:
        info = await self._api(f"STREAM.INFO.{self.stream}",
                               {"subjects_filter": f"{self.stream}.>"})
        out = []
        for subject in sorted(info["state"].get("subjects") or {}):
            topic = self._topic(subject)
            rows = await self._scan(topic)
            if rows:
                out.append(TopicInfo(topic, len(rows), sum(r[2] for r in rows), rows[0][0],
                                     rows[-1][0]))
        return sorted(out, key=lambda t: t.topic)

    async def subscriptions(self) -> list[SubscriptionInfo]:
        out = []
        now = _time.time()
        for d in await self._docs():
            got = await self._get(self.stream, {"seq": d.cursor + 1, "batch": 1,
                                                "next_by_subj": self._filter(d.pattern)})
            lag = 1 + int(got[0].headers.get("Nats-Num-Pending", 0)) if got else 0
            out.append(SubscriptionInfo(
                d.group, d.pattern, d.cursor, len(d.pending),
                sum(1 for p in d.pending if p[2] and p[3] > now),
                lag + len(d.pending), d.ordered, d.max_in_flight, d.dead_letter))
        return sorted(out, key=lambda s: (s.group, s.pattern))
