"""One error hierarchy: every failure a user can act on is a `TidingsError`.

Each message says what happened and what to do about it. Driver exceptions
(sqlite3, asyncpg, nats) are translated at the engine edge and never leak.
"""

from __future__ import annotations

__all__ = [
    "BufferFull",
    "ClosedError",
    "ConcurrencyError",
    "DecodeError",
    "EngineUnavailable",
    "EventIdConflict",
    "InvalidArgument",
    "InvalidEvent",
    "InvalidStreamId",
    "InvalidTopic",
    "NotFound",
    "PayloadTooLarge",
    "Rejected",
    "SubscriptionConflict",
    "TidingsError",
    "UnknownEventType",
    "Unsupported",
]


class TidingsError(Exception):
    """Base of every error tidings raises on purpose."""


class InvalidArgument(TidingsError, ValueError):
    """An argument is out of range or of the wrong shape; nothing was stored.

    `field` is the JSON path of the offending field (`$.lines[0].quantity`) when
    structured data did not fit its declared type, else None.
    """

    def __init__(self, *args: object, field: str | None = None) -> None:
        super().__init__(*args)
        self.field = field


class InvalidTopic(InvalidArgument):
    """A topic name or subscription pattern breaks the naming rule."""


class PayloadTooLarge(InvalidArgument):
    """A message's data is over the engine's `max_payload`; nothing was stored."""


class DecodeError(TidingsError, ValueError):
    """Data could not be encoded or decoded as the requested type."""


class ClosedError(TidingsError, RuntimeError):
    """The hub (or subscription) was closed; open a new one with `tidings.connect`."""


class EngineUnavailable(TidingsError, ConnectionError):
    """The engine behind the URL cannot be reached or opened."""


class Unsupported(TidingsError, NotImplementedError):
    """The engine does not offer this capability (it says so instead of pretending)."""


class SubscriptionConflict(InvalidArgument):
    """A durable subscription exists with settings that cannot be changed in place."""


class ConcurrencyError(TidingsError):
    """An append expected a stream version that is no longer current; nothing was stored.

    Reload the aggregate (or re-read the stream) and retry the command.
    """

    def __init__(self, stream_id: str, expected: object, actual: int) -> None:
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"stream {stream_id!r} is at version {actual}, but the append expected "
            f"{expected}; reload the stream and retry the command"
        )


class NotFound(TidingsError, LookupError):
    """The stream, aggregate, saga or request does not exist."""


class UnknownEventType(DecodeError):
    """A stored event's type has no registered class; use raw access to read it."""


class Rejected(TidingsError):
    """A command handler refused the command for a business reason (no retry)."""

    def __init__(self, reason: str = "rejected") -> None:
        reason = reason if isinstance(reason, str) else str(reason)
        self.reason = reason
        super().__init__(reason)


class BufferFull(TidingsError):
    """A `Buffer` with `Overflow.FAIL` is at capacity; slow down or enlarge it."""


class InvalidStreamId(InvalidArgument):
    """A stream (aggregate) id is empty, too long or not a str; nothing was stored."""


class InvalidEvent(InvalidArgument):
    """An event's payload does not match its type (or cannot be encoded); nothing was stored."""


class EventIdConflict(InvalidArgument):
    """An event id is already stored, but not as this same append; nothing was stored.

    Re-sending an identical append (same ids, same stream) is harmless and
    returns the stored result; reusing an id for a different event is an error.
    """
