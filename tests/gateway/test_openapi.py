"""The OpenAPI document matches the routes, and schemathesis finds nothing outside it.

schemathesis generates requests from /v1/openapi.json against a live server
in every phase it has (the document's examples, coverage of every keyword's
edges, fuzzing, and stateful sequences that feed one response into the next
request) and runs every check it has on each response: no 5xx, a status code,
content type, headers and body the document lists, every schema-valid request
accepted and every schema-violating one refused, unsupported methods answered
405 with `Allow`. The event streams never end by themselves, so their
responses are read until the first event or a quiet moment, then checked the
same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES
from starlette.routing import Mount, Route

import tidings
from tidings.gateway.openapi import openapi, with_inputs
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
CONFIG = SchemathesisConfig.from_dict({
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True},
               "fuzzing": {"enabled": True}, "stateful": {"enabled": True, "max-steps": 6}},
    # Every check, and 413 counts as refusing a request: a body over max_body (a batch past
    # maxItems, say) is refused before it is read.
    "checks": {"enabled": True, "negative_data_rejection": {"expected-statuses": [
        *NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"]}},
})
# (a copy: schemathesis writes the links it infers into the document it is given)
schema = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT), config=CONFIG)
load_all_checks()
#: Every check schemathesis has, named so that one it adds later is not silently skipped.
ALL_CHECKS = list(CHECKS.get_all())
#: How long a quiet event stream is listened to before it is judged on what it sent.
QUIET = 0.3
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory: Path = tmp_path_factory.mktemp("fuzz")
    server = LiveServer(f"sqlite:///{directory}/fuzz.db?durability=normal", max_wait=MAX_WAIT,
                        commands={"create-order": Ordering()}).start()
    yield server
    server.stop()


def test_every_check_is_run() -> None:
    assert {getattr(c, "__name__", type(c).__name__) for c in ALL_CHECKS} >= {
        "not_a_server_error", "status_code_conformance", "content_type_conformance",
        "response_headers_conformance", "response_schema_conformance",
        "negative_data_rejection", "positive_data_acceptance", "missing_required_header",
        "unsupported_method", "allow_header_conformance", "use_after_free",
        "ensure_resource_availability", "ignored_auth", "object_level_authorization"}
    phases = CONFIG.projects.get_default().phases
    assert all(p.enabled for p in (phases.examples, phases.coverage, phases.fuzzing,
                                   phases.stateful))


def is_stream(case: Any) -> bool:
    return str(case.path).endswith("/stream")


async def _read_stream(kwargs: dict[str, Any]) -> httpx.Response:
    """The response to a request for an endless event stream: up to its first event, or
    what it sent before a quiet moment (whole events only), never a timeout."""
    async with httpx.AsyncClient(timeout=20) as client:
        request = client.build_request(kwargs["method"], kwargs["url"],
                                       headers=kwargs.get("headers"),
                                       params=kwargs.get("params"))
        response = await client.send(request, stream=True)
        body = b""
        try:
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(QUIET):
                        async for chunk in response.aiter_raw():
                            body += chunk
                            if b"\ndata: " in body and body.endswith(b"\n\n"):
                                break
                body = body[:body.rfind(b"\n\n") + 2]
            else:
                body = await response.aread()
        finally:
            await response.aclose()
    headers = [(k, v) for k, v in response.headers.multi_items()
               if k.lower() not in ("content-length", "transfer-encoding")]
    read = httpx.Response(response.status_code, headers=headers, content=body, request=request)
    read.elapsed = response.elapsed
    return read


def call_and_validate(case: Any, base_url: str, **validate: Any) -> Any:
    """`case.call_and_validate` with every check; an event stream is cut short first."""
    if not is_stream(case):
        return case.call_and_validate(base_url=base_url, checks=ALL_CHECKS, timeout=20,
                                      **validate)
    response = asyncio.run(_read_stream(case.as_transport_kwargs(base_url=base_url)))
    case.validate_response(response, checks=ALL_CHECKS,
                           transport_kwargs={"base_url": base_url}, **validate)
    return response


@schema.parametrize()
@SETTINGS
def test_no_server_error_and_no_response_outside_the_spec(case: Any, fuzzed: LiveServer) -> None:
    call_and_validate(case, fuzzed.base_url)


def test_stateful_sequences_stay_inside_the_spec(fuzzed: LiveServer) -> None:
    """Links between operations (a publish's position, a pull's ack_id, an append's
    version) drive sequences; bounded to a few short scenarios."""
    base_url = fuzzed.base_url

    class Sequences(schema.exclude(path_regex=r"/stream$").as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": base_url, "timeout": 20}

        def validate_response(self, response: Any, case: Any,
                              additional_checks: Any = None, **kwargs: Any) -> None:
            case.validate_response(response, checks=ALL_CHECKS, transport_kwargs=kwargs)

    Sequences.run(settings=settings(max_examples=15, stateful_step_count=6, deadline=None,
                                    suppress_health_check=list(HealthCheck)))


def test_the_served_document_is_this_one(fuzzed: LiveServer) -> None:
    assert httpx.get(f"{fuzzed.base_url}/v1/openapi.json").json() == DOCUMENT


def test_every_route_is_documented(fuzzed: LiveServer) -> None:
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


def test_options_lists_every_method_of_each_path(fuzzed: LiveServer) -> None:
    for path, ops in DOCUMENT["paths"].items():
        url = fuzzed.base_url + re.sub(r"\{\w+\}", "x", path)
        r = httpx.options(url)
        assert r.status_code == 405, (path, r.text)
        allowed = {m.strip().lower() for m in r.headers["allow"].split(",")}
        assert set(ops) <= allowed, (path, allowed)



# a saga with a typed input: its command has an operation and a body schema of its own ------
class Line(msgspec.Struct):
    sku: str
    quantity: Annotated[int, msgspec.Meta(gt=0)]


class PlaceOrder(msgspec.Struct):
    customer_id: str
    lines: list[Line]
    note: str = ""


async def _place(data: dict[str, Any]) -> None:
    return None


PLACE_ORDER = tidings.Saga("place-order", [tidings.Step("place", action=_place)],
                           input=PlaceOrder)
#: The document a server with that saga serves.
TYPED_DOCUMENT = with_inputs(DOCUMENT, {"place-order": PlaceOrder})
typed_schema = schemathesis.openapi.from_dict(copy.deepcopy(TYPED_DOCUMENT), config=CONFIG) \
    .include(path="/v1/commands/place-order")


@pytest.fixture(scope="module")
def typed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory: Path = tmp_path_factory.mktemp("typed")
    server = LiveServer(f"sqlite:///{directory}/typed.db?durability=normal",
                        max_wait=MAX_WAIT,
                        app_module=lambda hub: {"place-order": hub.sagas(PLACE_ORDER),
                                                "create-order": Ordering()}).start()
    yield server
    server.stop()


def test_a_typed_saga_has_its_body_schema_in_the_document(typed: LiveServer) -> None:
    doc = httpx.get(f"{typed.base_url}/v1/openapi.json").json()
    assert doc == TYPED_DOCUMENT
    op = doc["paths"]["/v1/commands/place-order"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/place-order.PlaceOrder"}
    schemas = doc["components"]["schemas"]
    assert schemas["place-order.PlaceOrder"]["required"] == ["customer_id", "lines"]
    assert schemas["place-order.Line"]["properties"]["quantity"] == \
        {"type": "integer", "exclusiveMinimum": 0}
    assert "saga" not in [p["name"] for p in op["parameters"]]
    # the others keep the templated operation, and the document its own parts
    assert doc["paths"]["/v1/commands/{saga}"] == DOCUMENT["paths"]["/v1/commands/{saga}"]
    assert {k: v for k, v in schemas.items() if not k.startswith("place-order.")} == \
        DOCUMENT["components"]["schemas"]
    assert "place-order.PlaceOrder" not in DOCUMENT["components"]["schemas"]  # not changed


@typed_schema.parametrize()
@SETTINGS
def test_a_typed_command_accepts_exactly_what_its_schema_describes(
        case: Any, typed: LiveServer) -> None:
    """Every body the schema allows is accepted (202); every one it forbids is refused
    with 4xx, and the 422 says which field."""
    call_and_validate(case, typed.base_url)
