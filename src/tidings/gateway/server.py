"""Running the gateway: `serve()` connects a hub and serves the app with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

import uvicorn
from starlette.applications import Starlette

from ..hub import connect
from .app import create_app, load_app
from .auth import check_bind

__all__ = ["GatewayServer", "run", "serve", "uvicorn_config"]


class GatewayServer(uvicorn.Server):
    """A uvicorn server that ends open event streams as soon as shutdown begins.

    uvicorn waits for open connections before it shuts the app down, and an
    SSE stream never ends by itself; without this a Ctrl-C would hang until
    the graceful-shutdown timeout.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        gateway = getattr(getattr(app, "state", None), "gateway", None)
        if gateway is not None:
            gateway.close_streams()
        await super().shutdown(sockets)


def uvicorn_config(app: Starlette, host: str = "127.0.0.1", port: int = 8640,
                   **options: Any) -> uvicorn.Config:
    """The uvicorn settings the gateway runs with (keep-alive, no access log, no websockets)."""
    settings: dict[str, Any] = {
        "host": host, "port": port, "lifespan": "on", "ws": "none", "access_log": False,
        "server_header": False, "timeout_graceful_shutdown": 5, "log_level": "info",
        "timeout_keep_alive": 30, "backlog": 4096, "proxy_headers": False,
    }
    settings.update(options)
    return uvicorn.Config(app, **settings)


async def serve(
    url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8640,
    token: str | None = None,
    app: str | Any | None = None,
    *,
    max_body: int = 1_048_576,
    log_level: str = "info",
) -> None:
    """Serve the gateway over a hub on `url` until interrupted (Ctrl-C / SIGTERM).

    `token` (default: $TIDINGS_TOKEN) protects every /v1 route; without one,
    `host` must be a loopback address or this raises `InvalidArgument`
    before anything starts. `app` is 'module:attribute' naming an application
    whose sagas `POST /v1/commands/{saga}` starts (or the object itself; see
    `create_app`'s `app_module`).
    """
    if token is None:
        token = os.environ.get("TIDINGS_TOKEN") or None
    check_bind(host, token)
    if isinstance(app, str):  # a bad spec is an InvalidArgument now, not a failed startup
        app = load_app(app)
    hub = await connect(url)
    try:
        asgi = create_app(hub, token=token, max_body=max_body, app_module=app)
        server = GatewayServer(uvicorn_config(asgi, host, port, log_level=log_level))
        await server.serve()
    finally:
        await hub.close()


def run(
    url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8640,
    token: str | None = None,
    app: str | Any | None = None,
    **options: Any,
) -> None:
    """`serve()` until Ctrl-C or SIGTERM, on uvloop when it is installed.

    uvloop roughly halves the event loop's cost per request, which is most of
    what a small publish costs over HTTP (see benchmarks/gateway.py).
    """
    coro = serve(url, host, port, token, app, **options)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the signal it handled
        try:
            import uvloop
        except ImportError:
            asyncio.run(coro)
        else:
            uvloop.run(coro)
