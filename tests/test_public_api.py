"""The public API is small and deliberate: this pins it, so a change to it is a decision."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from tests.pg_plugin import unavailable

import tidings

EXPECTED = [
    "ANY",
    "Aggregate",
    "Buffer",
    "BufferFull",
    "BufferStatistics",
    "ClosedError",
    "Command",
    "ConcurrencyError",
    "DecodeError",
    "EngineUnavailable",
    "Event",
    "EventIdConflict",
    "EventStore",
    "Hub",
    "InvalidArgument",
    "InvalidEvent",
    "InvalidStreamId",
    "InvalidTopic",
    "ManualClock",
    "Message",
    "NO_STREAM",
    "NewEvent",
    "NotFound",
    "Overflow",
    "PayloadTooLarge",
    "Published",
    "RecordedEvent",
    "Rejected",
    "Repository",
    "Saga",
    "SagaRunner",
    "Step",
    "Subscription",
    "SubscriptionConflict",
    "TidingsError",
    "UnknownEventType",
    "Unsupported",
    "__version__",
    "connect",
    "envelope",
    "register_event",
    "upcaster",
]

ERRORS = [
    "BufferFull", "ClosedError", "ConcurrencyError", "DecodeError", "EngineUnavailable",
    "EventIdConflict", "InvalidArgument", "InvalidEvent", "InvalidStreamId", "InvalidTopic",
    "NotFound", "PayloadTooLarge", "Rejected", "SubscriptionConflict", "UnknownEventType",
    "Unsupported",
]


def test_all_is_pinned() -> None:
    assert sorted(tidings.__all__) == sorted(EXPECTED)
    assert len(set(tidings.__all__)) == len(tidings.__all__)


@pytest.mark.parametrize("name", EXPECTED)
def test_every_public_name_imports(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from tidings import {name}", namespace)
    assert namespace[name] is getattr(tidings, name)


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from tidings import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(EXPECTED)


@pytest.mark.parametrize("name", ERRORS)
def test_errors_share_one_hierarchy(name: str) -> None:
    error = getattr(tidings, name)
    assert issubclass(error, tidings.TidingsError)
    assert (error.__doc__ or "").strip(), f"{name} needs a docstring saying when it is raised"


def test_argument_errors_are_value_errors() -> None:
    for error in (tidings.InvalidArgument, tidings.InvalidTopic, tidings.PayloadTooLarge,
                  tidings.DecodeError):
        assert issubclass(error, ValueError)


@pytest.mark.parametrize("name", [n for n in EXPECTED if not n.startswith("_")])
def test_public_classes_and_functions_are_documented(name: str) -> None:
    obj = getattr(tidings, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert (obj.__doc__ or "").strip(), f"tidings.{name} has no docstring"


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(tidings.__path__, "tidings.")
                  if not m.name.endswith("__main__"))


@pytest.mark.parametrize("module", _modules())
def test_every_module_all_names_exist(module: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # an optional extra that is not installed
        if exc.name and not exc.name.startswith("tidings"):
            unavailable(f"{module} needs {exc.name}")
        raise
    for name in getattr(mod, "__all__", []):
        assert hasattr(mod, name), f"{module}.__all__ lists {name!r}, which does not exist"
