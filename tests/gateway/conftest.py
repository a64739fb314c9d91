"""A live gateway for the tests: uvicorn on a real free port, in its own thread and event loop.

The tests talk to it over TCP like any client (httpx, schemathesis, a
browser); `server.call(fn)` runs `await fn(hub)` on the server's loop when a
test needs to look behind the API.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

import tidings
from tidings.gateway import create_app
from tidings.gateway.server import GatewayServer, uvicorn_config

T = TypeVar("T")


class LiveServer:
    """`create_app(hub, **options)` served on 127.0.0.1:<free port> until `stop()`."""

    def __init__(self, url: str, *, connect: dict[str, Any] | None = None,
                 **options: Any) -> None:
        self.url = url
        self.connect = connect or {}  # options for tidings.connect (telemetry=, …)
        self.options = options
        self.loop: asyncio.AbstractEventLoop | None = None
        self.hub: tidings.Hub | None = None
        self.app: Any = None
        self._server: GatewayServer | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        async with await tidings.connect(self.url, **self.connect) as hub:
            self.hub = hub
            self.app = create_app(hub, **self.options)
            self._server = GatewayServer(uvicorn_config(self.app, log_level="warning"))
            serving = asyncio.create_task(self._server.serve(sockets=[self._sock]))
            while not self._server.started and not serving.done():  # noqa: ASYNC110 - uvicorn only has a flag
                await asyncio.sleep(0.01)
            self._ready.set()
            await serving

    def start(self) -> LiveServer:
        self._thread.start()
        if not self._ready.wait(20) or self._error is not None:
            raise RuntimeError(f"the gateway did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(20)
        self._sock.close()
        assert not self._thread.is_alive(), "the gateway did not stop"

    def call(self, fn: Callable[[tidings.Hub], Awaitable[T]], timeout: float = 20) -> T:
        """Run `await fn(hub)` on the server's event loop and return its result."""
        assert self.loop is not None and self.hub is not None
        hub = self.hub

        async def run() -> T:
            return await fn(hub)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    @property
    def gateway(self) -> Any:
        return self.app.state.gateway

    def client(self, **kw: Any) -> httpx.Client:
        kw.setdefault("timeout", 20.0)
        return httpx.Client(base_url=self.base_url, **kw)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/gateway.db"


@pytest.fixture
def start_server(db_url: str) -> Iterator[Callable[..., LiveServer]]:
    """`start_server(**create_app_options)`; every server started is stopped at teardown."""
    servers: list[LiveServer] = []

    def start(url: str | None = None, **options: Any) -> LiveServer:
        s = LiveServer(url or db_url, **options).start()
        servers.append(s)
        return s

    yield start
    for s in reversed(servers):
        s.stop()


@pytest.fixture
def server(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server()


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
