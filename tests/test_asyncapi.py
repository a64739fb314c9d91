"""`hub.asyncapi()`: an AsyncAPI 3.0 document of what an application registered.

Every document here is validated against the official AsyncAPI 3.0.0 JSON schema
(vendored in tests/fixtures/asyncapi, see its README) and its `$ref`s resolved
(tests/asyncapi_check.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import jsonschema_rs
import msgspec
import pydantic
import pytest
import yaml
from examples.shop import app as shop_app
from examples.shop import create_order
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.asyncapi_check import check, payload_of, resolve
from typer.testing import CliRunner

import tidings
from tidings import cli, topics
from tidings.testing import TestHub


@pytest.fixture
async def hub() -> AsyncIterator[tidings.Hub]:
    async with await tidings.connect("memory://", trim_interval=None) as h:
        yield h


async def test_the_shops_document_is_valid_with_its_commands_replies_and_payloads(
    hub: tidings.Hub,
) -> None:
    shop_app(hub, seed_data=False)
    doc = check(hub.asyncapi(title="shop", version="2.0.0"))
    assert doc["asyncapi"] == "3.0.0" and doc["info"]["title"] == "shop"
    assert doc["info"]["version"] == "2.0.0"
    for command in ("order.create", "order.approve", "order.reject", "customer.reserve_credit",
                    "customer.release_credit", "inventory.reserve", "inventory.release"):
        assert doc["channels"][command]["address"] == command
        assert doc["operations"][f"handle.{command}"]["action"] == "receive"
    # the handler's typed input is the command's payload, field by field
    credit = payload_of(doc, "handle.customer.reserve_credit")
    assert credit["properties"] == {"saga_id": {"type": "string"},
                                    "customer_id": {"type": "string"},
                                    "total": {"type": "integer"}}
    assert sorted(credit["required"]) == ["customer_id", "saga_id", "total"]
    place = payload_of(doc, "handle.order.create")
    assert set(place["properties"]) == {"saga_id", "customer_id", "product_id", "quantity"}
    # a handler replies to whatever its command's reply-to header names
    reply = doc["operations"]["handle.customer.reserve_credit"]["reply"]
    assert reply["address"]["location"] == "$message.header#/reply-to"
    assert resolve(doc, reply["channel"]["$ref"])["address"] is None
    # the saga sends each command (and each compensation) and gets its reply on its topic
    send = doc["operations"]["create-order.reserve_credit"]
    assert send["action"] == "send"
    assert send["channel"] == {"$ref": "#/channels/customer.reserve_credit"}
    assert send["reply"]["channel"] == {"$ref": "#/channels/saga.create-order.replies"}
    # (the slot of the coordinator that sent the command: each reads its slot's topic)
    assert doc["channels"]["saga.create-order.replies"]["address"] == \
        "saga.create-order.replies.{slot}"
    undo = doc["operations"]["create-order.reserve_credit.compensate"]
    assert undo["channel"] == {"$ref": "#/channels/customer.release_credit"}
    assert "create-order.approve.compensate" not in doc["operations"]  # after the pivot
    assert payload_of(doc, "create-order.reserve_credit") == credit
    status = resolve(doc, resolve(doc, send["reply"]["messages"][0]["$ref"])["$ref"])
    assert status["headers"]["properties"]["status"]["enum"] == ["ok", "rejected", "error"]


async def test_a_saga_without_handlers_here_sends_its_data_typed_by_its_input(
    hub: tidings.Hub,
) -> None:
    from examples.shop import create_order

    hub.sagas(create_order)
    doc = check(hub.asyncapi())
    payload = payload_of(doc, "create-order.reserve_credit")
    input_ref, own = payload["allOf"]
    assert set(resolve(doc, input_ref["$ref"])["properties"]) == \
        {"customer_id", "product_id", "quantity"}
    assert own["required"] == ["saga_id"]
    assert not any(o.startswith("handle.") for o in doc["operations"])


class Line(msgspec.Struct):
    sku: str
    quantity: int


class OrderPlaced(msgspec.Struct):
    order_id: str
    lines: list[Line]


@dataclasses.dataclass
class Shipped:
    order_id: str
    carrier: str = "post"


class Refund(pydantic.BaseModel):
    order_id: str
    amount: float


async def test_typed_subscribers_patterns_and_declared_topics(hub: tidings.Hub) -> None:
    @hub.subscriber("orders.placed", group="billing")
    async def bill(order: OrderPlaced) -> None: ...

    @hub.subscriber("orders.*.shipped", group="mail")
    async def mail(s: Shipped) -> None: ...

    @hub.subscriber("refunds.>", group="refunds")
    async def refund(r: Refund) -> None: ...

    @hub.subscriber(">", group="audit")
    async def audit(msg: tidings.Message) -> None: ...

    @hub.subscriber("logs.text", group="logs")
    async def log(line: str) -> None: ...

    @hub.subscriber("counts", group="counts")
    async def counts(c: dict[str, int]) -> None: ...

    hub.publishes("orders.placed", OrderPlaced, description="an order was placed")
    hub.publishes("orders.placed", OrderPlaced, description="an order was placed")  # again
    hub.publishes("blobs.raw", bytes)
    hub.publishes("pings")
    doc = check(hub.asyncapi())
    ops = doc["operations"]

    placed = payload_of(doc, "receive.billing")
    assert placed["properties"]["lines"]["items"] == {"$ref": "#/components/schemas/Line"}
    assert resolve(doc, "#/components/schemas/Line")["properties"]["quantity"] == \
        {"type": "integer"}
    assert ops["publish.orders.placed"]["action"] == "send"
    assert ops["publish.orders.placed"]["channel"] == ops["receive.billing"]["channel"]
    assert payload_of(doc, "publish.orders.placed") == placed
    assert doc["channels"]["orders.placed"]["description"] == "an order was placed"

    shipped = doc["channels"]["orders.token1.shipped"]
    assert shipped["address"] == "orders.{token1}.shipped"
    assert shipped["x-tidings-pattern"] == "orders.*.shipped"
    assert set(shipped["parameters"]) == {"token1"}
    assert payload_of(doc, "receive.mail")["properties"]["carrier"]["default"] == "post"

    rest = resolve(doc, ops["receive.refunds"]["channel"]["$ref"])
    assert rest["address"] == "refunds.{rest}" and set(rest["parameters"]) == {"rest"}
    assert payload_of(doc, "receive.refunds")["properties"]["amount"]["type"] == "number"
    assert resolve(doc, ops["receive.audit"]["channel"]["$ref"])["address"] == "{rest}"
    any_message = resolve(doc, resolve(doc, ops["receive.audit"]["messages"][0]["$ref"])["$ref"])
    assert "payload" not in any_message

    text = resolve(doc, resolve(doc, ops["receive.logs"]["messages"][0]["$ref"])["$ref"])
    assert text["contentType"] == "text/plain" and text["payload"] == {"type": "string"}
    raw = resolve(doc, resolve(doc, ops["publish.blobs.raw"]["messages"][0]["$ref"])["$ref"])
    assert raw["contentType"] == "application/octet-stream"
    assert payload_of(doc, "receive.counts") == {"type": "object",
                                                 "additionalProperties": {"type": "integer"}}
    assert ops["publish.pings"]["action"] == "send"


def _other_order_placed() -> type:
    class OrderPlaced(msgspec.Struct):  # the same name as the module's, other fields
        total: int

    return OrderPlaced


async def test_types_of_the_same_name_get_schemas_of_their_own(hub: tidings.Hub) -> None:
    hub.publishes("a", OrderPlaced)
    hub.publishes("b", _other_order_placed())
    doc = check(hub.asyncapi())
    a, b = payload_of(doc, "publish.a"), payload_of(doc, "publish.b")
    assert "lines" in a["properties"] and "total" in b["properties"]


class _Opaque:  # a class msgspec can hold but not describe in a JSON schema
    pass


@dataclasses.dataclass
class _HoldsOpaque:
    thing: _Opaque


@pytest.mark.parametrize(("args", "kwargs", "says"), [
    (("orders.*",), {}, "not a pattern"),
    (("t", _HoldsOpaque), {}, "payload_type _HoldsOpaque has no JSON schema"),
    (("orders.>",), {}, "not a pattern"),
    (("",), {}, "topic"),
    (("bad topic",), {}, "topic"),
    ((42,), {}, "topic name"),
    (("t", 42), {}, "payload_type"),
    (("t", tidings.Message), {}, "payload_type"),
    (("t", object), {}, "payload_type"),
    (("t",), {"description": 5}, "description"),
])
async def test_bad_declarations_are_refused(hub: tidings.Hub, args: tuple[Any, ...],
                                            kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(tidings.InvalidArgument, match=says):
        hub.publishes(*args, **kwargs)
    assert hub.published_topics == ()
    check(hub.asyncapi())  # and the document is still whole


async def test_a_topic_declared_twice_differently_is_refused(hub: tidings.Hub) -> None:
    hub.publishes("orders.placed", OrderPlaced)
    with pytest.raises(tidings.InvalidArgument, match="already declared"):
        hub.publishes("orders.placed", Shipped)
    assert [d.payload_type for d in hub.published_topics] == [OrderPlaced]


async def test_an_empty_hub_has_a_valid_empty_document(hub: tidings.Hub) -> None:
    doc = check(hub.asyncapi())
    assert doc["channels"] == {} and doc["operations"] == {}
    with pytest.raises(tidings.InvalidArgument):
        hub.asyncapi(version="")


def test_the_cli_prints_the_document_as_json_or_yaml() -> None:
    runner = CliRunner()
    r = runner.invoke(cli.app, ["asyncapi", "--app", "examples.shop:app"])
    assert r.exit_code == 0, r.output
    doc = check(json.loads(r.stdout))
    assert doc["info"]["title"] == "examples.shop:app"
    assert "customer.reserve_credit" in doc["channels"]
    r = runner.invoke(cli.app, ["asyncapi", "--app", "examples.shop:app", "--yaml"])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.stdout) == doc


def test_the_cli_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    r = runner.invoke(cli.app, ["asyncapi", "--app", "no_such_module:app"])
    assert r.exit_code == 2 and "cannot import" in r.output
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML not installed
    r = runner.invoke(cli.app, ["asyncapi", "--app", "examples.shop:app", "--yaml"])
    assert r.exit_code == 1 and "PyYAML" in r.output


async def test_handlers_typed_or_untyped_reply_with_a_json_object(hub: tidings.Hub) -> None:
    @hub.handler("billing.charge")
    async def charge(cmd: tidings.Command[OrderPlaced]) -> dict[str, Any]:
        return {"receipt_id": "r-1"}

    @hub.handler("billing.anything")
    async def anything(cmd: tidings.Command[Any]) -> dict[str, Any]:
        return {}

    doc = check(hub.asyncapi())
    assert payload_of(doc, "handle.billing.charge")["properties"]["order_id"] == \
        {"type": "string"}
    # a handler returns a dict or None (anything else is answered with an error)
    assert payload_of(doc, "handle.billing.charge", reply=True) == {"type": "object"}
    assert payload_of(doc, "handle.billing.anything") == {"type": "object"}
    assert payload_of(doc, "handle.billing.anything", reply=True) == {"type": "object"}


# the saga's start, real messages against the document, servers -----------------------------
async def test_a_sagas_start_is_its_started_event_with_its_input_as_data(
    hub: tidings.Hub,
) -> None:
    shop_app(hub, seed_data=False)
    doc = check(hub.asyncapi())
    start = doc["operations"]["start.create-order"]
    assert start["action"] == "send"
    assert resolve(doc, start["channel"]["$ref"])["address"] == "saga.create-order.started"
    started = payload_of(doc, "start.create-order")
    assert started["properties"]["saga"] == {"const": "create-order"}
    data = resolve(doc, started["properties"]["data"]["$ref"])
    assert data["properties"]["quantity"] == {"type": "integer", "exclusiveMinimum": 0}
    assert sorted(data["required"]) == ["customer_id", "product_id", "quantity"]


def _conforms(doc: dict[str, Any], schema: Any, value: Any) -> bool:
    # (the document's components beside the schema, so its $refs resolve)
    return jsonschema_rs.Draft7Validator(
        {"allOf": [schema], "components": doc["components"]}).is_valid(value)


async def test_the_shops_real_messages_fit_the_document() -> None:
    """Run two orders (one completes, one is refused and compensated) and check every
    message on a documented channel against that channel's messages: payload and headers."""
    async with TestHub() as t:
        await shop_app(t.hub)  # (seeds customers c-1… and products p-1…)
        doc = check(t.hub.asyncapi())
        runner = t.hub.sagas(create_order)
        await runner.start({"customer_id": "c-1", "product_id": "p-1", "quantity": 1})
        await runner.start({"customer_id": "c-2", "product_id": "p-2", "quantity": 10_000})
        await t.settle()
        assert {s["status"] async for s in runner.list()} == {"completed", "compensated"}
        seen: set[str] = set()
        async for msg in t.hub.read(">"):
            for cid, channel in doc["channels"].items():
                where = channel.get("x-tidings-pattern") or channel["address"]
                if where is None or not topics.matches(where, msg.topic):
                    continue
                messages = [resolve(doc, m["$ref"]) for m in channel["messages"].values()]
                assert any(_conforms(doc, m.get("payload", {}), msg.decode())
                           and _conforms(doc, m["headers"], dict(msg.headers))
                           for m in messages), (cid, msg.topic, msg.headers, msg.data)
                seen.add(cid)
    assert {"saga.create-order.started", "saga.create-order.replies", "order.create",
            "order.reject", "customer.reserve_credit", "inventory.reserve",
            "order.approve"} <= seen


async def test_servers_are_listed_without_passwords(hub: tidings.Hub) -> None:
    doc = check(hub.asyncapi(servers={
        "production": "nats://app:s3cret@nats.internal:4222",
        "db": {"host": "db.internal:5432", "protocol": "postgresql", "description": "events"},
    }))
    assert doc["servers"]["production"] == {"host": "nats.internal:4222", "protocol": "nats"}
    assert doc["servers"]["db"]["description"] == "events"
    assert "s3cret" not in json.dumps(doc)
    for bad in ({"p": "nats-without-a-host"}, {"bad name": "nats://n:4222"},
                {"p": {"host": "h"}}, ["nats://n:4222"]):
        with pytest.raises(tidings.InvalidArgument, match="server"):
            hub.asyncapi(servers=bad)  # type: ignore[arg-type]


def test_the_cli_lists_servers() -> None:
    r = CliRunner().invoke(cli.app, ["asyncapi", "--app", "examples.shop:app",
                                     "--server", "production=nats://nats.internal:4222"])
    assert r.exit_code == 0, r.output
    doc = check(json.loads(r.stdout))
    assert doc["servers"] == {"production": {"host": "nats.internal:4222", "protocol": "nats"}}
    r = CliRunner().invoke(cli.app, ["asyncapi", "--app", "examples.shop:app",
                                     "--server", "nats://nats.internal:4222"])
    assert r.exit_code == 2 and "NAME=URL" in r.output


# generated applications -------------------------------------------------------------------
TOKENS = st.sampled_from(["orders", "a", "b-1", "x_y", "$sys"])
PAYLOADS = st.sampled_from([None, OrderPlaced, Shipped, Refund, Line, str, bytes,
                            dict[str, int], list[Line]])
INPUTS = st.sampled_from([None, OrderPlaced, Shipped, Refund])
TOPIC = st.lists(TOKENS, min_size=1, max_size=3).map(".".join)
COMMAND = st.lists(st.sampled_from(["orders", "a", "b-1", "x_y"]), min_size=1,
                   max_size=3).map(".".join)  # (a saga's command takes no '$')


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.one_of(TOKENS, st.just("*")), min_size=0, max_size=3))
    if not tokens or draw(st.booleans()):
        tokens.append(draw(st.sampled_from(["*", ">"])))
    return ".".join(tokens)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subscribers=st.lists(st.tuples(patterns(), st.sampled_from(["g1", "g2", "g-3"]),
                                      PAYLOADS), max_size=4),
       published=st.dictionaries(TOPIC, st.tuples(PAYLOADS, st.none() | st.text(max_size=20)),
                                 max_size=3),
       handlers=st.dictionaries(TOPIC, INPUTS, max_size=3),
       saga=st.none() | st.tuples(INPUTS, st.lists(COMMAND, min_size=1, max_size=3)))
def test_generated_applications_have_valid_documents(
    subscribers: list[tuple[str, str, Any]], published: dict[str, tuple[Any, str | None]],
    handlers: dict[str, Any], saga: tuple[Any, list[str]] | None,
) -> None:
    async def build() -> dict[str, Any]:
        async with await tidings.connect("memory://", trim_interval=None) as hub:
            for pattern, group, tp in subscribers:
                async def fn(data: Any) -> None: ...
                fn.__annotations__["data"] = tidings.Message if tp is None else tp
                hub.subscriber(pattern, group=group)(fn)
            for topic, (tp, description) in published.items():
                hub.publishes(topic, tp, description=description)
            for command, tp in handlers.items():
                async def handle(cmd: tidings.Command[Any]) -> dict[str, Any]:
                    return {}
                hub.handler(command, input=tp)(handle)
            if saga is not None:
                tp, commands = saga
                hub.sagas(tidings.Saga("generated", input=tp, steps=[
                    tidings.Step(f"s{i}", command=c, compensation=c if i % 2 else None)
                    for i, c in enumerate(commands)]))
            return hub.asyncapi()

    doc = check(asyncio.run(build()))
    channels = {ch.get("x-tidings-pattern") or ch["address"] for ch in doc["channels"].values()}
    assert {p for p, _, _ in subscribers} | set(published) | set(handlers) <= channels
