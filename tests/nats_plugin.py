"""pytest plugin: a NATS JetStream server for the session, a fresh stream per test.

- `nats_server` (session): a `NatsService` — `TIDINGS_TEST_NATS_URL` when set, else a
  throwaway `nats-server` (tests/natsserver.py) on a free port. When neither is
  possible the tests that use it skip, or fail under `TIDINGS_REQUIRE_SERVICES=1`.
- `nats_url` (function): a URL naming a fresh, empty stream (`?stream=t…`).

`nats_server.url_for(key)` gives the same URL for the same key (the contract suite keys
it by the test's directory).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from tests.natsserver import NatsServer, NatsServerUnavailable
from tests.pg_plugin import unavailable

__all__ = ["NatsService", "nats_server", "nats_url"]

ENV_URL = "TIDINGS_TEST_NATS_URL"


class NatsService:
    def __init__(self, base_url: str, server: NatsServer | None) -> None:
        self.base_url = base_url
        self.server = server
        self._by_key: dict[Any, str] = {}

    def new_url(self) -> str:
        return f"{self.base_url}?stream=t{uuid.uuid4().hex[:12]}"

    def url_for(self, key: Any) -> str:
        url = self._by_key.get(key)
        if url is None:
            url = self._by_key[key] = self.new_url()
        return url


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsService]:
    try:
        import nats  # noqa: F401
    except ImportError:
        unavailable("nats-py is not installed (pip install 'tidings[nats]')")
    external = os.environ.get(ENV_URL)
    if external:
        yield NatsService(external, None)
        return
    try:
        server = NatsServer().start()
    except (NatsServerUnavailable, OSError) as exc:
        unavailable(f"NATS unavailable: {exc}")
        raise AssertionError("unreachable") from exc
    try:
        yield NatsService(server.url, server)
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsService) -> str:
    return nats_server.new_url()
