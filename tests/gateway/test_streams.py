"""The event store over HTTP: append with expected_version, 409 on conflict, read ranges."""

from __future__ import annotations

import httpx

URL = "/v1/streams/account-1/events"


def ev(type: str, **data: object) -> dict[str, object]:
    return {"type": type, "data": data}


def test_append_then_read(client: httpx.Client) -> None:
    r = client.post(URL, json={"events": [ev("Opened", owner="ann"), ev("Deposited", amount=5)],
                               "expected_version": 0})
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["stream_id"] == "account-1" and out["version"] == 2
    assert len(out["positions"]) == 2 and out["duplicate"] is False
    r = client.post(URL, json={"events": [ev("Deposited", amount=7)], "expected_version": 2})
    assert r.status_code == 201 and r.json()["version"] == 3
    r = client.post(URL, json={"events": [ev("Noted", text="x")], "expected_version": "any"})
    assert r.json()["version"] == 4

    events = client.get(URL).json()
    assert [e["type"] for e in events["events"]] == ["Opened", "Deposited", "Deposited", "Noted"]
    assert [e["version"] for e in events["events"]] == [1, 2, 3, 4]
    assert events["events"][1]["data"] == {"amount": 5}
    assert events["next_from_version"] is None
    part = client.get(URL, params={"from_version": 2, "to_version": 3}).json()["events"]
    assert [e["version"] for e in part] == [2, 3]
    page = client.get(URL, params={"limit": 2}).json()
    assert len(page["events"]) == 2 and page["next_from_version"] == 3
    # the events are also messages on the stream's category topic
    topics = {t["topic"]: t["messages"] for t in client.get("/v1/topics").json()["topics"]}
    assert topics == {"account": 4}


def test_conflict_is_409_with_the_actual_version_and_stores_nothing(client: httpx.Client) -> None:
    client.post(URL, json={"events": [ev("Opened")], "expected_version": 0})
    for expected in (0, 5):
        r = client.post(URL, json={"events": [ev("Deposited", amount=1)],
                                   "expected_version": expected})
        assert r.status_code == 409, r.text
        body = r.json()
        assert body["error"] == "version_conflict" and body["actual_version"] == 1
        assert body["expected_version"] == expected and body["detail"]
    assert len(client.get(URL).json()["events"]) == 1


def test_client_event_ids_make_an_append_idempotent(client: httpx.Client) -> None:
    body = {"events": [{"type": "Opened", "data": {}, "id": "ev-1"}], "expected_version": 0}
    first = client.post(URL, json=body).json()
    again = client.post(URL, json=body)
    assert again.status_code == 201 and again.json()["duplicate"] is True
    assert again.json()["positions"] == first["positions"]


def test_bad_appends_and_reads(client: httpx.Client) -> None:
    for body in [
        {"events": [ev("Opened")]},  # expected_version is required
        {"events": [], "expected_version": 0},
        {"events": [ev("Opened")], "expected_version": -1},
        {"events": [ev("Opened")], "expected_version": "whatever"},
        {"events": [{"type": "Opened", "data": [1]}], "expected_version": 0},
        {"events": [{"type": "", "data": {}}], "expected_version": 0},
        {"events": [{"type": "Opened"}], "expected_version": 0},
        {"events": [ev("Opened")], "expected_version": 0, "topic": "bad..topic"},
        {"events": [ev("A"), {"type": "B", "data": {}, "headers": {"x": 1}}],
         "expected_version": 0},
    ]:
        r = client.post(URL, json=body)
        assert r.status_code == 422, (body, r.text)
        assert set(r.json()) >= {"error", "detail"}
    assert client.get(URL).status_code == 404
    assert client.get(URL, params={"from_version": 0}).status_code == 422
    assert client.get(URL, params={"limit": "many"}).status_code == 422
    assert client.get("/v1/topics").json() == {"topics": []}
