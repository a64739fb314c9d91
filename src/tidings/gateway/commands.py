"""Asynchronous request-reply: start a saga with a POST, then poll its request for the outcome.

`POST /v1/commands/{saga}` answers 202 Accepted at once with a request id and
`Location: /v1/requests/{id}`; the saga runs on. `GET /v1/requests/{id}`
tells pending/running, then completed (with the result) or compensated/failed
(with the reason); with `?wait=S` it answers as soon as the request ends (or
after S seconds), so a client need not poll. A repeated POST with the same `Idempotency-Key` gets the
same request id and starts nothing new: the request id is derived from the
key, and a command target's `start` must treat an id it already knows as a
repeat (sagas are event-sourced by id, so this is their natural behaviour).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import re
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import InvalidArgument, NotFound
from ..inputs import is_input_type
from ..messages import new_id
from ..util import Recent
from .http import (
    CLIENT_GONE,
    RETRY_AFTER,
    ApiError,
    ClientGone,
    expect_object,
    json_response,
    read_json,
    unless_disconnected,
)
from .params import number_param

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["CommandTarget", "Requests", "inputs", "listing", "lookup", "outcome",
           "request_status", "routes"]

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
MAX_LISTED = 1000
RECHECK = 0.25  # seconds between looks at a waited-for request whose end is not announced
_NAME = re.compile(r"[A-Za-z0-9_-]+")


@runtime_checkable
class CommandTarget(Protocol):
    """What `POST /v1/commands/{name}` starts: in practice `hub.sagas(definition)`.

    `start(data, id)` starts one run with that id and returns it; given an id
    it already has, it starts nothing and returns the id. `get(id)` returns a
    dict with at least `status` (and `result` or `data`, `error` or `reason`,
    `steps` when known), or None / raises `NotFound` when the id is not one of
    its runs. A `start` that cannot take more work right now raises
    `tidings.BufferFull` (the client gets 429); data it refuses, `InvalidArgument`
    (422, with its `field` path), before storing anything. Optional: `input`, the
    type `start` checks the data against (a msgspec Struct, dataclass or pydantic
    model class: its JSON schema is the command's body in /v1/openapi.json);
    `list(status)` (a
    list, or an async iterator, of such dicts) for `/v1/sagas` and the
    dashboard; `wait(id, timeout)` returning that dict once the run ends (raising
    TimeoutError), for `GET /v1/requests/{id}?wait` (without it the gateway waits
    for the run's `.ended` message).
    """

    async def start(self, data: dict[str, Any], id: str) -> str: ...

    async def get(self, id: str) -> dict[str, Any] | None: ...


def inputs(targets: Mapping[str, CommandTarget]) -> dict[str, type[Any]]:
    """Name -> input type of the targets that declare one (`hub.sagas(Saga(...,
    input=T))`), for names that are a path segment as they are."""
    out: dict[str, type[Any]] = {}
    for name, t in targets.items():
        tp = getattr(t, "input", None)
        if isinstance(tp, type) and is_input_type(tp) and _NAME.fullmatch(name):
            out[name] = tp
    return out


async def lookup(target: CommandTarget, id: str) -> dict[str, Any] | None:
    """`target.get(id)`, with "not one of mine" (None, NotFound, a malformed id) as None."""
    try:
        return await target.get(id)
    except (NotFound, InvalidArgument):
        return None


async def listing(target: CommandTarget, status: str | None, limit: int
                  ) -> list[dict[str, Any]] | None:
    """Up to `limit` runs from the target's optional `list(status)`; None when it has none."""
    lister = getattr(target, "list", None)
    if lister is None:
        return None
    got = lister(status)
    if inspect.isawaitable(got):
        got = await got
    if hasattr(got, "__aiter__"):
        out: list[dict[str, Any]] = []
        try:
            async for item in got:
                out.append(item)
                if len(out) >= limit:
                    break
        finally:
            aclose = getattr(got, "aclose", None)
            if aclose is not None:
                await aclose()
        return out
    return list(got)[:limit]


def outcome(state: Mapping[str, Any]) -> dict[str, Any]:
    """The request's view of a run: status, and its result or why it failed."""
    status = request_status(state)
    out: dict[str, Any] = {"status": status}
    if status == "completed":
        result = state.get("result", state.get("data"))
        if result is not None:
            out["result"] = result
    elif status in ("compensated", "failed"):
        error = state.get("error") or state.get("reason")
        if error is not None:
            out["error"] = error
    return out


def request_status(state: Mapping[str, Any]) -> str:
    return _STATUS.get(str(state.get("status", "pending")), "running")


class Requests:
    """What the gateway remembers of the commands it accepted (every part bounded).

    `recent`: the newest requests, for the dashboard. `running`: requests not
    yet seen to end; at `max_running` the next command gets 429, so a client
    pushing faster than sagas complete is told to back off instead of piling
    up work. A request leaves `running` when its saga's `.ended` message is
    seen, or when a poll or a check (`make_room`) finds it finished.
    """

    def __init__(self, *, max_running: int = 1000, recent: int = 50,
                 keys: int = 100_000) -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.running: OrderedDict[str, str] = OrderedDict()  # request id -> saga name
        self.max_running = max_running
        self._keys: Recent[str, str] = Recent(keys)  # request id -> body fingerprint
        self._waiting: dict[str, list[Any]] = {}  # request id -> [Event, waiters]

    def check_key(self, request_id: str, fingerprint: str) -> bool:
        """Remember an idempotent request's body; False when the key came with another body."""
        seen = self._keys.seen(request_id)
        if seen is not None:
            return seen == fingerprint
        self._keys.put(request_id, fingerprint)
        return True

    def forget_key(self, request_id: str) -> None:
        """Forget a key whose command was refused (nothing started): it may come again
        with a corrected body."""
        self._keys.pop(request_id, None)

    def accepted(self, request_id: str, saga: str) -> None:
        if any(r["request_id"] == request_id for r in self.recent):
            return  # a repeat (Idempotency-Key): already listed
        self.recent.appendleft({"request_id": request_id, "saga": saga,
                                "accepted": time.time(), "status": "pending"})

    def update(self, request_id: str, status: str) -> None:
        for r in self.recent:
            if r["request_id"] == request_id:
                r["status"] = status
        if status in TERMINAL:
            self.running.pop(request_id, None)

    def ended(self, request_id: str) -> None:
        """A saga ended (seen on its `.ended` topic): wake whoever waits for it."""
        self.running.pop(request_id, None)
        waiting = self._waiting.get(request_id)
        if waiting is not None:
            waiting[0].set()

    @contextlib.contextmanager
    def watch(self, request_id: str) -> Iterator[asyncio.Event]:
        """An event set when `request_id` is seen to end (register before looking)."""
        waiting = self._waiting.get(request_id)
        if waiting is None:
            waiting = self._waiting[request_id] = [asyncio.Event(), 0]
        waiting[1] += 1
        try:
            yield waiting[0]
        finally:
            waiting[1] -= 1
            if not waiting[1]:
                del self._waiting[request_id]

    async def make_room(self, targets: Mapping[str, CommandTarget], checks: int = 32) -> bool:
        """True when another request may start (checking the oldest running ones if full)."""
        if len(self.running) < self.max_running:
            return True
        for request_id, saga in list(self.running.items())[:checks]:
            t = targets.get(saga)
            state = await lookup(t, request_id) if t is not None else None
            if state is None or request_status(state) in TERMINAL:
                self.running.pop(request_id, None)
        return len(self.running) < self.max_running


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
            state = await lookup(t, request_id)
            if state is not None:
                return name, state
        raise ApiError(404, "not_found", f"no request {request_id!r}; request ids come from "
                       "POST /v1/commands/{saga}")

    async def start(request: Request) -> Response:
        name = request.path_params["saga"]
        t = target(name)
        # The body before the admission slot: a slow upload must not hold a command's place.
        data = expect_object(await read_json(request), "the command (request body)")
        key = request.headers.get("idempotency-key")
        with gw.commands_admission.admit():
            if key is not None:
                if not 1 <= len(key) <= MAX_KEY:
                    raise ApiError(422, "invalid_field",
                                   f"Idempotency-Key must be 1 to {MAX_KEY} characters")
                request_id = idempotent_id(name, key)
                fingerprint = hashlib.sha256(await request.body()).hexdigest()
                if not gw.requests.check_key(request_id, fingerprint):
                    raise ApiError(409, "idempotency_key_reused",
                                   "this Idempotency-Key was used with a different body; use a "
                                   "new key for a new command")
            else:
                request_id = new_id()
            reserved = request_id not in gw.requests.running
            if reserved:
                if not await gw.requests.make_room(gw.commands):
                    raise ApiError(429, "busy", f"{gw.requests.max_running} commands are still "
                                   f"running; retry after {RETRY_AFTER} s",
                                   {"Retry-After": RETRY_AFTER})
                gw.requests.running[request_id] = name  # held from here: no await since the check
            try:
                got = await t.start(data, request_id)
            except BaseException as exc:
                if reserved:
                    gw.requests.running.pop(request_id, None)
                if key is not None and isinstance(exc, InvalidArgument):
                    gw.requests.forget_key(request_id)
                raise
            gw.requests.accepted(got, name)
        gw.metrics.commands.labels(name).inc()
        location = f"/v1/requests/{got}"
        return json_response({"request_id": got}, 202,
                             {"Location": location})

    async def wait_for(request_id: str, wait: float) -> dict[str, Any]:
        """The request's view once it ends, or after `wait` seconds."""
        with gw.requests.watch(request_id) as ended:
            deadline = time.monotonic() + wait
            while True:
                name, state = await find(request_id)
                out = {"request_id": request_id, "saga": name, **outcome(state)}
                remaining = deadline - time.monotonic()
                if out["status"] in TERMINAL or remaining <= 0:
                    return out
                waiter = getattr(gw.commands[name], "wait", None)
                if waiter is not None:  # e.g. a SagaRunner: told the moment it ends
                    with contextlib.suppress(TimeoutError):
                        state = await waiter(request_id, timeout=remaining)
                        out = {"request_id": request_id, "saga": name, **outcome(state)}
                    return out
                # woken by the saga's .ended message; a target that publishes none is
                # looked at again every RECHECK seconds
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), min(remaining, RECHECK))

    async def get_request(request: Request) -> Response:
        request_id = request.path_params["id"]
        wait = number_param(request, "wait", 0.0, 0.0, gw.max_wait)
        if not wait:
            name, state = await find(request_id)
            out = {"request_id": request_id, "saga": name, **outcome(state)}
        else:
            with gw.waits.admit():  # freed at once when the client gives up
                try:
                    out = await unless_disconnected(request.receive,
                                                    wait_for(request_id, wait))
                except ClientGone:
                    return Response(status_code=CLIENT_GONE)
        gw.requests.update(request_id, out["status"])
        return json_response(out)

    async def list_sagas(request: Request) -> Response:
        wanted = request.query_params.get("status") or None
        out: list[dict[str, Any]] = []
        for name, t in gw.commands.items():
            for s in await listing(t, wanted, MAX_LISTED) or ():
                out.append({**s, "saga": name})
        return json_response({"sagas": out})

    async def get_saga(request: Request) -> Response:
        name, state = await find(request.path_params["id"])
        return json_response({**state, "saga": name})

    return [
        Route("/v1/commands/{saga}", start, methods=["POST"]),
        Route("/v1/requests/{id}", get_request, methods=["GET"]),
        Route("/v1/sagas", list_sagas, methods=["GET"]),
        Route("/v1/sagas/{id}", get_saga, methods=["GET"]),
    ]
