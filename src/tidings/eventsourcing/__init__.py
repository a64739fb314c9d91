"""Event sourcing: an event store, aggregates, repositories, snapshots, upcasting, projections.

State changes are stored as an ordered sequence of immutable events; any
past state is rebuilt by replay, snapshots make that fast, and projections
keep read models up to date in global order.
"""

from .aggregate import Aggregate
from .events import Event, register_event, upcaster
from .projections import Projections, ProjectionStatus
from .records import ANY, NO_STREAM, Appended, CaughtUp, NewEvent, RecordedEvent
from .repository import Repository
from .store import AllSubscription, EventStore, audit

__all__ = [
    "ANY",
    "NO_STREAM",
    "Aggregate",
    "AllSubscription",
    "Appended",
    "CaughtUp",
    "Event",
    "EventStore",
    "NewEvent",
    "ProjectionStatus",
    "Projections",
    "RecordedEvent",
    "Repository",
    "audit",
    "register_event",
    "upcaster",
]
