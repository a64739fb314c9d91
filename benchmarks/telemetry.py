"""What OpenTelemetry tracing costs: off (the default), on with a no-op tracer provider,
and on with the SDK recording every span into its in-memory exporter — side by side,
the same runs interleaved, on memory:// (where tidings' own CPU is all there is to see).

- end to end: publish_many in batches, a `@hub.subscriber` acking each message (a
  `send` span per batch, a `process` and a `settle` span per message when tracing);
- the shop's create-order saga over messages (a `saga` span; per step a `send`, a
  `process` and a `settle` span for the command and for its reply);
- the same saga with its handlers inline (a `saga` span and a `process` span per step).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import tidings

from . import progress, row, summary
from .saga import _throughput

TOPIC = "bench.traced"
BATCH = 100
#: where the SDK's spans go (emptied after each run: a run records up to ~150,000)
EXPORTED: Any = None


def _providers() -> dict[str, Any]:
    global EXPORTED
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import NoOpTracerProvider

    EXPORTED = InMemorySpanExporter()

    sdk = TracerProvider()
    sdk.add_span_processor(SimpleSpanProcessor(EXPORTED))
    return {"off": False, "no-op provider": NoOpTracerProvider(), "SDK, in-memory": sdk}


async def end_to_end(n: int, telemetry: Any) -> float:
    async with await tidings.connect("memory://", telemetry=telemetry) as hub:
        done = asyncio.Event()
        got = 0

        @hub.subscriber(TOPIC, group="bench", max_in_flight=1000, concurrency=50)
        async def handle(msg: tidings.Message) -> None:
            nonlocal got
            got += 1
            if got == n:
                done.set()

        payload = os.urandom(64)
        runner = asyncio.create_task(hub.run())
        t0 = time.perf_counter()
        for _ in range(n // BATCH):
            await hub.publish_many(TOPIC, [payload] * BATCH)
        await done.wait()
        rate = n / (time.perf_counter() - t0)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return rate


async def run(quick: bool) -> list[dict[str, Any]]:
    try:
        providers = _providers()
    except ImportError:
        progress("telemetry: opentelemetry-sdk is not installed (pip install -e '.[dev]'); "
                 "skipped")
        return []
    n, sagas, reps = (2_000, 100, 1) if quick else (50_000, 1_000, 3)
    rows = []
    for label, measure, unit in (
        ("end to end, subscriber (memory)", lambda t: end_to_end(n, t), "msg/s"),
        ("create-order sagas, messages (memory)",
         lambda t: _throughput("memory://", sagas, 50, False, telemetry=t), "sagas/s"),
        ("create-order sagas, inline (memory)",
         lambda t: _throughput("memory://", sagas, 50, True, telemetry=t), "sagas/s"),
    ):
        figures: dict[str, list[float]] = {k: [] for k in providers}
        spans_per_run: dict[str, int] = {}
        for rep in range(reps):
            for name, provider in providers.items():  # interleaved: noise hits all alike
                figures[name].append(await measure(provider))
                spans = len(EXPORTED.get_finished_spans())
                EXPORTED.clear()
                if provider is not False and name.startswith("SDK"):
                    spans_per_run[name] = spans
            progress(f"telemetry: {label} run {rep + 1}/{reps}: " + ", ".join(
                f"{k} {v[-1]:,.0f}" for k, v in figures.items()))
        off = summary(figures["off"])
        for name in ("no-op provider", "SDK, in-memory"):
            rows.append(row(f"{label}, tracing {name}", summary(figures[name]),
                            "tracing off", off, unit, 0.0,
                            target_label="(overhead)", samples=figures[name],
                            off_samples=figures["off"],
                            spans=spans_per_run.get(name),
                            note=f"median of {reps}; ratio = traced / off"))
    return rows
