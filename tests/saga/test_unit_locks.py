"""The stream holds of inline units (wait-die): never two holders, never stuck.

Hypothesis draws units (each a saga's priority) and the streams each takes in order,
with small pauses between; they all run at once. Whatever the interleaving, every unit
ends (it took all its streams, or it backed off with `Contended`) well within the time
a deadlock would take, and no stream ever has two holders.
"""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

import tidings
from tidings.saga.unit import Contended, StreamLocks, Unit

STREAMS = ["a", "b", "c", "d"]

plans = st.lists(
    st.tuples(
        st.integers(0, 5),  # rank: lower is older (priority)
        st.lists(st.tuples(st.sampled_from(STREAMS), st.integers(0, 3)), min_size=1,
                 max_size=4),  # (stream, pause in ms before taking it)
    ),
    min_size=2, max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(plans)
def test_units_never_share_a_stream_and_never_deadlock(plan: list[tuple[int, list[tuple[
        str, int]]]]) -> None:
    async def run() -> dict[int, str]:
        hub = await tidings.connect("memory://")
        store = hub.events
        locks = StreamLocks(hub)
        holders: dict[str, Unit] = {}
        outcomes: dict[int, str] = {}

        async def one(i: int, rank: int, steps: list[tuple[str, int]]) -> None:
            unit = Unit(locks, (float(rank), f"u{i}"))
            mine: list[str] = []
            try:
                for stream, pause in steps:
                    await asyncio.sleep(pause / 1000)
                    if stream in mine:
                        continue
                    await unit.hold_stream(store, stream)
                    assert stream not in holders, f"{stream} held twice"
                    holders[stream] = unit
                    mine.append(stream)
                await asyncio.sleep(0.002)  # the commit
                outcomes[i] = "done"
            except Contended:
                outcomes[i] = "backed off"
            finally:
                for stream in mine:
                    del holders[stream]
                unit.close()

        try:
            async with asyncio.timeout(5.0):  # a deadlock would hang here
                await asyncio.gather(*(one(i, r, s) for i, (r, s) in enumerate(plan)))
            assert not locks.by_id  # every lock let go of (none held, none waited for)
        finally:
            await hub.close()
        return outcomes

    outcomes = asyncio.run(run())
    assert len(outcomes) == len(plan)  # every unit ended
    # the oldest unit waits behind anyone: it always gets all its streams
    oldest = min(range(len(plan)), key=lambda i: (float(plan[i][0]), f"u{i}"))
    assert outcomes[oldest] == "done"
