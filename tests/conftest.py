"""Shared fixtures: the engines every contract test runs on, and a connected hub.

To add an engine, append an `EngineCase` to `ENGINES`. A case that needs an
external service builds its URL from a fixture (see `EngineCase.url`) and
carries `pytest.mark.service`, so it can be deselected with `-m "not service"`.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import tidings


def _memory_url(request: pytest.FixtureRequest, directory: Path) -> str:
    return "memory://"


def _sqlite_url(request: pytest.FixtureRequest, directory: Path) -> str:
    return f"sqlite:///{directory}/t.db"


@dataclass(frozen=True)
class EngineCase:
    """One engine the contract suite runs on."""

    id: str
    #: The module that implements it; a failing import fails the tests loudly (no skip).
    module: str
    #: Builds a URL for a fresh, empty store in `directory` (may use fixtures via `request`).
    url: Callable[[pytest.FixtureRequest, Path], str]
    #: True when a new `connect()` to the same URL sees what an earlier one stored.
    durable: bool
    #: True when the engine is a SQL database (database-level guards such as triggers).
    sql: bool = True
    #: True when the engine holds event streams (and so projections and sagas).
    events: bool = True
    marks: tuple[pytest.MarkDecorator, ...] = field(default_factory=tuple)


ENGINES: list[EngineCase] = [
    EngineCase("memory", "tidings.engines.memory", _memory_url, durable=False, sql=False),
    EngineCase("sqlite", "tidings.engines.sqlite", _sqlite_url, durable=True),
    # A fresh schema per directory (tests/pg_plugin.py), so `engine.url` is stable within a
    # test and `engine.fresh_url(name)` is another empty store.
    EngineCase("postgres", "tidings.engines.postgres",
               lambda request, d: request.getfixturevalue("postgres_server").url_for(d),
               durable=True, marks=(pytest.mark.service,)),
    # A fresh stream per directory (tests/nats_plugin.py). Messages only: no event store.
    EngineCase("nats", "tidings.engines.jetstream",
               lambda request, d: request.getfixturevalue("nats_server").url_for(d),
               durable=True, sql=False, events=False, marks=(pytest.mark.service,)),
    # SQLite for state and the outbox, NATS for every message (engines/brokered.py).
    EngineCase("sqlite+nats", "tidings.engines.brokered",
               lambda request, d: f"sqlite:///{d}/t.db?broker="
               + request.getfixturevalue("nats_server").url_for(d),
               durable=True, sql=False, marks=(pytest.mark.service,)),
    EngineCase("postgres+nats", "tidings.engines.brokered",
               lambda request, d: request.getfixturevalue("postgres_server").url_for(d)
               + "&broker=" + request.getfixturevalue("nats_server").url_for(d),
               durable=True, sql=False, marks=(pytest.mark.service,)),
]


@dataclass(frozen=True)
class EngineUnderTest:
    """The engine a test runs on: its case and a URL to a fresh store."""

    case: EngineCase
    request: pytest.FixtureRequest
    directory: Path

    @property
    def id(self) -> str:
        return self.case.id

    @property
    def durable(self) -> bool:
        return self.case.durable

    @property
    def url(self) -> str:
        return self.case.url(self.request, self.directory)

    def fresh_url(self, name: str) -> str:
        """A URL to another fresh, empty store (for tests that need several)."""
        directory = self.directory / name
        directory.mkdir(parents=True, exist_ok=True)
        return self.case.url(self.request, directory)


#: marker -> what an engine case must have for a test carrying it to run on that engine
_NEEDS = {"durable": lambda c: c.durable, "sql_engine": lambda c: c.sql,
          "events": lambda c: c.events}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "durable: needs an engine whose data outlives the hub (not memory://)")
    config.addinivalue_line(
        "markers", "sql_engine: checks a database-level guard (SQL engines only)")
    config.addinivalue_line(
        "markers", "events: needs an engine that holds event streams (not nats://)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out (rather than skip) engine cases a test's markers say it cannot run on."""
    keep, drop = [], []
    for item in items:
        case = getattr(getattr(item, "callspec", None), "params", {}).get("engine")
        unfit = isinstance(case, EngineCase) and any(
            item.get_closest_marker(m) and not fits(case) for m, fits in _NEEDS.items())
        (drop if unfit else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def no_idle_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consumers never look again on their own: only a wake-up can make them fetch."""
    import tidings.pubsub

    monkeypatch.setattr(tidings.pubsub, "IDLE_CHECK", 3600.0)


@pytest.fixture(params=[pytest.param(c, id=c.id, marks=c.marks) for c in ENGINES])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> EngineUnderTest:
    case: EngineCase = request.param
    try:
        importlib.import_module(case.module)
    except ImportError as exc:
        pytest.fail(f"engine {case.id!r}: {case.module} does not import ({exc})", pytrace=False)
    return EngineUnderTest(case, request, tmp_path)


@pytest.fixture
def engine_url(engine: EngineUnderTest) -> str:
    return engine.url


@pytest.fixture
async def hub(engine_url: str) -> AsyncIterator[tidings.Hub]:
    async with await tidings.connect(engine_url) as h:
        yield h


@pytest.fixture
async def open_hub(engine_url: str) -> AsyncIterator[Callable[..., Awaitable[tidings.Hub]]]:
    """`await open_hub(**options)`: another hub on the same store, closed at teardown."""
    hubs: list[tidings.Hub] = []

    async def _open(url: str | None = None, **options: Any) -> tidings.Hub:
        h = await tidings.connect(url or engine_url, **options)
        hubs.append(h)
        return h

    yield _open
    for h in hubs:
        await h.close()



@pytest.fixture
def traced() -> Iterator[tuple[Any, Any]]:
    """(an OpenTelemetry SDK TracerProvider, the in-memory exporter recording its spans)
    for the tracing tests (they check the SDK is installed before using this)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()
