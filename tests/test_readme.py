"""The README's quick start runs as written, against the current API."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_quick_start_runs(tmp_path: Path) -> None:
    quick_start = python_blocks()[0]
    script = tmp_path / "quick_start.py"
    script.write_text(quick_start)
    r = subprocess.run([sys.executable, "-W", "error", str(script)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "stored at position 1"
    assert lines[1] == "billing got {'order': 'o-1', 'total': 30} attempt 1"
    assert lines[2] == "1 orders.created o-1 {'order': 'o-1', 'total': 30}"
    assert lines[3] == "kept [3, 4] dropped 3"
    assert (tmp_path / "shop.db").exists()


def test_event_sourcing_and_saga_snippet_runs(tmp_path: Path) -> None:
    snippet = python_blocks()[1]
    script = tmp_path / "es_saga.py"
    script.write_text(snippet)
    r = subprocess.run([sys.executable, "-W", "error", str(script)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "balance 42 at version 1: 30",
        "released 5",
        "compensated - step charge failed: card declined",
    ]
