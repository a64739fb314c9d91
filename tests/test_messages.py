"""Codecs and the message envelope (pure): encode_data, decode_data, Message, ids."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from typing import Any

import msgspec
import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tidings
from tidings.messages import JSON, OCTETS, TEXT, Message, decode_data, encode_data, new_id


@dataclasses.dataclass
class Point:
    x: int
    y: int
    label: str | None = None


class Item(msgspec.Struct):
    sku: str
    qty: int = 1


class Model(pydantic.BaseModel):
    name: str
    tags: list[str] = []


# encode ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, data, content_type",
    [
        (b"\x00\x01", b"\x00\x01", OCTETS),
        (bytearray(b"ab"), b"ab", OCTETS),
        (memoryview(b"mv"), b"mv", OCTETS),
        ("héllo", "héllo".encode(), TEXT),
        ("", b"", TEXT),
        ({"a": 1}, b'{"a":1}', JSON),
        ([1, "x"], b'[1,"x"]', JSON),
        (3, b"3", JSON),
        (None, b"null", JSON),
        (True, b"true", JSON),
        (Point(1, 2), b'{"x":1,"y":2,"label":null}', JSON),
        (Item("s"), b'{"sku":"s","qty":1}', JSON),
    ],
    ids=["bytes", "bytearray", "memoryview", "str", "empty-str", "dict", "list", "int", "none",
         "bool", "dataclass", "struct"],
)
def test_encode(value: object, data: bytes, content_type: str) -> None:
    assert encode_data(value) == (data, content_type)


def test_encode_pydantic() -> None:
    data, ct = encode_data(Model(name="n", tags=["t"]))
    assert ct == JSON
    assert msgspec.json.decode(data) == {"name": "n", "tags": ["t"]}


def test_encoding_a_class_is_not_treated_as_a_model() -> None:
    with pytest.raises(tidings.DecodeError):
        encode_data(Model)


@pytest.mark.parametrize("value", [object(), {"x": object()}, 1j, {1: lambda: 0}], ids=repr)
def test_unencodable_values_raise_decode_error_with_advice(value: object) -> None:
    with pytest.raises(tidings.DecodeError, match="pass bytes, str"):
        encode_data(value)


# decode ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, content_type, expected",
    [
        (b"raw", None, b"raw"),
        (b"raw", OCTETS, b"raw"),
        (b"raw", "image/png", b"raw"),
        (b'{"a":[1]}', JSON, {"a": [1]}),
        (b'{"a":1}', "application/json; charset=utf-8", {"a": 1}),
        (b'{"a":1}', "application/cloudevents+json", {"a": 1}),
        ("é".encode(), TEXT, "é"),
        (b"<p/>", "text/html", "<p/>"),
    ],
)
def test_decode_by_content_type(data: bytes, content_type: str | None, expected: object) -> None:
    assert decode_data(data, content_type) == expected


def test_decode_into_types() -> None:
    assert decode_data(b'{"x":1,"y":2}', JSON, Point) == Point(1, 2)
    assert decode_data(b'{"sku":"s"}', JSON, Item) == Item("s")
    assert decode_data(b'{"name":"n"}', JSON, Model) == Model(name="n")
    assert decode_data(b'[1,2]', JSON, list[int]) == [1, 2]
    assert decode_data(b'{"a":1}', JSON, dict[str, int]) == {"a": 1}
    assert decode_data(b"raw", None, bytes) == b"raw"
    assert decode_data(b"text", TEXT, str) == "text"
    assert decode_data(b'{"a":1}', JSON, str) == '{"a":1}'  # str means the text itself


@pytest.mark.parametrize(
    "data, content_type, typ",
    [
        (b"{nope", JSON, None),
        (b"\xff", TEXT, None),
        (b"\xff", None, str),
        (b'{"x":"one","y":2}', JSON, Point),
        (b'{"qty":1}', JSON, Item),
        (b'{"tags":"no"}', JSON, Model),
        (b'"s"', JSON, int),
        (b"", JSON, dict),
    ],
    ids=["bad-json", "bad-text", "bad-utf8-as-str", "dataclass-field", "struct-missing",
         "pydantic", "wrong-type", "empty"],
)
def test_decode_errors(data: bytes, content_type: str | None, typ: Any) -> None:
    with pytest.raises(tidings.DecodeError) as info:
        decode_data(data, content_type, typ)
    assert "msg.decode(bytes)" in str(info.value)  # says how to look at it raw


# hypothesis round trips -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_json_values_round_trip(value: object) -> None:
    data, ct = encode_data(value)
    assert ct == (TEXT if isinstance(value, str) else JSON)  # a bare str is text, not JSON
    assert decode_data(data, ct) == value


@given(st.binary())
def test_bytes_round_trip(value: bytes) -> None:
    data, ct = encode_data(value)
    assert decode_data(data, ct) == value
    assert decode_data(data, ct, bytes) == value


@given(st.text())
def test_text_round_trip(value: str) -> None:
    data, ct = encode_data(value)
    assert decode_data(data, ct) == value
    assert decode_data(data, ct, str) == value


@given(st.builds(Point, st.integers(), st.integers(), st.none() | st.text()))
def test_dataclass_round_trip(value: Point) -> None:
    data, ct = encode_data(value)
    assert decode_data(data, ct, Point) == value


@given(st.builds(Item, st.text(), st.integers(-(2**63), 2**63 - 1)))
def test_struct_round_trip(value: Item) -> None:
    data, ct = encode_data(value)
    assert decode_data(data, ct, Item) == value


@given(st.builds(Model, name=st.text(), tags=st.lists(st.text(), max_size=3)))
def test_pydantic_round_trip(value: Model) -> None:
    data, ct = encode_data(value)
    assert decode_data(data, ct, Model) == value


@given(st.binary())
def test_decoding_arbitrary_bytes_never_raises_anything_but_decode_error(data: bytes) -> None:
    for ct, typ in [(JSON, None), (TEXT, None), (None, str), (JSON, Point), (JSON, Item),
                    (JSON, Model), (JSON, list[int])]:
        try:
            decode_data(data, ct, typ)
        except tidings.DecodeError:
            pass


# the envelope ---------------------------------------------------------------------------


def _msg(**kw: Any) -> Message:
    base: dict[str, Any] = {"id": "m-1", "topic": "a.b", "key": "k", "data": b'{"a":1}',
                            "headers": {"content-type": JSON}, "timestamp": 1_700_000_000.25,
                            "position": 7}
    base.update(kw)
    return Message(**base)


def test_message_time_is_utc() -> None:
    m = _msg()
    assert m.time == datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=UTC)
    assert m.content_type == JSON
    assert m.decode() == {"a": 1}
    assert "position=7" in repr(m) and "a.b" in repr(m)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def _settle(self, msg: Message, kind: str, delay: float | None, wait: bool,
                reason: str | None = None, error: str | None = None) -> None:
        self.calls.append((kind, delay))


async def test_settling_goes_to_the_subscription_once() -> None:
    rec = _Recorder()
    m = _msg(sub=rec)
    await m.nack(delay=1.5)
    await m.ack()  # the first decision stands
    await m.term()
    assert rec.calls == [("nack", 1.5)]
    m2 = _msg(sub=rec)
    await m2.term()
    m3 = _msg(sub=rec)
    await m3.ack()
    assert rec.calls[1:] == [("term", 0.0), ("ack", 0.0)]


@pytest.mark.parametrize("delay", [-0.1, math.nan, math.inf, "1", True], ids=repr)
async def test_nack_delay_must_be_finite_and_not_negative(delay: Any) -> None:
    rec = _Recorder()
    m = _msg(sub=rec)
    with pytest.raises(tidings.InvalidArgument, match="nack delay"):
        await m.nack(delay=delay)
    assert rec.calls == []
    await m.nack(delay=0)  # still unsettled after the rejected call
    assert rec.calls == [("nack", 0)]


async def test_nack_without_a_delay_leaves_it_to_the_backoff() -> None:
    rec = _Recorder()
    await _msg(sub=rec).nack()
    assert rec.calls == [("nack", None)]


async def test_replayed_message_has_nothing_to_settle() -> None:
    m = _msg()
    for settle in (m.ack, m.nack, m.term):
        with pytest.raises(tidings.InvalidArgument, match="replay"):
            await settle()


@pytest.mark.parametrize(
    "data, headers, expected",
    [
        (b'{"a":1}', {"content-type": JSON}, {"data": {"a": 1}}),
        (b"hi", {"content-type": TEXT}, {"data": "hi"}),
        (b"hi", {}, {"data": "hi"}),
        (b"\xff\x00", {"content-type": OCTETS}, {"data_b64": "/wA="}),
        (b"\xff", {}, {"data_b64": "/w=="}),
        (b"{bad", {"content-type": JSON}, {"data_b64": "e2JhZA=="}),
        (b"null", {"content-type": JSON}, {"data": None}),
    ],
    ids=["json", "text", "untyped-text", "octets", "untyped-binary", "bad-json", "json-null"],
)
def test_to_dict(data: bytes, headers: dict[str, str], expected: dict[str, Any]) -> None:
    d = _msg(data=data, headers=headers, attempt=2).to_dict()
    for k, v in expected.items():
        assert d[k] == v
    assert d["id"] == "m-1" and d["position"] == 7 and d["attempt"] == 2
    assert datetime.fromisoformat(d["time"]) == _msg().time
    msgspec.json.encode(d)  # JSON-able


def test_new_ids_are_unique_strings() -> None:
    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(isinstance(i, str) and 0 < len(i) <= 255 for i in ids)


def test_published_is_immutable() -> None:
    p = tidings.Published(position=1, id="x")
    assert p.duplicate is False
    with pytest.raises(AttributeError):
        p.position = 2  # type: ignore[misc]
