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
    UnknownEventType,
    Unsupported,
)
from .eventsourcing import (
    ANY,
    NO_STREAM,
    Aggregate,
    Event,
    EventStore,
    NewEvent,
    RecordedEvent,
    Repository,
    register_event,
    upcaster,
)
from .hub import Hub, connect, envelope
from .messages import Message, Published
from .pubsub import Subscription
from .saga import Command, ManualClock, Saga, SagaRunner, Step

__version__ = "0.1.0"

__all__ = [
    "ANY",
    "Aggregate",
    "Buffer",
    "BufferFull",
    "BufferStatistics",
    "ClosedError",
    "Command",
    "ConcurrencyError",
    "DecodeError",
    "EngineUnavailable",
    "Event",
    "EventIdConflict",
    "EventStore",
    "Hub",
    "InvalidArgument",
    "InvalidEvent",
    "InvalidStreamId",
    "InvalidTopic",
    "ManualClock",
    "Message",
    "NO_STREAM",
    "NewEvent",
    "NotFound",
    "Overflow",
    "PayloadTooLarge",
    "Published",
    "RecordedEvent",
    "Rejected",
    "Repository",
    "Saga",
    "SagaRunner",
    "Step",
    "Subscription",
    "SubscriptionConflict",
    "TidingsError",
    "UnknownEventType",
    "Unsupported",
    "__version__",
    "connect",
    "envelope",
    "register_event",
    "upcaster",
]
