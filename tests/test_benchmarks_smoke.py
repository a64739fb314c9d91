"""`python -m benchmarks pubsub --quick` runs and prints its table.

A smoke test only: it checks the benchmarks still run against the current
API, never how fast anything is (figures belong in `make bench`, not in tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUBSUB_ROWS = [
    "publish_many (sqlite)",
    "publish x100 concurrent (sqlite)",
    "end to end (sqlite)",
    "end to end (memory)",
]
ROW_KEYS = {"name", "tidings", "peer_name", "peer", "unit", "ratio", "target"}


def test_pubsub_benchmarks_run_and_print_one_table(tmp_path: Path) -> None:
    results = tmp_path / "latest.json"
    env = {**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "benchmarks", "pubsub", "--quick",
         "--json", str(results)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    for name in PUBSUB_ROWS:
        assert name in proc.stdout, f"{name!r} missing from the table:\n{proc.stdout}"
    for column in ("benchmark", "tidings", "peer", "ratio", "target", "met?"):
        assert column in proc.stdout

    report = json.loads(results.read_text())
    assert report["quick"] is True
    assert [r["name"] for r in report["rows"]] == PUBSUB_ROWS
    for r in report["rows"]:
        assert ROW_KEYS <= r.keys()
        assert r["tidings"] > 0  # something was measured; how much is not this test's business
