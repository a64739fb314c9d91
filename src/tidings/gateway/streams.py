"""The event store over HTTP: append with an expected version, read a range of a stream.

An append stores all its events or none, and only if the stream is at
`expected_version` (0: the stream must not exist yet; "any": no check);
otherwise 409 with the stream's actual version, and nothing is stored.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .http import ApiError, convert, expect_object, json_response, read_json

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["routes"]

MAX_EVENTS = 10_000
MAX_READ = 10_000
MAX_VERSION = 2**63 - 1  # what a SQL BIGINT holds


class EventIn(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    data: dict[str, Any]
    id: str | None = None
    headers: dict[str, str] | None = None


class AppendIn(msgspec.Struct, forbid_unknown_fields=True):
    events: list[EventIn]
    expected_version: int | str
    topic: str | None = None


def _store(gw: Gateway) -> Any:
    events = getattr(gw.hub, "events", None)
    if events is None:
        raise ApiError(501, "unsupported", "this server's hub has no event store")
    return events


def _int_param(request: Request, name: str, default: int | None, low: int,
               high: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 20 or int(raw) < low or (high is not None and int(raw) > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ApiError(422, "invalid_field", f"query parameter {name!r} must be an integer "
                       f"{bound}, got {raw[:40]!r}")
    return int(raw)


def routes(gw: Gateway) -> list[Route]:
    async def append(request: Request) -> Response:
        from ..eventsourcing.records import ANY, NewEvent

        stream_id = request.path_params["stream_id"]
        with gw.publishes.admit():
            body: AppendIn = convert(expect_object(await read_json(request)), AppendIn)
            expected: Any = body.expected_version
            if isinstance(expected, str):
                if expected != "any":
                    raise ApiError(422, "invalid_field", "expected_version must be an integer "
                                   ">= 0 (0: the stream must not exist yet) or \"any\"")
                expected = ANY
            elif not 0 <= expected <= MAX_VERSION:
                raise ApiError(422, "invalid_field", "expected_version must be >= 0 or \"any\"")
            if not 1 <= len(body.events) <= MAX_EVENTS:
                raise ApiError(422, "invalid_field",
                               f"events must hold 1 to {MAX_EVENTS} events")
            new = [NewEvent(type=e.type, data=e.data, id=e.id, headers=e.headers)
                   for e in body.events]
            store = _store(gw)
            done = await store.append(stream_id, new, expected_version=expected,
                                      topic=body.topic)
        gw.metrics.events_appended.inc(len(new))
        return json_response({"stream_id": done.stream_id, "version": done.version,
                              "positions": list(done.positions),
                              "duplicate": done.duplicate}, 201)

    async def read(request: Request) -> Response:
        stream_id = request.path_params["stream_id"]
        first = _int_param(request, "from_version", 1, 1, MAX_VERSION)
        last = _int_param(request, "to_version", None, 0, MAX_VERSION)
        limit = _int_param(request, "limit", 1000, 1, MAX_READ)
        assert first is not None and limit is not None
        store = _store(gw)
        out: list[dict[str, Any]] = []
        more = None
        async with contextlib.aclosing(store.read(stream_id, first, last, raw=True)) as records:
            async for rec in records:
                if len(out) == limit:
                    more = rec.version
                    break
                out.append(rec.to_dict())
        if not out:
            version = await store.stream_version(stream_id)
            if version == 0:
                raise ApiError(404, "not_found", f"stream {stream_id!r} has no events")
        return json_response({"stream_id": stream_id, "events": out, "next_from_version": more})

    return [
        Route("/v1/streams/{stream_id:path}/events", append, methods=["POST"]),
        Route("/v1/streams/{stream_id:path}/events", read, methods=["GET"]),
    ]
