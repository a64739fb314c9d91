"""`python -m benchmarks postgres --quick` runs, beside raw asyncpg and the eventsourcing library.

A smoke test only: it checks the benchmark still runs against the current
API (ours and the peers'), never how fast anything is. It uses the session's
PostgreSQL server (`TIDINGS_BENCH_POSTGRES_URL`), not a server of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.pg_plugin import needs

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"name", "tidings", "peer_name", "peer", "unit", "ratio", "target"}


def test_postgres_benchmark_runs(tmp_path: Path, postgres_server: Any) -> None:
    needs("eventsourcing", reason="the peer library is in the bench extra")
    needs("psycopg", reason="eventsourcing's PostgreSQL persistence needs psycopg 3")
    needs("psycopg_pool", reason="eventsourcing's PostgreSQL persistence needs it")
    results = tmp_path / "latest.json"
    env = {**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp_path),
           "TIDINGS_BENCH_POSTGRES_URL": postgres_server.base_url}
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "benchmarks", "postgres", "--quick",
         "--json", str(results)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(results.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert len(rows) == 5, list(rows)
    appends = rows["event appends through the repository, PostgreSQL"]
    assert appends["peer"] > 0 and appends["target"] == 3.0
    assert appends["events"] == appends["aggregates"] * 20
    for r in report["rows"]:
        assert ROW_KEYS <= r.keys()
        assert r["tidings"] > 0
