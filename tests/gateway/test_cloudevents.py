"""CloudEvents 1.0 in and out of a live gateway, with the `cloudevents` SDK as the client.

Publish in binary mode (ce-* headers), structured mode (application/cloudevents+json) and
batch mode; pull as a structured CloudEvent (Accept) or a batch; stream CloudEvents over
SSE (?format=cloudevents). The SDK reads what the gateway emits, so the mapping is checked
from both ends. Bad CloudEvents get a 4xx that says what to do, and store nothing.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, from_http, to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tidings.gateway import cloudevents as ce
from tidings.gateway.http import ApiError

from .conftest import LiveServer

FORMAT = JSONFormat()
TOPIC = "orders.created"
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
PULL = "/v1/subscriptions/billing/messages"


def event(data: Any = None, **attributes: Any) -> CloudEvent:
    attrs = {"type": "com.example.order.created", "source": "/shop/orders",
             "subject": "order-1", "time": datetime(2024, 5, 1, 12, 0, 0, 500000, UTC),
             **attributes}
    return CloudEvent(attrs, data)


def post(client: httpx.Client, message: HTTPMessage, topic: str = TOPIC) -> httpx.Response:
    return client.post(f"/v1/topics/{topic}/messages", headers=message.headers,
                       content=message.body)


def pull_one(client: httpx.Client, topic: str) -> BaseCloudEvent:
    r = client.get(PULL, params={"topic": topic}, headers={"Accept": STRUCTURED})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == STRUCTURED
    return from_http(HTTPMessage(dict(r.headers), r.content), FORMAT)


def same(a: BaseCloudEvent, b: BaseCloudEvent) -> None:
    for get in ("get_id", "get_source", "get_type", "get_subject", "get_time",
                "get_datacontenttype", "get_data"):
        assert getattr(a, get)() == getattr(b, get)(), get


def stored_topics(client: httpx.Client) -> list[str]:
    return [t["topic"] for t in client.get("/v1/topics").json()["topics"]]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the tests that each use a topic of their own."""
    directory: Path = tmp_path_factory.mktemp("ce")
    server = LiveServer(f"sqlite:///{directory}/ce.db", max_body=64 * 1024).start()
    yield server
    server.stop()


@pytest.fixture
def client(shared: LiveServer) -> Iterator[httpx.Client]:
    """A client of the shared server (each test below publishes to topics of its own)."""
    with shared.client() as c:
        yield c


# round trips ----------------------------------------------------------------------------
ROUND_TRIPS = [
    ("binary", {"order": 1, "items": ["a", "b"]}, "application/json"),
    ("binary", "héllo wörld", "text/plain; charset=utf-8"),
    ("binary", b"\x00\xffbytes", "application/octet-stream"),
    ("structured", {"order": 1, "nested": {"total": 42.5}}, "application/json"),
    ("structured", "just text", "text/plain"),
    ("structured", b"\x00\xffbytes", "application/octet-stream"),
    ("structured", {"order": 1}, None),  # no datacontenttype: JSON, as the JSON format says
]


@pytest.mark.parametrize(("n", "mode", "data", "content_type"),
                         [(n, *case) for n, case in enumerate(ROUND_TRIPS)])
def test_a_published_cloudevent_comes_back_the_same(shared: LiveServer, n: int, mode: str,
                                                    data: Any, content_type: str | None) -> None:
    topic = f"round.trip{n}"  # a topic of its own on the shared server
    extra = {"datacontenttype": content_type} if content_type else {}
    sent = event(data, id=f"evt-{topic}", region="eu west", **extra)
    message = to_binary(sent, FORMAT) if mode == "binary" else to_structured(sent, FORMAT)
    with shared.client() as client:
        r = post(client, message, topic)
    assert r.status_code == 201, r.text
    assert r.json()["id"] == f"evt-{topic}" and r.json()["duplicate"] is False

    with shared.client() as client:
        got = pull_one(client, topic)
        same(got, sent if content_type else event(data, id=f"evt-{topic}",
                                                  datacontenttype="application/json"))
        assert got.get_extension("region") == "eu west"  # percent-decoded in binary mode
        assert got.get_extension("tidingstopic") == topic
        assert got.get_extension("tidingsattempt") == 1
        ack_id = got.get_extension("tidingsackid")
        assert ack_id == f"billing:{topic}:{got.get_extension('tidingsposition')}"
        r = client.post("/v1/subscriptions/billing/ack", json={"ack_ids": [ack_id]})
        assert r.json() == {"settled": 1}


def test_the_headers_the_envelope_gets(shared: LiveServer, client: httpx.Client) -> None:
    topic = "envelope.headers"
    sent = event({"n": 1}, id="evt-2", datacontenttype="application/json",
                 partitionkey="customer-7", dataschema="https://example.com/order.json",
                 priority=5, urgent=True)
    assert post(client, to_structured(sent, FORMAT), topic).status_code == 201

    async def first(hub: Any) -> Any:
        async for m in hub.read(topic, start="beginning"):
            return m

    m = shared.call(first)
    assert (m.id, m.key, m.data) == ("evt-2", "customer-7", b'{"n": 1}')
    assert dict(m.headers) == {
        "ce-type": "com.example.order.created", "ce-source": "/shop/orders",
        "ce-subject": "order-1", "ce-time": "2024-05-01T12:00:00.500000Z",
        "ce-dataschema": "https://example.com/order.json", "ce-priority": "5",
        "ce-urgent": "true", "content-type": "application/json"}
    got = pull_one(client, topic)
    assert got.get_extension("partitionkey") == "customer-7"
    assert got.get_dataschema() == "https://example.com/order.json"


def test_a_plain_message_comes_out_as_a_cloudevent(client: httpx.Client) -> None:
    topic = "plain.message"
    r = client.post(f"/v1/topics/{topic}/messages", json={"data": {"n": 1}, "key": "k"})
    assert r.status_code == 201
    got = pull_one(client, topic)
    assert got.get_id() == r.json()["id"]
    assert (got.get_source(), got.get_type()) == (f"/tidings/{topic}", topic)
    assert got.get_data() == {"n": 1} and got.get_datacontenttype() == "application/json"
    assert got.get_extension("partitionkey") == "k"
    assert got.get_extension("tidingsposition") == r.json()["position"]
    when = got.get_time()
    assert when is not None and abs((datetime.now(UTC) - when).total_seconds()) < 60


def test_batch_in_and_out(client: httpx.Client) -> None:
    events = [event({"n": i}, id=f"b-{i}", datacontenttype="application/json")
              for i in range(3)]
    body = b"[" + b",".join(FORMAT.write(e) for e in events) + b"]"
    r = client.post("/v1/topics/batch.in/messages", content=body,
                    headers={"Content-Type": BATCH})
    assert r.status_code == 201, r.text
    assert [m["id"] for m in r.json()["messages"]] == ["b-0", "b-1", "b-2"]

    r = client.get(PULL, params={"topic": "batch.in", "max": 10}, headers={"Accept": BATCH})
    assert r.status_code == 200 and r.headers["content-type"] == BATCH
    got = [FORMAT.read(None, json.dumps(item)) for item in r.json()]
    for a, b in zip(got, events, strict=True):
        same(a, b)


def test_the_same_cloudevent_id_is_stored_once(client: httpx.Client) -> None:
    sent = event({"n": 1}, id="once", datacontenttype="application/json")
    first = post(client, to_binary(sent, FORMAT), "once.only").json()
    again = post(client, to_structured(sent, FORMAT), "once.only").json()
    assert again == {**first, "duplicate": True}
    counts = {t["topic"]: t["messages"] for t in client.get("/v1/topics").json()["topics"]}
    assert counts["once.only"] == 1


def test_cloudevents_over_server_sent_events(shared: LiveServer, client: httpx.Client) -> None:
    sent = event("over SSE", id="sse-1", datacontenttype="text/plain")
    assert post(client, to_binary(sent, FORMAT), "sse.one").status_code == 201
    with shared.client() as sse, sse.stream(
            "GET", "/v1/topics/sse.*/stream",
            params={"start": "beginning", "format": "cloudevents"}) as r:
        assert r.status_code == 200
        frame = {}
        for line in r.iter_lines():
            if not line and "data" in frame:
                break
            name, _, value = line.partition(": ")
            frame[name] = value
    assert frame["event"] == "message" and int(frame["id"]) >= 1
    got = FORMAT.read(None, frame["data"])
    same(got, sent)
    assert got.get_extension("tidingsposition") == int(frame["id"])
    assert client.get("/v1/topics/orders.*/stream",
                      params={"format": "xml"}).status_code == 422


def test_pull_negotiates_and_keeps_the_json_default(client: httpx.Client) -> None:
    params = {"topic": "negotiated"}
    r = client.get(PULL, params=params, headers={"Accept": STRUCTURED})
    assert r.status_code == 204 and r.content == b""  # nothing there: no event
    r = client.get(PULL, params={**params, "max": "5"}, headers={"Accept": STRUCTURED})
    assert r.status_code == 422 and BATCH in r.json()["detail"]
    client.post("/v1/topics/negotiated/messages", json={"data": 1})
    for accept in ("*/*", "application/json", f"{STRUCTURED};q=0, */*",
                   f"application/json, {STRUCTURED}", f"{STRUCTURED};q=0.5, application/json"):
        r = client.get(PULL, params=params, headers={"Accept": accept})
        assert r.headers["content-type"] == "application/json", accept
        assert set(r.json()) == {"messages"}
    r = client.get(PULL, params=params, headers={"Accept": f"application/json;q=0.9, {BATCH}"})
    assert r.headers["content-type"] == BATCH


# bad CloudEvents ------------------------------------------------------------------------
GOOD = {"specversion": "1.0", "id": "x-1", "source": "/s", "type": "t"}
GOOD_HEADERS = {f"ce-{k}": v for k, v in GOOD.items()}


def structured(**change: Any) -> tuple[dict[str, str], bytes]:
    body = {k: v for k, v in {**GOOD, **change}.items() if v is not ...}
    return {"Content-Type": STRUCTURED}, json.dumps(body).encode()


def binary(change: dict[str, Any] | None = None, body: bytes = b"{}",
           content_type: str | None = "application/json") -> tuple[dict[str, str], bytes]:
    headers = {k: v for k, v in {**GOOD_HEADERS, **(change or {})}.items() if v is not ...}
    if content_type:
        headers["Content-Type"] = content_type
    return headers, body


DEEP = b"[" * 200 + b"]" * 200
BAD: list[tuple[str, tuple[dict[str, str], bytes], int, str]] = [
    ("no specversion", structured(specversion=...), 422, "requires specversion"),
    ("no id", structured(id=...), 422, "'id' is missing"),
    ("no source", structured(source=...), 422, "'source' is missing"),
    ("no type", structured(type=...), 422, "'type' is missing"),
    ("null type", structured(type=None), 422, "'type' is missing"),
    ("0.3", structured(specversion="0.3"), 422, 'send specversion "1.0"'),
    ("numeric version", structured(specversion=1.0), 422, "must be a string"),
    ("numeric id", structured(id=7), 422, "'id' must be a string, not a number"),
    ("empty source", structured(source=""), 422, "give it a value"),
    ("long id", structured(id="i" * 256), 422, "at most 255"),
    ("control char", structured(subject="a\x00b"), 422, "control character"),
    ("bad time", structured(time="yesterday"), 422, "RFC 3339"),
    ("no offset", structured(time="2024-05-01T12:00:00"), 422, "RFC 3339"),
    ("feb 30", structured(time="2024-02-30T12:00:00Z"), 422, "RFC 3339"),
    ("hour 24", structured(time="2024-02-03T24:00:00Z"), 422, "RFC 3339"),
    ("object ext", structured(ext={"a": 1}), 422, "a string, an integer or a boolean"),
    ("fraction ext", structured(ext=1.5), 422, "not 1.5"),
    ("huge ext", structured(ext=2**40), 422, "32-bit"),
    ("bad name", structured(Region="eu"), 422, "lowercase letters and digits"),
    ("our name", structured(tidingsposition=1), 422, "the gateway's own"),
    ("both data", structured(data=1, data_base64="AA=="), 422, "not both"),
    ("bad base64", structured(data_base64="not base64!"), 422, "not base64"),
    ("unpadded", structured(data_base64="AAA"), 422, "not base64"),
    ("base64 number", structured(data_base64=5), 422, "must be a string"),
    ("array", ({"Content-Type": STRUCTURED}, b"[]"), 422, "one JSON object"),
    ("not json", ({"Content-Type": STRUCTURED}, b"{nope"), 400, "not valid JSON"),
    ("empty", ({"Content-Type": STRUCTURED}, b""), 400, "empty"),
    ("not utf-8", ({"Content-Type": STRUCTURED},
                   b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":"\xff"}'),
     400, "UTF-8"),
    ("deep", ({"Content-Type": STRUCTURED}, b'{"data":' + DEEP + b"}"), 422, "levels deep"),
    ("empty batch", ({"Content-Type": BATCH}, b"[]"), 422, "1 to 1000 "),
    ("batch of one bad", ({"Content-Type": BATCH}, b'[' + structured()[1] + b', 5]'), 422,
     "batch[1] must be a CloudEvent"),
    ("batch object", ({"Content-Type": BATCH}, structured()[1]), 422, "JSON array"),
    ("avro", ({"Content-Type": "application/cloudevents+avro"}, b"{}"), 415,
     "application/cloudevents+json"),
    ("binary, no specversion", binary({"ce-specversion": ...}), 422, "ce-specversion"),
    ("binary, no id", binary({"ce-id": ...}), 422, "header ce-id is missing"),
    ("binary, stray header", ({"ce-type": "t"}, b"{}"), 422, "requires specversion"),
    ("binary, wrong version", binary({"ce-specversion": "0.3"}), 422, "1.0"),
    ("binary, bad time", binary({"ce-time": "2024-13-01T00:00:00Z"}), 422, "RFC 3339"),
    ("binary, bad name", binary({"ce-foo-bar": "x"}), 422, "lowercase letters"),
    ("binary, datacontenttype", binary({"ce-datacontenttype": "text/plain"}), 422,
     "Content-Type header"),
    ("binary, not utf-8", binary({"ce-subject": "%FF"}), 422, "percent-encode"),
    ("binary, control", binary({"ce-subject": "a%00b"}), 422, "control character"),
    ("binary, bad json", binary(body=b"{nope"), 400, "not valid JSON"),
    ("binary, deep json", binary(body=DEEP), 422, "levels deep"),
    ("binary, reserved topic", binary(), 422, "reserved"),
]


@pytest.mark.parametrize(("request_", "status", "says"),
                         [pytest.param(r, s, m, id=name) for name, r, s, m in BAD])
def test_a_bad_cloudevent_is_refused_saying_why_and_stores_nothing(
        shared: LiveServer, request_: tuple[dict[str, str], bytes], status: int,
        says: str) -> None:
    headers, body = request_
    topic = "$dlq.x" if "reserved" in says else "bad.events"
    with shared.client() as c:
        r = c.post(f"/v1/topics/{topic}/messages", headers=headers, content=body)
        assert r.status_code == status, r.text
        assert says in r.json()["detail"], r.json()
        assert topic not in stored_topics(c)


def test_a_cloudevent_over_the_body_limit_is_413(shared: LiveServer) -> None:
    with shared.client() as c:
        r = post(c, to_binary(event(b"x" * 70_000, datacontenttype="text/plain"), FORMAT),
                 topic="big.events")
        assert r.status_code == 413
        assert "big.events" not in stored_topics(c)


# the pure core, exhaustively --------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8)
NAMES = st.sampled_from([*GOOD, "time", "subject", "data", "data_base64", "datacontenttype",
                         "partitionkey", "dataschema", "ext", "Ext", "tidingsx", "a_b", ""])


@given(st.sampled_from([GOOD, {}]), st.dictionaries(NAMES, JSON_VALUES, max_size=6),
       st.sampled_from([STRUCTURED, BATCH]))
@example(GOOD, {"time": "2024-01-01T00:00:00Z", "data": {"a": [1]}}, STRUCTURED)
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_structured_input_is_an_event_or_a_4xx(base: dict[str, Any], change: dict[str, Any],
                                               media: str) -> None:
    obj = {**base, **change}
    body = json.dumps(obj if media == STRUCTURED else [obj]).encode()
    try:
        out = ce.events_in([(b"content-type", media.encode())], body)
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.detail
        return
    one = out[0] if isinstance(out, list) else out
    assert isinstance(one, ce.EventIn) and one.id == obj["id"]
    assert all(k.startswith("ce-") or k == "content-type" for k in one.headers)


HEADER_NAMES = st.sampled_from([f"ce-{k}" for k in (*GOOD, "time", "subject", "x", "X",
                                                    "a-b", "data", "datacontenttype", "")])
HEADER_VALUES = st.sampled_from(["1.0", "0.3", "", "t", "%", "%FF", "%00", "2024-01-01T00:00:00Z",
                                 "2024-02-30T00:00:00Z", "héllo"]) | st.text(max_size=10)


@given(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=8),
       st.sampled_from([None, "application/json", "text/plain", "application/x+json"]),
       st.binary(max_size=20) | st.sampled_from([b"", b"{}", b'"x"', DEEP]))
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_binary_input_is_an_event_or_a_4xx(headers: list[tuple[str, str]],
                                           content_type: str | None, body: bytes) -> None:
    raw = [(k.encode(), v.encode()) for k, v in [*GOOD_HEADERS.items(), *headers]]
    if content_type:
        raw.append((b"content-type", content_type.encode()))
    try:
        out = ce.events_in(raw, body)
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.detail
        return
    assert isinstance(out, ce.EventIn) and out.data == body


def test_a_request_without_cloudevents_is_left_alone() -> None:
    assert ce.events_in([(b"content-type", b"application/json")], b"{}") is None
    assert ce.events_in([], b"{}") is None


@given(st.datetimes(timezones=st.just(UTC)))
def test_times_the_sdk_writes_are_valid(when: datetime) -> None:
    assert ce.valid_time(when.isoformat().replace("+00:00", "Z"))
    assert ce.valid_time(when.isoformat())


@pytest.mark.parametrize("bad", ["2024-01-01", "2024-01-01T00:00Z", "2024-01-01 00:00:00Z",
                                 "2024-01-01T00:00:00+24:00", "２０２４-01-01T00:00:00Z",
                                 "2023-02-29T00:00:00Z", "2024-01-01T00:00:00Z\n"])
def test_times_that_are_not_rfc_3339(bad: str) -> None:
    assert not ce.valid_time(bad)


def test_data_comes_out_by_its_content_type() -> None:
    from tidings.messages import Message

    def out(data: bytes, ct: str) -> dict[str, Any]:
        return ce.cloudevent_out(Message("i", "t", None, data, {"content-type": ct}, 0.0, 1))

    assert out(b'{"a": 1}', "application/json")["data"] == {"a": 1}
    assert out(b"<a/>", "application/xml")["data"] == "<a/>"
    assert out(b"\xff", "text/plain")["data_base64"] == base64.b64encode(b"\xff").decode()
    assert out(b"{nope", "application/json")["data_base64"]
    assert out(DEEP, "application/json")["data_base64"]
    assert "data" not in out(b"", "application/json")
    assert out(b"x", "application/json")["time"] == "1970-01-01T00:00:00Z"
