"""The event store: streams with optimistic concurrency, one global order, live subscriptions.

Guarantees (on every engine):

- an append stores all its events or none, and only if the stream is at the
  expected version (else `ConcurrencyError`, nothing stored);
- each event gets the next version of its stream (no gap, no duplicate) and
  a global position; positions are never filled in late, so a reader that has
  seen position N never later finds an event below N appear;
- each event is also published as a message on a topic in the same
  transaction (no dual write);
- stored events are never updated or deleted (there is no API for it, and
  the SQL engines refuse it with triggers).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sys
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from .. import topics as _topics
from ..engines.store_base import EventRow, NewRecord, SnapshotRow, StoreBackend
from ..errors import EventIdConflict, InvalidArgument, InvalidEvent, PayloadTooLarge
from ..messages import check_headers, new_id
from .events import TRUSTED, TypeResolver, encode_event, validate_raw
from .records import (
    ANY,
    Appended,
    CaughtUp,
    NewEvent,
    RecordedEvent,
    _Any,
    check_stream_id,
)

if TYPE_CHECKING:
    from ..hub import Hub

__all__ = ["EventStore", "audit", "store_for"]

_enc = msgspec.json.Encoder().encode
_AUDIT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "tidings_audit", default=None
)
_DEFAULT_RESOLVER = TypeResolver()
_PAGE = 1000


@contextlib.contextmanager
def audit(*, actor: str | None = None, correlation_id: str | None = None,
          causation_id: str | None = None, **headers: str) -> Iterator[None]:
    """Headers added to every event appended inside this block (who, and as part of what).

    `actor` is who asked, `correlation_id` ties together everything one request
    caused, `causation_id` is the id of the message or event that caused it.
    Explicit headers on an append win over these.
    """
    h = dict(_AUDIT.get() or {})
    for k, v in (("actor", actor), ("correlation-id", correlation_id),
                 ("causation-id", causation_id)):
        if v is not None:
            h[k] = v
    h.update({k.replace("_", "-").lower(): v for k, v in headers.items()})
    token = _AUDIT.set(h)
    try:
        yield
    finally:
        _AUDIT.reset(token)


#: Aggregate states a process keeps (the least recently saved go first).
STATES_KEPT = 10_000
STATES_BYTES = 64 * 1024 * 1024


def _size(agg: Any) -> int:
    """A rough size of a kept aggregate (its attributes, one level deep)."""
    d = agg.__dict__
    return int(sys.getsizeof(d) + sum(map(sys.getsizeof, d.values())))


def default_topic(stream_id: str) -> str:
    """The stream's category (the part before the first '-'), or 'events' if not a topic name."""
    category = stream_id.split("-", 1)[0]
    try:
        return _topics.validate_topic(category)
    except InvalidArgument:
        return "events"


class EventStore:
    """Event streams on the hub's engine (get it as `hub.events`)."""

    def __init__(self, hub: Hub, backend: StoreBackend) -> None:
        self._hub = hub
        self.backend = backend
        # (aggregate class, snapshot_every) -> its repository (see Hub.repository)
        self._repositories: dict[tuple[type, int | None, type], Any] = {}
        # stream id -> (the aggregate this process last saved, its version then, its
        # size): a load copies it, checks the stream's version and replays what is newer
        self.states: OrderedDict[str, tuple[Any, int, int]] = OrderedDict()
        self._states_bytes = 0

    def drop_cached(self) -> None:
        """Drop the kept aggregate states: the next loads read the store."""
        self.states.clear()
        self._states_bytes = 0

    def cache(self, agg: Any) -> None:
        """Keep the aggregate just saved (see `Repository.get`). Kept by reference, not
        copied: a load copies it, and only if it is still as saved (same version,
        nothing pending) — an aggregate changes only through the events it records."""
        states = self.states
        old = states.pop(agg.id, None)
        if old is not None:
            self._states_bytes -= old[2]
        size = _size(agg)
        states[agg.id] = (agg, agg.version, size)
        self._states_bytes += size
        while states and (len(states) > STATES_KEPT or self._states_bytes > STATES_BYTES):
            _, gone = states.popitem(last=False)
            self._states_bytes -= gone[2]

    def cached(self, stream_id: str) -> Any:
        """The aggregate last saved to `stream_id` here, if it is unchanged since."""
        entry = self.states.get(stream_id)
        if entry is None:
            return None
        agg, version, _ = entry
        if agg.version != version or agg._pending or agg.__dict__.get("_unsound"):
            return None  # changed since (events recorded, or an apply that failed)
        return agg

    @property
    def hub(self) -> Hub:
        return self._hub

    # writing -------------------------------------------------------------------
    def _records(self, events: Iterable[object], headers: Mapping[str, str] | None
                 ) -> list[NewRecord]:
        return self._records_with(events, {**self.audit_headers(),
                                           **check_headers(headers, "append")})

    def audit_headers(self) -> dict[str, str]:
        """The headers `audit()` adds to appends in this context, and with tracing on the
        current trace context (so an event, and the message it is published as, carry
        the trace of what appended it)."""
        out = dict(_AUDIT.get() or {})
        tel = self._hub.telemetry
        if tel is not None:
            tel.inject(out)
        return out

    def _records_with(self, events: Iterable[object], common: dict[str, str]
                      ) -> list[NewRecord]:
        """Records of `events`, each with the (checked) `common` headers."""
        limit = self._hub.max_payload
        records: list[NewRecord] = []
        given = False  # ids given by the caller (new ones are unique)
        for ev in events:
            r = self._record(ev, common, limit)
            if not records and not common.get("correlation-id"):
                # the first event's id correlates the append (an event's own header wins)
                common = {**common, "correlation-id": r.id}
                r.headers.setdefault("correlation-id", r.id)
            records.append(r)
            given = given or (type(ev) is NewEvent and ev.id is not None)
        if given and len({r.id for r in records}) != len(records):
            raise EventIdConflict("two events in one append share an id; give each event its "
                                  "own id")
        return records

    @staticmethod
    def _record(ev: object, common: dict[str, str], limit: int) -> NewRecord:
        trusted = TRUSTED.get(type(ev))
        if trusted is not None:
            try:
                data = _enc(ev)
            except (TypeError, msgspec.EncodeError) as exc:
                raise InvalidEvent(f"{type(ev).__name__} is not JSON-able: {exc}") from None
            return _checked(NewRecord(new_id(), trusted[0], trusted[1], data, dict(common)),
                            limit)
        if type(ev) is NewEvent and ev._encoded is not None and ev.headers is None:
            _, name, version, data = ev._encoded  # recorded by an aggregate: checked already
            return _checked(NewRecord(_event_id(ev.id), name, version, data, dict(common)), limit)
        eid: str | None = None
        encoded = None
        h = dict(common)
        if isinstance(ev, NewEvent):
            eid = ev.id
            encoded = ev._encoded
            h.update(check_headers(ev.headers, "event"))
            if ev.event is not None:
                ev = ev.event
            else:
                if not isinstance(ev.type, str) or not ev.type or len(ev.type) > 255:
                    raise InvalidEvent(
                        "a NewEvent needs a typed event, or a type name (1 to 255 characters) "
                        "and data"
                    )
                raw = ev.data
                if isinstance(raw, (bytes, bytearray, memoryview)):
                    data = bytes(raw)
                elif isinstance(raw, Mapping):
                    try:
                        data = _enc(raw)
                    except (TypeError, msgspec.EncodeError) as exc:
                        raise InvalidEvent(f"event data is not JSON-able: {exc}") from None
                else:
                    raise InvalidEvent(
                        f"event data of type {ev.type!r} must be a dict or JSON bytes, "
                        f"got {type(raw).__name__}"
                    )
                type_name = ev.type
                version = validate_raw(type_name, data)
                return _checked(NewRecord(_event_id(eid), type_name, version, data, h), limit)
        elif isinstance(ev, (dict, bytes, str, list)) or ev is None:
            raise InvalidEvent(
                f"cannot append a {type(ev).__name__} as an event; pass typed events "
                "(tidings.Event subclasses or dataclasses) or tidings.NewEvent(type=..., data=...)"
            )
        _, name, version, data = encoded or encode_event(ev)
        return _checked(NewRecord(_event_id(eid), name, version, data, h), limit)

    async def append(
        self,
        stream_id: str,
        events: Iterable[object],
        *,
        expected_version: int | _Any = ANY,
        topic: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Appended:
        """Append events to a stream, all or none, if it is at `expected_version`.

        `expected_version` is the version the stream must be at (`NO_STREAM`,
        i.e. 0: it must not exist yet) or `ANY`. A mismatch raises
        `ConcurrencyError` naming the stream, the expected and the actual
        version. Each event is also published as a message on `topic`
        (default: the stream's category, the part of its id before the first
        '-') with the stream id as key, in the same transaction.
        """
        return await self._append(stream_id, events, expected_version, topic, headers, None)

    async def _append(
        self,
        stream_id: str,
        events: Iterable[object],
        expected_version: int | _Any | str,
        topic: str | None,
        headers: Mapping[str, str] | None,
        snapshot: SnapshotRow | None,
    ) -> Appended:
        self._hub.check_open()
        check_stream_id(stream_id)
        expected = _expected(expected_version)
        if topic is None:
            topic = default_topic(stream_id)
        else:
            _topics.validate_topic(topic)
        records = self._records(events, headers)
        if not records:
            raise InvalidArgument("append needs at least one event")
        out = await self.backend.append(stream_id, records, expected, topic, snapshot)
        self._hub.counters.on_append(topic, 0 if out.duplicate else len(records))
        return Appended(stream_id, out.version, out.positions, out.duplicate)

    # reading -------------------------------------------------------------------
    def read(
        self,
        stream_id: str,
        from_version: int = 1,
        to_version: int | None = None,
        *,
        raw: bool = False,
        resolver: TypeResolver | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """The stream's events from `from_version` to `to_version` (inclusive), in order.

        Each event is decoded as it is read (an unregistered type raises
        `UnknownEventType`); with `raw=True` nothing is decoded until you ask
        (`rec.event`), and `rec.data` / `rec.json()` give the stored data.
        """
        self._hub.check_open()
        check_stream_id(stream_id)
        _check_int("from_version", from_version, 1)
        if to_version is not None:
            _check_int("to_version", to_version, 0)
        return self._read(stream_id, from_version, to_version, raw, resolver or _DEFAULT_RESOLVER)

    async def _read(self, stream_id: str, from_version: int, to_version: int | None, raw: bool,
                    resolver: TypeResolver) -> AsyncIterator[RecordedEvent]:
        version = from_version
        while True:
            rows = await self.backend.read_stream(stream_id, version, to_version, _PAGE)
            for row in rows:
                rec = RecordedEvent(row, resolver)
                if not raw:
                    rec.event  # noqa: B018 - decode now, so a bad event fails the read
                yield rec
            if len(rows) < _PAGE:
                return
            version = rows[-1][2] + 1

    def read_all(
        self,
        from_position: int = 1,
        to_position: int | None = None,
        *,
        raw: bool = False,
        page: int = _PAGE,
        resolver: TypeResolver | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """Every stream's events in global order, from `from_position` (inclusive).

        Ends at the last event stored when called (or at `to_position`).
        Decoding works as in `read` (`raw=True` for a fast scan that decodes
        only the events you touch).
        """
        self._hub.check_open()
        _check_int("from_position", from_position, 1)
        _check_int("page", page, 1)
        return self._read_all(from_position, to_position, page, raw,
                              resolver or _DEFAULT_RESOLVER)

    async def _read_all(self, from_position: int, to_position: int | None, page: int, raw: bool,
                        resolver: TypeResolver) -> AsyncIterator[RecordedEvent]:
        backend = self.backend
        end = to_position if to_position is not None else await backend.last_position()
        after = from_position - 1
        if after >= end:
            return
        # The next page is read (on the engine's reader) while this one is consumed.
        ahead: asyncio.Future[list[EventRow]] | None = asyncio.ensure_future(
            backend.read_all(after, end, page))
        try:
            while ahead is not None:
                rows = await ahead
                ahead = None
                if not rows:
                    return
                after = rows[-1][0]
                if len(rows) == page and after < end:
                    ahead = asyncio.ensure_future(backend.read_all(after, end, page))
                if raw:
                    for row in rows:
                        yield RecordedEvent(row, resolver)
                    continue
                for row in rows:
                    rec = RecordedEvent(row, resolver)
                    rec.event  # noqa: B018 - decode now, so a bad event fails the read
                    yield rec
        finally:
            if ahead is not None:
                ahead.cancel()
                ahead.add_done_callback(_consume)

    def subscribe_all(
        self,
        from_position: int = 1,
        *,
        markers: bool = False,
        page: int = _PAGE,
        resolver: TypeResolver | None = None,
    ) -> AllSubscription:
        """Every event in global order from `from_position`: the history, then live, forever.

        No gap and no duplicate at the switch from history to live (both read
        by position, and positions are never filled in late). `sub.caught_up`
        is set once it has delivered everything stored; with `markers=True` a
        `CaughtUp(position)` is also yielded at that point, once.
        """
        self._hub.check_open()
        _check_int("from_position", from_position, 1)
        _check_int("page", page, 1)
        return AllSubscription(self, from_position, markers, page,
                               resolver or _DEFAULT_RESOLVER)

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version (0: no such stream)."""
        self._hub.check_open()
        return await self.backend.stream_version(check_stream_id(stream_id))

    async def last_position(self) -> int:
        """The global position of the newest event (0: none yet)."""
        self._hub.check_open()
        return await self.backend.last_position()


class AllSubscription:
    """An async iterator over all events, catching up then following live.

    `position` is the last delivered position; `caught_up` (an asyncio.Event)
    is set once everything stored has been delivered.
    """

    def __init__(self, store: EventStore, from_position: int, markers: bool, page: int,
                 resolver: TypeResolver) -> None:
        self._store = store
        self.position = from_position - 1
        self.caught_up = asyncio.Event()
        self._markers = markers
        self._page = page
        self._resolver = resolver
        self._closed = False
        self._it = self._run()

    def __aiter__(self) -> AllSubscription:
        return self

    async def __anext__(self) -> Any:
        return await self._it.__anext__()

    async def _run(self) -> AsyncGenerator[Any, None]:
        store = self._store
        hub = store._hub
        engine = hub.engine
        backend = store.backend
        while not self._closed:
            if hub.closed:
                return
            changed = engine.changes()  # taken before looking, so no wake-up is missed
            rows = await backend.read_all(self.position, None, self._page)
            for row in rows:
                self.position = row[0]
                yield RecordedEvent(row, self._resolver)
            if rows:
                continue
            if not self.caught_up.is_set():
                self.caught_up.set()
                if self._markers:
                    yield CaughtUp(self.position)
            await engine.wait(changed, 1.0)

    async def close(self) -> None:
        """Stop the iteration (an `async for` over it ends)."""
        self._closed = True
        await self._it.aclose()

    aclose = close  # so `contextlib.aclosing(sub)` works too

    async def __aenter__(self) -> AllSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _checked(r: NewRecord, limit: int) -> NewRecord:
    if len(r.data) > limit:
        raise PayloadTooLarge(
            f"event {r.type!r} is {len(r.data)} bytes, over the limit of {limit}; keep events "
            "small (store blobs elsewhere and record a reference) or raise max_payload"
        )
    return r


def _event_id(eid: str | None) -> str:
    if eid is None:
        return new_id()
    if not isinstance(eid, str) or not eid or len(eid) > 255:
        raise InvalidEvent(f"event id must be a non-empty str of at most 255 characters, "
                           f"got {eid!r}")
    return eid


_MAX_INT = 2**63 - 1  # what SQL integers hold


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= _MAX_INT:
        raise InvalidArgument(f"{name} must be an int from {low} to {_MAX_INT}, got {value!r}")


def _expected(value: object) -> int | None:
    if value is ANY or value == "any":
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(
            f"expected_version must be an int >= 0, NO_STREAM (0) or ANY, got {value!r}"
        )
    return value


def store_for(hub: Hub) -> EventStore:
    """The hub's event store (one per hub)."""
    return hub.extension(EventStore, lambda h: EventStore(h, h.engine.event_store()))
