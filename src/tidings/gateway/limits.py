"""Safe limits: request bodies are capped and timed, and busy routes shed load.

`BodyLimit` refuses a body over `max_body` bytes from its Content-Length
before reading a byte of it, stops a chunked (or lying) upload as soon as the
running count passes the limit, answers 408 when a body has not arrived
within `body_timeout` seconds, and bounds the bytes of all bodies being read
at once. Routes read their body before they take an admission slot, so a
client that sends half a body holds nothing but its own connection, and only
for `body_timeout`. `Admission` bounds how many requests of one kind are in
progress; the next one gets 429 with Retry-After at once, so backpressure
reaches the client instead of growing the server's memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http import RETRY_AFTER, ApiError, error_body

__all__ = ["Admission", "BodyBytes", "BodyLimit", "BodyTimeout", "BodyTooLarge"]

_CLOSE = {"Connection": "close"}  # the rest of the body may still be on its way: not kept alive


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large",
                         f"the request body is over the limit of {limit} bytes; send smaller "
                         "batches (or start the server with a larger max_body)", _CLOSE)


class BodyTimeout(ApiError):
    def __init__(self, timeout: float) -> None:
        super().__init__(408, "request_timeout",
                         f"the request body did not arrive within {timeout:g} s; send the whole "
                         "body at once (or start the server with a longer body_timeout)", _CLOSE)


class BodyBytes:
    """The bytes of request bodies that requests in progress have read: at most `limit`.

    Bounds memory by what is actually held, not by a count of requests, so a
    client trickling a body in costs the others nothing.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> None:
        """Hold `n` more bytes, or raise the 429 `ApiError`; pair with `release(n)`."""
        if self.held + n > self.limit:
            raise ApiError(429, "busy", "the server is reading too many request bodies at "
                           f"once; retry after {RETRY_AFTER} s", {"Retry-After": RETRY_AFTER,
                                                                  **_CLOSE})
        self.held += n

    def release(self, n: int) -> None:
        self.held -= n


class BodyLimit:
    """ASGI middleware: at most `max_body` bytes of request body, checked before reading it,
    all of it within `body_timeout` seconds, and what all requests hold bounded by `held`."""

    def __init__(self, app: ASGIApp, max_body: int, body_timeout: float = 10.0,
                 held: BodyBytes | None = None) -> None:
        self.app = app
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.held = BodyBytes(max_body * 256) if held is None else held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value) if value.isdigit() else -1
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
        complete = False
        deadline = asyncio.get_running_loop().time() + self.body_timeout

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # after the body only http.disconnect comes, whenever it comes
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                if received + size > limit:
                    raise BodyTooLarge(limit)
                self.held.take(size)
                received += size
                complete = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, limited, send)
        finally:
            self.held.release(received)


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
