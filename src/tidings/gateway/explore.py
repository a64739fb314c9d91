"""Read routes for the dashboard's pages, and the saga actions it offers.

    GET  /v1/topics/{topic}/history?order=&before=&after=&since=&limit=
         a page of a topic's (or pattern's) messages: newest first (paging back
         with `before`), or oldest first from a position or a time (replay)
    GET  /v1/sagas/{id}/timeline     the saga and each step's attempts: start,
                                     duration, outcome, command and reply
    POST /v1/sagas/{id}/cancel       {"reason"?}: a running saga stops and compensates
    POST /v1/sagas/{id}/retry        a stuck saga tries again
    GET  /v1/streams/{id}/state?version=&as_of=&limit=
         a stream's events up to a version or a time, and the aggregate's state there

Every read is bounded (a page, a limit); nothing here stores anything but the
cancel and retry requests. The aggregate state needs the aggregate's class:
the events a repository stores carry its name (`aggregate-type`), and the
class is found among those imported in this process (an `--app` imports
them), as `tidings events` does. A stream appended without a repository shows
its events only.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import topics as _topics
from ..errors import InvalidArgument, NotFound, TidingsError
from ..eventsourcing.aggregate import aggregate_class
from .commands import CommandTarget, lookup
from .http import ApiError, convert, decode_body, expect_object, json_response
from .params import MAX_POSITION, integer_param, number_param
from .pubsub import message_out
from .replay import newest
from .streams import MAX_VERSION, _check_stream_id, _event_out, _store

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["paths", "routes", "schemas"]

MAX_PAGE = 500
MAX_EVENTS_SHOWN = 1000
MAX_REASON = 500
#: The latest time a query may name (2100-01-01, in seconds since the epoch).
MAX_TIME = 4_102_444_800.0
ORDERS = ("newest", "oldest")


class CancelIn(msgspec.Struct, forbid_unknown_fields=True):
    reason: str | None = None


def _order(request: Request) -> str:
    raw = request.query_params.get("order", "newest")
    if raw not in ORDERS:
        raise ApiError(422, "invalid_field", f"query parameter 'order' is newest (the "
                       f"default: the last messages first) or oldest (replay from "
                       f"`after`/`since`), got {raw[:40]!r}")
    return raw


def _time(request: Request, name: str) -> float | None:
    if name not in request.query_params:
        return None
    return number_param(request, name, 0.0, 0.0, MAX_TIME)


def _state_of(agg: Any) -> dict[str, Any]:
    """An aggregate's public attributes as JSON (what JSON cannot hold, as text)."""
    public = {k: v for k, v in vars(agg).items()
              if not k.startswith("_") and k not in ("id", "version")}
    return msgspec.to_builtins(public, enc_hook=repr, str_keys=True)  # type: ignore[no-any-return]


def routes(gw: Gateway) -> list[Route]:
    hub = gw.hub

    async def history(request: Request) -> Response:
        pattern = request.path_params["topic"]
        _topics.validate_pattern(pattern)
        order = _order(request)
        before = integer_param(request, "before", None, 1, MAX_POSITION)
        after = integer_param(request, "after", 0, 0, MAX_POSITION)
        since = _time(request, "since")
        limit = integer_param(request, "limit", 50, 1, MAX_PAGE)
        last = await hub.engine.last_position()
        if since is not None:  # positions grow with time: after the last one before it
            after = max(after, await hub.engine.position_before(since))
        upto = last if before is None else min(last, before - 1)
        out: dict[str, Any] = {"topic": pattern, "order": order, "last_position": last,
                               "next_before": None, "next_after": None}
        if order == "newest":
            got, more = await newest(hub.engine, pattern, after, upto, limit)
            if more:
                out["next_before"] = got[-1].position
        else:
            got = await hub.engine.read(pattern, after, upto, limit + 1) if upto > after \
                else []
            if len(got) > limit:
                got = got[:limit]
                out["next_after"] = got[-1].position
        out["messages"] = [message_out(m) for m in got]
        return json_response(out)

    async def find(saga_id: str) -> tuple[str, CommandTarget, dict[str, Any]]:
        if not saga_id or len(saga_id) > 255:
            raise ApiError(404, "not_found", "no such saga")
        for name, t in gw.commands.items():
            state = await lookup(t, saga_id)
            if state is not None:
                return name, t, state
        raise ApiError(404, "not_found", f"no saga {saga_id[:100]!r}; saga ids are the "
                       "request ids POST /v1/commands/{saga} returns (GET /v1/sagas lists them)")

    async def timeline(request: Request) -> Response:
        saga_id = request.path_params["id"]
        name, t, state = await find(saga_id)
        fn = getattr(t, "timeline", None)
        if fn is not None:
            with contextlib.suppress(NotFound, InvalidArgument):
                state = await fn(saga_id)
        return json_response({"timeline": None, **state, "saga": name})

    async def act(request: Request, action: str, allowed: str,
                  call: Callable[[Any, str], Any]) -> Response:
        saga_id = request.path_params["id"]
        name, t, state = await find(saga_id)
        fn = getattr(t, action, None)
        if fn is None:
            raise ApiError(409, "not_allowed", f"the {name!r} sagas cannot be told to "
                           f"{action} here: their command target has no {action}() (hub.sagas"
                           "(...) targets do)")
        status = state.get("status")
        if status != allowed:
            raise ApiError(409, "not_allowed", f"saga {saga_id!r} is {status}; only a "
                           f"{allowed} saga can be told to {action}")
        try:
            await call(fn, saga_id)
        except InvalidArgument as exc:  # it moved on meanwhile, or runs an unknown version
            raise ApiError(409, "not_allowed", str(exc)) from None
        after = await lookup(t, saga_id) or state
        return json_response({**after, "saga": name}, 202)

    async def cancel(request: Request) -> Response:
        reason = "cancelled over HTTP"
        raw = await request.body()
        if raw:
            body: CancelIn = convert(expect_object(decode_body(raw)), CancelIn)
            if body.reason is not None:
                if not 1 <= len(body.reason) <= MAX_REASON:
                    raise ApiError(422, "invalid_field", f'"reason" is 1 to {MAX_REASON} '
                                   "characters", field="$.reason")
                reason = body.reason
        return await act(request, "cancel", "running", lambda fn, sid: fn(sid, reason))

    async def retry(request: Request) -> Response:
        return await act(request, "retry", "stuck", lambda fn, sid: fn(sid))

    async def state(request: Request) -> Response:
        stream_id = request.path_params["stream_id"]
        _check_stream_id(stream_id)
        version = integer_param(request, "version", None, 1, MAX_VERSION)
        as_of = _time(request, "as_of")
        limit = integer_param(request, "limit", 100, 1, MAX_EVENTS_SHOWN)
        store = _store(gw)
        shown: deque[Any] = deque(maxlen=limit)
        point = current = 0
        kind: str | None = None
        async with contextlib.aclosing(store.read(stream_id, raw=True)) as records:
            async for rec in records:
                if current == 0:
                    kind = rec.headers.get("aggregate-type")
                current = rec.version
                # (half a microsecond of slack, as Repository.get: the event's own time
                # includes it, whichever way its float was rounded)
                if (version is None or rec.version <= version) and \
                        (as_of is None or rec.timestamp <= as_of + 5e-7):
                    point = rec.version
                    shown.append(rec)
                elif version is not None and rec.version > version:
                    break
        if current == 0:
            raise ApiError(404, "not_found", f"stream {stream_id[:100]!r} has no events")
        out: dict[str, Any] = {"stream_id": stream_id, "version": point,
                               "current_version": await store.stream_version(stream_id),
                               "aggregate": kind, "state": None,
                               "events": [_event_out(r) for r in reversed(shown)],
                               "more": bool(shown) and shown[0].version > 1}
        cls = aggregate_class(kind) if kind else None
        if point == 0:
            out["note"] = "the stream had no events at that point"
        elif cls is None:
            out["note"] = (f"the {kind} aggregate is not imported in this server (serve its "
                           "application with --app) so only its events are shown" if kind else
                           "no aggregate type recorded on these events (appended without a "
                           "repository): only the events are shown")
        else:
            try:
                agg = await hub.repository(cls).get(stream_id, version=point)
                out["state"] = _state_of(agg)
            except TidingsError as exc:  # e.g. an event its class can no longer decode
                out["note"] = f"the state could not be rebuilt: {exc}"
        return json_response(out)

    return [
        Route("/v1/topics/{topic}/history", history, methods=["GET"]),
        Route("/v1/sagas/{id}/timeline", timeline, methods=["GET"]),
        Route("/v1/sagas/{id}/cancel", cancel, methods=["POST"]),
        Route("/v1/sagas/{id}/retry", retry, methods=["POST"]),
        Route("/v1/streams/{stream_id:path}/state", state, methods=["GET"]),
    ]


# the OpenAPI description of the routes above (merged into gateway/openapi.py's) ----------
def paths(*, errors: Callable[..., dict[str, Any]], reads: tuple[int, ...],
          common: tuple[int, ...], pattern: dict[str, Any], stream_id: dict[str, Any],
          ) -> dict[str, Any]:
    """The paths, given the document's helpers: `errors(*codes)` (error responses),
    `reads`/`common` (the codes every read / body-taking route may answer) and the
    `pattern` and `stream_id` path parameters."""
    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def ok(schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema,
                "description": description}

    position = {"type": "integer", "minimum": 0, "maximum": MAX_POSITION}
    when = {"type": "number", "minimum": 0, "maximum": MAX_TIME}
    saga_id = {"name": "id", "in": "path", "required": True, "description": "the saga id",
               "schema": {"type": "string", "minLength": 1}}
    return {
        "/v1/topics/{topic}/history": {"get": {
            "operationId": "topicHistory",
            "summary": "a page of stored messages: the newest first, or replay from a "
                       "position or a time",
            "parameters": [
                pattern,
                query("order", {"enum": list(ORDERS)},
                      "newest (default): the last messages of the range first; oldest: "
                      "the first of the range first (replay)"),
                query("before", {**position, "minimum": 1},
                      "only positions below this (page back with next_before)"),
                query("after", position, "only positions above this (page on with "
                      "next_after)"),
                query("since", when, "only messages stored at or after this time "
                      "(seconds since the epoch)"),
                query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                      "at most this many (default 50)"),
            ],
            "responses": {"200": ok(ref("TopicHistory"), "the page"),
                          **errors(*reads, 422)},
        }},
        "/v1/sagas/{id}/timeline": {"get": {
            "operationId": "sagaTimeline",
            "summary": "a saga and each step's attempts: start, duration, outcome, the "
                       "command sent and the reply",
            "parameters": [saga_id],
            "responses": {"200": ok(ref("SagaTimeline"), "the saga"),
                          **errors(*reads, 404)},
        }},
        "/v1/sagas/{id}/cancel": {"post": {
            "operationId": "cancelSaga",
            "summary": "ask a running saga to stop and compensate what it did",
            "description": "202 once the request is stored (the compensations run on); "
                           "409 when the saga is not running (past its pivot, a saga "
                           "finishes forward).",
            "parameters": [saga_id],
            "requestBody": {"required": False, "content": {"application/json": {
                "schema": {"type": "object", "additionalProperties": False,
                           "properties": {"reason": {"type": ["string", "null"],
                                                     "minLength": 1,
                                                     "maxLength": MAX_REASON}}},
                "example": {"reason": "the customer changed their mind"}}}},
            "responses": {"202": ok({"type": "object", "required": ["saga", "status"]},
                                    "requested; the saga as it is now"),
                          **errors(*common, 404, 409, 422)},
        }},
        "/v1/sagas/{id}/retry": {"post": {
            "operationId": "retrySaga",
            "summary": "resume a stuck saga (its failed step or compensation is tried again)",
            "parameters": [saga_id],
            "responses": {"202": ok({"type": "object", "required": ["saga", "status"]},
                                    "requested; the saga as it is now"),
                          **errors(*reads, 404, 409)},
        }},
        "/v1/streams/{stream_id}/state": {"get": {
            "operationId": "streamState",
            "summary": "a stream's events up to a version or a time, and its aggregate's "
                       "state there",
            "parameters": [
                stream_id,
                query("version", {"type": "integer", "minimum": 1, "maximum": MAX_VERSION},
                      "up to this version (default: the last)"),
                query("as_of", when, "as it was at this time (seconds since the epoch)"),
                query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_EVENTS_SHOWN},
                      "at most this many events, the newest up to the point (default 100)"),
            ],
            "responses": {"200": ok(ref("StreamState"), "the events and the state"),
                          **errors(*reads, 404, 422, 501)},
        }},
    }


def schemas(message: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """The schemas the paths name, given the document's message and stored event."""
    nullable_int = {"type": ["integer", "null"]}
    attempt = {
        "type": "object",
        "required": ["attempt", "started", "finished", "duration", "outcome", "command",
                     "reply", "error"],
        "properties": {
            "attempt": {"type": "integer"}, "started": {"type": "number"},
            "finished": {"type": ["number", "null"]}, "duration": {"type": ["number", "null"]},
            "outcome": {"enum": ["running", "ok", "failed", "rejected"]},
            "inline": {"type": "boolean"}, "deadline": {"type": ["number", "null"]},
            "command": {"type": ["object", "null"],
                        "description": "the command as sent: topic, id, headers, data"},
            "reply": {"description": "what the step's reply merged into the saga's data"},
            "error": {"type": ["string", "null"]}, "retry_at": {"type": "number"}}}
    row = {
        "type": "object",
        "required": ["step", "name", "kind", "command", "status", "started", "finished",
                     "duration", "attempts"],
        "properties": {
            "step": {"type": "integer"}, "name": {"type": "string"},
            "kind": {"enum": ["action", "compensation"]},
            "command": {"type": ["string", "null"]},
            "status": {"enum": ["running", "completed", "compensated", "failed", "rejected",
                                "retrying"]},
            "started": {"type": "number"}, "finished": {"type": ["number", "null"]},
            "duration": {"type": ["number", "null"]},
            "attempts": {"type": "array", "items": attempt},
            "ignored": {"type": "array", "items": {"type": "object"}}}}
    return {
        "TopicHistory": {
            "type": "object",
            "required": ["topic", "order", "messages", "last_position", "next_before",
                         "next_after"],
            "properties": {"topic": {"type": "string"}, "order": {"enum": list(ORDERS)},
                           "messages": {"type": "array", "items": message},
                           "last_position": {"type": "integer"},
                           "next_before": nullable_int, "next_after": nullable_int}},
        "SagaTimeline": {
            "type": "object", "required": ["saga", "status", "timeline"],
            "properties": {"saga": {"type": "string"},
                           "timeline": {"type": ["array", "null"], "items": row,
                                        "description": "null when the saga's command "
                                        "target cannot tell (only hub.sagas(...) can)"}}},
        "StreamState": {
            "type": "object",
            "required": ["stream_id", "version", "current_version", "aggregate", "state",
                         "events", "more"],
            "properties": {"stream_id": {"type": "string"}, "version": {"type": "integer"},
                           "current_version": {"type": "integer"},
                           "aggregate": {"type": ["string", "null"]},
                           "state": {"type": ["object", "null"]},
                           "note": {"type": "string"},
                           "events": {"type": "array", "items": event},
                           "more": {"type": "boolean"}}},
    }
