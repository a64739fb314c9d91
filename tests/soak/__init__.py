"""The crash matrix: black-box crash probes, each row a kind of crash on one engine.

`make soak` (`python -m tests.soak [--kills N] [--only ROW] [--seed S]`) runs every row
long and prints a table; tests/integration/test_crash_matrix.py runs each with a couple of
kills in `make test`. Rows live in `rows.py`; each is `run(kills, rng, workdir, target) ->
RowResult` (`matrix.py`), in one module per family: `publish`, `events`, `consumers`,
`sagas`, `diskfull`, `pgrestart`, `nats`. Their child processes are in tests/integration/
(`_matrix_child.py`, `_saga_child.py`).
"""
