"""The engine protocol is complete: every engine implements all of it, and nothing else is used.

`Engine` (engines/base.py), `StoreBackend` and `StoreTx` (engines/store_base.py)
are the single list of what an engine implements. For each engine of the
matrix this checks the objects the library really uses (the hub's engine, its
event store, a store transaction) against those classes alone: every method,
with the same parameters and the same async-ness. The types of the parameters
are mypy's to check (an override must accept what the protocol promises).

Then it checks the other side: outside `tidings/engines/`, no module imports an
engine's own modules (only the protocol's), except the URL -> engine factory.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tidings
from tidings.engines.base import Engine
from tidings.engines.store_base import StoreBackend, StoreTx

SRC = Path(tidings.__file__).parent

#: The protocol's modules, and the factory that turns a URL into an engine: what the rest
#: of the library may import from `tidings.engines`.
PROTOCOL_MODULES = {"tidings.engines.base", "tidings.engines.store_base",
                    "tidings.engines.delivery", "tidings.engines.factory"}




def _members(proto: type) -> Iterator[str]:
    """The protocol's methods and properties: abstract ones, and public ones it defines."""
    names = set(getattr(proto, "__abstractmethods__", ()))
    for klass in proto.__mro__:
        if klass is object:
            continue
        names |= {n for n, v in vars(klass).items()
                  if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    yield from sorted(names)


def _shape(fn: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _check(obj: object, proto: type) -> list[str]:
    """What `obj` does differently from the protocol class `proto` (nothing: [])."""
    cls = type(obj)
    problems = []
    if not isinstance(obj, proto):
        return [f"{cls.__qualname__} is not a {proto.__name__}"]
    for name in _members(proto):
        want = inspect.getattr_static(proto, name)
        got = inspect.getattr_static(cls, name)
        where = f"{cls.__qualname__}.{name}"
        if getattr(got, "__isabstractmethod__", False):
            problems.append(f"{where} is not implemented")
        elif isinstance(want, property):
            if not isinstance(got, property):
                problems.append(f"{where} is not a property")
        elif isinstance(want, (staticmethod, classmethod)) or not callable(got):
            problems.append(f"{where} is not a method")
        elif inspect.iscoroutinefunction(got) != inspect.iscoroutinefunction(want):
            kind = "async" if inspect.iscoroutinefunction(want) else "plain (not async)"
            problems.append(f"{where} must be {kind}, as {proto.__name__}.{name} is")
        elif _shape(got) != _shape(want):
            problems.append(f"{where}{inspect.signature(got)} does not take the parameters "
                            f"of {proto.__name__}.{name}{inspect.signature(want)}")
    return problems


async def test_the_engine_implements_the_engine_protocol(hub: tidings.Hub) -> None:
    engine = hub.engine
    assert _check(engine, Engine) == []
    assert isinstance(engine.url, str) and isinstance(engine.dedup_window, float)


@pytest.mark.events
async def test_its_event_store_implements_the_store_protocol(hub: tidings.Hub) -> None:
    store = hub.engine.event_store()
    assert _check(store, StoreBackend) == []
    assert store.engine is hub.engine
    assert type(hub.events.backend) is type(store)  # what the hub uses is made by it
    assert _check(hub.events.backend, StoreBackend) == []


@pytest.mark.events
async def test_its_store_transaction_implements_the_tx_protocol(hub: tidings.Hub) -> None:
    async def look(tx: StoreTx) -> list[str]:
        return [*_check(tx, StoreTx), *(["no `record`"] if not hasattr(tx, "record") else [])]

    assert await hub.events.backend.transaction(look) == []


# the other side: the library uses the protocol only -------------------------------------
def _modules() -> Iterator[tuple[Path, str, ast.Module]]:
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "engines":
            continue
        name = ".".join(("tidings", *rel.with_suffix("").parts))
        if rel.name == "__init__.py":
            name = name.rsplit(".", 1)[0]
        yield rel, name, ast.parse(path.read_text(), str(path))


def _scopes(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """Every node with the name of the outermost function (or class) around it."""
    for top in tree.body:
        scope = getattr(top, "name", "<module>")
        for node in ast.walk(top):
            yield scope, node


def _imported(module: str, is_package: bool, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        parts = module.split(".")
        base = parts if is_package else parts[:-1]
        if node.level:
            base = base[: len(base) - node.level + 1]
        head = ".".join([*base, node.module] if node.module else base) if node.level else (
            node.module or "")
        # `from tidings.engines import sqlite` imports a module too
        return [head, *(f"{head}.{a.name}" for a in node.names)]
    return []


def test_outside_the_engines_only_the_protocol_is_imported() -> None:
    found = []
    for rel, module, tree in _modules():
        for scope, node in _scopes(tree):
            for name in _imported(module, rel.name == "__init__.py", node):
                if not name.startswith("tidings.engines."):
                    continue
                owner = ".".join(name.split(".")[:3])  # tidings.engines.<module>
                if owner in PROTOCOL_MODULES:
                    continue
                found.append(f"{rel}:{getattr(node, 'lineno', '?')} ({scope}) imports {name}")
    assert found == [], ("only the protocol (engines/base.py, store_base.py, delivery.py) and the factory may "
                         "be imported outside tidings/engines/; reach an engine through it")


def test_outside_the_engines_nothing_is_looked_up_on_an_engine_or_a_store() -> None:
    """No `getattr(engine, "x")` / `hasattr(backend, "x")`: a capability is on the protocol."""
    found = set()
    for rel, _module, tree in _modules():
        for scope, node in _scopes(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr") and node.args):
                target = ast.unparse(node.args[0])
                if "engine" in target or "backend" in target:
                    found.add((rel.as_posix(), scope))
    assert not found, sorted(found)
