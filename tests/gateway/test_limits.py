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
    release = threading.Event()

    def slow_body() -> Iterator[bytes]:  # holds its admission while the body trickles in
        yield b'{"data": '
        release.wait(10)
        yield b'"late"}'

    result: list[int] = []

    def hold() -> None:
        with server.client() as c:
            result.append(c.post("/v1/topics/t/messages", content=slow_body()).status_code)

    t = threading.Thread(target=hold)
    t.start()
    deadline = time.monotonic() + 10
    while server.gateway.publishes.active == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with server.client() as c:
        r = c.post("/v1/topics/t/messages", json={"data": "refused"})
        assert_error(r, 429, "busy")
        assert r.headers["retry-after"]
        release.set()
        t.join(10)
        assert result == [201]
        assert c.post("/v1/topics/t/messages", json={"data": "now fine"}).status_code == 201


def test_a_closed_hub_is_503_with_retry_after(server: LiveServer, client: httpx.Client) -> None:
    server.call(lambda hub: hub.close())
    r = client.post("/v1/topics/t/messages", json={"data": 1})
    assert_error(r, 503, "unavailable")
    assert r.headers["retry-after"]
    assert client.get("/healthz").status_code == 503
