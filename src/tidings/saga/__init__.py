"""Sagas: an orchestrating, event-sourced coordinator with compensations in reverse order."""

from .clock import Clock, ManualClock, SystemClock
from .coordinator import Coordinator
from .definition import Saga, SagaState, Step
from .handlers import Command, CommandHandler
from .runner import SagaRunner

__all__ = [
    "Clock",
    "Command",
    "CommandHandler",
    "Coordinator",
    "ManualClock",
    "Saga",
    "SagaRunner",
    "SagaState",
    "Step",
    "SystemClock",
]
