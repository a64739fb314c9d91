"""PostgreSQL at full speed (issue 13): every figure it asks for, beside SQLite, in one run.

One throwaway PostgreSQL server with its default durability (fsync and
synchronous_commit on; or `TIDINGS_BENCH_POSTGRES_URL`), a fresh schema per
measurement; SQLite in a fresh scratch directory per measurement (durability
full). Within a repetition PostgreSQL and SQLite run one after the other, the
first of them alternating; every ratio is the median of the per-repetition
ratios.

Rows (tidings on PostgreSQL / the comparison, and the target ratio):
1. the shop's create-order saga with inline handlers, 200 clients (`benchmarks/saga.py`):
   PostgreSQL / SQLite, >= 0.8;
2. the same saga over messages (each step a command and a reply): PostgreSQL / SQLite, >= 0.8;
3. end to end, publish_many -> 4 consumer hubs sharing one subscription -> ack
   (`benchmarks/postgres.py`): PostgreSQL / SQLite, >= 1.0;
4. event appends through the repository (`benchmarks/eventstore.py`'s aggregate, 10 events
   per save, durability full) against the `eventsourcing` library's PostgreSQL persistence
   on the same server, one save at a time: >= 1.0; 50 saves in flight: >= 3.0;
5. the saga over messages with the database 1 ms away each way (`latency_proxy.py`, a
   proxy in a process of its own) /
   the same with no proxy: >= 0.5;
6. two coordinator processes (spawned; each its own hub on one schema with the shop's
   services and the saga's coordinator, n/2 sagas with 100 clients each, timed from a
   common barrier until both finished) / one such process running n with 200 clients
   on the same freshly seeded schema: >= 1.5; with the proxy in between, and without
   (--quick runs only the proxied one).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import tidings

from . import paired_ratio, progress, row, scratch_dir, summary
from .latency_proxy import ProxyProcess
from .postgres import (
    CONSUMERS,
    PAYLOAD_BYTES,
    _drop_schema,
    _schema_url,
    end_to_end,
    es_append_pg,
    server,
    tidings_append_pg,
)
from .saga import _throughput, order
from .saga import seed_shop as seed_hub

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the shop, as saga.py does

from examples.shop.domain import Customer, Product  # noqa: E402
from examples.shop.saga import create_order  # noqa: E402
from examples.shop.services import register_services  # noqa: E402

CLIENTS = 200  # the saga benchmark's clients; each of 2 processes takes half
DELAY = 0.001  # s, each way, through the proxy
APPENDS_IN_FLIGHT = 50
RUN_TIMEOUT = 300.0
BARRIER_TIMEOUT = 120.0
BATCH = 1_000


@dataclass(frozen=True)
class Sizes:
    reps: int
    sagas: int  # per measurement (split between the processes in row 6)
    e2e: int  # messages end to end
    aggregates: int  # event appends: aggregates x per_aggregate events, 10 per save
    per_aggregate: int


FULL = Sizes(reps=2, sagas=400, e2e=50_000, aggregates=500, per_aggregate=50)
QUICK = Sizes(reps=1, sagas=40, e2e=2_000, aggregates=10, per_aggregate=20)


@contextlib.asynccontextmanager
async def _pg_schema(base: str) -> AsyncIterator[str]:
    url = _schema_url(base)
    try:
        yield url
    finally:
        await _drop_schema(base, url)


def _via(proxy: ProxyProcess | None, url: str) -> str:
    return proxy.url(url) if proxy is not None else url


class Pairs:
    """Named measurements taken side by side, one sample per repetition each.

    A measurement that fails is reported on its row (`error`) and the run goes on:
    one broken figure does not cost the other rows of a run of minutes.
    """

    def __init__(self) -> None:
        self.rep = 0
        self.samples: dict[str, dict[int, float]] = {}
        self.errors: dict[str, str] = {}

    async def take(self, name: str, unit: str, fn: Callable[[], Awaitable[float]]) -> None:
        self.samples.setdefault(name, {})
        try:
            value = await asyncio.wait_for(fn(), RUN_TIMEOUT)
        except Exception as exc:
            self.errors.setdefault(name, f"{type(exc).__name__}: {exc}"[:500])
            progress(f"pgscale: {name}: FAILED: {type(exc).__name__}: {exc}")
            return
        self.samples[name][self.rep] = value
        progress(f"pgscale: {name}: {value:,.0f} {unit}")

    def row(self, name: str, ours: str, theirs: str, peer_name: str, unit: str,
            target: float, **extra: Any) -> dict[str, Any] | None:
        """The row of `ours` against `theirs`; None when `ours` was not measured."""
        if ours not in self.samples:
            return None
        a, b = self.samples[ours], self.samples.get(theirs, {})
        both = sorted(a.keys() & b.keys())
        ratio = paired_ratio([a[r] for r in both], [b[r] for r in both]) if both else None
        errors = {k: self.errors[k] for k in (ours, theirs) if k in self.errors}
        if errors:
            extra["error"] = "; ".join(f"{k}: {v}" for k, v in errors.items())
            extra["note"] = f"FAILED ({extra['error']})"
        r = row(name, summary(list(a.values())) if a else 0.0, peer_name,
                summary(list(b.values())) if b else None, unit, target, ratio=ratio,
                samples=list(a.values()), peer_samples=list(b.values()), **extra)
        if not a:
            r["tidings"] = None
        return r


# 1, 2, 5: the shop's saga in one process ------------------------------------------------
async def shop_pg(base: str, n: int, inline: bool, proxy: ProxyProcess | None = None) -> float:
    async with _pg_schema(base) as url:
        return await _throughput(_via(proxy, url), n, CLIENTS, inline)


async def shop_sqlite(n: int, inline: bool) -> float:
    with scratch_dir("pgscale-shop") as d:
        return await _throughput(f"sqlite:///{d}/shop.db", n, CLIENTS, inline)


# 3: end to end ------------------------------------------------------------------------------
async def e2e_pg(base: str, payloads: list[bytes], n: int) -> float:
    async with _pg_schema(base) as url:
        return await end_to_end(url, payloads, n)


async def e2e_sqlite(payloads: list[bytes], n: int) -> float:
    with scratch_dir("pgscale-e2e") as d:
        return await end_to_end(f"sqlite:///{d}/e2e.db", payloads, n)


# 6: coordinator processes -----------------------------------------------------------------
async def seed_shop(url: str) -> None:
    """The customers and products of `benchmarks/saga.py`'s shop (ample credit and stock);
    the coordinator processes find the prices in the catalogue."""
    async with await tidings.connect(url) as hub:
        await seed_hub(hub)


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine so far (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # (idle and iowait are not busy)


@dataclass(frozen=True)
class Share:
    """What one coordinator process reports: its timed window, the CPU it used in it,
    and the machine's CPU ticks at both ends."""

    start: float
    end: float
    cpu: float  # s, this process
    ticks: tuple[tuple[int, int], tuple[int, int]] | None


async def _coordinator(url: str, first: int, count: int, clients: int,
                       barrier: Any) -> Share:
    """One process's share: the shop's services and coordinator on its own hub; `count`
    sagas from a common start; then it keeps serving until every process is done."""
    async with await tidings.connect(url) as hub:
        register_services(hub, inline=False)
        sagas = hub.sagas(create_order)
        runner = asyncio.create_task(hub.run())
        try:
            # Warm up, untimed, as the in-process benchmark's seeding does on its hub: without
            # it the first sagas of a fresh hub run at half speed (through the proxy).
            for i in range(1, 21):
                await hub.repository(Customer).get(f"c-{i}")
                await hub.repository(Product).get(f"p-{i}")
            await asyncio.to_thread(barrier.wait, BARRIER_TIMEOUT)
            todo = iter(range(first, first + count))

            async def client() -> None:
                for i in todo:
                    sid = await sagas.start(order(i))
                    st = await sagas.wait(sid, timeout=RUN_TIMEOUT)
                    assert st["status"] == "completed", st

            start = time.monotonic()  # system-wide on Linux: comparable across processes
            cpu0, ticks0 = time.process_time(), _machine_ticks()
            await asyncio.gather(*(client() for _ in range(clients)))
            end = time.monotonic()
            cpu, ticks1 = time.process_time() - cpu0, _machine_ticks()
            # the others may still need this hub's services (their commands are shared)
            await asyncio.to_thread(barrier.wait, BARRIER_TIMEOUT)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
    return Share(start, end, cpu,
                 None if ticks0 is None or ticks1 is None else (ticks0, ticks1))


def _coordinator_process(url: str, first: int, count: int, clients: int, barrier: Any,
                         results: Any) -> None:
    """A spawned process's entry point: its (start, end), or the error as text."""
    try:
        results.put(asyncio.run(_coordinator(url, first, count, clients, barrier)))
    except BaseException as exc:  # reported to the parent, which raises it
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put(f"{type(exc).__name__}: {exc}")


async def processes(base: str, n: int, count: int, proxy: ProxyProcess | None,
                    cpu: list[tuple[float, float | None]] | None = None) -> float:
    """Completed sagas/s of `count` coordinator processes sharing a fresh schema, n in all;
    to `cpu`, (the processes' CPU per saga in ms, how busy the machine was in %)."""
    ctx = multiprocessing.get_context("spawn")
    async with _pg_schema(base) as url:
        await seed_shop(url)
        barrier = ctx.Barrier(count)
        results = ctx.Queue()
        share = n // count
        procs = [ctx.Process(target=_coordinator_process, daemon=True, args=(
            _via(proxy, url), k * share, share if k < count - 1 else n - k * share,
            CLIENTS // count, barrier, results)) for k in range(count)]
        for p in procs:
            p.start()
        try:
            got: list[Any] = []
            deadline = time.monotonic() + RUN_TIMEOUT
            while len(got) < count:
                try:
                    got.append(await asyncio.to_thread(results.get, True, 1.0))
                except queue.Empty:
                    dead = [p for p in procs if not p.is_alive() and p.exitcode]
                    if dead or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"coordinator processes: {len(got)} of {count} reported; exit "
                            f"codes {[p.exitcode for p in procs]}") from None
            errors = [g for g in got if isinstance(g, str)]
            if errors:
                raise RuntimeError(f"coordinator process failed: {errors[0]}")
            for p in procs:
                await asyncio.to_thread(p.join, 30)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    await asyncio.to_thread(p.join, 5)
            results.close()
        first = min(got, key=lambda g: g.start)
        last = max(got, key=lambda g: g.end)
        if cpu is not None:
            busy = None
            if first.ticks is not None and last.ticks is not None:
                (b0, t0), (b1, t1) = first.ticks[0], last.ticks[1]
                busy = 100.0 * (b1 - b0) / (t1 - t0) if t1 > t0 else None
            cpu.append((1000.0 * sum(g.cpu for g in got) / n, busy))
        return float(n / (last.end - first.start))


def _pct(busy: float | None) -> str:
    return "?" if busy is None else f"{busy:.0f}%"


def _cpu(cpu: dict[str, list[tuple[float, float | None]]], via: str) -> str:
    """The process rows' CPU figures (medians): whether the machine, not the design,
    is what two processes ran out of."""
    parts = []
    for count in (1, 2):
        got = cpu.get(f"{count} process{'es' if count > 1 else ''}, {via}", [])
        if got:
            ms = summary([g[0] for g in got])
            busy = [g[1] for g in got if g[1] is not None]
            parts.append(f"{count}: {ms:.2f} ms CPU/saga in the coordinator processes, "
                         f"machine {_pct(summary(busy) if busy else None)} busy")
    return "; ".join(parts)


# 4: event appends -----------------------------------------------------------------------
def _es_missing() -> str | None:
    try:
        import eventsourcing.postgres  # noqa: F401 - the peer, with psycopg 3 and its pool
    except ModuleNotFoundError as exc:
        return exc.name or "eventsourcing"
    return None


# the run ------------------------------------------------------------------------------------
async def run(quick: bool) -> list[dict[str, Any]]:
    s = QUICK if quick else FULL
    payloads = [os.urandom(PAYLOAD_BYTES) for _ in range(BATCH)]
    missing = _es_missing()
    if missing:
        progress(f"pgscale: event appends without the peer ({missing!r} is not installed; "
                 "pip install 'tidings[bench]')")
    m = Pairs()
    n = s.sagas
    cpu: dict[str, list[tuple[float, float | None]]] = {}  # process rows: CPU, busy
    async with server() as base, ProxyProcess.to(base, DELAY) as proxy:
        for rep in range(1, s.reps + 1):
            progress(f"pgscale: repetition {rep}/{s.reps}")
            m.rep = rep
            pg_first = rep % 2 == 1
            for mode, inline in (("inline", True), ("messages", False)):
                shop = [(f"shop {mode}, postgres", partial(shop_pg, base, n, inline)),
                        (f"shop {mode}, sqlite", partial(shop_sqlite, n, inline))]
                for name, fn in shop if pg_first else shop[::-1]:
                    await m.take(name, "sagas/s", fn)
            await m.take("shop messages, postgres, 1 ms away", "sagas/s",
                         partial(shop_pg, base, n, False, proxy))
            e2e = [("end to end, postgres", partial(e2e_pg, base, payloads, s.e2e)),
                   ("end to end, sqlite", partial(e2e_sqlite, payloads, s.e2e))]
            for name, fn in e2e if pg_first else e2e[::-1]:
                await m.take(name, "msg/s", fn)
            if missing is None:
                await m.take("appends, eventsourcing", "events/s",
                             partial(es_append_pg, base, s.aggregates, s.per_aggregate))
            for k in (1, APPENDS_IN_FLIGHT):
                await m.take(f"appends, tidings x{k}", "events/s",
                             partial(tidings_append_pg, base, s.aggregates, s.per_aggregate, k))
            ways = [("1 ms away", proxy), ("direct", None)]
            for via, p in ways[:1] if quick else ways:  # quick: the proxied one only
                for count in (1, 2):
                    name = f"{count} process{'es' if count > 1 else ''}, {via}"
                    await m.take(name, "sagas/s", partial(processes, base, n, count, p,
                                                          cpu.setdefault(name, [])))
                    if cpu[name]:
                        ms, busy = cpu[name][-1]
                        progress(f"pgscale: {name}: {ms:.2f} ms CPU per saga in the "
                                 f"coordinator processes; machine {_pct(busy)} busy")

    how = (f"median of {s.reps}; PostgreSQL defaults (fsync, synchronous_commit on), "
           "SQLite durability full")
    peer_es = ("eventsourcing (postgres)" if missing is None
               else f"eventsourcing (not installed: {missing})")
    appends = dict(aggregates=s.aggregates, events=s.aggregates * s.per_aggregate,
                   per_save=10)
    rows = [
        m.row("shop sagas, inline (postgres vs sqlite)", "shop inline, postgres",
              "shop inline, sqlite", "tidings on sqlite", "sagas/s", 0.8, sagas=n,
              clients=CLIENTS, note=how),
        m.row("shop sagas, messages (postgres vs sqlite)", "shop messages, postgres",
              "shop messages, sqlite", "tidings on sqlite", "sagas/s", 0.8, sagas=n,
              clients=CLIENTS, note=how),
        m.row(f"end to end, {CONSUMERS} consumers (postgres vs sqlite)",
              "end to end, postgres", "end to end, sqlite", "tidings on sqlite", "msg/s", 1.0,
              messages=s.e2e, note=f"{how}; publish_many x{BATCH} -> {CONSUMERS} consumer "
                                   "hubs on one subscription -> ack"),
        m.row("event appends, 1 at a time (postgres)", "appends, tidings x1",
              "appends, eventsourcing", peer_es, "events/s", 1.0, **appends,
              note="each save awaited before the next, as the peer does"),
        m.row(f"event appends, {APPENDS_IN_FLIGHT} in flight (postgres)",
              f"appends, tidings x{APPENDS_IN_FLIGHT}", "appends, eventsourcing", peer_es,
              "events/s", 3.0, **appends,
              note="eventsourcing's Application.save, one at a time (it is synchronous)"),
        m.row(f"shop sagas, messages, postgres {DELAY * 1000:g} ms away",
              "shop messages, postgres, 1 ms away", "shop messages, postgres",
              "no proxy", "sagas/s", 0.5, sagas=n, delay_ms=DELAY * 1000,
              note="a TCP proxy (its own process) delays every chunk by 1 ms each way"),
        m.row(f"shop sagas, 2 processes, postgres {DELAY * 1000:g} ms away",
              "2 processes, 1 ms away", "1 process, 1 ms away",
              "1 process", "sagas/s", 1.5, sagas=n, delay_ms=DELAY * 1000,
              cpu=_cpu(cpu, "1 ms away"),
              note=f"{CLIENTS // 2} clients each (1 process: {CLIENTS}); timed from a common "
                   "barrier to both finished; every connection through the proxy; "
                   + _cpu(cpu, "1 ms away")),
        m.row("shop sagas, 2 processes (postgres)",
              "2 processes, direct", "1 process, direct", "1 process",
              "sagas/s", 1.5, sagas=n, cpu=_cpu(cpu, "direct"),
              note="as above, without the proxy; " + _cpu(cpu, "direct")),
    ]
    return [r for r in rows if r is not None]  # quick: no 2-process run without the proxy
