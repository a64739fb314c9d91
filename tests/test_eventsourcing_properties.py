"""Property tests: snapshot + tail equals full replay; the store behaves like a simple model."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import tidings
from tidings import ANY, NO_STREAM, NewEvent
from tidings.eventsourcing.snapshots import capture, restore


class PrCredited(tidings.Event):
    amount: int
    tag: str = ""


class PrDebited(tidings.Event):
    amount: int


class PrStamped(tidings.Event):
    at: datetime
    note: str


class Ledger(tidings.Aggregate):
    balance: int = 0
    tags: set[str] = set()  # noqa: RUF012
    entries: list[int] = []  # noqa: RUF012
    last: datetime | None = None
    notes: dict[str, int] = {}  # noqa: RUF012
    low: int = 0

    def apply(self, event: Any) -> None:
        match event:
            case PrCredited(amount=a, tag=t):
                self.balance += a
                self.entries.append(a)
                if t:
                    self.tags.add(t)
            case PrDebited(amount=a):
                self.balance -= a
                self.entries.append(-a)
                self.low = min(self.low, self.balance)
            case PrStamped(at=at, note=n):
                self.last = at
                self.notes[n] = self.notes.get(n, 0) + 1


BASE = datetime(2024, 1, 1, tzinfo=UTC)
events_st = st.lists(
    st.one_of(
        st.builds(PrCredited, amount=st.integers(0, 10**6),
                  tag=st.sampled_from(["", "a", "b", "ünï"])),
        st.builds(PrDebited, amount=st.integers(0, 10**6)),
        st.builds(PrStamped, at=st.integers(0, 10**6).map(lambda s: BASE + timedelta(seconds=s)),
                  note=st.text(max_size=5)),
    ),
    max_size=40,
)


def state(agg: Ledger) -> dict[str, Any]:
    return {k: v for k, v in vars(agg).items() if not k.startswith("_")}


@given(events=events_st, data=st.data())
def test_snapshot_plus_tail_equals_full_replay(events: list[Any], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(events)))
    full = Ledger("l-1")
    for e in events:
        full.apply(e)
        full.version += 1
    head = Ledger("l-1")
    for e in events[:cut]:
        head.apply(e)
        head.version += 1
    from_snapshot = Ledger("l-1")
    restore(from_snapshot, capture(head))
    from_snapshot.version = cut
    for e in events[cut:]:
        from_snapshot.apply(e)
        from_snapshot.version += 1
    assert state(from_snapshot) == state(full)
    assert isinstance(from_snapshot.tags, set)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events_st, every=st.integers(1, 7), chunk=st.integers(1, 5))
def test_repository_with_snapshots_matches_replay(events: list[Any], every: int,
                                                  chunk: int) -> None:
    async def run() -> None:
        async with await tidings.connect("memory://") as hub:
            snap = hub.repository(Ledger, snapshot_every=every)
            plain = hub.repository(Ledger)
            agg = Ledger("l-1")
            for i, e in enumerate(events):
                agg.record(e)
                if (i + 1) % chunk == 0:
                    await snap.save(agg)
            await snap.save(agg)
            for v in range(1, len(events) + 1):
                assert state(await snap.get("l-1", version=v)) == \
                    state(await plain._build("l-1", await hub.events.backend.load(
                        "l-1", None, v, None), v, None))
            if events:
                assert state(await snap.get("l-1")) == state(agg)

    asyncio.run(run())


# the store against a model --------------------------------------------------------------


class StoreMachine(RuleBasedStateMachine):
    """Appends (right, wrong, ANY, NO_STREAM expectations; retries of earlier batches) and reads."""

    url_kind = "memory"
    batches = Bundle("batches")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir: str | None = None
        if self.url_kind == "sqlite":
            self.dir = tempfile.mkdtemp(prefix="tidings-es-")
            url = f"sqlite:///{self.dir}/m.db"
        else:
            url = "memory://"
        self.hub: tidings.Hub = self.run(tidings.connect(url))
        self.streams: dict[str, list[tuple[str, int]]] = {}
        self.order: list[tuple[str, str]] = []  # (stream, event id) in global order
        self.next_id = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.hub.close())
        self.loop.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    @initialize()
    def start(self) -> None:
        pass

    @rule(target=batches, stream=st.sampled_from(["s-1", "s-2", "s-3"]),
          amounts=st.lists(st.integers(-5, 5), min_size=1, max_size=4),
          how=st.sampled_from(["right", "wrong", "any", "no_stream"]))
    def append(self, stream: str, amounts: list[int], how: str) -> Any:
        current = len(self.streams.get(stream, []))
        expected: Any = {"right": current, "wrong": current + 1, "any": ANY,
                         "no_stream": NO_STREAM}[how]
        ids = []
        for _ in amounts:
            self.next_id += 1
            ids.append(f"e{self.next_id}")
        batch = [NewEvent(PrCredited(amount=a), id=i) for a, i in zip(amounts, ids, strict=True)]
        conflict = expected is not ANY and expected != current
        if conflict:
            with pytest.raises(tidings.ConcurrencyError) as info:
                self.run(self.hub.events.append(stream, batch, expected_version=expected))
            assert (info.value.expected, info.value.actual) == (expected, current)
            return None
        out = self.run(self.hub.events.append(stream, batch, expected_version=expected))
        assert not out.duplicate and out.version == current + len(amounts)
        start = len(self.order) + 1
        assert out.positions == list(range(start, start + len(amounts)))
        self.streams.setdefault(stream, []).extend(zip(ids, amounts, strict=True))
        self.order.extend((stream, i) for i in ids)
        return (stream, batch, out)

    @precondition(lambda self: bool(self.order))
    @rule(prior=batches)
    def retry_append(self, prior: Any) -> None:
        if prior is None:
            return
        stream, batch, out = prior
        again = self.run(self.hub.events.append(stream, batch, expected_version=ANY))
        assert again.duplicate and again.positions == out.positions

    @rule(stream=st.sampled_from(["s-1", "s-2", "s-3", "s-4"]), lo=st.integers(1, 12),
          span=st.integers(0, 12))
    def read_range(self, stream: str, lo: int, span: int) -> None:
        async def read() -> list[Any]:
            return [(r.id, r.event.amount, r.version) async for r in
                    self.hub.events.read(stream, from_version=lo, to_version=lo + span)]

        want = [(i, a, v) for v, (i, a) in enumerate(self.streams.get(stream, []), 1)
                if lo <= v <= lo + span]
        assert self.run(read()) == want

    @invariant()
    def global_order_matches(self) -> None:
        async def read() -> list[tuple[str, str]]:
            return [(r.stream_id, r.id) async for r in self.hub.events.read_all(raw=True)]

        assert self.run(read()) == self.order
        assert self.run(self.hub.events.last_position()) == len(self.order)


class SqliteStoreMachine(StoreMachine):
    url_kind = "sqlite"


TestStoreModelMemory = StoreMachine.TestCase
TestStoreModelMemory.settings = settings(max_examples=40, stateful_step_count=15,
                                         deadline=None)
TestStoreModelSqlite = SqliteStoreMachine.TestCase
TestStoreModelSqlite.settings = settings(max_examples=15, stateful_step_count=12,
                                         deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
