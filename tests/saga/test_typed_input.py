"""Typed inputs: `Saga(..., input=T)`, `Command[T]` / `@hub.handler(..., input=T)`.

A saga's data is checked before anything is stored; a command that does not fit its
handler's type never reaches the handler: it is rejected (so its saga compensates at
once, without waiting for the step's timeout) and dead-lettered with `decode-error`.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import msgspec
import pytest

import tidings
from tidings import ManualClock, Saga, Step

from .test_coordinator import WAIT, Env, Log, read_all, until

pydantic = pytest.importorskip("pydantic")


class Address(msgspec.Struct):
    city: str
    zip: str


class OrderStruct(msgspec.Struct):
    customer_id: str
    quantity: Annotated[int, msgspec.Meta(gt=0)]
    address: Address | None = None
    note: str = "none"


@dataclasses.dataclass
class AddressDC:
    city: str
    zip: str


@dataclasses.dataclass
class OrderDC:
    customer_id: str
    quantity: int
    address: AddressDC | None = None
    note: str = "none"


class AddressModel(pydantic.BaseModel):
    city: str
    zip: str


class OrderModel(pydantic.BaseModel):
    customer_id: str
    quantity: int = pydantic.Field(gt=0)
    address: AddressModel | None = None
    note: str = "none"


class Reserve(msgspec.Struct):
    saga_id: str
    amount: int


class Release(msgspec.Struct):
    saga_id: str


KINDS = [OrderStruct, OrderDC, OrderModel]
ADDRESS: dict[type[Any], type[Any]] = {OrderStruct: Address, OrderDC: AddressDC,
                                       OrderModel: AddressModel}
#: data that does not fit, and the field path the error names
BAD = [
    ({"quantity": 1}, "$.customer_id"),
    ({"customer_id": "c-1", "quantity": "two"}, "$.quantity"),
    ({"customer_id": "c-1", "quantity": 1, "address": {"city": "Oslo", "zip": 1}},
     "$.address.zip"),
    ({"customer_id": "c-1", "quantity": 1, "address": {"city": "Oslo"}}, "$.address.zip"),
]


def saga_of(input: type[Any], log: Log) -> Saga:
    return Saga("typed", [Step("one", action=log.action("one"))], input=input)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("data,field", BAD, ids=["missing", "wrong-type", "nested-type",
                                                  "nested-missing"])
async def test_start_refuses_data_that_does_not_fit_and_stores_nothing(
        env: Env, sqlite_url: str, kind: type[Any], data: dict[str, Any], field: str) -> None:
    hub = await env.hub(sqlite_url)
    log = Log()
    runner = hub.sagas(saga_of(kind, log))
    before = await hub.engine.last_position()
    with pytest.raises(tidings.InvalidArgument) as info:
        await runner.start(data, id="s-1")
    assert info.value.field == field
    assert f"saga 'typed' input is invalid at {field}" in str(info.value)
    assert kind.__name__ in str(info.value)  # says what to send
    assert await hub.engine.last_position() == before  # no saga event, no message
    assert [s async for s in runner.list()] == []
    with pytest.raises(tidings.NotFound):
        await runner.get("s-1")
    assert log.ran == []


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
async def test_a_fitting_start_stores_the_checked_value_with_its_defaults(
        env: Env, url: str, kind: type[Any]) -> None:
    hub = await env.hub(url)
    log = Log()
    runner = hub.sagas(saga_of(kind, log), clock=ManualClock())
    sid = await runner.start({"customer_id": "c-1", "quantity": 2, "extra": "kept out"})
    state = await runner.wait(sid, timeout=WAIT)
    assert state["status"] == "completed"
    assert state["data"] == {"customer_id": "c-1", "quantity": 2, "address": None,
                             "note": "none"}
    # an instance of the type works too (and is checked: a Struct's constraints are not
    # checked by its constructor)
    typed = kind(customer_id="c-2", quantity=1, address=ADDRESS[kind](city="Oslo", zip="0150"))
    sid = await runner.start(typed)
    state = await runner.wait(sid, timeout=WAIT)
    assert state["data"]["address"] == {"city": "Oslo", "zip": "0150"}
    if kind is OrderStruct:
        with pytest.raises(tidings.InvalidArgument) as info:
            await runner.start(OrderStruct(customer_id="c-3", quantity=0))
        assert info.value.field == "$.quantity"


def test_an_input_that_is_not_a_type_of_json_objects_is_refused() -> None:
    class Pair(msgspec.Struct, array_like=True):
        a: int

    for bad in (int, dict, "OrderStruct", Pair, OrderStruct(customer_id="c", quantity=1)):
        with pytest.raises(tidings.InvalidArgument, match="input= must be"):
            Saga("typed", [Step("one", command="svc.one")], input=bad)  # type: ignore[arg-type]
    with pytest.raises(tidings.InvalidArgument, match="must be a dict"):
        Saga("untyped", [Step("one", command="svc.one")]).check_data([1])


async def test_a_typed_handler_gets_its_type(env: Env, url: str) -> None:
    """By annotation (`Command[Reserve]`) or by `input=`; over messages or inline."""
    hub = await env.hub(url)
    got: list[Any] = []

    @hub.handler("svc.reserve")
    async def reserve(cmd: tidings.Command[Reserve]) -> dict[str, Any]:
        got.append(cmd.data)
        return {"reserved": cmd.data.amount}

    @hub.handler("svc.release", input=Release, inline=True)
    async def release(cmd: tidings.Command[Any]) -> dict[str, Any]:
        got.append(cmd.data)
        return {}

    @hub.handler("svc.note", inline=True)
    async def note(cmd: tidings.Command[dict[str, Any]]) -> dict[str, Any]:
        got.append(cmd.data)
        return {}

    env.serve(hub)
    defn = Saga("typed-cmd", [
        Step("reserve", command="svc.reserve"),
        Step("release", command="svc.release"),
        Step("note", command="svc.note"),
    ])
    runner = hub.sagas(defn)
    sid = await runner.start({"amount": 3})
    state = await runner.wait(sid, timeout=WAIT)
    assert state["status"] == "completed", state
    assert got == [Reserve(saga_id=sid, amount=3), Release(saga_id=sid),
                   {"amount": 3, "reserved": 3, "saga_id": sid}]


@pytest.mark.parametrize("inline", [False, True], ids=["message", "inline"])
async def test_a_command_that_does_not_fit_is_rejected_and_the_saga_compensates(
        env: Env, url: str, inline: bool) -> None:
    """Without waiting for the step's timeout (an hour, on a clock that never moves)."""
    hub = await env.hub(url)
    called: list[Any] = []

    @hub.handler("svc.reserve", inline=inline)
    async def reserve(cmd: tidings.Command[Reserve]) -> dict[str, Any]:
        called.append(cmd.data)
        return {}

    env.serve(hub)
    log = Log()
    defn = Saga("typed-bad", [
        Step("create", action=log.action("create"), compensation=log.action("undo")),
        Step("reserve", command="svc.reserve", timeout=3600.0, retries=3),
    ])
    runner = hub.sagas(defn, clock=ManualClock())
    sid = await runner.start({"amount": "lots"})
    state = await runner.wait(sid, timeout=WAIT)
    assert state["status"] == "compensated", state
    assert "step reserve failed: command 'svc.reserve' is invalid at $.amount" in \
        state["reason"]
    assert log.names(sid) == ["create", "undo"]
    assert called == []
    failed = [s for s in state["steps"] if s["event"] == "StepFailed"]
    assert len(failed) == 1 and failed[0]["rejected"]  # a rejection: never retried
    if inline:
        return
    # stored in the inbox like any rejection: a redelivery gets the same answer
    from tidings.saga.handlers import InboxRecorded, inbox_stream

    [rec] = [r.event async for r in hub.events.read(inbox_stream("svc.reserve",
                                                                  f"{sid}:reserve:action"))]
    assert isinstance(rec, InboxRecorded) and rec.status == "rejected"
    assert "$.amount" in rec.error

    async def dead_lettered() -> bool:
        return len(await read_all(hub, "$dlq.handler-svc-reserve")) == 1

    await until(dead_lettered, "the malformed command dead-lettered")
    [dead] = await read_all(hub, "$dlq.handler-svc-reserve")
    assert dead.headers["tidings-reason"] == "decode-error"
    assert dead.headers["tidings-attempts"] == "1"
    assert dead.headers["saga-id"] == sid


async def test_a_compensation_that_does_not_fit_leaves_the_saga_stuck(
        env: Env, sqlite_url: str) -> None:
    """A compensation is never refused for good: it is retried, then the saga is stuck
    (for a person to look at), never silently marked compensated."""
    hub = await env.hub(sqlite_url)

    @hub.handler("svc.reserve")
    async def reserve(cmd: tidings.Command[dict[str, Any]]) -> dict[str, Any]:
        return {}

    @hub.handler("svc.release")
    async def release(cmd: tidings.Command[Reserve]) -> dict[str, Any]:
        raise AssertionError("never called")

    env.serve(hub)
    log = Log()
    defn = Saga("typed-comp", [
        Step("reserve", command="svc.reserve", compensation="svc.release",
             compensation_retries=1),
        Step("fail", action=log.action("fail", fail=RuntimeError("no"))),
    ])
    clock = ManualClock()
    runner = hub.sagas(defn, clock=clock)
    sid = await runner.start({})

    async def stuck() -> bool:
        return (await runner.get(sid))["status"] == "stuck"

    await until(stuck, "stuck", clock=clock, tick=1.0)
    state = await runner.get(sid)
    assert "compensation rejected: command 'svc.release' is invalid at $.amount" in \
        state["error"]


async def test_a_handler_input_must_be_a_type_of_json_objects(env: Env) -> None:
    hub = await env.hub("memory://")

    async def plain(cmd: tidings.Command[int]) -> None: ...

    async def typed(cmd: tidings.Command[Reserve]) -> None: ...

    async def unresolved(cmd: tidings.Command[NotDefinedAnywhere]) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(tidings.InvalidArgument, match="input= must be"):
        hub.handler("svc.a", input=dict)(typed)
    with pytest.raises(tidings.InvalidArgument, match=r"Command\[<class 'int'>\] is not an"):
        hub.handler("svc.a")(plain)
    with pytest.raises(tidings.InvalidArgument, match="give one of them"):
        hub.handler("svc.a", input=Release)(typed)
    with pytest.raises(tidings.InvalidArgument, match="NotDefinedAnywhere"):
        hub.handler("svc.a")(unresolved)
    hub.handler("svc.a", input=Release)(unresolved)  # said explicitly: fine
    assert [h.input for h in hub.command_handlers] == [Release]
