"""Over HTTP, one trace per request (W3C traceparent in): the gateway's SERVER span, the
saga it starts, each step's command, the handlers, their replies, a retry, the
compensation and a subscriber's redelivery; and a message published over HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from tests.pg_plugin import needs

needs("opentelemetry.sdk", reason="the tracing tests need opentelemetry-sdk (dev extra)")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind  # noqa: E402

import tidings  # noqa: E402

from .conftest import LiveServer  # noqa: E402
from .test_commands import wait_terminal  # noqa: E402

CALLER_SPAN = 0x00F067AA0BA902B7


def traced_shop(hub: tidings.Hub) -> Any:
    """`examples.shop:app`, with a credit service that fails its first call (the saga
    retries the step) and a subscriber to the saga's end that fails its first delivery
    (redelivered), and one to `orders.placed`."""
    from examples.shop import app

    sagas = app(hub, seed_data=False)
    [credit] = [h for h in hub.command_handlers if h.command == "customer.reserve_credit"]
    real, calls = credit.fn, []

    async def flaky(cmd: Any) -> Any:
        calls.append(cmd)
        if len(calls) == 1:
            raise RuntimeError("the credit service hiccups")
        return await real(cmd)

    credit.fn = flaky
    ended: list[tidings.Message] = []

    @hub.subscriber("saga.create-order.ended", group="notify", backoff=[0.05])
    async def notify(msg: tidings.Message) -> None:
        ended.append(msg)
        if len(ended) == 1:
            raise RuntimeError("the mail server is away")

    @hub.subscriber("orders.placed", group="audit")
    async def audit(msg: tidings.Message) -> None:
        pass

    return sagas


def is_child(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return span.parent is not None and span.parent.span_id == parent.context.span_id


def attr(span: ReadableSpan, name: str) -> Any:
    return (span.attributes or {}).get(name)


def spans_of(exporter: InMemorySpanExporter, trace_id: str,
             until: Callable[[Sequence[ReadableSpan]], bool]) -> Sequence[ReadableSpan]:
    """The finished spans of trace `trace_id`, once `until` holds of them (or 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        mine = [s for s in exporter.get_finished_spans()
                if f"{s.context.trace_id:032x}" == trace_id]
        if until(mine) or time.monotonic() > deadline:
            return mine
        time.sleep(0.02)


def test_a_saga_started_over_http_is_one_trace_with_its_retry_compensation_redelivery(
        start_server: Callable[..., LiveServer],
        traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    from examples.shop.services import seed

    provider, exporter = traced
    server = start_server(app_module="tests.gateway.test_telemetry:traced_shop",
                          connect={"telemetry": provider})
    server.call(lambda hub: seed(hub, customers=1, products=1))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with server.client() as c:
        # over the credit limit: the credit step fails once (retried), is then refused,
        # and the order is compensated
        r = c.post("/v1/commands/create-order",
                   json={"customer_id": "c-1", "product_id": "p-1", "quantity": 10_000},
                   headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN:016x}-01"})
        assert r.status_code == 202, r.text
        assert wait_terminal(c, r.headers["location"])["status"] == "compensated"
    mine = spans_of(exporter, trace_id, lambda got: sum(
        s.name == "process saga.create-order.ended" for s in got) == 2)

    [http] = [s for s in mine if s.kind == SpanKind.SERVER]
    assert http.name == "POST /v1/commands/{saga}" and http.parent is not None
    assert http.parent.span_id == CALLER_SPAN
    assert attr(http, "http.route") == "/v1/commands/{saga}"
    assert attr(http, "http.response.status_code") == 202
    [saga] = [s for s in mine if s.name == "saga create-order"]
    assert is_child(saga, http)

    def under(parent: ReadableSpan, name: str) -> list[ReadableSpan]:
        return sorted((s for s in mine if is_child(s, parent) and s.name == name),
                      key=lambda s: s.start_time or 0)

    # each step's command under the saga, its handler under the command, the handler's
    # reply under the handler, the coordinator's receipt of it under the reply
    steps = [(attr(s, "tidings.saga.step"), attr(s, "tidings.saga.kind"),
              attr(s, "tidings.saga.attempt"), s) for s in
             sorted(mine, key=lambda s: s.start_time or 0)
             if is_child(s, saga) and s.kind == SpanKind.PRODUCER
             and s.name != "send saga.create-order.ended"]
    assert [x[:3] for x in steps] == [("create_order", "action", 1),
                                      ("reserve_credit", "action", 1),
                                      ("reserve_credit", "action", 2),
                                      # (its first attempt failed: it may have held credit)
                                      ("reserve_credit", "compensation", 1),
                                      ("create_order", "compensation", 1)]
    handled = []
    for step, kind, attempt, send in steps:
        [process] = [s for s in mine if is_child(s, send)]
        assert process.kind == SpanKind.CONSUMER and process.name == f"process {send.name[5:]}"
        assert attr(process, "tidings.saga.attempt") == attempt
        handled.append(attr(process, "tidings.reply.status"))
        receipt = [s for s in mine if s.name == "process saga.create-order.replies"
                   and (is_child(s, process) or any(
                       is_child(s, r) for r in under(process, "send saga.create-order.replies")))]
        assert len(receipt) == 1, (step, kind, attempt)
        assert [attr(s, "messaging.operation.name") for s in under(
            process, f"settle {send.name[5:]}")] == ["ack"]
    assert handled == ["ok", "error", "rejected", "ok", "ok"]  # a retry, a refusal, undone

    # the saga's end, and a subscriber that failed once and got it again
    [end] = under(saga, "send saga.create-order.ended")
    deliveries = under(end, "process saga.create-order.ended")
    assert [attr(s, "tidings.attempt") for s in deliveries] == [1, 2]
    assert [s.status.is_ok for s in deliveries] == [False, True]
    assert [attr(s, "messaging.operation.name") for d in deliveries
            for s in under(d, "settle saga.create-order.ended")] == ["nack", "ack"]


def test_a_message_published_over_http_is_processed_in_the_request_s_trace(
        start_server: Callable[..., LiveServer],
        traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    server = start_server(app_module="tests.gateway.test_telemetry:traced_shop",
                          connect={"telemetry": provider})
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    with server.client() as c:
        r = c.post("/v1/topics/orders.placed/messages", json={"data": {"id": 1}},
                   headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN:016x}-01"})
        assert r.status_code == 201, r.text
        untraced = c.post("/v1/topics/orders.placed/messages", json={"data": {"id": 2}})
        assert untraced.status_code == 201
    mine = spans_of(exporter, trace_id,
                    lambda got: any(s.name == "process orders.placed" for s in got))
    [http] = [s for s in mine if s.kind == SpanKind.SERVER]
    assert http.name == "POST /v1/topics/{topic}/messages"
    assert http.parent is not None and http.parent.span_id == CALLER_SPAN
    [process] = [s for s in mine if s.name == "process orders.placed"]
    assert is_child(process, http)  # the message carried its request's context
    assert attr(process, "messaging.consumer.group.name") == "audit"
