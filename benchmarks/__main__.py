"""`python -m benchmarks [pubsub|eventstore|saga|gateway|…|all] [--quick] [--json PATH]`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import re
import sqlite3
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import available, progress

DEFAULT_JSON = Path(__file__).resolve().parent.parent / "bench-results" / "latest.json"
COLUMNS = ("benchmark", "tidings", "peer", "peer figure", "ratio", "target", "met?")


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:,.2f}"
    return f"{value:.3g}"


def _figure(value: Any, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, float)):
        return f"{_number(float(value))} {unit}".strip()
    return str(value)


def _target(row: dict[str, Any]) -> float | None:
    """The minimum ratio; a module may also give it as text such as '≥ 0.60'."""
    target = row.get("target")
    if target is None or isinstance(target, (int, float)):
        return target
    found = re.search(r"[-+]?\d+(?:\.\d+)?", str(target).replace(",", ""))
    return float(found.group()) if found else None


def _met(row: dict[str, Any]) -> bool | None:
    if isinstance(row.get("met"), bool):
        return bool(row["met"])
    target, ratio = _target(row), row.get("ratio")
    if target is None or ratio is None:
        return None
    return bool(ratio >= target)


def _cells(row: dict[str, Any]) -> tuple[str, ...]:
    unit = str(row.get("unit") or "")
    target = row.get("target")
    label = row.get("target_label")
    if label is None:
        label = "—" if target is None else (
            f"≥ {target:.2f}" if isinstance(target, (int, float)) else str(target))
    ratio = row.get("ratio")
    met = _met(row)
    return (
        str(row.get("name", "?")),
        _figure(row.get("tidings"), unit),
        str(row.get("peer_name") or "none"),
        _figure(row.get("peer"), unit),
        "—" if ratio is None else f"{ratio:.2f}",
        str(label),
        "—" if met is None else ("yes" if met else "NO"),
    )


def print_table(rows: list[dict[str, Any]], notes: list[str]) -> None:
    """The one table of the run: rich when it is installed, plain text otherwise."""
    cells = [_cells(r) for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c[i]) for c in [COLUMNS, *cells]) for i in range(len(COLUMNS))]
        line = "  ".join("-" * w for w in widths)
        print(line)
        print("  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths, strict=True)))
        print(line)
        for c in cells:
            print("  ".join(v.rjust(w) if i in (1, 3, 4) else v.ljust(w)
                            for i, (v, w) in enumerate(zip(c, widths, strict=True))))
        print(line)
        for n in notes:
            print(f"note: {n}")
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))  # piped: do not wrap rows at 80
    table = Table(title="tidings benchmarks")
    for i, h in enumerate(COLUMNS):
        numeric = i in (1, 3, 4)
        table.add_column(h, justify="right" if numeric else "left", no_wrap=True)
    for c, r in zip(cells, rows, strict=True):
        met = _met(r)
        style = None if met is None else ("green" if met else "bold red")
        table.add_row(*c[:-1], f"[{style}]{c[-1]}[/]" if style else c[-1])
    console.print(table)
    for n in notes:
        console.print(f"note: {n}", highlight=False)


def _load() -> float | None:
    """The 1-minute load average (None where the OS does not report one)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _busy(load: float | None) -> str | None:
    """A warning when other work competes for the CPUs: every figure then drops and wobbles."""
    cpus = os.cpu_count() or 1
    if load is None or load <= cpus / 2:
        return None
    return (f"the machine was busy (1-minute load {load:.1f} on {cpus} CPUs): figures are "
            "depressed and noisy; ratios, measured side by side, hold up better than "
            "absolute figures")


def _selected(names: list[str], known: list[str]) -> list[str]:
    if not names or "all" in names:
        return known
    return [m for m in known if m in names]


def main(argv: list[str] | None = None) -> int:
    known = available()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure tidings side by side with its peers and print one table.",
    )
    parser.add_argument("which", nargs="*", metavar="{" + ",".join([*known, "all"]) + "}",
                        help="benchmark modules to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: checks the benchmarks run, the figures mean nothing")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help=f"where to write the rows (default: {DEFAULT_JSON})")
    args = parser.parse_args(argv)
    unknown = [n for n in args.which if n not in (*known, "all")]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(known)}, all")

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    failed = False
    load_before = _load()
    busy = _busy(load_before)
    if busy:
        notes.append(busy)
        progress(busy)
    started = time.perf_counter()
    for name in _selected(args.which, known):
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            what = "not written yet" if exc.name == f"{__package__}.{name}" else (
                f"needs {exc.name!r}, which is not installed")
            notes.append(f"{name}: skipped ({what})")
            progress(f"{name}: skipped ({what})")
            continue
        progress(f"{name}: running{' (quick)' if args.quick else ''}")
        t0 = time.perf_counter()
        try:
            got = asyncio.run(module.run(args.quick))
        except Exception:
            traceback.print_exc()
            notes.append(f"{name}: FAILED (traceback on stderr)")
            failed = True
            continue
        for r in got:
            r.setdefault("module", name)
        rows.extend(got)
        progress(f"{name}: done in {time.perf_counter() - t0:.1f}s")
    if args.quick:
        notes.append("--quick: tiny sizes, the figures are not measurements")
    load_after = _load()
    if not busy and (busy := _busy(load_after)):
        notes.append(busy)

    print_table(rows, notes)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_after,
        "notes": notes,
        "rows": [{**r, "met": _met(r)} for r in rows],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    progress(f"rows written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
