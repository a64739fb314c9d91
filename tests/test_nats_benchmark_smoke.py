"""`python -m benchmarks jetstream --quick` runs tidings, raw nats-py and FastStream side by
side on a real nats-server (R1 and a 3-node R3 cluster) and prints its rows.

A smoke test only: the figures belong in `make bench`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.pg_plugin import needs

ROOT = Path(__file__).resolve().parent.parent
ROWS = [*(f"end to end R{r} (nats) vs {peer}" for r in (1, 3)
         for peer in ("nats-py", "FastStream")),
        "create-order sagas over messages: postgres + JetStream vs postgres",
        "create-order sagas over messages: sqlite + JetStream vs sqlite"]

pytestmark = [pytest.mark.service, pytest.mark.slow]


def test_nats_benchmark_runs_beside_its_peers(tmp_path: Path) -> None:
    needs("faststream", "the NATS benchmark's peer (in the dev extra)")
    results = tmp_path / "latest.json"
    env = {**os.environ, "COLUMNS": "200"}  # (TMPDIR stays: PostgreSQL runs as postgres)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "jetstream", "--quick", "--json", str(results)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(results.read_text())
    assert [r["name"] for r in report["rows"]] == ROWS, proc.stderr
    for r in report["rows"]:
        assert r["tidings"] > 0 and r["peer"] > 0
