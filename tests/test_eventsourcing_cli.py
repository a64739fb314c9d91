"""The event-store command-line views: stream history and state, projection rebuild and status."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import tidings
from tidings.eventsourcing.cli import events, load_app, projections_rebuild, projections_status

APP = '''
from typing import Any
import tidings

class CliOpened(tidings.Event):
    owner: str

class CliDeposited(tidings.Event):
    amount: int

class CliAccount(tidings.Aggregate):
    owner: str = ""
    balance: int = 0

    def apply(self, event: Any) -> None:
        match event:
            case CliOpened(owner=o): self.owner = o
            case CliDeposited(amount=a): self.balance += a

def create(tx):
    tx.execute("CREATE TABLE IF NOT EXISTS cli_totals (stream TEXT PRIMARY KEY, n INTEGER)")

def reset(tx):
    create(tx)
    tx.execute("DELETE FROM cli_totals")

def setup(hub):
    @hub.projection("cli-totals", reset=reset)
    async def totals(event: CliDeposited, tx: Any) -> None:
        create(tx)
        tx.execute("INSERT INTO cli_totals VALUES (?, ?) ON CONFLICT (stream) "
                   "DO UPDATE SET n = n + excluded.n", (tx.record.stream_id, event.amount))
'''


@pytest.fixture
def shop(tmp_path: Path) -> tuple[str, str, list[str]]:
    """A SQLite store with one account stream, and the app file that defines it."""
    app_file = tmp_path / "cli_app.py"
    app_file.write_text(textwrap.dedent(APP))
    url = f"sqlite:///{tmp_path}/cli.db"

    async def fill() -> list[str]:
        async with await tidings.connect(url) as hub:
            await load_app(f"{app_file}:setup", hub)
            mod = sys.modules["cli_app"]
            repo = hub.repository(mod.CliAccount)
            acct = mod.CliAccount("acct-1")
            acct.record(mod.CliOpened(owner="ann"))
            await repo.save(acct, headers={"actor": "ann"})
            times = []
            for amount in (10, 20, 30):
                acct.record(mod.CliDeposited(amount=amount))
                await repo.save(acct)
            async for rec in hub.events.read("acct-1"):
                times.append(rec.time.isoformat())
            await hub.events.append("raw-1", [tidings.NewEvent(type="Untyped", data={"a": 1})])
            return times

    return url, str(app_file), asyncio.run(fill())


def lines(capsys: pytest.CaptureFixture[str]) -> list[Any]:
    return [json.loads(x) for x in capsys.readouterr().out.splitlines() if x]


def test_events_prints_history_and_state(shop: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url, app, _ = shop
    events(url, "acct-1", json=True, app=f"{app}:setup")
    out = lines(capsys)
    assert [x["version"] for x in out[:-1]] == [1, 2, 3, 4]
    assert out[0]["type"] == "CliOpened" and out[0]["headers"]["actor"] == "ann"
    assert out[1]["data"] == {"amount": 10}
    assert out[-1]["state"] == {"owner": "ann", "balance": 60}
    assert out[-1]["version"] == out[-1]["current_version"] == 4


def test_events_at_a_version_and_a_time(shop: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url, app, times = shop
    events(url, "acct-1", version=2, json=True, app=app)
    out = lines(capsys)
    assert len(out) == 3 and out[-1]["state"] == {"owner": "ann", "balance": 10}
    events(url, "acct-1", as_of=times[2], json=True, app=app)
    out = lines(capsys)
    assert out[-1]["version"] >= 3 and out[-1]["state"]["balance"] >= 30


def test_events_without_the_aggregate_class(shop: Any, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    url, _, _ = shop
    events(url, "raw-1", json=True)
    out = lines(capsys)
    assert out[0]["data"] == {"a": 1} and out[-1]["state"] is None
    assert "no aggregate type" in out[-1]["note"]
    with pytest.raises(tidings.NotFound):
        events(url, "nobody", json=True)
    with pytest.raises(tidings.InvalidArgument):
        events(url, "acct-1", json=True, app="no_such_module_anywhere:setup")


def test_events_table_on_a_terminal(shop: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url, app, _ = shop
    summary = events(url, "acct-1", version=3, app=app)
    out = capsys.readouterr().out
    assert "CliDeposited" in out and "state at version 3" in out and "balance = 30" in out
    assert summary["state"] == {"owner": "ann", "balance": 30}


def test_projection_rebuild_and_status(shop: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url, app, _ = shop
    status = projections_rebuild(url, "cli-totals", f"{app}:setup", json=True)
    assert (status.status, status.position) == ("running", 5)
    assert lines(capsys)[0]["name"] == "cli-totals"
    status = projections_rebuild(url, "cli-totals", app)  # again: the reset clears the table
    assert "cli-totals: running at position 5" in capsys.readouterr().out
    import sqlite3

    conn = sqlite3.connect(url.split("///", 1)[1])
    try:
        assert conn.execute("SELECT stream, n FROM cli_totals").fetchall() == [("acct-1", 60)]
    finally:
        conn.close()
    projections_status(url, json=True)
    assert [(x["name"], x["lag"]) for x in lines(capsys)] == [("cli-totals", 0)]
    with pytest.raises(tidings.NotFound):
        projections_rebuild(url, "nope", app)
