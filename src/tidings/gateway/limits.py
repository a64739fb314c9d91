"""Safe limits: request bodies are capped before they are read, and busy routes shed load.

`BodyLimit` refuses a body over `max_body` bytes from its Content-Length
before reading a byte of it, and stops a chunked (or lying) upload as soon as
the running count passes the limit. `Admission` bounds how many requests of
one kind are in progress; the next one gets 429 with Retry-After at once, so
backpressure reaches the client instead of growing the server's memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http import RETRY_AFTER, ApiError, error_body

__all__ = ["Admission", "BodyLimit", "BodyTooLarge"]


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large",
                         f"the request body is over the limit of {limit} bytes; send smaller "
                         "batches (or start the server with a larger max_body)")


class BodyLimit:
    """ASGI middleware: at most `max_body` bytes of request body, checked before reading it."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await _reply(send, 400, "bad_request", "the Content-Length header is not a "
                                 "non-negative integer")
                    return
                if declared > limit:
                    # Answer without reading the body; the server closes the connection
                    # rather than drain what the client may still be sending.
                    refusal = BodyTooLarge(limit)
                    await _reply(send, 413, refusal.error, refusal.detail, close=True)
                    return
                break
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


async def _reply(send: Send, status: int, error: str, detail: str, *, close: bool = False) -> None:
    body = error_body(error, detail)
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Admission:
    """At most `limit` requests of one kind at once; the next is refused with 429, not queued."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.active = 0
        self.refused = 0

    def enter(self) -> None:
        """Take a place, or raise the 429 `ApiError`; pair with `leave()`."""
        if self.active >= self.limit:
            self.refused += 1
            raise ApiError(429, "busy",
                           f"{self.limit} {self.what} requests are already in progress; "
                           f"retry after {RETRY_AFTER} s", {"Retry-After": RETRY_AFTER})
        self.active += 1

    def leave(self) -> None:
        self.active -= 1

    @contextmanager
    def admit(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.active -= 1
