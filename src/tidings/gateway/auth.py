"""Bearer-token authentication, and the rule that a server reachable from outside needs one.

With a token, every `/v1` call and `/metrics` need `Authorization: Bearer
<token>` (browsers' EventSource cannot set headers, so a GET may instead
carry `?access_token=<token>`, as RFC 6750 allows). The token is compared in
constant time. `/healthz` and the dashboard's static shell stay open: they
hold no data.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import InvalidArgument
from .http import error_body

__all__ = ["BearerAuth", "check_bind", "is_loopback"]

PROTECTED = ("/v1/", "/metrics")


class BearerAuth:
    """ASGI middleware: 401 with `{error, detail}` unless the request carries the token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        if not isinstance(token, str) or not token:
            raise InvalidArgument("the gateway token must be a non-empty string")
        self.app = app
        self._expected = token.encode()

    def _allowed(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = credentials.strip()
                break
        if not given and scope.get("method") == "GET" and scope.get("query_string"):
            for k, v in parse_qsl(scope["query_string"].decode("latin-1")):
                if k == "access_token":
                    given = v.encode("latin-1")
                    break
        return hmac.compare_digest(given, self._expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED) or \
                self._allowed(scope):
            await self.app(scope, receive, send)
            return
        body = error_body("unauthorized", "this server needs a token: send the header "
                          "'Authorization: Bearer <token>' (the token given to `tidings serve`)")
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="tidings"'),
        ]})
        await send({"type": "http.response.body", "body": body})


def is_loopback(host: str) -> bool:
    """True when `host` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to a public address


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve on a non-loopback address without a token (anyone could publish)."""
    if not token and not is_loopback(host):
        raise InvalidArgument(
            f"refusing to listen on {host!r} without a token: anyone who can reach it could "
            "publish, read and start sagas. Pass --token T (or set TIDINGS_TOKEN), or bind to "
            "127.0.0.1"
        )
