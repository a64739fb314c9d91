"""`python -m benchmarks postgres --quick` runs, beside raw asyncpg and the eventsourcing library.

A smoke test only: it checks the benchmark still runs against the current
API (ours and the peers'), never how fast anything is. It uses the session's
PostgreSQL server (`TIDINGS_BENCH_POSTGRES_URL`), not a server of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.bench_smoke import needs_pg_peer, run_quick


def test_postgres_benchmark_runs(tmp_path: Path, postgres_server: Any) -> None:
    needs_pg_peer()
    report = run_quick("postgres", tmp_path, timeout=120,
                       env={"TIDINGS_BENCH_POSTGRES_URL": postgres_server.base_url})
    rows = {r["name"]: r for r in report}
    assert len(rows) == 5, list(rows)
    appends = rows["event appends through the repository, PostgreSQL"]
    assert appends["peer"] > 0 and appends["target"] == 3.0
    assert appends["events"] == appends["aggregates"] * 20
    for r in report:
        assert r["tidings"] > 0
