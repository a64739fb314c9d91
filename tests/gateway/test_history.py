"""The dashboard's chart points (gateway/history.py) and the newest-first reader
(gateway/replay.py): pure figures, and pages checked against a plain scan."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

import tidings
from tidings.gateway.history import LATENCY_BUCKETS, Figures, History, deliveries, latency_bucket
from tidings.gateway.replay import newest


def test_published_and_delivered_per_topic() -> None:
    before = Figures(0.0, {"a": 10, "b": 5}, {("g", "a"): 4, ("w", "*"): 0})
    after = Figures(1.0, {"a": 16, "b": 5, "c": 2}, {("g", "a"): 2, ("w", "*"): 1,
                                                    ("new", "a"): 16})
    published, delivered = deliveries(before, after)
    assert published == {"a": 6, "c": 2}
    # g: 6 arrived and its backlog fell by 2 -> 8 settled, all on a; w (a wildcard): 8
    # arrived, backlog grew by 1 -> 7 settled, shared 6:2 between a and c; the new
    # subscription's first backlog is not a delivery
    assert delivered == {"a": 8 + 7 * 6 / 8, "c": 7 * 2 / 8}


def test_nothing_arrived_but_the_backlog_shrank() -> None:
    before = Figures(0.0, {"a": 30, "b": 10}, {("g", "*"): 8})
    after = Figures(1.0, {"a": 30, "b": 10}, {("g", "*"): 4})
    assert deliveries(before, after) == ({}, {"a": 3.0, "b": 1.0})  # by their sizes


def test_the_history_keeps_the_last_minutes_and_counts_outcomes() -> None:
    h = History(seconds=10)
    first = h.add(Figures(100.0, {"a": 1}, {}))
    assert first["dt"] == 0.0 and first["published"] == {}
    point = h.add(Figures(101.0, {"a": 4}, {("g", "a"): 3},
                          [("completed", 0.004), ("compensated", 2.0), ("completed", None)]))
    assert point["published"] == {"a": 3} and point["lag"] == {"g:a": 3}
    assert point["outcomes"] == {"completed": 2, "compensated": 1}
    assert sum(point["latency"]) == 2
    assert point["latency"][0] == 1 and point["latency"][latency_bucket(2.0)] == 1
    for t in range(102, 120):
        h.add(Figures(float(t), {"a": 4}, {}))
    assert [p["t"] for p in h.points] == [float(t) for t in range(109, 120)]
    assert [p["t"] for p in h.since(117.0)] == [118.0, 119.0]


def test_latency_buckets() -> None:
    assert latency_bucket(0) == 0
    assert latency_bucket(LATENCY_BUCKETS[-1]) == len(LATENCY_BUCKETS) - 1
    assert latency_bucket(1e9) == len(LATENCY_BUCKETS)


@settings(max_examples=40, deadline=None)
@given(topics=st.lists(st.sampled_from(["a", "b", "c.d"]), min_size=0, max_size=80),
       pattern=st.sampled_from(["a", "b", "*", "c.*", ">"]),
       limit=st.integers(1, 12), after=st.integers(0, 90), upto=st.integers(0, 90))
def test_newest_is_the_tail_of_a_forward_scan(topics: list[str], pattern: str, limit: int,
                                              after: int, upto: int) -> None:
    async def run() -> None:
        async with await tidings.connect("memory://") as hub:
            for t in topics:
                await hub.publish(t, b"x")
            every = [m.position for m in await hub.engine.read(pattern, after, upto, 1000)]
            got, more = await newest(hub.engine, pattern, after, upto, limit)
            assert [m.position for m in got] == every[::-1][:limit]
            assert more == (len(every) > limit)

    asyncio.run(run())
