"""Server-Sent Events: a response that ends when the client leaves or the server stops.

The producer runs in its own task and hands frames over a small bounded
queue, so a slow client slows the producer down (nothing piles up in
memory), a quiet stream still sends a keep-alive comment every `heartbeat`
seconds, and a client that disconnects stops the producer at once instead
of at its next event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from starlette.types import Receive, Scope, Send

from ..errors import TidingsError

__all__ = ["EventStream", "frame"]

log = logging.getLogger("tidings.gateway")
_encode = msgspec.json.Encoder().encode
_CLOSE = object()


def frame(data: Any, *, event: str | None = None, id: int | str | None = None) -> bytes:
    """One SSE frame with JSON data (`id` is what a reconnecting client sends as Last-Event-ID)."""
    head = b""
    if id is not None:
        head += b"id: " + str(id).encode() + b"\n"
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + _encode(data) + b"\n\n"


class EventStream:
    """An ASGI response streaming the frames of `source` as `text/event-stream`."""

    def __init__(self, source: AsyncIterator[bytes], *, heartbeat: float = 15.0,
                 on_close: Callable[[], None] | None = None, buffer: int = 64,
                 retry_ms: int = 1000) -> None:
        self._source = source
        self._heartbeat = heartbeat
        self._on_close = on_close
        self._buffer = buffer
        self._retry_ms = retry_ms
        self.stopping = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue(self._buffer)

        async def produce() -> None:
            try:
                async for chunk in self._source:
                    await queue.put(chunk)
            except Exception as exc:  # tell the client in-band; the status line is long gone
                if isinstance(exc, TidingsError):
                    detail = str(exc)
                else:
                    log.exception("event stream %s failed", scope.get("path"))
                    detail = "the stream failed; the server log has the details"
                await queue.put(frame({"error": "stream_failed", "detail": detail},
                                      event="error"))
            await queue.put(_CLOSE)

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]})
        producer = asyncio.create_task(produce())
        watcher = asyncio.create_task(disconnected())
        stopper = asyncio.create_task(self.stopping.wait())
        try:
            await send({"type": "http.response.body",
                        "body": f"retry: {self._retry_ms}\n\n".encode(), "more_body": True})
            while not watcher.done() and not stopper.done():
                getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({getter, watcher, stopper}, timeout=self._heartbeat,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    if not done:
                        await send({"type": "http.response.body", "body": b": keep-alive\n\n",
                                    "more_body": True})
                    continue
                chunk = getter.result()
                if chunk is _CLOSE:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not watcher.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away between two frames
            pass
        finally:
            for task in (producer, watcher, stopper):
                task.cancel()
            await asyncio.gather(producer, watcher, stopper, return_exceptions=True)
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            if self._on_close is not None:
                self._on_close()
