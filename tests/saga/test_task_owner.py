"""The coordinator's tasks (a driver per saga, discovery, replies) belong to a
`TaskOwner`: one failing leaves the others running, and closing cancels and awaits
every one, including one spawned while it closes."""

from __future__ import annotations

import asyncio

from tidings.saga.coordinator import TaskOwner


async def test_a_crashing_task_leaves_the_others_running() -> None:
    owner = TaskOwner()
    ended: list[str] = []

    async def crashes() -> None:
        raise RuntimeError("boom")

    async def lives() -> str:
        await asyncio.sleep(0.01)
        return "alive"

    bad = owner.spawn(crashes(), "bad", then=lambda t: ended.append("bad"))
    good = owner.spawn(lives(), "good", then=lambda t: ended.append(t.result()))
    await asyncio.wait([bad, good])
    await asyncio.sleep(0)  # (done callbacks run soon after)
    assert isinstance(bad.exception(), RuntimeError)
    assert ended == ["bad", "alive"]
    await owner.close()


async def test_close_cancels_and_awaits_every_task_even_one_spawned_meanwhile() -> None:
    owner = TaskOwner()
    cleaned: list[str] = []
    late: list[asyncio.Task[None]] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append(name)
            if name == "a":  # a task that starts another as it goes away
                late.append(owner.spawn(forever("late"), "late"))

    tasks = [owner.spawn(forever(n), n) for n in ("a", "b")]
    await asyncio.sleep(0)
    await owner.close()
    assert all(t.cancelled() for t in tasks + late)
    assert sorted(cleaned) == ["a", "b"]  # "late" never ran: cancelled before it started
    ran: list[str] = []
    after = owner.spawn(forever("after"), "after", then=lambda t: ran.append("then"))
    await asyncio.gather(after, return_exceptions=True)
    await asyncio.sleep(0)
    assert after.cancelled() and ran == ["then"]  # refused, but told
