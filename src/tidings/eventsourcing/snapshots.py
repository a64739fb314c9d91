"""Snapshots: an aggregate's state at a version, stored apart from its events (pure code).

A snapshot carries a schema tag: the aggregate's `schema_version` plus a
fingerprint of its declared fields. A snapshot whose tag differs from the
class's current one is never applied; loading then replays from events.
"""

from __future__ import annotations

import hashlib
import typing
from typing import Any

import msgspec

from ..errors import DecodeError
from .aggregate import Aggregate, _is_classvar

__all__ = ["capture", "restore", "schema_of"]

_RESERVED = frozenset({"id", "version"})
_enc = msgspec.json.Encoder().encode
_CACHE: dict[type, tuple[str, type | None, frozenset[str]]] = {}


def _type_repr(hint: object) -> str:
    if isinstance(hint, str):
        return hint
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__qualname__
    return repr(hint).replace("typing.", "")


def _info(cls: type[Aggregate]) -> tuple[str, type | None, frozenset[str]]:
    """(schema tag, typed state struct or None, typed field names) of an aggregate class."""
    info = _CACHE.get(cls)
    if info is not None:
        return info
    raw: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or klass is Aggregate:
            continue
        for name, hint in klass.__dict__.get("__annotations__", {}).items():
            if not name.startswith("_") and name not in _RESERVED and not _is_classvar(hint):
                raw[name] = hint
    shape = ";".join(f"{n}:{_type_repr(h)}" for n, h in sorted(raw.items()))
    tag = f"{cls.schema_version}:{hashlib.sha1(shape.encode()).hexdigest()[:12]}"
    struct: type | None = None
    try:
        hints = typing.get_type_hints(cls)
        fields = [(n, hints[n] | msgspec.UnsetType, msgspec.UNSET) for n in raw]
        struct = msgspec.defstruct(f"{cls.__name__}State", fields, omit_defaults=True)
    except Exception:  # noqa: BLE001 - unresolvable hints: keep the state untyped
        struct = None
    info = (tag, struct, frozenset(raw) if struct is not None else frozenset())
    _CACHE[cls] = info
    return info


def schema_of(cls: type[Aggregate]) -> str:
    """The schema tag snapshots of `cls` are written and read with."""
    return _info(cls)[0]


def capture(agg: Aggregate) -> bytes:
    """The aggregate's state (its public attributes) as snapshot bytes."""
    _, struct, typed = _info(type(agg))
    known: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in vars(agg).items():
        if k.startswith("_") or k in _RESERVED:
            continue
        (known if k in typed else extra)[k] = v
    try:
        return _enc([known, extra])
    except (TypeError, msgspec.EncodeError) as exc:
        raise DecodeError(
            f"cannot snapshot {type(agg).__name__} {agg.id!r}: its state is not encodable "
            f"({exc}); keep aggregate state to JSON-able values, Structs and dataclasses"
        ) from None


def restore(agg: Aggregate, data: bytes) -> None:
    """Set the aggregate's state from snapshot bytes written by `capture` with the same schema."""
    struct: Any = _info(type(agg))[1]
    if struct is None:
        known, extra = msgspec.json.decode(data, type=tuple[dict[str, Any], dict[str, Any]])
        items = {**known, **extra}
    else:
        state, extra = msgspec.json.decode(data, type=tuple[struct, dict[str, Any]])
        items = {f: getattr(state, f) for f in state.__struct_fields__
                 if getattr(state, f) is not msgspec.UNSET}
        items.update(extra)
    for k, v in items.items():
        setattr(agg, k, v)
