"""Aggregates, repositories, temporal queries, snapshots and upcasting, on every engine."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest

import tidings
from tidings.eventsourcing.snapshots import schema_of

#: Event streams: every engine that holds them (nats:// carries messages only).
pytestmark = pytest.mark.events


class AgOpened(tidings.Event):
    owner: str


class AgDeposited(tidings.Event):
    amount: int


@dataclasses.dataclass
class AgWithdrawn:
    amount: int


class Account(tidings.Aggregate):
    owner: str = ""
    balance: int = 0
    moves: list[int] = []  # noqa: RUF012 - copied per instance
    applied: ClassVar[int] = 0  # counts apply() calls, to see what a load replays

    def apply(self, event: Any) -> None:
        Account.applied += 1
        match event:
            case AgOpened(owner=o):
                self.owner = o
            case AgDeposited(amount=a):
                self.balance += a
                self.moves.append(a)
            case AgWithdrawn(amount=a):
                self.balance -= a
                self.moves.append(-a)

    def open(self, owner: str) -> None:
        if self.version:
            raise ValueError("already open")
        self.record(AgOpened(owner=owner))

    def deposit(self, amount: int) -> None:
        if amount <= 0:
            raise ValueError("amount must be positive")
        self.record(AgDeposited(amount=amount))

    def withdraw(self, amount: int) -> None:
        if amount > self.balance:
            raise ValueError("insufficient funds")
        self.record(AgWithdrawn(amount=amount))


def state(a: Account) -> tuple[Any, ...]:
    return (a.id, a.version, a.owner, a.balance, list(a.moves))


async def opened(repo: tidings.Repository[Account], id: str, *deposits: int) -> Account:
    a = Account(id)
    a.open("ann")
    for d in deposits:
        a.deposit(d)
    await repo.save(a)
    return a


# aggregate basics --------------------------------------------------------------------


def test_new_aggregate() -> None:
    a = Account("a-1")
    assert (a.id, a.version, a.balance, a.pending_events) == ("a-1", 0, 0, [])
    b = Account("a-2")
    a.open("x")
    a.deposit(5)
    assert a.moves == [5] and b.moves == []  # mutable defaults are per instance
    assert a.version == 2
    assert a.pending_events == [AgOpened(owner="x"), AgDeposited(amount=5)]
    with pytest.raises(ValueError):
        a.withdraw(100)  # a command refuses: nothing recorded
    assert a.version == 2 and len(a.pending_events) == 2
    for bad in ("", "x" * 256):
        with pytest.raises(tidings.InvalidStreamId):
            Account(bad)
    with pytest.raises(tidings.InvalidEvent):
        a.record(AgDeposited(amount="no"))  # type: ignore[arg-type]
    assert a.version == 2


# repository ------------------------------------------------------------------------------


async def test_save_and_get(hub: tidings.Hub) -> None:
    repo = hub.repository(Account)
    a = await opened(repo, "acc-1", 10, 20)
    assert a.pending_events == [] and a.version == 3
    b = await repo.get("acc-1")
    assert state(b) == state(a) == ("acc-1", 3, "ann", 30, [10, 20])
    b.withdraw(5)
    out = await repo.save(b)
    assert out is not None and out.version == 4
    assert await repo.save(b) is None  # nothing new to save
    assert (await repo.get("acc-1")).balance == 25
    with pytest.raises(tidings.NotFound):
        await repo.get("acc-404")
    recs = await repo.history("acc-1")
    assert [r.type for r in recs] == ["AgOpened", "AgDeposited", "AgDeposited", "AgWithdrawn"]
    assert recs[0].headers["aggregate-type"] == "Account"
    msgs = [m async for m in hub.read("Account")]  # published on the aggregate's topic
    assert [m.headers["stream-version"] for m in msgs] == ["1", "2", "3", "4"]


async def test_save_is_optimistic(hub: tidings.Hub) -> None:
    repo = hub.repository(Account)
    await opened(repo, "occ-1", 10)
    first = await repo.get("occ-1")
    second = await repo.get("occ-1")
    first.deposit(1)
    second.withdraw(1)
    await repo.save(first)
    with pytest.raises(tidings.ConcurrencyError) as info:
        await repo.save(second)
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("occ-1", 2, 3)
    assert (await repo.get("occ-1")).moves == [10, 1]
    # a new aggregate whose id is taken conflicts too (NO_STREAM)
    clash = Account("occ-1")
    clash.open("eve")
    with pytest.raises(tidings.ConcurrencyError):
        await repo.save(clash)


async def test_temporal_queries(hub: tidings.Hub) -> None:
    repo = hub.repository(Account)
    a = Account("t-1")
    a.open("ann")
    await repo.save(a)
    for amount in (1, 2, 3, 4):
        a.deposit(amount)
        await repo.save(a)
    recs = await repo.history("t-1")
    assert (await repo.get("t-1", version=1)).balance == 0
    assert (await repo.get("t-1", version=3)).balance == 3
    assert (await repo.get("t-1", version=3)).version == 3
    for i, rec in enumerate(recs):
        past = await repo.get("t-1", as_of=rec.time)
        assert past.version >= i + 1  # events may share a timestamp: never fewer
        assert past.version == max(r.version for r in recs if r.time <= rec.time)
    assert (await repo.get("t-1", as_of=recs[-1].time.isoformat())).balance == 10
    assert (await repo.get("t-1", as_of=datetime.now(UTC) + timedelta(days=1))).balance == 10
    with pytest.raises(tidings.NotFound):
        await repo.get("t-1", as_of=recs[0].time - timedelta(seconds=1))
    with pytest.raises(tidings.NotFound):
        await repo.get("t-1", version=6)
    with pytest.raises(tidings.InvalidArgument):
        await repo.get("t-1", version=0)
    with pytest.raises(tidings.InvalidArgument):
        await repo.get("t-1", as_of="yesterday")
    # naive datetimes are UTC
    naive = recs[2].time.astimezone(UTC).replace(tzinfo=None)
    assert (await repo.get("t-1", as_of=naive)).version >= 3


# snapshots -----------------------------------------------------------------------------


async def test_snapshot_policy_and_partial_replay(hub: tidings.Hub) -> None:
    repo = hub.repository(Account, snapshot_every=10)
    a = Account("snap-1")
    a.open("ann")
    await repo.save(a)
    for i in range(24):
        a.deposit(i + 1)
        await repo.save(a)  # versions 2..25; snapshots at 10 and 20
    backend = hub.events.backend
    load = await backend.load("snap-1", schema_of(Account), None, None)
    assert load.snapshot is not None and load.snapshot.version == 20
    assert [r[0] for r in load.rows] == [21, 22, 23, 24, 25]
    Account.applied = 0
    hub.events.drop_cached()  # what this process saved would spare even the tail
    b = await repo.get("snap-1")
    assert Account.applied == 5  # only the tail was replayed
    full = await hub.repository(Account).get("snap-1")  # no snapshot policy, same loader
    assert state(b) == state(a)
    Account.applied = 0
    old = await repo.get("snap-1", version=15)
    assert Account.applied == 5  # from the snapshot at 10
    assert old.balance == sum(range(1, 15)) and old.version == 15
    assert state(full) == state(a)


async def test_a_load_starts_from_what_this_process_saved(hub: tidings.Hub) -> None:
    repo = hub.repository(Account)
    a = await opened(repo, "kept-1", 5, 7)
    Account.applied = 0
    b = await repo.get("kept-1")
    assert Account.applied == 0 and state(b) == state(a)  # nothing replayed
    # written past the repository (as another process would): only that is replayed
    await hub.events.append("kept-1", [AgDeposited(amount=30)], expected_version=a.version)
    Account.applied = 0
    c = await repo.get("kept-1")
    assert Account.applied == 1 and c.balance == 42 and c.version == a.version + 1
    assert c.moves == [5, 7, 30] and b.moves == [5, 7]  # loads never share state
    # a stale copy still cannot be saved over the newer stream
    b.deposit(1)
    with pytest.raises(tidings.ConcurrencyError):
        await repo.save(b)
    # temporal loads ignore it and read the stream
    old = await repo.get("kept-1", version=2)
    assert old.balance == 5


class Tally(tidings.Aggregate):
    """State a JSON round trip would change: a private set, a tuple, int keys."""

    last: tuple[str, int] = ("", 0)
    by_amount: dict[int, str] = {}  # noqa: RUF012 - copied per instance

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self._seen: set[str] = set()

    def apply(self, event: Any) -> None:
        if isinstance(event, AgOpened):
            self._seen.add(event.owner)
            self.last = (event.owner, len(self._seen))
            self.by_amount = {**self.by_amount, len(self._seen): event.owner}


async def test_a_kept_state_is_exactly_what_a_replay_gives(hub: tidings.Hub) -> None:
    repo = hub.repository(Tally)
    t = Tally("tally-1")
    for who in ("a", "b", "a"):
        t.record(AgOpened(owner=who))
    await repo.save(t)
    kept = await repo.get("tally-1")
    hub.events.drop_cached()
    replayed = await repo.get("tally-1")
    for agg in (kept, replayed):
        assert agg._seen == {"a", "b"} and agg.last == ("a", 2)
        assert agg.by_amount == {1: "a", 2: "a"} and agg.version == 3
    kept._seen.add("z")  # a loaded copy shares nothing with what is kept
    assert (await repo.get("tally-1"))._seen == {"a", "b"}



async def test_events_recorded_after_a_save_but_not_saved_are_never_loaded(
        hub: tidings.Hub) -> None:
    # The process keeps the saved aggregate itself (no copy); a load must not see what
    # its holder recorded afterwards and never saved.
    repo = hub.repository(Tally)
    t = Tally("tally-2")
    t.record(AgOpened(owner="a"))
    await repo.save(t)
    t.record(AgOpened(owner="b"))  # recorded, never saved
    loaded = await repo.get("tally-2")
    assert loaded._seen == {"a"} and loaded.version == 1 and loaded is not t
    loaded._seen.add("z")  # and the loaded copy is the caller's own
    assert t._seen == {"a", "b"}
    again = await repo.get("tally-2")
    assert again._seen == {"a"}
    await repo.save(t)  # saving it later makes it the kept state again
    assert (await repo.get("tally-2"))._seen == {"a", "b"}

class Fragile(tidings.Aggregate):
    """An apply that changes part of the state, then fails (a bug, but it happens)."""

    seen: list[str] = []  # noqa: RUF012 - copied per instance

    def apply(self, event: Any) -> None:
        if isinstance(event, AgOpened):
            self.seen.append(event.owner)
            if event.owner == "boom":
                raise ValueError("half applied")


async def test_a_failed_apply_after_a_save_never_reaches_a_load(hub: tidings.Hub) -> None:
    repo = hub.repository(Fragile)
    f = Fragile("fragile-1")
    f.record(AgOpened(owner="a"))
    await repo.save(f)
    with pytest.raises(ValueError):
        f.record(AgOpened(owner="boom"))  # recorded nothing, but changed f
    assert f.seen == ["a", "boom"] and not f.pending_events
    assert (await repo.get("fragile-1")).seen == ["a"]  # what is stored, not f


async def test_an_atomic_commit_that_fails_late_leaves_nothing(hub: tidings.Hub) -> None:
    from tidings.eventsourcing.transaction import commit

    repo = hub.repository(Account)
    taken = await opened(repo, "atomic-1", 5)
    first = Account("atomic-2")
    first.open("x")
    clash = tidings.NewEvent(type="Clash", data={}, id=(await repo.history(taken.id))[0].id)
    with pytest.raises(tidings.TidingsError):
        await commit(hub, [first], [("atomic-3", [clash], tidings.NO_STREAM, "t")])
    with pytest.raises(tidings.NotFound):
        await repo.get("atomic-2")  # the first item did not stay behind
    assert {m.key async for m in hub.read(">")} == {"atomic-1"}  # and no message either


async def test_snapshot_on_demand_and_batch_saves(hub: tidings.Hub) -> None:
    repo = hub.repository(Account, snapshot_every=4)
    a = Account("snap-2")
    a.open("x")
    for i in range(6):
        a.deposit(i + 1)
    await repo.save(a)  # one save crossing 4: snapshot at 7
    load = await hub.events.backend.load("snap-2", schema_of(Account), None, None)
    assert load.snapshot is not None and load.snapshot.version == 7 and load.rows == []
    plain = hub.repository(Account)
    b = await plain.get("snap-2")
    b.deposit(100)
    await plain.save(b)
    assert await plain.snapshot("snap-2") == 8
    Account.applied = 0
    c = await plain.get("snap-2")
    assert Account.applied == 0 and state(c) == state(b)
    b.deposit(1)
    with pytest.raises(tidings.InvalidArgument):
        await plain.snapshot(b)  # unsaved changes


async def test_snapshot_of_an_older_schema_is_ignored(hub: tidings.Hub) -> None:
    repo = hub.repository(Account, snapshot_every=2)
    await opened(repo, "schema-1", 5, 6, 7)
    assert (await hub.events.backend.load("schema-1", schema_of(Account), None, None)
            ).snapshot is not None

    class Account2(Account):  # a new schema: balance now counted in cents
        schema_version: ClassVar[int] = 2
        cents: int = 0

        def apply(self, event: Any) -> None:
            super().apply(event)
            self.cents = self.balance * 100

    assert schema_of(Account2) != schema_of(Account)
    repo2 = hub.repository(Account2, snapshot_every=2)
    Account.applied = 0
    b = await repo2.get("schema-1")
    assert Account.applied == 4  # full replay: the v1 snapshot was not applied
    assert (b.balance, b.cents) == (18, 1800)

    class Renamed(tidings.Aggregate):  # same version, different fields: also a new schema
        total: int = 0

    class Account3(Account):
        extra: str = ""

    assert schema_of(Account3) != schema_of(Account) != schema_of(Renamed)


async def test_snapshot_state_types_round_trip(hub: tidings.Hub) -> None:
    class RichNoted(tidings.Event):  # event types are process-wide: a name of its own
        at: datetime
        tags: list[str]

    class Rich(tidings.Aggregate):
        last: datetime | None = None
        tags: set[str] = set()  # noqa: RUF012
        raw: bytes = b""
        counts: dict[str, int] = {}  # noqa: RUF012

        def apply(self, event: Any) -> None:
            self.last = event.at
            self.tags |= set(event.tags)
            self.raw += b"\x00"
            for t in event.tags:
                self.counts[t] = self.counts.get(t, 0) + 1
            self.untyped = {"n": len(self.tags)}  # not declared: kept as JSON

    repo = hub.repository(Rich, snapshot_every=2)
    r = Rich("rich-1")
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    for i in range(3):
        r.record(RichNoted(at=now + timedelta(minutes=i), tags=[f"t{i}", "all"]))
    await repo.save(r)
    back = await repo.get("rich-1")
    fresh = await repo.get("rich-1", version=3)
    for x in (back, fresh):
        assert x.last == now + timedelta(minutes=2)
        assert x.tags == {"t0", "t1", "t2", "all"} and isinstance(x.tags, set)
        assert x.raw == b"\x00\x00\x00" and x.counts == {"t0": 1, "t1": 1, "t2": 1, "all": 3}
        assert x.untyped == {"n": 4}


# upcasting -------------------------------------------------------------------------------


async def test_upcasting_old_versions_on_read(hub: tidings.Hub, engine: Any) -> None:
    name = f"test.upcast.ItemAdded.{engine.id}"  # upcasters are global: one type per run

    class ItemAdded(tidings.Event):
        event_type = name
        sku: str

    await hub.events.append("cart-1", [ItemAdded(sku="a"), ItemAdded(sku="b")])

    class ItemAddedV3(tidings.Event):  # the class as it is now
        event_type = name
        event_version = 3
        sku: str
        quantity: int
        unit: str

    with pytest.raises(tidings.DecodeError, match="from_version=1"):
        [r.event async for r in hub.events.read("cart-1")]

    @tidings.upcaster(name, from_version=1)
    def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "qty": 1}

    @tidings.upcaster(ItemAddedV3, from_version=2)
    def v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        return {"sku": data["sku"], "quantity": data.pop("qty"), "unit": "each"}

    await hub.events.append("cart-1", [ItemAddedV3(sku="c", quantity=5, unit="box")])
    recs = [r async for r in hub.events.read("cart-1")]
    assert [r.event for r in recs] == [
        ItemAddedV3(sku="a", quantity=1, unit="each"),
        ItemAddedV3(sku="b", quantity=1, unit="each"),
        ItemAddedV3(sku="c", quantity=5, unit="box"),
    ]
    assert [r.type_version for r in recs] == [1, 1, 3]
    assert recs[0].json() == {"sku": "a"}  # stored bytes are never rewritten
    if engine.id == "sqlite":
        import sqlite3

        conn = sqlite3.connect(hub.url.split("///", 1)[1].split("?")[0])
        try:
            row = conn.execute("SELECT data, type_version FROM tidings_events "
                               "WHERE stream_id = 'cart-1' AND version = 1").fetchone()
        finally:
            conn.close()
        assert row == (b'{"sku":"a"}', 1)


async def test_aggregate_finds_its_module_events(hub: tidings.Hub) -> None:
    repo = hub.repository(Account)
    await opened(repo, "mod-1", 3)
    # dataclass events defined next to the aggregate decode without registration
    a = await repo.get("mod-1")
    a.withdraw(1)
    await repo.save(a)
    assert (await repo.get("mod-1")).balance == 2


async def test_concurrent_saves_through_the_repository(hub: tidings.Hub) -> None:
    repo = hub.repository(Account, snapshot_every=7)
    await opened(repo, "busy-1")
    wins = 0

    async def worker() -> None:
        nonlocal wins
        for _ in range(4):
            while True:
                a = await repo.get("busy-1")
                a.deposit(1)
                try:
                    await repo.save(a)
                except tidings.ConcurrencyError:
                    continue
                wins += 1
                break

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(20))), 60)
    final = await repo.get("busy-1")
    assert wins == 80 and final.balance == 80 and final.version == 81
    assert [r.version for r in await repo.history("busy-1")] == list(range(1, 82))


def test_an_aggregate_without_apply_is_a_clear_error() -> None:
    class NoApply(tidings.Aggregate):
        count: int = 0

    with pytest.raises(tidings.InvalidArgument, match="must define apply"):
        NoApply("n-1")
