"""The dashboard pages' routes over HTTP: a topic's history, a saga's timeline, cancel and
retry, a stream's state at a version or time; and what they refuse (4xx, nothing stored)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

import tidings

from .conftest import LiveServer
from .test_commands import wait_terminal
from .test_shop import start_shop


def positions(page: dict[str, Any]) -> list[int]:
    return [m["position"] for m in page["messages"]]


# a topic's history ---------------------------------------------------------------------------
def test_history_pages_back_newest_first_and_replays_oldest_first(client: httpx.Client) -> None:
    for i in range(1, 31):  # interleaved with another topic: positions 1..60
        client.post("/v1/topics/jobs.a/messages", json={"data": {"n": i}, "key": f"k{i}"})
        client.post("/v1/topics/other/messages", json={"data": i})
    first = client.get("/v1/topics/jobs.a/history", params={"limit": 12}).json()
    assert first["order"] == "newest" and first["last_position"] == 60
    assert positions(first) == list(range(59, 35, -2))
    assert first["messages"][0]["data"] == {"n": 30} and first["messages"][0]["key"] == "k30"
    second = client.get("/v1/topics/jobs.a/history",
                        params={"limit": 12, "before": first["next_before"]}).json()
    assert positions(second) == list(range(35, 11, -2))
    third = client.get("/v1/topics/jobs.a/history",
                       params={"limit": 12, "before": second["next_before"]}).json()
    assert positions(third) == [11, 9, 7, 5, 3, 1] and third["next_before"] is None

    replay = client.get("/v1/topics/jobs.a/history",
                        params={"order": "oldest", "after": 20, "limit": 3}).json()
    assert positions(replay) == [21, 23, 25] and replay["next_after"] == 25
    rest = client.get("/v1/topics/jobs.a/history",
                      params={"order": "oldest", "after": 50, "limit": 5}).json()
    assert positions(rest) == [51, 53, 55, 57, 59] and rest["next_after"] is None
    # a pattern reads every topic it matches; a time starts from what was stored since
    assert positions(client.get("/v1/topics/>/history", params={"limit": 3}).json()) == \
        [60, 59, 58]
    later = time.time()
    client.post("/v1/topics/jobs.a/messages", json={"data": {"n": 31}})
    since = client.get("/v1/topics/jobs.a/history",
                       params={"order": "oldest", "since": later}).json()
    assert positions(since) == [61]
    assert client.get("/v1/topics/nothing.here/history").json()["messages"] == []


def test_history_finds_the_newest_of_a_sparse_topic_quickly(server: LiveServer) -> None:
    async def fill(hub: tidings.Hub) -> None:
        await hub.publish("rare", {"n": 1})
        await hub.publish_many("busy", [{"i": i} for i in range(5000)])
        await hub.publish("rare", {"n": 2})
        await hub.publish_many("busy", [{"i": i} for i in range(5000)])

    server.call(fill)
    with server.client() as c:
        page = c.get("/v1/topics/rare/history", params={"limit": 5}).json()
    assert [m["data"] for m in page["messages"]] == [{"n": 2}, {"n": 1}]
    assert page["next_before"] is None


@pytest.mark.parametrize("params", [
    {"order": "sideways"}, {"before": "0"}, {"before": "x"}, {"after": "-1"},
    {"limit": "0"}, {"limit": "501"}, {"since": "-1"}, {"since": "yesterday"},
    {"since": "nan"},
])
def test_history_refuses_bad_parameters_by_name(client: httpx.Client,
                                               params: dict[str, str]) -> None:
    r = client.get("/v1/topics/jobs.a/history", params=params)
    assert r.status_code == 422, r.text
    assert next(iter(params)) in r.json()["detail"]


def test_history_refuses_a_bad_topic(client: httpx.Client) -> None:
    r = client.get("/v1/topics/a..b/history")
    assert r.status_code == 422 and r.json()["error"] == "invalid_topic", r.text


# a saga's timeline -----------------------------------------------------------------------------
def test_a_saga_timeline_has_each_step_with_its_command_and_reply(
    start_server: Callable[..., LiveServer],
) -> None:
    server = start_shop(start_server)
    with server.client() as c:
        r = c.post("/v1/commands/create-order",
                   json={"customer_id": "c-1", "product_id": "p-1", "quantity": 2})
        done = wait_terminal(c, r.headers["location"])
        saga_id = done["request_id"]
        t = c.get(f"/v1/sagas/{saga_id}/timeline").json()
        assert t["saga"] == "create-order" and t["status"] == "completed"
        assert [(s["name"], s["kind"], s["status"]) for s in t["timeline"]] == [
            ("create_order", "action", "completed"), ("reserve_credit", "action", "completed"),
            ("reserve_stock", "action", "completed"), ("approve", "action", "completed")]
        first = t["timeline"][0]
        assert first["command"] == "order.create"
        [attempt] = first["attempts"]
        assert attempt["outcome"] == "ok" and attempt["duration"] >= 0
        assert attempt["command"]["topic"] == "order.create"
        assert attempt["command"]["data"] == {"customer_id": "c-1", "product_id": "p-1",
                                              "quantity": 2, "saga_id": saga_id}
        assert attempt["reply"]["order_id"] == saga_id
        assert t["timeline"][1]["started"] >= first["finished"]
        # the command as the service got it: the same as the message on its topic
        [sent] = [m for m in c.get("/v1/topics/order.create/history").json()["messages"]
                  if m["id"] == attempt["command"]["id"]]
        assert sent["data"] == attempt["command"]["data"]

        r = c.post("/v1/commands/create-order",
                   json={"customer_id": "c-1", "product_id": "p-1", "quantity": 10_000})
        failed = wait_terminal(c, r.headers["location"])
        t = c.get(f"/v1/sagas/{failed['request_id']}/timeline").json()
        assert t["status"] == "compensated" and "failed" in t["reason"]
        rows = [(s["name"], s["kind"], s["status"]) for s in t["timeline"]]
        assert rows[:2] == [("create_order", "action", "completed"),
                            ("reserve_credit", "action", "rejected")]
        assert ("create_order", "compensation", "compensated") in rows
        rejected = t["timeline"][1]["attempts"][-1]
        assert rejected["outcome"] == "rejected" and rejected["error"]
        compensation = next(s for s in t["timeline"] if s["kind"] == "compensation")
        assert compensation["attempts"][0]["command"]["data"]["reason"] == t["reason"]

        assert c.get("/v1/sagas/nope/timeline").status_code == 404


# cancel and retry ----------------------------------------------------------------------------
CALLS: dict[str, int] = {}
GATE: dict[str, asyncio.Event] = {}  # (made on the server's loop, when first used)


async def _hold(data: dict[str, Any]) -> dict[str, Any]:
    return {"held": True}


async def _release(data: dict[str, Any]) -> None:
    CALLS["release"] = CALLS.get("release", 0) + 1


async def _wait_for_the_gate(data: dict[str, Any]) -> None:
    await GATE.setdefault("gate", asyncio.Event()).wait()


async def _open_the_gate(hub: tidings.Hub) -> None:
    GATE.setdefault("gate", asyncio.Event()).set()


async def _flaky_release(data: dict[str, Any]) -> None:
    CALLS["flaky"] = CALLS.get("flaky", 0) + 1
    if CALLS["flaky"] == 1:
        raise RuntimeError("the warehouse is closed")


async def _refuse(data: dict[str, Any]) -> None:
    raise tidings.Rejected("out of stock")


SLOW = tidings.Saga("slow", [
    tidings.Step("hold", action=_hold, compensation=_release),
    tidings.Step("wait", action=_wait_for_the_gate),  # until the test opens the gate
    tidings.Step("finish", action=_hold),
])
FRAGILE = tidings.Saga("fragile", [
    tidings.Step("hold", action=_hold, compensation=_flaky_release, compensation_retries=0),
    tidings.Step("refuse", action=_refuse),
])


@pytest.fixture
def sagas(start_server: Callable[..., LiveServer]) -> LiveServer:
    CALLS.clear()
    GATE.clear()
    return start_server(app_module=lambda hub: {"slow": hub.sagas(SLOW),
                                                "fragile": hub.sagas(FRAGILE)})


def _wait_status(c: httpx.Client, saga_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        state: dict[str, Any] = c.get(f"/v1/sagas/{saga_id}").json()
        if state["status"] == status or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def test_a_running_saga_is_cancelled_and_compensates(sagas: LiveServer) -> None:
    with sagas.client() as c:
        saga_id = c.post("/v1/commands/slow", json={}).json()["request_id"]
        deadline = time.monotonic() + 10
        while len((running := c.get(f"/v1/sagas/{saga_id}/timeline").json())["timeline"]) < 2 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running["status"] == "running"
        assert running["timeline"][1]["status"] == "running"  # waiting for its reply
        for bad in ({"reason": 5}, {"why": "x"}, {"reason": ""}, []):
            r = c.post(f"/v1/sagas/{saga_id}/cancel", json=bad)
            assert r.status_code == 422, r.text
        r = c.post(f"/v1/sagas/{saga_id}/cancel", content=b"{nope")
        assert r.status_code == 400, r.text
        assert c.post(f"/v1/sagas/{saga_id}/retry").status_code == 409  # not stuck
        assert _wait_status(c, saga_id, "running")["status"] == "running"  # nothing changed

        r = c.post(f"/v1/sagas/{saga_id}/cancel", json={"reason": "changed my mind"})
        assert r.status_code == 202, r.text
        assert r.json()["saga"] == "slow"
        sagas.call(_open_the_gate)  # a step in progress finishes; the next is not started
        done = _wait_status(c, saga_id, "compensated")
        assert done["status"] == "compensated" and "changed my mind" in done["reason"]
        assert CALLS["release"] == 1
        again = c.post(f"/v1/sagas/{saga_id}/cancel")
        assert again.status_code == 409 and "compensated" in again.json()["detail"]
        assert c.post("/v1/sagas/nope/cancel").status_code == 404


def test_a_stuck_saga_is_retried(sagas: LiveServer) -> None:
    with sagas.client() as c:
        saga_id = c.post("/v1/commands/fragile", json={}).json()["request_id"]
        stuck = _wait_status(c, saga_id, "stuck")
        assert stuck["status"] == "stuck" and "warehouse" in stuck["error"]
        assert c.post(f"/v1/sagas/{saga_id}/cancel").status_code == 409  # not running
        r = c.post(f"/v1/sagas/{saga_id}/retry")
        assert r.status_code == 202, r.text
        assert _wait_status(c, saga_id, "compensated")["status"] == "compensated"
        assert CALLS["flaky"] == 2
        t = c.get(f"/v1/sagas/{saga_id}/timeline").json()
        comp = next(s for s in t["timeline"] if s["kind"] == "compensation")
        assert [a["outcome"] for a in comp["attempts"]] == ["failed", "ok"]


def test_cancel_and_retry_need_the_token(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(token="s3cret", app_module=lambda hub: {"slow": hub.sagas(SLOW)})
    with server.client(headers={"Authorization": "Bearer s3cret"}) as c:
        saga_id = c.post("/v1/commands/slow", json={}).json()["request_id"]
    with server.client() as anonymous:
        for action in ("cancel", "retry"):
            r = anonymous.post(f"/v1/sagas/{saga_id}/{action}")
            assert r.status_code == 401 and "token" in r.json()["detail"]
    with server.client(headers={"Authorization": "Bearer s3cret"}) as c:
        assert c.get(f"/v1/sagas/{saga_id}").json()["status"] == "running"


# a stream's state ------------------------------------------------------------------------------
def test_a_stream_s_state_at_a_version_and_at_a_time(start_server: Callable[..., LiveServer],
                                                      ) -> None:
    server = start_shop(start_server)
    with server.client() as c:
        before = time.time()
        time.sleep(0.01)
        r = c.post("/v1/commands/create-order",
                   json={"customer_id": "c-1", "product_id": "p-1", "quantity": 1})
        order_id = wait_terminal(c, r.headers["location"])["request_id"]
        now = c.get("/v1/streams/c-1/state").json()
        assert now["aggregate"] == "Customer" and now["version"] == now["current_version"] == 2
        assert now["state"]["reservations"] == {order_id: now["state"]["reservations"][order_id]}
        assert [e["version"] for e in now["events"]] == [2, 1] and not now["more"]
        first = c.get("/v1/streams/c-1/state", params={"version": 1}).json()
        assert first["version"] == 1 and first["state"]["reservations"] == {}
        assert [e["type"] for e in first["events"]] == ["CustomerRegistered"]
        then = c.get("/v1/streams/c-1/state", params={"as_of": before}).json()
        assert then["version"] == 1 and then["state"] == first["state"]
        early = c.get("/v1/streams/c-1/state", params={"as_of": 1}).json()
        assert early["version"] == 0 and early["state"] is None and early["events"] == []
        short = c.get("/v1/streams/c-1/state", params={"limit": 1}).json()
        assert [e["version"] for e in short["events"]] == [2] and short["more"]
        # a saga's stream has no aggregate class: its events, and why there is no state
        saga = c.get(f"/v1/streams/saga-create-order-{order_id}/state").json()
        assert saga["state"] is None and "aggregate type" in saga["note"]
        assert saga["events"][0]["type"] == "tidings.saga.SagaCompleted"

        assert c.get("/v1/streams/nobody/state").status_code == 404
        for params in ({"version": "0"}, {"as_of": "-5"}, {"limit": "1001"},
                       {"as_of": "soon"}):
            r = c.get("/v1/streams/c-1/state", params=params)
            assert r.status_code == 422 and next(iter(params)) in r.json()["detail"], r.text


def test_an_aggregate_not_imported_shows_its_events_and_says_so(client: httpx.Client) -> None:
    client.post("/v1/streams/thing-1/events", json={
        "events": [{"type": "Made", "data": {"n": 1}, "headers": {"aggregate-type": "Thing"}}],
        "expected_version": 0})
    got = client.get("/v1/streams/thing-1/state").json()
    assert got["aggregate"] == "Thing" and got["state"] is None
    assert "not imported" in got["note"] and got["events"][0]["data"] == {"n": 1}


# the dashboard's snapshot: newest first, live counts, the last minutes ---------------------------
def test_the_snapshot_lists_the_newest_sagas_first_with_live_counts(
    start_server: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tidings.gateway import dashboard

    server = start_shop(start_server)
    monkeypatch.setattr(dashboard, "SAGAS_SHOWN", 3)
    ids = []
    with server.client() as c:
        for _ in range(5):
            r = c.post("/v1/commands/create-order",
                       json={"customer_id": "c-1", "product_id": "p-1", "quantity": 1})
            ids.append(wait_terminal(c, r.headers["location"])["request_id"])
        time.sleep(0.6)  # past the shared snapshot's freshness
        snap = c.get("/v1/dashboard").json()
    assert [s["id"] for s in snap["sagas"]["instances"]] == ids[::-1][:3]
    assert snap["sagas"]["by_status"] == {"completed": 5}
    points = snap["history"]
    assert points and all(p["t"] <= snap["time"] + 1 for p in points)
    assert sum(p["outcomes"].get("completed", 0) for p in points) == 5
    assert sum(sum(p.get("latency", [])) for p in points) == 5
    assert sum(p["published"].get("order.create", 0) for p in points) == 5
