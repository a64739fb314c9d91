"""Aggregates: state rebuilt from events; commands validate, then record new events."""

from __future__ import annotations

import copy
import typing
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InvalidArgument
from ..messages import new_id
from .events import TypeResolver, encode_event, event_type_name, types_near
from .records import NewEvent, check_stream_id

if TYPE_CHECKING:
    from .repository import Repository

__all__ = ["Aggregate", "aggregate_class"]

_IMMUTABLE = (int, float, str, bytes, bool, type(None), tuple, frozenset)
_CLASSES: dict[str, type[Aggregate]] = {}


class Aggregate:
    """An event-sourced entity: `Account("a-1")` is a new aggregate with id "a-1", version 0.

    Subclasses declare state as annotated class attributes with defaults
    (copied per instance), implement `apply(event)` as a pure state
    transition (used both when recording and when replaying), and write
    command methods that validate and then call `record(event)`. A subclass
    must be constructible as `Cls(id)`.

    Class settings: `schema_version` (bump it when the meaning of the state
    changes, so older snapshots are ignored), `event_topic` (the topic its
    events are published on; default: the class name), `event_types` (event
    classes to decode, besides those defined in the class's module).
    """

    schema_version: ClassVar[int] = 1
    event_topic: ClassVar[str | None] = None
    event_types: ClassVar[tuple[type, ...]] = ()

    id: str
    version: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _CLASSES[cls.__name__] = cls
        cls._resolver = None  # type: ignore[attr-defined]

    def __init__(self, id: str) -> None:
        if not callable(getattr(type(self), "apply", None)):
            raise InvalidArgument(
                f"{type(self).__name__} must define apply(self, event), the pure state "
                "transition used when recording and replaying its events"
            )
        self.id = check_stream_id(id)
        self.version = 0
        self._pending: list[NewEvent] = []
        self._repository: Repository[Any] | None = None  # set when loaded by one
        for name, default in _defaults(type(self)).items():
            setattr(self, name, default if isinstance(default, _IMMUTABLE)
                    else copy.deepcopy(default))

    if TYPE_CHECKING:
        # Each subclass defines it (checked when one is instantiated, see __init__).
        def apply(self, event: Any) -> None:
            """Change the state for one event. Pure: no I/O, no clock, no randomness."""

    def record(self, event: object, *, headers: dict[str, str] | None = None) -> None:
        """Apply a new event and queue it for the next `repository.save`.

        If `apply` raises, nothing is recorded.
        """
        encoded = encode_event(event)  # validates now, not at save time
        try:
            self.apply(event)
        except BaseException:
            # it may have changed part of the state: never load copies of this object
            # (see EventStore.kept)
            self._unsound = True
            raise
        self.version += 1
        new = NewEvent(event, id=new_id(), headers=headers)
        new._encoded = encoded
        self._pending.append(new)
        _resolver_of(type(self)).add(encoded[0], encoded[1])

    @property
    def pending_events(self) -> list[Any]:
        """Events recorded since the last save (or load), oldest first."""
        return [p.event for p in self._pending]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} version {self.version}>"


def _defaults(cls: type) -> dict[str, Any]:
    cached = cls.__dict__.get("_tidings_defaults")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or klass is Aggregate:
            continue
        for name, hint in klass.__dict__.get("__annotations__", {}).items():
            if name.startswith("_") or _is_classvar(hint):
                continue
            if name in klass.__dict__:
                out[name] = klass.__dict__[name]
    cls._tidings_defaults = out  # type: ignore[attr-defined]
    return out


def _is_classvar(hint: object) -> bool:
    if isinstance(hint, str):
        return hint.startswith(("ClassVar", "typing.ClassVar"))
    return typing.get_origin(hint) is ClassVar or hint is ClassVar


def _resolver_of(cls: type[Aggregate]) -> TypeResolver:
    r: TypeResolver | None = cls.__dict__.get("_resolver")
    if r is None:
        local = types_near(cls)
        for t in cls.event_types:
            local[event_type_name(t)] = t
        r = TypeResolver(local)
        cls._resolver = r  # type: ignore[attr-defined]
    return r


def aggregate_class(name: str) -> type[Aggregate] | None:
    """The most recently defined Aggregate subclass called `name` (for tools like the CLI)."""
    return _CLASSES.get(name)
