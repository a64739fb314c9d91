"""Every module of tidings imports on its own: no import cycle bites at run time.

A cycle between two modules only fails when the wrong one is imported first,
so each module is imported first once: in one fresh interpreter, with every
`tidings` module dropped from `sys.modules` before each import (what stays is
the standard library and third-party packages, which cannot be part of a cycle
of ours). One interpreter for all keeps this to a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tidings

SRC = Path(tidings.__file__).parent

_IMPORT_EACH = r"""
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "tidings" or m.startswith("tidings.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed.append(name + ":\n" + traceback.format_exc())
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _modules() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_first() -> None:
    modules = _modules()
    assert len(modules) > 40 and "tidings.engines.store_base" in modules
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-W", "error", "-c", _IMPORT_EACH, *modules],
                          capture_output=True, text=True, env=env, timeout=100)
    assert done.returncode == 0, f"modules that fail to import first:\n{done.stdout}{done.stderr}"
