"""Group publishing: concurrent single-message publishes share one atomic append.

Each HTTP publish still answers only once its message is committed, with its
own position; what changes is that the messages of requests arriving
together reach the engine as one batch (one job for SQLite's writer, one
commit) instead of one job each. If a batch fails, its messages are retried
one by one, so a request only ever gets its own message's error. Messages
with a client-chosen id bypass this (their deduplication is per message).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import TidingsError
from ..hub import envelope
from ..messages import Published

if TYPE_CHECKING:
    from ..hub import Hub

__all__ = ["Coalescer"]


class Coalescer:
    """Batches concurrent `publish` calls; at most `parallel` batches in flight."""

    def __init__(self, hub: Hub, *, parallel: int = 4, most: int = 500) -> None:
        self.hub = hub
        self.parallel = parallel
        self.most = most
        self._pending: list[tuple[Any, asyncio.Future[Published], tuple[Any, ...]]] = []
        self._active = 0

    async def publish(self, topic: str, data: object, key: str | None,
                      headers: Mapping[str, str] | None) -> Published:
        """Store one message (committed when this returns), batched with its neighbours."""
        fut: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
        if self.hub.telemetry is not None:  # sent by another task: keeps its request's trace
            headers = self.hub.telemetry.carrying(headers)
        self._pending.append((envelope(data, key=key, headers=headers, topic=topic), fut,
                              (topic, data, key, headers)))
        if len(self._pending) == 1 and self._active < self.parallel:
            asyncio.get_running_loop().create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        self._active += 1
        try:
            await asyncio.sleep(0)  # let the requests that arrived together join
            while self._pending:
                batch, self._pending = self._pending[:self.most], self._pending[self.most:]
                await self._store(batch)
        finally:
            self._active -= 1

    async def _store(self, batch: list[tuple[Any, asyncio.Future[Published],
                                             tuple[Any, ...]]]) -> None:
        try:
            stored = await self.hub.publish_many(batch[0][2][0], [env for env, _, _ in batch])
        except TidingsError:
            # Nothing was stored; one message may be at fault. Each goes alone, so each
            # request gets its own outcome.
            await asyncio.gather(*(self._alone(fut, args) for _, fut, args in batch))
            return
        except BaseException as exc:
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(exc)
            raise
        for (_, fut, _), p in zip(batch, stored, strict=True):
            if not fut.done():  # its request may have gone (client disconnected)
                fut.set_result(p)

    async def _alone(self, fut: asyncio.Future[Published], args: tuple[Any, ...]) -> None:
        topic, data, key, headers = args
        try:
            p = await self.hub.publish(topic, data, key=key, headers=headers)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
        else:
            if not fut.done():
                fut.set_result(p)
