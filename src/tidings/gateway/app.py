"""The gateway's ASGI app: `create_app(hub)` wires routes, limits, auth and metrics.

One `Gateway` per app holds what the routes share: the hub, the command
targets, the pull consumers (one per group and pattern, so acks find them),
the admission limits, the metrics and the open event streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import topics as _topics
from ..errors import InvalidArgument, TidingsError
from ..hub import Hub
from ..pubsub import Subscription
from . import commands as _commands
from . import dashboard as _dashboard
from . import dlq as _dlq
from . import explore as _explore
from . import pubsub as _pubsub
from . import streams as _streams
from .auth import BearerAuth
from .commands import CommandTarget, Requests
from .http import (
    CLIENT_GONE,
    ApiError,
    CatchAll,
    ClientGone,
    error_response,
    json_response,
    translate,
)
from .limits import Admission, BodyBytes, BodyLimit
from .metrics import CONTENT_TYPE, GatewayMetrics, HttpMetrics
from .openapi import openapi, with_inputs
from .sse import EventStream

if TYPE_CHECKING:
    from ..telemetry import Telemetry

__all__ = ["Gateway", "create_app", "load_app"]

log = logging.getLogger("tidings.gateway")

_HTTP_ERRORS = {
    400: ("bad_request", "the request is malformed"),
    404: ("not_found", "no such route; the API is described at /v1/openapi.json"),
    405: ("method_not_allowed", "this route does not take that method; see /v1/openapi.json"),
}


class Gateway:
    """What the routes of one app share."""

    def __init__(self, hub: Hub, *, commands: Mapping[str, CommandTarget] | None,
                 max_body: int, max_wait: float, max_publishes: int, max_pulls: int,
                 max_streams: int, max_commands: int, max_running: int,
                 max_subscriptions: int, heartbeat: float) -> None:
        self.hub = hub
        self.commands: dict[str, CommandTarget] = dict(commands or {})
        self.max_body = max_body
        self.max_wait = max_wait
        self.heartbeat = heartbeat
        self.metrics = GatewayMetrics()
        self.publishes = Admission(max_publishes, "publish/append")
        self.pulls = Admission(max_pulls, "pull")
        self.waits = Admission(max_pulls, "request wait")
        self.streams = Admission(max_streams, "event stream")
        self.commands_admission = Admission(max_commands, "command")
        # bodies are read before any admission: bounded by the bytes held, not by a count
        self.bodies = BodyBytes(max_body * 256)
        self.requests = Requests(max_running=max_running)
        self.dashboard = _dashboard.Dashboard(self)
        self._subs: OrderedDict[tuple[str, str], Subscription] = OrderedDict()
        self._max_subs = max_subscriptions
        self._open_streams: set[EventStream] = set()

    # pull consumers ------------------------------------------------------------------
    async def subscription(self, group: str, pattern: str) -> Subscription:
        """The gateway's consumer of subscription `group` over `pattern` (created if new)."""
        key = (group, pattern)
        sub = self._subs.get(key)
        if sub is not None:
            self._subs.move_to_end(key)
            return sub
        sub = await self.hub.subscribe(pattern, group=group)
        other = self._subs.get(key)  # another request created it meanwhile
        if other is not None:
            await sub.close()
            return other
        self._subs[key] = sub
        while len(self._subs) > self._max_subs:  # the least recently used goes
            _, old = self._subs.popitem(last=False)
            await old.close()
        return sub

    async def existing_subscription(self, group: str, pattern: str) -> Subscription | None:
        """As `subscription`, but None when the durable subscription does not exist."""
        sub = self._subs.get((group, pattern))
        if sub is not None:
            return sub
        _topics.validate_pattern(pattern)
        for info in await self.hub.engine.subscriptions():
            if info.group == group and info.pattern == pattern:
                return await self.subscription(group, pattern)
        return None

    # event streams -------------------------------------------------------------------
    def event_stream(self, source: AsyncIterator[bytes]) -> EventStream:
        """An SSE response counted against `max_streams` and ended by `close_streams`."""
        self.streams.enter()

        def closed() -> None:
            self.streams.leave()
            self._open_streams.discard(stream)

        stream = EventStream(source, heartbeat=self.heartbeat, on_close=closed)
        self._open_streams.add(stream)
        return stream

    def close_streams(self) -> None:
        """End every open event stream (the server is shutting down)."""
        for s in list(self._open_streams):
            s.stopping.set()

    async def close(self) -> None:
        self.close_streams()
        subs, self._subs = list(self._subs.values()), OrderedDict()
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.close()


def load_app(spec: str) -> Any:
    """Import `module:attribute` (attribute default `app`) for `--app`."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise InvalidArgument(f"--app {spec!r}: use 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument(f"--app {spec!r}: cannot import {module_name!r} ({exc})") from exc
    obj = module
    for part in (attr or "app").split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InvalidArgument(f"--app {spec!r}: {module_name!r} has no {part!r}") from None
    return obj


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, TidingsError):
        await task


async def _run_handlers(hub: Hub, stack: contextlib.AsyncExitStack) -> None:
    """Run the handlers the app registered (`hub.run()`) for as long as the server runs."""
    runner = asyncio.create_task(hub.run(), name="tidings:gateway:handlers")
    await asyncio.sleep(0)  # run() checks at once whether anything is registered
    if runner.done():
        exc = runner.exception()
        if isinstance(exc, InvalidArgument):
            return  # the app registered no handlers: nothing to run here
        if exc is not None:
            raise exc

    def crashed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the app's handlers stopped", exc_info=task.exception())

    runner.add_done_callback(crashed)
    stack.push_async_callback(_cancel, runner)


def _commands_of(value: Any) -> Mapping[str, CommandTarget] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value
    found = getattr(value, "commands", None)
    if isinstance(found, Mapping):
        return found
    raise InvalidArgument(
        f"the --app object gave {type(value).__name__}; it must give a mapping of saga name to "
        "a command target (or an object with a `commands` mapping), or None"
    )


class Traced:
    """ASGI middleware: each HTTP request in a SERVER span, a child of its `traceparent`
    header; what the request starts (a saga, a publish) runs inside it."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in (b"traceparent", b"tracestate")}
        with self.telemetry.server(scope["method"], scope["path"], headers) as span:
            status: list[int] = []

            async def sending(message: Any) -> None:
                if message["type"] == "http.response.start":
                    status.append(message["status"])
                await send(message)

            try:
                await self.app(scope, receive, sending)
            finally:  # named `<METHOD> <route template>`, as HttpMetrics labels it
                self.telemetry.routed(span, scope["method"],
                                      getattr(scope.get("route"), "path", None),
                                      status[0] if status else None)


def create_app(
    hub: Hub,
    *,
    token: str | None = None,
    max_body: int = 1_048_576,
    app_module: str | Any | None = None,
    commands: Mapping[str, CommandTarget] | None = None,
    max_wait: float = 30.0,
    max_publishes: int = 256,
    max_pulls: int = 256,
    max_streams: int = 256,
    max_commands: int = 256,
    max_running: int = 1000,
    max_subscriptions: int = 1024,
    heartbeat: float = 15.0,
    body_timeout: float = 10.0,
) -> Starlette:
    """The HTTP gateway over `hub`: JSON API under /v1, dashboard at /, /metrics, /healthz.

    With `token`, every /v1 call and /metrics need `Authorization: Bearer
    <token>`. Bodies over `max_body` bytes get 413 before they are read, and a
    body that has not fully arrived within `body_timeout` seconds gets 408. Over
    `max_publishes` publishes/appends (or `max_pulls` pulls, `max_commands`
    commands, `max_streams` event streams) in progress, the next gets 429
    with Retry-After; so does a command while `max_running` commands it
    accepted have not finished. `commands` maps saga names to command targets
    (`hub.sagas(definition)`); `app_module` ('module:attr', or the object
    itself) names an application set up at startup: a mapping of commands, an
    object with a `commands` mapping, or a callable taking the hub and
    returning one of those (awaited if async; entered and exited with the
    server if it is an async context manager); handlers it registers on the
    hub (`@hub.subscriber`, `@hub.handler`) run while the server runs.
    """
    if not isinstance(max_body, int) or max_body < 1:
        raise InvalidArgument("max_body must be a positive number of bytes")
    if not 0 <= max_wait <= 300:
        raise InvalidArgument("max_wait must be 0 to 300 seconds")
    if not 0 < body_timeout <= 3600:
        raise InvalidArgument("body_timeout must be more than 0 and at most 3600 seconds")
    gw = Gateway(hub, commands=commands, max_body=max_body, max_wait=float(max_wait),
                 max_publishes=max_publishes, max_pulls=max_pulls, max_streams=max_streams,
                 max_commands=max_commands, max_running=max_running,
                 max_subscriptions=max_subscriptions,
                 heartbeat=heartbeat)
    spec = openapi(max_body=max_body, max_wait=gw.max_wait, max_pull=_pubsub.MAX_PULL,
                   auth=token is not None)

    async def healthz(request: Request) -> Response:
        if hub.closed:
            return json_response({"status": "unavailable", "detail": "the hub is closed"}, 503,
                                 {"Retry-After": "1"})
        return json_response({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return Response(await gw.metrics.render(hub), media_type=CONTENT_TYPE)

    # the document as of the sagas served (an --app registers them at startup), and the
    # inputs it was made for
    served: list[Any] = [{}, spec]

    async def openapi_json(request: Request) -> Response:
        typed = _commands.inputs(gw.commands)
        if typed != served[0]:
            served[:] = [typed, with_inputs(spec, typed)]
        return json_response(served[1])

    async def asyncapi_json(request: Request) -> Response:
        # what the application registered on the hub (an --app does at startup), now
        title = app_module if isinstance(app_module, str) else None
        return json_response(hub.asyncapi(title=title))

    routes: list[BaseRoute] = [
        *_pubsub.routes(gw),  # first: publishing is the hot path
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/openapi.json", openapi_json, methods=["GET"]),
        Route("/v1/asyncapi.json", asyncapi_json, methods=["GET"]),
        *_streams.routes(gw),
        *_commands.routes(gw),
        *_dlq.routes(gw),
        *_explore.routes(gw),
        *_dashboard.routes(gw),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if app_module is not None:
                obj = load_app(app_module) if isinstance(app_module, str) else app_module
                if callable(obj) and not isinstance(obj, Mapping) and \
                        not hasattr(obj, "commands"):
                    obj = obj(hub)
                    if inspect.isawaitable(obj):
                        obj = await obj
                if hasattr(obj, "__aenter__"):
                    obj = await stack.enter_async_context(obj)
                found = _commands_of(obj)
                if found:
                    gw.commands.update(found)
                await _run_handlers(hub, stack)
            watcher = asyncio.create_task(
                gw.metrics.watch_sagas(hub, await hub.engine.last_position(),
                                       on_end=gw.requests.ended),
                name="tidings:gateway:saga-metrics")
            stack.push_async_callback(_cancel, watcher)
            sampler = asyncio.create_task(gw.dashboard.run(), name="tidings:gateway:dashboard")
            stack.push_async_callback(_cancel, sampler)
            stack.push_async_callback(gw.close)
            yield

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        if exc.status in (429, 503):
            route = request.scope.get("route")
            gw.metrics.overloaded.labels(getattr(route, "path", "<unmatched>")).inc()
        return error_response(exc)

    async def tidings_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TidingsError)
        return await api_error(request, translate(exc))

    async def client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=CLIENT_GONE)  # nobody is there to read it

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error, detail = _HTTP_ERRORS.get(exc.status_code, ("http_error", str(exc.detail)))
        return error_response(ApiError(exc.status_code, error, detail, exc.headers))

    middleware = [Middleware(CatchAll), Middleware(HttpMetrics, metrics=gw.metrics)]
    if hub.telemetry is not None:  # a SERVER span per request, in the caller's trace
        middleware.append(Middleware(Traced, telemetry=hub.telemetry))
    if token is not None:
        middleware.append(Middleware(BearerAuth, token=token))
    middleware.append(Middleware(BodyLimit, max_body=max_body, body_timeout=body_timeout,
                                 held=gw.bodies))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            ApiError: api_error,
            TidingsError: tidings_error,
            HTTPException: http_error,
            ClientGone: client_gone,
            ClientDisconnect: client_gone,
        },
        lifespan=lifespan,
    )
    app.state.gateway = gw
    return app
