"""OpenTelemetry tracing, recorded with the SDK's in-memory exporter: send, process and
settle spans with the messaging conventions, the context carried in headers, a whole
shop saga as one trace (with its retries and a compensation, by messages and inline,
and resumed by another coordinator), event appends and projections, and nothing at
all when telemetry is off. (Over HTTP: tests/gateway/test_telemetry.py.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tests.pg_plugin import needs

needs("opentelemetry.sdk", reason="the tracing tests need opentelemetry-sdk (dev extra)")

from examples.shop import app, create_order  # noqa: E402
from examples.shop.domain import Customer, Product  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind  # noqa: E402

import tidings  # noqa: E402
from tidings import Message  # noqa: E402
from tidings.testing import TestHub  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
Spans = Sequence[ReadableSpan]


def by_name(spans: Spans, name: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start_time or 0)


def attr(span: ReadableSpan, name: str) -> Any:
    return (span.attributes or {}).get(name)


def is_child(span: ReadableSpan, parent: Any) -> bool:
    return span.parent is not None and span.parent.span_id == parent.context.span_id \
        and span.context.trace_id == parent.context.trace_id


def parent_of(span: ReadableSpan, spans: Spans) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    [found] = [s for s in spans if s.context.span_id == span.parent.span_id]
    return found


def in_trace(spans: Spans, root: Any) -> list[ReadableSpan]:
    return [s for s in spans if s.context.trace_id == root.context.trace_id]


def traceparent_of(root: Any) -> str:
    return f"00-{root.context.trace_id:032x}-{root.context.span_id:016x}-01"


async def test_send_process_and_settle_follow_the_messaging_conventions(
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

        p = await hub.publish("orders.created", {"id": 1}, id="m-1",
                              headers={"correlation-id": "order-1"})
        await t.advance(1)
        assert calls == 2
    spans = exporter.get_finished_spans()
    [send] = by_name(spans, "send orders.created")
    assert send.kind == SpanKind.PRODUCER and send.parent is None
    assert send.attributes is not None
    assert {k: send.attributes[k] for k in (
        "messaging.system", "messaging.destination.name", "messaging.operation.type",
        "messaging.operation.name", "messaging.message.id", "tidings.position")} == {
        "messaging.system": "tidings", "messaging.destination.name": "orders.created",
        "messaging.operation.type": "send", "messaging.operation.name": "publish",
        "messaging.message.id": "m-1", "tidings.position": p.position}
    processes = by_name(spans, "process orders.created")
    assert [attr(s, "tidings.attempt") for s in processes] == [1, 2]
    for s in processes:  # each delivery (the redelivery too) is a child of the send
        assert s.kind == SpanKind.CONSUMER and is_child(s, send)
        assert attr(s, "messaging.operation.type") == "process"
        assert attr(s, "messaging.consumer.group.name") == "billing"
        assert attr(s, "messaging.message.id") == "m-1"
        assert attr(s, "messaging.message.conversation_id") == "order-1"
        assert attr(s, "tidings.position") == p.position
    assert not processes[0].status.is_ok and processes[1].status.is_ok  # the failure shows
    assert processes[0].events and processes[0].events[0].name == "exception"
    settles = by_name(spans, "settle orders.created")  # each settle under its delivery
    assert [(attr(s, "messaging.operation.name"), parent_of(s, spans)) for s in settles] == [
        ("nack", processes[0]), ("ack", processes[1])]
    for s in settles:
        assert s.kind == SpanKind.CLIENT and attr(s, "messaging.operation.type") == "settle"
        assert attr(s, "messaging.consumer.group.name") == "billing"


async def test_a_pulled_message_s_settle_joins_the_publisher_s_trace(
        traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    async with TestHub(telemetry=provider) as t:
        await t.hub.publish("jobs.new", b"x")
        sub = await t.hub.subscribe("jobs.*", group="workers")
        [msg] = await sub.fetch(1, wait=1)
        await msg.term(wait=True)
        await sub.close()
    spans = exporter.get_finished_spans()
    [send] = by_name(spans, "send jobs.new")
    [settle] = by_name(spans, "settle jobs.new")
    assert is_child(settle, send) and attr(settle, "messaging.operation.name") == "term"


async def test_publish_many_and_a_message_that_carries_its_own_context(
        traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    tracer = provider.get_tracer("test")
    async with TestHub(telemetry=provider) as t:
        with tracer.start_as_current_span("upstream") as upstream:
            pass
        with tracer.start_as_current_span("batch") as root:
            await t.hub.publish_many("a.b", [b"1", {"n": 2}, tidings.envelope(
                b"3", headers={"traceparent": traceparent_of(upstream)})])
        got = t.published("a.b")
    spans = exporter.get_finished_spans()
    [send] = by_name(spans, "send a.b")
    assert is_child(send, root) and attr(send, "messaging.batch.message_count") == 3
    mine = f"-{send.context.span_id:016x}-"
    assert [mine in m.headers["traceparent"] for m in got] == [True, True, False]
    # the message that came with a context keeps it; the send span links to it
    assert got[2].headers["traceparent"] == traceparent_of(upstream)
    assert [link.context.span_id for link in send.links] == [
        upstream.get_span_context().span_id]


async def seeded_shop(t: TestHub, *, inline: bool = False) -> None:
    app(t.hub, seed_data=False, inline=inline)
    for cid, limit in (("c-rich", 10_000), ("c-poor", 100)):
        c = Customer(cid)
        c.register(limit)
        await t.hub.repository(Customer).save(c)
    p = Product("p-1")
    p.add(100, 10)
    await t.hub.repository(Product).save(p)


def fail_once(t: TestHub, command: str) -> None:
    """`command`'s handler raises the first time it is called (the saga retries)."""
    real = t.handler(command)
    calls = 0

    async def flaky(cmd: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError(f"the {command} service hiccups")
        return await real(cmd)

    t.fake(command, flaky)


STEPS = {"create_order": "order.create", "reserve_credit": "customer.reserve_credit",
         "reserve_stock": "inventory.reserve", "approve": "order.approve"}


def check_saga_tree(spans: Spans, trace: Spans, root: Any, saga_id: str,
                    unreceived: int = 0) -> ReadableSpan:
    """The tree of one saga over messages: under `root`, the saga; under it a `send
    <command>` per step attempt; under each its handler's `process`; under that the
    `send` of its reply, under which the coordinator's `process` of it (but for
    `unreceived` replies: sent to a coordinator that was gone). Returns the saga's span."""
    [saga] = [s for s in trace if s.name == "saga create-order"]
    assert is_child(saga, root) and attr(saga, "tidings.saga.id") == saga_id
    sends = [s for s in trace if s.kind == SpanKind.PRODUCER
             and attr(s, "tidings.saga.id") == saga_id and not s.name.endswith(".replies")]
    assert sends
    for send in sends:
        assert is_child(send, saga), send.name
        step = attr(send, "tidings.saga.step")
        assert send.name == f"send {STEPS[step]}" or attr(send, "tidings.saga.kind") == \
            "compensation"
        [process] = [s for s in trace if is_child(s, send)]
        assert process.name == f"process {send.name[5:]}" and process.kind == SpanKind.CONSUMER
        assert attr(process, "tidings.saga.attempt") == attr(send, "tidings.saga.attempt")
        replied = [s for s in trace if is_child(s, process) and s.name.endswith(".replies")]
        assert replied, f"no reply under {process.name}"
        received = [s for s in trace if s.name == "process saga.create-order.replies"
                    and s.parent is not None and s.parent.span_id in
                    {process.context.span_id, *(r.context.span_id for r in replied)}]
        assert len(received) <= 1, process.name
        if not received:
            unreceived -= 1
            continue
        assert attr(received[0], "messaging.consumer.group.name") == "saga-coordinator"
        # (the coordinator's own reply topic: one span name for all coordinators)
        assert attr(received[0], "messaging.destination.name").startswith(
            "saga.create-order.replies.")
    assert unreceived == 0, "replies not received"
    return saga


async def test_a_shop_saga_is_one_trace_with_its_retry_and_compensation(
        traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    tracer = provider.get_tracer("test")
    async with TestHub(telemetry=provider) as t:
        await seeded_shop(t)
        fail_once(t, "inventory.reserve")
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
    trace = in_trace(spans, root)
    saga = check_saga_tree(spans, trace, root, ok)
    sent = [(attr(s, "tidings.saga.step"), attr(s, "tidings.saga.attempt"))
            for s in sorted(trace, key=lambda s: s.start_time or 0)
            if is_child(s, saga) and s.kind == SpanKind.PRODUCER]
    assert sent == [("create_order", 1), ("reserve_credit", 1), ("reserve_stock", 1),
                    ("reserve_stock", 2), ("approve", 1), (None, None)]  # the last: its end
    [failed, retried] = [s for s in trace if s.name == "process inventory.reserve"]
    assert not failed.status.is_ok and attr(failed, "tidings.reply.status") == "error"
    assert retried.status.is_ok and attr(retried, "tidings.reply.status") == "ok"
    [end] = [s for s in trace if s.name == "send saga.create-order.ended"]
    assert is_child(end, saga)

    other = in_trace(spans, root2)
    assert root2.get_span_context().trace_id != root.get_span_context().trace_id
    check_saga_tree(spans, other, root2, refused)
    kinds = [(attr(s, "tidings.saga.step"), attr(s, "tidings.saga.kind")) for s in
             sorted(other, key=lambda s: s.start_time or 0) if s.name.startswith("send ")
             and not s.name.endswith(".replies") and attr(s, "tidings.saga.step")]
    assert kinds == [("create_order", "action"), ("reserve_credit", "action"),
                     ("create_order", "compensation")]  # rejected, then compensated
    [rejected] = [s for s in other if s.name == "process customer.reserve_credit"]
    assert attr(rejected, "tidings.reply.status") == "rejected"
    assert not [s for s in spans if s.context.trace_id not in (
        root.get_span_context().trace_id, root2.get_span_context().trace_id)
        and "saga" in s.name]


async def test_inline_handlers_get_process_spans_under_the_saga(
        traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    tracer = provider.get_tracer("test")
    async with TestHub(telemetry=provider) as t:
        await seeded_shop(t, inline=True)
        fail_once(t, "inventory.reserve")
        with tracer.start_as_current_span("request") as root:
            ok = await t.hub.sagas(create_order).start(
                {"customer_id": "c-rich", "product_id": "p-1", "quantity": 2})
        await t.advance(60)
        assert (await t.saga(ok))["status"] == "completed"
    trace = in_trace(exporter.get_finished_spans(), root)
    [saga] = [s for s in trace if s.name == "saga create-order"]
    handled = [(s.name, attr(s, "tidings.saga.attempt"), attr(s, "tidings.reply.status"))
               for s in sorted(trace, key=lambda s: s.start_time or 0)
               if is_child(s, saga) and s.kind == SpanKind.CONSUMER]
    assert handled == [("process order.create", 1, "ok"),
                       ("process customer.reserve_credit", 1, "ok"),
                       ("process inventory.reserve", 1, "error"),
                       ("process inventory.reserve", 2, "ok"),
                       ("process order.approve", 1, "ok")]
    assert all(attr(s, "tidings.inline") for s in trace if is_child(s, saga)
               and s.kind == SpanKind.CONSUMER)


async def test_a_saga_resumed_by_another_coordinator_stays_in_its_trace(
        traced: tuple[TracerProvider, InMemorySpanExporter], tmp_path: Path) -> None:
    provider, exporter = traced
    url = f"sqlite:///{tmp_path}/resume.db"
    with provider.get_tracer("test").start_as_current_span("request") as root:
        async with await tidings.connect(url, telemetry=provider) as first:
            t_seed = Customer("c-1")
            t_seed.register(10_000)
            await first.repository(Customer).save(t_seed)
            p = Product("p-1")
            p.add(100, 10)
            await first.repository(Product).save(p)
            # a coordinator with no services: the saga waits for its first reply
            saga_id = await first.sagas(create_order).start(
                {"customer_id": "c-1", "product_id": "p-1", "quantity": 1})
    # another process, later, outside any span: it resumes the saga from its stream
    async with await tidings.connect(url, telemetry=provider) as second:
        sagas = app(second, seed_data=False)["create-order"]
        runner = asyncio.create_task(second.run())
        try:
            assert (await sagas.wait(saga_id, timeout=20))["status"] == "completed"
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
    spans = exporter.get_finished_spans()
    # the first step's command went out twice: from the first coordinator (its reply went
    # to that coordinator's topic, read by nobody now) and asked again by the second
    check_saga_tree(spans, in_trace(spans, root), root, saga_id, unreceived=1)
    steps = {attr(s, "tidings.saga.step") for s in in_trace(spans, root)
             if s.name.startswith("process ") and attr(s, "tidings.saga.id") == saga_id}
    assert steps == set(STEPS)


class Counted(tidings.Event):
    n: int


async def test_event_appends_and_projections_carry_the_trace(
        traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    seen: list[int] = []
    async with TestHub(telemetry=provider) as t:
        @t.hub.projection("counts")
        async def count(rec: tidings.RecordedEvent, tx: Any) -> None:
            if isinstance(rec.event, Counted):
                seen.append(rec.event.n)

        with provider.get_tracer("test").start_as_current_span("command") as root:
            await t.hub.events.append("counted-1", [Counted(n=1)])
        await t.settle()
        [msg] = t.published("counted")
        [rec] = [r async for r in t.hub.events.read("counted-1")]
        for headers in (msg.headers, rec.headers):  # (the flags may differ)
            assert headers["traceparent"][:-2] == traceparent_of(root)[:-2]
    assert seen == [1]
    [span] = by_name(exporter.get_finished_spans(), "process counts")
    assert is_child(span, root) and attr(span, "tidings.stream_id") == "counted-1"
    assert attr(span, "messaging.consumer.group.name") == "counts"


async def test_bad_telemetry_option_is_refused() -> None:
    with pytest.raises(tidings.InvalidArgument, match="TracerProvider"):
        await tidings.connect("memory://", telemetry="yes")


OFF = """
import asyncio, sys
sys.path.insert(0, '.')
import tidings
from examples.shop import app, create_order

async def work(**options):
    async with await tidings.connect('memory://', **options) as hub:
        sagas = await app(hub)  # (seeds customers c-1... and products p-1...)
        got = []

        @hub.subscriber('a.*', group='g')
        async def on(msg):
            got.append(msg)

        runner = asyncio.create_task(hub.run())
        await hub.publish('a.b', b'x')
        s = sagas['create-order']
        sid = await s.start({'customer_id': 'c-1', 'product_id': 'p-1', 'quantity': 1})
        assert (await s.wait(sid, timeout=10))['status'] in ('completed', 'compensated')
        while not got:
            await asyncio.sleep(0.01)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return hub.telemetry

assert asyncio.run(work()) is None
loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))
assert not loaded, loaded

# a global SDK provider records nothing from a hub that did not ask for tracing
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
asyncio.run(work())
assert not exporter.get_finished_spans()
assert asyncio.run(work(telemetry=True)) is not None  # True: the global provider
assert exporter.get_finished_spans()
print('ok')
"""


def test_off_by_default_records_nothing_and_never_imports_opentelemetry() -> None:
    r = subprocess.run([sys.executable, "-W", "error", "-c", OFF], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
