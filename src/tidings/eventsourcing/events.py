"""Event types: the `Event` base, the type registry, encoding and upcasting.

A stored event is its type name, its type version and JSON bytes. Reading
turns those back into an instance of the registered class; when the stored
version is older than the class's, registered upcasters bring the data up to
date first. Stored bytes are never rewritten.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import msgspec

from ..errors import DecodeError, InvalidEvent, UnknownEventType

__all__ = [
    "Event",
    "TypeResolver",
    "event_type_name",
    "event_type_version",
    "register_event",
    "upcaster",
]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_encode = msgspec.json.Encoder().encode
_decode_any = msgspec.json.Decoder().decode

#: type name -> class, for every registered event class (last definition wins).
_TYPES: dict[str, type] = {}
#: (type name, from_version) -> function turning that version's data into the next one's.
_UPCASTERS: dict[tuple[str, int], Upcaster] = {}
_DECODERS: dict[type, Callable[[bytes], Any]] = {}
#: class -> (type name, version, decoder) for classes already encoded once.
_KNOWN: dict[type, tuple[str, int, Callable[[bytes], Any]]] = {}
#: class -> (type name, version) of events built only by tidings itself with values of
#: the right types (the saga coordinator's): encoded without the checking round trip
TRUSTED: dict[type, tuple[str, int]] = {}
#: Bumped on every registration, so cached decoders never outlive a change.
_GENERATION = [0]


class _EventMeta(msgspec.StructMeta):
    """Makes every `Event` subclass keyword-only and registers it by type name."""

    def __new__(mcls, name: str, bases: tuple[type, ...], ns: dict[str, Any],
                **kwargs: Any) -> Any:
        kwargs.setdefault("kw_only", True)
        cls = super().__new__(mcls, name, bases, ns, **kwargs)
        if bases and any(isinstance(b, _EventMeta) for b in bases):
            register_event(cls)
        return cls


class Event(msgspec.Struct, metaclass=_EventMeta):
    """Base class for typed events: a keyword-only `msgspec.Struct`, registered by class name.

    Set `event_version = 2` (a plain class attribute) when the shape changes and
    register an `upcaster` for the old version; set `event_type = "..."` to store
    the type under another name than the class name.
    """

    event_version: ClassVar[int] = 1


def event_type_name(cls: type) -> str:
    """The name an event class is stored under (its own `event_type`, else its class name)."""
    name = cls.__dict__.get("event_type")
    return name if isinstance(name, str) and name else cls.__name__


def event_type_version(cls: type) -> int:
    version = getattr(cls, "event_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidEvent(f"{cls.__name__}.event_version must be an int >= 1, got {version!r}")
    return version


def _is_event_class(obj: object) -> bool:
    if not isinstance(obj, type) or obj is Event or obj is msgspec.Struct:
        return False
    return (issubclass(obj, msgspec.Struct) or dataclasses.is_dataclass(obj)
            or hasattr(obj, "model_validate_json"))


def register_event(cls: type) -> type:
    """Register an event class (msgspec.Struct, dataclass or pydantic model) by type name.

    `tidings.Event` subclasses register themselves; other classes are
    registered when first appended, or with this function (usable as a
    decorator) so that a process that only reads can decode them.
    """
    if not _is_event_class(cls):
        raise InvalidEvent(
            f"{cls!r} is not an event class; use a tidings.Event subclass, a msgspec.Struct, "
            "a dataclass or a pydantic model"
        )
    event_type_version(cls)
    _TYPES[event_type_name(cls)] = cls
    _DECODERS.pop(cls, None)
    _KNOWN.clear()
    _GENERATION[0] += 1
    return cls


def upcaster(type_name: str | type, *, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register `fn(data: dict) -> dict` turning version `from_version` of a type into the next.

    Applied on read, in a chain from the stored version to the class's
    current `event_version`; the stored bytes stay as they were written.
    """
    name = type_name if isinstance(type_name, str) else event_type_name(type_name)
    if not isinstance(from_version, int) or from_version < 1:
        raise InvalidEvent("from_version must be an int >= 1")

    def register(fn: Upcaster) -> Upcaster:
        _UPCASTERS[(name, from_version)] = fn
        _GENERATION[0] += 1
        return fn

    return register


def _decoder(cls: type) -> Callable[[bytes], Any]:
    dec = _DECODERS.get(cls)
    if dec is None:
        validate = getattr(cls, "model_validate_json", None)
        dec = validate if validate is not None else msgspec.json.Decoder(cls).decode
        _DECODERS[cls] = dec
    return dec


def _convert(cls: type, value: Any) -> Any:
    validate = getattr(cls, "model_validate", None)
    if validate is not None:
        return validate(value)
    return msgspec.convert(value, cls)


def encode_event(event: object) -> tuple[type, str, int, bytes]:
    """(class, type name, type version, JSON bytes) of a typed event.

    The bytes are validated by decoding them back with the class, so a field
    holding a value of the wrong type is refused here, before anything is stored.
    """
    cls = type(event)
    info = _KNOWN.get(cls)
    if info is None:
        if not _is_event_class(cls):
            raise InvalidEvent(
                f"cannot record a {cls.__name__} as an event; use a tidings.Event subclass, "
                "a msgspec.Struct, a dataclass or a pydantic model"
            )
        name = event_type_name(cls)
        if _TYPES.get(name) is not cls:
            register_event(cls)
        info = _KNOWN[cls] = (name, event_type_version(cls), _decoder(cls))
    try:
        dump = getattr(event, "model_dump_json", None)
        data = dump().encode() if dump is not None else _encode(event)
        info[2](data)
    except (TypeError, ValueError, msgspec.EncodeError, msgspec.DecodeError) as exc:
        raise InvalidEvent(
            f"{cls.__name__} does not match its declared field types ({exc}); fix the values "
            "passed to the event"
        ) from None
    return cls, info[0], info[1], data


def trust_events(*classes: type) -> None:
    """Mark event classes tidings builds itself (never from user values of unchecked
    type): recording them skips `encode_event`'s validating decode."""
    for cls in classes:
        TRUSTED[cls] = (event_type_name(cls), event_type_version(cls))


def validate_raw(type_name: str, data: bytes) -> int:
    """Check raw JSON against the registered class of `type_name`; returns its version.

    An unregistered type is accepted when the data is a JSON object (a
    process that only stores events need not know every class).
    """
    cls = _TYPES.get(type_name)
    try:
        if cls is None:
            if not isinstance(_decode_any(data), dict):
                raise InvalidEvent(f"event data of type {type_name!r} must be a JSON object")
            return 1
        _decoder(cls)(data)
    except (msgspec.DecodeError, ValueError) as exc:
        if isinstance(exc, InvalidEvent):
            raise
        raise InvalidEvent(
            f"event data does not match type {type_name!r}: {exc}; send the fields the "
            "type declares"
        ) from None
    return event_type_version(cls)


class TypeResolver:
    """Finds the class for a stored type name: local types first, then the registry.

    Keeps one ready decoder per (type, stored version), dropped whenever a
    class or an upcaster is registered.
    """

    __slots__ = ("_cache", "_generation", "local")

    def __init__(self, local: Mapping[str, type] | None = None) -> None:
        self.local: dict[str, type] = dict(local or {})
        self._cache: dict[tuple[str, int], Callable[[bytes], Any]] = {}
        self._generation = _GENERATION[0]

    def add(self, cls: type, name: str) -> None:
        """Prefer `cls` for type `name` (unless a local class has that name already)."""
        if name not in self.local:
            self.local[name] = cls
            self._cache.clear()

    def find(self, type_name: str) -> type | None:
        return self.local.get(type_name) or _TYPES.get(type_name)

    def decode(self, type_name: str, version: int, data: bytes, stream_id: str) -> Any:
        """The typed event, upcast from `version` when the class has moved on."""
        if self._generation != _GENERATION[0]:
            self._cache.clear()
            self._generation = _GENERATION[0]
        dec = self._cache.get((type_name, version))
        if dec is None:
            dec = self._cache[(type_name, version)] = self._decoder(type_name, version,
                                                                    stream_id)
        try:
            return dec(data)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            if isinstance(exc, DecodeError):
                raise
            cls = self.find(type_name)
            raise DecodeError(
                f"cannot decode {type_name!r} version {version} in stream {stream_id!r} as "
                f"{getattr(cls, '__name__', cls)}: {exc}; register an upcaster or read raw "
                "with raw=True"
            ) from None

    def _decoder(self, type_name: str, version: int, stream_id: str) -> Callable[[bytes], Any]:
        cls = self.find(type_name)
        if cls is None:
            err = UnknownEventType(
                f"stream {stream_id!r} holds an event of type {type_name!r}, which has no "
                "registered class; import or define it (a tidings.Event subclass, or "
                "tidings.register_event(cls)), or read raw with read(..., raw=True) and "
                "use rec.data / rec.json()"
            )
            err.type_name = type_name  # type: ignore[attr-defined]
            err.stream_id = stream_id  # type: ignore[attr-defined]
            raise err
        current = getattr(cls, "event_version", 1)
        if version == current:
            return _decoder(cls)
        if version > current:
            raise DecodeError(
                f"stream {stream_id!r} holds {type_name!r} version {version}, newer than "
                f"the class's event_version {current}; deploy the newer class to read it"
            )
        chain = []
        for v in range(version, current):
            up = _UPCASTERS.get((type_name, v))
            if up is None:
                raise DecodeError(
                    f"stream {stream_id!r} holds {type_name!r} version {v}, but no upcaster "
                    f"from version {v} is registered; add @tidings.upcaster({type_name!r}, "
                    f"from_version={v})"
                )
            chain.append(up)

        def upcast(data: bytes) -> Any:
            value = _decode_any(data)
            for up in chain:
                value = up(value)
            return _convert(cls, value)

        return upcast


def module_event_types(*owners: object) -> dict[str, type]:
    """Event classes defined as attributes of `owners` (classes or modules), by type name."""
    found: dict[str, type] = {}
    for owner in owners:
        for value in list(vars(owner).values()):
            if _is_event_class(value):
                found.setdefault(event_type_name(value), value)
    return found


def types_near(cls: type) -> dict[str, type]:
    """Event classes nested in `cls` (and its bases) and defined in their modules."""
    owners: list[object] = []
    for klass in cls.__mro__:
        if klass is object or klass.__module__ == __name__:
            continue
        owners.append(klass)
        module = sys.modules.get(klass.__module__)
        if module is not None and module.__name__ != "tidings.eventsourcing.aggregate":
            owners.append(module)
    return module_event_types(*owners)
