"""The HTTP gateway: tidings over JSON/HTTP, a live dashboard, metrics (needs `tidings[server]`).

`create_app(hub)` is an ASGI app (Starlette); `serve(url, host, port, token,
app)` runs it with uvicorn, as `tidings serve` does (`run(...)`: the same from
synchronous code, on uvloop when installed).
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        f"the tidings gateway needs {exc.name!r}; install it with: pip install 'tidings[server]'"
    ) from exc

from .app import create_app
from .server import run, serve

__all__ = ["create_app", "run", "serve"]
