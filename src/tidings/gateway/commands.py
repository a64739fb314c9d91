"""Asynchronous request-reply: start a saga with a POST, then poll its request for the outcome.

`POST /v1/commands/{saga}` answers 202 Accepted at once with a request id and
`Location: /v1/requests/{id}`; the saga runs on. `GET /v1/requests/{id}`
tells pending/running, then completed (with the result) or compensated/failed
(with the reason). A repeated POST with the same `Idempotency-Key` gets the
same request id and starts nothing new: the request id is derived from the
key, and a command target's `start` must treat an id it already knows as a
repeat (sagas are event-sourced by id, so this is their natural behaviour).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..messages import new_id
from .http import ApiError, expect_object, json_response, read_json

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["CommandTarget", "Requests", "request_status", "routes"]

#: Saga statuses (tidings.saga) -> request statuses (shared/DESIGN.md).
_STATUS = {
    "pending": "pending",
    "running": "running",
    "compensating": "running",
    "completed": "completed",
    "compensated": "compensated",
    "failed": "failed",
    "stuck": "failed",
}
TERMINAL = frozenset({"completed", "compensated", "failed"})
MAX_KEY = 255


@runtime_checkable
class CommandTarget(Protocol):
    """What `POST /v1/commands/{name}` starts: in practice `hub.sagas(definition)`.

    `start(data, id)` starts one run with that id and returns it; given an id
    it already has, it starts nothing and returns the id. `get(id)` returns a
    dict with at least `status` (and `result`, `error`, `steps` when known),
    or None when the id is not one of its runs. A `start` that cannot take
    more work right now raises `tidings.BufferFull` (the client gets 429).
    """

    async def start(self, data: dict[str, Any], id: str) -> str: ...

    async def get(self, id: str) -> dict[str, Any] | None: ...


def request_status(state: Mapping[str, Any]) -> str:
    return _STATUS.get(str(state.get("status", "pending")), "running")


class Requests:
    """The recent requests (for the dashboard) and the idempotency keys seen (bounded)."""

    def __init__(self, recent: int = 50, keys: int = 100_000) -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self._keys: OrderedDict[str, str] = OrderedDict()  # request id -> body fingerprint
        self._max_keys = keys

    def remember(self, request_id: str, saga: str, fingerprint: str | None) -> bool:
        """Record a request; False when this id was already seen with another body."""
        if fingerprint is not None:
            seen = self._keys.get(request_id)
            if seen is not None:
                self._keys.move_to_end(request_id)
                return seen == fingerprint
            self._keys[request_id] = fingerprint
            if len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
        if not any(r["request_id"] == request_id for r in self.recent):
            self.recent.appendleft({"request_id": request_id, "saga": saga,
                                    "accepted": time.time(), "status": "pending"})
        return True

    def update(self, request_id: str, status: str) -> None:
        for r in self.recent:
            if r["request_id"] == request_id:
                r["status"] = status


def idempotent_id(saga: str, key: str) -> str:
    """The request id for an Idempotency-Key: the same for every server sharing the engine."""
    return "k-" + hashlib.sha256(f"{saga}\x00{key}".encode()).hexdigest()[:32]


def routes(gw: Gateway) -> list[Route]:
    def target(name: str) -> CommandTarget:
        found = gw.commands.get(name)
        if found is None:
            if not gw.commands:
                raise ApiError(404, "not_found", f"no saga named {name!r}: this server has no "
                               "sagas registered (start it with `tidings serve --app "
                               "module:app` to serve an application's sagas)")
            raise ApiError(404, "not_found", f"no saga named {name!r}; this server has "
                           f"{', '.join(sorted(gw.commands))}")
        return found

    async def find(request_id: str) -> tuple[str, dict[str, Any]]:
        if not request_id or len(request_id) > 255:
            raise ApiError(404, "not_found", "no such request")
        for name, t in gw.commands.items():
            state = await t.get(request_id)
            if state is not None:
                return name, state
        raise ApiError(404, "not_found", f"no request {request_id!r}; request ids come from "
                       "POST /v1/commands/{saga}")

    async def start(request: Request) -> Response:
        name = request.path_params["saga"]
        t = target(name)
        with gw.commands_admission.admit():
            raw = await request.body()
            data = expect_object(await read_json(request), "the command (request body)")
            key = request.headers.get("idempotency-key")
            fingerprint = None
            if key is not None:
                if not 1 <= len(key) <= MAX_KEY:
                    raise ApiError(422, "invalid_field",
                                   f"Idempotency-Key must be 1 to {MAX_KEY} characters")
                request_id = idempotent_id(name, key)
                fingerprint = hashlib.sha256(raw).hexdigest()
            else:
                request_id = new_id()
            if not gw.requests.remember(request_id, name, fingerprint):
                raise ApiError(422, "idempotency_key_reused",
                               "this Idempotency-Key was used with a different body; use a new "
                               "key for a new command")
            got = await t.start(data, request_id)
        gw.metrics.commands.labels(name).inc()
        location = f"/v1/requests/{got}"
        return json_response({"request_id": got}, 202,
                             {"Location": location})

    async def get_request(request: Request) -> Response:
        request_id = request.path_params["id"]
        name, state = await find(request_id)
        status = request_status(state)
        gw.requests.update(request_id, status)
        out: dict[str, Any] = {"request_id": request_id, "saga": name, "status": status}
        for k in ("result", "error"):
            if state.get(k) is not None:
                out[k] = state[k]
        return json_response(out)

    async def list_sagas(request: Request) -> Response:
        wanted = request.query_params.get("status") or None
        out: list[dict[str, Any]] = []
        for name, t in gw.commands.items():
            lister = getattr(t, "list", None)
            if lister is None:
                continue
            for s in await lister(wanted):
                out.append({"saga": name, **s})
        return json_response({"sagas": out})

    async def get_saga(request: Request) -> Response:
        name, state = await find(request.path_params["id"])
        return json_response({"saga": name, **state})

    return [
        Route("/v1/commands/{saga}", start, methods=["POST"]),
        Route("/v1/requests/{id}", get_request, methods=["GET"]),
        Route("/v1/sagas", list_sagas, methods=["GET"]),
        Route("/v1/sagas/{id}", get_saga, methods=["GET"]),
    ]
