"""`tidings dlq`: list a subscription's dead letters and move them back (redrive).

Registered on `tidings.cli.app` when that module is imported.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .cli_base import JsonOption, UrlOption, app, emit_json, fail, run, settings
from .redrive import summary

dlq_app = typer.Typer(help="Dead letters: list them, move them back to their topic.",
                      no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

GroupArgument = Annotated[str, typer.Argument(help="The subscription (group) that "
                                              "dead-lettered them.")]
TopicOption = Annotated[str | None, typer.Option(
    "--topic", help="Only those whose original topic matches this pattern.")]
DeadLetterOption = Annotated[str | None, typer.Option(
    "--dead-letter", help="The subscription's own dead-letter topic, if it named one "
    "(default $dlq.GROUP).")]


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    group: GroupArgument,
    topic: TopicOption = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1,
                                              help="At most N, oldest first.")] = None,
    redriven: Annotated[bool, typer.Option(
        "--redriven", help="Also those already moved back.")] = False,
    dead_letter: DeadLetterOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """GROUP's dead letters not moved back yet, oldest first."""
    engine_url, json_out = settings(ctx, url, as_json)

    async def go() -> list[dict[str, Any]]:
        from .hub import connect

        async with await connect(engine_url) as hub:
            found = await hub.dead_letters(group, topic=topic, limit=limit,
                                           dead_letter=dead_letter, redriven=redriven)
            return [summary(d) for d in found]

    rows = run(go())
    if json_out:
        for r in rows:
            emit_json(r)
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not rows:
        console.print(f"no dead letters for {escape(group)}")
        return
    table = Table(title=f"dead letters of {escape(group)}")
    for c in ("id", "original topic", "reason", "attempts", "time", "data"):
        table.add_column(c)
    for r in rows:
        data = r.get("data", r.get("data_b64", ""))
        table.add_row(escape(r["id"]), escape(r["original_topic"] or "-"),
                      escape(r["reason"] or "-"), str(r["attempts"] or "-"), r["time"],
                      escape(str(data)[:60]))
    console.print(table)


@dlq_app.command("redrive")
def dlq_redrive(
    ctx: typer.Context,
    group: GroupArgument,
    id: Annotated[list[str] | None, typer.Option(
        "--id", help="A dead letter's id, or its original message's (repeatable).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter of GROUP "
                                       "(with --topic/--limit: every one selected).")] = False,
    topic: TopicOption = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1,
                                              help="At most N, oldest first.")] = None,
    dead_letter: DeadLetterOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Move GROUP's dead letters back to their original topics, exactly once.

    Name them with --id, or pass --all. Each comes back as a new message (attempts
    from 1) that only GROUP's subscription gets again.
    """
    if not id and not all_:
        fail("name the dead letters to move with --id ID (repeatable), or pass --all; "
             "'tidings dlq list GROUP' shows them")
    if id and all_:
        fail("--id and --all do not go together: --id moves those named, --all every one")
    engine_url, json_out = settings(ctx, url, as_json)

    async def go() -> int:
        from .hub import connect

        async with await connect(engine_url) as hub:
            return await hub.redrive(group, topic=topic, ids=id or None, limit=limit,
                                     dead_letter=dead_letter)

    moved = run(go())
    if json_out:
        emit_json({"group": group, "moved": moved})
    else:
        typer.echo(f"moved {moved} dead letter(s) of {group} back to their topics")
