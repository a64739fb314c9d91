"""tidings: pub/sub, event streams, event sourcing, backpressure and sagas in one toolkit.

Everything public is re-exported here; other modules are free to change.
"""

from .backpressure import Buffer, BufferStatistics, Overflow
from .errors import (
    BufferFull,
    ClosedError,
    ConcurrencyError,
    DecodeError,
    EngineUnavailable,
    InvalidArgument,
    InvalidTopic,
    NotFound,
    PayloadTooLarge,
    Rejected,
    SubscriptionConflict,
    TidingsError,
    UnknownEventType,
    Unsupported,
)
from .hub import Hub, connect, envelope
from .messages import Message, Published
from .pubsub import Subscription

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "BufferFull",
    "BufferStatistics",
    "ClosedError",
    "ConcurrencyError",
    "DecodeError",
    "EngineUnavailable",
    "Hub",
    "InvalidArgument",
    "InvalidTopic",
    "Message",
    "NotFound",
    "Overflow",
    "PayloadTooLarge",
    "Published",
    "Rejected",
    "Subscription",
    "SubscriptionConflict",
    "TidingsError",
    "UnknownEventType",
    "Unsupported",
    "__version__",
    "connect",
    "envelope",
]
