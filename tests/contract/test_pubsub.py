"""The engine contract for pub/sub and streaming, through the public hub API.

Every test runs on every engine in `conftest.ENGINES`. Waits are bounded by
`asyncio.wait_for` so that a broken guarantee fails fast instead of hanging;
no test asserts that something happened *within* a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import random
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import msgspec
import pydantic
import pytest

import tidings
from tidings import Message

GUARD = 10.0  # seconds before a wait that should succeed is declared a failure


# helpers -------------------------------------------------------------------------------


async def take(sub: tidings.Subscription, n: int, *, guard: float = GUARD) -> list[Message]:
    """Exactly the next `n` deliveries (fails after `guard` seconds instead of hanging)."""
    out: list[Message] = []

    async def loop() -> None:
        while len(out) < n:
            out.extend(await sub.fetch(n - len(out), wait=0.1))

    try:
        await asyncio.wait_for(loop(), guard)
    except TimeoutError:
        pytest.fail(f"expected {n} deliveries, got {len(out)}: {out}")
    return out


async def none_for(sub: tidings.Subscription, seconds: float = 0.2) -> None:
    """Assert that nothing is delivered during `seconds` (waiting can only make this pass)."""
    got = await sub.fetch(100, wait=seconds)
    assert got == [], f"expected no delivery, got {got}"


def _gen(it: AsyncIterator[Message]) -> AsyncGenerator[Message, None]:
    """hub.read() is typed as an iterator; it is a generator, which can be closed early."""
    assert inspect.isasyncgen(it)
    return cast(AsyncGenerator[Message, None], it)


async def read_all(hub: tidings.Hub, pattern: str, **kw: Any) -> list[Message]:
    return [m async for m in hub.read(pattern, **kw)]


async def until(
    check: Callable[[], Awaitable[bool] | bool], *, guard: float = GUARD, poll: float = 0.02,
    what: str = "condition",
) -> None:
    async def loop() -> None:
        while True:
            ok = check()
            if not isinstance(ok, bool):
                ok = await ok
            if ok:
                return
            await asyncio.sleep(poll)

    try:
        await asyncio.wait_for(loop(), guard)
    except TimeoutError:
        pytest.fail(f"{what} did not become true")


async def dead_letters(
    hub: tidings.Hub, topic: str, n: int, *, drive: tidings.Subscription | None = None,
) -> list[Message]:
    """Wait for `n` dead letters on `topic`; `drive` keeps a consumer fetching meanwhile
    (an engine may move expired messages to the dead-letter topic when it is asked for more)."""
    found: list[Message] = []

    async def check() -> bool:
        if drive is not None:
            got = await drive.fetch(10, wait=0.05)
            assert got == [], f"dead-lettered message delivered again: {got}"
        found[:] = await read_all(hub, topic)
        return len(found) >= n

    await until(check, what=f"{n} dead letter(s) on {topic}")
    assert len(found) == n, found
    return found


async def pending(hub: tidings.Hub, group: str) -> int:
    for t in await hub.topics():
        for s in t["subscriptions"]:
            if s["group"] == group:
                return int(s["pending"])
    return 0


# publish and read ----------------------------------------------------------------------


async def test_publish_read_round_trip(hub: tidings.Hub) -> None:
    before = time.time()
    p1 = await hub.publish("orders.created", b"\x00raw", key="o-1",
                           headers={"Correlation-Id": "c-1", "traceparent": "00-ab"})
    p2 = await hub.publish("orders.created", "text é", key="o-2")
    p3 = await hub.publish("orders.shipped", {"id": "o-1", "n": [1, 2]})
    after = time.time()
    assert isinstance(p1, tidings.Published)
    assert p1.position < p2.position < p3.position
    assert not (p1.duplicate or p2.duplicate or p3.duplicate)
    assert len({p1.id, p2.id, p3.id}) == 3

    msgs = await read_all(hub, "orders.>")
    assert [m.position for m in msgs] == [p1.position, p2.position, p3.position]
    assert [m.id for m in msgs] == [p1.id, p2.id, p3.id]
    assert [m.topic for m in msgs] == ["orders.created", "orders.created", "orders.shipped"]
    assert [m.key for m in msgs] == ["o-1", "o-2", None]
    assert msgs[0].data == b"\x00raw" and msgs[0].decode() == b"\x00raw"
    assert msgs[1].data == "text é".encode() and msgs[1].decode() == "text é"
    assert msgs[2].decode() == {"id": "o-1", "n": [1, 2]}
    assert msgs[0].content_type == "application/octet-stream"
    assert msgs[1].content_type is not None and msgs[1].content_type.startswith("text/plain")
    assert msgs[2].content_type == "application/json"
    # header names are case-insensitive (stored lower-case); values are kept as given
    assert msgs[0].headers["correlation-id"] == "c-1"
    assert msgs[0].headers["traceparent"] == "00-ab"
    for m in msgs:
        assert m.attempt == 0
        assert m.time.tzinfo is not None and m.time.utcoffset() == timedelta(0)
        assert before - 1 <= m.time.timestamp() <= after + 1
    assert msgs[0].time <= msgs[1].time <= msgs[2].time
    assert [m.position for m in await read_all(hub, "orders.created")] == [p1.position,
                                                                          p2.position]


async def test_publish_keeps_explicit_content_type(hub: tidings.Hub) -> None:
    await hub.publish("a.b", b'{"x": 1}', headers={"Content-Type": "application/json"})
    [m] = await read_all(hub, "a.b")
    assert m.content_type == "application/json"
    assert m.decode() == {"x": 1}


async def test_replayed_message_cannot_be_settled(hub: tidings.Hub) -> None:
    await hub.publish("a.b", b"x")
    [m] = await read_all(hub, "a.b")
    with pytest.raises(tidings.InvalidArgument):
        await m.ack()


async def test_positions_increase_across_topics(hub: tidings.Hub) -> None:
    positions = [(await hub.publish(f"t.{i % 3}", i)).position for i in range(12)]
    assert positions == sorted(positions) and len(set(positions)) == 12
    assert [m.position for m in await read_all(hub, "t.*")] == positions


async def test_publish_many_stores_a_batch_in_order(hub: tidings.Hub) -> None:
    out = await hub.publish_many("orders.created", [{"n": i} for i in range(5)], key="k")
    assert [p.duplicate for p in out] == [False] * 5
    positions = [p.position for p in out]
    assert positions == sorted(positions) and len(set(positions)) == 5
    msgs = await read_all(hub, "orders.created")
    assert [m.decode() for m in msgs] == [{"n": i} for i in range(5)]
    assert {m.key for m in msgs} == {"k"}
    assert await hub.publish_many("orders.created", []) == []


async def test_publish_many_envelopes(hub: tidings.Hub) -> None:
    await hub.publish_many("a.x", [
        tidings.envelope(b"1", key="k1", headers={"h": "1"}, id="e-1"),
        tidings.envelope("2", topic="a.y"),
        b"3",
    ], key="default")
    msgs = await read_all(hub, "a.*")
    assert [(m.topic, m.key, m.data) for m in msgs] == [
        ("a.x", "k1", b"1"), ("a.y", "default", b"2"), ("a.x", "default", b"3"),
    ]
    assert msgs[0].id == "e-1" and msgs[0].headers["h"] == "1"


async def test_publish_many_is_atomic(hub: tidings.Hub) -> None:
    await hub.publish("a.b", b"before")
    bad_items: list[tuple[object, type[Exception]]] = [
        (object(), tidings.DecodeError),
        (tidings.envelope(b"x", topic="bad..topic"), tidings.InvalidTopic),
        (tidings.envelope(b"x", key=""), tidings.InvalidArgument),
        (tidings.envelope(b"x", headers={"h": 1}), tidings.InvalidArgument),  # type: ignore[dict-item]
        (b"x" * (1024 * 1024 + 1), tidings.PayloadTooLarge),
    ]
    for bad, error in bad_items:
        with pytest.raises(error):
            await hub.publish_many("a.b", [b"ok-1", {"ok": 2}, bad, b"ok-4"])
    assert [m.data for m in await read_all(hub, "a.>")] == [b"before"]


async def test_publish_with_client_id_is_idempotent(hub: tidings.Hub) -> None:
    first = await hub.publish("orders.created", {"n": 1}, id="m-1")
    again = await hub.publish("orders.created", {"n": 1}, id="m-1")
    assert first.duplicate is False and again.duplicate is True
    assert again.position == first.position and again.id == "m-1"
    other = await hub.publish("orders.created", {"n": 2}, id="m-2")
    assert other.duplicate is False and other.position > first.position
    msgs = await read_all(hub, "orders.created")
    assert [m.id for m in msgs] == ["m-1", "m-2"]


async def test_publish_many_deduplicates_within_and_across_batches(hub: tidings.Hub) -> None:
    await hub.publish("a.b", b"0", id="old")
    out = await hub.publish_many("a.b", [
        tidings.envelope(b"1", id="new"),
        tidings.envelope(b"2", id="new"),
        tidings.envelope(b"3", id="old"),
        b"4",
    ])
    assert [p.duplicate for p in out] == [False, True, True, False]
    assert out[0].position == out[1].position
    msgs = await read_all(hub, "a.b")
    assert [m.data for m in msgs] == [b"0", b"1", b"4"]
    assert out[2].position == msgs[0].position


# subscriptions: fan-out and competing consumers ------------------------------------------


async def test_fan_out_every_group_gets_every_message(hub: tidings.Hub) -> None:
    billing = await hub.subscribe("orders.*", group="billing")
    shipping = await hub.subscribe("orders.>", group="shipping")
    await hub.publish_many("orders.created", [b"1", b"2"])
    await hub.publish("orders.paid", b"3")
    await hub.publish("other.topic", b"x")
    for sub in (billing, shipping):
        got = await take(sub, 3)
        assert [m.data for m in got] == [b"1", b"2", b"3"]
        assert all(m.attempt == 1 for m in got)
        for m in got:
            await m.ack()
        await none_for(sub, 0.1)


async def test_competing_consumers_never_share_a_leased_message(hub: tidings.Hub) -> None:
    await hub.publish_many("jobs.run", [str(i) for i in range(10)])
    a = await hub.subscribe("jobs.run", group="workers", ack_wait=30, batch=4)
    b = await hub.subscribe("jobs.run", group="workers", ack_wait=30, batch=4)
    got_a = await take(a, 4)
    got_b = await take(b, 4)
    assert not {m.position for m in got_a} & {m.position for m in got_b}


async def test_competing_consumers_share_the_work_exactly_once(hub: tidings.Hub) -> None:
    n = 60
    consumers = [await hub.subscribe("jobs.run", group="workers", ack_wait=10, batch=5)
                 for _ in range(2)]
    seen: list[Counter[int]] = [Counter(), Counter()]

    async def work(i: int) -> None:
        while sum(sum(c.values()) for c in seen) < n:
            for m in await consumers[i].fetch(5, wait=0.05):
                seen[i][int(m.decode())] += 1
                await m.ack()
                await asyncio.sleep(0)

    producer = hub.publish_many("jobs.run", [str(i) for i in range(n)])
    await asyncio.wait_for(asyncio.gather(producer, work(0), work(1)), GUARD)
    total = seen[0] + seen[1]
    assert sorted(total) == list(range(n))
    assert set(total.values()) == {1}, "a promptly acked message was delivered twice"


# settling -----------------------------------------------------------------------------


async def test_ack_settles_for_good(hub: tidings.Hub) -> None:
    await hub.publish("a.b", b"x")
    sub = await hub.subscribe("a.b", group="g", ack_wait=0.2)
    [m] = await take(sub, 1)
    await m.ack()
    await m.ack()  # settling twice is harmless
    await none_for(sub, 0.3)  # well past ack_wait
    await sub.flush()
    assert await pending(hub, "g") == 0


async def test_ack_wait_returns_once_stored(
        hub: tidings.Hub, engine: Any, open_hub: Callable[..., Awaitable[tidings.Hub]]) -> None:
    await hub.publish_many("a.b", [b"ack", b"nack", b"term"])
    sub = await hub.subscribe("a.b", group="g", ack_wait=30, dead_letter="dl.g")
    a, n, t = await take(sub, 3)
    await a.ack(wait=True)
    await n.nack(delay=60, wait=True)
    await t.term(wait=True)
    await a.ack(wait=True)  # settling twice returns at once, the first decision stands
    # seen by anyone reading the store now, not only after this consumer's next write
    other = await open_hub() if engine.durable else hub
    assert await pending(other, "g") == 1  # only the nacked one, parked for 60 s
    assert [m.data for m in await read_all(other, "dl.g")] == [b"term"]


async def test_a_settle_the_engine_cannot_store_is_refused_alone(hub: tidings.Hub) -> None:
    await hub.publish_many("a.b", [b"1", b"2"])
    sub = await hub.subscribe("a.b", group="g", ack_wait=30)
    one, two = await take(sub, 2)
    forged = tidings.Message("", "", None, b"", {}, 0.0, 2**63, sub=one._sub)
    with pytest.raises(tidings.InvalidArgument, match="position"):
        await forged.ack()
    await one.ack(wait=True)  # the consumer keeps working: nothing bad was queued
    await two.nack()
    [again] = await take(sub, 1)
    assert (again.data, again.attempt) == (b"2", 2)
    await again.ack(wait=True)
    assert await pending(hub, "g") == 0


async def test_nack_redelivers_with_next_attempt(hub: tidings.Hub) -> None:
    await hub.publish("a.b", b"x")
    sub = await hub.subscribe("a.b", group="g", ack_wait=30)
    [m] = await take(sub, 1)
    assert m.attempt == 1
    await m.nack()
    [again] = await take(sub, 1)
    assert (again.position, again.attempt, again.data) == (m.position, 2, b"x")
    await again.ack()


async def test_nack_delay_postpones_redelivery(hub: tidings.Hub) -> None:
    await hub.publish_many("a.b", [b"later", b"soon"])
    sub = await hub.subscribe("a.b", group="g", ack_wait=30)
    later, soon = await take(sub, 2)
    await later.nack(delay=60)
    await soon.nack(delay=0.2)
    [again] = await take(sub, 1)
    assert (again.data, again.attempt) == (b"soon", 2)
    await again.ack()
    await none_for(sub, 0.2)  # 'later' waits its 60 s


async def test_nack_rejects_bad_delay(hub: tidings.Hub) -> None:
    await hub.publish("a.b", b"x")
    sub = await hub.subscribe("a.b", group="g")
    [m] = await take(sub, 1)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(tidings.InvalidArgument):
            await m.nack(delay=bad)
    await m.ack()


async def test_unacked_message_is_redelivered_after_ack_wait(hub: tidings.Hub) -> None:
    await hub.publish("a.b", b"x", key="k")
    sub = await hub.subscribe("a.b", group="g", ack_wait=0.2, max_deliver=5)
    attempts = []
    for _ in range(3):
        [m] = await take(sub, 1)
        attempts.append(m.attempt)
        assert m.data == b"x" and m.key == "k"
    assert attempts == [1, 2, 3]
    await m.ack()
    await none_for(sub, 0.3)


async def test_max_deliver_moves_message_to_default_dead_letter_topic(hub: tidings.Hub) -> None:
    await hub.publish("orders.created", {"n": 1}, key="o-1", headers={"trace": "t"}, id="m-1")
    sub = await hub.subscribe("orders.*", group="billing", ack_wait=0.2, max_deliver=2)
    first = await take(sub, 1)
    second = await take(sub, 1)
    assert [first[0].attempt, second[0].attempt] == [1, 2]
    [dl] = await dead_letters(hub, "$dlq.billing", 1, drive=sub)
    assert dl.decode() == {"n": 1} and dl.key == "o-1"
    assert dl.headers["trace"] == "t" and dl.content_type == "application/json"
    assert dl.headers["tidings-original-topic"] == "orders.created"
    assert dl.headers["tidings-original-id"] == "m-1"
    assert dl.headers["tidings-original-position"] == str(first[0].position)
    assert dl.headers["tidings-group"] == "billing"
    assert dl.headers["tidings-reason"] == "max_deliver"
    assert dl.headers["tidings-attempts"] == "2"
    assert dl.id != "m-1"
    await none_for(sub, 0.2)


async def test_nack_after_last_attempt_dead_letters_to_custom_topic(hub: tidings.Hub) -> None:
    await hub.publish("orders.created", b"x")
    sub = await hub.subscribe("orders.*", group="billing", ack_wait=30, max_deliver=2,
                              dead_letter="billing.failed")
    [m] = await take(sub, 1)
    await m.nack()
    [m] = await take(sub, 1)
    assert m.attempt == 2
    await m.nack()
    [dl] = await dead_letters(hub, "billing.failed", 1, drive=sub)
    assert dl.headers["tidings-reason"] == "max_deliver"
    assert dl.headers["tidings-attempts"] == "2"
    assert await read_all(hub, "$dlq.>") == []


async def test_term_dead_letters_immediately(hub: tidings.Hub) -> None:
    await hub.publish("orders.created", b"poison", id="p-1")
    sub = await hub.subscribe("orders.*", group="billing", ack_wait=0.2, max_deliver=5)
    [m] = await take(sub, 1)
    await m.term()
    [dl] = await dead_letters(hub, "$dlq.billing", 1, drive=sub)
    assert dl.data == b"poison"
    assert dl.headers["tidings-reason"] == "terminated"
    assert dl.headers["tidings-attempts"] == "1"
    assert dl.headers["tidings-original-id"] == "p-1"
    await none_for(sub, 0.3)


async def test_term_reason_labels_the_dead_letter(hub: tidings.Hub) -> None:
    await hub.publish_many("orders.created", [b"a", b"b"])
    sub = await hub.subscribe("orders.*", group="billing", max_deliver=5)
    a, b = await take(sub, 2)
    for bad in ("", "has space", "x" * 65, "é", "٣", 7):
        with pytest.raises(tidings.InvalidArgument, match="term reason"):
            await a.term(reason=bad)  # type: ignore[arg-type]
    with pytest.raises(tidings.InvalidArgument, match="term error"):
        await a.term(error=b"bytes")  # type: ignore[arg-type]
    await a.term(reason="decode-error",
                 error="$.id: expected str,\n got\x00\x1b int" + "x" * 2000)
    await b.term()
    dls = await dead_letters(hub, "$dlq.billing", 2, drive=sub)
    by_reason = {d.headers["tidings-reason"]: d for d in dls}
    assert sorted(by_reason) == ["decode-error", "terminated"]
    error = by_reason["decode-error"].headers["tidings-error"]
    assert error.startswith("$.id: expected str, got int") and len(error) == 1000
    assert "tidings-error" not in by_reason["terminated"].headers


async def test_backoff_spaces_redeliveries_after_nacks(hub: tidings.Hub) -> None:
    await hub.publish("a.b", b"x")
    sub = await hub.subscribe("a.b", group="g", ack_wait=30, max_deliver=5,
                              backoff=[0.3, 3600])
    [m] = await take(sub, 1)
    nacked = time.monotonic()
    await m.nack()  # no delay: the first backoff step
    [again] = await take(sub, 1)
    assert again.attempt == 2
    assert time.monotonic() - nacked >= 0.29  # never before its delay
    await again.nack()  # the second step (an hour), then the last repeats
    await none_for(sub, 0.4)


async def test_explicit_nack_delay_overrides_backoff(hub: tidings.Hub) -> None:
    await hub.publish("a.b", b"x")
    sub = await hub.subscribe("a.b", group="g", ack_wait=30, backoff=[3600])
    [m] = await take(sub, 1)
    await m.nack(delay=0)
    [again] = await take(sub, 1)
    assert again.attempt == 2
    await again.ack()


async def test_backoff_waits_after_a_lease_runs_out(hub: tidings.Hub) -> None:
    await hub.publish("a.b", b"x")
    sub = await hub.subscribe("a.b", group="g", ack_wait=0.2, max_deliver=3, backoff=[0.3])
    [m] = await take(sub, 1)
    delivered = time.monotonic()
    [again] = await take(sub, 1)  # not acked: back after its lease and the backoff
    assert again.attempt == 2
    assert time.monotonic() - delivered >= 0.49
    await again.ack()


@pytest.mark.parametrize("bad", ["1,2", [], [-1], [float("nan")], [float("inf")], [True],
                                 ["1"], [1] * 101, [86_401], 5])
async def test_bad_backoff_is_refused(hub: tidings.Hub, bad: Any) -> None:
    with pytest.raises(tidings.InvalidArgument, match="backoff"):
        await hub.subscribe("a.b", group="g", backoff=bad)
    with pytest.raises(tidings.InvalidArgument, match="backoff"):
        hub.subscriber("a.b", group="g", backoff=bad)
    assert await hub.engine.subscriptions() == []


async def test_dead_letter_topic_must_be_outside_the_pattern(hub: tidings.Hub) -> None:
    with pytest.raises(tidings.InvalidArgument, match="dead-letter"):
        await hub.subscribe("orders.>", group="g", dead_letter="orders.dlq")


# ordering and flow control ------------------------------------------------------------


async def test_ordered_keeps_one_in_flight_per_key(hub: tidings.Hub) -> None:
    await hub.publish_many("o.e", [
        tidings.envelope("a1", key="a"), tidings.envelope("b1", key="b"),
        tidings.envelope("a2", key="a"), tidings.envelope("b2", key="b"),
        tidings.envelope("a3", key="a"), tidings.envelope("c1", key="c"),
    ])
    sub = await hub.subscribe("o.e", group="g", ordered=True, ack_wait=30, max_in_flight=10)
    heads = await take(sub, 3)
    assert sorted(m.decode() for m in heads) == ["a1", "b1", "c1"]
    await none_for(sub, 0.2)  # a2 and b2 wait for their keys' heads
    by = {m.decode(): m for m in heads}
    await by["b1"].ack()
    [b2] = await take(sub, 1)
    assert b2.decode() == "b2"
    await by["a1"].nack()
    [a1] = await take(sub, 1)
    assert (a1.decode(), a1.attempt) == ("a1", 2)  # the retry comes before a2
    await none_for(sub, 0.2)
    await a1.ack()
    [a2] = await take(sub, 1)
    assert a2.decode() == "a2"
    await a2.term()  # a dead-lettered head also releases its key
    [a3] = await take(sub, 1)
    assert a3.decode() == "a3"


async def test_ordered_waits_out_an_expired_lease(hub: tidings.Hub) -> None:
    await hub.publish_many("o.e", [tidings.envelope(f"k{i}", key="k") for i in range(2)])
    sub = await hub.subscribe("o.e", group="g", ordered=True, ack_wait=0.2)
    [m] = await take(sub, 1)
    [again] = await take(sub, 1)  # the lease ran out: the same head again, not k1
    assert (again.decode(), again.attempt) == ("k0", 2)
    await again.ack()
    [nxt] = await take(sub, 1)
    assert nxt.decode() == "k1"


async def test_ordered_keyless_messages_go_one_at_a_time_by_position(hub: tidings.Hub) -> None:
    await hub.publish_many("o.e", [b"1", b"2", b"3"])
    sub = await hub.subscribe("o.e", group="g", ordered=True, ack_wait=30)
    order = []
    for _ in range(3):
        [m] = await take(sub, 1)
        await none_for(sub, 0.1)
        order.append(m.data)
        await m.ack()
    assert order == [b"1", b"2", b"3"]


async def test_ordered_many_keys_keep_order_under_random_settles(hub: tidings.Hub) -> None:
    rng = random.Random(7)
    keys = ["a", "b", "c", "d"]
    items = [(rng.choice(keys), i) for i in range(60)]
    await hub.publish_many("o.e", [tidings.envelope({"i": i}, key=k) for k, i in items])
    expected = {k: [i for kk, i in items if kk == k] for k in keys}
    sub = await hub.subscribe("o.e", group="g", ordered=True, ack_wait=30, max_in_flight=8)
    done: dict[str, list[int]] = {k: [] for k in keys}
    held: dict[str, Message] = {}

    async def loop() -> None:
        while sum(map(len, done.values())) < len(items):
            for m in await sub.fetch(8, wait=0.05):
                assert m.key not in held, f"two messages of key {m.key} in flight"
                held[m.key] = m  # type: ignore[index]
            for k in list(held):
                m = held[k]
                roll = rng.random()
                if roll < 0.6:
                    del held[k]
                    await m.ack()
                    done[k].append(m.decode()["i"])
                elif roll < 0.8:
                    del held[k]
                    await m.nack()
    await asyncio.wait_for(loop(), GUARD)
    assert done == expected


async def test_max_in_flight_is_never_exceeded(hub: tidings.Hub) -> None:
    await hub.publish_many("a.b", [str(i) for i in range(20)])
    a = await hub.subscribe("a.b", group="g", ack_wait=30, max_in_flight=3)
    b = await hub.subscribe("a.b", group="g", ack_wait=30, max_in_flight=3)
    first = await take(a, 3)
    await none_for(a, 0.2)
    await none_for(b, 0.1)
    await first[0].ack()
    [nxt] = await take(b, 1)
    assert nxt.position not in {m.position for m in first}
    await none_for(a, 0.1)


async def test_max_in_flight_holds_under_concurrent_consumers(hub: tidings.Hub) -> None:
    limit, n = 4, 50
    await hub.publish_many("a.b", [str(i) for i in range(n)])
    consumers = [await hub.subscribe("a.b", group="g", ack_wait=30, max_in_flight=limit)
                 for _ in range(3)]
    out: set[int] = set()  # delivered and not yet acked (as the consumers see it)
    acked: set[int] = set()
    rng = random.Random(3)

    async def work(sub: tidings.Subscription) -> None:
        mine: list[Message] = []
        while len(acked) < n:
            for m in await sub.fetch(limit, wait=0.02):
                assert m.position not in out
                out.add(m.position)
                assert len(out) <= limit, f"{len(out)} unacked deliveries > {limit}"
                mine.append(m)
            rng.shuffle(mine)
            while mine and rng.random() < 0.7:
                m = mine.pop()
                out.discard(m.position)  # before ack: the engine may only count fewer
                acked.add(m.position)
                await m.ack()
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(*(work(c) for c in consumers)), GUARD)
    assert len(acked) == n


async def test_idle_consumer_does_not_poll_in_a_busy_loop(hub: tidings.Hub) -> None:
    sub = await hub.subscribe("idle.x", group="g")
    engine = hub.engine
    calls = 0
    real_fetch = engine.fetch

    async def counting_fetch(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        return await real_fetch(*args, **kw)

    engine.fetch = counting_fetch  # type: ignore[method-assign]
    try:
        assert await sub.fetch(10, wait=0.3) == []
    finally:
        del engine.fetch
    # Waiting is driven by wake-ups and due times; a handful of looks is fine, hundreds is a spin.
    assert calls <= 10, f"{calls} engine fetches while idle for 0.3 s"


# where a subscription starts -------------------------------------------------------------


async def test_start_positions(hub: tidings.Hub) -> None:
    ps = [p.position for p in await hub.publish_many("s.t", [b"1", b"2", b"3"])]
    begin = await hub.subscribe("s.t", group="begin")
    end = await hub.subscribe("s.t", group="end", start="end")
    at = await hub.subscribe("s.t", group="at", start=ps[1])
    at_str = await hub.subscribe("s.t", group="atstr", start=str(ps[2]))
    default = await hub.subscribe("s.t", group="default")
    await hub.publish("s.t", b"4")
    assert [m.data for m in await take(begin, 4)] == [b"1", b"2", b"3", b"4"]
    assert [m.data for m in await take(default, 4)] == [b"1", b"2", b"3", b"4"]
    assert [m.data for m in await take(end, 1)] == [b"4"]
    assert [m.data for m in await take(at, 3)] == [b"2", b"3", b"4"]
    assert [m.data for m in await take(at_str, 2)] == [b"3", b"4"]
    for sub in (begin, end, at, at_str, default):
        await none_for(sub, 0.05)


async def test_start_at_a_time(hub: tidings.Hub) -> None:
    await hub.publish("s.t", b"old")
    await asyncio.sleep(0.02)
    await hub.publish("s.t", b"new-1")
    await hub.publish("s.t", b"new-2")
    msgs = await read_all(hub, "s.t")
    t = msgs[1].time
    assert msgs[0].time < t
    by_dt = await hub.subscribe("s.t", group="dt", start=t)
    by_iso = await hub.subscribe("s.t", group="iso", start=t.isoformat())
    naive = await hub.subscribe("s.t", group="naive",
                                start=t.astimezone(UTC).replace(tzinfo=None).isoformat())
    future = await hub.subscribe("s.t", group="future", start=t + timedelta(days=1))
    for sub in (by_dt, by_iso, naive):
        assert [m.data for m in await take(sub, 2)] == [b"new-1", b"new-2"]
    await none_for(future, 0.05)


async def test_start_applies_only_when_the_subscription_is_created(hub: tidings.Hub) -> None:
    await hub.publish_many("s.t", [b"1", b"2"])
    sub = await hub.subscribe("s.t", group="g")
    [m] = await take(sub, 1)
    await m.ack()
    await sub.close()
    again = await hub.subscribe("s.t", group="g", start="end")  # existing: resumes instead
    assert [m.data for m in await take(again, 1)] == [b"2"]


async def test_bad_start_is_rejected(hub: tidings.Hub) -> None:
    for bad in ["middle", -1, True, 1.5, "2024-13-45", None, "²", "٣", 2**63, str(2**63)]:
        with pytest.raises(tidings.InvalidArgument):
            await hub.subscribe("s.t", group="g", start=bad)  # type: ignore[arg-type]
        with pytest.raises(tidings.InvalidArgument):
            await read_all(hub, "s.t", start=bad)  # type: ignore[arg-type]
    with pytest.raises(tidings.InvalidArgument):
        await read_all(hub, "s.t", stop="²")
    await hub.publish("s.t", b"x")
    assert len(await read_all(hub, "s.t", stop=2**64)) == 1  # past the end: up to it


# replay -----------------------------------------------------------------------------------


async def test_read_with_start_and_stop_positions(hub: tidings.Hub) -> None:
    ps = [p.position for p in await hub.publish_many("r.a", [str(i) for i in range(6)])]
    await hub.publish("r.b", "other")

    async def datas(**kw: Any) -> list[str]:
        return [m.decode() for m in await read_all(hub, "r.a", **kw)]

    assert await datas() == ["0", "1", "2", "3", "4", "5"]
    assert await datas(start=ps[2]) == ["2", "3", "4", "5"]  # start inclusive
    assert await datas(stop=ps[3]) == ["0", "1", "2", "3"]  # stop inclusive
    assert await datas(start=ps[1], stop=ps[2]) == ["1", "2"]
    assert await datas(start=str(ps[4])) == ["4", "5"]
    assert await datas(start="end") == []
    assert await datas(start=ps[3], stop=ps[2]) == []
    assert [m.decode() for m in await read_all(hub, "r.*", start=ps[5])] == ["5", "other"]
    assert [m.decode() for m in await read_all(hub, "r.a", page=2)] == [str(i) for i in range(6)]


async def test_read_with_times(hub: tidings.Hub) -> None:
    await hub.publish("r.a", "0")
    await asyncio.sleep(0.02)
    await hub.publish("r.a", "1")
    await asyncio.sleep(0.02)
    await hub.publish("r.a", "2")
    m0, m1, m2 = await read_all(hub, "r.a")
    assert m0.time < m1.time < m2.time

    async def datas(**kw: Any) -> list[str]:
        return [m.decode() for m in await read_all(hub, "r.a", **kw)]

    assert await datas(start=m1.time) == ["1", "2"]  # start time inclusive
    assert await datas(stop=m2.time) == ["0", "1"]  # stop time exclusive
    assert await datas(start=m1.time, stop=m2.time) == ["1"]
    assert await datas(start=m1.time.isoformat(), stop=m2.time.isoformat()) == ["1"]
    assert await datas(start=datetime.now(UTC) + timedelta(hours=1)) == []


async def test_read_ends_at_the_last_message_stored_when_called(hub: tidings.Hub) -> None:
    await hub.publish_many("r.a", [b"1", b"2"])
    got = []
    async with aclosing(_gen(hub.read("r.a", page=1))) as it:
        async for m in it:
            got.append(m.data)
            await hub.publish("r.a", b"late")
    assert got == [b"1", b"2"]


async def test_read_follow_sees_new_messages(hub: tidings.Hub) -> None:
    await hub.publish("r.a", b"1")
    got: list[bytes] = []

    async def follow() -> None:
        async with aclosing(_gen(hub.read("r.>", follow=True))) as it:
            async for m in it:
                got.append(m.data)
                if len(got) == 3:
                    return

    task = asyncio.create_task(follow())
    await until(lambda: len(got) == 1, what="the stored message")
    await hub.publish("r.a", b"2")
    await hub.publish("other.topic", b"no")
    await hub.publish("r.b.c", b"3")
    await asyncio.wait_for(task, GUARD)
    assert got == [b"1", b"2", b"3"]


async def test_read_follow_with_stop_ends_there(hub: tidings.Hub) -> None:
    p = await hub.publish("r.a", b"1")

    async def follow() -> list[bytes]:
        return [m.data async for m in hub.read("r.a", follow=True, stop=p.position + 1)]

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    await hub.publish("r.a", b"2")
    assert await asyncio.wait_for(task, GUARD) == [b"1", b"2"]


# retention --------------------------------------------------------------------------------


async def test_retention_max_messages(hub: tidings.Hub) -> None:
    await hub.publish_many("ret.a", [str(i) for i in range(5)])
    await hub.publish_many("ret.b", [str(i) for i in range(5)])
    await hub.set_retention("ret.a", max_messages=2)
    assert await hub.trim() == 3
    assert [m.decode() for m in await read_all(hub, "ret.a")] == ["3", "4"]
    assert len(await read_all(hub, "ret.b")) == 5  # other topics untouched
    assert await hub.trim() == 0
    await hub.publish("ret.a", "5")
    assert await hub.trim() == 1
    assert [m.decode() for m in await read_all(hub, "ret.a")] == ["4", "5"]
    [info] = [t for t in await hub.topics() if t["topic"] == "ret.a"]
    assert info["messages"] == 2


async def test_retention_max_bytes(hub: tidings.Hub) -> None:
    await hub.publish_many("ret.a", [b"x" * 10 for _ in range(5)])
    await hub.set_retention("ret.a", max_bytes=25)
    assert await hub.trim() == 3
    assert len(await read_all(hub, "ret.a")) == 2


async def test_retention_max_age(hub: tidings.Hub) -> None:
    await hub.publish_many("ret.a", [b"1", b"2"])
    await hub.set_retention("ret.a", max_age=3600)
    assert await hub.trim() == 0
    await asyncio.sleep(0.02)
    await hub.set_retention("ret.a", max_age=0)
    assert await hub.trim() == 2
    assert await read_all(hub, "ret.a") == []


async def test_retention_never_trims_what_a_subscription_still_needs(hub: tidings.Hub) -> None:
    ps = [p.position for p in await hub.publish_many("ret.a", [str(i) for i in range(6)])]
    sub = await hub.subscribe("ret.*", group="g", ack_wait=30)
    await hub.subscribe("elsewhere.*", group="other")  # does not match: does not hold back
    await hub.set_retention("ret.a", max_messages=0)
    assert await hub.trim() == 0  # nothing delivered yet
    m0, m1, m2 = await take(sub, 3)
    await m0.ack()
    await m2.ack()
    await sub.flush()
    assert await hub.trim() == 1  # only position 0: position 1 is unacked
    assert [m.position for m in await read_all(hub, "ret.a")] == ps[1:]
    await m1.ack()
    await sub.flush()
    assert await hub.trim() == 2  # 0-2 done; 3-5 not yet delivered
    rest = await take(sub, 3)
    for m in rest:
        await m.ack()
    await sub.flush()
    assert await hub.trim() == 3
    assert await read_all(hub, "ret.a") == []


async def test_bad_retention_is_rejected(hub: tidings.Hub) -> None:
    bad: list[dict[str, Any]] = [{"max_age": -1}, {"max_messages": -1}, {"max_bytes": -5},
                                 {"max_messages": True}]
    for kw in bad:
        with pytest.raises(tidings.InvalidArgument):
            await hub.set_retention("ret.a", **kw)


# durability -------------------------------------------------------------------------------


@pytest.mark.durable
async def test_durable_subscription_resumes_where_acked(
    engine_url: str, open_hub: Callable[..., Awaitable[tidings.Hub]]
) -> None:
    first = await open_hub()
    await first.publish_many("d.t", [str(i) for i in range(5)])
    sub = await first.subscribe("d.t", group="g", ack_wait=0.2)
    done = await take(sub, 2)
    for m in done:
        await m.ack()
    [unacked] = await take(sub, 1)
    await first.close()

    second = await open_hub()
    assert [m.decode() for m in await read_all(second, "d.t")] == [str(i) for i in range(5)]
    again = await second.subscribe("d.t", group="g", ack_wait=0.2, start="end")
    got = await take(again, 3)
    assert sorted(m.decode() for m in got) == ["2", "3", "4"]
    [m2] = [m for m in got if m.decode() == "2"]
    assert m2.position == unacked.position and m2.attempt == 2
    for m in got:
        await m.ack()
    await none_for(again, 0.3)
    dup = await second.publish("d.t", b"x", id="stable")
    await second.close()
    third = await open_hub()
    assert (await third.publish("d.t", b"x", id="stable")).duplicate is True
    assert (await third.publish("d.t", b"x", id="stable")).position == dup.position


# typed payloads ---------------------------------------------------------------------------


@dataclasses.dataclass
class Line:
    sku: str
    qty: int


@dataclasses.dataclass
class OrderDC:
    id: str
    lines: list[Line]
    note: str | None = None


class OrderStruct(msgspec.Struct):
    id: str
    lines: list[int]
    paid: bool = False


class OrderModel(pydantic.BaseModel):
    id: str
    total: float
    tags: list[str] = []


PAYLOADS: list[tuple[str, object, Any, object]] = [
    # (id, payload, type to decode as, expected msg.decode())
    ("bytes", b"\x00\xffraw", bytes, b"\x00\xffraw"),
    ("str", "héllo wörld", str, "héllo wörld"),
    ("dict", {"a": 1, "b": [True, None, 1.5]}, dict, {"a": 1, "b": [True, None, 1.5]}),
    ("list", [1, "two", {"three": 3}], list, [1, "two", {"three": 3}]),
    ("dataclass", OrderDC("o-1", [Line("s", 2)]), OrderDC,
     {"id": "o-1", "lines": [{"sku": "s", "qty": 2}], "note": None}),
    ("struct", OrderStruct("o-2", [1, 2], paid=True), OrderStruct,
     {"id": "o-2", "lines": [1, 2], "paid": True}),
    ("pydantic", OrderModel(id="o-3", total=9.5, tags=["x"]), OrderModel,
     {"id": "o-3", "total": 9.5, "tags": ["x"]}),
]


async def test_typed_payloads_round_trip(hub: tidings.Hub) -> None:
    for name, payload, _, _ in PAYLOADS:
        await hub.publish(f"typed.{name}", payload)
    sub = await hub.subscribe("typed.*", group="g")
    delivered = await take(sub, len(PAYLOADS))
    replayed = await read_all(hub, "typed.*")
    for (name, payload, typ, plain), d, r in zip(PAYLOADS, delivered, replayed, strict=True):
        for m in (d, r):
            assert m.topic == f"typed.{name}"
            assert m.decode() == plain, name
            decoded = m.decode(typ)
            assert type(decoded) is typ, name
            assert decoded == payload, name
            assert m.decode(bytes) == m.data
        await d.ack()


async def test_decode_errors_raise_decode_error(hub: tidings.Hub) -> None:
    cases: list[tuple[str, object, Any]] = [
        ("struct-missing", {"id": "o-1"}, OrderStruct),
        ("dataclass-type", {"id": 1, "lines": []}, OrderDC),
        ("pydantic", {"id": "o", "total": "lots"}, OrderModel),
        ("text-as-dict", "not json", dict),
        ("bad-utf8", b"\xff\xfe", str),
        ("list-as-int", [1, 2], int),
    ]
    for name, payload, _ in cases:
        await hub.publish(f"typed.{name}", payload)
    for (name, _, typ), m in zip(cases, await read_all(hub, "typed.*"), strict=True):
        with pytest.raises(tidings.DecodeError):
            m.decode(typ)
            pytest.fail(f"{name}: decoded without an error")


async def test_invalid_json_with_json_content_type_raises_decode_error(hub: tidings.Hub) -> None:
    await hub.publish("typed.x", b"{nope", headers={"content-type": "application/json"})
    [m] = await read_all(hub, "typed.x")
    with pytest.raises(tidings.DecodeError):
        m.decode()


async def test_unencodable_payload_raises_and_stores_nothing(hub: tidings.Hub) -> None:
    with pytest.raises(tidings.DecodeError):
        await hub.publish("typed.x", object())
    with pytest.raises(tidings.DecodeError):
        await hub.publish("typed.x", {"when": 1j})
    assert await read_all(hub, "typed.>") == []


# bad input ----------------------------------------------------------------------------------

BAD_TOPICS = ["", ".", "a..b", "a.", ".a", "a b", "a.*", "a.>", "*", ">", "ä.b", "a/b",
              "a\n", "x" * 256, 7, None, b"a.b"]
BAD_PATTERNS = ["", "a..b", "a.>.b", ">.a", "a.b*", "a.*x", "a b", "a\n", "x" * 256, None, 3]


async def test_invalid_topics_are_rejected_with_the_rule(hub: tidings.Hub) -> None:
    rule = "dot-separated tokens"
    for topic in BAD_TOPICS:
        with pytest.raises(tidings.InvalidTopic, match=rule):
            await hub.publish(topic, b"x")  # type: ignore[arg-type]
        with pytest.raises(tidings.InvalidTopic, match=rule):
            await hub.publish_many(topic, [b"x"])  # type: ignore[arg-type]
        if topic:  # an envelope without a topic uses the batch's
            with pytest.raises(tidings.InvalidTopic, match=rule):
                await hub.publish_many("ok.topic", [tidings.envelope(b"x", topic=topic)])  # type: ignore[arg-type]
        with pytest.raises(tidings.InvalidTopic):
            await hub.set_retention(topic, max_messages=1)  # type: ignore[arg-type]
    assert await read_all(hub, ">") == []


async def test_invalid_patterns_are_rejected_with_the_rule(hub: tidings.Hub) -> None:
    for pattern in BAD_PATTERNS:
        with pytest.raises(tidings.InvalidTopic) as info:
            await hub.subscribe(pattern, group="g")  # type: ignore[arg-type]
        assert "token" in str(info.value)
        with pytest.raises(tidings.InvalidTopic):
            hub.read(pattern)  # type: ignore[arg-type]


async def test_valid_names_are_accepted(hub: tidings.Hub) -> None:
    for topic in ["a", "orders.created", "A-b_c.9", "x" * 255, "a.b.c.d.e.f"]:
        await hub.publish(topic, b"x")
    for pattern in ["*", ">", "a.*", "a.>", "*.*", "*.b.>", "orders.created"]:
        await hub.subscribe(pattern, group="g")


async def test_payload_size_limit(hub: tidings.Hub) -> None:
    limit = 1024 * 1024
    await hub.publish("big.ok", b"x" * limit)
    with pytest.raises(tidings.PayloadTooLarge, match="max_payload"):
        await hub.publish("big.no", b"x" * (limit + 1))
    with pytest.raises(tidings.PayloadTooLarge):
        await hub.publish("big.no", "é" * (limit // 2 + 1))  # 2 bytes each once encoded
    assert await read_all(hub, "big.no") == []
    assert len(await read_all(hub, "big.ok")) == 1


async def test_payload_size_limit_is_configurable(
    open_hub: Callable[..., Awaitable[tidings.Hub]]
) -> None:
    small = await open_hub(max_payload=10)
    await small.publish("s.ok", b"x" * 10)
    with pytest.raises(tidings.PayloadTooLarge):
        await small.publish("s.no", b"x" * 11)
    with pytest.raises(tidings.PayloadTooLarge):
        await small.publish("s.no", {"much": "too long"})
    assert await read_all(small, "s.no") == []


async def test_bad_key_headers_and_id_are_rejected(hub: tidings.Hub) -> None:
    for key in ["", 5, b"k", "k" * 256]:
        with pytest.raises(tidings.InvalidArgument):
            await hub.publish("a.b", b"x", key=key)  # type: ignore[arg-type]
        with pytest.raises(tidings.InvalidArgument):
            await hub.publish_many("a.b", [b"x"], key=key)  # type: ignore[arg-type]
    for headers in [{"h": 1}, {1: "v"}, {"": "v"}, ["h", "v"], {"h": None}]:
        with pytest.raises(tidings.InvalidArgument):
            await hub.publish("a.b", b"x", headers=headers)  # type: ignore[arg-type]
    for id in ["", 5, "i" * 256]:
        with pytest.raises(tidings.InvalidArgument):
            await hub.publish("a.b", b"x", id=id)  # type: ignore[arg-type]
    assert await read_all(hub, "a.b") == []


async def test_bad_subscription_settings_are_rejected(hub: tidings.Hub) -> None:
    bad: list[dict[str, Any]] = [
        {"group": "a.b"}, {"group": ""}, {"group": "$dlq"}, {"group": 5}, {"ack_wait": 0},
        {"ack_wait": -1}, {"ack_wait": float("nan")}, {"max_deliver": 0},
        {"max_deliver": 1.5}, {"max_in_flight": 0}, {"dead_letter": "bad..topic"},
    ]
    for kw in bad:
        args: dict[str, Any] = {"group": "g", **kw}
        with pytest.raises(tidings.InvalidArgument):
            await hub.subscribe("a.*", **args)
        with pytest.raises(tidings.InvalidArgument):
            hub.subscriber("a.*", **args)


async def test_closed_hub_raises_closed_error(engine_url: str) -> None:
    hub = await tidings.connect(engine_url)
    await hub.publish("a.b", b"x")
    await hub.close()
    await hub.close()  # idempotent
    assert hub.closed
    with pytest.raises(tidings.ClosedError):
        await hub.publish("a.b", b"x")
    with pytest.raises(tidings.ClosedError):
        await hub.publish_many("a.b", [b"x"])
    with pytest.raises(tidings.ClosedError):
        await hub.subscribe("a.b", group="g")
    with pytest.raises(tidings.ClosedError):
        hub.read("a.b")
    with pytest.raises(tidings.ClosedError):
        await hub.set_retention("a.b", max_messages=1)
    with pytest.raises(tidings.ClosedError):
        await hub.trim()
    with pytest.raises(tidings.ClosedError):
        await hub.topics()
    with pytest.raises(tidings.ClosedError):
        await hub.run()


async def test_closing_the_hub_ends_a_subscription(hub: tidings.Hub) -> None:
    sub = await hub.subscribe("a.b", group="g")
    await hub.close()
    assert await sub.fetch(10, wait=0.1) == []
    assert [m async for m in sub] == []


@pytest.mark.parametrize(
    "url, error",
    [("nope", tidings.InvalidArgument), ("redis://localhost", tidings.InvalidArgument),
     ("sqlite://", tidings.InvalidArgument), (42, tidings.InvalidArgument)],
    ids=["not-a-url", "unknown-scheme", "sqlite-no-path", "not-a-str"],
)
async def test_bad_urls_raise_tidings_errors(url: Any, error: Any) -> None:
    with pytest.raises(error) as info:
        await tidings.connect(url)
    assert isinstance(info.value, tidings.TidingsError)
    assert "sqlite:///" in str(info.value)  # says what to use instead


async def test_separate_broker_is_reported_unsupported() -> None:
    with pytest.raises(tidings.Unsupported):
        await tidings.connect("memory://", broker="nats://127.0.0.1:4222")


# handlers: hub.subscriber + hub.run ----------------------------------------------------------


async def _run_until(hub: tidings.Hub, check: Callable[[], Awaitable[bool]], what: str) -> None:
    runner = asyncio.create_task(hub.run())
    try:
        await until(check, what=what)
    finally:
        runner.cancel()
        # asyncio.wait does not cancel again on timeout (wait_for would, and then wait forever)
        await asyncio.wait({runner}, timeout=GUARD)
    assert runner.done(), "hub.run() did not stop when its task was cancelled"
    assert runner.cancelled()


async def test_failing_handler_follows_the_subscription_backoff(hub: tidings.Hub) -> None:
    calls: list[float] = []

    @hub.subscriber("h.*", group="h", backoff=[0.3, 3600], retry_backoff=0)
    async def handle(msg: Message) -> None:
        calls.append(time.monotonic())
        raise RuntimeError("try again later")

    await hub.publish("h.x", b"1")

    async def retried() -> bool:
        return len(calls) >= 2

    await _run_until(hub, retried, "second attempt")
    assert calls[1] - calls[0] >= 0.29  # backoff[0], not retry_backoff's 0


async def test_handler_is_acked_on_return(hub: tidings.Hub) -> None:
    seen: list[tuple[bytes, int]] = []

    @hub.subscriber("h.*", group="h", ack_wait=0.2)
    async def handle(msg: Message) -> None:
        seen.append((msg.data, msg.attempt))

    await hub.publish_many("h.x", [b"1", b"2", b"3"])

    async def all_acked() -> bool:
        return len(seen) >= 3 and await pending(hub, "h") == 0

    await _run_until(hub, all_acked, "every message handled and acked")
    await asyncio.sleep(0.3)  # past ack_wait: nothing comes back
    assert seen == [(b"1", 1), (b"2", 1), (b"3", 1)]
    assert await read_all(hub, "$dlq.h") == []


async def test_failing_handler_is_retried_then_dead_lettered(hub: tidings.Hub) -> None:
    attempts: list[int] = []

    @hub.subscriber("h.*", group="h", max_deliver=3, retry_backoff=0.01, ack_wait=30)
    async def handle(msg: Message) -> None:
        attempts.append(msg.attempt)
        raise RuntimeError("boom")

    await hub.publish("h.x", b"poison")

    async def dead() -> bool:
        return len(await read_all(hub, "$dlq.h")) == 1

    await _run_until(hub, dead, "the poison message dead-lettered")
    assert attempts == [1, 2, 3]  # retried via nack long before the 30 s ack_wait
    [dl] = await read_all(hub, "$dlq.h")
    assert dl.headers["tidings-reason"] == "max_deliver"
    assert dl.headers["tidings-attempts"] == "3"
    assert dl.headers["tidings-group"] == "h"


async def test_handler_that_recovers_is_acked(hub: tidings.Hub) -> None:
    attempts: list[int] = []

    @hub.subscriber("h.*", group="h", max_deliver=5, retry_backoff=0.01)
    async def handle(msg: Message) -> None:
        attempts.append(msg.attempt)
        if msg.attempt < 2:
            raise RuntimeError("transient")

    await hub.publish("h.x", b"x")

    async def acked() -> bool:
        return len(attempts) >= 2 and await pending(hub, "h") == 0

    await _run_until(hub, acked, "acked after one retry")
    assert attempts == [1, 2]
    assert await read_all(hub, "$dlq.h") == []


async def test_handler_parameter_type_is_decoded(hub: tidings.Hub) -> None:
    got: list[object] = []

    @hub.subscriber("typed.dc", group="dc")
    async def on_dc(order: OrderDC) -> None:
        got.append(order)

    @hub.subscriber("typed.st", group="st")
    async def on_struct(order: OrderStruct) -> None:
        got.append(order)

    @hub.subscriber("typed.pd", group="pd")
    async def on_model(order: OrderModel) -> None:
        got.append(order)

    @hub.subscriber("typed.raw", group="raw")
    async def on_plain(msg):  # type: ignore[no-untyped-def]  # unannotated: the Message
        got.append(msg)

    await hub.publish("typed.dc", OrderDC("o-1", [Line("s", 1)]))
    await hub.publish("typed.st", OrderStruct("o-2", [3]))
    await hub.publish("typed.pd", OrderModel(id="o-3", total=1.0))
    await hub.publish("typed.raw", b"r")

    async def four() -> bool:
        return len(got) == 4

    await _run_until(hub, four, "four typed deliveries")
    by_type = {type(g): g for g in got}
    assert by_type[OrderDC] == OrderDC("o-1", [Line("s", 1)])
    assert by_type[OrderStruct] == OrderStruct("o-2", [3])
    assert by_type[OrderModel] == OrderModel(id="o-3", total=1.0)
    assert isinstance(by_type[Message], Message)


async def test_undecodable_message_for_typed_handler_is_dead_lettered(hub: tidings.Hub) -> None:
    calls: list[object] = []

    @hub.subscriber("typed.dc", group="dc", max_deliver=2, retry_backoff=0.01)
    async def on_dc(order: OrderDC) -> None:
        calls.append(order)

    await hub.publish("typed.dc", {"not": "an order"})

    async def dead() -> bool:
        return len(await read_all(hub, "$dlq.dc")) == 1

    await _run_until(hub, dead, "undecodable message dead-lettered")
    assert calls == []


async def test_slow_handler_is_fed_at_its_own_pace(hub: tidings.Hub) -> None:
    limit = 2
    running = 0
    most_running = 0
    handled: list[int] = []
    most_pending = 0

    @hub.subscriber("slow.x", group="slow", concurrency=1, max_in_flight=limit)
    async def handle(msg: Message) -> None:
        nonlocal running, most_running
        running += 1
        most_running = max(most_running, running)
        await asyncio.sleep(0.01)
        running -= 1
        handled.append(int(msg.decode()))

    await hub.publish_many("slow.x", [str(i) for i in range(15)])

    async def finished() -> bool:
        nonlocal most_pending
        most_pending = max(most_pending, await pending(hub, "slow"))
        return len(handled) == 15 and await pending(hub, "slow") == 0

    await _run_until(hub, finished, "all 15 handled")
    assert most_running == 1
    assert most_pending <= limit
    assert sorted(handled) == list(range(15))


async def test_concurrency_bounds_parallel_handlers(hub: tidings.Hub) -> None:
    running = 0
    most_running = 0
    handled = 0

    @hub.subscriber("par.x", group="par", concurrency=3)
    async def handle(msg: Message) -> None:
        nonlocal running, most_running, handled
        running += 1
        most_running = max(most_running, running)
        await asyncio.sleep(0.01)
        running -= 1
        handled += 1

    await hub.publish_many("par.x", [b"x"] * 12)

    async def finished() -> bool:
        return handled == 12

    await _run_until(hub, finished, "all 12 handled")
    assert 1 <= most_running <= 3


async def test_run_needs_handlers_and_async_functions(hub: tidings.Hub) -> None:
    with pytest.raises(tidings.InvalidArgument):
        await hub.run()
    with pytest.raises(TypeError):
        @hub.subscriber("a.b", group="g")  # type: ignore[type-var]
        def sync_handler(msg: Message) -> None:
            pass
    with pytest.raises(tidings.InvalidArgument):
        hub.subscriber("a.b", group="g", concurrency=0)


async def test_async_iteration_and_context_manager(hub: tidings.Hub) -> None:
    await hub.publish_many("it.x", [b"1", b"2", b"3"])
    got = []
    async with await hub.subscribe("it.x", group="g") as sub:
        async def consume() -> None:
            async for m in sub:
                got.append(m.data)
                await m.ack()
                if len(got) == 3:
                    return
        await asyncio.wait_for(consume(), GUARD)
    assert got == [b"1", b"2", b"3"]
    assert await pending(hub, "g") == 0


async def test_topics_reports_counts_and_lag(hub: tidings.Hub) -> None:
    await hub.publish_many("info.a", [b"1", b"22", b"333"])
    sub = await hub.subscribe("info.*", group="g")
    [m] = await take(sub, 1)
    await m.ack()
    await sub.flush()
    [info] = [t for t in await hub.topics() if t["topic"] == "info.a"]
    assert info["messages"] == 3 and info["bytes"] == 6
    assert info["first_position"] < info["last_position"]
    [s] = info["subscriptions"]
    assert s["group"] == "g" and s["lag"] == 2
