"""The real thing: `--app examples.shop:app` served, a shop order started over HTTP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .conftest import LiveServer
from .test_commands import wait_terminal


def start_shop(start_server: Callable[..., LiveServer], size: int = 3,
               **options: Any) -> LiveServer:
    """The gateway serving `examples.shop:app`, with `size` customers and products."""
    from examples.shop.services import seed

    server = start_server(app_module="examples.shop:app", **options)
    server.call(lambda hub: seed(hub, customers=size, products=size))
    return server


def test_an_order_over_http_completes_or_compensates(
    start_server: Callable[..., LiveServer],
) -> None:
    server = start_shop(start_server)
    with server.client() as c:
        r = c.post("/v1/commands/create-order",
                   json={"customer_id": "c-1", "product_id": "p-1", "quantity": 1},
                   headers={"Idempotency-Key": "first-order"})
        assert r.status_code == 202, r.text
        done = wait_terminal(c, r.headers["location"])
        assert done["status"] == "completed", done
        assert done["saga"] == "create-order" and "result" in done
        again = c.post("/v1/commands/create-order",
                       json={"customer_id": "c-1", "product_id": "p-1", "quantity": 1},
                       headers={"Idempotency-Key": "first-order"})
        assert again.json()["request_id"] == r.json()["request_id"]
        # ?wait answers when the saga ends: one call instead of polling
        r = c.post("/v1/commands/create-order",
                   json={"customer_id": "c-2", "product_id": "p-2", "quantity": 1})
        waited = c.get(r.headers["location"], params={"wait": 20}).json()
        assert waited["status"] == "completed", waited

        r = c.post("/v1/commands/create-order",
                   json={"customer_id": "c-1", "product_id": "p-1", "quantity": 10_000})
        failed = wait_terminal(c, r.headers["location"])
        assert failed["status"] == "compensated" and failed["error"], failed

        sagas = c.get("/v1/sagas").json()["sagas"]
        assert sorted(s["status"] for s in sagas) == ["compensated", "completed", "completed"]
        assert c.get("/v1/sagas", params={"status": "completed"}).json()["sagas"][0]["id"] == \
            done["request_id"]
        snap = c.get("/v1/dashboard").json()
        assert snap["sagas"]["by_status"] == {"completed": 2, "compensated": 1}
        assert [x["status"] for x in snap["requests"]] == ["compensated", "completed",
                                                           "completed"]

        metrics = c.get("/metrics").text
        for status in ("completed", "compensated"):
            n = 2 if status == "completed" else 1
            assert f'tidings_saga_outcomes_total{{saga="create-order",status="{status}"}} {n}.0' \
                in metrics
        for status, n in (("completed", 2), ("compensated", 1)):
            assert ('tidings_saga_duration_seconds_count{saga="create-order",'
                    f'status="{status}"}} {n}.0') in metrics


def test_an_order_missing_a_field_is_422_before_anything_starts(
    start_server: Callable[..., LiveServer],
) -> None:
    server = start_shop(start_server, size=1)
    before = server.call(lambda hub: hub.engine.last_position())
    with server.client() as c:
        for body, field in [({"customer_id": "c-1"}, "$.product_id"),
                            ({"customer_id": "c-1", "product_id": "p-1", "quantity": 0},
                             "$.quantity"),
                            ({"customer_id": "", "product_id": "p-1", "quantity": 1},
                             "$.customer_id")]:
            r = c.post("/v1/commands/create-order", json=body)
            assert r.status_code == 422 and r.json()["field"] == field, r.text
        assert c.get("/v1/sagas").json() == {"sagas": []}
        doc = c.get("/v1/openapi.json").json()
        body = doc["paths"]["/v1/commands/create-order"]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == \
            {"$ref": "#/components/schemas/create-order.CreateOrder"}
    assert server.call(lambda hub: hub.engine.last_position()) == before
