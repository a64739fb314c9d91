"""The disk fills up under a SQLite hub (a small tmpfs, filled by a balloon file): writes
raise a `TidingsError` (never a raw sqlite3 error, never a hang), nothing acknowledged is
lost, and once space is freed the same hub writes again. Each kill is one fill-and-free
cycle. Mounting needs root; without it the row is skipped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import subprocess
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from tests.integration._child import payload

import tidings

from .matrix import RowResult, Target
from .publish import check_batches, check_singles

SIZE = "16m"
#: Failed writes in a row that end a fill (each kind of write gets to fail).
FAILURES = 6
#: A write that takes longer than this has hung.
HUNG = 60.0
NEEDS_ROOT = "skipped: needs root to mount tmpfs"


def run(kills: int, rng: random.Random, workdir: Path, target: Target) -> RowResult:
    res = RowResult("disk-full")
    if os.geteuid() != 0:
        res.skipped = NEEDS_ROOT
        return res
    mnt = workdir / "tmpfs"
    mnt.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mnt)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        res.skipped = f"{NEEDS_ROOT} ({mounted.stderr.strip()})"
        return res
    try:
        asyncio.run(_cycles(f"sqlite:///{mnt}/full.db", mnt / "balloon", kills, rng, res))
    finally:
        _unmount(mnt)
    return res


def _unmount(mnt: Path) -> None:
    for _ in range(50):  # a child or a closing connection may hold it for a moment
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


class _Writes:
    """Publishes, batches and appends until the disk is full; what each acknowledged."""

    def __init__(self, hub: tidings.Hub, res: RowResult) -> None:
        self.hub = hub
        self.res = res
        self.singles: list[tuple[str, ...]] = []
        self.batches: list[str] = []
        self.version = 0  # of stream 'fill-1', as far as this writer knows
        self.appended: list[int] = []  # the versions acknowledged
        self.errors: list[str] = []
        self.n = 0

    async def one(self) -> bool:
        """One write of the next kind; False when it failed (as it should: with a
        TidingsError)."""
        self.n += 1
        i = self.n
        kind = i % 3
        try:
            if kind == 0:
                p = await self._guard(self.hub.publish("fill.single", payload(i), id=f"f-{i}"))
                self.singles.append((p.id, str(p.position)))
            elif kind == 1:
                await self._guard(self.hub.publish_many("fill.batch", [
                    tidings.envelope(payload(j), key=f"b{i}", id=f"b{i}-{j}") for j in range(5)]))
                self.batches.append(f"b{i}")
            else:
                out = await self._guard(self.hub.events.append(
                    "fill-1", [tidings.NewEvent(type="Filled", data={"n": i, "pad": "x" * 300})],
                    expected_version=self.version))
                self.version = out.version
                self.appended.append(out.version)
            return True
        except tidings.ConcurrencyError:  # an append whose outcome was unknown was stored
            self.version = await self.hub.events.stream_version("fill-1")
            return True
        except tidings.TidingsError as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return False
        except TimeoutError:
            self.res.violate(f"a write hung for {HUNG:.0f}s on a full disk")
            raise
        except Exception as exc:  # noqa: BLE001 - the finding: an untranslated error
            self.res.violate(f"a write on a full disk raised {type(exc).__name__}: {exc}")
            self.errors.append(repr(exc))
            return False

    @staticmethod
    async def _guard(op: Awaitable[Any]) -> Any:
        return await asyncio.wait_for(op, HUNG)


async def _cycles(url: str, balloon: Path, cycles: int, rng: random.Random,
                  res: RowResult) -> None:
    async with await tidings.connect(url) as hub:
        w = _Writes(hub, res)
        for _ in range(cycles):
            await w.one()  # the tables exist before the balloon takes the space
            st = os.statvfs(balloon.parent)
            margin = rng.randint(64, 1024) * 1024
            _inflate(balloon, max(0, st.f_bavail * st.f_frsize - margin))
            failed = 0
            while failed < FAILURES:
                failed = 0 if await w.one() else failed + 1
            res.kills += 1
            balloon.unlink()
            # space is back: the same hub writes again (each kind of write)
            for _ in range(3):
                res.expect(await w.one(), f"a write failed after space was freed: "
                                          f"{w.errors[-1] if w.errors else ''}")
        await _check(hub, w, res)
    async with await tidings.connect(url) as hub:  # and a new hub sees the same
        await _check(hub, w, res)
    res.acked = len(w.singles) + len(w.batches) + len(w.appended)
    kinds = sorted({e.split(":")[0] for e in w.errors})
    res.notes.append(f"errors={len(w.errors)} ({', '.join(kinds)})")
    if w.errors:  # (without the file's path)
        res.notes.append("e.g. " + re.sub(r"'sqlite:///[^']*'", "the file", w.errors[0]))
    res.checked = ["full disk raises TidingsError", "no hang", "writable once freed",
                   "acked publishes/batches/appends stored once, whole, intact (same and new hub)"]


def _inflate(balloon: Path, size: int) -> None:
    with balloon.open("wb") as f:
        chunk = b"\0" * (1 << 20)
        left = size
        with contextlib.suppress(OSError):  # full a little early: fine
            while left > 0:
                left -= f.write(chunk[:left])


async def _check(hub: tidings.Hub, w: _Writes, res: RowResult) -> None:
    await check_singles(hub, w.singles, res, topic="fill.single")
    await check_batches(hub, w.batches, res, topic="fill.batch", size=5)
    versions = [r.version async for r in hub.events.read("fill-1", raw=True)]
    res.expect(versions == list(range(1, len(versions) + 1)), "fill-1 versions have a gap")
    for v in w.appended:
        if v > len(versions):
            res.lose(f"acknowledged append to fill-1 at version {v}")
