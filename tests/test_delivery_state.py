"""A hypothesis state machine driving an engine's delivery against a simple model.

Messages are published through the hub; `fetch` and `settle` go to the engine
with a fake clock (`now` passed explicitly), so leases, nack delays and dead
letters are exercised without sleeping. Runs on every engine in conftest.

Checked after every step:
- no acked or dead-lettered message is delivered again;
- a message is not delivered again while its lease runs, nor before its nack delay;
- attempts count up by one per delivery and never pass max_deliver;
- never more than max_in_flight delivered-but-unsettled messages;
- ordered: a message is delivered only once every earlier one of its key is settled;
- dead letters name the right message, reason and attempts, exactly once each, and only
  after the last attempt's lease ran out (or a nack on it) or a term;
- a fetch that reported no timer is not followed, with nothing published or settled in
  between, by one that delivers (a sleeping consumer would have missed it).
At the end, with time moving on and everything acked: nothing was lost.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import tidings
from tidings.engines.base import Settle
from tidings.engines.delivery import SubscriptionSpec

T = TypeVar("T")

ACK_WAIT = 10.0
DLQ = "dlq.g"
TOPICS = ["t.x", "t.y", "u.x"]  # the subscription is on 't.>'; 'u.x' must never arrive
KEYS = [None, "a", "b"]


class DeliveryMachine(RuleBasedStateMachine):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.hub = self.run(tidings.connect(url))
        self.engine = self.hub.engine
        self.now = time.time()  # the fake clock fetch and settle see
        self.clean = True  # false once a step failed: then teardown skips the drain
        self.handle: Any = None
        self.spec: SubscriptionSpec | None = None
        self.key: dict[int, str | None] = {}  # matching published message -> key
        self.other: set[int] = set()  # published, not matching
        self.attempts: dict[int, int] = {}
        self.held: dict[int, float] = {}  # delivered, unsettled: position -> lease end
        self.not_before: dict[int, float] = {}  # nacked with a delay
        self.acked: set[int] = set()
        self.dead: dict[int, str] = {}  # seen on the dead-letter topic
        self.expect_dead: dict[int, str] = {}
        self.dlq_after = 0
        self.quiet_since: float | None = None  # last fetch delivered nothing and set no timer

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            if self.clean and self.spec is not None:
                self.drain()
        finally:
            self.run(self.hub.close())
            self.loop.close()

    # setup ---------------------------------------------------------------------------
    @initialize(ordered=st.booleans(), max_in_flight=st.integers(1, 4),
                max_deliver=st.integers(1, 3))
    def subscribe(self, ordered: bool, max_in_flight: int, max_deliver: int) -> None:
        self.spec = SubscriptionSpec("g", "t.>", ACK_WAIT, max_deliver, DLQ, ordered,
                                     max_in_flight)
        self.handle = self.run(self.engine.subscribe(self.spec, 0))

    # rules ---------------------------------------------------------------------------
    @rule(topic=st.sampled_from(TOPICS), key=st.sampled_from(KEYS), n=st.integers(1, 3))
    def publish(self, topic: str, key: str | None, n: int) -> None:
        self.clean = False
        out = self.run(self.hub.publish_many(topic, [b"m"] * n, key=key))
        for p in out:
            if topic.startswith("t."):
                self.key[p.position] = key
            else:
                self.other.add(p.position)
        self.quiet_since = None
        self.clean = True

    @rule(limit=st.integers(1, 5))
    def fetch(self, limit: int) -> None:
        self.clean = False
        self._fetch(limit)
        self.clean = True

    @rule(dt=st.sampled_from([0.5, 3.0, ACK_WAIT, 25.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    def _held_now(self) -> list[int]:
        return sorted(p for p, lease in self.held.items() if lease > self.now)

    @precondition(lambda self: self._held_now())
    @rule(i=st.integers(0, 10), kind=st.sampled_from(["ack", "ack", "nack", "term", "release"]),
          delay=st.sampled_from([0.0, 2.0, 30.0]))
    def settle(self, i: int, kind: str, delay: float) -> None:
        self.clean = False
        held = self._held_now()
        p = held[i % len(held)]
        self.run(self.engine.settle(self.handle, [Settle(p, kind, delay)], self.now))  # type: ignore[arg-type]
        self._settled(p, kind, delay)
        self._sync_dead_letters()
        self.quiet_since = None
        self.clean = True

    # the model -----------------------------------------------------------------------
    def _settled(self, p: int, kind: str, delay: float) -> None:
        assert self.spec is not None
        del self.held[p]
        if kind == "ack":
            self.acked.add(p)
        elif kind == "term":
            self.expect_dead[p] = "terminated"
        elif kind == "release":  # handed back unseen: that delivery is not an attempt
            self.attempts[p] -= 1
        elif self.attempts[p] >= self.spec.max_deliver:
            self.expect_dead[p] = "max_deliver"
        else:
            self.not_before[p] = self.now + delay

    def _fetch(self, limit: int) -> list[int]:
        assert self.spec is not None
        msgs, next_due = self.run(self.engine.fetch(self.handle, limit, self.now))
        self._sync_dead_letters()
        if msgs and self.quiet_since is not None:
            raise AssertionError(
                f"a fetch at {self.quiet_since} reported nothing to wait for, yet at "
                f"{self.now}, with nothing published or settled since, "
                f"{[m.position for m in msgs]} were delivered"
            )
        assert len(msgs) <= limit
        for m in msgs:
            p = m.position
            assert p not in self.other, f"{m.topic} does not match the subscription"
            assert p in self.key, f"unknown position {p}"
            assert p not in self.acked, f"acked message {p} delivered again"
            assert p not in self.dead, f"dead-lettered message {p} delivered again"
            assert p not in self.expect_dead, f"message {p} should have been dead-lettered"
            lease = self.held.get(p)
            assert lease is None or lease <= self.now, f"{p} delivered again within its lease"
            assert self.now >= self.not_before.get(p, 0.0), f"{p} delivered before its nack delay"
            assert m.attempt == self.attempts.get(p, 0) + 1, (p, m.attempt, self.attempts.get(p))
            assert m.attempt <= self.spec.max_deliver
            assert m.key == self.key[p]
            if self.spec.ordered:
                for q, k in self.key.items():
                    if q < p and k == self.key[p]:
                        assert q in self.acked or q in self.dead, (
                            f"{p} (key {k!r}) delivered while {q} is unsettled"
                        )
            self.attempts[p] = m.attempt
            self.held[p] = self.now + ACK_WAIT
            self.not_before.pop(p, None)
        if self.spec.ordered:
            held_keys = [self.key[p] for p in self.held]
            assert len(held_keys) == len(set(held_keys)), "two messages of one key in flight"
        # Past the last attempt's lease a message is dead-lettered by the next fetch.
        for p, lease in list(self.held.items()):
            if lease <= self.now and self.attempts[p] >= self.spec.max_deliver:
                assert p in self.dead, f"{p} outlived its last lease without a dead letter"
        self.quiet_since = self.now if not msgs and next_due is None else None
        return [m.position for m in msgs]

    def _sync_dead_letters(self) -> None:
        assert self.spec is not None
        for m in self.run(self.engine.read(DLQ, self.dlq_after, None, 1000)):
            self.dlq_after = m.position
            h = m.headers
            p = int(h["tidings-original-position"])
            reason = h["tidings-reason"]
            assert p in self.key, f"dead letter for unknown position {p}"
            assert p not in self.dead, f"{p} dead-lettered twice"
            assert p not in self.acked, f"acked message {p} dead-lettered"
            assert h["tidings-group"] == "g" and h["tidings-original-topic"].startswith("t.")
            assert int(h["tidings-attempts"]) == self.attempts.get(p, 0), (p, h)
            if p in self.expect_dead:
                assert reason == self.expect_dead.pop(p)
            else:
                assert reason == "max_deliver", (p, reason)
                assert self.attempts[p] >= self.spec.max_deliver
                assert self.held[p] <= self.now, f"{p} dead-lettered within its lease"
            self.dead[p] = reason
            self.held.pop(p, None)
            self.not_before.pop(p, None)
            self.quiet_since = None

    @invariant()
    def settled_messages_stay_settled(self) -> None:
        assert not self.expect_dead, f"not dead-lettered at settle: {self.expect_dead}"
        if self.spec is None:
            return
        out = {p for p in self.attempts if p not in self.acked and p not in self.dead}
        assert len(out) <= self.spec.max_in_flight, (
            f"{len(out)} delivered and unsettled > max_in_flight {self.spec.max_in_flight}"
        )

    def drain(self) -> None:
        """Move time past every lease and delay, ack whatever comes: nothing may be missing."""
        assert self.spec is not None
        for _ in itertools.count():
            if set(self.key) <= self.acked | set(self.dead):
                break
            assert _ < 4 * len(self.key) + 10, "draining does not converge"
            self.now += ACK_WAIT + 30.0
            self.quiet_since = None
            got = self._fetch(10)
            for p in got:
                self.run(self.engine.settle(self.handle, [Settle(p, "ack")], self.now))
                self._settled(p, "ack", 0.0)
        missing = set(self.key) - self.acked - set(self.dead)
        assert not missing, f"lost: {sorted(missing)}"
        assert self._fetch(10) == []


#: Examples per engine: the in-process one is cheap, the others pay for a fresh store each.
EXAMPLES = {"memory": 60, "sqlite": 20, "nats": 20}


def test_delivery_state_machine(engine: Any) -> None:
    counter = itertools.count()

    def factory() -> DeliveryMachine:
        return DeliveryMachine(engine.fresh_url(f"ex{next(counter)}"))

    run_state_machine_as_test(factory, settings=settings(  # type: ignore[arg-type]
        max_examples=EXAMPLES.get(engine.id, 10), stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    ))
