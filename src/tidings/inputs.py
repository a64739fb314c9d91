"""Typed inputs: plain data checked against a msgspec Struct, a dataclass or a pydantic model.

A saga's `input=`, a command handler's `input=` (or `Command[T]`) and the
gateway's command bodies meet here. One place says what an input type is,
validates JSON-like data against it (an `InvalidArgument` whose `field` is the
offending JSON path, such as `$.lines[0].quantity`), turns a valid value back
into plain data (defaults filled in), and gives its JSON schema. Pydantic is
imported only when a pydantic model is given.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
from collections.abc import Callable
from typing import Any, TypeVar, cast, get_type_hints

import msgspec
import msgspec.inspect

from .errors import InvalidArgument

__all__ = [
    "KINDS",
    "check_input_type",
    "decodable",
    "input_schema",
    "is_input_type",
    "parameter_type",
    "to_plain",
    "validate",
]

T = TypeVar("T")
#: What an input type may be, for error messages.
KINDS = "a msgspec.Struct, a dataclass or a pydantic model class"
_AT = re.compile(r" - at `(\$[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`$")


def _is_pydantic(tp: object) -> bool:
    return (isinstance(tp, type) and callable(getattr(tp, "model_validate", None))
            and callable(getattr(tp, "model_json_schema", None)))


def is_input_type(tp: object) -> bool:
    """True for a class whose instances are JSON objects: a msgspec Struct (not
    `array_like`), a dataclass or a pydantic model."""
    if not isinstance(tp, type):
        return False
    if issubclass(tp, msgspec.Struct):
        return not tp.__struct_config__.array_like
    return dataclasses.is_dataclass(tp) or _is_pydantic(tp)


def check_input_type(tp: object, what: str) -> type[Any]:
    """`tp` if it is an input type, else an InvalidArgument naming `what` takes it."""
    if not is_input_type(tp):
        raise InvalidArgument(
            f"{what}: input= must be {KINDS} (its instances JSON objects), got {tp!r}"
        )
    assert isinstance(tp, type)
    check_schema(tp, f"{what}: input=")
    return tp


def check_schema(tp: Any, what: str) -> None:
    """InvalidArgument (`what` names the argument) unless `tp` has a JSON schema: checked
    when the type is given, not on the first request for a document that shows it."""
    try:
        input_schema(tp, "check.")
    except Exception as exc:  # noqa: BLE001 - msgspec/pydantic say why in their own words
        raise InvalidArgument(f"{what} {getattr(tp, '__name__', tp)} has no JSON schema "
                              f"({exc}); give its fields JSON types (or types "
                              "msgspec/pydantic know)") from None


def decodable(tp: object) -> bool:
    """True when message data can be decoded as `tp` (`Message.decode(tp)`)."""
    if tp is bytes or tp is str or _is_pydantic(tp):
        return True
    try:
        info = msgspec.inspect.type_info(tp)
    except TypeError:
        return False
    # (a class msgspec does not know, `object` too, would need a decoding hook)
    return not isinstance(info, msgspec.inspect.CustomType)


#: Annotations that mean "no input type" even when they cannot be resolved (the names
#: imported only under TYPE_CHECKING, as linters arrange them).
_UNTYPED = frozenset({"Message", "tidings.Message", "Command", "tidings.Command",
                      "Command[Any]", "tidings.Command[Any]"})


def parameter_type(fn: Callable[..., Any], what: str) -> Any:
    """The type annotating `fn`'s first parameter, resolved (None when it has none);
    InvalidArgument naming `what` when it names something undefined."""
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].annotation is inspect.Parameter.empty:
        return None
    first = params[0]
    # This annotation alone: another one (the return type) may name what cannot be resolved.
    probe = types.SimpleNamespace(__annotations__={first.name: first.annotation},
                                  __globals__=getattr(inspect.unwrap(fn), "__globals__", {}))
    try:
        return get_type_hints(probe)[first.name]
    except Exception as exc:
        text = first.annotation if isinstance(first.annotation, str) else ""
        if text in _UNTYPED:
            # `msg: Message` / `cmd: Command` imported under TYPE_CHECKING only: untyped
            return None
        raise InvalidArgument(
            f"{what}: cannot resolve the annotation {first.annotation!r} of its parameter "
            f"{first.name!r} ({type(exc).__name__}: {exc}); define the types it names at "
            "module level, where annotations are resolved"
        ) from None


def validate(tp: type[T], data: object, what: str) -> T:
    """`data` (plain JSON values, or already a `tp`) as an instance of the input type
    `tp`; an InvalidArgument whose message and `field` name the first field that
    does not fit."""
    if isinstance(data, tp):
        data = to_plain(data)  # re-checked: a Struct's constraints are not checked by __init__
    if _is_pydantic(tp):
        from pydantic import ValidationError

        model: Any = tp
        try:
            return cast("T", model.model_validate(data))
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            first = errors[0]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise _invalid(tp, what, _loc_path(first["loc"]), first["msg"] + more) from None
    try:
        return msgspec.convert(data, tp)
    except msgspec.ValidationError:
        pass  # (rare) 2.0 for an int: fine in JSON; the data is walked only when needed
    try:
        return msgspec.convert(_json_numbers(data), tp)
    except msgspec.ValidationError as exc:
        path, reason = _msgspec_error(str(exc))
        raise _invalid(tp, what, path, reason) from None


def json_decoder(tp: type[T]) -> Callable[[bytes], T] | None:
    """A one-pass JSON decoder straight to `tp` (None for pydantic models): the fast
    path for well-formed input; on any error, `validate` names the field."""
    if _is_pydantic(tp):
        return None
    return msgspec.json.Decoder(tp).decode


def to_plain(value: object) -> Any:
    """A typed value as plain JSON values (dicts, lists, str, numbers, bool, None)."""
    dump = getattr(value, "model_dump", None)
    if dump is not None and not isinstance(value, type):  # a pydantic model
        return dump(mode="json")
    return msgspec.to_builtins(_filled(value))


def _filled(value: Any) -> Any:
    """`value` with its dataclasses as dicts of every field. (A dataclass that msgspec
    decoded holds no attribute for a field left at its default, so `to_builtins`,
    which reads the instance's `__dict__`, would leave the default out.)"""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _filled(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_filled(v) for v in value]
    if isinstance(value, dict):
        return {k: _filled(v) for k, v in value.items()}
    return value


def input_schema(tp: type[Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON schema of input type `tp`: (its schema, the named schemas it refers to).

    Named schemas are referred to as `#/components/schemas/<prefix><name>` (OpenAPI
    3.1), so that types of the same name from different places cannot collide.
    """
    ref = f"#/components/schemas/{prefix}"
    if _is_pydantic(tp):
        model: Any = tp
        schema: dict[str, Any] = dict(model.model_json_schema(ref_template=ref + "{model}"))
        defs: dict[str, Any] = schema.pop("$defs", {})
        return schema, {prefix + k: v for k, v in defs.items()}
    (schema,), defs = msgspec.json.schema_components([tp], ref_template=ref + "{name}")
    return dict(schema), {prefix + k: v for k, v in defs.items()}


def _json_numbers(value: Any) -> Any:
    """`value` with each integral float as an int. JSON does not tell 2 from 2.0 (JSON
    Schema's "integer" takes both), msgspec's int fields take only the first; a float
    field takes either."""
    if isinstance(value, float):  # (exactly representable ones only: |x| <= 2**53)
        return int(value) if value.is_integer() and abs(value) <= 2**53 else value
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_numbers(v) for v in value]
    return value


def _invalid(tp: type[Any], what: str, path: str, reason: str) -> InvalidArgument:
    return InvalidArgument(
        f"{what} is invalid at {path}: {reason}; send the fields of {tp.__name__} "
        "with their declared types",
        field=path,
    )


def _msgspec_error(text: str) -> tuple[str, str]:
    """(the JSON path, the reason) of a msgspec ValidationError's message."""
    at = _AT.search(text)
    path, reason = (at.group(1), text[:at.start()]) if at else ("$", text)
    missing = _MISSING.match(reason)
    if missing:  # the path names the object: name the field that is missing from it
        return f"{path}.{missing.group(1)}", f"required field `{missing.group(1)}` is missing"
    return path, reason


def _loc_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a JSON path: ('lines', 0, 'sku') -> `$.lines[0].sku`."""
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
