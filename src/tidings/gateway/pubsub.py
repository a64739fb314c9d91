"""Pub/sub over HTTP: publish, pull with long-poll and ack/nack by `ack_id`, live SSE.

An HTTP pull consumer is a consumer of the durable subscription `group` over
the `topic` pattern, like any in-process one: competing pulls share the
subscription's messages, and a message not acked within the subscription's
`ack_wait` is delivered again. Each pulled message carries an `ack_id`
(`group:pattern:position`) that routes its ack to that subscription, even
after the gateway restarts.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .. import topics as _topics
from ..hub import envelope
from ..messages import Message
from . import cloudevents as _ce
from .coalesce import Coalescer
from .http import (
    CLIENT_GONE,
    ApiError,
    ClientGone,
    convert,
    decode_body,
    expect_object,
    json_response,
    read_json,
    too_deep,
    unless_disconnected,
)
from .limits import Admission
from .params import (
    MAX_POSITION,
    ack_id,
    integer_param,
    number_param,
    parse_ack_id,
    parse_position,
)
from .sse import EventStream, frame

if TYPE_CHECKING:
    from ..pubsub import Subscription
    from .app import Gateway

__all__ = ["check_group", "check_publish_topic", "routes"]

MAX_PULL = 100  # the default max_in_flight of a subscription: more could never be out at once
MAX_BATCH = 10_000
MAX_ACK_IDS = 1_000
MAX_NACK_DELAY = 86_400.0


class PublishIn(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    # Raw: the client's JSON is stored as sent, never decoded and encoded again.
    data: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    data_b64: str | msgspec.UnsetType = msgspec.UNSET
    key: str | None = None
    headers: dict[str, str] | None = None
    id: str | None = None


class PublishBody(msgspec.Struct, forbid_unknown_fields=True):
    """One message, or a batch under `messages` (decoded and type-checked in one pass)."""

    data: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    data_b64: str | msgspec.UnsetType = msgspec.UNSET
    key: str | None = None
    headers: dict[str, str] | None = None
    id: str | None = None
    messages: list[PublishIn] | msgspec.UnsetType = msgspec.UNSET


_decode_publish_body = msgspec.json.Decoder(PublishBody).decode
_encode = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


def _decode_publish(raw: bytes) -> PublishBody:
    return decode_body(raw, _decode_publish_body)


class _PublishEndpoint:
    """`POST /v1/topics/{topic}/messages` as a bare ASGI app: the hot path skips Starlette's
    Request and Response objects (about a third of the gateway's cost per publish)."""

    def __init__(self, publish: Callable[[str, bytes], Awaitable[tuple[int, bytes]]],
                 publish_events: Callable[[str, _ce.EventIn | list[_ce.EventIn]],
                                          Awaitable[tuple[int, bytes]]],
                 admission: Admission) -> None:
        self.publish = publish
        self.publish_events = publish_events
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The body first (BodyLimit bounds its size, time and the bytes of all bodies being
        # read), the admission slot after: a slow upload must not hold a publisher's place.
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        events = _ce.events_in(scope["headers"], raw)  # None: not a CloudEvents request
        with self.admission.admit():
            if events is None:
                status, body = await self.publish(scope["path_params"]["topic"], raw)
            else:
                status, body = await self.publish_events(scope["path_params"]["topic"], events)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})


class AckIn(msgspec.Struct, forbid_unknown_fields=True):
    ack_ids: list[str]


class NackIn(msgspec.Struct, forbid_unknown_fields=True):
    ack_ids: list[str]
    delay: float | None = None  # none: the subscription's backoff decides


def _payload(m: PublishIn | PublishBody, where: str) -> object:
    if m.data_b64 is not msgspec.UNSET:
        if m.data is not msgspec.UNSET:
            raise ApiError(422, "invalid_field", f"{where}: give either data or data_b64, not both")
        try:
            return base64.b64decode(m.data_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "invalid_field", f"{where}: data_b64 is not valid base64") from None
    if m.data is msgspec.UNSET:
        raise ApiError(422, "invalid_field",
                       f"{where}: 'data' is required (any JSON value; or 'data_b64' for bytes)")
    try:
        # msgspec passes a Raw value through unread: its strings' UTF-8 is checked here.
        if memoryview(m.data)[0] == 0x22:  # '"': a JSON string is stored as text/plain
            text: str = _decode_json(m.data)
            return text
        str(m.data, "utf-8")
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise ApiError(400, "malformed_json", f"{where}: 'data' is not valid JSON (a string in "
                       "it is not UTF-8); send UTF-8 text, or bytes as data_b64") from None
    return m.data  # stored as application/json, byte for byte


def check_publish_topic(topic: str, what: str = "topic") -> None:
    """A topic clients may write to: valid, and not one of tidings' own (`$…`)."""
    _topics.validate_topic(topic)
    if topic.startswith("$"):
        raise ApiError(422, "invalid_topic", f"{what} {topic!r} is reserved for tidings itself "
                       "(dead letters); use a topic that does not start with '$'")


#: What a durable subscription's name may be: one token, and short enough that its default
#: dead-letter topic `$dlq.<group>` is still a valid topic.
MAX_GROUP = _topics.MAX_TOPIC_LENGTH - len("$dlq.")


def check_group(group: str) -> None:
    if not _topics.is_token(group) or len(group) > MAX_GROUP:
        raise ApiError(422, "invalid_field", f"group {group[:60]!r} must be 1 to {MAX_GROUP} "
                       "letters, digits, '_' or '-'")


def _check_pull(group: str, pattern: str) -> None:
    check_group(group)
    _topics.validate_pattern(pattern)
    if _topics.matches(pattern, f"$dlq.{group}"):
        raise ApiError(409, "subscription_conflict", f"pattern {pattern!r} matches group "
                       f"{group!r}'s own dead-letter topic '$dlq.{group}'; a subscription cannot "
                       "consume its own dead letters: pull them with another group")


def _start(request: Request) -> str | int:
    """Where an SSE stream starts: after Last-Event-ID when resuming, else at `start`."""
    start = request.query_params.get("start", "end")
    position = parse_position(start, 1, MAX_POSITION)
    if start not in ("beginning", "end") and position is None:
        raise ApiError(422, "invalid_field", "query parameter 'start' must be 'beginning', "
                       f"'end' or a position from 1 to {MAX_POSITION} in ASCII digits")
    last = request.headers.get("last-event-id")
    if last is not None:  # a reconnecting EventSource: the same URL, and where it got to
        after = parse_position(last, 0, MAX_POSITION - 1)
        if after is None:
            raise ApiError(422, "invalid_field", "Last-Event-ID must be a position (the id of "
                           f"the last event received, 0 to {MAX_POSITION - 1}) in ASCII digits")
        return after + 1
    return start if position is None else position


def _stream_format(request: Request) -> bool:
    """True when an event stream is to carry CloudEvents: `?format=cloudevents` (a query
    parameter, because a browser's EventSource cannot send an Accept header)."""
    value = request.query_params.get("format", "json")
    if value not in ("json", "cloudevents"):
        raise ApiError(422, "invalid_field", "query parameter 'format' must be 'json' (the "
                       "default) or 'cloudevents' (each event's data a structured CloudEvent)")
    return value == "cloudevents"


def message_out(m: Message, group: str | None = None, pattern: str | None = None
                ) -> dict[str, Any]:
    """A message as the API shows it. JSON data nested deeper than the gateway accepts
    (published in-process) is given as `data_b64`: decoding it could fail every pull."""
    if m.headers.get("content-type", "").startswith("application/json") and too_deep(m.data):
        out = Message(m.id, m.topic, m.key, b"null", m.headers, m.timestamp, m.position
                      ).to_dict()
        del out["data"]
        out["data_b64"] = base64.b64encode(m.data).decode()
    else:
        out = m.to_dict()
    out["attempt"] = m.attempt
    if group is not None and pattern is not None:
        out["ack_id"] = ack_id(group, pattern, m.position)
    return out


def routes(gw: Gateway) -> list[Route]:
    hub = gw.hub
    metrics = gw.metrics
    coalescer = Coalescer(hub)

    async def publish(topic: str, raw: bytes) -> tuple[int, bytes]:
        body = _decode_publish(raw)
        check_publish_topic(topic)
        if body.messages is not msgspec.UNSET:
            if body.data is not msgspec.UNSET or body.data_b64 is not msgspec.UNSET or \
                    body.key is not None or body.headers is not None or body.id is not None:
                raise ApiError(422, "invalid_field", "send either one message ({data, key?, "
                               "headers?, id?}) or a batch ({messages: [...]}), not both")
            if not 1 <= len(body.messages) <= MAX_BATCH:
                raise ApiError(422, "invalid_field",
                               f"messages must hold 1 to {MAX_BATCH} messages")
            pairs = [(_payload(m, f"messages[{i}]"), m) for i, m in enumerate(body.messages)]
            items: list[object]
            if all(m.key is None and m.headers is None and m.id is None for _, m in pairs):
                items = [data for data, _ in pairs]  # the fast path: shared headers
            else:
                items = [envelope(data, key=m.key, headers=m.headers, id=m.id)
                         for data, m in pairs]
            return await publish_batch(topic, items)
        data = _payload(body, "the message")
        if body.id is None:
            p = await coalescer.publish(topic, data, body.key, body.headers)
        else:
            p = await hub.publish(topic, data, key=body.key, headers=body.headers, id=body.id)
        metrics.published.inc()
        return 201, _encode(p)

    async def publish_batch(topic: str, items: list[object]) -> tuple[int, bytes]:
        stored = await hub.publish_many(topic, items)
        metrics.published.inc(len(stored))
        return 201, _encode({
            "positions": [p.position for p in stored],
            "messages": [{"id": p.id, "position": p.position, "duplicate": p.duplicate}
                         for p in stored],
        })

    async def publish_events(topic: str, events: _ce.EventIn | list[_ce.EventIn]
                             ) -> tuple[int, bytes]:
        check_publish_topic(topic)
        if isinstance(events, list):
            return await publish_batch(topic, [envelope(e.data, key=e.key, headers=e.headers,
                                                        id=e.id) for e in events])
        p = await hub.publish(topic, events.data, key=events.key, headers=events.headers,
                              id=events.id)
        metrics.published.inc()
        return 201, _encode(p)

    async def list_topics(request: Request) -> Response:
        return json_response({"topics": await hub.topics()})

    async def pull(request: Request) -> Response:
        group = request.path_params["group"]
        pattern = request.query_params.get("topic")
        if not pattern:
            raise ApiError(422, "invalid_field", "query parameter 'topic' (the subscription's "
                           "topic pattern, e.g. orders.*) is required")
        as_ce = _ce.negotiate(request.headers.get("accept"))
        limit = integer_param(request, "max", 1 if as_ce == _ce.STRUCTURED else 10, 1, MAX_PULL)
        if as_ce == _ce.STRUCTURED and limit != 1:
            raise ApiError(422, "invalid_field", f"Accept: {_ce.STRUCTURED} answers with one "
                           f"message: leave out max (or send max=1), or accept {_ce.BATCH} "
                           "for several")
        wait = number_param(request, "wait", 0.0, 0.0, gw.max_wait)
        _check_pull(group, pattern)
        with gw.pulls.admit():
            sub = await gw.subscription(group, pattern)
            fetching = sub.fetch(limit, wait)
            if wait:
                # A client that gives up frees its slot at once, and claims nothing more: a
                # fetch cancelled mid-claim hands what it took straight back.
                try:
                    msgs = await unless_disconnected(request.receive, fetching)
                except ClientGone:
                    return Response(status_code=CLIENT_GONE)
            else:
                msgs = await fetching
        metrics.delivered.inc(len(msgs))
        if as_ce == _ce.STRUCTURED:
            if not msgs:
                return Response(status_code=204)
            m = msgs[0]
            return Response(_encode(_ce.cloudevent_out(m, ack_id(group, pattern, m.position))),
                            media_type=_ce.STRUCTURED)
        if as_ce == _ce.BATCH:
            return Response(_encode([_ce.cloudevent_out(m, ack_id(group, pattern, m.position))
                                     for m in msgs]), media_type=_ce.BATCH)
        return json_response({"messages": [message_out(m, group, pattern) for m in msgs]})

    async def _settle(request: Request, kind: str) -> Response:
        group = request.path_params["group"]
        check_group(group)
        body = expect_object(await read_json(request))
        delay: float | None = 0.0
        if kind == "nack":
            nack: NackIn = convert(body, NackIn)
            ids, delay = nack.ack_ids, nack.delay
            if delay is not None and not 0 <= delay <= MAX_NACK_DELAY:
                raise ApiError(422, "invalid_field", f"delay must be 0 to {MAX_NACK_DELAY:g} "
                               "seconds")
        else:
            ids = convert(body, AckIn).ack_ids
        if not 1 <= len(ids) <= MAX_ACK_IDS:
            raise ApiError(422, "invalid_field", f"ack_ids must hold 1 to {MAX_ACK_IDS} ids")
        by_pattern: dict[str, list[int]] = {}
        for value in ids:  # all checked before anything is settled
            owner, pattern, position = parse_ack_id(value)
            if owner != group:
                raise ApiError(404, "not_found", f"ack id {value[:300]!r} belongs to group "
                               f"{owner[:100]!r}, not {group!r}; settle it on that group's "
                               "route (nothing was settled)")
            by_pattern.setdefault(pattern, []).append(position)
        subs: dict[str, Subscription] = {}
        for pattern in by_pattern:  # all found before anything is settled
            sub = None
            if len(pattern) <= _topics.MAX_TOPIC_LENGTH:
                sub = await gw.existing_subscription(group, pattern)
            if sub is None:
                raise ApiError(404, "not_found", f"there is no subscription {group!r} over "
                               f"{pattern!r}; nothing was settled")
            subs[pattern] = sub
        for pattern, positions in by_pattern.items():
            sub = subs[pattern]
            for position in positions:
                stub = Message("", "", None, b"", {}, 0.0, position, sub=sub)
                if kind == "nack":
                    await stub.nack(delay)
                else:
                    await stub.ack()
            await sub.flush()
        (metrics.nacked if kind == "nack" else metrics.acked).inc(len(ids))
        return json_response({"settled": len(ids)})

    async def ack(request: Request) -> Response:
        return await _settle(request, "ack")

    async def nack(request: Request) -> Response:
        return await _settle(request, "nack")

    async def stream(request: Request) -> Response | EventStream:
        pattern = request.path_params["topic"]
        _topics.validate_pattern(pattern)
        start = _start(request)  # refused here, with a status, not in-band after a 200
        as_ce = _stream_format(request)
        messages = hub.read(pattern, start=start, follow=True)

        async def frames() -> AsyncIterator[bytes]:
            async for m in messages:
                metrics.streamed.inc()
                yield frame(_ce.cloudevent_out(m) if as_ce else message_out(m), event="message",
                            id=m.position)

        return gw.event_stream(frames())

    return [  # the publish route first: the router tries routes in order
        Route("/v1/topics/{topic}/messages",
              _PublishEndpoint(publish, publish_events, gw.publishes), methods=["POST"]),
        Route("/v1/topics", list_topics, methods=["GET"]),
        Route("/v1/topics/{topic}/stream", stream, methods=["GET"]),
        Route("/v1/subscriptions/{group}/messages", pull, methods=["GET"]),
        Route("/v1/subscriptions/{group}/ack", ack, methods=["POST"]),
        Route("/v1/subscriptions/{group}/nack", nack, methods=["POST"]),
    ]
