"""`python -m benchmarks eventstore --quick` runs beside the eventsourcing library.

A smoke test only: it checks the benchmark still runs against the current
API (ours and the peer's), never how fast anything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.pg_plugin import needs

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"name", "tidings", "peer_name", "peer", "unit", "ratio", "target"}


def test_eventstore_benchmark_runs(tmp_path: Path) -> None:
    needs("eventsourcing", reason="the peer library is in the bench extra")
    results = tmp_path / "latest.json"
    env = {**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "benchmarks", "eventstore", "--quick",
         "--json", str(results)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(results.read_text())
    names = [r["name"] for r in report["rows"]]
    assert len(names) == 6 and any("append" in n for n in names), names
    assert any("snapshot" in n for n in names) and any("read_all" in n for n in names)
    for r in report["rows"]:
        assert ROW_KEYS <= r.keys()
        assert r["tidings"] > 0 and r["peer"] > 0
