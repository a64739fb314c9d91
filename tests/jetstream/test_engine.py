"""What is particular to `nats://` (the shared behaviour is the contract suite's): URLs
and options, what it refuses and how it says so, consumers on separate connections."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import tidings
from tidings.engines.jetstream import check_server, parse_servers

pytestmark = pytest.mark.service


def test_urls_name_one_or_several_servers() -> None:
    assert parse_servers("nats://h1:4000,h2,10.0.0.3:4222?stream=s&replicas=3") == (
        ["nats://h1:4000", "nats://h2:4222", "nats://10.0.0.3:4222"],
        {"stream": "s", "replicas": "3"})
    assert parse_servers("nats://u:p@h1")[0] == ["nats://u:p@h1:4222"]
    for bad in ("nats://", "nats://h1,,h2"):
        with pytest.raises(tidings.InvalidArgument):
            parse_servers(bad)


async def test_bad_options_are_refused_before_connecting() -> None:
    for url, options in [("nats://127.0.0.1:1?colour=red", {}),
                         ("nats://127.0.0.1:1", {"stream": "a.b"}),
                         ("nats://127.0.0.1:1", {"replicas": 7}),
                         ("nats://127.0.0.1:1", {"timeout": 0})]:
        with pytest.raises(tidings.InvalidArgument):
            await tidings.connect(url, **options)


async def test_no_server_is_engine_unavailable() -> None:
    with pytest.raises(tidings.EngineUnavailable, match="nats-server"):
        await tidings.connect("nats://127.0.0.1:1", connect_timeout=0.5)


def test_servers_too_old_are_named() -> None:
    assert check_server("2.15.1", ["nats://h"]) is True
    assert check_server("2.11.4", ["nats://h"]) is False  # no atomic batches
    with pytest.raises(tidings.Unsupported, match="2.11"):
        check_server("2.10.22", ["nats://h"])


async def test_event_streams_need_a_database(nats_url: str) -> None:
    async with await tidings.connect(nats_url) as hub:
        with pytest.raises(tidings.Unsupported, match="broker="):
            hub.events  # noqa: B018


async def test_what_nats_cannot_carry_is_refused_and_stores_nothing(nats_url: str) -> None:
    async with await tidings.connect(nats_url, max_payload=32 * 1024 * 1024) as hub:
        with pytest.raises(tidings.InvalidArgument, match="at most 1000"):
            await hub.publish_many("big.batch", [b"x"] * 1001)
        with pytest.raises(tidings.PayloadTooLarge, match="max_payload"):
            await hub.publish("big.one", b"x" * (9 * 1024 * 1024))
        assert [m async for m in hub.read(">")] == []
        assert (await hub.publish("still.ok", b"1")).position == 1  # the connection is fine
        # any header value travels (tidings' envelope is one JSON header)
        await hub.publish("h.x", b"1", key="k\u00e9", headers={"note": "two\r\nlines: \u00e9"})
        [m] = [m async for m in hub.read("h.x")]
        assert (m.key, m.headers["note"]) == ("k\u00e9", "two\r\nlines: \u00e9")


async def test_consumers_on_separate_connections_share_without_doubles(nats_url: str
                                                                       ) -> None:
    """Two hubs (two connections, as two processes would have) on one subscription: the
    compare-and-set on its document keeps a leased message with one consumer."""
    a = await tidings.connect(nats_url)
    b = await tidings.connect(nats_url)
    try:
        n = 200
        await a.publish_many("work.items", [str(i) for i in range(n)])
        subs = [await h.subscribe("work.items", group="g", ack_wait=30, max_in_flight=20)
                for h in (a, b)]
        got: list[int] = []

        async def consume(sub: tidings.Subscription) -> None:
            while len(got) < n:
                for m in await sub.fetch(10, wait=0.05):
                    got.append(m.position)
                    await m.ack()
            await sub.flush()

        await asyncio.wait_for(asyncio.gather(*(consume(s) for s in subs)), 60)
        assert sorted(got) == list(range(1, n + 1))  # each once, none lost
    finally:
        await a.close()
        await b.close()


async def test_broker_needs_a_durable_database_and_a_nats_url(nats_url: str, tmp_path: Any
                                                              ) -> None:
    with pytest.raises(tidings.Unsupported, match="outbox"):
        await tidings.connect("memory://", broker=nats_url)
    with pytest.raises(tidings.InvalidArgument, match="NATS URL"):
        await tidings.connect(f"sqlite:///{tmp_path}/a.db", broker="http://127.0.0.1:1")


class JsRollbackNoted(tidings.Event):
    item: str


async def test_the_relay_is_not_held_up_by_a_rolled_back_write(tmp_path: Any,
                                                                nats_server: Any) -> None:
    """A projection whose handler fails rolls back what it published through its `tx`,
    leaving a gap in the outbox's positions; the relay moves past it at once."""
    url = f"sqlite:///{tmp_path}/g.db?broker={nats_server.url_for(tmp_path)}"
    async with await tidings.connect(url) as hub:
        @hub.projection("fails")
        async def fails(ev: JsRollbackNoted, tx: Any) -> None:
            tx.publish("noted.copy", {"item": ev.item})
            raise RuntimeError("no")

        await hub.events.append("n-1", [JsRollbackNoted(item="a")])
        (st,) = await hub.projections.catch_up()
        assert st.status == "failed"
        engine: Any = hub.engine
        assert await engine.relayed(2.0), "the relay waited for a position never committed"
        on_nats = [m async for m in hub.read(">")]
        assert [m.headers["event-type"] for m in on_nats] == ["JsRollbackNoted"]
        assert not [m async for m in hub.read("noted.>")]  # the rolled-back copy is not


async def test_a_deleted_subscription_stays_deleted(nats_url: str) -> None:
    """A consumer in another process still holding the subscription cannot bring it back
    by acking or fetching (as on every engine, a deleted subscription gives nothing)."""
    a = await tidings.connect(nats_url)
    b = await tidings.connect(nats_url)
    try:
        await a.publish_many("del.x", [b"1", b"2"])
        sub = await a.subscribe("del.x", group="g", ack_wait=30)
        [m] = await sub.fetch(1, wait=1)
        assert await b.engine.delete_subscription("g", "del.x")
        await m.ack()
        await sub.flush()
        assert await sub.fetch(1, wait=0.1) == []
        assert [s for s in await b.engine.subscriptions() if s.group == "g"] == []
    finally:
        await a.close()
        await b.close()


async def test_a_batch_repeating_an_id_stored_on_another_topic(nats_url: str) -> None:
    """JetStream deduplicates ids across the stream: a batch holding an id first published
    on another topic gets that first position back, as a single publish would."""
    async with await tidings.connect(nats_url) as hub:
        first = await hub.publish("dup.a", b"1", id="same")
        out = await hub.publish_many("dup.b", [tidings.envelope(b"2", id="same"),
                                               tidings.envelope(b"3", id="new")])
        assert (out[0].position, out[0].duplicate) == (first.position, True)
        assert out[1].duplicate is False
        assert [m.id async for m in hub.read("dup.>")] == ["same", "new"]


async def test_two_databases_share_one_broker(tmp_path: Any, nats_server: Any) -> None:
    """Each database has its own relay checkpoint: services with databases of their own
    on one NATS stream all get their outbox relayed."""
    broker = nats_server.url_for(tmp_path)
    for name in ("a", "b"):
        async with await tidings.connect(f"sqlite:///{tmp_path}/{name}.db?broker={broker}"
                                         ) as hub:
            await hub.events.append(f"{name}-1", [JsRollbackNoted(item=name)] * 3)
    async with await tidings.connect(broker) as bus:
        assert sorted([m.key async for m in bus.read(">")]) == ["a-1"] * 3 + ["b-1"] * 3


async def test_dead_letters_are_decided_once_across_connections(nats_url: str) -> None:
    """Two consumers on separate connections, one working from a stale copy of the
    subscription: a message is dead-lettered once, and never after another acked it."""
    from tidings.engines.base import Settle
    from tidings.engines.delivery import SubscriptionSpec

    a_hub = await tidings.connect(nats_url)
    b_hub = await tidings.connect(nats_url)
    try:
        a: Any = a_hub.engine
        b: Any = b_hub.engine
        await a_hub.publish_many("dl.x", [b"p", b"q"])
        spec = SubscriptionSpec("g", "dl.x", ack_wait=10, max_deliver=2,
                                dead_letter="$dlq.g", max_in_flight=1)
        ha, hb = await a.subscribe(spec, 0), await b.subscribe(spec, 0)
        t = 1000.0
        [p] = (await a.fetch(ha, 1, t))[0]  # A takes p (attempt 1)
        [p2] = (await b.fetch(hb, 1, t + 11))[0]  # its lease ran out: B takes it (2)
        assert (p2.position, p2.attempt) == (p.position, 2)
        await a.settle(ha, [Settle(p.position, "term")], t + 12)  # A, from a stale copy
        letters = [m async for m in a_hub.read("$dlq.g")]
        assert [m.headers["tidings-attempts"] for m in letters] == ["2"]  # once

        [q] = (await a.fetch(ha, 1, t + 13))[0]  # q, attempt 1, held by A...
        [q2] = (await b.fetch(hb, 1, t + 24))[0]  # ...expired, B takes it: attempt 2
        await b.settle(hb, [Settle(q2.position, "ack")], t + 40)  # B acks, late
        assert (await a.fetch(ha, 1, t + 41))[0] == []  # A's stale copy: q is done
        assert [m.headers["tidings-original-position"] async for m in a_hub.read(
            "$dlq.g")] == [str(p.position)]  # q was acked: no dead letter for it
        assert q.position != p.position
    finally:
        await a_hub.close()
        await b_hub.close()


class JsBig(tidings.Event):
    blob: str


async def test_what_the_broker_cannot_take_is_refused_or_skipped(tmp_path: Any) -> None:
    """A NATS server with its default 1 MiB max_payload (headers included) behind a hub
    that takes 1 MiB payloads: an event too large for the broker is refused before it is
    stored; a message too large published through a projection's tx (committed with the
    projection) is logged and skipped by the relay, which carries on with the rest."""
    from tests.natsserver import NatsServer

    with NatsServer(max_payload=1024 * 1024) as server:
        url = f"sqlite:///{tmp_path}/big.db?broker={server.url}"
        async with await tidings.connect(url) as hub:
            with pytest.raises(tidings.PayloadTooLarge, match="max_payload"):
                await hub.events.append("big-1", [JsBig(blob="x" * (1024 * 1024 - 1000))])
            assert await hub.events.stream_version("big-1") == 0

            @hub.projection("copier")
            async def copier(ev: JsBig, tx: Any) -> None:
                tx.publish("big.copy", b"y" * (1024 * 1024 - 100))  # fits the hub only
                tx.publish("small.copy", ev.blob)

            await hub.events.append("big-2", [JsBig(blob="fine")])
            (st,) = await hub.projections.catch_up()
            assert st.status == "running"
            engine: Any = hub.engine
            assert await engine.relayed(5.0), "the relay stopped at the oversized row"
            assert engine.relay_skipped == 1
            assert [m.data async for m in hub.read("small.copy")] == [b"fine"]
            assert [m async for m in hub.read("big.copy")] == []
