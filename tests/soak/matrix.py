"""What every row of the crash matrix shares: its result, where it stores, its child processes.

A row is a function `run(kills, rng, workdir, target) -> RowResult`. It crashes something
`kills` times at points drawn from `rng` (a process SIGKILLed, a server restarted, a disk
filled), then compares what was acknowledged with what is stored. It never asserts: it
counts losses, duplicates and corruption, and states each broken invariant in the result,
so the soak run can print a table and the short pytest version can assert on the same
numbers.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from tests.integration.test_sqlite_crash import _kill_after

__all__ = ["ROOT", "PgTarget", "RowResult", "SqliteTarget", "Target", "kill_after", "spawn",
           "watchdog"]

ROOT = Path(__file__).resolve().parents[2]
#: Problems kept per row (the counts are always complete).
KEEP = 20


@dataclass
class RowResult:
    """What one row found. `ok` when nothing was lost, duplicated or corrupted and every
    invariant held."""

    row: str
    kills: int = 0
    acked: int = 0
    lost: int = 0
    duplicated: int = 0
    corrupt: int = 0
    violations: int = 0
    #: The invariants the row checked, in a few words each.
    checked: list[str] = field(default_factory=list)
    #: Counts worth seeing beside the invariants (conflicts, errors while down, ...).
    notes: list[str] = field(default_factory=list)
    #: Each loss, duplicate, corruption or violation as a sentence (the first KEEP).
    problems: list[str] = field(default_factory=list)
    #: Why the row did not run ("skipped: ...", "n/a: ...").
    skipped: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.corrupt or self.violations)

    def _note(self, problem: str) -> None:
        if len(self.problems) < KEEP:
            self.problems.append(problem)

    def lose(self, problem: str) -> None:
        self.lost += 1
        self._note(f"lost: {problem}")

    def duplicate(self, problem: str) -> None:
        self.duplicated += 1
        self._note(f"duplicated: {problem}")

    def corrupted(self, problem: str) -> None:
        self.corrupt += 1
        self._note(f"corrupt: {problem}")

    def violate(self, problem: str) -> None:
        self.violations += 1
        self._note(f"violated: {problem}")

    def expect(self, holds: bool, problem: str) -> None:
        if not holds:
            self.violate(problem)

    def report(self) -> str:
        """Several lines: the counts, the invariants, then each problem."""
        head = (f"{self.row}: kills={self.kills} acked={self.acked} lost={self.lost} "
                f"duplicated={self.duplicated} corrupt={self.corrupt} "
                f"violations={self.violations}")
        lines = [head, f"  checked: {'; '.join(self.checked)}"]
        if self.notes:
            lines.append(f"  notes: {', '.join(self.notes)}")
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


# where a row stores ------------------------------------------------------------------------
class Target(Protocol):
    """The engine a row runs on: each `url()` is a fresh, empty store."""

    engine: str

    def url(self, workdir: Path, name: str) -> str: ...


class SqliteTarget:
    engine = "sqlite"

    def url(self, workdir: Path, name: str) -> str:
        return f"sqlite:///{workdir}/{name}.db"


class PgTarget:
    """A fresh schema per `url()` on a PostgreSQL server (tests/pg_plugin.py's `PgService`);
    `server` is the throwaway server when it is ours (rows that restart it need that)."""

    engine = "postgres"

    def __init__(self, service: Any) -> None:
        self.service = service

    @property
    def server(self) -> Any:
        return self.service.server

    def url(self, workdir: Path, name: str) -> str:
        return str(self.service.new_url())


Run = Callable[[int, random.Random, Path, Target], RowResult]


# child processes ---------------------------------------------------------------------------
def spawn(module: str, *args: str, stderr: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    """`python -m tests.integration.<module> ARGS` from the repository root."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", f"tests.integration.{module}", *args],
        stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT, env=env,
    )


@contextmanager
def watchdog(proc: subprocess.Popen[str], seconds: float) -> Iterator[threading.Event]:
    """SIGKILL `proc` if the block takes longer than `seconds`, so a child that stops
    printing ends a blocking read (with EOF) instead of hanging the run. The event says
    whether it fired."""
    fired = threading.Event()

    def kill() -> None:
        if proc.poll() is None:
            fired.set()
            proc.kill()

    timer = threading.Timer(seconds, kill)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


#: How long a child may go without reaching its kill point before it counts as stalled.
GUARD = 120.0


def kill_after(proc: subprocess.Popen[str], lines: int, res: RowResult) -> list[str]:
    """`_kill_after` (tests/integration/test_sqlite_crash.py): read `lines` acknowledged
    lines, SIGKILL the child, return every line it printed. A child that dies by itself
    (or stalls for `GUARD` seconds) is a violation of the row rather than an exception."""
    with watchdog(proc, GUARD) as fired:
        try:
            out = _kill_after(proc, lines)
        except pytest.fail.Exception as exc:
            res.violate(f"child {'stalled' if fired.is_set() else 'exited early'}: {exc}")
            proc.kill()
            proc.communicate()
            return []
    res.kills += 1
    return out
