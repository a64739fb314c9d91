"""The crash matrix, short: every row of tests/soak with a couple of crashes at random
points (`make soak` runs the same rows long). Each row must acknowledge something, lose,
duplicate and corrupt nothing, and keep every invariant it checks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.pg_plugin import PgService, unavailable
from tests.pgserver import FAST, PgServer, PgServerUnavailable
from tests.soak.matrix import PgTarget, SqliteTarget, Target
from tests.soak.rows import CASES, Case, run_case

KILLS = 2
#: The rows' random points; `python -m tests.soak --seed 16 --kills 2 --only ROW` reruns one.
SEED = 16


@pytest.fixture
def restartable(postgres_server: PgService) -> Iterator[PgService]:
    """A PostgreSQL server the row may restart: the session's when it is ours (nothing
    else is connected between tests), else a throwaway one of its own."""
    if postgres_server.server is not None:
        yield postgres_server
        return
    try:
        server = PgServer(settings=dict(FAST))
        server.start()
    except (PgServerUnavailable, OSError) as exc:
        unavailable(f"needs the PostgreSQL server binaries to restart a server: {exc}")
        raise AssertionError("unreachable") from exc
    try:
        yield PgService(server.url(), server)
    finally:
        server.stop()


def _target(case: Case, request: pytest.FixtureRequest) -> Target | None:
    if case.engine == "postgres":
        fixture = "restartable" if case.name.startswith("pg-restart") else "postgres_server"
        return PgTarget(request.getfixturevalue(fixture))
    return SqliteTarget() if case.engine == "sqlite" else None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.name, marks=(pytest.mark.service,) if c.engine != "sqlite" else ())
    for c in CASES if c.short])
def test_row_loses_duplicates_and_corrupts_nothing(case: Case, tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    res = run_case(case, KILLS, SEED, tmp_path, _target(case, request))
    if res.skipped:
        unavailable(f"{case.name}: {res.skipped}")  # fails under TIDINGS_REQUIRE_SERVICES=1
    assert res.ok and res.acked > 0, res.report()
