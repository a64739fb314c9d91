"""Fuzzing every route of a live gateway with what clients should not send.

Hypothesis draws a route (or a method it does not take) and fills it with
hostile parts: path segments, query strings and headers of any bytes
(non-ASCII digits, numbers past 2**63, invalid UTF-8, control characters,
reserved `$` names), and bodies that are well-shaped JSON with such values,
JSON nested far deeper than the limit, JSON with invalid UTF-8 in a string,
or not JSON at all. For every request: no 5xx, an answer within the client's
timeout, a 4xx changes nothing stored (the log, and every subscription's
pending messages), and the server goes on answering valid requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tidings

from .conftest import LiveServer


class Ordering:
    """A command target, so the command routes get past 404."""

    async def start(self, data: dict[str, Any], id: str) -> str:
        return id

    async def get(self, id: str) -> dict[str, Any] | None:
        return {"status": "running"} if id.startswith("k-") else None


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory: Path = tmp_path_factory.mktemp("fuzz")
    server = LiveServer(f"sqlite:///{directory}/fuzz.db?durability=normal", max_wait=0.05,
                        max_body=64 * 1024, commands={"create-order": Ordering()}).start()
    with server.client() as c:  # something to pull, ack and read
        c.post("/v1/topics/orders.created/messages",
               json={"messages": [{"data": {"n": i}} for i in range(50)]})
        c.get("/v1/subscriptions/g/messages", params={"topic": "orders.*", "max": 5})
        c.post("/v1/streams/order-1/events",
               json={"events": [{"type": "Placed", "data": {}}], "expected_version": 0})
    yield server
    server.stop()


# hostile parts -------------------------------------------------------------------------
BIG = 2**63
NUMBERS = st.sampled_from([
    "0", "1", "10", "-1", "²", "٣", "١٠", "1_0", "+1", " 1", "0x1", "1.0", "1e3", "1e400",
    "nan", "inf", "-0", "", str(BIG - 1), str(BIG), str(BIG + 1), "9" * 30, "9" * 5000,
    "0" * 40 + "1", "beginning", "end",
])
NAMES = st.sampled_from([
    "orders.created", "orders.*", "orders.>", ">", "*", "g", "order-1", "$dlq.g", "$x",
    "$dlq.*", "a..b", "a.", ".a", "a b", "a/b", "é", "g" * 250, "g" * 251, "x" * 300, "",
    "create-order", "k-1", "%", "\x00", "\n", "a:b:1", "g:orders.*:1",
])
RAW = st.binary(max_size=40)


def _segment(value: str | bytes) -> str:
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    return quote(raw, safe="")


TEXT = st.one_of(NAMES, NUMBERS, st.text(max_size=30), RAW)
HEADER = st.one_of(NUMBERS, NAMES, st.binary(max_size=30)).map(  # what HTTP/1.1 can carry
    lambda v: bytes(b for b in (v if isinstance(v, bytes) else v.encode("utf-8", "replace"))
                    if b >= 0x20 and b != 0x7F).strip(b" "))

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.sampled_from(["any", "", "g:orders.*:1", f"g:orders.*:{BIG}", "g:orders.*:²", "$dlq.g"]),
)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@st.composite
def shaped(draw: st.DrawFn, route: str) -> Any:
    """A body of the route's shape, with hostile values in its fields."""
    value = st.one_of(JSON, TEXT.filter(lambda v: isinstance(v, str)))
    if route == "publish":
        one = st.fixed_dictionaries({"data": JSON}, optional={
            "key": value, "headers": JSON, "id": value, "data_b64": value})
        return draw(st.one_of(one, st.fixed_dictionaries(
            {"messages": st.lists(one | JSON, max_size=4)})))
    if route in ("ack", "nack"):
        ids = st.lists(st.one_of(NUMBERS.map(lambda n: f"g:orders.*:{n}"), value), max_size=4)
        return draw(st.fixed_dictionaries({"ack_ids": ids | JSON},
                                          optional={"delay": JSON}))
    if route == "append":
        event = st.fixed_dictionaries({"type": value, "data": JSON},
                                      optional={"id": value, "headers": JSON})
        return draw(st.fixed_dictionaries(
            {"events": st.lists(event | JSON, max_size=3), "expected_version": JSON},
            optional={"topic": value}))
    return draw(JSON)


@st.composite
def body(draw: st.DrawFn, route: str) -> bytes:
    kind = draw(st.sampled_from(["shaped", "deep", "utf8", "bytes", "empty", "huge"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "empty":
        return b""
    if kind == "huge":
        return b'{"data": ' + b"9" * draw(st.sampled_from([20, 400, 5000])) + b"}"
    value = draw(shaped(route))
    if kind == "deep":  # the nesting goes in as text: encoding it would recurse here too
        if isinstance(value, dict) and value:
            value[draw(st.sampled_from(sorted(value)))] = DEEP
        else:
            value = DEEP
    raw = msgspec.json.encode(value)
    if kind == "deep":
        depth = draw(st.sampled_from([120, 127, 128, 129, 1000, 20_000]))
        raw = raw.replace(msgspec.json.encode(DEEP), b"[" * depth + b"1" + b"]" * depth)
    if kind == "utf8" and b'"' in raw:
        at = raw.index(b'"') + 1  # inside the first string
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[at:]
    return raw


DEEP = "\x00deep"  # where the deep nesting goes


class Call:
    """One request (not a dataclass: hypothesis would print every byte of its body)."""

    def __init__(self, method: str, path: str, params: list[tuple[str, str]],
                 headers: dict[bytes, bytes], content: bytes | None) -> None:
        self.method = method
        self.path = path
        self.params = params
        self.headers = headers
        self.content = content

    def url(self) -> str:
        query = "&".join(f"{_segment(k)}={v}" for k, v in self.params)
        return self.path + ("?" + query if query else "")

    def __repr__(self) -> str:  # short: a body may be megabytes of brackets
        content = self.content if self.content is None or len(self.content) < 300 else (
            self.content[:150] + b"..." + self.content[-150:])
        return (f"Call({self.method} {self.url()[:300]!r}, headers={self.headers!r}, "
                f"content={content!r} ({len(self.content or b'')} bytes))")


#: Every route: its method, its path with {} for a hostile segment, its query and its body
#: (the routes that read input more than once, so they are drawn more often).
ROUTES: list[tuple[str, str, tuple[str, ...], str | None]] = 2 * [
    ("POST", "/v1/topics/{}/messages", (), "publish"),
    ("GET", "/v1/topics/{}/stream", ("start",), None),
    ("GET", "/v1/subscriptions/{}/messages", ("topic", "max", "wait"), None),
    ("POST", "/v1/subscriptions/{}/ack", (), "ack"),
    ("POST", "/v1/subscriptions/{}/nack", (), "nack"),
    ("POST", "/v1/streams/{}/events", (), "append"),
    ("GET", "/v1/streams/{}/events", ("from_version", "to_version", "limit"), None),
    ("POST", "/v1/commands/{}", (), "command"),
    ("GET", "/v1/requests/{}", ("wait",), None),
] + [
    ("GET", "/v1/topics", (), None),
    ("GET", "/v1/sagas", ("status",), None),
    ("GET", "/v1/sagas/{}", (), None),
    ("GET", "/v1/dashboard", (), None),
    ("GET", "/v1/dashboard/stream", (), None),
    ("GET", "/v1/openapi.json", (), None),
    ("GET", "/v1/asyncapi.json", (), None),
    ("GET", "/healthz", (), None),
    ("GET", "/metrics", (), None),
    ("GET", "/", (), None),
]
NUMERIC = {"start", "max", "wait", "from_version", "to_version", "limit"}


@st.composite
def calls(draw: st.DrawFn) -> Call:
    method, template, query, route = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 9)) == 0:  # now and then, a method the route does not take
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    if "{}" in template:
        path = template.replace("{}", _segment(draw(st.one_of(NAMES, TEXT))))
    else:
        path = template
    params = [(name, _segment(draw(NUMBERS if name in NUMERIC else st.one_of(NAMES, TEXT))))
              for name in query if draw(st.integers(0, 3))]
    params += draw(st.lists(st.tuples(st.sampled_from(["max", "wait", "x", "topic"]),
                                      TEXT.map(_segment)), max_size=2))
    headers = {}
    if "stream" in template and draw(st.booleans()):
        headers[b"last-event-id"] = draw(HEADER)
    for name in (b"idempotency-key", b"content-type", b"authorization"):
        if draw(st.integers(0, 5)) == 0:
            headers[name] = draw(HEADER)
    content = draw(body(route)) if route is not None and method == "POST" else None
    return Call(method, path, params, headers, content)


# the properties ------------------------------------------------------------------------
def stored(server: LiveServer) -> tuple[int, list[tuple[str, str, int]]]:
    """The log's last position and every subscription's pending count."""
    async def look(hub: tidings.Hub) -> tuple[int, list[tuple[str, str, int]]]:
        subs = await hub.engine.subscriptions()
        return (await hub.engine.last_position(),
                sorted((s.group, s.pattern, s.pending) for s in subs))

    return server.call(look)


def send(client: httpx.Client, call: Call) -> int:
    """The status of `call` (an event stream is closed as soon as its status is in)."""
    request = client.build_request(call.method, call.url(), content=call.content,
                                   headers=list(call.headers.items()))
    response = client.send(request, stream=True)
    try:
        if response.status_code < 300 and \
                response.headers.get("content-type", "").startswith("text/event-stream"):
            return response.status_code
        response.read()
        if response.status_code >= 400 and call.method != "HEAD":
            error = response.json()  # every error is {error, detail}
            assert set(error) >= {"error", "detail"} and error["detail"], response.text
        return response.status_code
    finally:
        response.close()


@given(calls())
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=False)
def test_no_input_gets_a_5xx_or_stores_anything_when_refused(target: LiveServer,
                                                             call: Call) -> None:
    before = stored(target)
    with target.client(timeout=20) as client:  # no hang: an answer within the timeout
        status = send(client, call)
        assert status < 500, call
        if 400 <= status < 500:
            assert stored(target) == before, (status, call)
        assert client.get("/v1/topics").status_code == 200


def test_the_server_still_serves_after_the_fuzzing(target: LiveServer) -> None:
    with target.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.post("/v1/topics/after.fuzz/messages", json={"data": {"ok": True}})
        assert r.status_code == 201, r.text
        got = c.get("/v1/subscriptions/after/messages",
                    params={"topic": "after.fuzz", "wait": 0.05}).json()["messages"]
        assert [m["data"] for m in got] == [{"ok": True}]
        r = c.post("/v1/subscriptions/after/ack", json={"ack_ids": [got[0]["ack_id"]]})
        assert r.json() == {"settled": 1}
        r = c.post("/v1/streams/after-1/events",
                   json={"events": [{"type": "Done", "data": {}}], "expected_version": 0})
        assert r.status_code == 201
        assert c.get("/v1/streams/after-1/events").json()["events"][0]["type"] == "Done"
