"""Bad input, limits, auth and overload: always `{error, detail}`, never a stack trace."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

import tidings
from tidings.gateway import serve
from tidings.gateway.auth import check_bind, is_loopback
from tidings.gateway.http import ApiError
from tidings.gateway.limits import BodyBytes

from .conftest import LiveServer


def assert_error(r: httpx.Response, status: int, error: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) >= {"error", "detail"} and body["detail"]
    assert "Traceback" not in r.text
    if error is not None:
        assert body["error"] == error


def test_bad_input_gets_a_json_error_and_stores_nothing(client: httpx.Client) -> None:
    url = "/v1/topics/orders.created/messages"
    assert_error(client.post(url, content=b"{not json"), 400, "malformed_json")
    assert_error(client.post(url, content=b""), 400, "malformed_json")
    assert_error(client.get("/v1/nothing/here"), 404, "not_found")
    assert_error(client.delete("/v1/topics"), 405, "method_not_allowed")
    assert_error(client.post("/v1/topics/orders..created/messages", json={"data": 1}), 422,
                 "invalid_topic")
    assert_error(client.post("/v1/topics/orders.*/messages", json={"data": 1}), 422,
                 "invalid_topic")
    assert_error(client.post("/v1/topics/$dlq.x/messages", json={"data": 1}), 422,
                 "invalid_topic")
    assert_error(client.post(url, json={"key": "k"}), 422, "invalid_field")
    assert_error(client.post(url, json={"data": 1, "colour": "red"}), 422, "invalid_field")
    assert_error(client.post(url, json={"data": 1, "key": ""}), 422)
    assert_error(client.post(url, json={"data": 1, "headers": {"a": 1}}), 422)
    assert_error(client.post(url, json=[1, 2]), 422)
    assert_error(client.post(url, json={"data_b64": "%%%"}), 422)
    assert_error(client.post(url, json={"messages": []}), 422)
    # one bad message spoils the whole batch: nothing stored
    assert_error(client.post(url, json={"messages": [{"data": 1}, {"data": 2, "key": ""}]}), 422)
    assert client.get("/v1/topics").json() == {"topics": []}


def test_413_from_content_length_before_the_body_is_read(
    start_server: Callable[..., LiveServer],
) -> None:
    server = start_server(max_body=1000)
    # Declare 10 MB and send none of it: the answer must come without waiting for the body.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/topics/big/messages HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):  # the server answers, then closes the connection
            raw += chunk
        head = raw.decode()
    assert head.startswith("HTTP/1.1 413"), head
    assert '"error":"payload_too_large"' in head
    with server.client() as c:
        assert_error(c.post("/v1/topics/big/messages", json={"data": "x" * 2000}), 413,
                     "payload_too_large")

        def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to go by
            yield b'{"data": "'
            for _ in range(100):
                yield b"x" * 100
            yield b'"}'

        assert_error(c.post("/v1/topics/big/messages", content=chunks()), 413)
        assert c.post("/v1/topics/big/messages", json={"data": "small"}).status_code == 201
        assert [t["messages"] for t in c.get("/v1/topics").json()["topics"]] == [1]


def test_a_message_over_the_hub_payload_limit_is_413(
    start_server: Callable[..., LiveServer],
) -> None:
    server = start_server(max_body=4 * 1024 * 1024)  # the body fits; the message does not
    with server.client() as c:
        r = c.post("/v1/topics/big/messages", json={"data": "x" * (1024 * 1024 + 1)})
        assert_error(r, 413, "payload_too_large")
        assert "max_payload" in r.json()["detail"]


def test_token_is_required_on_v1_and_metrics(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(token="s3cret")
    with server.client() as c:
        for path in ("/v1/topics", "/metrics", "/v1/openapi.json", "/v1/dashboard"):
            r = c.get(path)
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert_error(c.get("/v1/topics", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.get("/v1/topics", headers={"Authorization": "Basic s3cret"}), 401)
        assert_error(c.post("/v1/topics/a/messages", json={"data": 1}), 401)
        assert c.get("/healthz").status_code == 200
        assert c.get("/").status_code == 200  # the page shell holds no data
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/topics", headers=ok).status_code == 200
        assert c.post("/v1/topics/a/messages", json={"data": 1}, headers=ok).status_code == 201
        # EventSource cannot send headers: GETs may carry the token in the query
        assert c.get("/v1/topics", params={"access_token": "s3cret"}).status_code == 200
        assert_error(c.post("/v1/topics/a/messages?access_token=s3cret", json={"data": 1}), 401)


def test_refuses_a_public_address_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIDINGS_TOKEN", raising=False)
    for host in ("127.0.0.1", "::1", "localhost", "127.1.2.3"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        assert not is_loopback(host)
        with pytest.raises(tidings.InvalidArgument, match="token"):
            check_bind(host, None)
        check_bind(host, "t")
    with pytest.raises(tidings.InvalidArgument, match="refusing to listen on '0.0.0.0'"):
        asyncio.run(serve("memory://", "0.0.0.0", 0, None))


def test_too_many_pulls_get_429_with_retry_after(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(max_pulls=1)
    done = threading.Event()

    def hold() -> None:
        with server.client() as c:
            c.get("/v1/subscriptions/g/messages", params={"topic": "t", "wait": 3})
        done.set()

    t = threading.Thread(target=hold)
    t.start()
    deadline = time.monotonic() + 10
    while server.gateway.pulls.active == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with server.client() as c:
        r = c.get("/v1/subscriptions/g/messages", params={"topic": "t"})
        assert_error(r, 429, "busy")
        assert r.headers["retry-after"] == "1"
        c.post("/v1/topics/t/messages", json={"data": "release"})  # ends the held pull
        t.join(10)
        assert "tidings_http_overloaded_total" in c.get("/metrics").text


def test_too_many_publishes_get_429(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(max_publishes=1)
    admission = server.gateway.publishes

    async def hold(hub: tidings.Hub) -> None:  # one publish in progress, as admission sees it
        admission.enter()

    async def let_go(hub: tidings.Hub) -> None:
        admission.leave()

    server.call(hold)
    with server.client() as c:
        r = c.post("/v1/topics/t/messages", json={"data": "refused"})
        assert_error(r, 429, "busy")
        assert r.headers["retry-after"]
        r = c.post("/v1/streams/order-1/events", json={
            "events": [{"type": "Placed", "data": {}}], "expected_version": 0})
        assert_error(r, 429, "busy")
        server.call(let_go)
        assert c.post("/v1/topics/t/messages", json={"data": "now fine"}).status_code == 201
        assert [t["messages"] for t in c.get("/v1/topics").json()["topics"]] == [1]


def test_a_closed_hub_is_503_with_retry_after(server: LiveServer, client: httpx.Client) -> None:
    server.call(lambda hub: hub.close())
    r = client.post("/v1/topics/t/messages", json={"data": 1})
    assert_error(r, 503, "unavailable")
    assert r.headers["retry-after"]
    assert client.get("/healthz").status_code == 503


def _partial_post(port: int, path: str, declared: int, sent: bytes) -> socket.socket:
    """A POST that declares `declared` body bytes and sends only `sent` of them."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {declared}\r\n\r\n".encode() + sent)
    return s


def _answer(s: socket.socket) -> str:
    """What the server sends on `s` until it closes the connection."""
    raw = b""
    while chunk := s.recv(65536):
        raw += chunk
    return raw.decode()


def test_slow_bodies_hold_no_place_of_a_publish_append_or_command(
    start_server: Callable[..., LiveServer],
) -> None:
    server = start_server(max_publishes=2, max_commands=2,
                          commands={"create-order": Accepting()})
    stuck = [_partial_post(server.port, path, 100, b'{"data": ')
             for path in ["/v1/topics/t/messages"] * 4 + ["/v1/streams/order-1/events"] * 4
             + ["/v1/commands/create-order"] * 4]
    try:
        deadline = time.monotonic() + 20  # until the server has read every partial body
        while server.gateway.bodies.held < 12 * len(b'{"data": ') and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.gateway.bodies.held == 12 * len(b'{"data": ')
        assert server.gateway.publishes.active == 0
        with server.client() as c:
            assert c.post("/v1/topics/t/messages", json={"data": 1}).status_code == 201
            r = c.post("/v1/streams/order-1/events", json={
                "events": [{"type": "Placed", "data": {}}], "expected_version": 0})
            assert r.status_code == 201, r.text
            assert c.post("/v1/commands/create-order", json={}).status_code == 202
    finally:
        for s in stuck:
            s.close()


class Accepting:
    """A command target that accepts every command."""

    async def start(self, data: dict[str, object], id: str) -> str:
        return id

    async def get(self, id: str) -> dict[str, object] | None:
        return {"status": "running"}


def test_a_body_that_does_not_arrive_in_time_is_408_and_stores_nothing(
    start_server: Callable[..., LiveServer],
) -> None:
    server = start_server(body_timeout=0.2)
    for path, part in [("/v1/topics/t/messages", b'{"data": "x'),
                       ("/v1/streams/order-1/events", b'{"events": [')]:
        with _partial_post(server.port, path, 1000, part) as s:
            head = _answer(s)  # the server answers, then closes the connection
        assert head.startswith("HTTP/1.1 408"), head
        assert '"error":"request_timeout"' in head and "body_timeout" in head
    assert server.gateway.publishes.active == 0 and server.gateway.bodies.held == 0
    with server.client() as c:
        assert c.get("/v1/topics").json() == {"topics": []}
        assert c.post("/v1/topics/t/messages", json={"data": 1}).status_code == 201


def test_the_bytes_of_bodies_being_read_are_bounded() -> None:
    held = BodyBytes(10)
    held.take(6)
    with pytest.raises(ApiError) as refused:
        held.take(5)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"]
    held.release(6)
    held.take(10)


DEEP = "[" * 1000 + "]" * 1000
BODY_ROUTES = {
    "/v1/topics/t/messages": '{"data": %s}',
    "/v1/streams/order-1/events": '{"events": [{"type": "A", "data": {"a": %s}}], '
                                  '"expected_version": 0}',
    "/v1/subscriptions/g/ack": '{"ack_ids": %s}',
    "/v1/subscriptions/g/nack": '{"ack_ids": %s}',
    "/v1/commands/create-order": '{"a": %s}',
}


@pytest.mark.parametrize("path", list(BODY_ROUTES))
def test_json_nested_too_deep_is_422_naming_the_limit(
    start_server: Callable[..., LiveServer], path: str,
) -> None:
    server = start_server(commands={"create-order": Accepting()})
    with server.client() as c:
        for depth in (129, 1000, 100_000):
            nested = "[" * depth + "]" * depth
            r = c.post(path, content=(BODY_ROUTES[path] % nested).encode())
            assert_error(r, 422, "too_deep")
            assert "128 levels" in r.json()["detail"]
        assert c.get("/v1/topics").json() == {"topics": []}
        # brackets inside a string are text, not nesting
        r = c.post(path, content=(BODY_ROUTES[path] % f'["{DEEP}"]').encode())
        assert r.json().get("error") != "too_deep", r.text


@pytest.mark.parametrize("path", list(BODY_ROUTES))
def test_a_json_string_that_is_not_utf8_is_400(
    start_server: Callable[..., LiveServer], path: str,
) -> None:
    server = start_server(commands={"create-order": Accepting()})
    with server.client() as c:
        for bad in (b'"\xff\xfe"', b'{"k": "\xc3"}', b'["\xed\xa0\x80"]'):
            body = (BODY_ROUTES[path] % "@").encode().replace(b"@", bad)
            assert_error(c.post(path, content=body), 400, "malformed_json")
        assert c.get("/v1/topics").json() == {"topics": []}
