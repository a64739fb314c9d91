"""Running a benchmark module's `--quick` pass in a subprocess, for the smoke tests: they
check that a benchmark still runs against the current API (ours and the peers'), never
how fast anything is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.pg_plugin import needs

ROOT = Path(__file__).resolve().parent.parent
#: What every row of the final table carries.
ROW_KEYS = {"name", "tidings", "peer_name", "peer", "unit", "ratio", "target"}


def needs_pg_peer() -> None:
    """Skip (or fail, under TIDINGS_REQUIRE_SERVICES) without the eventsourcing library's
    PostgreSQL persistence."""
    needs("eventsourcing", reason="the peer library is in the bench extra")
    needs("psycopg", reason="eventsourcing's PostgreSQL persistence needs psycopg 3")
    needs("psycopg_pool", reason="eventsourcing's PostgreSQL persistence needs it")


def run_quick(module: str, tmp_path: Path, *, timeout: float,
              env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """`python -W error -m benchmarks MODULE --quick --json …`: its rows (each with
    ROW_KEYS checked)."""
    results = tmp_path / "latest.json"
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "benchmarks", module, "--quick",
         "--json", str(results)],
        cwd=ROOT, env={**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp_path), **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(results.read_text())["rows"]
    for r in rows:
        assert ROW_KEYS <= r.keys(), r
    return rows
