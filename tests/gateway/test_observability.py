"""/healthz, /metrics (Prometheus text) and the dashboard's snapshot."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import LiveServer


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_healthz(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_metrics_count_requests_messages_and_lag(client: httpx.Client) -> None:
    client.post("/v1/topics/orders.created/messages",
                json={"messages": [{"data": i} for i in range(4)]})
    client.post("/v1/topics/orders.created/messages", json={"oops": 1})
    got = client.get("/v1/subscriptions/billing/messages",
                     params={"topic": "orders.*", "max": 3}).json()["messages"]
    client.post("/v1/subscriptions/billing/ack", json={"ack_ids": [got[0]["ack_id"]]})
    client.post("/v1/subscriptions/billing/nack", json={"ack_ids": [got[1]["ack_id"]]})
    client.get("/v1/no/such/route")

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    route = "/v1/topics/{topic}/messages"
    assert m[("tidings_http_requests_total",
              (("method", "POST"), ("route", route), ("status", "201")))] == 1
    assert m[("tidings_http_requests_total",
              (("method", "POST"), ("route", route), ("status", "422")))] == 1
    assert m[("tidings_http_requests_total",
              (("method", "GET"), ("route", "<unmatched>"), ("status", "404")))] == 1
    assert m[("tidings_http_messages_published_total", ())] == 4
    assert m[("tidings_http_messages_delivered_total", ())] == 3
    assert m[("tidings_http_messages_acked_total", ())] == 1
    assert m[("tidings_http_messages_nacked_total", ())] == 1
    # the hub's own figures, by topic and group (HTTP acks name no topic: the ack id
    # holds none)
    assert m[("tidings_messages_published_total", (("topic", "orders.created"),))] == 4
    assert m[("tidings_messages_delivered_total",
              (("group", "billing"), ("topic", "orders.created")))] == 3
    assert m[("tidings_messages_acked_total", (("group", "billing"), ("topic", "")))] == 1
    assert m[("tidings_messages_nacked_total", (("group", "billing"), ("topic", "")))] == 1
    sub = (("group", "billing"), ("pattern", "orders.*"))
    state = client.get("/v1/topics").json()["topics"][0]["subscriptions"][0]
    assert m[("tidings_subscription_lag", sub)] == state["lag"] > 0
    assert m[("tidings_subscription_pending", sub)] == state["pending"]
    assert m[("tidings_subscription_in_flight", sub)] == state["in_flight"]
    assert m[("tidings_topic_messages", (("topic", "orders.created"),))] == 4
    assert ("tidings_http_request_duration_seconds_count", (("route", route),)) in m


def test_dashboard_snapshot_shows_topics_subscriptions_and_dead_letters(
    server: LiveServer, client: httpx.Client
) -> None:
    client.post("/v1/topics/orders.created/messages", json={"data": 1})

    async def dead_letter(hub: object) -> None:
        import tidings

        assert isinstance(hub, tidings.Hub)
        sub = await hub.subscribe("orders.*", group="fragile", max_deliver=1)
        async with sub:
            msg = (await sub.fetch(1, 5))[0]
            await msg.term()

    server.call(dead_letter)
    snap = client.get("/v1/dashboard").json()
    assert [t["topic"] for t in snap["topics"]] == ["orders.created"]
    assert {s["group"] for s in snap["subscriptions"]} == {"fragile"}
    assert snap["dead_letters"] == [{"topic": "$dlq.fragile", "group": "fragile",
                                     "messages": 1}]
    assert snap["dead_letter_total"] == 1
    assert snap["sagas"] is None and snap["requests"] == [] and snap["commands"] == []
    assert client.post("/v1/dlq/fragile/redrive", json={"all": True}).json()["moved"] == 1
    for _ in range(100):  # (snapshots are shared for a moment: wait for a fresh one)
        after = client.get("/v1/dashboard").json()
        if after["time"] > snap["time"] + 0.5:
            break
        time.sleep(0.05)
    assert after["dead_letters"][0]["messages"] == 0 and after["dead_letter_total"] == 0
