"""Asynchronous request-reply: 202 + request id, then poll; Idempotency-Key; unknown names."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Annotated, Any

import httpx
import msgspec

import tidings

from .conftest import LiveServer


class FakeSaga:
    """A command target that finishes each run shortly after it starts (or fails it)."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.starts = 0
        self.fail_on = fail_on

    async def start(self, data: dict[str, Any], id: str) -> str:
        if data.get("boom"):
            raise RuntimeError("secret internal detail")
        if data.get("full"):
            raise tidings.BufferFull("too many orders in progress; retry shortly")
        if id in self.runs:
            return id
        self.starts += 1
        self.runs[id] = {"id": id, "status": "running", "steps": []}
        if not data.get("hold"):
            asyncio.get_running_loop().call_later(0.05, self._finish, id, data)
        return id

    def _finish(self, id: str, data: dict[str, Any]) -> None:
        run = self.runs[id]
        run["steps"] = [{"name": "create_order"}, {"name": "reserve_credit"}]
        if self.fail_on is not None and data.get("customer") == self.fail_on:
            run.update(status="compensated", error={"step": "reserve_credit",
                                                    "reason": "credit limit exceeded"})
        else:
            run.update(status="completed", result={"order_id": data.get("order", "o-1")})

    async def get(self, id: str) -> dict[str, Any] | None:
        return self.runs.get(id)

    async def list(self, status: str | None) -> list[dict[str, Any]]:
        return [r for r in self.runs.values() if status is None or r["status"] == status]


def wait_terminal(c: httpx.Client, location: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state: dict[str, Any] = c.get(location).json()
        if state["status"] in ("completed", "compensated", "failed"):
            return state
        time.sleep(0.02)
    raise AssertionError(f"{location} never finished")


def test_command_is_accepted_then_polled_to_its_outcome(
    start_server: Callable[..., LiveServer],
) -> None:
    saga = FakeSaga(fail_on="poor")
    server = start_server(commands={"create-order": saga})
    with server.client() as c:
        r = c.post("/v1/commands/create-order", json={"order": "o-7", "customer": "c-1"})
        assert r.status_code == 202, r.text
        request_id = r.json()["request_id"]
        assert r.headers["location"] == f"/v1/requests/{request_id}"
        first = c.get(r.headers["location"]).json()
        assert first["status"] in ("pending", "running", "completed")
        done = c.get(r.headers["location"], params={"wait": 10}).json()  # no .ended: rechecks
        assert done == {"request_id": request_id, "saga": "create-order", "status": "completed",
                        "result": {"order_id": "o-7"}}
        assert c.get(r.headers["location"], params={"wait": -1}).status_code == 422

        r = c.post("/v1/commands/create-order", json={"customer": "poor"})
        failed = wait_terminal(c, r.headers["location"])
        assert failed["status"] == "compensated" and failed["error"]["step"] == "reserve_credit"

        sagas = c.get("/v1/sagas").json()["sagas"]
        assert {s["status"] for s in sagas} == {"completed", "compensated"}
        assert c.get("/v1/sagas", params={"status": "completed"}).json()["sagas"][0]["id"] == \
            request_id
        assert c.get(f"/v1/sagas/{request_id}").json()["steps"][0] == {"name": "create_order"}
        snap = c.get("/v1/dashboard").json()
        assert [r["status"] for r in snap["requests"]] == ["compensated", "completed"]
        assert snap["sagas"]["by_status"] == {"completed": 1, "compensated": 1}
        assert 'tidings_commands_total{saga="create-order"} 2.0' in c.get("/metrics").text


def test_idempotency_key_returns_the_same_request(start_server: Callable[..., LiveServer]) -> None:
    saga = FakeSaga()
    server = start_server(commands={"create-order": saga})
    with server.client() as c:
        h = {"Idempotency-Key": "order-form-42"}
        ids = {c.post("/v1/commands/create-order", json={"order": "o-1"}, headers=h)
               .json()["request_id"] for _ in range(3)}
        assert len(ids) == 1 and saga.starts == 1
        r = c.post("/v1/commands/create-order", json={"order": "o-2"}, headers=h)
        assert r.status_code == 409 and r.json()["error"] == "idempotency_key_reused"
        other = c.post("/v1/commands/create-order", json={"order": "o-1"},
                       headers={"Idempotency-Key": "another"}).json()["request_id"]
        assert other not in ids and saga.starts == 2


def test_unknown_saga_or_request_is_404_with_a_reason(
    start_server: Callable[..., LiveServer],
) -> None:
    bare = start_server()
    with bare.client() as c:
        r = c.post("/v1/commands/create-order", json={})
        assert r.status_code == 404 and "no sagas registered" in r.json()["detail"]
        assert c.get("/v1/requests/nope").status_code == 404
        assert c.get("/v1/sagas").json() == {"sagas": []}
    served = start_server(commands={"create-order": FakeSaga()})
    with served.client() as c:
        r = c.post("/v1/commands/ship-order", json={})
        assert r.status_code == 404 and "create-order" in r.json()["detail"]
        assert c.get("/v1/requests/unknown-id").json()["error"] == "not_found"
        assert c.post("/v1/commands/create-order", json=[1]).status_code == 422
        assert c.post("/v1/commands/create-order", content=b"{").status_code == 400


def test_failures_inside_a_target_never_leak(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(commands={"create-order": FakeSaga()})
    with server.client() as c:
        r = c.post("/v1/commands/create-order", json={"boom": True})
        assert r.status_code == 500 and r.json()["error"] == "internal"
        assert "secret" not in r.text and "Traceback" not in r.text
        r = c.post("/v1/commands/create-order", json={"full": True})
        assert r.status_code == 429 and r.headers["retry-after"]


def test_app_module_provides_the_commands(start_server: Callable[..., LiveServer]) -> None:
    saga = FakeSaga()

    async def setup(hub: tidings.Hub) -> dict[str, Any]:
        return {"create-order": saga}

    server = start_server(app_module=setup)
    with server.client() as c:
        r = c.post("/v1/commands/create-order", json={"order": "o-9"})
        assert wait_terminal(c, r.headers["location"])["result"] == {"order_id": "o-9"}
        assert c.get("/v1/dashboard").json()["commands"] == ["create-order"]


def test_commands_still_running_are_bounded_by_429(
    start_server: Callable[..., LiveServer],
) -> None:
    saga = FakeSaga()
    server = start_server(commands={"create-order": saga}, max_running=2)
    with server.client() as c:
        held = [c.post("/v1/commands/create-order", json={"hold": True},
                       headers={"Idempotency-Key": f"h-{i}"}) for i in range(2)]
        assert [r.status_code for r in held] == [202, 202]
        r = c.post("/v1/commands/create-order", json={"hold": True})
        assert r.status_code == 429 and r.headers["retry-after"] and saga.starts == 2
        # repeating an accepted request is not new work
        again = c.post("/v1/commands/create-order", json={"hold": True},
                       headers={"Idempotency-Key": "h-0"})
        assert again.status_code == 202

        async def finish_one(hub: object) -> None:
            saga.runs[held[0].json()["request_id"]]["status"] = "completed"

        server.call(finish_one)
        assert c.post("/v1/commands/create-order", json={"hold": True}).status_code == 202
        assert c.post("/v1/commands/create-order", json={"hold": True}).status_code == 429


def test_a_waiting_poll_whose_client_leaves_frees_its_place(
    start_server: Callable[..., LiveServer],
) -> None:
    server = start_server(commands={"create-order": FakeSaga()}, max_pulls=2, max_wait=120)
    with server.client() as c:
        location = c.post("/v1/commands/create-order", json={"hold": True}).headers["location"]
        for bad in ["²", "٣", "nan", "inf", "1_0", ""]:
            r = c.get(location, params={"wait": bad})
            assert r.status_code == 422 and "'wait'" in r.json()["detail"], (bad, r.text)
    polls = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=20)
        s.sendall(f"GET {location}?wait=100 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        polls.append(s)
    waits = server.gateway.waits
    deadline = time.monotonic() + 30  # the server's own pace: generous, never asserted on
    while waits.active < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert waits.active == 2
    for s in polls:
        s.close()  # long before their wait=100 is over
    while waits.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert waits.active == 0
    with server.client() as c:
        assert c.get(location, params={"wait": 0.01}).json()["status"] == "running"


class OrderLine(msgspec.Struct):
    sku: str
    quantity: Annotated[int, msgspec.Meta(gt=0)]


class PlaceOrder(msgspec.Struct):
    customer_id: str
    lines: list[OrderLine]
    note: str = ""


def test_a_typed_command_that_does_not_fit_is_422_naming_the_field_and_stores_nothing(
    start_server: Callable[..., LiveServer],
) -> None:
    ran: list[dict[str, Any]] = []

    async def place(data: dict[str, Any]) -> None:
        ran.append(data)

    saga = tidings.Saga("place-order", [tidings.Step("place", action=place)], input=PlaceOrder)
    server = start_server(app_module=lambda hub: {saga.name: hub.sagas(saga)})
    before = server.call(lambda hub: hub.engine.last_position())
    key = {"Idempotency-Key": "form-1"}
    with server.client() as c:
        for body, field in [
            ({"lines": []}, "$.customer_id"),
            ({"customer_id": "c-1", "lines": [{"sku": "a", "quantity": 0}]},
             "$.lines[0].quantity"),
            ({"customer_id": "c-1", "lines": [{"quantity": 1}]}, "$.lines[0].sku"),
            ({"customer_id": 7, "lines": []}, "$.customer_id"),
        ]:
            r = c.post("/v1/commands/place-order", json=body, headers=key)
            assert r.status_code == 422, r.text
            err = r.json()
            assert err["error"] == "invalid_field" and err["field"] == field, err
            assert f"saga 'place-order' input is invalid at {field}" in err["detail"]
        assert c.get("/v1/sagas").json() == {"sagas": []}
        assert server.call(lambda hub: hub.engine.last_position()) == before
        assert server.gateway.requests.running == {}
        # the refused key is free again: the corrected form goes through under it
        r = c.post("/v1/commands/place-order", headers=key,
                   json={"customer_id": "c-1", "lines": [{"sku": "a", "quantity": 2}]})
        assert r.status_code == 202, r.text
        done = wait_terminal(c, r.headers["location"])
        assert done["status"] == "completed"
        assert done["result"] == {"customer_id": "c-1", "lines": [{"sku": "a", "quantity": 2}],
                                  "note": ""}  # defaults filled in
    assert ran == [{"customer_id": "c-1", "lines": [{"sku": "a", "quantity": 2}], "note": "",
                    "saga_id": done["request_id"]}]
