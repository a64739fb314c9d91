"""The OpenAPI document matches the routes, and schemathesis finds nothing outside it.

schemathesis generates requests from /v1/openapi.json (valid and invalid
ones) against a live server and checks every response: no 5xx, a status
code, content type, headers and body that the document lists. The two SSE
routes never end, so they are left to test_pubsub and test_dashboard.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Mount, Route

from tidings.gateway.openapi import openapi
from tidings.gateway.pubsub import MAX_PULL

from .conftest import LiveServer


class Ordering:
    """A command target for the fuzzed server (so the command routes answer 202 too)."""

    async def start(self, data: dict[str, Any], id: str) -> str:
        return id

    async def get(self, id: str) -> dict[str, Any] | None:
        return {"status": "running"} if id.startswith("k-") else None


MAX_WAIT = 0.05  # long polls stay short while fuzzing
#: The document the fuzzed server serves (test_the_served_document_is_this_one checks it).
DOCUMENT = openapi(max_body=1_048_576, max_wait=MAX_WAIT, max_pull=MAX_PULL, auth=False)
schema = schemathesis.openapi.from_dict(DOCUMENT).exclude(path_regex=r"/stream$")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory: Path = tmp_path_factory.mktemp("fuzz")
    server = LiveServer(f"sqlite:///{directory}/fuzz.db?durability=normal", max_wait=MAX_WAIT,
                        commands={"create-order": Ordering()}).start()
    yield server
    server.stop()


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_no_response_outside_the_spec(case: Any, fuzzed: LiveServer) -> None:
    case.call_and_validate(base_url=fuzzed.base_url,
                           checks=[not_a_server_error, status_code_conformance,
                                   content_type_conformance, response_headers_conformance,
                                   response_schema_conformance])


def test_the_served_document_is_this_one(fuzzed: LiveServer) -> None:
    import httpx

    assert httpx.get(f"{fuzzed.base_url}/v1/openapi.json").json() == DOCUMENT


def test_every_route_is_documented(fuzzed: LiveServer) -> None:
    import httpx

    doc = httpx.get(f"{fuzzed.base_url}/v1/openapi.json").json()
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = set()
    for route in fuzzed.app.routes:
        if isinstance(route, Mount) or route.path == "/":
            continue  # static files and the dashboard page
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+):path\}", r"{\1}", route.path)
        for method in route.methods or ():
            if method != "HEAD":
                served.add((path, method))
    assert served == documented
