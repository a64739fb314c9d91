"""Load for the NATS failure tests: publishers that retry a failed publish with the same
id, and competing consumers that ack every message with `ack(wait=True)`, recording
what a user relies on so the tests can check it afterwards.

- A publish that returned must be delivered (and, here, acked) eventually.
- A publish that raised `EngineUnavailable` is retried with the same id: the server
  deduplicates it, so one id is stored at one position however often it was sent.
- A message whose `ack(wait=True)` returned is never delivered again.

Every retry loop is bounded (`GUARD`): an engine that stays unavailable, or a consumer
that stops receiving, fails the test with what it saw instead of hanging.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import tidings

TOPIC = "load.t"
#: How long one publish, fetch or ack may keep failing before the test gives up on it.
GUARD = 30.0
#: Pause before retrying an operation that raised EngineUnavailable.
BACKOFF = 0.05


def nats_or_skip() -> None:
    """Skip (or fail under TIDINGS_REQUIRE_SERVICES=1) without nats-py."""
    from tests.pg_plugin import unavailable

    try:
        import nats  # noqa: F401
    except ImportError:
        unavailable("nats-py is not installed (pip install 'tidings[nats]')")


async def until(check: Callable[[], bool], what: str, guard: float) -> None:
    """Wait until `check()` (fails after `guard` seconds instead of hanging)."""
    async def loop() -> None:
        while True:
            if check():
                return
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(loop(), guard)
    except TimeoutError:
        pytest.fail(f"{what} did not happen in {guard:g} s")


def report(line: str) -> None:
    """Print `line`, and append it to the file named by TIDINGS_REPORT when set."""
    print(line)
    path = os.environ.get("TIDINGS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@dataclass(slots=True)
class Delivery:
    id: str
    position: int
    attempt: int
    consumer: int
    asked: float  # when the fetch that delivered it was called (monotonic)


@dataclass
class Traffic:
    """What the publishers and consumers saw."""

    returned: dict[str, int] = field(default_factory=dict)  # id -> position of its publish
    acked: dict[str, float] = field(default_factory=dict)  # id -> when ack(wait=True) returned
    acks: Counter[int] = field(default_factory=Counter)  # consumer -> acks that returned
    fetched: dict[int, float] = field(default_factory=dict)  # consumer -> last fetch that
    # returned (raised nothing): when it was called
    duplicates: int = 0  # publishes that returned `duplicate`: an earlier try was stored
    deliveries: list[Delivery] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)  # EngineUnavailable, by operation
    errors: Counter[str] = field(default_factory=Counter)  # ... and by what it said
    mark: float | None = None  # when the fault was injected (monotonic)
    recovered: float | None = None  # first publish started after `mark` that returned

    # publishing ------------------------------------------------------------------------
    async def publish(self, hub: tidings.Hub, id: str) -> None:
        """Publish `id` until a publish returns, retrying with the same id."""
        deadline = time.monotonic() + GUARD
        while True:
            started = time.monotonic()
            try:
                p = await hub.publish(TOPIC, id.encode(), id=id)
            except tidings.EngineUnavailable as exc:
                self._failed("publish", exc)
                if time.monotonic() > deadline:
                    raise AssertionError(f"publishing {id!r} kept failing for {GUARD:g} s: "
                                         f"{exc}") from exc
                await asyncio.sleep(BACKOFF)
                continue
            assert p.id == id
            self.returned[id] = p.position
            self.duplicates += p.duplicate
            if self.mark is not None and self.recovered is None and started >= self.mark:
                self.recovered = time.monotonic()
            return

    async def publisher(self, hub: tidings.Hub, prefix: str, done: Callable[[], bool]) -> None:
        """Publish `<prefix>-0`, `<prefix>-1`, ... one at a time until `done()`."""
        i = 0
        while not done():
            await self.publish(hub, f"{prefix}-{i}")
            i += 1

    # consuming -------------------------------------------------------------------------
    async def consumer(self, url: str, n: int, stop: asyncio.Event, **options: Any) -> None:
        """Consumer `n` on its own connection: fetch, ack(wait=True) each message, record;
        EngineUnavailable from a fetch or an ack is waited out, until `stop`."""
        hub = await tidings.connect(url, trim_interval=None, **options)
        try:
            since = time.monotonic()
            while True:  # the server may go away while this consumer is still starting
                try:
                    sub = await hub.subscribe(TOPIC, group="g", ack_wait=10.0,
                                              max_deliver=1000)
                    break
                except tidings.EngineUnavailable as exc:
                    self._failed("subscribe", exc)
                    if time.monotonic() - since > GUARD:
                        raise AssertionError(f"consumer {n}: subscribing kept failing for "
                                             f"{GUARD:g} s: {exc}") from exc
                    await asyncio.sleep(BACKOFF)
            failing_since: float | None = None
            while not stop.is_set():
                asked = time.monotonic()
                try:
                    msgs = await sub.fetch(50, wait=0.2)
                except tidings.EngineUnavailable as exc:
                    self._failed("fetch", exc)
                    failing_since = failing_since or asked
                    if time.monotonic() - failing_since > GUARD:
                        raise AssertionError(f"consumer {n}: fetch kept failing for "
                                             f"{GUARD:g} s: {exc}") from exc
                    await asyncio.sleep(BACKOFF)
                    continue
                failing_since = None
                self.fetched[n] = asked
                for m in msgs:
                    self.deliveries.append(Delivery(m.id, m.position, m.attempt, n, asked))
                # acked together: the acks of one batch travel in one write
                await asyncio.gather(*(self._ack(m, n) for m in msgs))
            await sub.close()
        finally:
            await hub.close()

    async def _ack(self, m: tidings.Message, n: int) -> None:
        deadline = time.monotonic() + GUARD
        while True:
            try:
                await m.ack(wait=True)
            except tidings.EngineUnavailable as exc:
                self._failed("ack", exc)
                if time.monotonic() > deadline:
                    raise AssertionError(f"consumer {n}: acking {m.id!r} kept failing for "
                                         f"{GUARD:g} s: {exc}") from exc
                await asyncio.sleep(BACKOFF)
                continue
            now = time.monotonic()
            self.acked.setdefault(m.id, now)
            self.acks[n] += 1
            return

    def _failed(self, op: str, exc: Exception) -> None:
        self.failures[op] += 1
        self.errors[f"{op}: {str(exc)[:90]}"] += 1

    # checks ----------------------------------------------------------------------------
    async def all_acked(self, guard: float, consumers: list[asyncio.Task[None]]) -> None:
        """Wait (at most `guard` s) until every id whose publish returned has been acked
        (a consumer that failed meanwhile fails the wait with its error)."""
        async def loop() -> None:
            while not self.returned.keys() <= self.acked.keys():
                for t in consumers:
                    if t.done():
                        t.result()  # its error, or:
                        raise AssertionError("a consumer stopped before all was acked")
                await asyncio.sleep(0.05)

        try:
            await asyncio.wait_for(loop(), guard)
        except TimeoutError:
            missing = sorted(self.returned.keys() - self.acked.keys())
            delivered = {d.id for d in self.deliveries}
            pytest.fail(f"{len(missing)} of {len(self.returned)} published messages not acked "
                        f"after {guard:g} s ({sum(m in delivered for m in missing)} of them "
                        f"delivered); first: "
                        f"{[(i, self.returned[i]) for i in missing[:10]]}; {self.summary()}")

    async def consuming_since(self, since: float, consumers: list[asyncio.Task[None]],
                              guard: float) -> None:
        """Wait (at most `guard` s) until every consumer has fetched successfully with a
        fetch called after `since`: they came back from the fault by themselves."""
        async def loop() -> None:
            while not all(self.fetched.get(n, 0.0) > since
                          for n in range(1, len(consumers) + 1)):
                for t in consumers:
                    if t.done():
                        t.result()
                        raise AssertionError("a consumer stopped")
                await asyncio.sleep(0.05)

        try:
            await asyncio.wait_for(loop(), guard)
        except TimeoutError:
            pytest.fail(f"not every consumer fetched again in {guard:g} s after the fault: "
                        f"last fetches {self.fetched}, fault at {since}; {self.summary()}")

    def check(self) -> None:
        """What every run must show, whatever the fault."""
        # a message whose ack(wait=True) returned is never delivered again: no delivery of
        # an id by a fetch that was called after an ack of that id had returned
        again = [d for d in self.deliveries if d.id in self.acked and d.asked > self.acked[d.id]]
        assert not again, f"delivered again after its ack(wait=True) returned: {again[:10]}"
        # a retried publish is deduplicated: one id, one position
        positions: dict[str, set[int]] = {}
        for d in self.deliveries:
            positions.setdefault(d.id, set()).add(d.position)
        for i, p in self.returned.items():
            positions.setdefault(i, set()).add(p)
        doubled = {i: sorted(p) for i, p in positions.items() if len(p) > 1}
        assert not doubled, f"ids stored at more than one position: {list(doubled.items())[:10]}"
        unknown = {d.id for d in self.deliveries} - self.returned.keys()
        assert not unknown, f"delivered ids nobody published: {sorted(unknown)[:10]}"

    def summary(self) -> str:
        redelivered = sum(1 for d in self.deliveries if d.attempt > 1)
        return (f"{len(self.returned)} published ({self.duplicates} found stored by their "
                f"retry), {len(self.deliveries)} deliveries "
                f"({redelivered} redeliveries), acks by consumer {dict(self.acks)}, "
                f"EngineUnavailable {dict(self.failures)}: {dict(self.errors.most_common(6))}")
