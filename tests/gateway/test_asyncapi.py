"""`GET /v1/asyncapi.json`: the served application's AsyncAPI document."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from tests.asyncapi_check import check, payload_of

from .conftest import LiveServer


def test_the_gateway_serves_the_apps_asyncapi_document(
    start_server: Callable[..., LiveServer],
) -> None:
    server = start_server(app_module="examples.shop:app", token="s3cret")
    assert httpx.get(f"{server.base_url}/v1/asyncapi.json").status_code == 401
    with server.client(headers={"Authorization": "Bearer s3cret"}) as c:
        r = c.get("/v1/asyncapi.json")
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        doc = check(r.json())
        assert doc["info"]["title"] == "examples.shop:app"
        assert "total" in payload_of(doc, "create-order.reserve_credit")["properties"]
        assert "/v1/asyncapi.json" in c.get("/v1/openapi.json").json()["paths"]
