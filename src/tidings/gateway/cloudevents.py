"""CloudEvents 1.0 at the gateway's edge: accepted in binary, structured and batch HTTP
modes, emitted in structured mode. Pure functions over headers and bytes, no I/O.

A CloudEvent is a message with a few named headers: its `id` is the message id (so a
repeat is deduplicated like any client id), the `partitionkey` extension is the message
key, `datacontenttype` is the `content-type` header, and every other attribute `x`
(source, type, time, subject, dataschema, extensions) is the header `ce-x`. A message
published without CloudEvents comes out as one too, with a source and type made from its
topic. The JSON Schema of what is accepted (`schemas`) sits beside the checks it mirrors:
the OpenAPI fuzz test holds them to each other.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime
from typing import Any, NamedTuple
from urllib.parse import unquote

import msgspec

from ..messages import Message
from .http import ApiError, decode_body, too_deep

__all__ = [
    "BATCH",
    "JSON",
    "STRUCTURED",
    "EventIn",
    "cloudevent_out",
    "events_in",
    "is_json_type",
    "negotiate",
    "schemas",
    "valid_time",
]

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
JSON = "application/json"
MAX_BATCH = 1_000  # events of ~200 bytes each: a full batch stays well under max_body
MAX_ID = 255  # the hub's limit on message ids and keys
INT32 = (-(2**31), 2**31 - 1)  # the range of a CloudEvents Integer
#: The attributes stored under their own names (not as `ce-` headers), or not at all.
_ENVELOPE = frozenset({"specversion", "id", "partitionkey", "datacontenttype"})
#: Names a `ce-` header cannot give an emitted event (set from the envelope, or the data).
_NOT_FROM_HEADERS = _ENVELOPE | {"data"}
_STRINGS = frozenset({"specversion", "id", "source", "type", "subject", "time", "dataschema",
                      "datacontenttype", "partitionkey"})
_REQUIRED = ("specversion", "id", "source", "type")
_NON_EMPTY = frozenset({"id", "source", "type", "subject", "dataschema", "datacontenttype",
                        "partitionkey"})
_NAME = re.compile("[a-z0-9]+")
_OWN = "tidings"  # the prefix of the gateway's own extension attributes
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # not allowed in a CloudEvents String
_BASE64 = "([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
_IS_BASE64 = re.compile(_BASE64)
_TIME = re.compile("([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
                   r"(\.[0-9]+)?([Zz]|[+-]([0-9]{2}):([0-9]{2}))")
_Q = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")
_SUPPORTED = (f"CloudEvents 1.0 in binary mode (ce-* headers), structured mode ({STRUCTURED})"
              f" or batch mode ({BATCH})")

_decode_object = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_decode_array = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_string = msgspec.json.Decoder(str | None).decode
# float: JSON Schema counts 1.0 as an integer, and the OpenAPI document says "integer"
_decode_extension = msgspec.json.Decoder(str | int | float | bool | None).decode
_decode_json = msgspec.json.Decoder().decode


class EventIn(NamedTuple):
    """One CloudEvent as the envelope the hub stores."""

    id: str
    key: str | None
    headers: dict[str, str]
    data: bytes


def _invalid(detail: str) -> ApiError:
    return ApiError(422, "invalid_cloudevent", detail)


def is_json_type(content_type: str) -> bool:
    """True for application/json, text/json and any `+json` media type (parameters ignored)."""
    media = content_type.partition(";")[0].strip().lower()
    return media in (JSON, "text/json") or media.endswith("+json")


def valid_time(value: str) -> bool:
    """True for an RFC 3339 timestamp (`2024-05-01T12:00:00Z`, `…:00.5+02:00`)."""
    m = _TIME.fullmatch(value)
    if m is None:
        return False
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if hour > 23 or minute > 59 or second > 60:  # 60: a leap second
        return False
    if m[9] is not None and (int(m[9]) > 23 or int(m[10]) > 59):
        return False
    try:
        date(year or 2000, month, day)  # year 0000 is valid in RFC 3339 (and a leap year)
    except ValueError:
        return False
    return True


# --- in ---------------------------------------------------------------------------------

def events_in(headers: Iterable[tuple[bytes, bytes]], body: bytes
              ) -> EventIn | list[EventIn] | None:
    """The CloudEvents of a publish request (a list in batch mode), or None when it is not
    one: neither a `ce-*` header nor an `application/cloudevents…` Content-Type."""
    content_type: bytes | None = None
    ce: list[tuple[bytes, bytes]] | None = None
    for name, value in headers:  # ASGI header names are lower case
        if name == b"content-type":
            content_type = value
        elif name.startswith(b"ce-"):
            if ce is None:
                ce = []
            ce.append((name, value))
    if content_type is not None and content_type[:23].lower() == b"application/cloudevents":
        media = content_type.partition(b";")[0].strip().lower()
        if media == STRUCTURED.encode():
            return _structured(body)
        if media == BATCH.encode():
            return _batch(body)
        raise ApiError(415, "unsupported_media_type", f"Content-Type {media.decode('latin-1')!r}"
                       f" is not supported; send {_SUPPORTED}")
    if ce is None:
        return None
    return _binary(ce, content_type, body)


def _structured(body: bytes) -> EventIn:
    obj = _decode(body, _decode_object, f"one JSON object (send several as {BATCH})")
    return _from_object(obj, "")


def _batch(body: bytes) -> list[EventIn]:
    items = _decode(body, _decode_array, "a JSON array of CloudEvent objects")
    if not 1 <= len(items) <= MAX_BATCH:
        raise _invalid(f"a batch must hold 1 to {MAX_BATCH} CloudEvents")
    events = []
    for i, item in enumerate(items):
        try:
            obj = _decode_object(item)
        except msgspec.ValidationError:
            raise _invalid(f"batch[{i}] must be a CloudEvent (a JSON object)") from None
        events.append(_from_object(obj, f"batch[{i}]: "))
    return events


def _decode(body: bytes, decode: Any, shape: str) -> Any:
    try:
        value = decode_body(body, decode)
    except ApiError as exc:
        if exc.error == "invalid_field":  # valid JSON of another shape
            raise _invalid(f"the request body must be {shape}") from None
        raise
    try:
        body.decode()  # msgspec does not read the strings inside `data`
    except UnicodeDecodeError:
        raise ApiError(400, "malformed_json", "the request body is not UTF-8; JSON must be "
                       "sent as UTF-8 (bytes go in data_base64)") from None
    return value


def _from_object(obj: dict[str, msgspec.Raw], where: str) -> EventIn:
    attrs: dict[str, str | int | bool] = {}
    for name, given in obj.items():
        if name in ("data", "data_base64"):
            continue
        _check_name(name, f"{where}attribute {name[:60]!r}")
        try:
            value = (_decode_string if name in _STRINGS else _decode_extension)(given)
        except msgspec.ValidationError:
            what = "a string" if name in _STRINGS else "a string, an integer or a boolean"
            raise _invalid(f"{where}attribute {name[:60]!r} must be {what}, not "
                           f"{_kind(given)}") from None
        if isinstance(value, float):
            if not value.is_integer():
                raise _invalid(f"{where}attribute {name[:60]!r} must be a string, a 32-bit "
                               f"integer or a boolean, not {value}")
            value = int(value)
        if value is not None:  # null: absent
            attrs[name] = value
    ct = attrs.get("datacontenttype")
    data = b""
    default = "application/octet-stream"
    raw = obj.get("data")
    b64 = obj.get("data_base64")
    if raw is not None and b64 is not None:
        raise _invalid(f"{where}give either data or data_base64, not both")
    if raw is not None and bytes(raw) != b"null":
        default = JSON
        if isinstance(ct, str) and not is_json_type(ct) and memoryview(raw)[0] == 0x22:
            text: str = _decode_json(raw)  # a string under a non-JSON type is that text
            data = text.encode()
        else:
            data = bytes(raw)
    elif b64 is not None and bytes(b64) != b"null":
        try:
            encoded = _decode_string(b64)
        except msgspec.ValidationError:
            raise _invalid(f"{where}data_base64 must be a string, not {_kind(b64)}") from None
        if encoded is None or not _IS_BASE64.fullmatch(encoded):
            raise _invalid(f"{where}data_base64 is not base64 (the standard alphabet, padded "
                           "with '='); encode the bytes with base64, or send JSON as data")
        data = base64.b64decode(encoded)
    return _event(attrs, data, default, lambda n: f"{where}attribute {n[:60]!r}")


def _binary(ce: list[tuple[bytes, bytes]], content_type: bytes | None, body: bytes) -> EventIn:
    attrs: dict[str, str | int | bool] = {}
    for name, value in ce:
        header = name.decode("latin-1")
        attr = header[3:]
        if attr == "datacontenttype":
            raise _invalid("in binary mode the data's content type is the Content-Type header;"
                           " send it there instead of ce-datacontenttype")
        if attr in ("data", "data_base64"):
            raise _invalid(f"in binary mode the data is the request body; drop header {header}")
        _check_name(attr, f"header {header[:60]}")
        if attr in attrs:
            raise _invalid(f"header {header} is given twice; send each attribute once")
        try:  # percent-encoded UTF-8 (raw UTF-8 is taken too)
            attrs[attr] = unquote(value.decode(), errors="strict")
        except UnicodeDecodeError:
            raise _invalid(f"header {header} is not UTF-8; percent-encode its value as UTF-8 "
                           "(as the CloudEvents HTTP binding says)") from None
    ct = content_type.decode("latin-1").strip() if content_type else ""
    if ct:
        attrs["datacontenttype"] = ct
    if body and ct and is_json_type(ct):  # a JSON type promises JSON: consumers decode it
        decode_body(body)
    return _event(attrs, body, "application/octet-stream",
                  lambda n: "Content-Type" if n == "datacontenttype" else f"header ce-{n}")


def _check_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name):
        raise _invalid(f"{what}: CloudEvents attribute names are lowercase letters and digits "
                       "(a-z, 0-9) only")
    if name.startswith(_OWN):
        raise _invalid(f"{what}: attribute names starting with {_OWN!r} are the gateway's own "
                       "(tidingsposition, tidingsackid, …); rename the extension")


def _event(attrs: dict[str, str | int | bool], data: bytes, default_type: str,
           where: Callable[[str], str]) -> EventIn:
    """The checks both modes share, then the envelope."""
    for name in _REQUIRED:
        if name not in attrs:
            raise _invalid(f"{where(name)} is missing; CloudEvents 1.0 requires specversion, "
                           "id, source and type (in binary mode as the headers ce-specversion, "
                           "ce-id, ce-source and ce-type)")
    if attrs["specversion"] != "1.0":
        raise _invalid(f"{where('specversion')} is {str(attrs['specversion'])[:20]!r}; this "
                       "gateway takes CloudEvents 1.0: send specversion \"1.0\"")
    text: dict[str, str] = {}  # every attribute as a string, checked
    for name, value in attrs.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int):
            if not INT32[0] <= value <= INT32[1]:
                raise _invalid(f"{where(name)} is out of range; a CloudEvents Integer is 32-bit "
                               f"({INT32[0]} to {INT32[1]}); send larger numbers as strings")
            value = str(value)
        elif _CONTROL.search(value):
            raise _invalid(f"{where(name)} holds a control character, which CloudEvents "
                           "strings may not; escape or remove it")
        if not value and name in _NON_EMPTY:
            raise _invalid(f"{where(name)} is empty; give it a value or leave it out")
        if name in ("id", "partitionkey") and len(value) > MAX_ID:
            raise _invalid(f"{where(name)} is {len(value)} characters; at most {MAX_ID} are "
                           "stored")
        if name == "id" and value.startswith("$"):
            raise _invalid(f"{where(name)} starts with '$', which tidings keeps for itself "
                           "(redrive); use an id that does not")
        if name == "time" and not valid_time(value):
            raise _invalid(f"{where(name)} {value[:60]!r} is not an RFC 3339 timestamp; send "
                           "e.g. 2024-05-01T12:00:00Z or 2024-05-01T14:00:00.5+02:00")
        text[name] = value
    headers = {f"ce-{name}": value for name, value in text.items() if name not in _ENVELOPE}
    headers["content-type"] = text.get("datacontenttype", default_type)
    return EventIn(text["id"], text.get("partitionkey"), headers, data)


def _kind(raw: msgspec.Raw) -> str:
    first = bytes(raw)[:1]
    return {b"{": "an object", b"[": "an array", b'"': "a string", b"t": "a boolean",
            b"f": "a boolean", b"n": "null"}.get(first, "a number")


# --- out --------------------------------------------------------------------------------

def negotiate(accept: str | None) -> str:
    """What a pull answers with: `JSON` (the default), `STRUCTURED` or `BATCH`; the supported
    media type of the highest quality in `accept`, the first listed on a tie."""
    if not accept or "cloudevents" not in accept.lower():
        return JSON  # the common case, without parsing
    best, best_q = JSON, 0.0
    for part in accept.split(","):
        media, _, params = part.partition(";")
        kind = {STRUCTURED: STRUCTURED, BATCH: BATCH, JSON: JSON, "*/*": JSON,
                "application/*": JSON}.get(media.strip().lower())
        if kind is None:
            continue
        q = 1.0
        for param in params.split(";") if params else ():
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":  # not a quality value: as if refused
                q = float(value.strip()) if _Q.fullmatch(value.strip()) else 0.0
        if q > best_q:
            best, best_q = kind, q
    return best


def _time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def cloudevent_out(m: Message, ack_id: str | None = None) -> dict[str, Any]:
    """`m` as a structured CloudEvent. tidings' own fields are the extensions tidingstopic,
    tidingsposition and, for a pulled message, tidingsattempt and tidingsackid."""
    h = m.headers
    out: dict[str, Any] = {"specversion": "1.0", "id": m.id,
                           "source": h.get("ce-source") or f"/tidings/{m.topic}",
                           "type": h.get("ce-type") or m.topic}
    time = h.get("ce-time")
    out["time"] = time if time is not None and valid_time(time) else _time(m.timestamp)
    for name, value in h.items():
        if name.startswith("ce-"):
            attr = name[3:]
            if attr not in out and attr not in _NOT_FROM_HEADERS and _NAME.fullmatch(attr) \
                    and not attr.startswith(_OWN) and (value or attr not in _NON_EMPTY):
                out[attr] = value
    ct = h.get("content-type")
    if ct:
        out["datacontenttype"] = ct
    if m.key is not None:
        out["partitionkey"] = m.key
    out["tidingstopic"] = m.topic
    out["tidingsposition"] = m.position
    if ack_id is not None:
        out["tidingsattempt"] = m.attempt
        out["tidingsackid"] = ack_id
    if m.data:  # no data: an event without data
        _data_out(out, m.data, ct or "")
    return out


def _data_out(out: dict[str, Any], data: bytes, ct: str) -> None:
    """JSON as JSON, text as a string, anything else (or what is not what its type says,
    or JSON nested deeper than a request may be) as base64."""
    media = ct.partition(";")[0].strip().lower()
    try:
        if is_json_type(media):
            if not too_deep(data):
                out["data"] = _decode_json(data)
                return
        elif media.startswith("text/") or media == "application/xml" or media.endswith("+xml"):
            out["data"] = data.decode()
            return
    except (msgspec.DecodeError, UnicodeDecodeError):
        pass
    out["data_base64"] = base64.b64encode(data).decode()


# --- the JSON Schema of what `events_in` takes, for the OpenAPI document -------------------

def schemas(ack_id_pattern: str) -> dict[str, Any]:
    """`CloudEvent` and `CloudEventBatch` (accepted), `CloudEventOut` (emitted)."""
    text = {"type": "string", "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"}
    required = {**text, "minLength": 1}
    optional = {**required, "type": ["string", "null"]}
    event = {
        "type": "object", "required": list(_REQUIRED),
        "description": "a CloudEvent 1.0 in the JSON format: id is the message id (a repeat "
                       "is not stored), partitionkey the key, datacontenttype the content-type "
                       "header, every other attribute x the header ce-x",
        "properties": {
            "specversion": {"const": "1.0"},
            "id": {**required, "maxLength": MAX_ID,  # ('$' ids are tidings' own)
                   "pattern": "^[^$\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"},
            "source": required, "type": required,
            "subject": optional, "dataschema": optional, "datacontenttype": optional,
            "partitionkey": {**optional, "maxLength": MAX_ID},
            "time": {"type": ["string", "null"], "format": "date-time"},
            "data": {"description": "any JSON value; JSON as sent when datacontenttype is JSON "
                                    "(the default), else a string's text"},
            "data_base64": {"type": ["string", "null"], "pattern": f"^{_BASE64}$"},
        },
        "propertyNames": {"pattern": "^([a-z0-9]+|data_base64)$", "not": {"pattern": "^tidings"}},
        "additionalProperties": {"type": ["string", "integer", "boolean", "null"],
                                 "pattern": text["pattern"],
                                 "minimum": INT32[0], "maximum": INT32[1]},
        "not": {"required": ["data", "data_base64"]},
    }
    out = {
        "type": "object", "required": [*_REQUIRED, "time", "tidingstopic", "tidingsposition"],
        "additionalProperties": {"type": "string"},
        "properties": {
            "specversion": {"const": "1.0"}, "id": {"type": "string"},
            "source": {"type": "string"}, "type": {"type": "string"},
            "time": {"type": "string"}, "data": {}, "data_base64": {"type": "string"},
            "tidingstopic": {"type": "string"}, "tidingsposition": {"type": "integer"},
            "tidingsattempt": {"type": "integer"},
            "tidingsackid": {"type": "string", "pattern": f"^{ack_id_pattern}$"},
        },
    }
    return {"CloudEvent": event,
            "CloudEventBatch": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                                "items": {"$ref": "#/components/schemas/CloudEvent"}},
            "CloudEventOut": out}
