"""The engine a URL names: `memory://`, `sqlite:///path.db`, `postgresql://…`,
`nats://host:4222`.

The one place outside an engine's own module that knows the concrete engines; everything
else reaches an engine through the protocol (engines/base.py, store_base.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import InvalidArgument, TidingsError
from .base import Engine

__all__ = ["engine_for"]


def engine_for(url: str, options: dict[str, Any]) -> Engine:
    """A new, unopened engine for `url`; `options` win over the URL's query. A `broker`
    (option, or `?broker=nats://…` in the URL) puts the messages on NATS JetStream and
    keeps the state in the database `url` names (engines/brokered.py)."""
    try:
        options = dict(options)
        url, broker = _split_broker(url, options.pop("broker", None))
        engine = _make_engine(url, options)
        if broker is None:
            return engine
        return _brokered(engine, broker)
    except TidingsError:
        raise
    except (TypeError, ValueError) as exc:  # an option of the wrong type or shape
        raise InvalidArgument(f"bad engine option in {url!r} / {options!r}: {exc}") from None


def _split_broker(url: str, broker: Any) -> tuple[str, str | None]:
    """`url` without its `broker=` query parameter, and the broker URL (the argument wins)."""
    if not isinstance(url, str) or "?" not in url:
        return url, broker
    base, _, query = url.partition("?")
    keep, found = [], None
    for part in query.split("&"):
        if part.startswith("broker="):
            found = unquote(part[len("broker="):])
        elif part:
            keep.append(part)
    if found is None:
        return url, broker
    return (f"{base}?{'&'.join(keep)}" if keep else base), (broker if broker else found)


def _brokered(db: Engine, broker: Any) -> Engine:
    if not isinstance(broker, str) or not broker.lower().startswith(("nats://", "tls://")):
        raise InvalidArgument(f"broker {broker!r} is not a NATS URL; use broker='nats://host:4222'"
                              " (several servers: 'nats://h1:4222,h2:4222')")
    from .jetstream import JetStreamEngine

    if db.url.startswith("memory:") or isinstance(db, JetStreamEngine):
        from ..errors import Unsupported

        raise Unsupported(
            f"{db.url!r} cannot hold the outbox for a broker (it must keep what it committed "
            "across a restart); use broker= with 'sqlite:///app.db' or 'postgresql://…'")
    from .brokered import BrokeredEngine

    return BrokeredEngine(db, JetStreamEngine(broker))


def _make_engine(url: str, options: dict[str, Any]) -> Engine:
    if not isinstance(url, str) or "://" not in url:
        raise InvalidArgument(
            f"engine URL {url!r} is not a URL; use 'sqlite:///path.db', 'memory://' "
            "or 'postgresql://user@host/db'"
        )
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    merged = {**query, **options}
    scheme = parts.scheme.lower()
    if scheme == "memory":
        from .memory import MemoryEngine

        return MemoryEngine(url, **merged)
    if scheme == "sqlite":
        from .sqlite import SqliteEngine

        # sqlite:///relative.db, sqlite:////absolute.db: the third slash ends the (empty) host
        path = url.split("://", 1)[1].split("?", 1)[0].removeprefix("/")
        if not path:
            raise InvalidArgument(
                "sqlite URL has no file path; use 'sqlite:///relative.db' or "
                "'sqlite:////absolute/path.db'"
            )
        known = {"durability", "dedup_window", "poll_interval", "max_batch"}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise InvalidArgument(
                f"sqlite:// does not take {', '.join(unknown)}; its options are "
                f"{', '.join(sorted(known))}"
            )
        return SqliteEngine(path, url=url, **merged)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresEngine

        return PostgresEngine(url, **merged)
    if scheme in ("nats", "tls"):
        from .jetstream import JetStreamEngine

        return JetStreamEngine(url, **options)  # (it reads the URL's query itself)
    raise InvalidArgument(
        f"unknown engine {scheme!r} in {url!r}; use 'sqlite:///path.db', 'memory://' "
        "'postgresql://…' or 'nats://host:4222'"
    )
