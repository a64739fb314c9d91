"""The dashboard's last minutes: a bounded ring of figures, one point per sample.

The dashboard samples the engine about once a second (topic counts,
subscription lag, sagas that ended); `History.add` turns two consecutive
samples into one point of the charts and keeps the points of the last
`seconds`. Pure: no I/O, no clock (times come with the samples).

What "delivered" means: messages that subscriptions took off their backlog
(acked, or dead-lettered) since the sample before, per topic. The engine
reports a subscription's backlog (`lag`: stored, not yet settled) over its
pattern, so for a subscription over one topic the figure is exact; one over
a wildcard pattern is shared among the topics it matches in proportion to
what each published meanwhile (or, when none did, to their sizes).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .. import topics as _topics

__all__ = ["LATENCY_BUCKETS", "Figures", "History", "deliveries", "latency_bucket"]

#: Upper bounds (seconds) of the saga latency histogram's buckets; one more bucket
#: counts what took longer than the last.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: At most this many series of each kind in one point (the largest): a point stays small
#: however many topics and subscriptions there are.
MAX_SERIES = 50


@dataclass
class Figures:
    """What one sample read: the time, messages stored per topic, the lag of each
    subscription `(group, pattern)`, and the sagas that ended since the sample before
    (`(status, seconds from start to end or None when unknown)`)."""

    time: float
    counts: dict[str, int]
    lags: dict[tuple[str, str], int]
    ended: list[tuple[str, float | None]] = field(default_factory=list)


def latency_bucket(seconds: float) -> int:
    """The index of the histogram bucket `seconds` falls in."""
    for i, bound in enumerate(LATENCY_BUCKETS):
        if seconds <= bound:
            return i
    return len(LATENCY_BUCKETS)


def deliveries(before: Figures, after: Figures) -> tuple[dict[str, int], dict[str, float]]:
    """(published, delivered) per topic between two samples (see the module's doc)."""
    published = {t: n - before.counts.get(t, 0) for t, n in after.counts.items()
                 if n > before.counts.get(t, 0)}  # (fewer: trimmed by retention)
    delivered: dict[str, float] = {}
    for sub, lag in after.lags.items():
        was = before.lags.get(sub)
        if was is None:
            continue  # a new subscription: its first backlog is not a delivery
        matching = [t for t in after.counts if _topics.matches(sub[1], t)]
        came = sum(published.get(t, 0) for t in matching)
        done = came - (lag - was)  # what arrived, less what the backlog grew by
        if done <= 0 or not matching:
            continue
        weights = [published.get(t, 0) for t in matching] if came else \
            [after.counts[t] for t in matching]
        total = sum(weights)
        for t, w in zip(matching, weights, strict=True):
            share = done * (w / total if total else 1 / len(matching))
            if share:
                delivered[t] = delivered.get(t, 0.0) + share
    return published, delivered


def _largest(values: dict[str, Any], n: int = MAX_SERIES) -> dict[str, Any]:
    if len(values) <= n:
        return values
    return dict(sorted(values.items(), key=lambda kv: -kv[1])[:n])


class History:
    """The points of the last `seconds`, oldest first (at most `max_points`)."""

    def __init__(self, seconds: float = 600.0, max_points: int = 3600) -> None:
        self.seconds = seconds
        self.points: deque[dict[str, Any]] = deque(maxlen=max_points)
        self._last: Figures | None = None

    def add(self, now: Figures) -> dict[str, Any]:
        """Record a sample; returns its point: `{t, dt, published, delivered, lag,
        outcomes, latency}` (each a mapping of what is not zero; `latency`: counts per
        bucket of `LATENCY_BUCKETS`, or absent)."""
        before, self._last = self._last, now
        point: dict[str, Any] = {"t": round(now.time, 3)}
        if before is not None:
            point["dt"] = round(max(now.time - before.time, 1e-3), 3)
            published, delivered = deliveries(before, now)
            point["published"] = _largest(published)
            point["delivered"] = _largest({t: round(x, 2) for t, x in delivered.items()})
        else:
            point["dt"] = 0.0
            point["published"], point["delivered"] = {}, {}
        point["lag"] = _largest({f"{g}:{p}": n for (g, p), n in now.lags.items() if n})
        outcomes: dict[str, int] = {}
        latency = [0] * (len(LATENCY_BUCKETS) + 1)
        for status, seconds in now.ended:
            outcomes[status] = outcomes.get(status, 0) + 1
            if seconds is not None:
                latency[latency_bucket(seconds)] += 1
        point["outcomes"] = outcomes
        if any(latency):
            point["latency"] = latency
        self.points.append(point)
        while self.points and self.points[0]["t"] < now.time - self.seconds:
            self.points.popleft()
        return point

    def since(self, t: float | None) -> list[dict[str, Any]]:
        """The points after time `t` (all of them when None)."""
        if t is None:
            return list(self.points)
        return [p for p in self.points if p["t"] > t]
