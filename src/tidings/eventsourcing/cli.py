"""Command-line views of the event store: a stream's history and state, projection rebuilds.

Plain functions for `tidings.cli` to wire up (`tidings events`, `tidings
projections rebuild`, `tidings projections`). Each raises `TidingsError` for
bad input; output is a table on a terminal and JSON lines otherwise.
Needs the `cli` extra (rich).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import InvalidArgument, NotFound
from .aggregate import Aggregate, aggregate_class
from .records import RecordedEvent
from .repository import _timestamp

if TYPE_CHECKING:
    from ..hub import Hub

__all__ = [
    "events",
    "load_app",
    "projections_rebuild",
    "projections_status",
    "show_events",
]

_json = msgspec.json.Encoder().encode


def _console(as_json: bool) -> Any:
    from rich.console import Console

    if as_json:
        return None
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))  # piped: do not squeeze the table
    return console


def _line(obj: Any) -> None:
    sys.stdout.write(_json(msgspec.to_builtins(obj)).decode() + "\n")
    sys.stdout.flush()


async def load_app(spec: str | None, hub: Hub) -> None:
    """Import `module:function` (or `path/file.py:function`) and call `function(hub)`.

    That function registers the application's projections on the hub (and
    importing its module defines its aggregates and event classes). Without
    `:function`, a `setup(hub)` function is called if the module has one.
    """
    if not spec:
        return
    target, _, attr = spec.partition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            if mod_spec is None or mod_spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[path.stem] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except (ImportError, OSError) as exc:
        raise InvalidArgument(
            f"cannot import the app {target!r} ({exc}); pass --app module:function or "
            "path/to/file.py:function"
        ) from None
    fn = getattr(module, attr or "setup", None)
    if fn is None:
        if attr:
            raise InvalidArgument(f"{target!r} has no {attr!r}; pass --app module:function")
        return
    result = fn(hub)
    if inspect.isawaitable(result):
        await result


def _state(agg: Aggregate) -> dict[str, Any]:
    return {k: v for k, v in vars(agg).items()
            if not k.startswith("_") and k not in ("id", "version")}


async def show_events(hub: Hub, stream_id: str, *, version: int | None = None,
                      as_of: str | None = None, as_json: bool = False,
                      app: str | None = None) -> dict[str, Any]:
    """Print the stream's events up to the point (`version` or `as_of`) and its state there.

    The state needs the aggregate class (named by the events' `aggregate-type`
    header): it is found when its module is imported, e.g. through `app`.
    Returns the summary that is printed last.
    """
    await load_app(app, hub)
    when = _timestamp(as_of) if as_of is not None else None
    recs: list[RecordedEvent] = [r async for r in hub.events.read(stream_id, raw=True)]
    if not recs:
        raise NotFound(f"stream {stream_id!r} has no events")
    shown = [r for r in recs if (version is None or r.version <= version)
             and (when is None or r.timestamp <= when)]
    point = shown[-1].version if shown else 0
    kind = recs[0].headers.get("aggregate-type")
    cls = aggregate_class(kind) if kind else None
    state: dict[str, Any] | None = None
    note = None
    if cls is not None and point:
        agg = await hub.repository(cls).get(stream_id, version=point)
        state = _state(agg)
    elif point == 0:
        note = "the stream had no events at that point"
    elif kind:
        note = f"to show the state, import the {kind} aggregate (--app module:setup)"
    else:
        note = "no aggregate type recorded on these events (appended without a repository)"
    summary = {"stream_id": stream_id, "version": point, "current_version": recs[-1].version,
               "aggregate": kind, "state": state}
    if note:
        summary["note"] = note
    console = _console(as_json)
    if console is None:
        for r in shown:
            _line(r.to_dict())
        _line(summary)
        return summary
    _print_table(console, stream_id, shown, recs[-1].version)
    _print_state(console, summary)
    return summary


def _print_table(console: Any, stream_id: str, shown: list[RecordedEvent], current: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"stream {escape(stream_id)} ({current} events)")
    for col in ("version", "position", "time", "type", "actor", "correlation", "data"):
        table.add_column(col, no_wrap=col != "data", justify="right" if col in (
            "version", "position") else "left")
    for r in shown:
        data = r.data.decode(errors="replace")
        table.add_row(str(r.version), str(r.position), r.time.isoformat(timespec="milliseconds"),
                      escape(r.type + (f" v{r.type_version}" if r.type_version != 1 else "")),
                      escape(r.actor or ""), escape((r.correlation_id or "")[:12]),
                      escape(data if len(data) <= 120 else data[:117] + "..."))
    console.print(table)


def _print_state(console: Any, summary: dict[str, Any]) -> None:
    from rich.markup import escape

    head = f"state at version {summary['version']}"
    if summary["version"] != summary["current_version"]:
        head += f" (current: {summary['current_version']})"
    console.print(f"[bold]{escape(head)}[/]")
    if summary["state"] is None:
        console.print(escape(summary.get("note", "")), highlight=False)
        return
    for k, v in summary["state"].items():
        console.print(f"  {escape(k)} = {escape(repr(v))}", highlight=False)


async def _rebuild(hub: Hub, name: str, app: str | None, as_json: bool) -> Any:
    await load_app(app, hub)
    projections = hub.projections
    if name not in projections.names:
        known = ", ".join(projections.names) or "none"
        raise NotFound(
            f"no projection named {name!r} is registered (registered: {known}); pass the "
            "application that registers it with --app module:function"
        )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    start = await hub.events.last_position()
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=as_json or not sys.stderr.isatty(),
                  console=_stderr_console()) as bar:
        task = bar.add_task(f"rebuilding {name}", total=max(start, 1))

        def progress(position: int, head: int) -> None:
            bar.update(task, completed=position, total=max(head, 1))

        status = await projections.rebuild(name, progress=progress)
    if as_json:
        _line(status)
    else:
        _console(False).print(
            f"{name}: {status.status} at position {status.position} of {status.head}"
            + (f" — failed at {status.failed_position}: {status.error}" if status.error else ""),
            highlight=False,
        )
    return status


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


async def _statuses(hub: Hub, app: str | None, as_json: bool) -> list[Any]:
    await load_app(app, hub)
    statuses = await hub.projections.statuses()
    console = _console(as_json)
    if console is None:
        for s in statuses:
            _line(s)
        return statuses
    from rich.table import Table

    table = Table(title="projections")
    for col in ("name", "status", "position", "lag", "error"):
        table.add_column(col, justify="right" if col in ("position", "lag") else "left")
    for s in statuses:
        table.add_row(s.name, s.status, str(s.position), str(s.lag),
                      f"at {s.failed_position}: {s.error}" if s.error else "")
    console.print(table)
    return statuses


async def _with_hub(url: str | None, fn: Any) -> Any:
    from ..hub import connect

    async with await connect(url) as hub:
        return await fn(hub)


def events(url: str | None, stream_id: str, version: int | None = None, as_of: str | None = None,
           json: bool = False, app: str | None = None) -> dict[str, Any]:
    """`tidings events STREAM_ID [--version N] [--as-of ISO] [--app module:fn]`."""
    if version is not None and version < 1:
        raise InvalidArgument("--version must be >= 1")
    return asyncio.run(_with_hub(url, lambda hub: show_events(
        hub, stream_id, version=version, as_of=as_of, as_json=json, app=app)))


def projections_rebuild(url: str | None, name: str, app: str | None,
                        json: bool = False) -> Any:
    """`tidings projections rebuild NAME --app module:fn`: reset and replay, with a progress bar."""
    return asyncio.run(_with_hub(url, lambda hub: _rebuild(hub, name, app, json)))


def projections_status(url: str | None, app: str | None = None, json: bool = False) -> Any:
    """`tidings projections [--app module:fn]`: each projection's position, lag and error."""
    return asyncio.run(_with_hub(url, lambda hub: _statuses(hub, app, json)))
