"""pytest plugin: a PostgreSQL server for the session, a fresh schema per test.

Fixtures:

- `postgres_server` (session): a `PgService` — `TIDINGS_TEST_POSTGRES_URL` when
  set, else a throwaway server started here from the machine's binaries
  (`tests/pgserver.py`) and removed at the end. When neither is possible the
  tests that use it are skipped with the reason, unless
  `TIDINGS_REQUIRE_SERVICES=1`, which turns the skip into a failure.
- `postgres_url` (function): a URL to a fresh, empty schema on that server
  (`?schema=t_…`), so tests never see each other's data.

`postgres_server.url_for(key)` gives the same fresh URL for the same key (the
contract suite keys it by the test's directory, so `engine.url` is stable
within a test and `engine.fresh_url(name)` is another empty store).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from tests.pgserver import FAST, PgServer, PgServerUnavailable

__all__ = ["PgService", "needs", "postgres_server", "postgres_url", "unavailable"]

ENV_URL = "TIDINGS_TEST_POSTGRES_URL"
ENV_REQUIRE = "TIDINGS_REQUIRE_SERVICES"


def with_schema(url: str, schema: str) -> str:
    """`url` with `schema=` set in its query string (other parameters kept)."""
    parts = urlsplit(url)
    query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("schema="))
    query = f"{query}&schema={schema}" if query else f"schema={schema}"
    return urlunsplit(parts._replace(query=query))


class PgService:
    """The session's PostgreSQL: a base URL, fresh schemas, and the server (if ours)."""

    def __init__(self, base_url: str, server: PgServer | None) -> None:
        self.base_url = base_url
        #: The throwaway server, or None when the URL came from the environment
        #: (tests that restart the server skip then).
        self.server = server
        self.schemas: list[str] = []
        self._by_key: dict[Any, str] = {}

    def new_url(self) -> str:
        """A URL to a new, empty schema."""
        schema = f"t_{uuid.uuid4().hex[:12]}"
        self.schemas.append(schema)
        return with_schema(self.base_url, schema)

    def url_for(self, key: Any) -> str:
        """The same fresh URL for the same `key` (e.g. a test's tmp directory)."""
        url = self._by_key.get(key)
        if url is None:
            url = self._by_key[key] = self.new_url()
        return url

    def drop_schemas(self) -> None:
        if not self.schemas:
            return
        import asyncpg

        async def drop() -> None:
            conn = await asyncpg.connect(self.base_url, timeout=10)
            try:
                for s in self.schemas:
                    with contextlib.suppress(Exception):
                        await conn.execute(f'DROP SCHEMA IF EXISTS "{s}" CASCADE')
            finally:
                await conn.close()

        with contextlib.suppress(Exception):
            asyncio.run(drop())


def unavailable(reason: str) -> None:
    """Skip the test for a missing service or package, or fail it when everything is
    required (`TIDINGS_REQUIRE_SERVICES=1`, as CI sets it)."""
    if os.environ.get(ENV_REQUIRE) == "1":
        pytest.fail(f"required ({ENV_REQUIRE}=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def needs(module: str, reason: str = "") -> Any:
    """`pytest.importorskip`, except that under `TIDINGS_REQUIRE_SERVICES=1` a missing
    module fails the test (a skipped test proves nothing)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        unavailable(f"{module} is not installed ({exc}){': ' + reason if reason else ''}")


def _unavailable(reason: str) -> None:
    unavailable(f"PostgreSQL unavailable: {reason}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgService]:
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        _unavailable("asyncpg is not installed (pip install 'tidings[postgres]')")
    external = os.environ.get(ENV_URL)
    if external:
        service = PgService(external, None)
        yield service
        service.drop_schemas()
        return
    try:
        server = PgServer(settings=dict(FAST))
        server.start()
    except (PgServerUnavailable, OSError) as exc:
        _unavailable(str(exc))
        raise AssertionError("unreachable") from exc
    try:
        yield PgService(server.url(), server)
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PgService) -> str:
    """A URL to a fresh, empty schema on the session's PostgreSQL server."""
    return postgres_server.new_url()
