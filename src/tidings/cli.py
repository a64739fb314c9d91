"""The `tidings` command line: publish, subscribe, replay and inspect topics from a shell.

Output is JSON lines when stdout is not a terminal (or with `--json`), and a
readable view on a terminal. A `TidingsError` becomes `error: <message>` on
stderr with exit code 2 for bad input and 1 otherwise, never a traceback.
Needs the `cli` extra (`pip install 'tidings[cli]'`); `import tidings` does not load it.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import subprocess
import sys
from types import ModuleType
from typing import Annotated, Any

import msgspec

from .cli_base import (
    JsonOption,
    StartOption,
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
from .hub import Hub, connect
from .messages import Message

try:
    import typer
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    sys.exit(f"error: the tidings CLI needs typer and rich ({exc}); pip install 'tidings[cli]'")

__all__ = ["app", "main"]

def _print_message(console: Console | None, msg: Message) -> None:
    d = msg.to_dict()
    if console is None:
        emit_json(d)
        return
    data = d["data"] if "data_b64" not in d else f"<{len(msg.data)} bytes>"
    shown = data if isinstance(data, str) else msgspec.json.encode(data).decode()
    extra = f" key={escape(msg.key)}" if msg.key else ""
    extra += f" attempt={msg.attempt}" if msg.attempt > 1 else ""
    console.print(f"[dim]#{msg.position} {d['time']}[/] [bold cyan]{escape(msg.topic)}[/]"
                  f"{extra}  {escape(shown)}", soft_wrap=True)


def _parse_data(text: str, raw: bool) -> object:
    """JSON when `text` parses as JSON (unless `raw`), else the text itself."""
    if text == "-":
        text = sys.stdin.read()
    if raw:
        return text
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


def _parse_headers(items: list[str] | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InvalidArgument(f"header {item!r} must be written name=value")
        headers[name.strip()] = value
    return headers


async def _with_hub(url: str) -> Hub:
    return await connect(url)


# publish / subscribe / read / topics --------------------------------------------------------
@app.command()
def publish(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="Topic, e.g. orders.created.")],
    data: Annotated[str, typer.Argument(help="Payload: JSON if it parses, else text; - reads stdin.")],
    key: Annotated[str | None, typer.Option("--key", "-k", help="Ordering key.")] = None,
    id: Annotated[str | None, typer.Option("--id", help="Message id (deduplicates).")] = None,
    header: Annotated[list[str] | None, typer.Option(
        "--header", "-H", help="A header name=value (repeatable).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send DATA as text, never JSON.")] = False,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Publish one message and print where it was stored."""
    engine_url, json_out = settings(ctx, url, as_json)

    async def go() -> None:
        payload = _parse_data(data, raw)
        headers = _parse_headers(header)
        async with await _with_hub(engine_url) as hub:
            p = await hub.publish(topic, payload, key=key, headers=headers, id=id)
        out = {"topic": topic, "position": p.position, "id": p.id, "duplicate": p.duplicate}
        if json_out:
            emit_json(out)
        else:
            note = " (duplicate id: already stored, not stored again)" if p.duplicate else ""
            Console().print(f"published [bold cyan]{escape(topic)}[/] at position "
                            f"{p.position}, id {escape(p.id)}{note}")

    run(go())


@app.command()
def subscribe(
    ctx: typer.Context,
    pattern: Annotated[str, typer.Argument(help="Topic pattern: '*' one token, '>' the rest.")],
    group: Annotated[str, typer.Option("--group", "-g", help="Durable subscription name.")],
    start: StartOption = "beginning",
    count: Annotated[int | None, typer.Option(
        "--count", "-n", min=1, help="Stop after N messages.")] = None,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", min=0.0, help="Stop after this many seconds without a message.")] = None,
    no_ack: Annotated[bool, typer.Option(
        "--no-ack", help="Do not ack: the messages come back after ack_wait.")] = False,
    ack_wait: Annotated[float, typer.Option("--ack-wait", help="Seconds before redelivery.")] = 30.0,
    max_deliver: Annotated[int, typer.Option(
        "--max-deliver", help="Attempts before a message is dead-lettered.")] = 5,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Consume from the durable subscription GROUP, printing and acking each message.

    `--start` applies only when the group is new; afterwards it resumes where it acked.
    """
    engine_url, json_out = settings(ctx, url, as_json)
    console = None if json_out else Console()

    async def go() -> None:
        async with await _with_hub(engine_url) as hub:
            async with await hub.subscribe(pattern, group=group, start=start, ack_wait=ack_wait,
                                           max_deliver=max_deliver) as sub:
                seen = 0
                while count is None or seen < count:
                    want = 100 if count is None else min(100, count - seen)
                    batch = await sub.fetch(max=want, wait=timeout)
                    if not batch:
                        return  # idle for --timeout seconds
                    for msg in batch:
                        _print_message(console, msg)
                        if not no_ack:
                            await msg.ack()
                    seen += len(batch)

    run(go())


@app.command()
def read(
    ctx: typer.Context,
    pattern: Annotated[str, typer.Argument(help="Topic pattern: '*' one token, '>' the rest.")],
    start: StartOption = "beginning",
    stop: Annotated[str | None, typer.Option(
        "--stop", help="Last position (inclusive) or a time (exclusive).")] = None,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing new messages.")] = False,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replay stored messages without a subscription (nothing is acked or changed)."""
    engine_url, json_out = settings(ctx, url, as_json)
    console = None if json_out else Console()

    async def go() -> None:
        async with await _with_hub(engine_url) as hub:
            async for msg in hub.read(pattern, start=start, stop=stop, follow=follow):
                _print_message(console, msg)

    run(go())


@app.command()
def topics(ctx: typer.Context, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Topics with message counts, and the subscriptions reading them with their lag."""
    engine_url, json_out = settings(ctx, url, as_json)

    async def go() -> list[dict[str, Any]]:
        async with await _with_hub(engine_url) as hub:
            return await hub.topics()

    rows = run(go())
    if json_out:
        for row in rows:
            emit_json(row)
        return
    console = Console()
    if not rows:
        console.print(f"no topics yet in {escape(engine_url)}")
        return
    table = Table(title=f"topics in {escape(engine_url)}")
    table.add_column("topic")
    table.add_column("messages", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("positions", justify="right")
    table.add_column("subscriptions (lag)")
    for r in rows:
        subs = ", ".join(f"{s['group']} ({s['lag']})" for s in r["subscriptions"]) or "-"
        span = f"{r['first_position']}..{r['last_position']}" if r["messages"] else "-"
        table.add_row(escape(r["topic"]), str(r["messages"]), str(r["bytes"]), span,
                      escape(subs))
    console.print(table)


# demos ----------------------------------------------------------------------------------
def _load_example(relative: str) -> ModuleType:
    path = source_checkout_file(relative)
    if path is None:
        fail(f"{relative} is not here; the demos ship with the tidings source repository, "
              "so run this from a checkout of it", 1)
    spec = importlib.util.spec_from_file_location(f"tidings_demo_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@demo_app.command("walkthrough")
def demo_walkthrough(ctx: typer.Context, url: UrlOption = None) -> None:
    """Pub/sub, fan-out, competing consumers, redelivery, dead letters, replay, backpressure."""
    engine_url, _ = settings(ctx, url, False)
    module = _load_example("examples/walkthrough.py")
    run(module.walkthrough(engine_url))


# benchmarks -----------------------------------------------------------------------------
class BenchSuite(enum.StrEnum):
    pubsub = "pubsub"
    eventstore = "eventstore"
    saga = "saga"
    all = "all"


@app.command()
def bench(
    ctx: typer.Context,
    suite: Annotated[BenchSuite, typer.Argument(help="Which comparison to run.")] = BenchSuite.all,
    url: UrlOption = None,
) -> None:
    """Run the benchmarks (tidings and its peers side by side; a table at the end)."""
    engine_url, _ = settings(ctx, url, False)
    package = source_checkout_file("benchmarks/__main__.py")
    if package is None:
        fail("the benchmarks are not here; they ship with the tidings source repository: "
              "run 'make bench' (or 'tidings bench') from a checkout of it", 1)
    root = package.parent.parent
    env = {**os.environ, "TIDINGS_URL": engine_url}
    # A separate interpreter: the benchmarks own their event loops and process settings.
    code = subprocess.call([sys.executable, "-m", "benchmarks", suite.value], cwd=root, env=env)
    raise typer.Exit(code)


from . import cli_dlq, cli_ops  # noqa: E402,F401  (registers demo shop, sagas, dlq, serve, …)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `tidings` script and `python -m tidings`."""
    app(args=argv, prog_name="tidings")
