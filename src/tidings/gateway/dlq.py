"""Dead letters over HTTP: list a subscription's, and move them back (redrive).

    GET  /v1/dlq/{group}?topic=&limit=&redriven=&dead_letter=
    POST /v1/dlq/{group}/redrive   {"ids": [...]} | {"all": true}
                                   (+ "topic", "limit", "dead_letter")

A redrive moves each dead letter back once, however often it is asked (see
tidings/redrive.py), so a client that lost the answer simply asks again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..redrive import MAX_IDS, summary
from .http import ApiError, convert, expect_object, json_response, read_json
from .params import integer_param
from .pubsub import check_publish_topic

if TYPE_CHECKING:
    from .app import Gateway

__all__ = ["routes"]

#: At most this many dead letters in one listing.
MAX_LIST = 1000


class RedriveIn(msgspec.Struct, forbid_unknown_fields=True):
    ids: list[str] | None = None
    all: bool | None = None
    topic: str | None = None
    # A float too: JSON (and the document's "type": "integer") has 5.0 == 5.
    limit: int | float | None = None
    dead_letter: str | None = None


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name)
    if raw is None or raw in ("0", "false"):
        return False
    if raw in ("1", "true"):
        return True
    raise ApiError(422, "invalid_field", f"query parameter {name!r} is true or false, got "
                   f"{raw[:40]!r}")


def routes(gw: Gateway) -> list[Route]:
    async def list_dead_letters(request: Request) -> Response:
        group = request.path_params["group"]
        dead_letter = request.query_params.get("dead_letter")
        if dead_letter is not None:
            check_publish_topic(dead_letter, "dead_letter")
        found = await gw.hub.dead_letters(
            group, topic=request.query_params.get("topic"),
            limit=integer_param(request, "limit", 100, 1, MAX_LIST),
            dead_letter=dead_letter, redriven=_flag(request, "redriven"))
        return json_response({"group": group, "dead_letters": [summary(d) for d in found]})

    async def redrive(request: Request) -> Response:
        group = request.path_params["group"]
        body: RedriveIn = convert(expect_object(await read_json(request)), RedriveIn)
        if body.ids is None and body.all is not True:
            raise ApiError(422, "invalid_field", 'name the dead letters to move with "ids": '
                           '[...] (their ids or their original messages\' ids), or send '
                           '"all": true', field="ids")
        if body.ids is not None and body.all is not None:
            raise ApiError(422, "invalid_field", '"ids" and "all" do not go together: "ids" '
                           'moves those named, "all" every one', field="all")
        if body.ids is not None and not 1 <= len(body.ids) <= MAX_IDS:
            raise ApiError(422, "invalid_field", f'"ids" holds 1 to {MAX_IDS} ids',
                           field="ids")
        limit = body.limit
        if isinstance(limit, float):
            if not limit.is_integer():
                raise ApiError(422, "invalid_field", f'"limit" is a whole number >= 1, got '
                               f"{limit!r}", field="limit")
            limit = int(limit)
        if body.dead_letter is not None:
            check_publish_topic(body.dead_letter, "dead_letter")
        moved = await gw.hub.redrive(group, topic=body.topic, ids=body.ids, limit=limit,
                                     dead_letter=body.dead_letter)
        out: dict[str, Any] = {"group": group, "moved": moved}
        return json_response(out)

    return [
        Route("/v1/dlq/{group}", list_dead_letters, methods=["GET"]),
        Route("/v1/dlq/{group}/redrive", redrive, methods=["POST"]),
    ]
