"""`python -m tests.soak [--kills N] [--only ROW ...] [--seed S] [--keep]`: run the crash
matrix and print a table; exit status 1 when a row lost, duplicated or corrupted anything
or broke an invariant."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

from tests.pg_plugin import ENV_URL, PgService
from tests.pgserver import FAST, PgServer, PgServerUnavailable

from .matrix import PgTarget, RowResult, SqliteTarget, Target
from .rows import CASES, run_case, select

COLUMNS = ("row", "kills", "acked", "lost", "dup", "corrupt", "secs", "result")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    ap.add_argument("--kills", type=int, default=20, help="crashes per row (default 20)")
    ap.add_argument("--only", action="extend", nargs="+", default=[], metavar="ROW",
                    help="run only these rows: a name, its prefix ('publish') or an "
                         "engine ('@postgres')")
    ap.add_argument("--seed", type=int, default=None, help="the random points' seed")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    if args.kills < 1:
        ap.error("--kills must be at least 1")
    cases = select(args.only)
    if not cases:
        ap.error(f"no row matches {args.only}; rows: {', '.join(c.name for c in CASES)}")
    seed = args.seed if args.seed is not None else secrets.randbelow(1 << 32)
    print(f"seed {seed} (rerun with --seed {seed}); {args.kills} kills per row", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="tidings-soak-"))
    results: list[RowResult] = []
    pg: PgServer | None = None
    try:
        targets: dict[str, Target | None] = {"sqlite": SqliteTarget(), "": None}
        skipped: dict[str, str] = {}
        if any(c.engine == "postgres" for c in cases):
            pg, reason = _postgres(targets)
            if reason:
                skipped["postgres"] = reason
        for case in cases:
            if case.engine in skipped:
                res = RowResult(case.name, skipped=skipped[case.engine])
            else:
                res = run_case(case, args.kills, seed, workdir, targets[case.engine])
            results.append(res)
            print(_line(res), flush=True)
    finally:
        if pg is not None:
            pg.stop()
        failed = [r for r in results if not r.ok]
        if failed or args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(results))
    for r in failed:
        print()
        print(r.report())
    print(f"\nseed {seed}: {len(failed)} of {len(results)} rows failed")
    return 1 if failed else 0


def _postgres(targets: dict[str, Target | None]) -> tuple[PgServer | None, str]:
    """Start a throwaway server (or use $TIDINGS_TEST_POSTGRES_URL); why not, if not."""
    external = os.environ.get(ENV_URL)
    if external:
        targets["postgres"] = PgTarget(PgService(external, None))
        return None, ""
    try:
        import asyncpg  # noqa: F401

        server = PgServer(settings=dict(FAST))
        server.start()
    except (ImportError, PgServerUnavailable, OSError) as exc:
        return None, f"skipped: PostgreSQL unavailable: {str(exc).splitlines()[0]}"
    targets["postgres"] = PgTarget(PgService(server.url(), server))
    return server, ""


def _cells(r: RowResult) -> list[str]:
    result = "ok" if r.ok else "FAIL"
    return [r.row, str(r.kills), str(r.acked), str(r.lost), str(r.duplicated), str(r.corrupt),
            f"{r.seconds:.0f}", result]


def _line(r: RowResult) -> str:
    """A progress line, printed as each row ends."""
    if r.skipped:
        return f"{r.row}: {r.skipped}"
    return (f"{r.row}: {'ok' if r.ok else 'FAIL'} (kills={r.kills} acked={r.acked} "
            f"lost={r.lost} dup={r.duplicated} corrupt={r.corrupt} "
            f"violations={r.violations}, {r.seconds:.0f}s)")


def table(results: list[RowResult]) -> str:
    """One line per row: its counts, then the invariants it checked (and its notes)."""
    ran = [_cells(r) for r in results if not r.skipped]
    widths = [max(len(cells[i]) for cells in [list(COLUMNS), *ran]) for i in range(len(COLUMNS))]
    widths[0] = max([widths[0]] + [len(r.row) for r in results])

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, len(COLUMNS) - 1) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    lines = [f"{fmt(list(COLUMNS))}  invariants checked"]
    for r in results:
        if r.skipped:
            lines.append(f"{r.row.ljust(widths[0])}  {r.skipped}")
        else:
            lines.append(f"{fmt(_cells(r))}  {'; '.join(r.checked + r.notes)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
