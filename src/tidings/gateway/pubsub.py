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
from .coalesce import Coalescer
from .http import ApiError, convert, decode_body, expect_object, json_response, read_json
from .limits import Admission
from .sse import EventStream, frame

if TYPE_CHECKING:
    from ..pubsub import Subscription
    from .app import Gateway

__all__ = ["routes"]

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
                 admission: Admission) -> None:
        self.publish = publish
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Admitted before the body is read: bodies held in memory are bounded too.
        with self.admission.admit():
            chunks = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            status, body = await self.publish(scope["path_params"]["topic"], raw)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})


class AckIn(msgspec.Struct, forbid_unknown_fields=True):
    ack_ids: list[str]


class NackIn(msgspec.Struct, forbid_unknown_fields=True):
    ack_ids: list[str]
    delay: float = 0.0


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
    if memoryview(m.data)[0] == 0x22:  # '"': a JSON string is stored as text/plain
        text: str = _decode_json(m.data)
        return text
    return m.data  # stored as application/json, byte for byte


def _check_publish_topic(topic: str) -> None:
    _topics.validate_topic(topic)
    if topic.startswith("$"):
        raise ApiError(422, "invalid_topic", f"topic {topic!r} is reserved for tidings itself "
                       "(dead letters); publish to a topic that does not start with '$'")


def _query_number(request: Request, name: str, default: float, low: float, high: float,
                  integer: bool) -> Any:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value: float = int(raw) if integer else float(raw)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:  # also false for NaN
        kind = "an integer" if integer else "a number"
        raise ApiError(422, "invalid_field", f"query parameter {name!r} must be {kind} from "
                       f"{low:g} to {high:g}, got {raw!r}")
    return value


def ack_id(group: str, pattern: str, position: int) -> str:
    return f"{group}:{pattern}:{position}"


def parse_ack_id(value: str, group: str) -> tuple[str, int]:
    parts = value.split(":")
    if len(parts) == 3 and parts[2].isdigit() and parts[0] and parts[1]:
        if parts[0] != group:
            raise ApiError(422, "invalid_field", f"ack id {value[:300]!r} belongs to group "
                           f"{parts[0][:100]!r}, not {group!r}; settle it on that group's route")
        try:
            _topics.validate_pattern(parts[1])
        except ValueError:
            pass
        else:
            return parts[1], int(parts[2])
    raise ApiError(422, "invalid_field", f"{value[:300]!r} is not an ack id; pass the ack_id "
                   "values exactly as a pull returned them")


def message_out(m: Message, group: str | None = None, pattern: str | None = None
                ) -> dict[str, Any]:
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
        _check_publish_topic(topic)
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
            stored = await hub.publish_many(topic, items)
            metrics.published.inc(len(stored))
            return 201, _encode({
                "positions": [p.position for p in stored],
                "messages": [{"id": p.id, "position": p.position, "duplicate": p.duplicate}
                             for p in stored],
            })
        data = _payload(body, "the message")
        if body.id is None:
            p = await coalescer.publish(topic, data, body.key, body.headers)
        else:
            p = await hub.publish(topic, data, key=body.key, headers=body.headers, id=body.id)
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
        limit = _query_number(request, "max", 10, 1, MAX_PULL, True)
        wait = _query_number(request, "wait", 0.0, 0.0, gw.max_wait, False)
        with gw.pulls.admit():
            sub = await gw.subscription(group, pattern)
            # Subscription.fetch(wait=0) returns before its first look; a short floor makes
            # wait=0 mean "what is there now".
            msgs = await sub.fetch(limit, wait)
        metrics.delivered.inc(len(msgs))
        return json_response({"messages": [message_out(m, group, pattern) for m in msgs]})

    async def _settle(request: Request, kind: str) -> Response:
        group = request.path_params["group"]
        body = expect_object(await read_json(request))
        delay = 0.0
        if kind == "nack":
            nack: NackIn = convert(body, NackIn)
            ids, delay = nack.ack_ids, nack.delay
            if not 0 <= delay <= MAX_NACK_DELAY:
                raise ApiError(422, "invalid_field", f"delay must be 0 to {MAX_NACK_DELAY:g} "
                               "seconds")
        else:
            ids = convert(body, AckIn).ack_ids
        if not 1 <= len(ids) <= MAX_ACK_IDS:
            raise ApiError(422, "invalid_field", f"ack_ids must hold 1 to {MAX_ACK_IDS} ids")
        by_pattern: dict[str, list[int]] = {}
        for value in ids:
            pattern, position = parse_ack_id(value, group)
            by_pattern.setdefault(pattern, []).append(position)
        subs: dict[str, Subscription] = {}
        for pattern in by_pattern:  # all found before anything is settled
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
        raw_start = request.query_params.get("start") or "end"
        start: str | int = raw_start
        last = request.headers.get("last-event-id")
        if last is not None:
            if not last.strip().isdigit():
                raise ApiError(422, "invalid_field", "Last-Event-ID must be a position (the id "
                               "of the last event received)")
            start = int(last) + 1
        elif raw_start not in ("beginning", "end"):
            if not raw_start.isdigit() or int(raw_start) < 1:
                raise ApiError(422, "invalid_field", "query parameter 'start' must be "
                               "'beginning', 'end' or a position >= 1")
            start = int(raw_start)
        messages = hub.read(pattern, start=start, follow=True)

        async def frames() -> AsyncIterator[bytes]:
            async for m in messages:
                metrics.streamed.inc()
                yield frame(message_out(m), event="message", id=m.position)

        return gw.event_stream(frames())

    return [  # the publish route first: the router tries routes in order
        Route("/v1/topics/{topic}/messages", _PublishEndpoint(publish, gw.publishes),
              methods=["POST"]),
        Route("/v1/topics", list_topics, methods=["GET"]),
        Route("/v1/topics/{topic}/stream", stream, methods=["GET"]),
        Route("/v1/subscriptions/{group}/messages", pull, methods=["GET"]),
        Route("/v1/subscriptions/{group}/ack", ack, methods=["POST"]),
        Route("/v1/subscriptions/{group}/nack", nack, methods=["POST"]),
    ]
