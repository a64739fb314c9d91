"""`python -m benchmarks eventstore --quick` runs beside the eventsourcing library.

A smoke test only: it checks the benchmark still runs against the current
API (ours and the peer's), never how fast anything is.
"""

from __future__ import annotations

from pathlib import Path

from tests.bench_smoke import run_quick
from tests.pg_plugin import needs


def test_eventstore_benchmark_runs(tmp_path: Path) -> None:
    needs("eventsourcing", reason="the peer library is in the bench extra")
    report = run_quick("eventstore", tmp_path, timeout=100)
    names = [r["name"] for r in report]
    assert len(names) == 6 and any("append" in n for n in names), names
    assert any("snapshot" in n for n in names) and any("read_all" in n for n in names)
    for r in report:
        assert r["tidings"] > 0 and r["peer"] > 0
