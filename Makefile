# tidings: one command per job on a fresh machine.
#   make demo    create .venv if needed, then run the shop saga demo on ./tidings.db
#   make test    create .venv if needed, then run the whole test suite
#   make soak    the crash matrix, long (KILLS=20 per row; ONLY=row, SEED=n to narrow/rerun)
#   make bench   run the benchmarks (tidings and its peers side by side)
#   make lint    ruff + mypy (strict on src/)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH  ?= all
# apt-get needs root; use sudo only when we are not root already.
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo test soak bench lint clean browser-deps postgres-deps

venv: $(STAMP)

# The stamp makes `make venv` a no-op until pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar off -e '.[dev]'
	@touch $@

$(VENV)/.installed-bench: $(STAMP)
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar off -e '.[dev,bench]'
	@touch $@

demo: venv
	$(BIN)/tidings demo shop

# Everything the suite needs that pip cannot install goes in front of pytest here.
# (Debian's chromium for the dashboard's browser test; PostgreSQL's server binaries
# are on the machine and the tests start a throwaway server themselves.)
test: venv browser-deps postgres-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The crash matrix (tests/soak): SIGKILLs, a full disk, PostgreSQL restarts, at random
# points; prints a table and fails on any loss, duplicate, corruption or broken invariant.
KILLS ?= 20
soak: venv postgres-deps
	$(BIN)/python -m tests.soak --kills $(KILLS) $(if $(ONLY),--only $(ONLY)) $(if $(SEED),--seed $(SEED))

# Debian's chromium for the dashboard's browser tests (playwright drives it).
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
		$(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends chromium; \
	fi

# PostgreSQL's server binaries (initdb, pg_ctl): the tests start a throwaway server.
postgres-deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		$(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends postgresql; \
	fi

bench: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks $(BENCH)

lint: venv
	$(BIN)/ruff check src tests examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	rm -f tidings.db tidings.db-wal tidings.db-shm
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
