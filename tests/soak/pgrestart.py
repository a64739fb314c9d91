"""The PostgreSQL server restarted under load (fast or immediate stop, sometimes left down
for longer than the clients retry): every acknowledged publish, batch and append survives,
a client that gives up sees `EngineUnavailable` (nothing else), and every client carries
on once the server is back. Each kill is one restart."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

from tests.integration._child import payload
from tests.integration._matrix_child import SoakCounter, ticked

import tidings

from .events import Save, check_streams
from .matrix import RowResult, Target
from .publish import check_batches, check_singles

PUBLISHERS = 4
APPENDERS = 2
STREAMS = 2
BATCH = 5
#: Clients retry a lost connection this long before raising EngineUnavailable.
RECONNECT = 2.0
#: Successful operations each client needs after the last restart (it recovered).
AFTER = 30
#: How long the clients may take to get them: only reached when they did not recover.
GUARD = 120.0


def run(kills: int, rng: random.Random, workdir: Path, target: Target) -> RowResult:
    res = RowResult("pg-restart")
    server = getattr(target, "server", None)
    if server is None:
        res.skipped = "skipped: needs a throwaway PostgreSQL server it may restart"
        return res
    url = target.url(workdir, "pg-restart")  # a fresh schema: '...?schema=t_...'
    asyncio.run(_Load(f"{url}&reconnect_timeout={RECONNECT}", server, rng, res).run(kills))
    return res


class _Load:
    """Publishers and appenders on one hub while the server restarts under them."""

    def __init__(self, url: str, server: Any, rng: random.Random, res: RowResult) -> None:
        self.url = url
        self.server = server
        self.rng = rng
        self.res = res
        self.singles: list[tuple[str, ...]] = []
        self.batches: list[str] = []
        self.saves: list[Save] = []
        self.errors = 0
        self.example = ""  # the first EngineUnavailable's message
        self.progress = asyncio.Event()  # set on every acknowledged operation
        self.counting = False  # after the last restart: count each client's successes
        self.after: dict[str, int] = {}
        self.done = False

    async def run(self, kills: int) -> None:
        async with await tidings.connect(self.url) as hub:
            clients = [asyncio.create_task(self._publisher(hub, k)) for k in range(PUBLISHERS)]
            clients += [asyncio.create_task(self._appender(hub, k)) for k in range(APPENDERS)]
            try:
                for _ in range(kills):
                    await self._acked(self.rng.randint(50, 400))
                    await self._restart()
                self.counting = True
                try:
                    await asyncio.wait_for(self._recovered(), GUARD)
                except TimeoutError:
                    self.res.violate(f"not every client recovered within {GUARD:.0f}s: "
                                     f"{self.after}")
            finally:
                self.done = True
                await asyncio.gather(*clients, return_exceptions=True)
        async with await tidings.connect(self.url) as hub:
            await check_singles(hub, self.singles, self.res, topic="burst.one")
            await check_batches(hub, self.batches, self.res, topic="burst.batch", size=BATCH)
            await check_streams(hub, [f"soak-{i}" for i in range(STREAMS)], self.saves,
                                self.rng, self.res)
        self.res.notes.append(f"EngineUnavailable while down={self.errors}")
        if self.example:
            self.res.notes.append(f"e.g. {self.example[:160]}")
        self.res.checked = list(dict.fromkeys(self.res.checked + [
            "only EngineUnavailable while down", "every client recovers"]))

    async def _acked(self, n: int) -> None:
        goal = self._count() + n
        while self._count() < goal:
            self.progress.clear()
            await self.progress.wait()

    def _count(self) -> int:
        return len(self.singles) + len(self.batches) + len(self.saves)

    async def _recovered(self) -> None:
        while len(self.after) < PUBLISHERS + APPENDERS or min(self.after.values()) < AFTER:
            self.progress.clear()
            await self.progress.wait()

    async def _restart(self) -> None:
        how = self.rng.choice(["fast", "immediate", "down"])
        if how == "down":  # down for longer than the clients retry: they must see errors
            await asyncio.to_thread(self.server.stop_server, self.rng.choice(["fast",
                                                                             "immediate"]))
            await asyncio.sleep(RECONNECT + self.rng.uniform(0.5, 2.0))
            await asyncio.to_thread(self.server.start_server)
        elif how == "fast":
            await asyncio.to_thread(self.server.restart, "fast")
        else:  # a crash: no shutdown checkpoint, the server recovers from its WAL
            await asyncio.to_thread(self.server.stop_server, "immediate")
            await asyncio.to_thread(self.server.start_server)
        self.res.kills += 1

    def _ok(self, client: str) -> None:
        if self.counting:
            self.after[client] = self.after.get(client, 0) + 1
        self.progress.set()

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, tidings.EngineUnavailable):
            self.errors += 1
            self.example = self.example or str(exc)
        else:
            self.res.violate(f"while the server restarted: {type(exc).__name__}: {exc}")

    async def _publisher(self, hub: tidings.Hub, k: int) -> None:
        i = 0
        while not self.done:
            i += 1
            try:
                if i % 10 == 0:  # all or nothing, even when its outcome was unknown
                    key = f"p{k}.{i}"
                    await hub.publish_many("burst.batch", [
                        tidings.envelope(payload(j), key=key, id=f"{key}-{j}")
                        for j in range(BATCH)])
                    self.batches.append(key)
                else:
                    p = await hub.publish("burst.one", payload(i), id=f"p{k}-{i}")
                    self.singles.append((p.id, str(p.position)))
                self._ok(f"publisher {k}")
            except Exception as exc:  # noqa: BLE001 - counted or reported
                self._failed(exc)

    async def _appender(self, hub: tidings.Hub, k: int) -> None:
        repo = hub.repository(SoakCounter, snapshot_every=4)
        writer, seq = f"a{k}", 0
        while not self.done:
            sid = f"soak-{self.rng.randrange(STREAMS)}"
            try:
                try:
                    agg = await repo.get(sid)
                except tidings.NotFound:
                    agg = SoakCounter(sid)
                first = agg.version + 1
                parts = self.rng.randint(1, 3)
                for part in range(parts):
                    agg.record(ticked(writer, seq, part, parts))
                await repo.save(agg)
                self.saves.append((sid, first, agg.version, writer, seq))
                self._ok(f"appender {k}")
            except tidings.ConcurrencyError:
                continue  # the other appender (or an append whose outcome was unknown)
            except Exception as exc:  # noqa: BLE001 - counted or reported
                self._failed(exc)
            seq += 1
