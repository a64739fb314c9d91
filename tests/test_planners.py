"""The pure planners of settling (`plan_settle`) and retention (`plan_trim`): worked
examples, then properties (hypothesis), then every engine's trim against the plan."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tidings
from tidings.engines.base import Retention, Settle
from tidings.engines.delivery import (
    MAX_DELIVER,
    TERMINATED,
    Dead,
    Pending,
    SettlePlan,
    SubscriptionSpec,
    plan_settle,
    split_settles,
)
from tidings.engines.retention import (
    LimitCuts,
    TrimPlan,
    limit_cuts,
    plan_trim,
    subscription_floor,
    trim_floor,
)

NOW = 1000.0
SPEC = SubscriptionSpec("g", "t.>", ack_wait=30.0, max_deliver=3, dead_letter="$dlq.g")


def rows_of(*rows: Pending) -> dict[int, Pending]:
    return {r.position: r for r in rows}


def settle(rows: dict[int, Pending], *items: Settle, spec: SubscriptionSpec = SPEC
           ) -> SettlePlan:
    return plan_settle(spec, rows, items, NOW)


def out(position: int, attempt: int = 1, key: str | None = None) -> Pending:
    return Pending(position, key, attempt, NOW + 20)


# plan_settle: worked examples -------------------------------------------------------------


def test_ack_deletes_the_row() -> None:
    assert settle(rows_of(out(1), out(2)), Settle(2, "ack")) == SettlePlan(delete=[2])


def test_nack_makes_the_row_due_after_its_delay() -> None:
    plan = settle(rows_of(out(1, 2, "k")), Settle(1, "nack", 5.0))
    assert plan == SettlePlan(update=[Pending(1, "k", 2, NOW + 5.0)])


def test_nack_on_the_last_attempt_dead_letters() -> None:
    row = out(1, 3)
    assert settle(rows_of(row), Settle(1, "nack", 5.0)) == SettlePlan(dead=[Dead(row, MAX_DELIVER)])


def test_term_dead_letters_whatever_the_attempt() -> None:
    row = out(1, 1)
    assert settle(rows_of(row), Settle(1, "term")) == SettlePlan(dead=[Dead(row, TERMINATED)])


def test_release_undoes_the_attempt_and_is_due_at_once() -> None:
    plan = settle(rows_of(out(1, 2, "k")), Settle(1, "release"))
    assert plan == SettlePlan(update=[Pending(1, "k", 1, NOW)])


def test_unknown_and_parked_positions_are_ignored() -> None:
    rows = rows_of(Pending(4, "a", 0, 0.0))
    for kind in ("ack", "nack", "term", "release"):
        assert settle(rows, Settle(3, kind), Settle(4, kind)) == SettlePlan()


def test_the_first_decision_per_position_stands() -> None:
    row = out(1, 3)
    rows = rows_of(row)
    assert settle(rows, Settle(1, "ack"), Settle(1, "term")) == SettlePlan(delete=[1])
    assert settle(rows, Settle(1, "term"), Settle(1, "ack")) == SettlePlan(dead=[Dead(row, TERMINATED)])
    assert settle(rows, Settle(1, "release"), Settle(1, "release")) == SettlePlan(
        update=[Pending(1, None, 2, NOW)])


def test_dead_letters_keep_the_order_of_the_settles() -> None:
    a, b, c = out(1, 3), out(2, 1), out(3, 3)
    plan = settle(rows_of(a, b, c), Settle(3, "nack"), Settle(2, "term"), Settle(1, "nack"))
    assert plan.dead == [Dead(c, MAX_DELIVER), Dead(b, TERMINATED), Dead(a, MAX_DELIVER)]


def test_split_settles_keeps_the_first_decision_per_position() -> None:
    items = [Settle(1, "ack"), Settle(2, "nack", 1.0), Settle(1, "nack"), Settle(3, "release"),
             Settle(2, "ack"), Settle(4, "term")]
    assert split_settles(items) == ([1], [3], [Settle(2, "nack", 1.0), Settle(4, "term")])


# plan_settle: properties ----------------------------------------------------------------

KINDS = st.sampled_from(["ack", "nack", "term", "release"])


@st.composite
def settle_cases(draw: st.DrawFn) -> tuple[SubscriptionSpec, dict[int, Pending], list[Settle]]:
    spec = SubscriptionSpec("g", "t.>", max_deliver=draw(st.integers(1, 4)),
                            backoff=tuple(draw(st.lists(st.sampled_from([0.0, 1.0, 7.0]),
                                                        max_size=3))))
    positions = draw(st.sets(st.integers(1, 12), max_size=8))
    rows = {p: Pending(p, draw(st.sampled_from([None, "a"])),
                       draw(st.integers(0, spec.max_deliver + 1)),
                       NOW + draw(st.sampled_from([-5.0, 0.0, 5.0])))
            for p in positions}
    items = draw(st.lists(st.builds(Settle, st.integers(1, 14), KINDS,
                                    st.sampled_from([None, 0.0, 2.5]),
                                    st.sampled_from([None, "decode-error"])), max_size=12))
    return spec, rows, items


def apply(rows: dict[int, Pending], plan: SettlePlan) -> dict[int, Pending]:
    """What an engine stores after persisting `plan`."""
    after = dict(rows)
    for p in plan.delete:
        del after[p]
    for d in plan.dead:
        del after[d.row.position]
    for r in plan.update:
        after[r.position] = r
    return after


@settings(max_examples=500, deadline=None)
@given(settle_cases())
def test_settle_properties(case: tuple[SubscriptionSpec, dict[int, Pending], list[Settle]]) -> None:
    spec, rows, items = case
    before = {p: Pending(r.position, r.key, r.attempt, r.due) for p, r in rows.items()}
    plan = plan_settle(spec, rows, items, NOW)
    assert rows == before, "the rows given are not changed"

    decided = [*plan.delete, *(r.position for r in plan.update), *(d.row.position for d in plan.dead)]
    assert len(decided) == len(set(decided)), "one decision per position"
    first: dict[int, Settle] = {}
    for s in items:
        first.setdefault(s.position, s)
    out_positions = {p for p, r in rows.items() if r.attempt > 0}
    assert set(decided) == set(first) & out_positions, "exactly the settled rows that are out"

    updated = {r.position: r for r in plan.update}
    dead = {d.row.position: d for d in plan.dead}
    for p in decided:
        s, row = first[p], rows[p]
        if s.kind == "ack":
            assert p in plan.delete
        elif s.kind == "release":  # never counts an attempt
            assert updated[p] == Pending(p, row.key, row.attempt - 1, NOW)
        elif s.kind == "term":
            assert dead[p] == Dead(row, s.reason or TERMINATED)
        elif row.attempt >= spec.max_deliver:  # a nack on the last attempt
            assert dead[p] == Dead(row, MAX_DELIVER)
        elif s.delay is not None:  # an explicit delay wins over the backoff
            assert updated[p] == Pending(p, row.key, row.attempt, NOW + s.delay)
        else:  # the n-th redelivery waits the n-th backoff step, the last repeating
            steps = spec.backoff or (0.0,)
            wait = steps[min(row.attempt, len(steps)) - 1]
            assert updated[p] == Pending(p, row.key, row.attempt, NOW + wait)
    # dead letters in the order of their settles
    order = list(first)
    assert [d.row.position for d in plan.dead] == sorted(dead, key=order.index)

    # idempotent per position: repeating settles (in any later order) changes nothing
    assert plan_settle(spec, rows, [*items, *reversed(items)], NOW) == plan
    # once stored, the same acks and terms again do nothing
    again = [s for s in first.values() if s.kind in ("ack", "term")]
    assert plan_settle(spec, apply(rows, plan), again, NOW) == SettlePlan()


@settings(max_examples=500, deadline=None)
@given(settle_cases())
def test_conditional_acks_and_releases_plus_the_rest_is_plan_settle(
    case: tuple[SubscriptionSpec, dict[int, Pending], list[Settle]],
) -> None:
    """What the PostgreSQL engine does (acks and releases as conditional writes, committed
    first; nacks and terms planned on the rows read afterwards) stores the same."""
    spec, rows, items = case
    acks, releases, rest = split_settles(items)
    after = dict(rows)
    for p in acks:  # DELETE … WHERE attempt > 0
        if p in after and after[p].attempt > 0:
            del after[p]
    for p in releases:  # SET attempt = attempt - 1, due = now WHERE attempt > 0
        r = after.get(p)
        if r is not None and r.attempt > 0:
            after[p] = Pending(p, r.key, r.attempt - 1, NOW)
    plan_rest = plan_settle(spec, after, rest, NOW)
    assert plan_rest.delete == []
    assert all(r.attempt == after[r.position].attempt for r in plan_rest.update)  # only due
    full = plan_settle(spec, rows, items, NOW)
    assert apply(after, plan_rest) == apply(rows, full)
    assert plan_rest.dead == full.dead


# retention: worked examples ---------------------------------------------------------------


def msgs(*sizes: int, start: float = 100.0) -> list[tuple[int, float, int]]:
    """(position, time, size), oldest first: positions 10, 20, …, one second apart."""
    return [(10 * (i + 1), start + i, size) for i, size in enumerate(sizes)]


def cuts(r: Retention, messages: Sequence[tuple[int, float, int]], now: float = 200.0
         ) -> LimitCuts:
    return limit_cuts(r, reversed(messages), now)


def test_each_limit_names_the_newest_message_it_removes() -> None:
    m = msgs(5, 5, 5, 5, 5)  # positions 10..50, times 100..104
    assert cuts(Retention(max_messages=2), m) == LimitCuts(max_messages=30)
    assert cuts(Retention(max_messages=5), m) == LimitCuts()
    assert cuts(Retention(max_messages=0), m) == LimitCuts(max_messages=50)
    assert cuts(Retention(max_age=97.5), m) == LimitCuts(max_age=30)  # older than 102.5
    assert cuts(Retention(max_age=98.0), m) == LimitCuts(max_age=20)  # 102 itself stays
    assert cuts(Retention(max_bytes=12), m) == LimitCuts(max_bytes=30)
    assert cuts(Retention(max_bytes=25), m) == LimitCuts()
    assert cuts(Retention(max_messages=4, max_bytes=7), m) == LimitCuts(10, None, 40)


def test_the_cut_is_the_highest_and_stays_below_the_floor() -> None:
    r = Retention(max_messages=3, max_age=10.0, max_bytes=100)
    assert plan_trim(r, LimitCuts(20, 40, None), None) == TrimPlan(40)
    assert plan_trim(r, LimitCuts(20, 40, None), 31) == TrimPlan(30)
    assert plan_trim(r, LimitCuts(20, 40, None), 41) == TrimPlan(40)
    assert plan_trim(r, LimitCuts(20, 40, None), 1) == TrimPlan(None)
    assert plan_trim(r, LimitCuts(), None) == TrimPlan(None)
    # a cut reported for a limit that is not set is not one
    assert plan_trim(Retention(max_messages=3), LimitCuts(20, 40, 50), None) == TrimPlan(20)


def test_the_floor_is_what_matching_subscriptions_still_need() -> None:
    assert subscription_floor(7, None) == 8
    assert subscription_floor(7, 3) == 3
    subs = [("orders.*", 7, 3), ("orders.>", 9, None), ("other.*", 0, None), (">", 1, None)]
    assert trim_floor("orders.new", subs) == 2
    assert trim_floor("orders.new", subs[:2]) == 3
    assert trim_floor("nobody.here", subs[:3]) is None
    assert trim_floor("$dlq.g", subs) is None  # a leading wildcard skips system topics


# retention: properties --------------------------------------------------------------------


@st.composite
def topics(draw: st.DrawFn) -> list[tuple[int, float, int]]:
    n = draw(st.integers(0, 12))
    gaps = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    steps = draw(st.lists(st.sampled_from([0.0, 0.0, 1.0, 2.5]), min_size=n, max_size=n))
    sizes = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    return [(sum(gaps[: i + 1]), 100.0 + sum(steps[: i + 1]), sizes[i]) for i in range(n)]


retentions = st.builds(
    Retention,
    max_age=st.none() | st.sampled_from([0.0, 1.0, 3.0, 10.0, 100.0]),
    max_messages=st.none() | st.integers(0, 12),
    max_bytes=st.none() | st.integers(0, 60),
)


def within_limits(r: Retention, kept: Sequence[tuple[int, float, int]], now: float) -> bool:
    return ((r.max_messages is None or len(kept) <= r.max_messages)
            and (r.max_bytes is None or sum(m[2] for m in kept) <= r.max_bytes)
            and (r.max_age is None or all(m[1] >= now - r.max_age for m in kept)))


@settings(max_examples=500, deadline=None)
@given(topics(), retentions, st.sampled_from([100.0, 103.0, 110.0, 200.0]),
       st.none() | st.integers(1, 40))
def test_trim_properties(messages: list[tuple[int, float, int]], r: Retention, now: float,
                         floor: int | None) -> None:
    read = 0

    def newest_first() -> Iterator[tuple[int, float, int]]:
        nonlocal read
        for m in reversed(messages):
            read += 1
            yield m

    found = limit_cuts(r, newest_first(), now)
    free = plan_trim(r, found, None).cut  # the limits alone
    # the smallest cut that satisfies every limit
    assert within_limits(r, [m for m in messages if free is None or m[0] > free], now)
    if free is not None:
        assert free in [m[0] for m in messages]
        assert not within_limits(r, [m for m in messages if m[0] >= free], now)
    # each limit's cut is the newest message that limit alone removes
    for limit, cut in zip(("max_messages", "max_age", "max_bytes"), found, strict=True):
        alone = Retention(**{limit: getattr(r, limit)})
        if getattr(r, limit) is None:
            continue
        assert within_limits(alone, [m for m in messages if cut is None or m[0] > cut], now)
        if cut is not None:
            assert not within_limits(alone, [m for m in messages if m[0] >= cut], now)
    # read only as far as the limits needed
    set_cuts = [c for c, limit in zip(found, (r.max_messages, r.max_age, r.max_bytes),
                                      strict=True) if limit is not None]
    newest = [m[0] for m in reversed(messages)]
    if None in set_cuts:
        assert read == len(messages)
    else:
        assert read == max((newest.index(c) + 1 for c in set_cuts if c is not None), default=0)

    # the floor: never at or above it, and only the floor holds the cut back
    cut = plan_trim(r, found, floor).cut
    if floor is not None and cut is not None:
        assert cut < floor
    if free is None:
        assert cut is None
    else:
        capped = free if floor is None else min(free, floor - 1)
        assert cut == (capped if capped > 0 else None)


# every engine cuts where the plan says (the SQL engines ask their store for LimitCuts) ----

#: Examples per engine: the in-process one is cheap, the others pay for a fresh store each.
EXAMPLES = {"memory": 40, "sqlite": 15}


async def _trim_as_planned(url: str, sizes: list[list[int]], r: Retention, ago: int | None,
                           extra: float) -> None:
    hub = await tidings.connect(url)
    try:
        for i, batch in enumerate(sizes):
            if i:
                await asyncio.sleep(0.002)  # distinct stored times
            await hub.publish_many("ret.y", [b"y"])  # gaps in ret.x's positions
            await hub.publish_many("ret.x", [b"x" * n for n in batch])
        engine = hub.engine
        stored = await engine.read("ret.x", 0, None, 1000)
        now = (stored[-1].timestamp if stored else 0.0) + extra
        if ago is not None and stored:  # a horizon exactly at a stored time
            r = Retention(now - stored[min(ago, len(stored) - 1)].timestamp, r.max_messages,
                          r.max_bytes)
        found = limit_cuts(r, ((m.position, m.timestamp, len(m.data)) for m in reversed(stored)),
                           now)
        cut = plan_trim(r, found, None).cut
        await engine.set_retention("ret.x", r)
        removed = await engine.trim(now)
        left = [m.position for m in await engine.read("ret.x", 0, None, 1000)]
        assert left == [m.position for m in stored if cut is None or m.position > cut], (r, found)
        assert removed == len(stored) - len(left)
        assert len(await engine.read("ret.y", 0, None, 1000)) == len(sizes)
    finally:
        await hub.close()


def test_every_engine_trims_as_planned(engine: Any) -> None:
    counter = itertools.count()

    @settings(max_examples=EXAMPLES.get(engine.id, 8), deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=4), min_size=1, max_size=3),
           retentions, st.none() | st.integers(0, 8), st.sampled_from([0.0, 0.5, 60.0]))
    def check(sizes: list[list[int]], r: Retention, ago: int | None, extra: float) -> None:
        asyncio.run(_trim_as_planned(engine.fresh_url(f"trim{next(counter)}"), sizes, r, ago,
                                     extra))

    check()
