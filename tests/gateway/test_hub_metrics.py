"""The hub's domain metrics (tidings/metrics.py) rendered for Prometheus: exact counts
from real hubs, Prometheus naming conventions, and gauges right across processes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tidings
from tidings.gateway.metrics import GatewayMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Deposited(tidings.Event):
    amount: int


async def scrape(hub: tidings.Hub) -> tuple[Samples, str]:
    text = (await GatewayMetrics().render(hub)).decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out, text


def tg(topic: str, group: str = "billing") -> tuple[tuple[str, str], ...]:
    return (("group", group), ("topic", topic))


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/m.db"


async def test_counts_messages_dead_letters_redrive_events_and_sagas(url: str) -> None:
    async with await tidings.connect(url) as hub:
        await hub.publish("orders.created", {"n": 1})
        await hub.publish_many("orders.created", [1, 2])
        await hub.publish_many("orders.paid", [3, 4])
        sub = await hub.subscribe("orders.*", group="billing", max_deliver=2)
        async with sub:
            got = await sub.fetch(10, 5)
            assert len(got) == 5
            for m in got[:3]:
                await m.ack()
            await got[3].nack(delay=0)  # attempt 1 of 2: back again
            await got[4].term()  # dead-lettered
            again = await sub.fetch(10, 5)
            assert [(m.topic, m.attempt) for m in again] == [("orders.paid", 2)]
            await again[0].nack()  # the last attempt: dead-lettered
            await sub.flush()

        m, _ = await scrape(hub)
        assert m[("tidings_messages_published_total", (("topic", "orders.created"),))] == 3
        assert m[("tidings_messages_published_total", (("topic", "orders.paid"),))] == 2
        assert m[("tidings_messages_delivered_total", tg("orders.created"))] == 3
        assert m[("tidings_messages_delivered_total", tg("orders.paid"))] == 3
        assert m[("tidings_messages_redelivered_total", tg("orders.paid"))] == 1
        assert ("tidings_messages_redelivered_total", tg("orders.created")) not in m
        assert m[("tidings_messages_acked_total", tg("orders.created"))] == 3
        assert m[("tidings_messages_nacked_total", tg("orders.paid"))] == 2
        assert m[("tidings_messages_terminated_total", tg("orders.paid"))] == 1
        assert m[("tidings_messages_dead_lettered_total", tg("orders.paid"))] == 2
        assert m[("tidings_dead_letters_waiting", (("group", "billing"),))] == 2
        assert m[("tidings_subscription_lag", (("group", "billing"), ("pattern", "orders.*")))] == 0

        assert await hub.redrive("billing") == 2
        m, _ = await scrape(hub)
        assert m[("tidings_dead_letters_waiting", (("group", "billing"),))] == 0
        assert m[("tidings_messages_published_total", (("topic", "orders.paid"),))] == 4
        assert m[("tidings_messages_published_total", (("topic", "$rdv"),))] == 2  # folded
        assert m[("tidings_subscription_lag", (("group", "billing"), ("pattern", "orders.*")))] == 2
        assert not any(k[0].startswith("tidings_messages") and "$rdv.billing" in str(k) for k in m)

        await hub.events.append("acct-1", [Deposited(amount=1), Deposited(amount=2)],
                                expected_version=0)
        await hub.events.append("acct-1", [Deposited(amount=3)], expected_version=2)

        @hub.projection("balances")
        async def balances(event: Any, tx: Any) -> None: ...

        async def ok(data: dict[str, Any]) -> None: ...

        async def boom(data: dict[str, Any]) -> None:
            raise tidings.Rejected("no")

        async def undo(data: dict[str, Any]) -> None: ...

        defn = tidings.Saga("pay", steps=[tidings.Step("a", action=ok, compensation=undo),
                                          tidings.Step("b", action=boom)])
        happy = tidings.Saga("ship", steps=[tidings.Step("a", action=ok)])
        for saga, data in ((defn, {}), (happy, {}), (happy, {})):
            await hub.sagas(saga).wait(await hub.sagas(saga).start(data), timeout=10)

        m, text = await scrape(hub)
        assert m[("tidings_events_appended_total", (("topic", "acct"),))] == 3
        assert m[("tidings_saga_outcomes_total", (("saga", "pay"), ("status", "compensated")))] == 1
        assert m[("tidings_saga_outcomes_total", (("saga", "ship"), ("status", "completed")))] == 2
        assert m[("tidings_saga_duration_seconds_count",
                  (("saga", "ship"), ("status", "completed")))] == 2
        assert m[("tidings_saga_duration_seconds_bucket",
                  (("le", "+Inf"), ("saga", "pay"), ("status", "compensated")))] == 1
        status = (await hub.projections.status("balances"))
        assert status.lag > 0
        assert m[("tidings_projection_lag", (("projection", "balances"),))] == status.lag
        assert m[("tidings_projection_failed", (("projection", "balances"),))] == 0
        # no ids as labels
        assert "acct-1" not in text and "saga-pay-" not in text and "saga-ship-" not in text

        snap = await hub.metrics()  # the same figures, without prometheus_client
        assert snap.acked[("orders.created", "billing")] == 3
        assert snap.saga_outcomes[("ship", "completed")] == 2


_NAME = re.compile(r"tidings_[a-z][a-z0-9_]*[a-z0-9]")
_UNITS = ("_seconds", "_bytes")


async def test_every_tidings_metric_follows_prometheus_naming(tmp_path: Path) -> None:
    async with await tidings.connect(f"sqlite:///{tmp_path}/n.db") as hub:
        await hub.publish("a.b", 1)
        async with await hub.subscribe("a.*", group="g", max_deliver=1) as sub:
            await (await sub.fetch(1, 5))[0].term()
            await sub.flush()
        saga = tidings.Saga("s", steps=[tidings.Step("x", action=_noop)])
        await hub.sagas(saga).wait(await hub.sagas(saga).start({}), timeout=10)
        _, text = await scrape(hub)
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    assert {"tidings_messages_published", "tidings_saga_duration_seconds",
            "tidings_dead_letters_waiting", "tidings_projection_lag"} <= names
    for f in families:
        assert _NAME.fullmatch(f.name), f.name
        assert f.documentation, f.name
        if f.type == "counter":
            assert all(s.name.startswith(f.name) and (s.name == f.name + "_total"
                                                      or s.name == f.name + "_created")
                       for s in f.samples), f.name
        else:
            assert not f.name.endswith("_total"), f.name
        if f.type == "histogram":
            assert f.name.endswith(_UNITS), f.name
        assert "_ms" not in f.name and "milli" not in f.name, f.name
        for s in f.samples:
            assert all(re.fullmatch(r"[a-z_]+", k) for k in s.labels), s


async def _noop(data: dict[str, Any]) -> None: ...


async def test_dead_letters_waiting_are_seen_by_a_hub_that_did_not_dead_letter(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    async with await tidings.connect(url) as a, await tidings.connect(url) as b:
        await a.publish("jobs.run", 1)
        async with await a.subscribe("jobs.*", group="workers", max_deliver=1) as sub:
            await (await sub.fetch(1, 5))[0].term()
            await sub.flush()
        ma, _ = await scrape(a)
        mb, _ = await scrape(b)
        assert ma[("tidings_messages_dead_lettered_total", tg("jobs.run", "workers"))] == 1
        assert ("tidings_messages_dead_lettered_total", tg("jobs.run", "workers")) not in mb
        assert mb[("tidings_dead_letters_waiting", (("group", "workers"),))] == 1
        assert await b.redrive("workers") == 1
        ma, _ = await scrape(a)
        assert ma[("tidings_dead_letters_waiting", (("group", "workers"),))] == 0
