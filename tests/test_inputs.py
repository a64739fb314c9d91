"""Typed inputs (tidings.inputs), and subscribers that decode to their parameter's type.

The helpers are pure: checked here directly. A typed subscriber runs on every engine:
a message that does not decode is dead-lettered after exactly one attempt.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import pytest

import tidings
from tidings.inputs import decodable, input_schema, to_plain, validate

pydantic = pytest.importorskip("pydantic")

GUARD = 10.0


class Line(msgspec.Struct):
    sku: str
    quantity: Annotated[int, msgspec.Meta(gt=0)]


class Order(msgspec.Struct, rename="camel"):
    order_id: str
    lines: list[Line]
    placed: datetime | None = None


@dataclasses.dataclass
class LineDC:
    sku: str
    quantity: int = 1


@dataclasses.dataclass
class OrderDC:
    order_id: str
    lines: list[LineDC] = dataclasses.field(default_factory=list)


class LineModel(pydantic.BaseModel):
    sku: str
    quantity: int = pydantic.Field(gt=0)


class OrderModel(pydantic.BaseModel):
    order_id: str
    lines: list[LineModel]


def invalid(tp: type[Any], data: Any) -> tidings.InvalidArgument:
    with pytest.raises(tidings.InvalidArgument) as info:
        validate(tp, data, "the order")
    return info.value


def test_the_error_names_the_field_path_and_what_to_send() -> None:
    e = invalid(Order, {"orderId": "o-1", "lines": [{"sku": "a", "quantity": 0}]})
    assert e.field == "$.lines[0].quantity"
    assert str(e) == ("the order is invalid at $.lines[0].quantity: Expected `int` >= 1; "
                      "send the fields of Order with their declared types")
    assert invalid(Order, {"lines": []}).field == "$.orderId"  # the name as sent
    assert invalid(Order, {"orderId": "o", "lines": [{}]}).field == "$.lines[0].sku"
    assert "required field `sku` is missing" in str(invalid(Order, {"orderId": "o",
                                                                     "lines": [{}]}))
    assert invalid(Order, [1]).field == "$"
    assert invalid(OrderDC, {"order_id": 1}).field == "$.order_id"
    assert invalid(OrderDC, {"order_id": "o", "lines": [{"quantity": 1}]}).field == \
        "$.lines[0].sku"
    e = invalid(OrderModel, {"order_id": "o", "lines": [{"sku": "a", "quantity": 0},
                                                       {"quantity": 1}]})
    assert e.field == "$.lines[0].quantity"
    assert "(and 1 more)" in str(e) and "send the fields of OrderModel" in str(e)
    assert isinstance(e, ValueError)  # as every InvalidArgument


def test_a_valid_value_becomes_plain_data_with_its_defaults() -> None:
    when = datetime(2024, 5, 1, 12, tzinfo=UTC)
    order = validate(Order, {"orderId": "o-1", "lines": [{"sku": "a", "quantity": 2}],
                             "placed": when.isoformat()}, "the order")
    assert order == Order("o-1", [Line("a", 2)], when)
    assert to_plain(order) == {"orderId": "o-1", "lines": [{"sku": "a", "quantity": 2}],
                               "placed": "2024-05-01T12:00:00Z"}
    dc = validate(OrderDC, {"order_id": "o-1", "lines": [{"sku": "a"}]}, "the order")
    assert to_plain(dc) == {"order_id": "o-1", "lines": [{"sku": "a", "quantity": 1}]}
    assert to_plain(validate(OrderModel, {"order_id": "o", "lines": []}, "x")) == \
        {"order_id": "o", "lines": []}
    # an instance is checked again (a Struct's constructor checks no constraint)
    assert invalid(Order, Order("o", [Line("a", 0)])).field == "$.lines[0].quantity"


def test_json_schemas_name_their_parts_under_a_prefix() -> None:
    schema, named = input_schema(Order, "create-order.")
    assert schema == {"$ref": "#/components/schemas/create-order.Order"}
    assert set(named) == {"create-order.Order", "create-order.Line"}
    assert named["create-order.Order"]["required"] == ["orderId", "lines"]
    assert named["create-order.Order"]["properties"]["lines"]["items"] == \
        {"$ref": "#/components/schemas/create-order.Line"}
    schema, named = input_schema(OrderModel, "x.")
    assert schema["required"] == ["order_id", "lines"] and "$defs" not in schema
    assert schema["properties"]["lines"]["items"] == {"$ref": "#/components/schemas/x.LineModel"}
    assert set(named) == {"x.LineModel"}
    schema, named = input_schema(OrderDC, "y.")
    assert named["y.OrderDC"]["required"] == ["order_id"]


def test_what_messages_decode_to() -> None:
    for ok in (Order, OrderDC, OrderModel, dict[str, int], list[int], int, str, bytes):
        assert decodable(ok)
    assert not decodable(object)
    assert not decodable(asyncio.Event)


# typed subscribers ------------------------------------------------------------------------
async def test_a_message_that_does_not_decode_is_dead_lettered_after_one_attempt(
        hub: tidings.Hub) -> None:
    got: list[Order] = []

    @hub.subscriber("orders.*", group="typed", max_deliver=5, retry_backoff=0.01)
    async def on_order(order: Order) -> None:
        got.append(order)

    await hub.publish("orders.bad", {"orderId": "o-1", "lines": [{"sku": "a", "quantity": -1}]})
    await hub.publish("orders.bad", b"\xff not json")
    await hub.publish("orders.good", Order("o-2", [Line("b", 1)]))
    runner = asyncio.create_task(hub.run())
    try:
        async with asyncio.timeout(GUARD):
            while True:  # both dead letters, and the good message handled
                if got and len([m async for m in hub.read("$dlq.typed")]) == 2:
                    break
                await asyncio.sleep(0.01)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    dead = [m async for m in hub.read("$dlq.typed")]
    assert [m.headers["tidings-reason"] for m in dead] == ["decode-error", "decode-error"]
    assert [m.headers["tidings-attempts"] for m in dead] == ["1", "1"]
    assert [m.headers["tidings-original-topic"] for m in dead] == ["orders.bad", "orders.bad"]
    assert got == [Order("o-2", [Line("b", 1)])]


async def test_a_subscriber_parameter_type_must_be_decodable() -> None:
    async with await tidings.connect("memory://") as hub:
        async def opaque(event: asyncio.Event) -> None: ...

        async def unresolved(order: NoSuchType) -> None: ...  # type: ignore[name-defined]  # noqa: F821

        async def fine(order: OrderModel) -> Order:  # the return type is not looked at
            raise AssertionError

        with pytest.raises(tidings.InvalidArgument, match="cannot be decoded as"):
            hub.subscriber("a.b", group="g")(opaque)
        with pytest.raises(tidings.InvalidArgument, match="NoSuchType"):
            hub.subscriber("a.b", group="g")(unresolved)
        hub.subscriber("a.b", group="g")(fine)



def test_message_and_command_imported_for_type_checking_only_mean_untyped() -> None:
    """`msg: Message` with Message imported under TYPE_CHECKING (as linters arrange it)
    cannot be resolved at run time: the subscriber gets the raw Message, as before, and
    the handler the decoded JSON; another unresolvable name is still an error."""
    module: dict[str, Any] = {}
    exec(  # a module whose annotations name what it imported for type checking only
        "from __future__ import annotations\n"
        "async def on(msg: Message) -> None: ...\n"
        "async def handle(cmd: Command) -> None: ...\n"
        "async def typo(order: OrderCreatd) -> None: ...\n", module)
    from tidings.inputs import parameter_type

    assert parameter_type(module["on"], "subscriber") is None
    assert parameter_type(module["handle"], "handler") is None
    with pytest.raises(tidings.InvalidArgument, match="OrderCreatd"):
        parameter_type(module["typo"], "subscriber")


def test_only_exact_whole_floats_become_ints() -> None:
    class Qty(msgspec.Struct):
        n: int

    assert validate(Qty, {"n": 2.0}, "x") == Qty(n=2)
    with pytest.raises(tidings.InvalidArgument, match=r"\$\.n"):
        validate(Qty, {"n": 1e300}, "x")


def test_an_input_type_without_a_json_schema_is_refused_when_registered() -> None:
    class Opaque:
        pass

    @dataclasses.dataclass
    class Holder:
        thing: Opaque

    with pytest.raises(tidings.InvalidArgument, match="JSON schema"):
        tidings.Saga("s", [tidings.Step("a", command="x.y")], input=Holder)
