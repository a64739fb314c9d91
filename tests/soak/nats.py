"""A NATS node SIGKILLed under load: a 3-node JetStream cluster with replicated streams
(R3), publishers of single messages and of atomic batches running, one node (the
stream's leader half of the time, as that is the hard case) killed per round and started
again. Every acknowledged publish is stored once, intact, at the position it was
acknowledged with; every acknowledged batch whole; the restarted nodes catch up.

A publish that raises `EngineUnavailable` (no leader for a moment) is retried with the
same id, so a retry of one that was in fact stored is a duplicate the server drops.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from pathlib import Path
from typing import Any

from tests.integration._child import payload
from tests.natsserver import NatsCluster, NatsServerUnavailable

import tidings

from .matrix import RowResult, Target
from .publish import BATCHES, SINGLES, check_batches, check_singles

BATCH = 5
#: How long one publish keeps retrying through an election before the row fails.
GUARD = 60.0


def run(kills: int, rng: random.Random, workdir: Path, target: Target) -> RowResult:
    res = RowResult("nats-kill")
    try:
        cluster = NatsCluster(3, directory=workdir / "nats")
        (workdir / "nats").mkdir(parents=True, exist_ok=True)
        cluster.start()
    except (NatsServerUnavailable, OSError) as exc:
        res.skipped = f"skipped: no nats-server ({exc})"
        return res
    try:
        asyncio.run(_Load(cluster, rng, res).run(kills))
    finally:
        cluster.stop()
    return res


class _Load:
    def __init__(self, cluster: NatsCluster, rng: random.Random, res: RowResult) -> None:
        self.cluster, self.rng, self.res = cluster, rng, res
        self.url = f"{cluster.url}?stream=soak{uuid.uuid4().hex[:8]}&replicas=3"
        self.singles: list[tuple[str, ...]] = []
        self.batches: list[str] = []
        self.retries = 0
        self.elections: list[float] = []
        self.done = False

    async def _publish(self, fn: Any) -> Any:
        deadline = time.monotonic() + GUARD
        while True:
            try:
                return await fn()
            except tidings.EngineUnavailable:
                self.retries += 1
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _singles(self, hub: tidings.Hub, k: int) -> None:
        i = 0
        while not self.done:
            mid = f"s{k}-{i}"
            out = await self._publish(lambda i=i, mid=mid: hub.publish(SINGLES, payload(i), id=mid))
            self.singles.append((mid, str(out.position)))
            i += 1

    async def _batches(self, hub: tidings.Hub, k: int) -> None:
        i = 0
        while not self.done:
            key = f"b{k}x{i}"
            items = [tidings.envelope(payload(j), key=key, id=f"{key}-{j}")
                     for j in range(BATCH)]
            await self._publish(lambda items=items: hub.publish_many(BATCHES, items))
            self.batches.append(key)
            i += 1

    async def _leader(self, hub: tidings.Hub) -> int:
        engine: Any = hub.engine
        info = await engine._api(f"STREAM.INFO.{engine.stream}", None)
        return int(info["cluster"]["leader"][1:]) - 1

    async def run(self, kills: int) -> None:
        async with await tidings.connect(self.url) as hub:
            clients = [asyncio.create_task(self._singles(hub, k)) for k in range(3)]
            clients.append(asyncio.create_task(self._batches(hub, 0)))
            try:
                for _ in range(kills):
                    await asyncio.sleep(self.rng.uniform(0.2, 1.5))
                    victim = (await self._publish(lambda: self._leader(hub))
                              if self.rng.random() < 0.5 else self.rng.randrange(3))
                    before = len(self.singles)
                    t0 = time.monotonic()
                    self.cluster.kill(victim)
                    while len(self.singles) == before:  # publishing resumed
                        await asyncio.sleep(0.01)
                        if any(c.done() for c in clients):
                            break
                    self.elections.append(time.monotonic() - t0)
                    self.res.kills += 1
                    await asyncio.to_thread(self.cluster.start, victim)
                await asyncio.sleep(0.5)
            finally:
                self.done = True
                outcomes = await asyncio.gather(*clients, return_exceptions=True)
            for o in outcomes:
                if isinstance(o, BaseException):
                    self.res.violate(f"a publisher gave up: {o!r}")
        await self._settled()
        async with await tidings.connect(self.url) as hub:
            await check_singles(hub, self.singles, self.res)
            await check_batches(hub, self.batches, self.res, size=BATCH)
        worst = max(self.elections, default=0.0)
        self.res.notes.append(f"publishing resumed after a kill in at most {worst:.1f}s; "
                              f"{self.retries} publishes retried")
        self.res.checked.append("restarted nodes caught up")

    async def _settled(self) -> None:
        """Every replica current again (reads may be answered by any node)."""
        async with await tidings.connect(self.url) as hub:
            engine: Any = hub.engine
            deadline = time.monotonic() + GUARD
            while time.monotonic() < deadline:
                info = await engine._api(f"STREAM.INFO.{engine.stream}", None)
                replicas = info.get("cluster", {}).get("replicas") or []
                if len(replicas) == 2 and all(r.get("current") and not r.get("lag")
                                              for r in replicas):
                    return
                await asyncio.sleep(0.2)
            self.res.violate("the restarted nodes did not catch up")
