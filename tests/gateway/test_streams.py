"""The event store over HTTP: append with expected_version, 409 on conflict, read ranges."""

from __future__ import annotations

import httpx

import tidings
from tidings.eventsourcing.records import NewEvent

from .conftest import LiveServer

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
    assert r.status_code == 201 and r.json()["version"] == 3, r.text
    r = client.post(URL, json={"events": [ev("Noted", text="x")], "expected_version": "any"})
    assert r.status_code == 201 and r.json()["version"] == 4, r.text

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


def test_an_append_may_not_write_to_tidings_own_topics(client: httpx.Client) -> None:
    for url, body in [
        (URL, {"events": [ev("A")], "expected_version": 0, "topic": "$dlq.g1"}),
        (URL, {"events": [ev("A")], "expected_version": 0, "topic": "$x"}),
        ("/v1/streams/$x/events", {"events": [ev("A")], "expected_version": 0}),
        ("/v1/streams/$dlq.g1-7/events", {"events": [ev("A")], "expected_version": "any"}),
    ]:
        r = client.post(url, json=body)
        assert r.status_code == 422, (url, body, r.text)
        assert "reserved" in r.json()["detail"]
    assert client.get("/v1/topics").json() == {"topics": []}
    assert client.get("/v1/streams/$x/events").status_code == 404  # nothing stored


def test_expected_version_is_an_integer_as_json_counts_them(client: httpx.Client) -> None:
    r = client.post(URL, json={"events": [ev("A")], "expected_version": 0.0})
    assert r.status_code == 201, r.text
    r = client.post(URL, content=b'{"events": [{"type": "B", "data": {}}], '
                    b'"expected_version": 1.0e0}')
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    for bad in (1.5, 2**63, -1.0, 1e300, True):
        r = client.post(URL, json={"events": [ev("C")], "expected_version": bad})
        assert r.status_code == 422, (bad, r.text)
    r = client.post(URL, json={"events": [ev("C")], "expected_version": 87.0})
    assert r.status_code == 409 and r.json()["actual_version"] == 2


def test_read_bounds_are_ascii_digits_only(client: httpx.Client) -> None:
    client.post(URL, json={"events": [ev("A")], "expected_version": 0})
    for name in ("from_version", "to_version", "limit"):
        for bad in ["²", "٣", "1_0", "+1", " 1", "", str(2**63), "9" * 5000]:
            r = client.get(URL, params={name: bad})
            assert r.status_code == 422 and repr(name) in r.json()["detail"], (name, bad, r.text)
    assert client.get(URL, params={"to_version": str(2**63 - 1)}).status_code == 200


def test_stream_ids_with_control_characters_are_refused(client: httpx.Client) -> None:
    for stream_id in ("a%01b", "a%00", "tab%09", "%1F"):
        url = f"/v1/streams/{stream_id}/events"
        r = client.post(url, json={"events": [ev("A")], "expected_version": 0})
        assert r.status_code == 422 and r.json()["error"] == "invalid_stream_id", r.text
        assert client.get(url).status_code == 422
    # a line break never matches a route at all
    r = client.post("/v1/streams/a%0Ab/events", json={"events": [ev("A")], "expected_version": 0})
    assert r.status_code == 404
    assert client.get("/v1/topics").json() == {"topics": []}


def test_options_lists_both_methods_of_the_events_route(client: httpx.Client) -> None:
    r = client.options(URL)
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "POST"}


def test_events_nested_deeper_than_the_gateway_reads_are_read_as_stored(
    server: LiveServer, client: httpx.Client,
) -> None:
    deep = '{"a": ' + "[" * 900 + "]" * 900 + "}"

    async def append_deep(hub: tidings.Hub) -> None:  # in-process: no gateway limit applies
        await hub.events.append("deep-1", [NewEvent(type="Deep", data=deep.encode())])

    server.call(append_deep)
    r = client.get("/v1/streams/deep-1/events")
    assert r.status_code == 200
    assert b'"type":"Deep"' in r.content and b'"data":' + deep.encode() in r.content
