"""The coordinator's clocks (they live in `tidings.clock`, shared with the hub)."""

from ..clock import Clock, ManualClock, SystemClock

__all__ = ["Clock", "ManualClock", "SystemClock"]
