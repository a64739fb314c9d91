"""Every row of the crash matrix, the engines each runs on, and how one is run."""

from __future__ import annotations

import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import consumers, diskfull, events, nats, pgrestart, publish, sagas
from .matrix import RowResult, Run, Target

__all__ = ["CASES", "Case", "run_case", "select"]


@dataclass(frozen=True)
class Case:
    """One row on one engine: `publish/single@sqlite`."""

    name: str
    run: Run
    #: "sqlite", "postgres", or "" for a row that brings its own (NATS).
    engine: str
    #: In the short version (tests/integration/test_crash_matrix.py).
    short: bool = True


_ROWS: list[tuple[str, Run, tuple[str, ...]]] = [
    ("publish/single", publish.single, ("sqlite", "postgres")),
    ("publish/batch", publish.batch, ("sqlite", "postgres")),
    ("publish/tasks", publish.tasks, ("sqlite", "postgres")),
    ("events", events.run, ("sqlite", "postgres")),
    ("consumers", consumers.run, ("sqlite", "postgres")),
    ("sagas/messages", sagas.messages, ("sqlite", "postgres")),
    ("sagas/inline", sagas.inline, ("sqlite", "postgres")),
    ("disk-full", diskfull.run, ("sqlite",)),
    ("pg-restart", pgrestart.run, ("postgres",)),
    ("nats-kill", nats.run, ("",)),
]

CASES: list[Case] = [Case(f"{name}@{engine}" if engine else name, fn, engine)
                     for name, fn, engines in _ROWS for engine in engines]


def select(only: list[str]) -> list[Case]:
    """The cases named, whose names start with one of `only`, or on an engine named
    '@engine' (all when `only` is empty)."""
    if not only:
        return list(CASES)
    return [c for c in CASES if any(c.name.startswith(o) or o.startswith("@")
                                    and c.name.endswith(o) for o in only)]


def run_case(case: Case, kills: int, seed: int, workdir: Path, target: Target | None
             ) -> RowResult:
    """Run one case with its own RNG (the same seed gives it the same random points,
    whatever else runs); an exception is a violation of the row, with its traceback."""
    rng = random.Random(f"{seed}/{case.name}")
    directory = workdir / case.name.replace("/", "-").replace("@", "-")
    directory.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    try:
        res = case.run(kills, rng, directory, target)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - reported in the table
        res = RowResult(case.name)
        res.violate(f"the row crashed: {traceback.format_exc()}")
    res.row = case.name
    res.seconds = time.monotonic() - began
    return res
