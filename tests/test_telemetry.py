"""OpenTelemetry tracing, recorded with the SDK's in-memory exporter: publish and
process spans with the messaging conventions, the context carried in headers, a whole
shop saga (over HTTP too) as one trace with its compensation and a retry, and nothing
at all when telemetry is off."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.pg_plugin import needs

needs("opentelemetry.sdk", reason="the tracing tests need opentelemetry-sdk (dev extra)")

from examples.shop import app, create_order  # noqa: E402
from examples.shop.domain import Customer, Product  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind  # noqa: E402

import tidings  # noqa: E402
from tidings import Message  # noqa: E402
from tidings.testing import TestHub  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def by_name(spans: Any, name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def parent_of(span: ReadableSpan, spans: Any) -> ReadableSpan | None:
    if span.parent is None:
        return None
    found = [s for s in spans if s.context.span_id == span.parent.span_id]
    return found[0] if found else None


async def test_publish_and_process_follow_the_messaging_conventions(
        traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    async with TestHub(telemetry=provider) as t:
        hub = t.hub
        calls = 0

        @hub.subscriber("orders.*", group="billing", backoff=[1])
        async def bill(msg: Message) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("try again")

        await hub.publish("orders.created", {"id": 1}, id="m-1")
        await t.advance(1)
        assert calls == 2
    spans = exporter.get_finished_spans()
    [send] = by_name(spans, "send orders.created")
    assert send.kind == SpanKind.PRODUCER
    assert send.attributes is not None
    assert send.attributes["messaging.system"] == "tidings"
    assert send.attributes["messaging.destination.name"] == "orders.created"
    assert send.attributes["messaging.operation.type"] == "send"
    assert send.attributes["messaging.message.id"] == "m-1"
    processes = by_name(spans, "process orders.created")
    assert [p.attributes["tidings.attempt"] for p in processes if p.attributes] == [1, 2]
    for p in processes:  # each delivery (the redelivery too) is a child of the send
        assert p.kind == SpanKind.CONSUMER
        assert p.context.trace_id == send.context.trace_id
        assert p.parent is not None and p.parent.span_id == send.context.span_id
        assert p.attributes is not None
        assert p.attributes["messaging.consumer.group.name"] == "billing"
        assert p.attributes["messaging.message.id"] == "m-1"
    assert not processes[0].status.is_ok and processes[1].status.is_ok  # the failure shows


async def seeded_shop(t: TestHub) -> None:
    app(t.hub, seed_data=False)
    for cid, limit in (("c-rich", 10_000), ("c-poor", 100)):
        c = Customer(cid)
        c.register(limit)
        await t.hub.repository(Customer).save(c)
    p = Product("p-1")
    p.add(100, 10)
    await t.hub.repository(Product).save(p)


async def test_a_shop_saga_is_one_trace_with_its_compensation_and_retry(
        traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    tracer = provider.get_tracer("test")
    async with TestHub(telemetry=provider) as t:
        await seeded_shop(t)
        real = t.handler("inventory.reserve")
        calls = 0

        async def flaky(cmd: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("the inventory service hiccups")
            return await real(cmd)

        t.fake("inventory.reserve", flaky)
        with tracer.start_as_current_span("request") as root:
            ok = await t.hub.sagas(create_order).start(
                {"customer_id": "c-rich", "product_id": "p-1", "quantity": 2})
        with tracer.start_as_current_span("request 2") as root2:
            refused = await t.hub.sagas(create_order).start(
                {"customer_id": "c-poor", "product_id": "p-1", "quantity": 50})
        await t.advance(60)
        assert (await t.saga(ok))["status"] == "completed"
        assert (await t.saga(refused))["status"] == "compensated"
    spans = exporter.get_finished_spans()
    trace = [s for s in spans if s.context.trace_id == root.context.trace_id]
    [saga] = [s for s in trace if s.name == "saga create-order"]
    assert saga.parent is not None and saga.parent.span_id == root.context.span_id
    steps = [s for s in trace if s.name.startswith("process ") and s.attributes
             and s.attributes.get("tidings.saga.id") == ok and not s.name.endswith(".replies")]
    names = [s.attributes["tidings.saga.step"] for s in steps if s.attributes]
    for step in ("create_order", "reserve_credit", "reserve_stock", "approve"):
        assert step in names, names
    assert names.count("reserve_stock") == 2  # the failed attempt and its retry
    for s in steps:  # each handler's span is a child of the saga's
        assert s.parent is not None and s.parent.span_id == saga.context.span_id
    replies = [s for s in trace if s.name == "process saga.create-order.replies"]
    assert len(replies) >= 5  # one per handled command, each a child of its handler
    for r in replies:
        parent = parent_of(r, spans)
        assert parent is not None and parent.name.startswith("process ")

    other = [s for s in spans if s.context.trace_id == root2.context.trace_id]
    kinds = {(s.attributes or {}).get("tidings.saga.kind") for s in other
             if s.name.startswith("process ")}
    assert "compensation" in kinds  # the refused order's compensations, in its trace
    assert root2.context.trace_id != root.context.trace_id


def test_off_by_default_and_opentelemetry_is_never_imported() -> None:
    code = (
        "import asyncio, sys, tidings\n"
        "async def main():\n"
        "    async with await tidings.connect('memory://') as hub:\n"
        "        assert hub.telemetry is None\n"
        "        await hub.publish('a.b', b'x')\n"
        "        sub = await hub.subscribe('a.b', group='g')\n"
        "        [m] = await sub.fetch(1, wait=1)\n"
        "        await m.ack(wait=True)\n"
        "asyncio.run(main())\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


async def test_bad_telemetry_option_is_refused() -> None:
    with pytest.raises(tidings.InvalidArgument, match="TracerProvider"):
        await tidings.connect("memory://", telemetry="yes")


class Traced(tidings.Event):
    n: int


async def test_event_appends_and_projections_carry_the_trace(
        traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    seen: list[int] = []
    async with TestHub(telemetry=provider) as t:
        @t.hub.projection("counts")
        async def count(rec: tidings.RecordedEvent, tx: Any) -> None:
            if isinstance(rec.event, Traced):
                seen.append(rec.event.n)

        with provider.get_tracer("test").start_as_current_span("command") as root:
            await t.hub.events.append("traced-1", [Traced(n=1)])
        await t.settle()
        [msg] = t.published("traced")
        assert msg.headers["traceparent"].split("-")[1] == f"{root.context.trace_id:032x}"
    assert seen == [1]
    [span] = by_name(exporter.get_finished_spans(), "process counts")
    assert span.parent is not None and span.parent.span_id == root.context.span_id
    assert span.attributes is not None and span.attributes["tidings.stream_id"] == "traced-1"
