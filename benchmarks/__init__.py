"""tidings side by side with its peers: one command, one table at the end.

Run with `make bench` or `python -m benchmarks [pubsub|eventstore|saga|gateway|…|all] [--quick]`.

Each benchmark module exposes `async def run(quick: bool) -> list[dict]`,
one dict per row of the final table:

    name       what is measured ("publish_many (sqlite)")
    tidings    tidings' figure (a number, in `unit`)
    peer_name  what it is compared with ("sqlite3 executemany"; "none" for an absolute target)
    peer       the peer's figure (None when there is no peer)
    unit       "msg/s", "events/s", …
    ratio      tidings / peer (for an absolute target: tidings / the target figure)
    target     the minimum ratio that meets the goal (1.0 for an absolute target)

Optional keys: `target_label` (shown instead of "≥ <target>"), `note`, and
anything else worth keeping in bench-results/latest.json (samples, sizes).
`--quick` shrinks every size so the whole run is a smoke test, not a measurement.
"""

from __future__ import annotations

import asyncio
import pkgutil
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["MODULES", "available", "progress", "row", "scratch_dir", "summary"]

#: The benchmarks `make bench` promises, in the order they run; one not written yet is
#: skipped with a note. Any other module in this package is found and runs after them.
MODULES = ("pubsub", "eventstore", "saga", "gateway")


def available() -> list[str]:
    """Every benchmark name: MODULES first, then other modules of this package."""
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return [*MODULES, *(name for name in found if name not in MODULES)]


def progress(message: str) -> None:
    """One progress line on stderr (stdout is kept for the table)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@contextmanager
def scratch_dir(label: str) -> Iterator[str]:
    """A fresh temporary directory for one measurement, removed afterwards.

    It lives under the system temp dir, which must be a real disk for the
    durability=full figures to mean anything (fsync on tmpfs is free).
    """
    path = tempfile.mkdtemp(prefix=f"tidings-bench-{label}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def publish_batches(hub: Any, topic: str, payloads: Sequence[bytes], n: int) -> None:
    """Publish `n` messages with `publish_many`, `len(payloads)` at a time."""
    done = 0
    while done < n:
        size = min(len(payloads), n - done)
        await hub.publish_many(topic, payloads[:size])
        done += size


async def paced(rate: float, seconds: float,
                 one: Callable[[int], Coroutine[Any, Any, float]]) -> list[float]:
    """Start `one(i)` at `rate` per second for `seconds`; their latencies in ms."""
    tasks: list[asyncio.Task[float]] = []
    start = time.perf_counter()
    for i in range(max(1, int(rate * seconds))):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    return [x * 1000 for x in await asyncio.gather(*tasks)]


def percentile(values: list[float], q: float) -> float:
    """The value below which a fraction `q` of `values` lies (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """The median of the ratios of runs made side by side (robust to drift between pairs)."""
    return summary([a / b for a, b in zip(ours, theirs, strict=True)])


def summary(samples: Sequence[float]) -> float:
    """The figure reported for repeated runs: their median."""
    return float(statistics.median(samples))


def row(
    name: str,
    tidings: float,
    peer_name: str,
    peer: float | None,
    unit: str,
    target: float,
    *,
    ratio: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A table row; `ratio` defaults to tidings / peer."""
    if ratio is None:
        ratio = tidings / peer if peer else None
    return {"name": name, "tidings": tidings, "peer_name": peer_name, "peer": peer,
            "unit": unit, "ratio": ratio, "target": target, **extra}
