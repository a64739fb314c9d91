"""Pub/sub over HTTP against a live server: publish, topics, pull/ack/nack, SSE."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

import tidings

from .conftest import LiveServer

TOPIC = "orders.created"


def publish(client: httpx.Client, topic: str, body: Any) -> dict[str, Any]:
    r = client.post(f"/v1/topics/{topic}/messages", json=body)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def test_publish_one_then_listed_in_topics(client: httpx.Client) -> None:
    p = publish(client, TOPIC, {"data": {"order": 1}, "key": "o-1",
                                "headers": {"correlation-id": "c-1"}})
    assert p["position"] >= 1 and p["duplicate"] is False and p["id"]
    topics = client.get("/v1/topics").json()["topics"]
    assert [(t["topic"], t["messages"]) for t in topics] == [(TOPIC, 1)]


def test_publish_batch_returns_every_position_in_order(client: httpx.Client) -> None:
    out = publish(client, TOPIC, {"messages": [{"data": i} for i in range(5)]})
    assert out["positions"] == sorted(out["positions"]) and len(out["positions"]) == 5
    mixed = publish(client, TOPIC, {"messages": [{"data": "text", "key": "a", "id": "m-1"},
                                                 {"data_b64": "AAEC"}]})
    assert len(mixed["messages"]) == 2
    topics = client.get("/v1/topics").json()["topics"]
    assert topics[0]["messages"] == 7


def test_a_repeated_client_id_is_stored_once(client: httpx.Client) -> None:
    first = publish(client, TOPIC, {"data": 1, "id": "once"})
    again = publish(client, TOPIC, {"data": 1, "id": "once"})
    assert again["duplicate"] is True and again["position"] == first["position"]


def test_pull_ack_nack_and_redelivery(client: httpx.Client) -> None:
    publish(client, TOPIC, {"messages": [{"data": {"n": i}} for i in range(3)]})
    url = "/v1/subscriptions/billing/messages"
    got = client.get(url, params={"topic": "orders.*", "max": 2}).json()["messages"]
    assert [m["data"] for m in got] == [{"n": 0}, {"n": 1}]
    assert all(m["ack_id"].startswith("billing:orders.*:") for m in got)
    r = client.post("/v1/subscriptions/billing/ack", json={"ack_ids": [m["ack_id"] for m in got]})
    assert r.status_code == 200 and r.json() == {"settled": 2}

    third = client.get(url, params={"topic": "orders.*"}).json()["messages"]
    assert [m["data"] for m in third] == [{"n": 2}] and third[0]["attempt"] == 1
    r = client.post("/v1/subscriptions/billing/nack", json={"ack_ids": [third[0]["ack_id"]]})
    assert r.status_code == 200
    again = client.get(url, params={"topic": "orders.*", "wait": 5}).json()["messages"]
    assert [m["data"] for m in again] == [{"n": 2}] and again[0]["attempt"] == 2
    client.post("/v1/subscriptions/billing/ack", json={"ack_ids": [again[0]["ack_id"]]})
    assert client.get(url, params={"topic": "orders.*", "wait": 0.2}).json() == {"messages": []}
    subs = client.get("/v1/topics").json()["topics"][0]["subscriptions"]
    assert subs == [{"group": "billing", "pattern": "orders.*", "lag": 0, "pending": 0,
                     "in_flight": 0}]


def test_every_subscription_gets_every_message(client: httpx.Client) -> None:
    publish(client, TOPIC, {"data": "x"})
    for group in ("billing", "shipping"):
        msgs = client.get(f"/v1/subscriptions/{group}/messages",
                          params={"topic": "orders.>"}).json()["messages"]
        assert [m["data"] for m in msgs] == ["x"]


def test_long_poll_returns_when_a_message_arrives(server: LiveServer,
                                                  client: httpx.Client) -> None:
    result: list[Any] = []

    def pull() -> None:
        with server.client() as c:
            result.append(c.get("/v1/subscriptions/late/messages",
                                params={"topic": TOPIC, "wait": 15}).json())

    t = threading.Thread(target=pull)
    t.start()
    while server.gateway.pulls.active == 0 and t.is_alive():
        t.join(0.01)
    publish(client, TOPIC, {"data": "wake up"})
    t.join(20)
    assert [m["data"] for m in result[0]["messages"]] == ["wake up"]


def test_acks_reach_the_subscription_after_a_restart(
    start_server: Callable[..., LiveServer], db_url: str
) -> None:
    first = start_server()
    with first.client() as c:
        publish(c, TOPIC, {"data": "keep"})
        msgs = c.get("/v1/subscriptions/audit/messages", params={"topic": TOPIC}).json()
    first.stop()
    second = start_server(db_url)
    with second.client() as c:
        r = c.post("/v1/subscriptions/audit/ack", json={"ack_ids": [msgs["messages"][0]["ack_id"]]})
        assert r.status_code == 200
        subs = c.get("/v1/topics").json()["topics"][0]["subscriptions"]
        assert subs[0]["pending"] == 0 and subs[0]["lag"] == 0


def test_settling_bad_ack_ids(client: httpx.Client) -> None:
    publish(client, TOPIC, {"data": 1})
    msgs = client.get("/v1/subscriptions/g1/messages", params={"topic": TOPIC}).json()["messages"]
    ack = "/v1/subscriptions/g1/ack"
    for body, status in [
        ({"ack_ids": ["nonsense"]}, 422),
        ({"ack_ids": []}, 422),
        ({"ack_ids": "g1:orders.created:1"}, 422),
        ({"ack_ids": [msgs[0]["ack_id"]], "extra": 1}, 422),
        ({"ack_ids": ["g1:other.topic:1"]}, 404),
    ]:
        r = client.post(ack, json=body)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()) >= {"error", "detail"}
    r = client.post("/v1/subscriptions/g2/ack", json={"ack_ids": [msgs[0]["ack_id"]]})
    assert r.status_code == 404 and "g1" in r.json()["detail"]
    r = client.post("/v1/subscriptions/g1/nack", json={"ack_ids": [msgs[0]["ack_id"]],
                                                        "delay": -1})
    assert r.status_code == 422


def test_pull_needs_a_valid_pattern_and_bounds(client: httpx.Client) -> None:
    url = "/v1/subscriptions/g/messages"
    for params in [{}, {"topic": "a..b"}, {"topic": "a", "max": 0}, {"topic": "a", "max": "x"},
                   {"topic": "a", "wait": "nan"}, {"topic": "a", "wait": 10_000}]:
        r = client.get(url, params=params)
        assert r.status_code == 422, (params, r.text)
    assert client.get("/v1/subscriptions/bad.group/messages",
                      params={"topic": "a"}).status_code == 422
    assert client.get("/v1/topics").json() == {"topics": []}




def test_sse_stream_replays_follows_and_resumes(server: LiveServer,
                                                client: httpx.Client) -> None:
    publish(client, "orders.created", {"data": "one"})
    publish(client, "payments.done", {"data": "other topic"})
    url = "/v1/topics/orders.*/stream"
    with server.client() as sse, sse.stream("GET", url, params={"start": "beginning"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = _events_from(lines, 1)
        publish(client, "orders.shipped", {"data": "two"})
        second = _events_from(lines, 1)
    assert [e["event"] for e in first + second] == ["message", "message"]
    assert [json.loads(e["data"])["data"] for e in first + second] == ["one", "two"]
    # resume after the first: only the second comes back
    headers = {"Last-Event-ID": first[0]["id"]}
    with server.client() as sse, sse.stream("GET", url, headers=headers) as r:
        resumed = _events_from(r.iter_lines(), 1)
    assert resumed[0]["id"] == second[0]["id"]
    assert server.gateway.streams.active <= 1  # the closed streams let go of their places


def _events_from(lines: Any, n: int) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in current:
                out.append(current)
                if len(out) == n:
                    return out
            current = {}
            continue
        if not line.startswith(":"):
            field, _, value = line.partition(": ")
            current[field] = value
    return out


def test_sse_rejects_a_bad_pattern_or_resume_id(client: httpx.Client) -> None:
    assert client.get("/v1/topics/a..b/stream").status_code == 422
    r = client.get("/v1/topics/a/stream", headers={"Last-Event-ID": "abc"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_field"


BEYOND = str(2**63)  # one past the largest position an engine stores
NOT_ASCII_DIGITS = ["²", "٣", "١٠", "1_0", "+1", " 1", "0x1", "1.0", ""]


def test_numbers_are_ascii_digits_only(client: httpx.Client) -> None:
    publish(client, TOPIC, {"data": 1})
    pull = "/v1/subscriptions/g/messages"
    for bad in NOT_ASCII_DIGITS:
        r = client.get(pull, params={"topic": TOPIC, "max": bad})
        assert r.status_code == 422 and "'max'" in r.json()["detail"], (bad, r.text)
        r = client.get("/v1/topics/orders.*/stream", params={"start": bad})
        assert r.status_code == 422 and "'start'" in r.json()["detail"], (bad, r.text)
        r = client.post("/v1/subscriptions/g/ack", json={"ack_ids": [f"g:{TOPIC}:{bad}"]})
        assert r.status_code == 422 and "not an ack id" in r.json()["detail"], (bad, r.text)
    for bad in ["١", "nan", "inf", "-inf", "1_0", "0x1", "", "1e999"]:
        r = client.get(pull, params={"topic": TOPIC, "wait": bad})
        assert r.status_code == 422 and "'wait'" in r.json()["detail"], (bad, r.text)
    for bad in ["٣".encode(), "²".encode(), b"1_0", b"-1", b"x"]:
        r = client.get("/v1/topics/orders.*/stream", headers={"Last-Event-ID": bad})
        assert r.status_code == 422 and "Last-Event-ID" in r.json()["detail"], (bad, r.text)
    subs = client.get("/v1/topics").json()["topics"][0]["subscriptions"]
    assert subs == []  # no bad pull created the subscription


def test_an_ack_id_past_the_largest_position_settles_nothing_and_poisons_nothing(
    client: httpx.Client,
) -> None:
    publish(client, "q.a", {"data": "first"})
    pull = "/v1/subscriptions/g/messages"
    got = client.get(pull, params={"topic": "q.a"}).json()["messages"]
    for route in ("ack", "nack"):
        for ids in ([f"g:q.a:{BEYOND}"], [got[0]["ack_id"], f"g:q.a:{BEYOND}"],
                    [f"g:q.a:{'9' * 5000}"]):
            r = client.post(f"/v1/subscriptions/g/{route}", json={"ack_ids": ids})
            assert r.status_code == 422 and r.json()["error"] == "invalid_field", r.text
    subs = client.get("/v1/topics").json()["topics"][0]["subscriptions"]
    assert subs[0]["pending"] == 1  # the valid id sent along was not settled either
    # the subscription keeps working: pull, and settle with a valid ack
    publish(client, "q.a", {"data": "second"})
    more = client.get(pull, params={"topic": "q.a", "wait": 10}).json()["messages"]
    assert [m["data"] for m in more] == ["second"]
    r = client.post("/v1/subscriptions/g/ack",
                    json={"ack_ids": [got[0]["ack_id"], more[0]["ack_id"]]})
    assert r.status_code == 200 and r.json() == {"settled": 2}
    subs = client.get("/v1/topics").json()["topics"][0]["subscriptions"]
    assert subs[0]["pending"] == 0 and subs[0]["lag"] == 0


def test_sse_start_or_resume_past_the_largest_position_is_422_before_the_stream(
    server: LiveServer, client: httpx.Client,
) -> None:
    url = "/v1/topics/orders.*/stream"
    for params, headers in [({"start": BEYOND}, {}),
                            ({"start": "9" * 5000}, {}),
                            ({}, {"Last-Event-ID": BEYOND}),
                            ({}, {"Last-Event-ID": str(2**63 - 1)})]:  # nothing can follow it
        r = client.get(url, params=params, headers=headers)
        assert r.status_code == 422, (params, headers, r.text)
        assert r.headers["content-type"].startswith("application/json")
    publish(client, TOPIC, {"data": "one"})
    with server.client() as sse, sse.stream("GET", url, params={"start": str(2**63 - 1)},
                                            headers={"Last-Event-ID": "0"}) as r:
        assert r.status_code == 200  # resuming after 0: from the first message
        assert _events_from(r.iter_lines(), 1)[0]["id"] == "1"
    assert server.gateway.streams.active <= 1


def _abandoned_pull(port: int, group: str, wait: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(f"GET /v1/subscriptions/{group}/messages?topic={TOPIC}&wait={wait} HTTP/1.1\r\n"
              "Host: x\r\n\r\n".encode())
    return s


def _until(condition: Callable[[], bool]) -> None:
    """Wait for something the server does on its own (generously; never a timing assertion)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.01)


def test_a_long_poll_whose_client_leaves_frees_its_place_and_claims_nothing(
    start_server: Callable[..., LiveServer],
) -> None:
    server = start_server(max_pulls=3, max_wait=120)
    gw = server.gateway
    with server.client() as c:
        c.get("/v1/subscriptions/g/messages", params={"topic": TOPIC})  # the subscription
    pulls = [_abandoned_pull(server.port, "g", 100) for _ in range(3)]
    _until(lambda: gw.pulls.active == 3)
    with server.client() as c:
        r = c.get("/v1/subscriptions/g/messages", params={"topic": TOPIC})
        assert r.status_code == 429  # every place taken by a waiting pull
    for s in pulls:
        s.close()  # the clients give up long before their wait=100 is over
    _until(lambda: gw.pulls.active == 0)
    with server.client() as c:
        publish(c, TOPIC, {"data": "for whoever is still there"})
        got = c.get("/v1/subscriptions/g/messages",
                    params={"topic": TOPIC, "wait": 10}).json()["messages"]
        # Claimed by a pull nobody waits for, it would come back only after ack_wait (30 s),
        # as attempt 2: here it is, first time round.
        assert [(m["data"], m["attempt"]) for m in got] == [("for whoever is still there", 1)]
        subs = c.get("/v1/topics").json()["topics"][0]["subscriptions"]
        assert subs[0]["in_flight"] == 1


def test_a_subscription_may_not_pull_its_own_dead_letters(client: httpx.Client) -> None:
    for pattern in ("$dlq.g", "$dlq.*", "$dlq.>"):
        r = client.get("/v1/subscriptions/g/messages", params={"topic": pattern})
        assert r.status_code == 409 and r.json()["error"] == "subscription_conflict", r.text
    r = client.get("/v1/subscriptions/ops/messages", params={"topic": "$dlq.g"})
    assert r.status_code == 200  # another group may
    long = "g" * 250
    assert client.get(f"/v1/subscriptions/{long}/messages",
                      params={"topic": TOPIC}).status_code == 200
    r = client.get(f"/v1/subscriptions/{long}g/messages", params={"topic": TOPIC})
    assert r.status_code == 422 and "250" in r.json()["detail"]


def test_json_data_nested_deeper_than_the_gateway_reads_is_pulled_as_base64(
    server: LiveServer, client: httpx.Client,
) -> None:
    deep = "[" * 900 + "]" * 900

    async def publish_deep(hub: tidings.Hub) -> None:  # in-process: no gateway limit applies
        await hub.publish(TOPIC, deep.encode(), headers={"content-type": "application/json"})
        await hub.publish(TOPIC, {"ok": True})

    server.call(publish_deep)
    got = client.get("/v1/subscriptions/g/messages", params={"topic": TOPIC}).json()["messages"]
    assert base64.b64decode(got[0]["data_b64"]).decode() == deep and "data" not in got[0]
    assert got[0]["headers"]["content-type"] == "application/json"
    assert got[1]["data"] == {"ok": True}
    with server.client() as sse, sse.stream("GET", "/v1/topics/orders.*/stream",
                                            params={"start": "beginning"}) as r:
        events = _events_from(r.iter_lines(), 2)
    assert [json.loads(e["data"]).get("data_b64") is not None for e in events] == [True, False]
