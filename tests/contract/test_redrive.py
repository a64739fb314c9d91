"""Dead-letter redrive on every engine: back to the original topic, to its group only,
exactly once (twice in a row, or two runs at once), with clear refusals."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_pubsub import dead_letters, none_for, read_all, take

import tidings
from tidings import Message


async def poison(hub: tidings.Hub, n: int, *, group: str = "billing", topic: str = "orders.created",
                 reason: str | None = None) -> tuple[tidings.Subscription, list[Message]]:
    """Publish `n` messages and dead-letter them all from `group`'s subscription."""
    await hub.publish_many(topic, [{"n": i} for i in range(n)], key="k")
    sub = await hub.subscribe("orders.*", group=group, max_deliver=3)
    got = await take(sub, n)
    for m in got:
        await m.term(reason=reason)
    await dead_letters(hub, f"$dlq.{group}", n, drive=sub)
    return sub, got


async def test_redrive_moves_a_dead_letter_back_to_its_group_once(hub: tidings.Hub) -> None:
    await hub.publish("orders.created", {"n": 1}, key="o-1", headers={"trace": "t"}, id="m-1")
    other = await hub.subscribe("orders.*", group="audit")
    [seen] = await take(other, 1)
    await seen.ack(wait=True)
    sub = await hub.subscribe("orders.*", group="billing", max_deliver=2)
    [m] = await take(sub, 1)
    await m.term(reason="decode-error")
    [dl] = await dead_letters(hub, "$dlq.billing", 1, drive=sub)

    [listed] = await hub.dead_letters("billing")
    assert listed.id == dl.id and listed.headers["tidings-reason"] == "decode-error"
    assert await hub.redrive("billing") == 1
    assert await hub.redrive("billing") == 0  # already moved: never twice
    assert await hub.dead_letters("billing") == []
    assert [d.id for d in await hub.dead_letters("billing", redriven=True)] == [dl.id]

    [back] = await take(sub, 1)
    assert (back.topic, back.key, back.decode(), back.attempt) == (
        "orders.created", "o-1", {"n": 1}, 1)
    assert back.headers["trace"] == "t"
    assert back.headers["tidings-redriven"] == dl.id
    assert "tidings-reason" not in back.headers and back.position > m.position
    await back.ack(wait=True)
    await none_for(other, 0.2)  # audit handled the original: it does not see it again
    assert len(await read_all(hub, "orders.created")) == 2


async def test_redrive_selects_by_topic_ids_and_limit(hub: tidings.Hub) -> None:
    await hub.publish("orders.created", b"a", id="a")
    await hub.publish("orders.paid", b"b", id="b")
    await hub.publish("orders.paid", b"c", id="c")
    await hub.publish("orders.paid", b"d", id="d")
    sub = await hub.subscribe("orders.*", group="billing")
    for m in await take(sub, 4):
        await m.term()
    dls = await dead_letters(hub, "$dlq.billing", 4, drive=sub)
    by_original = {d.headers["tidings-original-id"]: d for d in dls}

    assert [d.id for d in await hub.dead_letters("billing", topic="orders.created")] == [
        by_original["a"].id]
    assert await hub.redrive("billing", ids=["b", by_original["c"].id]) == 2  # either id
    assert await hub.redrive("billing", topic="orders.paid", limit=5) == 1
    assert [d.headers["tidings-original-id"] for d in await hub.dead_letters("billing")] == ["a"]
    with pytest.raises(tidings.NotFound, match="nope"):  # and nothing moves
        await hub.redrive("billing", ids=[by_original["a"].id, "nope"])
    assert await hub.redrive("billing", ids=["b"]) == 0  # moved already: fine, not again
    with pytest.raises(tidings.NotFound, match="no subscription 'nobody'"):
        await hub.redrive("nobody")
    back = await take(sub, 3)
    assert sorted(m.data for m in back) == [b"b", b"c", b"d"]


async def test_concurrent_redrives_move_each_dead_letter_once(hub: tidings.Hub) -> None:
    sub, _ = await poison(hub, 30)
    moved = await asyncio.gather(*(hub.redrive("billing") for _ in range(3)))
    assert sum(moved) == 30
    back = await take(sub, 30)
    assert sorted(m.decode()["n"] for m in back) == list(range(30))
    await none_for(sub, 0.2)
    assert await hub.redrive("billing") == 0


async def test_redrive_reads_a_custom_dead_letter_topic(hub: tidings.Hub) -> None:
    await hub.publish("orders.created", b"x")
    sub = await hub.subscribe("orders.*", group="billing", dead_letter="billing.failed")
    [m] = await take(sub, 1)
    await m.term()
    await dead_letters(hub, "billing.failed", 1, drive=sub)
    [dl] = await hub.dead_letters("billing")  # found where the subscription sends them
    assert dl.topic == "billing.failed"
    assert await hub.redrive("billing") == 1
    [back] = await take(sub, 1)
    assert back.data == b"x"
    assert await hub.redrive("billing", dead_letter="$dlq.billing") == 0  # said explicitly


async def test_a_redriven_message_that_fails_again_is_an_ordinary_dead_letter(
        hub: tidings.Hub) -> None:
    await hub.publish("orders.created", b"x")
    sub = await hub.subscribe("orders.*", group="billing", dead_letter="billing.failed")
    alerts = await hub.subscribe("billing.failed", group="alerts")
    [m] = await take(sub, 1)
    await m.term()
    [first] = await take(alerts, 1)
    await first.ack()
    assert await hub.redrive("billing") == 1
    [back] = await take(sub, 1)
    await back.term()  # fails again
    [second] = await take(alerts, 1)  # the alerts group sees the second dead letter too
    assert second.data == b"x" and "tidings-redrive-group" not in second.headers


async def test_a_redrive_header_set_by_hand_hides_nothing(hub: tidings.Hub) -> None:
    await hub.publish("orders.created", b"forged",
                      headers={"tidings-redrive-group": "nobody", "tidings-redriven": "x"})
    sub = await hub.subscribe("orders.*", group="billing")
    [m] = await take(sub, 1)
    assert m.data == b"forged"


async def test_a_look_that_only_finds_others_redrives_looks_again(hub: tidings.Hub) -> None:
    other = await hub.subscribe("orders.*", group="audit")
    sub, _ = await poison(hub, 1)
    [seen] = await take(other, 1)
    await seen.ack(wait=True)
    assert await hub.redrive("billing") == 1
    await hub.publish("orders.created", b"real")
    # audit's next look finds the redriven copy (not for it) before the real message:
    # one fetch with wait=0 still returns the real one
    got = await other.fetch(1, wait=0)
    assert [m.data for m in got] == [b"real"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"group": "a b"}, "group"),
    ({"group": 7}, "group"),
    ({"topic": "orders..x"}, "(?i)topic|pattern"),
    ({"ids": "m-1"}, "list"),
    ({"ids": [""]}, "id"),
    ({"ids": [5]}, "id"),
    ({"limit": 0}, "limit"),
    ({"limit": True}, "limit"),
    ({"limit": 2**64 + 0.5}, "limit"),
    ({"dead_letter": "bad topic"}, "(?i)topic"),
])
async def test_bad_redrive_arguments_are_refused(hub: tidings.Hub, kwargs: dict[str, Any],
                                                 match: str) -> None:
    sub, _ = await poison(hub, 1)
    args = {"group": "billing", **kwargs}
    group = args.pop("group")
    with pytest.raises(tidings.InvalidArgument, match=match):
        await hub.redrive(group, **args)
    with pytest.raises(tidings.InvalidArgument, match=match):
        await hub.dead_letters(group, **args)
    assert len(await hub.dead_letters("billing")) == 1  # nothing moved
    await none_for(sub, 0.1)


async def test_ids_in_tidings_namespace_are_refused_so_no_one_takes_a_redrive_s(
        hub: tidings.Hub) -> None:
    sub, _ = await poison(hub, 1)
    [dl] = await hub.dead_letters("billing")
    with pytest.raises(tidings.InvalidArgument, match="reserved"):
        await hub.publish("orders.created", b"squat", id=f"$redriven:{dl.id}")
    with pytest.raises(tidings.InvalidArgument, match="reserved"):
        await hub.publish_many("orders.created", [tidings.envelope(b"x", id="$x")])
    assert await hub.redrive("billing") == 1
    [back] = await take(sub, 1)
    assert back.decode() == {"n": 0}
