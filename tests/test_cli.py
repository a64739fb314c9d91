"""The `tidings` command line, run as users run it: a subprocess on a SQLite file.

Each test gets its own database under `tmp_path` (memory:// would not outlive
one process). A few checks of the terminal rendering run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.pg_plugin import needs

needs("typer", reason="the CLI needs the cli extra: pip install 'tidings[cli]'")

from typer.testing import CliRunner  # noqa: E402

from tidings import cli, cli_base  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Cli:
    """Runs `python -m tidings` against one SQLite file, from a scratch directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.cwd = tmp_path
        self.url = f"sqlite:///{tmp_path / 'cli.db'}"
        self.env = {k: v for k, v in os.environ.items() if k != "TIDINGS_URL"}

    def run(self, *args: str, url: str | None = "", env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        prefix = [] if url is None else ["--url", url or self.url]
        return subprocess.run(
            [sys.executable, "-m", "tidings", *prefix, *args],
            capture_output=True, text=True, cwd=self.cwd, env={**self.env, **(env or {})},
            input=input, timeout=60,
        )

    def ok(self, *args: str, **kw: Any) -> list[dict[str, Any]]:
        """Run, expect exit 0 and no error output, and parse stdout as JSON lines."""
        r = self.run(*args, **kw)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        return [json.loads(line) for line in r.stdout.splitlines()]


@pytest.fixture
def tidings_cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def test_publish_then_read_returns_data_key_and_headers(tidings_cli: Cli) -> None:
    [p1] = tidings_cli.ok("publish", "orders.created", '{"order": "o-1", "total": 30}',
                          "--key", "o-1", "--header", "trace=abc", "-H", "Tenant=acme")
    [p2] = tidings_cli.ok("publish", "orders.paid", "paid in full")
    [p3] = tidings_cli.ok("publish", "orders.paid", "123", "--raw")
    assert p1["topic"] == "orders.created" and p1["duplicate"] is False
    assert p1["position"] < p2["position"] < p3["position"]

    msgs = tidings_cli.ok("read", "orders.>")
    assert [m["position"] for m in msgs] == [p1["position"], p2["position"], p3["position"]]
    first, second, third = msgs
    assert first["id"] == p1["id"]
    assert first["topic"] == "orders.created"
    assert first["key"] == "o-1"
    assert first["data"] == {"order": "o-1", "total": 30}
    assert first["headers"]["trace"] == "abc"
    assert first["headers"]["tenant"] == "acme"  # header names are case-insensitive
    assert first["headers"]["content-type"] == "application/json"
    assert second["data"] == "paid in full" and second["key"] is None
    assert second["headers"]["content-type"].startswith("text/plain")
    assert third["data"] == "123"  # --raw: text, not the JSON number


def test_publish_reads_data_from_stdin(tidings_cli: Cli) -> None:
    tidings_cli.ok("publish", "orders.created", "-", input='{"from": "stdin"}')
    [msg] = tidings_cli.ok("read", "orders.created")
    assert msg["data"] == {"from": "stdin"}


def test_publish_with_the_same_id_is_stored_once(tidings_cli: Cli) -> None:
    [a] = tidings_cli.ok("publish", "payments.made", '{"n": 1}', "--id", "pay-1")
    [b] = tidings_cli.ok("publish", "payments.made", '{"n": 1}', "--id", "pay-1")
    assert a["duplicate"] is False and b["duplicate"] is True
    assert a["position"] == b["position"] and a["id"] == b["id"] == "pay-1"
    assert len(tidings_cli.ok("read", "payments.made")) == 1


def test_read_start_and_stop_select_a_range(tidings_cli: Cli) -> None:
    positions = [tidings_cli.ok("publish", "ticks", str(i))[0]["position"] for i in range(5)]
    msgs = tidings_cli.ok("read", "ticks", "--start", str(positions[1]),
                          "--stop", str(positions[3]))
    assert [m["data"] for m in msgs] == [1, 2, 3]
    assert tidings_cli.ok("read", "ticks", "--start", "end") == []


def test_subscribe_count_acks_so_the_group_does_not_get_them_again(tidings_cli: Cli) -> None:
    tidings_cli.ok("publish", "orders.created", '{"order": "o-1"}')
    tidings_cli.ok("publish", "orders.paid", '{"order": "o-1"}')
    got = tidings_cli.ok("subscribe", "orders.*", "--group", "billing", "--count", "2")
    assert [m["topic"] for m in got] == ["orders.created", "orders.paid"]
    assert all(m["attempt"] == 1 for m in got)

    assert tidings_cli.ok("subscribe", "orders.*", "--group", "billing", "--timeout", "0.2") == []

    tidings_cli.ok("publish", "orders.shipped", '{"order": "o-1"}')
    [new] = tidings_cli.ok("subscribe", "orders.*", "--group", "billing", "--timeout", "0.2")
    assert new["topic"] == "orders.shipped"
    # Another group is a separate subscription: it gets everything (fan-out).
    assert len(tidings_cli.ok("subscribe", "orders.*", "-g", "audit", "--timeout", "0.2")) == 3


def test_subscribe_no_ack_leaves_messages_for_redelivery(tidings_cli: Cli) -> None:
    tidings_cli.ok("publish", "jobs.run", '"a"')
    tidings_cli.ok("publish", "jobs.run", '"b"')
    first = tidings_cli.ok("subscribe", "jobs.run", "-g", "workers", "--count", "2",
                           "--no-ack", "--ack-wait", "0.1")
    assert [m["data"] for m in first] == ["a", "b"]
    # Unacked: they come back once ack_wait has passed, as a second attempt.
    again = tidings_cli.ok("subscribe", "jobs.run", "-g", "workers", "--count", "2",
                           "--timeout", "30")
    assert [m["data"] for m in again] == ["a", "b"]
    assert [m["attempt"] for m in again] == [2, 2]
    assert tidings_cli.ok("subscribe", "jobs.run", "-g", "workers", "--timeout", "0.2") == []


def test_dlq_list_and_redrive(tidings_cli: Cli) -> None:
    tidings_cli.ok("publish", "jobs.run", '"a"', "--id", "job-a")
    tidings_cli.ok("publish", "jobs.run", '"b"')
    tidings_cli.ok("subscribe", "jobs.run", "-g", "workers", "--count", "2", "--no-ack",
                   "--ack-wait", "0.1", "--max-deliver", "1")
    # their one attempt's lease runs out: the next look dead-letters them
    assert tidings_cli.ok("subscribe", "jobs.run", "-g", "workers", "--timeout", "0.3",
                          "--max-deliver", "1") == []
    dead = tidings_cli.ok("dlq", "list", "workers")
    assert [(d["data"], d["original_topic"], d["reason"], d["attempts"]) for d in dead] == [
        ("a", "jobs.run", "max_deliver", 1), ("b", "jobs.run", "max_deliver", 1)]

    refused = tidings_cli.run("dlq", "redrive", "workers")
    assert refused.returncode == 2 and "--all" in refused.stderr and "Traceback" not in refused.stderr
    assert tidings_cli.ok("dlq", "redrive", "workers", "--id", "job-a") == [
        {"group": "workers", "moved": 1}]
    assert tidings_cli.ok("dlq", "redrive", "workers", "--all") == [
        {"group": "workers", "moved": 1}]
    assert tidings_cli.ok("dlq", "redrive", "workers", "--all") == [
        {"group": "workers", "moved": 0}]
    assert tidings_cli.ok("dlq", "list", "workers") == []
    assert len(tidings_cli.ok("dlq", "list", "workers", "--redriven")) == 2
    back = tidings_cli.ok("subscribe", "jobs.run", "-g", "workers", "--count", "2",
                          "--timeout", "30")
    assert [(m["data"], m["attempt"]) for m in back] == [("a", 1), ("b", 1)]
    bad = tidings_cli.run("dlq", "list", "not a group")
    assert bad.returncode == 2 and "group" in bad.stderr and "Traceback" not in bad.stderr


def test_subscribe_start_end_skips_history(tidings_cli: Cli) -> None:
    tidings_cli.ok("publish", "orders.created", '"old"')
    assert tidings_cli.ok("subscribe", "orders.created", "-g", "late", "--start", "end",
                          "--timeout", "0.2") == []
    tidings_cli.ok("publish", "orders.created", '"new"')
    [msg] = tidings_cli.ok("subscribe", "orders.created", "-g", "late", "--timeout", "0.2")
    assert msg["data"] == "new"


def test_topics_shows_counts_and_subscription_lag(tidings_cli: Cli) -> None:
    for i in range(3):
        tidings_cli.ok("publish", "orders.created", json.dumps({"n": i}))
    tidings_cli.ok("publish", "orders.paid", '{"n": 0}')
    tidings_cli.ok("subscribe", "orders.created", "-g", "billing", "--count", "1")

    rows = {r["topic"]: r for r in tidings_cli.ok("topics")}
    assert set(rows) == {"orders.created", "orders.paid"}
    assert rows["orders.created"]["messages"] == 3
    assert rows["orders.paid"]["messages"] == 1
    [sub] = rows["orders.created"]["subscriptions"]
    assert sub["group"] == "billing" and sub["lag"] == 2
    assert rows["orders.paid"]["subscriptions"] == []


def test_invalid_topic_exits_2_and_names_the_rule(tidings_cli: Cli) -> None:
    r = tidings_cli.run("publish", "orders..created", "{}")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ")
    assert "dot-separated tokens" in r.stderr
    assert "Traceback" not in r.stderr
    r = tidings_cli.run("publish", "orders.*", "{}")
    assert r.returncode == 2 and "wildcards are for subscriptions" in r.stderr
    assert tidings_cli.ok("topics") == []  # nothing was stored


def test_bad_header_exits_2(tidings_cli: Cli) -> None:
    r = tidings_cli.run("publish", "orders.created", "{}", "--header", "no-equals-sign")
    assert r.returncode == 2
    assert "name=value" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("url", "code", "says"),
    [
        ("not-a-url", 2, "is not a URL"),
        ("nosuch://host/db", 2, "unknown engine 'nosuch'"),
        ("sqlite:///", 2, "no file path"),
        ("postgresql://user@127.0.0.1:1/db", 1, "127.0.0.1:1"),  # nothing listens on port 1
    ],
)
def test_bad_url_is_a_clear_error(tidings_cli: Cli, url: str, code: int, says: str) -> None:
    r = tidings_cli.run("topics", url=url)
    assert r.returncode == code
    assert r.stderr.startswith("error: ") and says in r.stderr
    assert "Traceback" not in r.stderr


def test_url_comes_from_env_or_after_the_command(tidings_cli: Cli) -> None:
    tidings_cli.ok("publish", "a.b", "1", url=None, env={"TIDINGS_URL": tidings_cli.url})
    assert len(tidings_cli.ok("read", "a.b", "--url", tidings_cli.url, url=None)) == 1
    # Without --url or TIDINGS_URL the default is ./tidings.db in the working directory.
    tidings_cli.ok("publish", "c.d", "2", url=None)
    assert (tidings_cli.cwd / "tidings.db").exists()
    assert [m["topic"] for m in tidings_cli.ok("read", ">", url=None)] == ["c.d"]


def test_demo_shop_runs_sagas_and_checks_invariants(tidings_cli: Cli) -> None:
    r = tidings_cli.run("demo", "shop", "--orders", "12", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "invariants hold" in r.stdout and "approved" in r.stdout
    sagas = tidings_cli.ok("sagas")
    assert len(sagas) == 12
    assert {s["status"] for s in sagas} <= {"completed", "compensated"}
    [one] = tidings_cli.ok("saga", sagas[0]["id"])
    assert one["id"] == sagas[0]["id"] and one["steps"][0]["event"] == "SagaStarted"
    assert tidings_cli.ok("sagas", "--status", "completed") == [
        s for s in sagas if s["status"] == "completed"]
    missing = tidings_cli.run("saga", "no-such-saga")
    assert missing.returncode == 1 and "no saga" in missing.stderr


def test_demo_shop_inline_keeps_the_invariants_without_command_messages(
        tidings_cli: Cli) -> None:
    r = tidings_cli.run("demo", "shop", "--orders", "40", "--seed", "5", "--inline")
    assert r.returncode == 0, r.stderr
    assert "inline handlers" in r.stdout and "invariants hold" in r.stdout
    sagas = tidings_cli.ok("sagas")
    assert len(sagas) == 40 and {s["status"] for s in sagas} == {"completed", "compensated"}
    # the services ran inline: no command reached a service's topic
    assert tidings_cli.ok("read", "customer.>") == []
    assert tidings_cli.ok("read", "inventory.>") == []


def test_demo_walkthrough_runs_and_can_run_again(tidings_cli: Cli) -> None:
    for _ in range(2):  # durable groups resume: the second run sees only its own orders
        r = subprocess.run(
            [sys.executable, "-m", "tidings", "--url", tidings_cli.url, "demo", "walkthrough"],
            capture_output=True, text=True, cwd=REPO, env=tidings_cli.env, timeout=60,
        )
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert "billing   got o-1, o-2, o-3, o-4" in out
        assert "analytics got o-1, o-2, o-3, o-4" in out
        assert "o-2 attempt 2: shipped, ack" in out
        assert "dead letter on $dlq.shipping: o-4" in out and "after 3 attempts" in out
        assert "retry reported duplicate=True" in out
        assert "dropped (and counted): 7" in out
    packed = [line for line in out.splitlines() if line.strip().startswith("worker-")]
    orders = sorted(o for line in packed for o in line.split(" packed ")[1].split(", "))
    assert orders == ["o-1", "o-2", "o-3", "o-4"]  # each packed exactly once


def test_importing_tidings_does_not_load_the_cli() -> None:
    code = "import sys, tidings; print(sorted(m for m in ('typer', 'rich') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# terminal rendering (in-process) -------------------------------------------------------------
def test_terminal_output_is_readable_and_json_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'tty.db'}"
    runner = CliRunner()
    monkeypatch.setattr(cli_base, "is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "200")

    r = runner.invoke(cli.app, ["--url", url, "publish", "orders.created", '{"total": 3}',
                                "--key", "o-1"])
    assert r.exit_code == 0, r.output
    assert "published orders.created at position 1" in r.output

    r = runner.invoke(cli.app, ["--url", url, "read", "orders.>"])
    assert r.exit_code == 0, r.output
    assert "#1" in r.output and "orders.created key=o-1" in r.output
    assert '{"total":3}' in r.output

    r = runner.invoke(cli.app, ["--url", url, "topics"])
    assert r.exit_code == 0, r.output
    assert "orders.created" in r.output and "messages" in r.output
    assert not r.output.lstrip().startswith("{")

    r = runner.invoke(cli.app, ["--url", url, "--json", "topics"])
    assert r.exit_code == 0, r.output
    [row] = [json.loads(line) for line in r.output.splitlines()]
    assert row["topic"] == "orders.created" and row["messages"] == 1


@pytest.mark.parametrize(("spec", "says"), [
    ("nosuch.mod:app", "cannot import 'nosuch.mod'"),
    ("tidings:no_such_app", "has no 'no_such_app'"),
])
def test_serve_with_a_bad_app_is_a_clear_error(tidings_cli: Cli, spec: str, says: str) -> None:
    r = tidings_cli.run("serve", "--app", spec, "--port", "0")
    assert r.returncode == 2  # refused before the server starts
    assert r.stderr.startswith("error: ") and says in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.service
def test_demo_shop_with_a_nats_broker(tidings_cli: Cli, nats_server: Any) -> None:
    """`--broker nats://…`: the sagas' state in the SQLite file, every command and reply
    through JetStream; the other commands see the same pair through the global option."""
    broker = nats_server.url_for(tidings_cli.url)
    r = tidings_cli.run("--broker", broker, "demo", "shop", "--orders", "12", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert f"broker={broker}" in r.stdout and "invariants hold" in r.stdout
    sagas = tidings_cli.ok("sagas")
    assert len(sagas) == 12 and {s["status"] for s in sagas} <= {"completed", "compensated"}
    # the commands went through NATS: its stream has them, the database's log is the outbox
    on_nats = tidings_cli.ok("read", "customer.>", url=broker)
    assert on_nats and all(m["topic"].startswith("customer.") for m in on_nats)
