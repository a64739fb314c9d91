"""The HTTP gateway on SQLite: publish throughput (single messages and batches of 100), and
the latency of asynchronous request-reply (POST a create-order command, then GET its
request with ?wait until it is completed) at 100 orders/s beside the same sagas started
in-process.

The server (`tidings.gateway.run`, as `tidings serve` runs it: uvicorn with
httptools, on uvloop; SQLite with durability=full) runs in its own process; the load comes from this process
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
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tidings

from . import paced, percentile, progress, row, scratch_dir, summary
from .saga import order

SINGLE_TARGET = 5_000.0  # requests/s, 32 concurrent keep-alive clients
BATCH_TARGET = 50_000.0  # messages/s, 100 messages per request
CLIENTS = 32
BATCH_CLIENTS = 16
BATCH = 100
PAYLOAD = {"order": "o-00000001", "customer": "c-42", "amount": 129.5,
           "note": "x" * 120}
COMMAND_RATE = 100.0  # orders/s
LATENCY_TARGET_MS = 20.0  # median, POST to "completed" visible
SERVER = """
import sys
from tidings.gateway import run
app = None
if len(sys.argv) > 3:
    sys.path.insert(0, sys.argv[3])
    from benchmarks.gateway import shop, shop_inline
    app = shop_inline if sys.argv[4] == "inline" else shop
run(sys.argv[1], "127.0.0.1", int(sys.argv[2]), None, app, log_level="warning")
"""
ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class Sizes:
    reps: int
    seconds: float  # one timed window
    warmup: float


FULL = Sizes(reps=3, seconds=5.0, warmup=1.0)
QUICK = Sizes(reps=1, seconds=0.25, warmup=0.1)


async def shop(hub: tidings.Hub, inline: bool = False) -> dict[str, Any]:
    """The app the latency server runs: the saga benchmark's shop (every order runs all
    four steps), over messages or with its handlers inline."""
    from examples.shop.saga import create_order  # on the path since .saga is imported

    from .saga import setup_shop

    return {create_order.name: await setup_shop(hub, inline)}


async def shop_inline(hub: tidings.Hub) -> dict[str, Any]:
    """The same shop with its handlers inline in the coordinator's transactions."""
    return await shop(hub, inline=True)


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
    def __init__(self, directory: str, *, with_shop: bool = False, inline: bool = False
                 ) -> None:
        self.port = _free_port()
        url = f"sqlite:///{directory}/gateway.db"
        args = [sys.executable, "-c", SERVER, url, str(self.port)] + (
            [ROOT, "inline" if inline else "messages"] if with_shop else [])
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)

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


class _Connections:
    """A pool of keep-alive HTTP/1.1 connections (one request at a time on each)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._all: list[asyncio.StreamWriter] = []

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self._idle:
            reader, writer = self._idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self._all.append(writer)
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"\r\n" + body)
        response = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in response.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        content = await reader.readexactly(length)
        self._idle.append((reader, writer))
        return int(response[9:12]), content

    def close(self) -> None:
        for w in self._all:
            w.close()


refused = [0]  # 429s met by the latency run (a sign the sagas fell behind)


async def _command_latency(sizes: Sizes, inline: bool) -> list[float]:
    """POST /v1/commands/create-order, then GET /v1/requests/{id}?wait (answered when the
    saga ends) until it is completed."""
    with scratch_dir("gateway-commands") as d:
        server = _Server(d, with_shop=True, inline=inline)
        refused[0] = 0
        try:
            await server.ready()
            pool = _Connections(server.port)

            async def call(method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
                while True:  # a polite client: 429 means wait and retry
                    status, content = await pool.request(method, path, body)
                    if status != 429:
                        return status, content
                    refused[0] += 1
                    await asyncio.sleep(0.1)

            async def one(i: int) -> float:
                t0 = time.perf_counter()
                status, body = await call("POST", "/v1/commands/create-order",
                                          json.dumps(order(i)).encode())
                if status != 202:
                    raise RuntimeError(f"command refused: {status} {body[:200]!r}")
                path = f"/v1/requests/{json.loads(body)['request_id']}?wait=30"
                while True:
                    status, body = await call("GET", path)
                    state = json.loads(body)
                    if state.get("status") == "completed":
                        return time.perf_counter() - t0
                    if state.get("status") not in ("pending", "running"):
                        raise RuntimeError(f"order {i} did not complete: {state}")

            await paced(COMMAND_RATE, sizes.warmup, one)
            try:
                return await paced(COMMAND_RATE, sizes.seconds * 2, one)
            finally:
                pool.close()
        finally:
            server.stop()


async def _in_process_saga_latency(sizes: Sizes, inline: bool) -> list[float]:
    """The same orders at the same rate with sagas.start + sagas.wait in one process."""
    with scratch_dir("gateway-sagas") as d:
        async with await tidings.connect(f"sqlite:///{d}/t.db") as hub:
            sagas = (await shop(hub, inline))["create-order"]
            runner = asyncio.create_task(hub.run())

            async def one(i: int) -> float:
                t0 = time.perf_counter()
                state = await sagas.wait(await sagas.start(order(i)), timeout=120)
                if state["status"] != "completed":
                    raise RuntimeError(f"order {i} did not complete: {state}")
                return time.perf_counter() - t0

            try:
                await paced(COMMAND_RATE, sizes.warmup, one)
                return await paced(COMMAND_RATE, sizes.seconds * 2, one)
            finally:
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)


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
    commands = []
    for mode, inline in (("inline handlers", True), ("messages", False)):
        refused[0] = 0
        http_ms = await _command_latency(sizes, inline)
        progress(f"gateway commands ({mode}): median {statistics.median(http_ms):.1f} ms "
                 "over HTTP")
        local_ms = await _in_process_saga_latency(sizes, inline)
        p50, local50 = statistics.median(http_ms), statistics.median(local_ms)
        commands.append(row(
            f"command → completed over HTTP, median at {COMMAND_RATE:.0f}/s (sqlite, {mode})",
            p50, "in-process start+wait", local50, "ms", 1.0, ratio=LATENCY_TARGET_MS / p50,
            target_label=f"median ≤ {LATENCY_TARGET_MS:.0f} ms",
            p99=percentile(http_ms, 0.99), peer_p99=percentile(local_ms, 0.99),
            orders=len(http_ms), refused_429=refused[0],
            note="GET /v1/requests/{id}?wait answers when the saga ends; the peer column is "
                 "the same sagas started and awaited in one process"))
    return [
        row(f"HTTP publish, {CLIENTS} keep-alive clients (sqlite)", rps, "none", None, "req/s",
            1.0, ratio=rps / SINGLE_TARGET, target_label=f"≥ {SINGLE_TARGET:,.0f} req/s",
            samples=ones, in_process_publish=direct, cpus=cpus,
            note=f"in-process hub.publish x{CLIENTS}: {direct:,.0f} msg/s"),
        row(f"HTTP publish, batches of {BATCH}, {BATCH_CLIENTS} clients (sqlite)", mps, "none",
            None, "msg/s", 1.0, ratio=mps / BATCH_TARGET,
            target_label=f"≥ {BATCH_TARGET:,.0f} msg/s",
            samples=[s * BATCH for s in batches], cpus=cpus),
        *commands,
    ]
