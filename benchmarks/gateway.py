"""HTTP gateway throughput: publish over HTTP on SQLite, single messages and batches of 100.

The server (`tidings.gateway.serve`, as `tidings serve` runs it, SQLite with
durability=full) runs in its own process; the load comes from this process
over keep-alive HTTP/1.1 connections driven by a minimal asyncio client (an
HTTP client library would cost more CPU than the server on a small machine,
and the two share it). Each figure is the median of `reps` timed windows
after a warm-up; every response is checked to be a 201.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import tidings

from . import progress, row, scratch_dir, summary

SINGLE_TARGET = 5_000.0  # requests/s, 32 concurrent keep-alive clients
BATCH_TARGET = 50_000.0  # messages/s, 100 messages per request
CLIENTS = 32
BATCH_CLIENTS = 16
BATCH = 100
PAYLOAD = {"order": "o-00000001", "customer": "c-42", "amount": 129.5,
           "note": "x" * 120}
SERVER = """
import asyncio, sys
from tidings.gateway import serve
asyncio.run(serve(sys.argv[1], "127.0.0.1", int(sys.argv[2]), None, None, log_level="warning"))
"""


@dataclass(frozen=True)
class Sizes:
    reps: int
    seconds: float  # one timed window
    warmup: float


FULL = Sizes(reps=3, seconds=5.0, warmup=1.0)
QUICK = Sizes(reps=1, seconds=0.5, warmup=0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _one_client(port: int, request: bytes, stop_at: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
                    break
            body = await reader.readexactly(length)
            if status != b"201":
                raise RuntimeError(f"server answered {head[:12]!r}: {body[:200]!r}")
            counts[0] += 1
    finally:
        writer.close()


async def _load(port: int, request: bytes, clients: int, seconds: float) -> float:
    """Requests per second from `clients` keep-alive connections for `seconds`."""
    counts = [0]
    start = time.perf_counter()
    stop_at = start + seconds
    await asyncio.gather(*[_one_client(port, request, stop_at, counts) for _ in range(clients)])
    return counts[0] / (time.perf_counter() - start)


class _Server:
    def __init__(self, directory: str) -> None:
        self.port = _free_port()
        url = f"sqlite:///{directory}/gateway.db"
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, url, str(self.port)],
                                     stdout=subprocess.DEVNULL)

    async def ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}")
            try:
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            ok = (await r.read()).startswith(b"HTTP/1.1 200")
            w.close()
            if ok:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the gateway did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _measure(request: bytes, clients: int, sizes: Sizes, label: str) -> list[float]:
    samples = []
    for rep in range(sizes.reps):
        with scratch_dir(f"gateway-{label}") as d:
            server = _Server(d)
            try:
                await server.ready()
                await _load(server.port, request, clients, sizes.warmup)
                samples.append(await _load(server.port, request, clients, sizes.seconds))
            finally:
                server.stop()
        progress(f"gateway {label}: rep {rep + 1}/{sizes.reps}: {samples[-1]:,.0f} req/s")
    return samples


async def _in_process(sizes: Sizes) -> float:
    """The same publishes straight on a hub (32 concurrent tasks): what HTTP adds to."""
    with scratch_dir("gateway-inproc") as d:
        async with await tidings.connect(f"sqlite:///{d}/t.db") as hub:
            n = 0
            stop_at = time.perf_counter() + sizes.seconds

            async def worker() -> None:
                nonlocal n
                while time.perf_counter() < stop_at:
                    await hub.publish("bench.http", PAYLOAD)
                    n += 1

            t0 = time.perf_counter()
            await asyncio.gather(*[worker() for _ in range(CLIENTS)])
            return n / (time.perf_counter() - t0)


async def run(quick: bool) -> list[dict[str, Any]]:
    sizes = QUICK if quick else FULL
    single = _request("/v1/topics/bench.http/messages", json.dumps({"data": PAYLOAD}).encode())
    batch = _request("/v1/topics/bench.http/messages",
                     json.dumps({"messages": [{"data": PAYLOAD}] * BATCH}).encode())
    ones = await _measure(single, CLIENTS, sizes, "single")
    batches = await _measure(batch, BATCH_CLIENTS, sizes, "batch")
    direct = await _in_process(sizes)
    cpus = os.cpu_count()
    rps = summary(ones)
    mps = summary(batches) * BATCH
    return [
        row(f"HTTP publish, {CLIENTS} keep-alive clients (sqlite)", rps, "none", None, "req/s",
            1.0, ratio=rps / SINGLE_TARGET, target_label=f"≥ {SINGLE_TARGET:,.0f} req/s",
            samples=ones, in_process_publish=direct, cpus=cpus,
            note=f"in-process hub.publish x{CLIENTS}: {direct:,.0f} msg/s"),
        row(f"HTTP publish, batches of {BATCH}, {BATCH_CLIENTS} clients (sqlite)", mps, "none",
            None, "msg/s", 1.0, ratio=mps / BATCH_TARGET,
            target_label=f"≥ {BATCH_TARGET:,.0f} msg/s",
            samples=[s * BATCH for s in batches], cpus=cpus),
    ]
