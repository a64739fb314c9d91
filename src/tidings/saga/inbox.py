"""What arrives for one saga's driver, in order: replies to its commands, and cancel
and retry requests (each resolved once the driver has stored it)."""

from __future__ import annotations

import asyncio
from collections import deque

import msgspec

from ..messages import Message
from .definition import Outcome

__all__ = ["CancelRequest", "Inbox", "InboxMessage", "Moved", "Reply", "RetryRequest"]


class Reply(msgspec.Struct, frozen=True):
    """A service's reply to attempt `attempt` of step `step`'s `kind` (action or
    compensation); it settles the saga's attempt in flight only if it is that one.

    `delivered` is the reply message as the coordinator's subscription delivered it: the
    driver acks it only once the saga's stream holds what the reply did (applied, or
    recorded as ignored), so a coordinator killed before that gets it again."""

    step: int
    kind: str
    attempt: int
    outcome: Outcome
    delivered: Message | None = None


class CancelRequest(msgspec.Struct, frozen=True):
    """`runner.cancel(id, reason)`: `recorded` is resolved once it is in the saga's stream."""

    reason: str
    recorded: asyncio.Future[None]


class RetryRequest(msgspec.Struct, frozen=True):
    """`runner.retry(id)`: `recorded` is resolved once it is in the saga's stream."""

    recorded: asyncio.Future[None]


class Moved(msgspec.Struct, frozen=True):
    """Another process's driver took the saga's stream to `version` (it ended it: a
    coordinator there took the reply this driver waits for). The driver looks again
    if it is behind that, instead of waiting out the step's deadline."""

    version: int


InboxMessage = Reply | CancelRequest | RetryRequest | Moved


class Inbox:
    """A saga driver's messages, in arrival order: the part of asyncio.Queue the
    driver uses, at a fraction of its objects, and `put_back` to the front."""

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: deque[InboxMessage] = deque()
        self._waiters: list[asyncio.Future[None]] = []

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: InboxMessage) -> None:
        self._items.append(item)
        self._wake()

    def put_back(self, item: InboxMessage) -> None:
        """Return `item` to the front: it was taken only to learn that something arrived,
        or recording it failed (it is applied again once the driver has looked again)."""
        self._items.appendleft(item)
        self._wake()

    def get_nowait(self) -> InboxMessage:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> InboxMessage:
        while not self._items:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        return self._items.popleft()

    def take_all(self) -> list[InboxMessage]:
        """Empty the inbox; what it held, in order."""
        items = list(self._items)
        self._items.clear()
        return items

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
