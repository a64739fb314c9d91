"""CLI commands beyond pub/sub: the shop demo, sagas, event streams, projections, the gateway.

Registered on `tidings.cli.app` when that module is imported.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from .cli_base import (
    BrokerOption,
    JsonOption,
    UrlOption,
    app,
    demo_app,
    emit_json,
    fail,
    run,
    settings,
    source_checkout_file,
)
from .errors import InvalidArgument

AppOption = Annotated[str | None, typer.Option(
    "--app", help="'module:attribute' of the application (default for sagas: the shop).")]
DEFAULT_APP = "examples.shop:app"


def _checkout_on_path() -> None:
    """Make `examples.*` importable from a source checkout (the demos ship with the repo)."""
    found = source_checkout_file("examples/shop/__init__.py")
    if found is None:
        fail("examples/shop is not here; the shop ships with the tidings source repository, "
              "so run this from a checkout of it", 1)
    root = str(found.parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)


def _load(spec: str) -> Any:
    import importlib

    if spec.startswith("examples."):
        _checkout_on_path()
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument(f"--app {spec!r}: cannot import {module_name!r} ({exc})") from exc
    for part in (attr or "app").split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise InvalidArgument(f"--app {spec!r}: {module_name!r} has no {part!r}")
    return obj


# the shop demo -----------------------------------------------------------------------
@demo_app.command("shop")
def demo_shop(
    ctx: typer.Context,
    orders: Annotated[int, typer.Option("--orders", min=1, help="How many orders.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the order mix.")] = 7,
    inline: Annotated[bool, typer.Option(
        "--inline", help="Run the services' handlers inline in the coordinator's "
        "transactions instead of sending commands and replies as messages.")] = False,
    url: UrlOption = None,
    broker: BrokerOption = None,
) -> None:
    """The e-commerce create-order saga end to end: N orders, a summary, the invariants."""
    engine_url, _ = settings(ctx, url, False, broker)
    _checkout_on_path()
    from examples.shop import demo

    raise typer.Exit(run(demo.run(engine_url, orders=orders, seed_=seed, inline=inline)))


# sagas ---------------------------------------------------------------------------------
async def _runners(url: str, spec: str) -> tuple[Any, dict[str, Any]]:
    from .hub import connect

    hub = await connect(url)
    try:
        made = (_load(spec)(hub, services=False, seed_data=False) if spec == DEFAULT_APP
                else _load(spec)(hub))
        if hasattr(made, "__await__"):
            made = await made
        runners = dict(made or {})
    except BaseException:
        await hub.close()
        raise
    return hub, runners


def _print_rows(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:

    if as_json:
        for r in rows:
            emit_json(r)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in columns))
    Console().print(table)


@app.command("sagas")
def sagas_list(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option("--status", help="running, completed, "
                                               "compensating, compensated or stuck")] = None,
    app_spec: AppOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Saga instances with their status (JSON lines when piped)."""
    engine_url, as_json = settings(ctx, url, as_json)
    valid = ("running", "completed", "compensating", "compensated", "stuck")
    if status is not None and status not in valid:
        fail(f"--status must be one of {', '.join(valid)}")

    async def go() -> list[dict[str, Any]]:
        hub, runners = await _runners(engine_url, app_spec or DEFAULT_APP)
        try:
            rows = []
            for runner in runners.values():
                async for s in runner.list(status):
                    rows.append({"id": s["id"], "saga": s["saga"], "status": s["status"],
                                 "steps": len(s["steps"]), "reason": s["reason"] or ""})
            return rows
        finally:
            await hub.close()

    _print_rows(run(go()), as_json, ["id", "saga", "status", "steps", "reason"])


@app.command("saga")
def saga_show(
    ctx: typer.Context,
    saga_id: Annotated[str, typer.Argument(help="The saga id.")],
    retry: Annotated[bool, typer.Option("--retry", help="Resume a stuck saga.")] = False,
    cancel: Annotated[bool, typer.Option("--cancel", help="Cancel a running saga "
                                         "(its completed steps are compensated).")] = False,
    app_spec: AppOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """One saga: status, data and step history; --retry resumes it when stuck."""
    engine_url, as_json = settings(ctx, url, as_json)

    async def go() -> dict[str, Any]:
        from .errors import NotFound

        hub, runners = await _runners(engine_url, app_spec or DEFAULT_APP)
        try:
            for runner in runners.values():
                try:
                    state = await runner.get(saga_id)
                except NotFound:
                    continue
                if retry or cancel:
                    await (runner.retry(saga_id) if retry else runner.cancel(saga_id))
                    state = await runner.wait(saga_id, timeout=60)
                return dict(state)
            raise NotFound(f"no saga {saga_id!r}; list them with 'tidings sagas'")
        finally:
            await hub.close()

    state = run(go())
    if as_json:

        emit_json(state)
        return
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{state['saga']}[/] {state['id']}: [bold]{state['status']}[/]")
    if state.get("reason"):
        console.print(f"reason: {state['reason']}")
    if state.get("error"):
        console.print(f"[red]error: {state['error']}[/]")
    _print_rows([{"event": h["event"], "step": h.get("name", ""), "attempt": h.get("attempt", ""),
                  "error": h.get("error", "")} for h in state["steps"]], False,
                ["event", "step", "attempt", "error"])


# event streams and projections ---------------------------------------------------------
def _on_hub(url: str, app_spec: str | None, fn: Any) -> Any:
    """Run `await fn(hub)` on a hub of `url` (the app's modules importable), then close it."""
    if app_spec and app_spec.startswith("examples."):
        _checkout_on_path()

    async def go() -> Any:
        from .hub import connect

        async with await connect(url) as hub:
            return await fn(hub)

    return run(go())


@app.command("events")
def events_show(
    ctx: typer.Context,
    stream_id: Annotated[str, typer.Argument(help="The stream (aggregate) id.")],
    version: Annotated[int | None, typer.Option("--version", help="State at this version.")] = None,
    as_of: Annotated[str | None, typer.Option("--as-of", help="State at this ISO time.")] = None,
    app_spec: Annotated[str | None, typer.Option("--app", help="'module:fn' registering the "
                                                 "aggregate classes.")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """A stream's history, and its state at a version or time."""
    engine_url, as_json = settings(ctx, url, as_json)
    from .eventsourcing import cli as es_cli

    if version is not None and version < 1:
        fail("--version must be >= 1")
    _on_hub(engine_url, app_spec, lambda hub: es_cli.show_events(
        hub, stream_id, version=version, as_of=as_of, as_json=as_json, app=app_spec))


projections_app = typer.Typer(help="Projections: status and rebuild.", no_args_is_help=True)
app.add_typer(projections_app, name="projections")


@projections_app.command("rebuild")
def projections_rebuild(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The projection's name.")],
    app_spec: Annotated[str | None, typer.Option("--app", help="'module:fn' registering the "
                                                 "projection.")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Reset a projection's read model and replay every event into it (with progress)."""
    engine_url, as_json = settings(ctx, url, as_json)
    from .eventsourcing import cli as es_cli

    _on_hub(engine_url, app_spec, lambda hub: es_cli._rebuild(hub, name, app_spec, as_json))


@projections_app.command("status")
def projections_status(
    ctx: typer.Context,
    app_spec: Annotated[str | None, typer.Option("--app")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Each projection's position, lag, status and error."""
    engine_url, as_json = settings(ctx, url, as_json)
    from .eventsourcing import cli as es_cli

    _on_hub(engine_url, app_spec, lambda hub: es_cli._statuses(hub, app_spec, as_json))


# migrations -----------------------------------------------------------------------------
@app.command("migrate")
def migrate(ctx: typer.Context, url: UrlOption = None) -> None:
    """Create or upgrade tidings' schema (PostgreSQL; SQLite and memory need nothing)."""
    engine_url, _ = settings(ctx, url, False)

    async def go() -> int:
        from .hub import connect

        async with await connect(engine_url) as hub:  # PostgreSQL migrates on open
            return hub.engine.migrations_applied + await hub.engine.migrate()

    n = run(go())
    typer.echo(f"{n} migration(s) applied to {engine_url}")


# the AsyncAPI document -------------------------------------------------------------------
@app.command("asyncapi")
def asyncapi(
    app_spec: Annotated[str, typer.Option(
        "--app", help="'module:fn': fn(hub) registers the application's subscribers, "
        "handlers, sagas and published topics.")],
    as_yaml: Annotated[bool, typer.Option(
        "--yaml", help="YAML instead of JSON (needs PyYAML: pip install 'tidings[yaml]').")
    ] = False,
    title: Annotated[str | None, typer.Option("--title", help="info.title (default: "
                                              "the --app spec).")] = None,
    version: Annotated[str, typer.Option("--version", help="info.version.")] = "1.0.0",
    server: Annotated[list[str] | None, typer.Option(
        "--server", help="NAME=URL of a server the document lists (nats://host:4222; any "
        "password is left out); repeat for more.")] = None,
    url: Annotated[str | None, typer.Option(
        "--url", show_default=False, help="Engine the app registers on, for an app that "
        "reads at startup (default memory://: nothing is read or written).")] = None,
) -> None:
    """The application's AsyncAPI 3.0 document, made from what --app registers on an
    in-memory hub (no database is read or written)."""
    servers: dict[str, str] = {}
    for item in server or ():
        name, sep, where = item.partition("=")
        if not sep:
            fail(f"--server {item!r}: use NAME=URL, such as production=nats://nats:4222")
        servers[name] = where
    dump: Any = None
    if as_yaml:
        try:
            import yaml  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            fail("--yaml needs PyYAML; pip install 'tidings[yaml]' (or leave --yaml out "
                 "for JSON)", 1)
        dump = yaml.safe_dump
    if app_spec.startswith("examples."):
        _checkout_on_path()
    elif "" not in sys.path and "." not in sys.path:  # (as uvicorn: the app's directory)
        sys.path.insert(0, "")
    try:
        fn = _load(app_spec)
    except InvalidArgument as exc:
        fail(str(exc))
    if not callable(fn):
        fail(f"--app {app_spec!r} must name a function that takes the hub, got {fn!r}")

    async def go() -> dict[str, Any]:
        from .hub import connect

        async with await connect(url or "memory://", trim_interval=None) as hub:
            made = fn(hub)
            if hasattr(made, "__await__"):
                await made
            return hub.asyncapi(title=title or app_spec, version=version,
                                servers=servers or None)

    doc = run(go())
    if dump is not None:
        sys.stdout.write(dump(doc, sort_keys=False, allow_unicode=True))
    else:
        import msgspec

        sys.stdout.write(msgspec.json.format(msgspec.json.encode(doc), indent=2).decode()
                         + "\n")


# the gateway ----------------------------------------------------------------------------
@app.command("serve")
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8640,
    token: Annotated[str | None, typer.Option("--token", envvar="TIDINGS_TOKEN",
                                              help="Bearer token for every /v1 call.")] = None,
    app_spec: Annotated[str | None, typer.Option("--app", help="'module:attribute' whose "
                                                 "sagas POST /v1/commands starts.")] = None,
    url: UrlOption = None,
) -> None:
    """The HTTP gateway and dashboard (JSON over HTTP under /v1)."""
    engine_url, _ = settings(ctx, url, False)
    if app_spec and app_spec.startswith("examples."):
        _checkout_on_path()
    try:
        from .gateway.server import run as run_server
    except ImportError as exc:
        fail(f"the gateway needs the server extra ({exc}); pip install 'tidings[server]'", 1)
    from .errors import TidingsError

    try:
        run_server(engine_url, host, port, token, app_spec)  # uvloop when installed
    except TidingsError as exc:
        fail(str(exc), 2 if isinstance(exc, InvalidArgument) else 1)

