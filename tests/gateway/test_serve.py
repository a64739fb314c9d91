"""`serve()` as `tidings serve` runs it: a real process that stops promptly on a signal,
even with an event stream open, and the benchmark module still runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
SERVER = """
import asyncio, sys
from tidings.gateway import serve
try:
    asyncio.run(serve(sys.argv[1], "127.0.0.1", int(sys.argv[2]), sys.argv[3] or None, None,
                      log_level="warning"))
except KeyboardInterrupt:
    pass
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_serve_runs_and_stops_on_sigint_with_a_stream_open(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "TIDINGS_TOKEN": ""}
    proc = subprocess.Popen([sys.executable, "-W", "error", "-c", SERVER,
                             f"sqlite:///{tmp_path}/serve.db", str(port), "tok"], env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
            time.sleep(0.05)
        auth = {"Authorization": "Bearer tok"}
        assert httpx.get(f"{base}/v1/topics").status_code == 401
        assert httpx.post(f"{base}/v1/topics/a/messages", json={"data": 1},
                          headers=auth).status_code == 201
        with httpx.stream("GET", f"{base}/v1/topics/a/stream?start=beginning", headers=auth,
                          timeout=20) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    assert json.loads(line[5:])["data"] == 1
                    break
            proc.send_signal(signal.SIGINT)
            assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_gateway_benchmark_runs_quick(tmp_path: Path) -> None:
    results = tmp_path / "latest.json"
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "benchmarks", "gateway", "--quick",
         "--json", str(results)],
        cwd=ROOT, env={**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp_path)},
        capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(results.read_text())["rows"]
    assert [r["unit"] for r in rows] == ["req/s", "msg/s", "ms", "ms"]  # commands: 2 modes
    assert all(r["tidings"] > 0 for r in rows)
