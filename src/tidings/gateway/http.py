"""JSON in and out, and the one error shape every client sees: `{error, detail}`.

Every failure a handler can meet becomes an `ApiError` (directly, or translated
from a `TidingsError` by `translate`), so a client always gets a 4xx/5xx with
a JSON body that says what to do, and never a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import (
    BufferFull,
    ClosedError,
    ConcurrencyError,
    DecodeError,
    EngineUnavailable,
    EventIdConflict,
    InvalidArgument,
    InvalidEvent,
    InvalidStreamId,
    InvalidTopic,
    NotFound,
    PayloadTooLarge,
    Rejected,
    SubscriptionConflict,
    TidingsError,
    Unsupported,
)

__all__ = [
    "ApiError",
    "CatchAll",
    "error_body",
    "error_response",
    "json_response",
    "read_json",
    "translate",
]

log = logging.getLogger("tidings.gateway")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
T = TypeVar("T")

#: Seconds a client is told to wait (Retry-After) when the gateway or the engine is busy.
RETRY_AFTER = "1"


class ApiError(Exception):
    """An HTTP error with a JSON body `{error, detail, ...extra}`."""

    def __init__(self, status: int, error: str, detail: str,
                 headers: Mapping[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra


def error_body(error: str, detail: str, **extra: Any) -> bytes:
    return _encode({"error": error, "detail": detail, **extra})


def error_response(exc: ApiError) -> Response:
    return Response(error_body(exc.error, exc.detail, **exc.extra), exc.status,
                    headers=exc.headers, media_type="application/json")


def json_response(content: Any, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response encoded with msgspec (several times faster than the stdlib's)."""
    return Response(_encode(content), status, headers=dict(headers) if headers else None,
                    media_type="application/json")


async def read_json(request: Request) -> Any:
    """The request's body as JSON (whatever Content-Type says: `curl -d` sends a form type)."""
    return decode_body(await request.body())


def decode_body(raw: bytes, decode: Callable[[bytes], T] = _decode) -> T:
    """A request body through `decode`: empty or not JSON is 400, the wrong shape 422."""
    if not raw:
        raise ApiError(400, "malformed_json", "the request body is empty; send a JSON object")
    try:
        return decode(raw)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "invalid_field", f"the request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON: {exc}") from None


def expect_object(value: Any, what: str = "the request body") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_field", f"{what} must be a JSON object")
    return value


def convert(value: Any, type: Any, what: str = "the request body") -> Any:
    """Validate decoded JSON against a msgspec type; 422 naming the field on mismatch."""
    try:
        return msgspec.convert(value, type)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "invalid_field", f"{what}: {exc}") from None


def _busy(detail: str) -> ApiError:
    return ApiError(503, "unavailable", detail, {"Retry-After": RETRY_AFTER})


def translate(exc: TidingsError) -> ApiError:
    """The HTTP face of a tidings error (most specific class first)."""
    msg = str(exc)
    if isinstance(exc, PayloadTooLarge):
        return ApiError(413, "payload_too_large", msg)
    if isinstance(exc, InvalidTopic):
        return ApiError(422, "invalid_topic", msg)
    if isinstance(exc, InvalidStreamId):
        return ApiError(422, "invalid_stream_id", msg)
    if isinstance(exc, EventIdConflict):
        return ApiError(409, "event_id_conflict", msg)
    if isinstance(exc, InvalidEvent):
        return ApiError(422, "invalid_event", msg)
    if isinstance(exc, SubscriptionConflict):
        return ApiError(409, "subscription_conflict", msg)
    if isinstance(exc, InvalidArgument):
        return ApiError(422, "invalid_field", msg)
    if isinstance(exc, ConcurrencyError):
        expected = exc.expected if isinstance(exc.expected, int) else str(exc.expected).lower()
        return ApiError(409, "version_conflict", msg, stream_id=exc.stream_id,
                        expected_version=expected, actual_version=exc.actual)
    if isinstance(exc, DecodeError):
        return ApiError(422, "invalid_data", msg)
    if isinstance(exc, NotFound):
        return ApiError(404, "not_found", msg)
    if isinstance(exc, Rejected):
        return ApiError(422, "rejected", exc.reason)
    if isinstance(exc, BufferFull):
        return ApiError(429, "busy", msg or "too many requests in progress; retry shortly",
                        {"Retry-After": RETRY_AFTER})
    if isinstance(exc, (ClosedError, EngineUnavailable)):
        return _busy(f"the engine is not available ({msg}); retry shortly")
    if isinstance(exc, Unsupported):
        return ApiError(501, "unsupported", msg)
    log.error("untranslated tidings error %r", exc)
    return ApiError(500, "internal", "an internal error occurred; the server log has the details")


class CatchAll:
    """ASGI middleware: an unexpected exception becomes a JSON 500; its traceback goes to the log.

    (Starlette's own last resort re-raises to the server after answering,
    which makes uvicorn drop the connection; this answers and carries on.)
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # too late for an error response: the server closes the connection
            body = error_body("internal", "an internal error occurred; the server log has the "
                              "details")
            await send({"type": "http.response.start", "status": 500, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]})
            await send({"type": "http.response.body", "body": body})
