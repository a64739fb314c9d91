"""The pure delivery planner `plan_fetch`: worked examples, then properties (hypothesis)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from tidings.engines.delivery import (
    Pending,
    Plan,
    SubscriptionSpec,
    dead_letter_headers,
    plan_fetch,
)

NOW = 1000.0


def spec(**kw: object) -> SubscriptionSpec:
    base: dict[str, object] = {"group": "g", "pattern": "t.>", "ack_wait": 30.0,
                               "max_deliver": 3, "dead_letter": "$dlq.g"}
    base.update(kw)
    return SubscriptionSpec(**base)  # type: ignore[arg-type]


def plan(s: SubscriptionSpec, pending: Sequence[Pending] = (),
         candidates: Sequence[tuple[int, str | None]] = (), *, cursor: int = 0,
         now: float = NOW, limit: int = 10) -> Plan:
    return plan_fetch(s, list(pending), candidates, cursor=cursor, now=now, limit=limit)


def positions(rows: Sequence[Pending]) -> list[int]:
    return [p.position for p in rows]


# worked examples ------------------------------------------------------------------------


def test_new_messages_are_delivered_in_order_with_a_lease() -> None:
    p = plan(spec(), candidates=[(1, None), (2, "a"), (5, None)])
    assert positions(p.deliver) == [1, 2, 5]
    assert p.added == p.deliver
    assert all(r.attempt == 1 and r.due == NOW + 30.0 for r in p.deliver)
    assert p.cursor == 5
    assert p.dead == []
    assert p.next_due == NOW + 30.0


def test_a_lease_with_backoff_runs_out_one_backoff_step_later() -> None:
    s = spec(max_deliver=4, backoff=(1.0, 5.0))
    rows = plan(s, candidates=[(1, None)]).added  # (the planner updates rows in place)
    assert rows[0].due == NOW + 30.0 + 1.0  # attempt 1's lease, then backoff[0]
    assert plan(s, rows, now=NOW + 30.9).deliver == []
    plan(s, rows, now=NOW + 31.0)
    assert (rows[0].attempt, rows[0].due) == (2, NOW + 31 + 30 + 5)
    plan(s, rows, now=NOW + 66.0)
    assert (rows[0].attempt, rows[0].due) == (3, NOW + 66 + 30 + 5)  # the last step repeats
    plan(s, rows, now=NOW + 101.0)  # attempt 4 is the last: no wait after it
    assert (rows[0].attempt, rows[0].due) == (4, NOW + 101 + 30)
    assert plan(s, rows, now=NOW + 131.0).dead == rows


def test_a_row_is_not_redelivered_before_its_backoff() -> None:
    s = spec(backoff=(10.0,))
    p = plan(s, candidates=[(1, None)])
    assert plan(s, p.added, now=NOW + 30.5).deliver == []  # lease over, backoff not


def test_nothing_to_do() -> None:
    p = plan(spec(), cursor=7)
    assert (p.deliver, p.added, p.dead, p.cursor, p.next_due) == ([], [], [], 7, None)


def test_limit_caps_deliveries_and_the_cursor_stops_there() -> None:
    p = plan(spec(), candidates=[(1, None), (2, None), (3, None)], limit=2)
    assert positions(p.deliver) == [1, 2]
    assert p.cursor == 2


def test_leased_message_waits_and_sets_the_timer() -> None:
    leased = Pending(1, None, 1, NOW + 5)
    p = plan(spec(), [leased])
    assert p.deliver == []
    assert p.next_due == NOW + 5


def test_expired_lease_is_redelivered_with_the_next_attempt() -> None:
    p = plan(spec(), [Pending(1, None, 1, NOW - 1)])
    [r] = p.deliver
    assert (r.position, r.attempt, r.due) == (1, 2, NOW + 30.0)
    assert p.added == []


def test_due_exactly_now_is_due() -> None:
    assert positions(plan(spec(), [Pending(1, None, 1, NOW)]).deliver) == [1]


def test_redeliveries_come_before_new_messages_and_share_the_limit() -> None:
    p = plan(spec(), [Pending(3, None, 1, NOW - 1)], [(4, None), (5, None)], cursor=3, limit=2)
    assert positions(p.deliver) == [3, 4]
    assert p.cursor == 4


def test_ready_but_over_the_limit_asks_to_come_back_now() -> None:
    p = plan(spec(), [Pending(1, None, 1, NOW - 1), Pending(2, None, 1, NOW - 1)], limit=1)
    assert positions(p.deliver) == [1]
    assert p.next_due == NOW


def test_last_attempt_expired_is_dead_lettered() -> None:
    s = spec(max_deliver=2)
    rows = [Pending(1, None, 2, NOW - 1), Pending(2, None, 2, NOW + 1), Pending(3, None, 1, NOW - 1)]
    p = plan(s, rows)
    assert positions(p.dead) == [1]  # 2 is still leased on its last attempt
    assert positions(p.deliver) == [3]
    assert p.next_due == NOW + 1


def test_max_in_flight_counts_pending_rows() -> None:
    s = spec(max_in_flight=3)
    rows = [Pending(1, None, 1, NOW + 5), Pending(2, None, 1, NOW + 5)]
    p = plan(s, rows, [(3, None), (4, None)], cursor=2)
    assert positions(p.deliver) == [3]
    assert p.cursor == 3  # 4 stays in the log for later


def test_dead_rows_free_their_room() -> None:
    s = spec(max_in_flight=1, max_deliver=1)
    p = plan(s, [Pending(1, None, 1, NOW - 1)], [(2, None)], cursor=1)
    assert positions(p.dead) == [1]
    assert positions(p.deliver) == [2]


def test_ordered_parks_later_messages_of_a_busy_key() -> None:
    s = spec(ordered=True)
    p = plan(s, [Pending(1, "a", 1, NOW + 5)], [(2, "a"), (3, "b"), (4, "a"), (5, None)],
             cursor=1)
    assert positions(p.deliver) == [3, 5]
    assert positions(p.added) == [2, 3, 4, 5]
    parked = [r for r in p.added if r.attempt == 0]
    assert positions(parked) == [2, 4]
    assert p.cursor == 5


def test_ordered_delivers_the_parked_head_once_its_key_is_free() -> None:
    s = spec(ordered=True)
    p = plan(s, [Pending(2, "a", 0, 0.0), Pending(4, "a", 0, 0.0)], cursor=5)
    assert positions(p.deliver) == [2]
    assert p.deliver[0].attempt == 1


def test_ordered_keyless_messages_are_one_sequence() -> None:
    s = spec(ordered=True)
    p = plan(s, candidates=[(1, None), (2, None), (3, "k")])
    assert positions(p.deliver) == [1, 3]
    assert positions(p.added) == [1, 2, 3]


def test_ordered_head_over_the_limit_still_blocks_its_key() -> None:
    s = spec(ordered=True)
    rows = [Pending(1, "a", 1, NOW - 1), Pending(2, "b", 1, NOW - 1), Pending(3, "b", 0, 0.0)]
    p = plan(s, rows, limit=1)
    assert positions(p.deliver) == [1]


def test_ordered_dead_head_releases_its_key() -> None:
    s = spec(ordered=True, max_deliver=1)
    p = plan(s, [Pending(1, "a", 1, NOW - 1), Pending(2, "a", 0, 0.0)])
    assert positions(p.dead) == [1]
    assert positions(p.deliver) == [2]


def test_unordered_delivers_many_of_one_key() -> None:
    p = plan(spec(), candidates=[(1, "a"), (2, "a")])
    assert positions(p.deliver) == [1, 2]


def test_dead_letter_headers_keep_the_original_and_say_why() -> None:
    h = dead_letter_headers({"content-type": "application/json", "x": "1"}, topic="a.b",
                            id="m-1", position=7, group="g", reason="terminated", attempts=2)
    assert h == {
        "content-type": "application/json", "x": "1",
        "tidings-original-topic": "a.b", "tidings-original-id": "m-1",
        "tidings-original-position": "7", "tidings-group": "g",
        "tidings-reason": "terminated", "tidings-attempts": "2",
    }
    assert dead_letter_headers(None, topic="a", id="i", position=1, group="g",
                               reason="max_deliver", attempts=5)["tidings-attempts"] == "5"


# properties -------------------------------------------------------------------------------

KEYS = st.sampled_from([None, "a", "b", "c"])


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[SubscriptionSpec, list[Pending], list[tuple[int, str | None]], int, int]:
    s = spec(
        ordered=draw(st.booleans()),
        max_deliver=draw(st.integers(1, 4)),
        max_in_flight=draw(st.integers(1, 8)),
        ack_wait=draw(st.sampled_from([0.5, 30.0])),
        backoff=tuple(draw(st.lists(st.sampled_from([0.0, 1.0, 60.0]), max_size=3))),
    )
    n = draw(st.integers(0, 10))
    pos = sorted(draw(st.sets(st.integers(1, 40), min_size=n, max_size=n)))
    rows = []
    for p in pos:
        attempt = draw(st.integers(0, s.max_deliver + 1))
        due = 0.0 if attempt == 0 else NOW + draw(st.sampled_from([-10.0, -0.5, 0.0, 0.5, 10.0]))
        rows.append(Pending(p, draw(KEYS), attempt, due))
    cursor = (pos[-1] if pos else 0) + draw(st.integers(0, 3))
    m = draw(st.integers(0, 10))
    cands = sorted(draw(st.sets(st.integers(cursor + 1, cursor + 30), min_size=m, max_size=m)))
    candidates = [(c, draw(KEYS)) for c in cands]
    limit = draw(st.integers(0, 6))
    return s, rows, candidates, cursor, limit


def _k(key: str | None) -> object:
    return ("no-key",) if key is None else key


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_plan_properties(case: tuple[SubscriptionSpec, list[Pending], list[tuple[int, str | None]], int, int]) -> None:
    s, rows, candidates, cursor, limit = case
    before = copy.deepcopy(rows)
    p = plan_fetch(s, rows, iter(candidates), cursor=cursor, now=NOW, limit=limit)
    orig = {r.position: r for r in before}
    lease = NOW + s.ack_wait

    # dead: exactly the rows on their last attempt whose lease ran out; never delivered
    expect_dead = [r.position for r in before if r.attempt >= s.max_deliver and r.due <= NOW]
    assert positions(p.dead) == expect_dead
    assert not set(positions(p.dead)) & set(positions(p.deliver))
    live = [r for r in before if r.position not in expect_dead]

    # limit, and each delivery is one more attempt under a fresh lease, which a backoff
    # step extends (the wait after it, should it fail) unless it is the last attempt
    assert len(p.deliver) <= limit
    assert len(set(positions(p.deliver))) == len(p.deliver)
    for r in p.deliver:
        old = orig.get(r.position)
        assert r.attempt == (old.attempt if old else 0) + 1
        steps = s.backoff
        wait = steps[min(r.attempt, len(steps)) - 1] if steps and r.attempt < s.max_deliver else 0
        assert r.due == lease + wait
        if old is not None:
            assert old.attempt == 0 or old.due <= NOW, "a leased message was delivered again"
    assert positions(p.deliver) == sorted(positions(p.deliver))

    # new rows: a prefix of the candidates, within the room max_in_flight leaves
    added = positions(p.added)
    assert added == [c for c, _ in candidates[: len(added)]]
    assert len(added) <= max(0, s.max_in_flight - len(live))
    assert p.cursor == (added[-1] if added else cursor)
    for r in p.added:
        assert r.attempt in (0, 1)
        assert (r.attempt == 1) == (r.position in positions(p.deliver))
        if r.attempt == 0:
            assert s.ordered, "only ordered subscriptions park messages"
    # rows not delivered are handed back unchanged
    for r in rows:
        if r.position not in positions(p.deliver):
            assert (r.attempt, r.due) == (orig[r.position].attempt, orig[r.position].due)

    # per-key order: a delivered row is the first live row of its key
    everything = sorted(live + [r for r in p.added], key=lambda r: r.position)
    if s.ordered:
        delivered_keys = [_k(r.key) for r in p.deliver]
        assert len(delivered_keys) == len(set(delivered_keys))
        for r in p.deliver:
            earlier = [e for e in everything if e.position < r.position and _k(e.key) == _k(r.key)]
            assert earlier == [], f"{r.position} delivered before {positions(earlier)}"

    # nothing ready is left behind unless the limit was reached
    heads: set[object] = set()
    for r in live:
        head = True
        if s.ordered:
            head = _k(r.key) not in heads
            heads.add(_k(r.key))
        ready = r.attempt == 0 or r.due <= NOW
        if head and ready and len(p.deliver) < limit:
            assert r.position in positions(p.deliver)
    if len(p.deliver) < limit and len(added) < len(candidates):
        assert len(added) >= s.max_in_flight - len(live), "room and candidates left unused"

    # the timer: never in the past, and early enough for every head waiting on a lease
    if p.next_due is not None:
        assert p.next_due >= NOW
    if p.deliver:
        assert p.next_due is not None and p.next_due <= lease
    heads.clear()
    for r in live:
        if s.ordered:
            if _k(r.key) in heads:
                continue
            heads.add(_k(r.key))
        if r.position in positions(p.deliver):
            continue
        if r.attempt > 0 and r.due > NOW:
            assert p.next_due is not None and p.next_due <= r.due
        elif r.attempt == 0 or r.due <= NOW:  # ready but over the limit
            assert p.next_due == NOW


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.integers(1, 5))
def test_repeated_fetches_without_settles_respect_max_in_flight(
    case: tuple[SubscriptionSpec, list[Pending], list[tuple[int, str | None]], int, int],
    rounds: int,
) -> None:
    """Fetching again and again (time standing still) never holds more than max_in_flight
    rows once the log is being taken from, and never delivers a leased row twice."""
    s, _, candidates, _, limit = case
    pending: list[Pending] = []
    cursor = 0
    delivered: set[int] = set()
    for _ in range(rounds):
        rest = [c for c in candidates if c[0] > cursor]
        p = plan_fetch(s, pending, rest, cursor=cursor, now=NOW, limit=max(limit, 1))
        assert not delivered & set(positions(p.deliver))
        delivered |= set(positions(p.deliver))
        dead = set(positions(p.dead))
        pending = sorted([r for r in pending if r.position not in dead] + p.added,
                         key=lambda r: r.position)
        cursor = p.cursor
        assert len(pending) <= s.max_in_flight
