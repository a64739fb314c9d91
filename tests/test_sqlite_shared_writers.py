"""Two hubs writing one SQLite file in turns: each writer keeps the log's head (last
position, newest time) from its own last commit and re-reads it only when `PRAGMA
data_version` says another connection committed. Whatever the interleaving, the log
and the event positions stay gap-free, never reused, and times never go backwards."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import tidings


class SharedAcct(tidings.Aggregate):
    balance: int = 0

    def open(self) -> None:
        self.record(SharedOpened())

    def deposit(self, n: int) -> None:
        self.record(SharedDeposited(n=n))

    def apply(self, event: tidings.Event) -> None:
        if isinstance(event, SharedDeposited):
            self.balance += event.n


class SharedOpened(tidings.Event):
    pass


class SharedDeposited(tidings.Event):
    n: int


async def test_two_writers_in_turns_keep_positions_and_times_in_order(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    rng = random.Random(7)
    async with await tidings.connect(url) as h1, await tidings.connect(url) as h2:
        repos = {h1: h1.repository(SharedAcct), h2: h2.repository(SharedAcct)}
        opened: set[int] = set()
        expected: dict[int, int] = {}
        for i in range(300):
            hub = rng.choice([h1, h2])
            k = rng.randrange(8)
            if rng.random() < 0.3:
                await hub.publish("other.topic", {"i": i})
                continue
            repo = repos[hub]
            if k in opened:
                a = await repo.get(f"acct-{k}")
            else:
                a = SharedAcct(f"acct-{k}")
                a.open()
                opened.add(k)
            for n in range(1, rng.randrange(2, 5)):
                a.deposit(n)
                expected[k] = expected.get(k, 0) + n
            await repo.save(a)
        for k, total in expected.items():
            assert (await repos[h1].get(f"acct-{k}")).balance == total
            assert (await repos[h2].get(f"acct-{k}")).balance == total
    c = sqlite3.connect(f"{tmp_path}/shared.db")
    try:
        rows = c.execute("SELECT position, time FROM tidings_messages ORDER BY position").fetchall()
        assert [p for p, _ in rows] == list(range(1, len(rows) + 1))  # no gap, no reuse
        assert all(a[1] <= b[1] for a, b in zip(rows, rows[1:], strict=False))
        counter = c.execute("SELECT value FROM tidings_meta WHERE name = 'position'").fetchone()
        assert counter[0] == len(rows)
        events = [r[0] for r in c.execute("SELECT position FROM tidings_events ORDER BY position")]
        assert events == list(range(1, len(events) + 1))
    finally:
        c.close()
