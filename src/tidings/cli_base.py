"""What every `tidings` CLI module shares: the app, its options, and clean exits.

`cli.py` (messages, demos, bench) and `cli_ops.py` (sagas, events, serve, …)
both register their commands on `app`; neither imports the other's helpers.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import msgspec

from .errors import InvalidArgument, TidingsError
from .hub import DEFAULT_URL

try:
    import typer
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    sys.exit(f"error: the tidings CLI needs typer and rich ({exc}); pip install 'tidings[cli]'")

__all__ = ["JsonOption", "StartOption", "UrlOption", "app", "demo_app", "emit_json", "fail",
           "is_terminal", "run", "settings", "source_checkout_file"]

T = TypeVar("T")

app = typer.Typer(
    name="tidings",
    help="Event-driven toolkit: publish, subscribe, replay and inspect topics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # a bug shows a plain traceback; TidingsErrors never do
)
demo_app = typer.Typer(help="Runnable demos (they write to the --url engine).",
                       no_args_is_help=True)
app.add_typer(demo_app, name="demo")

UrlOption = Annotated[str | None, typer.Option(
    "--url", help="Engine URL (overrides the global --url and TIDINGS_URL).", show_default=False)]
JsonOption = Annotated[bool, typer.Option(
    "--json", help="Print JSON lines even on a terminal.")]
BrokerOption = Annotated[str | None, typer.Option(
    "--broker", envvar="TIDINGS_BROKER", show_default=False,
    help="Send every message through NATS JetStream (nats://host:4222); the --url "
    "database keeps the event store, projections and sagas.")]
StartOption = Annotated[str, typer.Option(
    "--start", help="beginning, end, a position, or an ISO 8601 time.")]


class _Settings(msgspec.Struct):
    url: str
    json: bool
    broker: str | None = None


@app.callback()
def _global(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(
        "--url", envvar="TIDINGS_URL",
        help="Engine URL: sqlite:///path.db, postgresql://…, nats://host:4222 or "
        "memory://")] = DEFAULT_URL,
    as_json: JsonOption = False,
    broker: BrokerOption = None,
) -> None:
    ctx.obj = _Settings(url, as_json, broker)


def settings(ctx: typer.Context, url: str | None, as_json: bool,
             broker: str | None = None) -> tuple[str, bool]:
    """The engine URL (with `?broker=` when a broker is given) and whether to print JSON
    lines, from command, global and stdout."""
    base = ctx.find_root().obj
    if not isinstance(base, _Settings):  # invoked without the callback (tests calling app)
        base = _Settings(os.environ.get("TIDINGS_URL", DEFAULT_URL), False,
                         os.environ.get("TIDINGS_BROKER"))
    engine_url = url or base.url
    broker = broker or base.broker
    if broker and "broker=" not in engine_url:
        engine_url += f"{'&' if '?' in engine_url else '?'}broker={broker}"
    return engine_url, as_json or base.json or not is_terminal()


def is_terminal() -> bool:
    return sys.stdout.isatty()


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro`; turn tidings errors, Ctrl-C and a closed pipe into clean exits."""
    try:
        return asyncio.run(coro)
    except TidingsError as exc:
        fail(str(exc), 2 if isinstance(exc, InvalidArgument) else 1)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # The reader went away (`tidings read '>' | head`): stop quietly, like cat does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None


def emit_json(obj: Any) -> None:
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")
    sys.stdout.flush()  # one line at a time, so a pipe sees messages as they arrive


def source_checkout_file(relative: str) -> Path | None:
    """A file shipped with the repository (examples/, benchmarks/), not with the package.

    Looked up in the current directory, then in the checkout an editable install runs from.
    """
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = root / relative
        if candidate.exists():
            return candidate
    return None
