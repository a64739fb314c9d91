"""`python -m benchmarks pgscale --quick` runs, and its latency proxy does what it says.

Smoke tests only: they check the benchmark still runs against the current API
and that the proxy forwards bytes in order with its delay, never how fast
anything is. The benchmark uses the session's PostgreSQL server
(`TIDINGS_BENCH_POSTGRES_URL`), not a server of its own.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest
from benchmarks.latency_proxy import LatencyProxy, ProxyProcess
from tests.bench_smoke import needs_pg_peer, run_quick


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65_536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.mark.parametrize("kind", [LatencyProxy, ProxyProcess])
async def test_latency_proxy_forwards_in_order_with_its_delay(
        kind: type[LatencyProxy | ProxyProcess]) -> None:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = echo.sockets[0].getsockname()[1]
    try:
        async with kind("127.0.0.1", port, delay=0.001) as proxy:
            assert proxy.url("postgresql://u:p@127.0.0.1:5432/db?schema=s") == (
                f"postgresql://u:p@127.0.0.1:{proxy.port}/db?schema=s")

            async def connection(seed: int) -> None:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                try:
                    for i in range(5):  # a round trip: 1 ms out, 1 ms back, at least
                        t0 = time.perf_counter()
                        writer.write(b"ping %d" % i)
                        await writer.drain()
                        assert await reader.readexactly(6) == b"ping %d" % i
                        assert time.perf_counter() - t0 >= 0.002
                    rng = random.Random(seed)
                    data = rng.randbytes(300_000)
                    sent = 0

                    async def send() -> None:  # chunks of random sizes, some back to back
                        nonlocal sent
                        while sent < len(data):
                            size = rng.randint(1, 20_000)
                            writer.write(data[sent:sent + size])
                            sent += size
                            await writer.drain()
                            if rng.random() < 0.3:
                                await asyncio.sleep(0)

                    sender = asyncio.create_task(send())
                    assert await reader.readexactly(len(data)) == data
                    await sender
                    writer.write_eof()  # an end of stream goes through too
                    assert await reader.read() == b""
                finally:
                    writer.close()

            await asyncio.wait_for(asyncio.gather(connection(1), connection(2)), 20)
    finally:
        echo.close()
        await echo.wait_closed()


def test_pgscale_benchmark_runs(tmp_path: Path, postgres_server: Any) -> None:
    needs_pg_peer()
    rows = run_quick("pgscale", tmp_path, timeout=110,
                     env={"TIDINGS_BENCH_POSTGRES_URL": postgres_server.base_url})
    assert len(rows) == 7, [r["name"] for r in rows]  # --quick: 2 processes via the proxy only
    assert sorted(r["target"] for r in rows) == [0.5, 0.8, 0.8, 1.0, 1.0, 1.5, 3.0]
    for r in rows:
        assert "error" not in r, r
        assert r["tidings"] > 0 and r["peer"] > 0, r
        assert isinstance(r["ratio"], float) and r["ratio"] > 0, r
