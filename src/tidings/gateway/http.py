"""JSON in and out, and the one error shape every client sees: `{error, detail}`.

Every failure a handler can meet becomes an `ApiError` (directly, or translated
from a `TidingsError` by `translate`), so a client always gets a 4xx/5xx with
a JSON body that says what to do, and never a stack trace.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from itertools import accumulate
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
    "CLIENT_GONE",
    "MAX_DEPTH",
    "ApiError",
    "CatchAll",
    "ClientGone",
    "error_body",
    "error_response",
    "json_depth",
    "json_response",
    "read_json",
    "too_deep",
    "translate",
    "unless_disconnected",
]

log = logging.getLogger("tidings.gateway")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
T = TypeVar("T")

#: Seconds a client is told to wait (Retry-After) when the gateway or the engine is busy.
RETRY_AFTER = "1"
#: The status logged for a request whose client left before the answer (nginx's 499).
CLIENT_GONE = 499
#: How deeply a request body may nest arrays and objects (the body's own object counts).
#: Far below Python's recursion limit, so nothing that stores, reads or encodes the data
#: later (an engine, a projection, a pull) can hit it.
MAX_DEPTH = 128


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
    """A request body through `decode`: empty or not JSON is 400, the wrong shape or
    nesting deeper than `MAX_DEPTH` 422."""
    if not raw:
        raise ApiError(400, "malformed_json", "the request body is empty; send a JSON object")
    try:
        value = decode(raw)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "invalid_field", f"the request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # msgspec's parser recurses: far too deep to even finish reading
        raise _too_deep_error() from None
    if too_deep(raw):
        raise _too_deep_error()
    return value


def _too_deep_error() -> ApiError:
    return ApiError(422, "too_deep", f"the request body nests arrays and objects more than "
                    f"{MAX_DEPTH} levels deep (the body's own object counts); send flatter data")


# A JSON string; also an unterminated one (to the end), so that on bytes that are not JSON
# every match succeeds and the scan stays linear.
_STRING = re.compile(rb'"(?:[^"\\]|\\(?:.|\Z))*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [1 if b in b"[{" else -1 for b in range(256)]


def json_depth(raw: bytes) -> int:
    """How deeply the valid JSON `raw` nests arrays and objects (0 for a scalar)."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)  # strings hold brackets too
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def too_deep(raw: bytes) -> bool:
    """True when the JSON `raw` nests deeper than `MAX_DEPTH` (cheap when it cannot; on
    bytes that are not JSON, a linear guess)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:  # the common case: two C scans
        return False
    return json_depth(raw) > MAX_DEPTH


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


class ClientGone(Exception):
    """The client closed the connection while its request waited."""


async def unless_disconnected(receive: Callable[[], Awaitable[Any]], work: Awaitable[T]) -> T:
    """`await work`, cancelled as soon as the client disconnects (then `ClientGone`).

    For requests that wait (long polls): a client that gave up must not keep
    its admission slot, nor claim messages it will never see. `receive` is
    the ASGI receive of a request whose body has been read, so the next
    message it yields is `http.disconnect`. Work that finished is answered
    even if the client left at the same moment (as if it left just after).
    """
    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (watcher, task):
            t.cancel()  # a no-op once done; also reached when this request is cancelled
        await asyncio.gather(watcher, task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


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
        where: dict[str, Any] = {"field": exc.field} if exc.field is not None else {}
        return ApiError(422, "invalid_field", msg, **where)
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
