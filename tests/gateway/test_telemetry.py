"""A saga started over HTTP joins the caller's trace (W3C traceparent in, one trace
out: the gateway's SERVER span, the saga, its handlers)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tests.pg_plugin import needs

needs("opentelemetry.sdk", reason="the tracing tests need opentelemetry-sdk (dev extra)")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind  # noqa: E402

from .test_shop import start_shop, wait_terminal  # noqa: E402


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def test_a_saga_started_over_http_joins_the_caller_s_trace(
        start_server: Any, traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    server = start_shop(start_server, connect={"telemetry": provider})
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with server.client() as c:
        r = c.post("/v1/commands/create-order",
                   json={"customer_id": "c-1", "product_id": "p-1", "quantity": 1},
                   headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
        assert r.status_code == 202, r.text
        assert wait_terminal(c, r.headers["location"])["status"] in ("completed",
                                                                     "compensated")
    spans = exporter.get_finished_spans()
    mine = [s for s in spans if f"{s.context.trace_id:032x}" == trace_id]
    [http] = [s for s in mine if s.name == "POST /v1/commands/create-order"]
    assert http.kind == SpanKind.SERVER and http.parent is not None
    assert http.parent.span_id == 0x00F067AA0BA902B7
    [saga] = [s for s in mine if s.name == "saga create-order"]
    assert saga.parent is not None and saga.parent.span_id == http.context.span_id
    handled = {(s.attributes or {}).get("tidings.saga.step") for s in mine
               if s.name.startswith("process ") and not s.name.endswith(".replies")
               and s.parent is not None
               and s.parent.span_id == saga.context.span_id}
    assert {"create_order", "reserve_credit"} <= handled
