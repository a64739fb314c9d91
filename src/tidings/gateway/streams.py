"""The event store over HTTP: append with an expected version, read a range of a stream.

An append stores all its events or none, and only if the stream is at
`expected_version` (0: the stream must not exist yet; "any": no check);
otherwise 409 with the stream's actual version, and nothing is stored.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..eventsourcing.records import ANY, NewEvent
from ..eventsourcing.store import default_topic
from .http import ApiError, convert, expect_object, json_response, read_json
from .params import MAX_POSITION, integer_param
from .pubsub import check_publish_topic

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["routes"]

MAX_EVENTS = 10_000
MAX_READ = 10_000
MAX_VERSION = MAX_POSITION  # what a SQL BIGINT holds
#: What a stream id may be over HTTP: 1 to 255 characters, no control characters.
_STREAM_ID = re.compile(r"[^\x00-\x1f]{1,255}")


class EventIn(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    data: dict[str, Any]
    id: str | None = None
    headers: dict[str, str] | None = None


class AppendIn(msgspec.Struct, forbid_unknown_fields=True):
    events: list[EventIn]
    # A float too: JSON (and the document's "type": "integer") has 87.0 == 87.
    expected_version: int | float | str
    topic: str | None = None


def _store(gw: Gateway) -> Any:
    events = getattr(gw.hub, "events", None)
    if events is None:
        raise ApiError(501, "unsupported", "this server's hub has no event store")
    return events


def _check_stream_id(stream_id: str) -> None:
    if not _STREAM_ID.fullmatch(stream_id):
        raise ApiError(422, "invalid_stream_id", f"stream id {stream_id[:40]!r} must be 1 to 255 "
                       "characters with no control characters; use a short, stable id such as "
                       "'order-42'")


def _check_topic(stream_id: str, topic: str | None) -> str:
    """The topic the append publishes on; tidings' own (`$…`) are not the client's to write."""
    if topic is not None:
        check_publish_topic(topic, "topic")
        return topic
    if stream_id.startswith("$"):
        raise ApiError(422, "invalid_stream_id", f"stream id {stream_id[:40]!r}: ids starting "
                       "with '$' are reserved for tidings itself (their events would go to a "
                       "reserved topic); use an id that does not start with '$'")
    return default_topic(stream_id)


def _expected(value: int | float | str) -> Any:
    if isinstance(value, str):
        if value != "any":
            raise ApiError(422, "invalid_field", "expected_version must be an integer >= 0 (0: "
                           "the stream must not exist yet) or \"any\"")
        return ANY
    if isinstance(value, float):
        if not value.is_integer():
            raise ApiError(422, "invalid_field", "expected_version must be a whole number")
        value = int(value)
    if not 0 <= value <= MAX_VERSION:
        raise ApiError(422, "invalid_field",
                       f"expected_version must be 0 to {MAX_VERSION} or \"any\"")
    return value


def _event_out(rec: Any) -> dict[str, Any]:
    """An event as the API shows it; its data goes out as stored, never decoded (so no
    nesting, however deep an in-process append made it, can fail a read)."""
    return {"stream_id": rec.stream_id, "version": rec.version, "position": rec.position,
            "id": rec.id, "type": rec.type, "type_version": rec.type_version,
            "time": rec.time.isoformat(), "headers": rec.headers,
            "data": msgspec.Raw(rec.data)}


def routes(gw: Gateway) -> list[Route]:
    async def append(request: Request) -> Response:
        stream_id = request.path_params["stream_id"]
        _check_stream_id(stream_id)
        # The body before the admission slot: a slow upload must not hold an appender's place.
        body: AppendIn = convert(expect_object(await read_json(request)), AppendIn)
        expected = _expected(body.expected_version)
        if not 1 <= len(body.events) <= MAX_EVENTS:
            raise ApiError(422, "invalid_field", f"events must hold 1 to {MAX_EVENTS} events")
        topic = _check_topic(stream_id, body.topic)
        new = [NewEvent(type=e.type, data=e.data, id=e.id, headers=e.headers)
               for e in body.events]
        store = _store(gw)
        with gw.publishes.admit():
            done = await store.append(stream_id, new, expected_version=expected, topic=topic)
        gw.metrics.events_appended.inc(len(new))
        return json_response({"stream_id": done.stream_id, "version": done.version,
                              "positions": list(done.positions),
                              "duplicate": done.duplicate}, 201)

    async def read(request: Request) -> Response:
        stream_id = request.path_params["stream_id"]
        _check_stream_id(stream_id)
        first = integer_param(request, "from_version", 1, 1, MAX_VERSION)
        last = integer_param(request, "to_version", None, 0, MAX_VERSION)
        limit = integer_param(request, "limit", 1000, 1, MAX_READ)
        store = _store(gw)
        out: list[dict[str, Any]] = []
        more = None
        async with contextlib.aclosing(store.read(stream_id, first, last, raw=True)) as records:
            async for rec in records:
                if len(out) == limit:
                    more = rec.version
                    break
                out.append(_event_out(rec))
        if not out:
            version = await store.stream_version(stream_id)
            if version == 0:
                raise ApiError(404, "not_found", f"stream {stream_id!r} has no events")
        return json_response({"stream_id": stream_id, "events": out, "next_from_version": more})

    async def events(request: Request) -> Response:
        # One route for both methods, so a 405 (OPTIONS, say) lists both in Allow.
        return await (append(request) if request.method == "POST" else read(request))

    return [Route("/v1/streams/{stream_id:path}/events", events, methods=["GET", "POST"])]
