"""`tidings_fetch` (a fetch in one statement, `plan_fetch` written in SQL) against the
engine's Python planning of the same fetch, on random subscription states.

Three subscriptions start from the same state: the same cursor, floor and pending rows
(random attempts and due times, some ready, some leased, some parked, some due for
their dead letter; ordered or not, keyed messages and keyless ones), the same settles
arriving with the fetch. Two are fetched at once through `tidings_fetch` (so together
in one statement, `fetch_many`), the third through the planning path every other case
takes (`tidings_claim`, then `plan_fetch` in Python); all must deliver the same
messages with the same attempts, report the same next due time, and leave the same
rows, cursor and floor behind.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tidings
from tidings.engines.base import Settle
from tidings.engines.delivery import SubscriptionSpec
from tidings.engines.postgres import PostgresEngine

pytestmark = [pytest.mark.service]

LOG = 40  # messages in the log: topics fp.a, fp.b, other (then two of other.tail)
NOW = 1_000_000.0


@st.composite
def states(draw: Any) -> dict[str, Any]:
    max_deliver = draw(st.integers(1, 4))
    cursor = draw(st.integers(0, LOG))
    positions = draw(st.lists(st.integers(1, max(1, cursor)), max_size=8, unique=True)
                     ) if cursor else []
    rows = [(p, draw(st.integers(0, max_deliver)),
             draw(st.sampled_from([NOW - 5, NOW, NOW + 5, NOW + 50]))) for p in positions]
    kinds = st.sampled_from(["ack", "release"])
    settles = [Settle(p, draw(kinds)) for p in draw(st.lists(st.sampled_from(
        positions), max_size=4)) ] if positions else []
    return {
        "spec": dict(ack_wait=draw(st.sampled_from([1.0, 30.0])), max_deliver=max_deliver,
                     max_in_flight=draw(st.integers(1, 10)), ordered=draw(st.booleans()),
                     backoff=draw(st.sampled_from([(), (2.0,), (1.0, 7.0)]))),
        "pattern": draw(st.sampled_from(["fp.a", "fp.*", "fp.>", "*"])),
        "cursor": cursor, "rows": rows, "settles": settles,
        "limit": draw(st.integers(1, 6)),
    }


async def _copy(engine: PostgresEngine, pattern: str, spec_args: dict[str, Any],
                state: dict[str, Any]) -> tuple[int, SubscriptionSpec]:
    spec = SubscriptionSpec(f"fp-{uuid.uuid4().hex[:8]}", pattern, **spec_args)
    handle: tuple[int, SubscriptionSpec] = await engine.subscribe(spec, 0)
    sub_id = handle[0]
    lowest = min((p for p, _, _ in state["rows"]), default=None)
    floor = state["cursor"] + 1 if lowest is None else lowest
    async with engine.conns.pool.acquire() as conn:
        await conn.execute(f"UPDATE {engine.sql.schema}.tidings_subscriptions SET cursor = $2, "
                           "floor = $3 WHERE id = $1", sub_id, state["cursor"], floor)
        await conn.executemany(
            f"INSERT INTO {engine.sql.schema}.tidings_pending (sub_id, position, attempt, due) "
            "VALUES ($1, $2, $3, $4)", [(sub_id, p, a, d) for p, a, d in state["rows"]])
    return handle


async def _after(engine: PostgresEngine, sub_id: int) -> tuple[Any, ...]:
    async with engine.conns.pool.acquire() as conn:
        sub = await conn.fetchrow(f"SELECT cursor, floor FROM {engine.sql.schema}"
                                  ".tidings_subscriptions WHERE id = $1", sub_id)
        rows = await conn.fetch(f"SELECT position, attempt, due FROM {engine.sql.schema}"
                                ".tidings_pending WHERE sub_id = $1 ORDER BY position", sub_id)
    return tuple(sub), [tuple(r) for r in rows]


def test_fetch_in_one_statement_plans_as_python_does(postgres_url: str) -> None:
    async def setup() -> tidings.Hub:
        hub = await tidings.connect(postgres_url)
        for i in range(LOG):
            await hub.publish(["fp.a", "fp.b", "other"][i % 3], i,
                              key=None if i % 5 == 0 else f"k{i % 4}")
        for i in range(2):  # the newest match no pattern: a cursor may jump past them
            await hub.publish("other.tail", i)
        return hub

    loop = asyncio.new_event_loop()
    hub = loop.run_until_complete(setup())
    engine = hub.engine
    assert isinstance(engine, PostgresEngine)
    fast_calls = []

    @settings(max_examples=250, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(states())
    def check(state: dict[str, Any]) -> None:
        async def both() -> None:
            a = await _copy(engine, state["pattern"], state["spec"], state)
            a2 = await _copy(engine, state["pattern"], state["spec"], state)
            b = await _copy(engine, state["pattern"], state["spec"], state)
            # two fetches asked together go out as one statement (`fetch_many`)
            got_a, got_a2 = await asyncio.gather(
                engine.fetch(a, state["limit"], NOW, state["settles"]),
                engine.fetch(a2, state["limit"], NOW, state["settles"]))
            planned = engine._fetch_in_one
            engine._fetch_in_one = _python_only  # type: ignore[method-assign, assignment]
            try:
                got_b = await engine.fetch(b, state["limit"], NOW, state["settles"])
            finally:
                engine._fetch_in_one = planned  # type: ignore[method-assign]
            assert [(m.position, m.attempt, m.data) for m in got_a[0]] == [
                (m.position, m.attempt, m.data) for m in got_b[0]]
            assert got_a[1] == got_b[1]
            assert await _after(engine, a[0]) == await _after(engine, b[0])
            assert [(m.position, m.attempt) for m in got_a2[0]] == [
                (m.position, m.attempt) for m in got_b[0]]
            assert got_a2[1] == got_b[1]
            assert await _after(engine, a2[0]) == await _after(engine, b[0])
            fast_calls.append(state)

        loop.run_until_complete(both())

    async def _python_only(*args: Any) -> None:
        return None

    try:
        check()
    finally:
        loop.run_until_complete(hub.close())
        loop.close()
    assert fast_calls


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_pending_row_past_the_cursor_does_not_wedge_a_fetch(
        postgres_url: str, ordered: bool) -> None:
    """Rows are never past a subscription's cursor (new ones take a plain insert); were
    one there, the fetch overwrites it as the planning path does, instead of failing."""
    async with await tidings.connect(postgres_url) as hub:
        engine = hub.engine
        assert isinstance(engine, PostgresEngine)
        for i in range(3):
            await hub.publish("past.a", i, key=f"k{i}")
        handle = await _copy(engine, "past.>", {"ordered": ordered},  # (2 out, as if taken
                             {"cursor": 0, "rows": [(2, 1, time.time() + 60)]})  # and not past)
        msgs, _ = await engine.fetch(handle, 10, time.time(), [])
        (cursor, _floor), rows = await _after(engine, handle[0])
        assert cursor == 3
        if ordered:  # 2 parks behind its key's row, the row there
            assert sorted(m.position for m in msgs) == [1, 3]
            assert [(p, a) for p, a, _ in rows] == [(1, 1), (2, 0), (3, 1)]
        else:
            assert sorted(m.position for m in msgs) == [1, 2, 3]
            assert [(p, a) for p, a, _ in rows] == [(1, 1), (2, 1), (3, 1)]
